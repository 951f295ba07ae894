"""The CPU backend (quantizer_plugin.cpu) against the tests' oracles, on fresh random inputs and awkward shapes,
with proof of which implementation ran; its native build, and the fallback when it cannot be built."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.cpu import chunks, codebook4bit, native
from quantizer_plugin.cpu import int8 as cpu_int8
from quantizer_plugin.formats import QuantScheme, get_format

import oracles
from helpers import identity_row_groups, outputs_on_one_and_two_threads
import cpu_caps
from cpu_caps import (amx_here, amx_int8_here, avx2_here, avx512_bf16_here, avx512_here, avx512_vnni_here,
                      bf16_lookups_here, fused_rows_here, llm_int8_kernel)

# Max error relative to the largest |output|: the weight (or the output) rounded once to the compute dtype.
TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# 6: two groups of activation rows in the fused kernels' row tiles (csrc/simd.h) on every CPU; 257: past the bf16
# tiles (chunks.TILES_MAX_M), the chunks serve
M_VALUES = [1, 3, 6, 16, 33, 128, 257]
# (N, K, block): odd N; K a multiple of the block (rows start on a block: the fused kernel serves decode, the AMX
# tiles larger bf16 batches), K that is not (blocks straddle rows), block 16 and 32, and an odd K; N past one group
# of 64 rows with K over several chunks of columns and a block of 128.
SHAPES_4BIT = [(37, 128, 64), (45, 100, 64), (29, 96, 32), (31, 80, 16), (23, 75, 64), (83, 640, 128)]
SCHEMES_4BIT = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)


def make_layer(scheme: QuantScheme, n: int, k: int, dtype: torch.dtype, seed: int, bias: bool = True) -> LowBitLinear:
    torch.manual_seed(seed)
    return LowBitLinear.from_float(torch.nn.Linear(k, n, bias=bias), scheme, compute_dtype=dtype)


def expected_output(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    y = x.double() @ oracles.weight_of(layer).double().T
    return y if layer.bias is None else y + layer.bias.double()


def assert_close_to_scale(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert error <= TOLERANCES[dtype], f"max error {error:.3g} of the output scale, allowed {TOLERANCES[dtype]}"


def test_the_native_kernels_build_here():
    kernels = native.load()
    assert kernels is not None, "the native CPU kernels did not build on this machine"
    assert kernels.uses_avx2() == avx2_here()
    assert kernels.uses_avx512() == avx512_here()
    assert kernels.uses_avx512_vnni() == avx512_vnni_here()
    assert kernels.uses_avx512_bf16() == avx512_bf16_here()


def test_every_forward_op_has_the_native_cpu_implementation():
    """Compiled graphs call the kernels as torch.ops.quantizer_plugin.<name>, whose CPU implementations the native
    module registers in C++ (csrc/module.cpp): its list must name every op library.py defines."""
    from quantizer_plugin.cpu import library

    native.load()
    missing = [name for name in library.FORWARD_OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"quantizer_plugin::{name}", "CPU")]  # fmt: skip
    assert missing == []


def test_the_amx_kernels_are_used_where_the_cpu_has_them():
    assert native.load().uses_amx_bf16() == amx_here()
    assert native.load().uses_amx_int8() == amx_int8_here()


def expected_4bit_kernel(m: int, n_k_block: tuple, dtype: torch.dtype) -> str:
    _, k, block = n_k_block
    if m <= fused_rows_here(dtype, codebook4bit.GEMV_MAX_M) and k % block == 0 and block % 32 == 0:
        bf16_lookups = dtype == torch.bfloat16 and block % 64 == 0 and bf16_lookups_here()
        return "fused_bf16" if bf16_lookups else "fused"
    if m <= 256 and dtype == torch.bfloat16 and block % 64 == 0 and k % block == 0 and k % 128 == 0 and amx_here():
        return "tiles"
    return "dequantize_matmul"


@pytest.mark.parametrize("weights, double_quant", SCHEMES_4BIT, ids=[f"{w}-dq{int(d)}" for w, d in SCHEMES_4BIT])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_forward_matches_the_oracle_and_runs_the_native_kernels(weights, double_quant, dtype):
    for (n, k, block), m in itertools.product(SHAPES_4BIT, M_VALUES):
        layer = make_layer(QuantScheme(weights, block, double_quant), n, k, dtype, seed=m + n)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k)).to(dtype)
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == [f"cpu.codebook4bit.{expected_4bit_kernel(m, (n, k, block), dtype)}"], (n, k, m)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_close_to_scale(y, expected_output(x, layer), dtype)


@pytest.mark.skipif(not bf16_lookups_here(), reason="this CPU decodes bfloat16 on the float32 codebook")
@pytest.mark.parametrize("weights, double_quant", SCHEMES_4BIT, ids=[f"{w}-dq{int(d)}" for w, d in SCHEMES_4BIT])
@pytest.mark.parametrize("n, k, block", [(37, 320, 64), (20, 256, 128)])
def test_the_bf16_decode_reads_every_weight_in_its_place(weights, double_quant, n, k, block):
    """The bfloat16 decode kernel (vdpbf16ps, or AVX2's vpshufb lookups and their column order) fed rows of the
    identity, 1 to 4 at a time: each output is one weight, its codebook entry rounded to bfloat16 as the kernel reads
    it, times 1.0 plus zeros, times its block's absmax: exact in float32. So y is the oracle's weight with a bfloat16
    codebook, transposed, bit for bit: every column of every 32 in its place, every absmax applied once."""
    layer = make_layer(QuantScheme(weights, block, double_quant), n, k, torch.bfloat16, seed=n + k, bias=False)
    stored = {name: tensor.detach() for name, tensor in layer.quantized_tensors().items()}
    expected = oracles.dequantize_4bit(stored, n, k, weights, block, codebook_dtype=torch.bfloat16)
    identity = torch.eye(k, dtype=torch.bfloat16)
    for columns in identity_row_groups(k):
        with ops.record_dispatch() as served:
            y = layer(identity[columns])
        assert served == ["cpu.codebook4bit.fused_bf16"]
        assert torch.equal(y, expected[:, columns].T.to(torch.bfloat16)), columns


@pytest.mark.parametrize("weights, double_quant", SCHEMES_4BIT, ids=[f"{w}-dq{int(d)}" for w, d in SCHEMES_4BIT])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_dequantize_is_the_references_weight_bit_for_bit(weights, double_quant, dtype):
    kernels = native.load()
    for n, k, block in SHAPES_4BIT:
        layer = make_layer(QuantScheme(weights, block, double_quant), n, k, dtype, seed=n)
        reference = layer.dequantize_weight(dtype).reshape(-1)
        assert torch.equal(reference.float(), oracles.weight_of(layer).reshape(-1).to(dtype).float())
        packed, *statistics = codebook4bit.weight_arguments(layer.weight_record())
        for begin, end in [(0, n * k), (1, n * k - 3), (33, 97), (k, 3 * k + 1), (5, 5)]:
            out = torch.empty(end - begin, dtype=dtype)
            kernels.dequantize_4bit(packed, *statistics, block, begin, end, out, False)
            assert torch.equal(out, reference[begin:end]), (n, k, begin, end)
        if k % 32 == 0 and avx512_here():  # whole rows in the grouped order: each 32 as their evens, then their odds
            out = torch.empty(2 * k, dtype=dtype)
            kernels.dequantize_4bit(packed, *statistics, block, k, 3 * k, out, True)
            grouped = reference[k : 3 * k].view(2, k // 32, 16, 2).transpose(-1, -2).reshape(-1)
            assert torch.equal(out, grouped), (n, k)


@pytest.mark.skipif(not amx_here(), reason="this CPU has no AMX: the tile kernels are not built for it")
@pytest.mark.parametrize("weights, double_quant", SCHEMES_4BIT, ids=[f"{w}-dq{int(d)}" for w, d in SCHEMES_4BIT])
@pytest.mark.parametrize("n, k, block", [(83, 640, 128), (150, 256, 64), (16, 128, 64), (5, 384, 128)])
def test_the_tile_kernels_multiply_exactly_the_references_weights(weights, double_quant, n, k, block):
    """Rows of the identity as activations: each output is one weight times 1.0 plus zeros, exact in float32, so y
    must be the reference's bfloat16 weight, transposed, bit for bit (every row, column, block and chunk in its
    place, every absmax applied once). 2 and 3 groups of 16 activation rows, and blocks of 16 weight rows cut short."""
    layer = make_layer(QuantScheme(weights, block, double_quant), n, k, torch.bfloat16, seed=n + k, bias=False)
    for rows in (range(0, 32), range(k - 45, k)):  # two groups; three, the last short
        x = torch.eye(k, dtype=torch.bfloat16)[list(rows)]
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == ["cpu.codebook4bit.tiles"]
        assert torch.equal(y, layer.dequantize_weight(torch.bfloat16)[:, list(rows)].T)


@pytest.mark.skipif(not amx_here(), reason="this CPU has no AMX: the tile kernels are not built for it")
def test_the_int8_bf16_tile_kernel_multiplies_exactly_the_references_weights():
    n, k, m = 83, 416, cpu_int8.AMX_INT8_MAX_M + 2  # K a multiple of 32, not of the 128-column chunk
    layer = make_layer(QuantScheme("int8", activations=None), n, k, torch.bfloat16, seed=11, bias=False)
    x = torch.eye(k, dtype=torch.bfloat16)[k - m :]
    with ops.record_dispatch() as served:
        y = layer(x)
    assert served == ["cpu.int8.tiles"]
    assert torch.equal(y, layer.dequantize_weight(torch.bfloat16)[:, k - m :].T)


@pytest.mark.skipif(not amx_int8_here(), reason="this CPU has no AMX-INT8: the int8 tile kernel is not built for it")
@pytest.mark.parametrize("n, k, m", [(83, 640, 7), (150, 256, 33), (16, 64, 48), (301, 1024, 16), (5, 128, 9)])
def test_the_int8_tile_kernel_is_within_its_activation_split_of_the_exact_product(n, k, m):
    """Its only approximation is the activations' split into two int8 pieces, within max|x_row| / 64516 of x: the
    float32 result must sit that close to the exact product with the stored weight (N past the last full block of 16
    rows, odd M, an outlier column)."""
    layer = make_layer(QuantScheme("int8", activations=None), n, k, torch.bfloat16, seed=n, bias=False)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    x[:, 5] *= 30.0
    y = native.load().linear_int8_amx(x, layer.weight, layer.weight_scale)
    weight = oracles.weight_of(layer).double()
    exact = x.double() @ weight.T
    bound = x.double().abs().amax(1, keepdim=True) / 64516 * weight.abs().sum(1)[None, :]  # per output, worst case
    assert (y.double() - exact).abs().le(bound + 1e-6 * exact.abs().max()).all()
    with ops.record_dispatch() as served:
        layer(x)
    assert served == ["cpu.int8.int8_tiles"]


@pytest.mark.skipif(not amx_int8_here(), reason="this CPU has no AMX-INT8: the int8 tile kernel is not built for it")
def test_the_int8_tile_kernel_never_hides_a_nan_or_an_infinity():
    layer = make_layer(QuantScheme("int8", activations=None), 40, 128, torch.bfloat16, seed=1, bias=False)
    x = torch.randn(9, 128, dtype=torch.bfloat16)
    x[2, 7], x[5, 0] = float("nan"), float("inf")
    with ops.record_dispatch() as served:
        y = layer(x)
    assert served == ["cpu.int8.int8_tiles"]
    assert y[[2, 5]].isnan().all() and y[[0, 1, 3, 4, 6, 7, 8]].isfinite().all()


@pytest.mark.parametrize("weights, double_quant", SCHEMES_4BIT, ids=[f"{w}-dq{int(d)}" for w, d in SCHEMES_4BIT])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_native_quantizer_gives_the_formats_own_tensors(weights, double_quant, dtype):
    """Loading quantizes every weight through ops.quantize; on CPU that is the native kernel, whose stored tensors
    must equal the format's plain-torch quantize (the one checked against bitsandbytes' codes) exactly."""
    fmt = get_format(weights)
    generator = torch.Generator().manual_seed(len(weights) + int(double_quant))
    # odd shapes, blocks that straddle rows, an odd element count, block 16 to 256, an all-zero block
    for (n, k), block in [((64, 256), 64), ((37, 75), 64), ((29, 96), 32), ((31, 80), 16), ((5, 7), 64),
                          ((300, 1000), 256), ((2, 1), 64)]:  # fmt: skip
        weight = (torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator) * 3).to(dtype)
        weight.view(-1)[:block] = 0
        scheme = QuantScheme(weights, block, double_quant)
        with ops.record_dispatch() as served:
            ours = ops.quantize(fmt, weight, scheme)
        assert served == ["cpu.codebook4bit.quantize"]
        reference = fmt.quantize(weight, scheme)
        assert ours.keys() == reference.keys()
        for name in reference:
            assert torch.equal(ours[name], reference[name]), (n, k, block, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_native_int8_quantizer_gives_the_formats_own_tensors(dtype):
    fmt = get_format("int8")
    generator = torch.Generator().manual_seed(3)
    for n, k in [(64, 256), (37, 75), (5, 7), (3, 1)]:  # K past, under and not a multiple of the 16-lane step
        weight = (torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator) * 3).to(dtype)
        weight[1] = 0  # an all-zero row
        weight[2, ::2] = 0  # a row of absmax so small that 127 / absmax is infinite, half of it zeros
        weight[2, 1::2] = 1e-38 if dtype != torch.float16 else 0
        weight[0, 0] = 127.5 * weight[0].abs().max() / 127  # ties to round half to even
        with ops.record_dispatch() as served:
            ours = ops.quantize(fmt, weight, QuantScheme("int8"))
        assert served == ["cpu.int8.quantize" if avx512_here() else "torch.quantize"]
        reference = fmt.quantize(weight, QuantScheme("int8"))
        assert ours.keys() == reference.keys()
        for name in reference:
            assert torch.equal(ours[name], reference[name]), (n, k, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_4bit_input_gradient_runs_the_native_chunks(dtype):
    n, k, block = 45, 100, 64
    layer = make_layer(QuantScheme("nf4", block, True), n, k, dtype, seed=3)
    x = torch.randn(2, 5, k, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(2, 5, n, dtype=dtype)
    with ops.record_dispatch() as served:
        layer(x).backward(grad_y)
    assert served == ["cpu.codebook4bit.dequantize_matmul", "cpu.codebook4bit.grad_input"]
    expected = grad_y.double() @ oracles.weight_of(layer).double()
    assert_close_to_scale(x.grad, expected, dtype)


def test_a_layer_larger_than_one_chunk_is_multiplied_chunk_by_chunk(monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 3 * 100 * 2)  # three bf16 rows of K = 100 per chunk
    layer = make_layer(QuantScheme("fp4", 64, False), 37, 100, torch.bfloat16, seed=4)
    x = torch.randn(9, 100, dtype=torch.bfloat16)
    with ops.record_dispatch() as served:
        y = layer(x)
    assert served == ["cpu.codebook4bit.dequantize_matmul"]
    assert_close_to_scale(y, expected_output(x, layer), torch.bfloat16)


def test_the_fused_kernel_gives_the_same_result_on_any_number_of_threads():
    layer = make_layer(QuantScheme("nf4", 64, True), 301, 256, torch.float32, seed=5)
    x = torch.randn(3, 256)
    one, two = outputs_on_one_and_two_threads(layer, x)
    assert torch.equal(one, two)


@pytest.mark.parametrize("k", [128, 100, 75], ids=["K128", "K100", "K75"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weight_only_int8_matches_the_oracle(dtype, k):
    for m in M_VALUES:
        layer = make_layer(QuantScheme("int8", activations=None), 37, k, dtype, seed=m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        x[:, 3] *= 20.0  # what would be an outlier column: weight-only int8 keeps the activations in 16 bits anyway
        with ops.record_dispatch() as served:
            y = layer(x)
        int8_tiles = dtype != torch.float32 and k % 64 == 0 and m <= 48 and amx_int8_here()
        tiles = m <= 256 and dtype == torch.bfloat16 and k % 32 == 0 and amx_here()
        large = "cpu.int8.int8_tiles" if int8_tiles else "cpu.int8.tiles" if tiles else "cpu.int8.dequantize_matmul"
        fused = m <= fused_rows_here(dtype, cpu_int8.GEMV_MAX_M) and avx2_here()
        assert served == ["cpu.int8.fused" if fused else large]
        assert_close_to_scale(y, expected_output(x, layer), dtype)


def llm_int8_input(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Fresh random activations with two planted outlier columns, one of them with only some rows above the
    threshold (the others count towards their rows' absmax), and an entry exactly at the threshold."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator) * torch.rand(m, 1, generator=generator) * 2
    first, second = torch.randperm(k, generator=generator)[:2].tolist()
    x[:, first] *= 25.0
    x[0, second] = -6.0
    return x.to(dtype)


# K a multiple of 64 (the AMX-INT8 tiles past decode; one 64-byte step of VNNI), K with a masked last step, K below
# one step, and a weight past four blocks of 16 rows (the tiles' last block cut short).
@pytest.mark.parametrize("n, k", [(37, 128), (41, 100), (23, 75), (130, 17), (77, 192)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llm_int8_is_the_references_and_the_oracles(dtype, n, k):
    """The CPU's LLM.int8 against the independent float64 oracle (tests/oracles.py), and against the reference: its
    int8 part bit for bit (no outliers: the whole output), its outlier columns' float sums within one rounding."""
    for m in M_VALUES:
        layer = make_layer(QuantScheme("int8", outlier_threshold=6.0), n, k, dtype, seed=m + k)
        x = llm_int8_input(m, k, dtype, seed=m)
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == [llm_int8_kernel(m, k)]
        stored = layer.quantized_tensors()
        expected = oracles.llm_int8_linear(x, stored["weight"], stored["weight_scale"], 6.0) + layer.bias.double()
        assert_close_to_scale(y, expected, dtype)
        reference = ops.reference_forward(x, layer.weight_record(), layer.bias, dtype, layer.activations)
        # the outlier columns' sums differ in order only: within two roundings of the largest terms involved
        columns = x.float().abs().ge(6.0).any(dim=0)
        outlier_terms = (x.float().abs() * columns) @ oracles.weight_of(layer).abs().T
        step = 2 * torch.finfo(dtype).eps * (outlier_terms.max() + reference.float().abs().max())
        assert (y.float() - reference.float()).abs().max() <= step
        no_outliers = x.clamp(-5.9, 5.9)
        assert torch.equal(layer(no_outliers), ops.reference_forward(no_outliers, layer.weight_record(), layer.bias,
                                                                    dtype, layer.activations))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_llm_int8_activations_are_the_references_bit_for_bit(dtype):
    from quantizer_plugin.formats.activations import quantize_activations

    for m, k, threshold in [(1, 75, 6.0), (7, 100, 6.0), (33, 16, 6.0), (16, 128, 0.0), (4, 50, 0.5)]:
        x = llm_int8_input(m, k, dtype, seed=k)
        x[-1, 1] = float("nan")  # a NaN row: a NaN absmax, as the reference's
        ours = native.load().quantize_activations_int8(x, threshold)
        reference = quantize_activations(x, threshold)
        for name, mine, theirs in zip(("codes", "absmax", "outlier columns"), ours, reference):
            assert torch.equal(mine, theirs) or (name == "absmax" and torch.equal(mine.nan_to_num(), theirs.nan_to_num())), (m, k, name)  # fmt: skip
        assert ours[1][-1].isnan()


