"""fp8 weights (fp8: e4m3fn, fp8_e5m2) in their format and on the CPU backend (quantizer_plugin/cpu/float8.py), against
the tests' oracle (the OCP fp8 formula, tests/oracles.py), on fresh random inputs and awkward shapes, with proof of
which native kernel ran."""

from __future__ import annotations

import itertools

import pytest
import torch

from quantizer_plugin import LowBitConfig, LowBitLinear, ops
from quantizer_plugin.cpu import float8 as cpu_float8
from quantizer_plugin.cpu import native
from quantizer_plugin.formats import QuantScheme, get_format

import oracles
from helpers import outputs_on_one_and_two_threads
from cpu_caps import amx_here, avx2_here, fused_rows_here
from test_cpu_backend import DTYPES, M_VALUES, assert_close_to_scale, expected_output, make_layer

FORMATS = {"fp8": 4, "fp8_e5m2": 5}  # the exponent bits of each
# (N, K, block): one scale per row (None) at K a multiple of 32 (the AMX tiles past decode in bfloat16), K = 100 and
# an odd K (the kernels' 16- and 32-column steps end inside a row), a K under 16 (no vector step at all); a scale per
# 16, 32 and 128 columns, with a short last group (K = 100, block 32), and over several of the tiles' 128-column
# chunks.
SHAPES = [(37, 128, None), (45, 100, None), (23, 75, None), (9, 8, None), (29, 96, 16), (31, 100, 32),
          (83, 640, 128)]  # fmt: skip
# The bit patterns that are not finite numbers: e4m3fn's NaN, e5m2's infinities and NaNs.
NON_FINITE = {4: {0x7F, 0xFF}, 5: set(range(0x7C, 0x80)) | set(range(0xFC, 0x100))}


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)


def expected_kernel(m: int, k: int, block: int | None, dtype: torch.dtype) -> str:
    """The kernel that should serve, from the shapes and this CPU's flags (not from the entry point's own checks)."""
    if m <= fused_rows_here(dtype, cpu_float8.GEMV_MAX_M) and avx2_here():
        return "fused"
    if m <= 256 and dtype == torch.bfloat16 and k % 32 == 0 and (block or k) % 16 == 0 and amx_here():
        return "tiles"
    return "dequantize_matmul"


def finite_patterns(exponent_bits: int) -> torch.Tensor:
    return torch.tensor([b for b in range(256) if b not in NON_FINITE[exponent_bits]], dtype=torch.uint8)


@pytest.mark.parametrize("weights", FORMATS)
def test_quantize_stores_each_weight_as_the_nearest_fp8_value_of_its_scaled_group(weights):
    """The scale is the group's absmax over the largest finite value, and each weight / scale is stored as its nearest
    fp8 value (the oracle enumerates every finite pattern by the formula): the largest |weight| of a group lands on
    the largest value, a group of zeros stays zeros."""
    exponent_bits = FORMATS[weights]
    patterns = finite_patterns(exponent_bits)
    values = oracles.float8_value(patterns, exponent_bits)
    largest = values.max().item()
    torch.manual_seed(0)
    for k, block in ((100, None), (100, 32), (64, 16)):
        weight = torch.randn(7, k) * torch.logspace(-3, 1, 7)[:, None]  # rows of very different magnitudes
        weight[2] = 0.0
        stored = get_format(weights).quantize(weight, QuantScheme(weights, block_size=block))
        group = torch.arange(k) // (block or k)
        groups = torch.zeros(7, int(group.max()) + 1).scatter_reduce(1, group.expand(7, -1), weight.abs(), "amax")
        assert torch.equal(stored["weight_scale"], (groups / largest).float())
        scaled = weight.double() / torch.where(groups > 0, stored["weight_scale"].double(), 1.0)[:, group]
        stored_values = oracles.float8_value(stored["weight"], exponent_bits)
        distance = (stored_values - scaled).abs()
        nearest = (values[None, None, :] - scaled[..., None]).abs().amin(-1)
        assert torch.equal(distance, nearest), weights  # no other fp8 value is nearer
        assert bool((stored["weight"][2] == 0).all())


