"""A new weight format of an existing family is one format object (a format file) and a config naming it: it runs on
the reference, the CPU kernels and the Triton kernels (through the interpreter) with no registration of its own, and
loads, saves and reloads through transformers.

The throwaway format: a 4-bit codebook of 16 evenly spaced levels (no exact zero), registered for one test only. The
oracle is its documented arithmetic written out here: element i is level[code_i] * absmax[i // block], the codes two
per byte with the first in the high nibble, the absmax decoded by the tests' own oracles (bitsandbytes' dynamic map).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitConfig, LowBitLinear, ops
from quantizer_plugin.formats import QuantScheme, base
from quantizer_plugin.formats.codebook4bit import Codebook4BitFormat
from quantizer_plugin.ops import KERNELS_ENV

import oracles
from helpers import load_quantized, lowbit_modules

LEVELS = torch.linspace(-1.0, 1.0, 16)
# Output error allowed, relative to the largest |output|: about one rounding of bfloat16 (as tests/test_kernels_4bit).
TOLERANCE = 1.6e-2


@pytest.fixture
def uniform4(monkeypatch):
    fmt = Codebook4BitFormat("uniform4", LEVELS.clone())
    monkeypatch.setitem(base._FORMATS, "uniform4", fmt)
    return fmt


def weight_of(layer: LowBitLinear) -> torch.Tensor:
    stored = {name: tensor.detach() for name, tensor in layer.quantized_tensors().items()}
    packed = stored["weight"].reshape(-1).long()
    n = layer.out_features * layer.in_features
    codes = torch.stack([packed // 16, packed % 16], dim=1).reshape(-1)[:n]
    absmax = oracles.block_absmax(stored).repeat_interleave(layer.scheme.block_size)[:n]
    return (LEVELS[codes] * absmax).reshape(layer.out_features, layer.in_features)


def nearest_levels(weight: torch.Tensor, block: int) -> torch.Tensor:
    """Each element's nearest level after scaling its block by the block's absmax: the codes the format must store."""
    flat = weight.float().reshape(-1)
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % block)).view(-1, block)
    scaled = blocks / blocks.abs().amax(dim=1, keepdim=True)
    return (scaled.reshape(-1)[: flat.numel(), None] - LEVELS).abs().argmin(dim=1)


@pytest.mark.parametrize("backend, served_prefix", [("torch", "torch."), ("cpu", "cpu.codebook4bit."),
                                                    ("triton", "triton.codebook4bit.")])  # fmt: skip
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "no-dq"])
def test_a_new_codebook_runs_on_every_backend_without_registering_a_kernel(uniform4, monkeypatch, backend,
                                                                             served_prefix, double_quant):  # fmt: skip
    monkeypatch.setenv(KERNELS_ENV, backend)
    torch.manual_seed(0)
    n, k = 45, 192
    linear = torch.nn.Linear(k, n)
    layer = LowBitLinear.from_float(linear, QuantScheme("uniform4", 64, double_quant))
    codes = torch.stack([layer.weight.reshape(-1) >> 4, layer.weight.reshape(-1) & 0xF], dim=1).reshape(-1).long()
    mismatched = (codes != nearest_levels(linear.weight.detach(), 64)).float().mean().item()
    assert mismatched < 1e-3  # ties and float rounding aside, every element takes its nearest level
    weight = weight_of(layer)
    for m in (1, 3, 33):
        x = torch.randn(m, k, dtype=torch.bfloat16)
        with ops.record_dispatch() as served:
            y = layer(x)
        assert len(served) == 1 and served[0].startswith(served_prefix), served
        exact = x.double() @ weight.double().T + layer.bias.double()
        assert (y.double() - exact).abs().max() <= TOLERANCE * exact.abs().max(), m
    x = torch.randn(5, k, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()
    grad_y = 2 * layer(x.detach()).double()
    exact = grad_y @ weight.double()
    assert (x.grad.double() - exact).abs().max() <= TOLERANCE * exact.abs().max()


def test_a_new_codebook_loads_saves_and_reloads_through_transformers(uniform4, llama_dir, token_ids, tmp_path):
    model = load_quantized(llama_dir, weights="uniform4", block_size=64)
    layers = lowbit_modules(model)
    assert layers and {layer.fmt for layer in layers.values()} == {uniform4}
    with torch.no_grad(), ops.record_dispatch() as served:
        logits = model(token_ids).logits
    assert served and all(name.startswith("cpu.codebook4bit.") for name in served), served
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.config.quantization_config, LowBitConfig)
    assert reloaded.config.quantization_config.weights == "uniform4"
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids).logits, logits)
