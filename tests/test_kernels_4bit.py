"""The NF4/FP4 Triton kernels against the plain-PyTorch reference, on fresh random inputs and awkward shapes.

On CPU they run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) at small shapes; on a GPU the
same tests also run at real shapes.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.formats import QuantScheme
from quantizer_plugin.ops import KERNELS_ENV

import oracles

kernels = pytest.importorskip("quantizer_plugin.kernels.dequant_matmul", reason="triton is not installed")

# Output error allowed, relative to the largest |output|: fp32 accumulation of 16-bit-rounded operands, so about
# one rounding of the output dtype (the reference itself sits about as far from the exact product).
TOLERANCES = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
M_VALUES = [1, 3, 16, 33, 128]
# (N, K): neither a multiple of the tiles; K = 100 is not a multiple of the block either (blocks straddle rows),
# K = 192 is (the aligned layout with a partial last K tile).
SHAPES = {"cpu": [(37, 100), (45, 192)], "cuda": [(37, 100), (45, 192), (1000, 1030), (4096, 4096), (3000, 11008)]}
VARIANTS = list(itertools.product(["nf4", "fp4"], [True, False], [True, False]))  # format, double quant, bias


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton")


def make_layer(weights, double_quant, bias, n, k, dtype, device, block_size=64, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias, device=device)
    return LowBitLinear.from_float(linear, QuantScheme(weights, block_size, double_quant), compute_dtype=dtype)


def exact_linear(x, layer):
    """x @ W.T + b in float64, W from the stored tensors by the tests' own oracle: what both paths approximate."""
    y = x.double() @ oracles.weight_of(layer).double().to(x.device).T
    return y if layer.bias is None else y + layer.bias.double()


def forward_kernel(m: int) -> str:
    return "triton.codebook4bit.decode" if m <= kernels.DECODE_MAX_M else "triton.codebook4bit.prefill"


def shapes(device):
    return SHAPES[device]


