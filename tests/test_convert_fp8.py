"""transformers' fine-grained FP8 checkpoints (quant_method "fp8") converted to our fp8. The test checkpoints are made
by transformers' own FP8 quantizer (Fp8Quantize, the op from_pretrained runs with FineGrainedFP8Config, which refuses
to run without a GPU), and the converted weights are checked equal to transformers' own dequantization of the source
(Fp8Dequantize, what it loads on a machine without a recent GPU); the result runs on our CPU kernels at 8 bits."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, LlamaForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

from quantizer_plugin import ConversionError, LowBitLinear, convert_checkpoint, ops

import oracles
from conftest import tiny_llama_config
from helpers import cosine

# name -> (weight_block_size, scale_fmt): blocks of 32 x 32 with float32 scales; blocks of 16 rows by 64 columns with
# power-of-two scales (float8 e8m0); one scale per tensor. With hidden 128 and MLP 320, blocks of 128 would leave the
# MLP unquantized (transformers' quantizer skips a weight its blocks do not divide): see the mixed case below.
CHECKPOINTS = {"blocks-32x32": ((32, 32), "float"), "ue8m0-16x64": ((16, 64), "ue8m0"), "per-tensor": (None, "float")}


def fp8_checkpoint(folder: Path, block, scale_fmt: str = "float") -> Path:
    """A small random Llama whose linears (not the head) transformers' FP8 quantizer rounded, saved as transformers
    saves an FP8 model: `weight` float8 e4m3fn and `weight_scale_inv`, quantization_config in config.json."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=320)).to(torch.bfloat16)
    config = FineGrainedFP8Config(weight_block_size=block, scale_fmt=scale_fmt, modules_to_not_convert=["lm_head"])
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=config))
    state = {}
    for key, tensor in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        linear = key.endswith(".weight") and isinstance(model.get_submodule(module), torch.nn.Linear)
        state.update(quantize._quantize_one(key, tensor) if linear and module != "lm_head" else {key: tensor})
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.quantization_config = config
    model.config.architectures = ["LlamaForCausalLM"]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    return folder


def transformers_weight(state: dict, module: str) -> torch.Tensor:
    """transformers' own float32 dequantization of one layer of an FP8 checkpoint."""
    dequantize = Fp8Dequantize(SimpleNamespace(quantization_config=None))
    return dequantize._dequantize_one(state[f"{module}.weight"], state[f"{module}.weight_scale_inv"], torch.float32)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_an_fp8_checkpoint_converts_losslessly_and_runs_on_our_kernels(tmp_path, name):
    block, scale_fmt = CHECKPOINTS[name]
    source = fp8_checkpoint(tmp_path / "fp8", block, scale_fmt)
    state = load_file(str(source / "model.safetensors"))
    converted = convert_checkpoint(source, tmp_path / "ours")
    config = json.loads((converted / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowbit" and config["weights"] == "fp8"
    assert config["block_size"] == (None if block is None else block[1]) and config["skip_modules"] == ["lm_head"]

    model = AutoModelForCausalLM.from_pretrained(converted)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}
    quantized = {key.removesuffix(".weight_scale_inv") for key in state if key.endswith(".weight_scale_inv")}
    assert set(layers) == quantized and len(layers) == 14
    for module, layer in layers.items():
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, state[f"{module}.weight"].view(torch.uint8))
        assert torch.equal(oracles.weight_of(layer), transformers_weight(state, module)), module

    token_ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), ops.record_dispatch() as served:
        logits = model(token_ids).logits
    assert served and all(kernel.startswith("cpu.float8.") for kernel in served), served
    theirs = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)  # dequantized to bf16 on a CPU
    with torch.no_grad():
        assert cosine(logits, theirs(token_ids).logits) > 0.9999


def test_mxfp8_exponent_byte_scales_convert_as_their_powers_of_two(tmp_path):
    """Scales stored as the exponent byte of a power of two (uint8, MXFP8's layout; transformers reads 2^(b - 127)):
    the e8m0 checkpoint's scales rewritten as their bytes convert to the same weights, transformers' own dequantization
    of the rewritten source."""
    source = fp8_checkpoint(tmp_path / "fp8", (16, 64), "ue8m0")
    state = load_file(str(source / "model.safetensors"))
    for key in [key for key in state if key.endswith(".weight_scale_inv")]:
        state[key] = state[key].view(torch.uint8)
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(convert_checkpoint(source, tmp_path / "ours"))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowBitLinear)}
    assert len(layers) == 14
    for module, layer in layers.items():
        assert torch.equal(oracles.weight_of(layer), transformers_weight(state, module)), module


def test_layers_the_fp8_quantizer_left_in_16_bits_stay_so(tmp_path):
    """Blocks of 128 divide neither the MLP's 320 nor k/v's 64 rows: transformers keeps those weights in bf16, and so
    do we."""
    source = fp8_checkpoint(tmp_path / "fp8", (128, 128))
    state = load_file(str(source / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(convert_checkpoint(source, tmp_path / "ours"))
    layers = {n for n, m in model.named_modules() if isinstance(m, LowBitLinear)}
    assert layers == {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qo"}
    kept = model.model.layers[0].mlp.down_proj
    assert not isinstance(kept, LowBitLinear)
    assert torch.equal(kept.weight, state["model.layers.0.mlp.down_proj.weight"])
    assert model.config.quantization_config.block_size is None  # q and o's rows are one block of 128: a scale per row


def test_static_activation_scales_are_dropped_with_a_warning(tmp_path):
    source = fp8_checkpoint(tmp_path / "fp8", (32, 32))
    state = load_file(str(source / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.activation_scale"] = torch.tensor([0.02])
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=r"1 static activation scales \(model.layers.0.self_attn.q_proj.activation_scale"):
        converted = convert_checkpoint(source, tmp_path / "ours")
    assert not any(key.endswith("activation_scale") for key in load_file(str(converted / "model.safetensors")))


def test_bad_fp8_checkpoints_are_refused_by_tensor_and_nothing_is_written(tmp_path):
    source = fp8_checkpoint(tmp_path / "fp8", (32, 32))
    state = load_file(str(source / "model.safetensors"))
    layer = "model.layers.1.mlp.up_proj"

    def broken(change, name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((source / "config.json").read_text())
        save_file(change(dict(state)), str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    def wrong_grid(tensors):
        tensors[f"{layer}.weight_scale_inv"] = torch.ones(3, 3)
        return tensors

    def nan_weight(tensors):
        values = tensors[f"{layer}.weight"].view(torch.uint8).clone()
        values[5, 7] = 0x7F  # e4m3fn's NaN
        tensors[f"{layer}.weight"] = values.view(torch.float8_e4m3fn)
        return tensors

    def int8_weight(tensors):
        tensors[f"{layer}.weight"] = torch.zeros(320, 128, dtype=torch.int8)
        return tensors

    cases = [(wrong_grid, rf"'{layer}.weight_scale_inv' has shape \(3, 3\)"),
             (nan_weight, rf"'{layer}.weight' holds a NaN or an infinity at \(5, 7\)"),
             (int8_weight, rf"'{layer}.weight' is I8, expected float8")]  # fmt: skip
    for change, message in cases:
        folder = broken(change, change.__name__)
        with pytest.raises(ConversionError, match=message):
            convert_checkpoint(folder, tmp_path / f"out-{change.__name__}")
        assert not (tmp_path / f"out-{change.__name__}").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f"out-{change.__name__}")] == []