@pytest.mark.parametrize("weights", FORMATS)
def test_native_dequantize_decodes_every_finite_bit_pattern_exactly(weights):
    """Every finite pattern, in a row whose scale is not a power of two, dequantized to float32 by the native kernel:
    the oracle's value times the scale, one float32 rounding."""
    exponent_bits = FORMATS[weights]
    kernels = native.load()
    patterns = finite_patterns(exponent_bits)
    values = patterns[torch.randperm(len(patterns), generator=torch.Generator().manual_seed(1))].reshape(2, -1).contiguous()
    scale = torch.tensor([[0.37], [1.0e-3]])
    out = torch.empty(values.shape)
    kernels.dequantize_float8(values, scale, values.shape[1], exponent_bits, 0, 2, out)
    assert torch.equal(out, (oracles.float8_value(values, exponent_bits) * scale.double()).float())


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_forward_matches_the_oracle_and_runs_the_native_kernels(weights, dtype):
    for (n, k, block), m in itertools.product(SHAPES, M_VALUES):
        layer = make_layer(QuantScheme(weights, block_size=block), n, k, dtype, seed=m + n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(dtype)
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == [f"cpu.float8.{expected_kernel(m, k, block, dtype)}"], (n, k, block, m)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close_to_scale(y, expected_output(x, layer), dtype)


@pytest.mark.parametrize("weights", FORMATS)
def test_the_input_gradient_is_the_oracles(weights):
    layer = make_layer(QuantScheme(weights, block_size=32), 45, 100, torch.bfloat16, seed=3)
    x = torch.randn(2, 5, 100, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(2, 5, 45, dtype=torch.bfloat16)
    with ops.record_dispatch() as served:
        layer(x).backward(grad_y)
    assert served[-1] == "cpu.float8.grad_input"
    assert_close_to_scale(x.grad, grad_y.double() @ oracles.weight_of(layer).double(), torch.bfloat16)


def test_the_fused_kernel_gives_the_same_result_on_any_number_of_threads():
    layer = make_layer(QuantScheme("fp8", block_size=64), 301, 256, torch.float32, seed=5)
    one, two = outputs_on_one_and_two_threads(layer, torch.randn(3, 256))
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_row_of_zeros_and_a_row_of_subnormals_keep_their_values(dtype):
    """A row of zeros (scale 0: no division by it), and a row whose absmax is e4m3fn's largest value (scale 1) and
    whose other weights are e4m3fn's subnormals m * 2^-9: both decode to the oracle's values on the fused kernel and
    on the AMX tiles or the chunks. The subnormal row's outputs are checked on their own (x's first column is 0)."""
    linear = torch.nn.Linear(64, 3, bias=False)
    with torch.no_grad():
        linear.weight[0] = 0.0
        linear.weight[1] = torch.arange(64).remainder(8).float() * 2.0**-9 * torch.tensor([1.0, -1.0]).repeat(32)
        linear.weight[1, 0] = 448.0
    layer = LowBitLinear.from_float(linear, QuantScheme("fp8"), compute_dtype=dtype)
    weight = oracles.weight_of(layer)
    assert torch.equal(weight[:2], linear.weight[:2].detach())  # every subnormal is stored exactly
    for m in (1, 40):
        x = torch.randn(m, 64).to(dtype)
        x[:, 0] = 0.0
        y = layer(x)
        assert bool((y[:, 0] == 0).all())
        assert_close_to_scale(y[:, 1], (x.double() @ weight.double().T)[:, 1], dtype)


def test_fp8_config_defaults_to_a_scale_per_row_and_validates_the_block():
    assert LowBitConfig(weights="fp8").block_size is None
    assert LowBitConfig(weights="fp8").scheme.block_size is None and QuantScheme("fp8").block_size is None
    assert LowBitConfig(weights="fp8_e5m2", block_size=128).scheme.block_size == 128
    with pytest.raises(ValueError, match="block_size"):
        LowBitConfig(weights="fp8", block_size=100)
    with pytest.raises(ValueError, match="activations"):
        LowBitConfig(weights="fp8", activations="int8")