@pytest.mark.parametrize("weights, double_quant, bias", VARIANTS, ids=[f"{w}-dq{int(d)}-bias{int(b)}" for w, d, b in VARIANTS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", M_VALUES)
def test_forward_matches_the_reference(device, weights, double_quant, bias, dtype, m):
    for n, k in shapes(device):
        layer = make_layer(weights, double_quant, bias, n, k, dtype, device, seed=m)
        x = torch.randn(m, k, device=device, dtype=dtype)
        with ops.record_dispatch() as served:
            y = layer(x)  # through the dispatch seam: the Triton backend is forced
        assert served == [forward_kernel(m)]  # the kernel itself ran, not a fall-back
        reference = layer.fmt.reference_linear(
            x, layer.quantized_tensors(), layer.bias, n, k, layer.scheme, layer.compute_dtype
        )
        exact = exact_linear(x, layer)
        scale = exact.abs().max().item()
        assert y.dtype == dtype and y.shape == (m, n)
        kernel_error = (y.double() - exact).abs().max().item()
        reference_error = (reference.double() - exact).abs().max().item()
        assert kernel_error <= TOLERANCES[dtype] * scale, (n, k, kernel_error, scale)
        assert kernel_error <= 2 * reference_error + TOLERANCES[dtype] * scale / 4, (n, k, kernel_error, reference_error)


@pytest.mark.parametrize("weights, double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 33])
def test_backward_through_the_frozen_weight_matches_the_reference(device, monkeypatch, weights, double_quant, dtype, m):
    for n, k in shapes(device):
        layer = make_layer(weights, double_quant, True, n, k, dtype, device, seed=m)
        x = torch.randn(2, m, k, device=device, dtype=dtype)
        grad_y = torch.randn(2, m, n, device=device, dtype=dtype)
        grads = {}
        for backend in ("triton", "torch"):
            monkeypatch.setenv(KERNELS_ENV, backend)
            leaf = x.clone().requires_grad_(True)
            with ops.record_dispatch() as served:
                layer(leaf).backward(grad_y)
            grads[backend] = leaf.grad
        assert served[-1] == "torch.reference_backward"
        monkeypatch.setenv(KERNELS_ENV, "triton")
        with ops.record_dispatch() as served:
            layer(x.clone().requires_grad_(True)).backward(grad_y)
        assert served == [forward_kernel(2 * m), "triton.codebook4bit.grad_input"]
        exact = grad_y.double() @ oracles.weight_of(layer).double().to(device)
        scale = exact.abs().max().item()
        assert grads["triton"].dtype == dtype and grads["triton"].shape == x.shape
        assert (grads["triton"].double() - exact).abs().max().item() <= TOLERANCES[dtype] * scale
        assert (grads["triton"].double() - grads["torch"].double()).abs().max().item() <= 2 * TOLERANCES[dtype] * scale
        assert all(p.grad is None for p in layer.parameters())


# Tile layouts: aligned rows with several blocks per K tile, aligned rows with a K tile inside one block, and
# unaligned rows (every element finds its byte and block); both reach the K tail of a row.
LAYOUTS = [
    # block_size, K, BLOCK_K
    (16, 96, 64),
    (128, 256, 32),
    (64, 100, 32),
    (32, 75, 16),
]


@pytest.mark.parametrize("block_size, k, block_k", LAYOUTS, ids=[f"block{b}-K{k}-tileK{t}" for b, k, t in LAYOUTS])
@pytest.mark.parametrize("weights, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_every_tile_layout_dequantizes_exactly(weights, double_quant, block_size, k, block_k):
    # With x = I in float32, y = I @ W.T reads back each dequantized weight through one exact product.
    n = 19
    layer = make_layer(weights, double_quant, False, n, k, torch.float32, "cpu", block_size=block_size)
    expected = oracles.weight_of(layer)
    config = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=4)
    y = kernels.dequant_matmul(torch.eye(k), layer.weight_record(), config=config)
    assert torch.equal(y.T, expected)
    grad_x = kernels.dequant_matmul_grad_input(torch.eye(n), layer.weight_record(), config=config)
    assert torch.equal(grad_x, expected)


@pytest.mark.parametrize("split_k", [2, 3, 5])
def test_split_k_reads_back_exactly_and_leaves_the_counters_at_zero(device, split_k):
    # K = 100 in 16-wide tiles is 7 tiles: 3 splits take 3, 3 and 1 tiles, 5 splits leave the last one empty.
    # With x = I in float32 every output is one weight plus exact zeros from the other splits, so the sum of the
    # partials must read W back exactly, whatever order the splits arrive in.
    from quantizer_plugin.kernels.split_k import counters

    n, k = 37, 100
    layer = make_layer("nf4", True, False, n, k, torch.float32, device)
    expected = oracles.weight_of(layer).to(device)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=1, SPLIT_K=split_k)
    columns = [0, 20, 50, 99, 70]  # one in each split's slice of K (and the last column)
    x = torch.eye(k, device=device)[columns]  # a decode-sized M, not a multiple of BLOCK_M
    first = kernels.dequant_matmul(x, layer.weight_record(), config=config)
    again = kernels.dequant_matmul(x, layer.weight_record(), config=config)
    assert torch.equal(first, expected[:, columns].T)
    assert torch.equal(again, first)  # the counters were reset, so the second launch reduced as the first
    assert not counters(1, torch.device(device)).any()


def test_quantized_llama_runs_on_the_kernels(llama_dir, token_ids, monkeypatch):
    from helpers import cosine, load_quantized

    model = load_quantized(llama_dir, weights="nf4")
    with torch.no_grad(), ops.record_dispatch() as served:
        logits = model(token_ids).logits
    assert served == [forward_kernel(token_ids.numel())] * 14  # 2 layers x 7 projections, every one on the kernel
    with torch.no_grad():
        monkeypatch.setenv(KERNELS_ENV, "torch")
        reference = model(token_ids).logits
    assert cosine(logits, reference) > 0.9999
    assert (logits.float() - reference.float()).abs().max() <= 0.05 * reference.float().abs().max()


def test_launcher_names_a_stored_tensor_of_the_wrong_dtype():
    layer = make_layer("nf4", True, False, 8, 64, torch.float16, "cpu")
    weight = dataclasses.replace(layer.weight_record(), absmax_scale=layer.weight_absmax_scale.double())
    with pytest.raises(ValueError, match="'absmax_scale' is .* torch.float64"):
        kernels.dequant_matmul(torch.randn(2, 64, dtype=torch.float16), weight)


def test_forcing_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    import quantizer_plugin.kernels
    from quantizer_plugin.ops import select_backend

    monkeypatch.setattr(quantizer_plugin.kernels, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="needs Triton's interpreter: set TRITON_INTERPRET=1"):
        select_backend("nf4", torch.device("cpu"))