@pytest.mark.parametrize("m, k", [(3, 96), (20, 128)], ids=["register_tiles", "int8_tiles"])
@pytest.mark.parametrize("threshold", [6.0, 0.0])
def test_llm_int8_never_hides_a_nan_or_an_infinity(threshold, m, k):
    layer = make_layer(QuantScheme("int8", outlier_threshold=threshold), 40, k, torch.bfloat16, seed=1)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    x[0, 5], x[2, 9] = float("nan"), float("inf")
    with ops.record_dispatch() as served:
        y = layer(x)
    assert served == [llm_int8_kernel(m, k)]
    assert not y[0].isfinite().any() and y[1].isfinite().all() and not y[2].isfinite().all()
    assert y[3:].isfinite().all()


@pytest.mark.parametrize("m", [3, 37])
def test_llm_int8_gives_the_same_result_on_any_number_of_threads(m):
    layer = make_layer(QuantScheme("int8"), 301, 256, torch.bfloat16, seed=5)
    x = llm_int8_input(m, 256, torch.bfloat16, seed=5)
    one, two = outputs_on_one_and_two_threads(layer, x)
    assert torch.equal(one, two)


@pytest.mark.skipif(not amx_int8_here(), reason="this CPU has no AMX-INT8 (or QUANTIZER_PLUGIN_MAX_ISA hides it)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llm_int8_on_the_int8_tiles_is_the_register_tiles_bit_for_bit(dtype):
    """Past decode the AMX-INT8 tiles sum what the register tiles (VNNI or AVX2) sum, exactly, and both end in the
    same epilogue: the same bytes, outliers and all, over row counts around whole tiles and a last block of weight
    rows cut short."""
    kernels = native.load()
    for m, n, k in [(5, 37, 64), (16, 70, 128), (17, 16, 256), (33, 130, 192)]:
        layer = make_layer(QuantScheme("int8"), n, k, dtype, seed=m)
        x = llm_int8_input(m, k, dtype, seed=n)
        for input_scale in (None, torch.tensor([0.02])):  # LLM.int8, and static int8 activations
            args = (x, layer.weight, layer.weight_scale, 0.0 if input_scale is not None else 6.0, input_scale)
            assert torch.equal(kernels.linear_llm_int8_tiles(*args), kernels.linear_llm_int8(*args)), (m, n, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_int8_dequantize_is_the_references_weight_bit_for_bit(dtype):
    layer = make_layer(QuantScheme("int8"), 37, 75, dtype, seed=8)
    reference = layer.dequantize_weight(dtype)
    for first, last in [(0, 37), (5, 6), (3, 30), (9, 9)]:
        out = torch.empty((last - first) * 75, dtype=dtype)
        native.load().dequantize_int8(layer.weight, layer.weight_scale, first, last, out)
        assert torch.equal(out.view(last - first, 75), reference[first:last])


@pytest.mark.parametrize("activations", ["int8", None], ids=["llm_int8", "weight_only"])
def test_int8_input_gradient_runs_the_native_chunks(activations):
    layer = make_layer(QuantScheme("int8", activations=activations), 37, 96, torch.bfloat16, seed=9)
    x = torch.randn(3, 96, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(3, 37, dtype=torch.bfloat16)
    with ops.record_dispatch() as served:
        layer(x).backward(grad_y)
    forward = llm_int8_kernel(3, 96) if activations else "cpu.int8.fused" if avx2_here() else "cpu.int8.dequantize_matmul"
    assert served == [forward, "cpu.int8.grad_input"]
    assert_close_to_scale(x.grad, grad_y.double() @ oracles.weight_of(layer).double(), torch.bfloat16)


@pytest.mark.parametrize("m, k, n", [(256, 96, 33), (256, 256, 128), (128, 208, 72)])
def test_weight_only_int8_is_at_least_as_accurate_as_llm_int8(m, k, n):
    """Against the float32 product with the 16-bit weight, over a batch: no worse than bitsandbytes' LLM.int8."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(k)
    linear = torch.nn.Linear(k, n).half()
    generator = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=generator)
    x[:, torch.randperm(k, generator=generator)[:3]] *= 25.0  # outlier columns, as LLM.int8 expects them
    x = x.half()
    exact = torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    ours = LowBitLinear.from_float(linear, QuantScheme("int8", activations=None), compute_dtype=torch.float16)
    peer = bnb.nn.Linear8bitLt(k, n, bias=True, has_fp16_weights=False, threshold=6.0)
    peer.load_state_dict(linear.state_dict())
    with torch.no_grad(), ops.record_dispatch() as served:
        ours_error = (ours(x).float() - exact).abs().mean()
        peer_error = (peer.eval()(x).float() - exact).abs().mean()
    fused = m <= fused_rows_here(torch.float16, cpu_int8.GEMV_MAX_M)
    assert served == ["cpu.int8.fused" if fused else "cpu.int8.dequantize_matmul"]
    assert ours_error <= peer_error, (ours_error, peer_error)


def test_a_cached_build_is_imported_without_the_builder(monkeypatch):
    """Another venv with the same torch and Python (CI's lower bounds) reuses the library instead of rebuilding it."""
    import torch.utils.cpp_extension

    native.load()  # built (or found) once
    assert (native.build_directory() / f"{native.NAME}.so").exists()

    def no_builder(**kwargs):
        raise AssertionError("torch's builder was called for a library that is built already")

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_builder)
    kernels = native.load()
    assert kernels is not None and kernels.uses_avx512() in (True, False)


@pytest.mark.parametrize("scheme", [QuantScheme("nf4", 64, True), QuantScheme("int8")], ids=["nf4", "llm_int8"])
def test_without_native_kernels_the_backend_runs_the_reference(monkeypatch, scheme):
    layer = make_layer(scheme, 37, 128, torch.bfloat16, seed=6)
    x = llm_int8_input(3, 128, torch.bfloat16, seed=6)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    with ops.record_dispatch() as served:
        y = layer(x)
    assert served == ["torch.reference_forward"]
    if scheme.weights == "int8":  # LLM.int8's reference, never weight-only
        stored = layer.quantized_tensors()
        expected = oracles.llm_int8_linear(x, stored["weight"], stored["weight_scale"], 6.0) + layer.bias.double()
    else:
        expected = expected_output(x, layer)
    assert_close_to_scale(y, expected, torch.bfloat16)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    import torch.utils.cpp_extension

    def no_compiler(**kwargs):
        raise OSError("g++: command not found")

    layer = make_layer(QuantScheme("fp4", 64, False), 37, 128, torch.float32, seed=7)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a machine with no kernels built yet
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    x = torch.randn(2, 128)
    with warnings.catch_warnings(record=True) as caught, ops.record_dispatch() as served:
        warnings.simplefilter("always")
        first, second = layer(x), layer(x)
    messages = [str(w.message) for w in caught if "native CPU kernels could not be built" in str(w.message)]
    assert len(messages) == 1 and "g++: command not found" in messages[0]
    assert served == ["torch.reference_forward"] * 2
    assert torch.equal(first, second)
    assert_close_to_scale(first, expected_output(x, layer), torch.float32)


def run_with_max_isa(value: str, script: str, threads: int | None = None):
    import os
    import subprocess
    import sys

    env = dict(os.environ, **{native.MAX_ISA_ENV: value})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


CAPS = ["scalar", "avx2", "avx512", "avx512_bf16"]
# LLM.int8 on layers and inputs every capped run (and the test itself) builds alike: its int8 sums are exact and its
# float part is the same plain C++ on every path, so every instruction set gives the same bytes. K = 200 takes the
# register tiles everywhere; K = 256 with 20 rows the AMX-INT8 tiles where the test itself runs on AMX.
LLM_INT8_RUN = (
    "import hashlib, torch; from quantizer_plugin import LowBitLinear, ops; from quantizer_plugin.formats import QuantScheme\n"
    "def llm_int8_run():\n"
    "    results = []\n"
    "    for m, k in ((5, 200), (20, 256)):\n"
    "        torch.manual_seed(0); x = torch.randn(m, k, dtype=torch.bfloat16); x[:, 7] *= 30\n"
    "        layer = LowBitLinear.from_float(torch.nn.Linear(k, 41), QuantScheme('int8'), compute_dtype=torch.bfloat16)\n"
    "        with ops.record_dispatch() as served: y = layer(x)\n"
    "        results += [served[0], hashlib.sha256(y.view(torch.int16).numpy().tobytes()).hexdigest()]\n"
    "    return results\n"
)
CAPPED_SCRIPT = LLM_INT8_RUN + (
    "from quantizer_plugin.cpu import native; k = native.load(); "
    "print(k.uses_avx2(), k.uses_avx512(), k.uses_avx512_bf16(), k.uses_amx_bf16(), k.uses_amx_int8(), k.uses_avx512_vnni()); "
    "torch.manual_seed(0); "
    "layer = LowBitLinear.from_float(torch.nn.Linear(256, 40), QuantScheme('nf4'), compute_dtype=torch.bfloat16)\n"
    "for m in (1, 16, 40):\n"
    "    with ops.record_dispatch() as served: layer(torch.randn(m, 256, dtype=torch.bfloat16))\n"
    "    print(served[0])\n"
    "print(*llm_int8_run())\n"
    # each family's decode kernel on this path (AVX-512, AVX2 or plain C++) against the reference's weight, float32
    "for scheme in (QuantScheme('nf4'), QuantScheme('int8', activations=None), QuantScheme('int4'), QuantScheme('int3')):\n"
    "    torch.manual_seed(1); layer = LowBitLinear.from_float(torch.nn.Linear(256, 37), scheme, compute_dtype=torch.float32)\n"
    "    x = torch.randn(3, 256)\n"
    "    with ops.record_dispatch() as served: y = layer(x)\n"
    "    exact = x.double() @ layer.dequantize_weight(torch.float32).double().T + layer.bias.double()\n"
    "    print(served[0], float((y.double() - exact).abs().max() / exact.abs().max()), end=' ')\n"
    # each family's float32 dequantizer on this path (the chunks of a float32 compute dtype), bit for bit
    "print()\n"
    "from quantizer_plugin.cpu import codebook4bit\n"
    "for scheme in (QuantScheme('nf4', 32), QuantScheme('int8'), QuantScheme('int4', 16), QuantScheme('int2'),\n"
    "               QuantScheme('int3', 16), QuantScheme('int3', 64)):\n"
    "    torch.manual_seed(2); layer = LowBitLinear.from_float(torch.nn.Linear(200, 37), scheme, compute_dtype=torch.float32)\n"
    "    reference = layer.dequantize_weight(torch.float32)[3:30]; out = torch.empty(27, 200)\n"
    "    if scheme.weights == 'nf4': k.dequantize_4bit(*codebook4bit.weight_arguments(layer.weight_record()), 32, 600, 6000, out.view(-1), False)\n"
    "    elif scheme.weights == 'int8': k.dequantize_int8(layer.weight, layer.weight_scale, 3, 30, out)\n"
    "    else: k.dequantize_affine(layer.weight, layer.weight_scale, layer.weight_zero, layer.fmt.bits, scheme.block_size, 3, 30, out)\n"
    "    print(torch.equal(out, reference), end=' ')"
)
MISSPELT = "amx512"


@pytest.fixture(scope="module")
def capped_runs():
    """Each cap (and a misspelt one) in its own fresh process, since the cap is read when the kernels load; such a
    run is mostly single-threaded imports, so they go two at a time, each with one torch thread."""
    from concurrent.futures import ThreadPoolExecutor

    scripts = dict.fromkeys(CAPS, CAPPED_SCRIPT) | {MISSPELT: "from quantizer_plugin.cpu import native; native.load()"}
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(scripts, pool.map(lambda cap: run_with_max_isa(cap, scripts[cap], threads=1), scripts)))


@pytest.mark.parametrize("cap", CAPS)
def test_the_max_isa_switch_hides_what_it_names_and_the_kernels_take_the_other_paths(cap, capped_runs):
    result = capped_runs[cap]
    assert result.returncode == 0, result.stderr[-3000:]
    features, decode, sixteen, batch, llm_int8, decodes, dequantized = result.stdout.split("\n")[:7]
    level, flags = cpu_caps.LEVELS.index(cap), cpu_caps.cpu_flags()
    avx2, avx512, avx512_bf16, amx_bf16, amx_int8, vnni = [flag == "True" for flag in features.split()]
    assert avx2 == (level >= 1 and "avx2" in flags)
    assert avx512 == (level >= 2 and "avx512f" in flags)
    assert vnni == (level >= 2 and "avx512_vnni" in flags)
    assert not amx_bf16 and not amx_int8  # every cap here hides AMX
    assert avx512_bf16 == (level >= 3 and "avx512_bf16" in flags)
    assert decode == ("cpu.codebook4bit.fused_bf16" if avx512_bf16 or (avx2 and not avx512) else "cpu.codebook4bit.fused")
    # past decode: every batch fused without 16-bit GEMM hardware (AVX2 alone, AVX-512 without BF16), up to 16 rows
    # with AVX512-BF16 and no AMX (chunks.fused_rows), the chunks otherwise
    assert sixteen == ("cpu.codebook4bit.dequantize_matmul" if not avx2 else decode)
    assert batch == (decode if avx2 and not avx512_bf16 else "cpu.codebook4bit.dequantize_matmul")
    # LLM.int8: VNNI's, AVX2's or plain C++'s int8 sums, the same bytes as this process gets with every instruction
    # set (the AMX-INT8 tiles too, where it has them)
    namespace = {}
    exec(LLM_INT8_RUN, namespace)
    here = namespace["llm_int8_run"]()
    served_here, hashes_here = here[::2], here[1::2]
    assert llm_int8.split()[1::2] == hashes_here
    assert llm_int8.split()[::2] == ["cpu.int8.llm_int8_vnni" if vnni else "cpu.int8.llm_int8"] * 2
    assert served_here == [llm_int8_kernel(5, 200), llm_int8_kernel(20, 256)]
    # the decode kernels: fused wherever there is AVX2 (int8, int4 and int3 take the chunks in plain C++)
    served, errors = decodes.split()[::2], [float(error) for error in decodes.split()[1::2]]
    assert served == ["cpu.codebook4bit.fused"] + (["cpu.int8.fused", "cpu.affine.fused", "cpu.affine.fused"] if avx2
                                                   else ["cpu.int8.dequantize_matmul"] + ["cpu.affine.dequantize_matmul"] * 2)  # fmt: skip
    assert max(errors) <= TOLERANCES[torch.float32], errors
    assert dequantized.split() == ["True"] * 6


def test_a_misspelt_max_isa_is_an_error_naming_the_variable(capped_runs):
    result = capped_runs[MISSPELT]
    assert result.returncode != 0
    assert "QUANTIZER_PLUGIN_MAX_ISA='amx512': expected one of amx, avx512_bf16, avx512, avx2, scalar" in result.stderr
