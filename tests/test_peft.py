"""QLoRA with PEFT on our quantized models: wrapping, training, saving/reloading adapters, merging, Trainer, bad targets.

Every test starts from a plain `import quantizer_plugin` (conftest) and PEFT's public API, nothing else: the LoRA
dispatch for LowBitLinear must happen on its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments

from quantizer_plugin import LowBitConfig, LowBitLinear
from quantizer_plugin.modules import KeptLinear
from quantizer_plugin.lora import LowBitLoraLinear

import oracles
from conftest import tiny_llama_config
from helpers import lowbit_modules

# nf4 with double quant (the QLoRA recipe), fp4, LLM.int8, int8 weight-only, int4, int2 and fp8.
FORMATS = {
    "nf4": dict(weights="nf4", double_quant=True),
    "fp4": dict(weights="fp4"),
    "int8": dict(weights="int8"),
    "int8-weight-only": dict(weights="int8", activations=None),
    "int4": dict(weights="int4"),
    "int2": dict(weights="int2"),
    "fp8": dict(weights="fp8"),
}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Llama in bfloat16. initializer_range=0.1 rather than the default 0.02: with a frozen random
    lm_head of std 0.02 the logits cannot leave about +-2 whatever the adapters do, so the loss floors near 3.9 and
    a training run could not show learning."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(intermediate_size=150, initializer_range=0.1)).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("qlora") / "base"
    model.save_pretrained(path)
    return path


@pytest.fixture
def batch():
    return torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(7))


def load(path, fmt: str, dtype: torch.dtype | None = None, **overrides) -> nn.Module:
    config = LowBitConfig(**{**FORMATS[fmt], **overrides})
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=dtype)


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids.to(model.device)).logits


def stored_tensors(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{tensor_name}": tensor
        for name, module in lowbit_modules(model).items()
        for tensor_name, tensor in module.quantized_tensors().items()
    }


def lora_layers(model) -> dict[str, LowBitLoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowBitLoraLinear)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_wraps_every_quantized_layer(base_dir, fmt, batch):
    model = prepare_model_for_kbit_training(load(base_dir, fmt), use_gradient_checkpointing=False)
    before = {name: t.clone() for name, t in stored_tensors(model).items()}
    # prepare_model_for_kbit_training upcasts the 16-bit parameters (norms, embeddings, head) to float32 and freezes
    # everything; the layers still read their stored tensors in the format's dtypes, with their values, and save them
    # so (int4/int2's float16 scales and zero points are among the parameters it upcasts).
    assert all(not p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    specs = {f"{name}.{t}": spec.dtype for name, m in lowbit_modules(model).items() for t, spec in m.tensor_specs().items()}
    assert {k: t.dtype for k, t in stored_tensors(model).items()} == specs
    state = model.state_dict()
    assert all(state[key].dtype == dtype for key, dtype in specs.items())
    fresh = stored_tensors(load(base_dir, fmt))
    assert all(torch.equal(before[key], fresh[key]) for key in fresh)
    base_logits = logits(model, batch)

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))

    wrapped = lora_layers(peft_model)
    n_layers = model.config.num_hidden_layers
    assert len(wrapped) == n_layers * len(PROJECTIONS)
    assert all(isinstance(layer.get_base_layer(), LowBitLinear) for layer in wrapped.values())
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(PROJECTIONS)
    assert type(peft_model.base_model.model.lm_head) is KeptLinear  # the output head is never a LoRA target
    # PEFT initialises B to zero: the adapted model starts out as the quantized model, bit for bit.
    assert torch.equal(logits(peft_model, batch), base_logits)
    wrapped_tensors = list(stored_tensors(peft_model).values())
    assert len(wrapped_tensors) == len(before)
    assert all(torch.equal(a, b) for a, b in zip(wrapped_tensors, before.values()))
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)


def test_named_targets_wrap_only_those_layers(base_dir, batch):
    model = load(base_dir, "nf4")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    wrapped = lora_layers(peft_model)
    assert sorted(wrapped) == sorted(
        f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.k_proj, LowBitLinear)


def test_all_linear_on_a_partly_quantized_model(base_dir):
    # skip_modules=["mlp"] keeps the MLPs in nn.Linear and, replacing the default skip list, quantizes the lm_head.
    model = load(base_dir, "int8", skip_modules=["mlp"])
    assert isinstance(model.lm_head, LowBitLinear)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    layer = peft_model.base_model.model.model.layers[0]
    assert isinstance(layer.self_attn.o_proj, LowBitLoraLinear)
    assert type(layer.mlp.up_proj).__name__ == "Linear" and isinstance(layer.mlp.up_proj, BaseTunerLayer)  # PEFT's
    assert isinstance(peft_model.base_model.model.lm_head, LowBitLinear)  # the output head stays out, as in PEFT


def test_lora_variants_are_refused_by_name(base_dir):
    model = load(base_dir, "nf4")
    with pytest.raises(ValueError, match=r"LoRA variants are not supported on quantized LowBitLinear layers .*use_dora"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_lora_forward_is_base_plus_scaled_low_rank_update(base_dir):
    model = load(base_dir, "nf4")
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features, generator=torch.Generator().manual_seed(3))
    x = x.to(torch.bfloat16).to(layer.lora_A["default"].weight.device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        expected = layer.get_base_layer()(x).float() + (x.float() @ a.T @ b.T) * (12 / 4)
        got = layer(x)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)  # bf16 output rounding


def test_dropout_multiple_adapters_and_disable(base_dir, batch):
    model = load(base_dir, "nf4")
    base_logits = logits(model, batch)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.5)
    peft_model = get_peft_model(model, config)
    peft_model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))

    default_logits = logits(peft_model, batch)
    assert not torch.equal(default_logits, base_logits)
    peft_model.set_adapter("other")
    other_logits = logits(peft_model, batch)
    assert not torch.equal(other_logits, default_logits) and not torch.equal(other_logits, base_logits)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, batch), base_logits)
    # one batch, one adapter per row
    with torch.no_grad():
        mixed = peft_model(input_ids=batch.to(peft_model.device), adapter_names=["default", "other"]).logits
    torch.testing.assert_close(mixed[0], default_logits[0], atol=1e-2, rtol=0)
    torch.testing.assert_close(mixed[1], other_logits[1], atol=1e-2, rtol=0)

    peft_model.set_adapter("default")
    peft_model.train()  # dropout only acts in training mode
    with torch.no_grad():
        ids = batch.to(peft_model.device)
        first, second = peft_model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert not torch.equal(first, second)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_lora_layer_gradients_match_an_independent_oracle(base_dir, fmt):
    """dL/dx flows through both the frozen quantized weight and the adapters; dL/dA, dL/dB as for a plain LoRA."""
    model = load(base_dir, fmt, dtype=torch.float32, compute_dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    layer = peft_model.base_model.model.model.layers[0].mlp.down_proj
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(5), requires_grad=True)
    grad_y = torch.randn(3, layer.out_features, generator=torch.Generator().manual_seed(6))
    layer(x).backward(grad_y)

    weight = oracles.weight_of(layer.base_layer) + layer.scaling["default"] * (b @ a).detach()
    torch.testing.assert_close(x.grad, grad_y @ weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.grad, layer.scaling["default"] * grad_y.T @ (x.detach() @ a.detach().T))


@pytest.mark.parametrize("fmt, use_reentrant", [("nf4", False), ("fp4", True), ("int8", False)])
def test_qlora_training_lowers_loss_and_only_adapters_train(base_dir, fmt, use_reentrant, batch):
    model = prepare_model_for_kbit_training(load(base_dir, fmt), use_gradient_checkpointing=False)
    # prepare_model_for_kbit_training only switches checkpointing on for the quantization methods PEFT knows by
    # name; for ours it is the usual call.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.config.use_cache = False
    frozen = {name: t.clone() for name, t in stored_tensors(model).items()}
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    peft_model.train()

    # Checkpointing is on: each quantized layer runs its forward again during the backward.
    calls = []
    hook = peft_model.base_model.model.model.layers[0].mlp.down_proj.base_layer.register_forward_hook(
        lambda *args: calls.append(1)
    )
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses, ids = [], batch.to(peft_model.device)
    for _ in range(10):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        if not losses:
            assert len(calls) == 2
            hook.remove()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) < 10:
            optimizer.zero_grad()

    # Measured: the 10th loss is 0.06 of the first for every format (6.3-6.5 -> 0.36-0.42); 0.2 leaves a 3x margin.
    assert losses[-1] < 0.2 * losses[0], losses
    lora_params = {n: p for n, p in peft_model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(lora_params) == 2 * 2 * len(PROJECTIONS)
    assert all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params.values())
    for name, tensor in stored_tensors(peft_model).items():
        assert not tensor.requires_grad and tensor.grad is None, name
    after = stored_tensors(peft_model)
    assert len(after) == len(frozen)
    assert all(torch.equal(a, f) for a, f in zip(after.values(), frozen.values()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_adapters_save_and_reload_onto_a_fresh_quantized_base(base_dir, fmt, batch, tmp_path):
    model = load(base_dir, fmt)
    base_logits = logits(model, batch)
    torch.manual_seed(1)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    adapted = logits(peft_model, batch)
    assert not torch.equal(adapted, base_logits)
    peft_model.save_pretrained(tmp_path / "adapter")

    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as saved:
        keys = list(saved.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)  # adapters only, no base weights

    reloaded = PeftModel.from_pretrained(load(base_dir, fmt), tmp_path / "adapter")
    assert len(lora_layers(reloaded)) == len(lora_layers(peft_model))
    assert torch.equal(logits(reloaded, batch), adapted)


def test_adapters_trained_on_a_prepared_base_reload_exactly_onto_a_base_prepared_the_same_way(base_dir, batch, tmp_path):
    """prepare_model_for_kbit_training's float32 norms and embeddings are part of the trained model: the fresh base
    needs them too (README, Fine-tuning with LoRA). Without them the outputs differ, by about 0.01 here."""
    torch.manual_seed(1)
    model = prepare_model_for_kbit_training(load(base_dir, "nf4"), use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapted = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")

    prepared = prepare_model_for_kbit_training(load(base_dir, "nf4"), use_gradient_checkpointing=False)
    assert torch.equal(logits(PeftModel.from_pretrained(prepared, tmp_path / "adapter"), batch), adapted)
    unprepared = logits(PeftModel.from_pretrained(load(base_dir, "nf4"), tmp_path / "adapter"), batch)
    assert not torch.equal(unprepared, adapted)
    torch.testing.assert_close(unprepared.float(), adapted.float(), atol=0.1, rtol=0)


# (format, compute dtype, atol on logits of magnitude ~4, which the adapters move by ~4). The merged layer computes
# x @ round(dequant(W) + delta).T in the compute dtype; the adapted one x @ dequant(W).T in it plus the float32 adapter
# path. Largest differences measured (2 seeds): bf16 0.074 (nf4, fp4), 0.094 (int8); float32 < 1e-5 (4-bit). LLM.int8
# also quantizes the activations, which the merged float layer does not: ~0.09 whatever the compute dtype.
MERGE_CASES = [
    ("nf4", torch.bfloat16, 0.15),
    ("fp4", torch.bfloat16, 0.15),
    ("int8", torch.bfloat16, 0.2),
    ("nf4", torch.float32, 1e-4),
    ("fp4", torch.float32, 1e-4),
]


@pytest.mark.parametrize("fmt, compute_dtype, atol", MERGE_CASES)
def test_merge_and_unload_matches_the_adapted_model(base_dir, fmt, compute_dtype, atol, batch):
    model = load(base_dir, fmt, dtype=compute_dtype, compute_dtype=compute_dtype)
    torch.manual_seed(2)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    adapted = logits(peft_model, batch)

    with pytest.raises(NotImplementedError, match="cannot be merged into a quantized LowBitLinear in place"):
        peft_model.merge_adapter()
    assert torch.equal(logits(peft_model, batch), adapted)  # the refused merge changed nothing

    merged = peft_model.merge_and_unload()
    assert not lowbit_modules(merged) and not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    projections = [m for n, m in merged.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
    assert len(projections) == 2 * len(PROJECTIONS)
    assert all(type(m) is nn.Linear and m.weight.dtype == compute_dtype for m in projections)
    torch.testing.assert_close(logits(merged, batch), adapted, atol=atol, rtol=0)


def test_qlora_flow_ends_in_an_ordinary_merged_checkpoint(base_dir, batch, tmp_path):
    """prepare -> LoRA -> train -> merge_and_unload -> dequantize -> save -> reload without any quantization config."""
    model = prepare_model_for_kbit_training(load(base_dir, "nf4"), use_gradient_checkpointing=False)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    ids = batch.to(peft_model.device)
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted = logits(peft_model, batch)

    # The merged projections are bfloat16 (the compute dtype) while prepare_model_for_kbit_training left the norms and
    # embeddings in float32; dequantize() casts the whole model to the compute dtype and drops the quantization
    # config, since nothing in it is quantized any more.
    merged = peft_model.merge_and_unload().dequantize()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert getattr(merged, "hf_quantizer", None) is None and not getattr(merged.config, "quantization_config", None)
    merged_logits = logits(merged, batch)
    torch.testing.assert_close(merged_logits, adapted.to(torch.bfloat16), atol=0.25, rtol=0)

    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(again, "hf_quantizer", None) is None and not lowbit_modules(again)
    assert torch.equal(logits(again, batch), merged_logits)


def test_trainer_fine_tunes_a_quantized_model_with_lora(base_dir, batch, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", activation_checkpointing=True,
    )  # fmt: skip
    dataset = [{"input_ids": row, "labels": row} for row in batch]

    bare = load(base_dir, "nf4")
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own guard, passed below with LoRA
        Trainer(model=bare, args=args, train_dataset=dataset)

    peft_model = get_peft_model(bare, LoraConfig(r=4, target_modules="all-linear"))
    frozen = {k: t.clone() for k, t in stored_tensors(peft_model).items()}
    lora_b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 3 and len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert lora_b.abs().sum() > 0  # the adapters moved from their zero init
    assert all(torch.equal(t, frozen[k]) for k, t in stored_tensors(peft_model).items())


def test_non_linear_target_is_refused_by_name_and_nothing_is_wrapped(base_dir, batch):
    model = load(base_dir, "nf4")
    modules_before = dict(model.named_modules())
    base_logits = logits(model, batch)

    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_layernorm \(LlamaRMSNorm\)") as error:
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "input_layernorm"]))
    assert "model.layers.1.input_layernorm (LlamaRMSNorm)" in str(error.value)
    assert "q_proj" not in str(error.value)

    # q_proj comes before input_layernorm in each layer: without the up-front check it would be wrapped already.
    assert dict(model.named_modules()) == modules_before
    assert not hasattr(model, "peft_config")
    assert torch.equal(logits(model, batch), base_logits)


def run_python(code: str, folder: Path, threads: int | None = None) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "script.py"
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    # Run from `folder`: the repository root holds a top-level `kernels/` folder that must not shadow anything.
    return subprocess.run([sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip


# Each order in a fresh process. transformers' from_pretrained probes for peft (is_peft_available, i.e.
# importlib.util.find_spec("peft")) without importing it; that probe must not stop a later `import peft` from working.
IMPORT_ORDERS = {
    "peft_before_plugin": ("import peft", "import quantizer_plugin", "LOAD"),
    "peft_after_plugin": ("import quantizer_plugin", "import peft", "LOAD"),
    "peft_after_load": ("import quantizer_plugin", "LOAD", "import peft"),
    "peft_after_probes": (
        "import quantizer_plugin",
        "import importlib.util, transformers.utils; assert transformers.utils.is_peft_available()",
        "assert importlib.util.find_spec('peft') is not None",
        "import peft",
        "LOAD",
    ),
    "peft_after_device_map_load": ("import quantizer_plugin", "LOAD_DEVICE_MAP", "import peft"),
}


def import_order_script(base_dir: Path, order: str) -> str:
    config = "quantization_config=quantizer_plugin.LowBitConfig()"
    load = f"model = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}, {config})"
    statements = {
        "LOAD": load,
        "LOAD_DEVICE_MAP": load.replace("LowBitConfig())", "LowBitConfig(weights='int8'), device_map='auto')"),
    }
    return "\n".join([
        "import torch",
        "from transformers import AutoModelForCausalLM",
        *(statements.get(step, step) for step in IMPORT_ORDERS[order]),
        "from peft import LoraConfig, get_peft_model",
        "peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=['q_proj', 'v_proj']))",
        "attention = peft_model.base_model.model.model.layers[0].self_attn",
        "print(type(attention.q_proj).__name__, type(attention.v_proj).__name__)",
    ])  # fmt: skip


def without_peft_script(base_dir: Path) -> str:
    return f"""
        import sys
        sys.modules["peft"] = None  # as if peft were not installed: `import peft` raises ImportError
        import torch, quantizer_plugin
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(base_dir)!r},
                                                     quantization_config=quantizer_plugin.LowBitConfig(weights="nf4"))
        out = model(input_ids=torch.tensor([[1, 2, 3]], device=model.device)).logits
        assert torch.isfinite(out).all()
        assert "quantizer_plugin.lora" not in sys.modules
        print("ok")
        """


@pytest.fixture(scope="module")
def fresh_process_runs(base_dir, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every import order, and the plugin without peft, each in its own fresh process. Such a run is mostly
    single-threaded imports, so they go two at a time, each with one torch thread; each test reads its own."""
    scripts = {order: import_order_script(base_dir, order) for order in IMPORT_ORDERS}
    scripts["without_peft"] = without_peft_script(base_dir)
    folder = tmp_path_factory.mktemp("fresh-processes")
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda name: run_python(scripts[name], folder / name, threads=1), scripts)
        return dict(zip(scripts, results))


@pytest.mark.parametrize("order", IMPORT_ORDERS)
def test_lora_works_whatever_the_import_order(fresh_process_runs, order):
    result = fresh_process_runs[order]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "LowBitLoraLinear LowBitLoraLinear"


def test_plugin_works_without_peft(fresh_process_runs):
    result = fresh_process_runs["without_peft"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ok"
