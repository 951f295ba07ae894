"""The stored layout against code that walks every parameter, and checkpoints written in the previous layout.

format_version 2 keeps no stored tensor 1-D and 8-bit or packed (the classic fine-tuning recipe casts every 1-D
parameter to float32) and none 0-d (FSDP2 refuses scalar parameters; its test is in test_fsdp.py). A version-1
checkpoint (1-D packed weight and absmax codes, 0-d offset; the same bytes in the same order) still loads.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantizer_plugin import FORMAT_VERSION, LowBitConfig

from helpers import cosine, lowbit_modules

FORMATS = {
    "nf4": dict(weights="nf4"),
    "nf4-no-dq": dict(weights="nf4", double_quant=False),
    "fp4": dict(weights="fp4"),
    "int8": dict(weights="int8"),
    "fp8": dict(weights="fp8"),
}


def stored(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{tensor_name}": tensor.detach().clone()
        for name, layer in lowbit_modules(model).items()
        for tensor_name, tensor in layer.quantized_tensors().items()
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_cast_every_1d_parameter_to_float32_recipe_leaves_quantized_layers_working(llama_dir, token_ids, fmt):
    # transformers' bitsandbytes tests and the old PEFT notebooks: `if p.ndim == 1: p.data = p.data.to(float32)`.
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(**FORMATS[fmt]))
    before = stored(model)
    # As in transformers' test: the float32 norms feed the bf16 head, so the forward runs under autocast.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(token_ids).logits.float()

    for param in model.parameters():
        if param.ndim == 1:
            param.data = param.data.to(torch.float32)

    after = stored(model)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(token_ids).logits.float()
    # the norms now run in float32, so the logits move a little, but only a little
    assert torch.isfinite(logits).all() and cosine(logits, expected) > 0.999


def write_version_1(folder, out):
    """A copy of a version-2 checkpoint in the version-1 layout (flat packed weight and absmax codes, 0-d offset)."""
    out.mkdir()
    tensors = load_file(str(folder / "model.safetensors"))
    for key, tensor in tensors.items():
        if key.endswith((".weight_absmax_code", ".weight_absmax_offset")) or (
            key.endswith(".weight") and tensor.dtype == torch.uint8
        ):
            tensors[key] = tensor.reshape(-1) if tensor.numel() > 1 or key.endswith(".weight") else tensor.reshape(())
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fmt", ["nf4", "nf4-no-dq", "fp4"])
def test_a_version_1_checkpoint_loads_in_the_current_layout(llama_dir, tmp_path, token_ids, fmt):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(**FORMATS[fmt]))
    model.save_pretrained(tmp_path / "v2")
    write_version_1(tmp_path / "v2", tmp_path / "v1")
    assert load_file(str(tmp_path / "v1" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].ndim == 1

    old = AutoModelForCausalLM.from_pretrained(tmp_path / "v1")
    assert old.config.quantization_config.format_version == FORMAT_VERSION == 2
    for key, tensor in stored(model).items():
        assert torch.equal(stored(old)[key], tensor), key
    with torch.no_grad():
        assert torch.equal(old(token_ids).logits, model(token_ids).logits)
    # saved again, it is a current checkpoint
    old.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["format_version"] == 2
    shapes = {folder: {k: t.shape for k, t in load_file(str(tmp_path / folder / "model.safetensors")).items()}
              for folder in ("v2", "again")}  # fmt: skip
    assert shapes["again"] == shapes["v2"]


def test_a_version_1_checkpoint_with_a_disk_offloaded_layer_stays_version_1(llama_dir, tmp_path, token_ids):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(weights="nf4"))
    model.save_pretrained(tmp_path / "v2")
    write_version_1(tmp_path / "v2", tmp_path / "v1")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "v1", device_map=device_map, offload_folder=tmp_path / "off")
    # accelerate reloads the offloaded layer in the checkpoint's shapes at every forward: the model keeps version 1
    assert old.config.quantization_config.format_version == 1
    assert old.model.layers[0].mlp.up_proj.weight.ndim == 1
    with torch.no_grad():
        assert torch.equal(old(token_ids).logits, model(token_ids).logits)
