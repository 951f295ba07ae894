"""What a user does with each format, once, end to end: quantize while loading, save and reload, a LoRA step, and
torch.compile. CI runs this file alone a second time on the declared lower bounds of transformers, accelerate and
peft (.ci/run), so that the versions pyproject.toml admits are the versions tested."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitConfig, LowBitLinear

FORMATS = {
    "nf4": dict(weights="nf4"),
    "fp4": dict(weights="fp4", double_quant=False),
    "int8": dict(weights="int8"),
    "int8-weight-only": dict(weights="int8", activations=None),
    "int4": dict(weights="int4"),
    "int3": dict(weights="int3"),
    "int2": dict(weights="int2", block_size=32),
    "fp8": dict(weights="fp8"),
}


@pytest.mark.parametrize("name", FORMATS)
def test_load_save_reload_lora_and_compile(llama_dir, token_ids, tmp_path, name):
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(**FORMATS[name]))
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    assert len(layers) == 2 * 7 and all(layer.fmt.name == FORMATS[name]["weights"] for layer in layers)
    with torch.no_grad():
        logits = model(token_ids).logits
    assert torch.isfinite(logits).all()

    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(token_ids).logits, logits)

    compiled = torch.compile(again, fullgraph=True, backend="eager")  # dynamo: the version-sensitive part
    with torch.no_grad():
        assert torch.equal(compiled(token_ids).logits, logits)

    lora = peft.get_peft_model(again, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    lora(token_ids, labels=token_ids).loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
