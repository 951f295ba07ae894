"""int4, int3 and int2 on the CPU backend (quantizer_plugin/cpu/affine.py) against the tests' oracle, on fresh random
inputs and awkward shapes, with proof of which native kernel ran."""

from __future__ import annotations

import itertools

import pytest
import torch

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.cpu import affine as cpu_affine
from quantizer_plugin.cpu import native
from quantizer_plugin.formats import QuantScheme

import oracles
from helpers import outputs_on_one_and_two_threads
from cpu_caps import amx_here, avx2_here, avx512_bf16_here, fused_rows_here
from test_cpu_backend import DTYPES, M_VALUES, assert_close_to_scale, expected_output, make_layer

FORMATS = ["int4", "int3", "int2"]
# (N, K, group): odd N; K a multiple of the group (the fused kernel at decode, the AMX tiles past it in bfloat16),
# K that is not (a short last group per row), an odd K (a row's last byte half used), groups of 16 and 32 (too
# small for the fused kernel), and groups of 128 and 256 over several of the tiles' 128-column chunks.
SHAPES = [(37, 128, 64), (45, 100, 64), (23, 75, 64), (29, 96, 32), (31, 80, 16), (83, 640, 128), (19, 512, 256)]


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)


def expected_kernel(m: int, k: int, block: int, dtype: torch.dtype) -> str:
    """The kernel that should serve, from the shapes and this CPU's flags (not from the entry point's own checks)."""
    if m <= fused_rows_here(dtype, cpu_affine.GEMV_MAX_M) and k % block == 0 and block % 64 == 0 and avx2_here():
        return "fused_bf16" if dtype == torch.bfloat16 and avx512_bf16_here() else "fused"
    if m <= 256 and dtype == torch.bfloat16 and block % 64 == 0 and k % block == 0 and k % 128 == 0 and amx_here():
        return "tiles"
    return "dequantize_matmul"


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_affine_forward_matches_the_oracle_and_runs_the_native_kernels(weights, dtype):
    for (n, k, block), m in itertools.product(SHAPES, M_VALUES):
        layer = make_layer(QuantScheme(weights, block_size=block), n, k, dtype, seed=m + n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(dtype)
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == [f"cpu.affine.{expected_kernel(m, k, block, dtype)}"], (n, k, block, m)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close_to_scale(y, expected_output(x, layer), dtype)


def test_the_fused_kernel_needs_its_zero_points():
    """Weights far from zero (a large zero point per group): the zero points' share is most of each output."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 33, bias=False)
    with torch.no_grad():
        linear.weight.add_(3.0)
    for weights in FORMATS:
        layer = LowBitLinear.from_float(linear, QuantScheme(weights), compute_dtype=torch.float32)
        x = torch.rand(2, 256)
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == ["cpu.affine.fused" if avx2_here() else "cpu.affine.dequantize_matmul"]
        assert_close_to_scale(y, expected_output(x, layer), torch.float32)


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_affine_dequantize_is_the_references_weight_bit_for_bit(weights, dtype):
    kernels = native.load()
    for n, k, block in SHAPES:
        layer = make_layer(QuantScheme(weights, block_size=block), n, k, dtype, seed=n)
        reference = layer.dequantize_weight(dtype)
        assert torch.equal(reference.float(), oracles.weight_of(layer).to(dtype).float())
        for first, last in [(0, n), (1, n - 1), (n - 1, n), (4, 4)]:
            out = torch.empty(last - first, k, dtype=dtype)
            kernels.dequantize_affine(layer.weight, layer.weight_scale, layer.weight_zero, layer.fmt.bits, block,
                                      first, last, out)  # fmt: skip
            assert torch.equal(out, reference[first:last]), (n, k, block, first, last)


@pytest.mark.skipif(not amx_here(), reason="this CPU has no AMX: the tile kernels are not built for it")
@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("n, k, block", [(83, 640, 128), (150, 256, 64), (16, 128, 64), (5, 384, 128), (21, 512, 512)])
def test_the_affine_tile_kernel_multiplies_exactly_the_references_weights(weights, n, k, block):
    """Rows of the identity as activations: y must be the reference's bfloat16 weight, transposed, bit for bit
    (every row, column, group and chunk in its place, every scale and zero point applied once)."""
    layer = make_layer(QuantScheme(weights, block_size=block), n, k, torch.bfloat16, seed=n + k, bias=False)
    for rows in (range(0, 32), range(k - 45, k)):  # two groups of 16 activation rows; three, the last short
        x = torch.eye(k, dtype=torch.bfloat16)[list(rows)]
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == ["cpu.affine.tiles"]
        assert torch.equal(y, layer.dequantize_weight(torch.bfloat16)[:, list(rows)].T)


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_affine_input_gradient_runs_the_native_chunks(weights, dtype):
    n, k, block = 45, 100, 32
    layer = make_layer(QuantScheme(weights, block_size=block), n, k, dtype, seed=3)
    x = torch.randn(2, 5, k, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(2, 5, n, dtype=dtype)
    with ops.record_dispatch() as served:
        layer(x).backward(grad_y)
    assert served == ["cpu.affine.dequantize_matmul", "cpu.affine.grad_input"]
    assert_close_to_scale(x.grad, grad_y.double() @ oracles.weight_of(layer).double(), dtype)


def test_the_fused_affine_kernel_gives_the_same_result_on_any_number_of_threads():
    layer = make_layer(QuantScheme("int4"), 301, 256, torch.bfloat16, seed=5)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    one, two = outputs_on_one_and_two_threads(layer, x)
    assert torch.equal(one, two)


@pytest.mark.parametrize("weights", FORMATS)
def test_without_native_kernels_affine_layers_run_the_reference(weights, monkeypatch):
    layer = make_layer(QuantScheme(weights), 37, 128, torch.bfloat16, seed=6)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    with ops.record_dispatch() as served:
        y = layer(x)
    assert served == ["torch.reference_forward"]
    assert_close_to_scale(y, expected_output(x, layer), torch.bfloat16)


@pytest.mark.skipif(not avx2_here(), reason="the fused affine kernels need AVX2 (elsewhere: the chunks)")
def test_the_native_affine_kernels_name_a_bad_argument():
    kernels = native.load()
    layer = make_layer(QuantScheme("int4"), 8, 128, torch.float32, seed=2)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="scale and zero must be contiguous float16"):
        kernels.gemv_affine(x, layer.weight, layer.weight_scale.float(), layer.weight_zero, 4, 64)
    with pytest.raises(RuntimeError, match="packed must be contiguous uint8"):
        kernels.gemv_affine(torch.randn(1, 256), layer.weight, layer.weight_scale, layer.weight_zero, 4, 64)
    with pytest.raises(RuntimeError, match="4, 3 or 2 bits, not 5"):
        kernels.gemv_affine(x, layer.weight, layer.weight_scale, layer.weight_zero, 5, 64)
    with pytest.raises(RuntimeError, match="int3 has no q8_0 mode"):
        kernels.gemv_affine_q8(x, layer.weight, layer.weight_scale, layer.weight_zero, 3, 64)
