"""NF4/FP4 with and without double quantization: codes, statistics and dequantized weights equal bitsandbytes'.

The dequantized weights are checked against an explicit per-element dequantization of bitsandbytes' own codes and
absmax (element i is code[its 4-bit code] * absmax[i // block_size]), written here without our formats' code. We
also compare with bitsandbytes' `dequantize_4bit`, but only where its native CPU kernel is right: that kernel cuts
blocks per row, so for a weight whose 64-element blocks cross rows (a row length that is not a multiple of the
block) it disagrees with bitsandbytes' own pure-torch path and with its CUDA kernel.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantizer_plugin.formats import QuantScheme, get_format
from quantizer_plugin.formats.dynamic8bit import dynamic_code

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# (5, 16) ... (4, 176): even rows shorter than or not a multiple of a block, so blocks cross rows.
SHAPES = [(128, 64), (33, 47), (7,), (300, 333), (3, 5, 7), (1, 4097), (5, 16), (3, 32), (2, 48), (4, 176)]


def bnb_quantize(weight, quant_type, block_size, double_quant):
    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=block_size, compress_statistics=double_quant, quant_type=quant_type
    )
    return packed, state, bnb_functional.dequantize_4bit(packed, state)


def explicit_dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, block_size: int, n: int):
    """The flat float32 weight from packed codes (first element in the high nibble) and per-block absmax."""
    packed = packed.reshape(-1).to(torch.int64)
    codes = torch.empty(2 * packed.numel(), dtype=torch.int64)
    codes[0::2], codes[1::2] = packed // 16, packed % 16
    return code[codes[:n]] * absmax.repeat_interleave(block_size)[:n]


def bnb_absmax(state) -> torch.Tensor:
    """bitsandbytes' float32 per-block absmax, undoing its double quantization (1-D, so its native kernel applies)."""
    if state.nested:
        return bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def assert_equal_to_bnb(weight: torch.Tensor, quant_type: str, block_size: int, double_quant: bool):
    fmt = get_format(quant_type)
    scheme = QuantScheme(quant_type, block_size=block_size, double_quant=double_quant)
    rows = weight.reshape(-1, weight.shape[-1])
    ours = fmt.quantize(rows, scheme)
    packed, state, dequantized = bnb_quantize(weight, quant_type, block_size, double_quant)

    assert torch.equal(ours["weight"], packed)  # bitsandbytes' (n / 2, 1) uint8 layout
    if double_quant:
        assert torch.equal(ours["weight_absmax_code"].reshape(-1), state.absmax)
        assert torch.equal(ours["weight_absmax_scale"], state.state2.absmax)
        assert torch.equal(ours["weight_absmax_offset"].reshape(()), state.offset)
        assert torch.equal(dynamic_code(), state.state2.code)
    else:
        assert torch.equal(ours["weight_absmax"], state.absmax)
    ours_dequantized = fmt.dequantize(ours, rows.shape[0], rows.shape[1], scheme, weight.dtype).reshape(-1)
    expected = explicit_dequantize(packed, bnb_absmax(state), state.code, block_size, weight.numel())
    assert torch.equal(ours_dequantized, expected.to(weight.dtype))
    if weight.shape[-1] % block_size == 0:
        assert torch.equal(ours_dequantized, dequantized.reshape(-1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codebooks_are_bitsandbytes_codebooks(quant_type):
    assert torch.equal(get_format(quant_type).code(), bnb_functional.get_4bit_type(quant_type, device="cpu"))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["no_dq", "dq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_equal_to_bitsandbytes(quant_type, double_quant, dtype, shape):
    generator = torch.Generator().manual_seed(hash((quant_type, double_quant, shape)) % 2**31)
    weight = (torch.randn(shape, generator=generator) * 0.05).to(dtype)
    assert_equal_to_bnb(weight, quant_type, 64, double_quant)


@pytest.mark.parametrize("block_size", [32, 128, 256, 1024, 4096])
def test_equal_to_bitsandbytes_other_block_sizes(block_size):
    weight = torch.randn(96, 200) * 3
    assert_equal_to_bnb(weight, "nf4", block_size, True)
    assert_equal_to_bnb(weight, "fp4", block_size, False)


def test_equal_to_bitsandbytes_with_zero_blocks_and_constant_absmax():
    weight = torch.randn(64, 128)
    weight[:8] = 0  # whole 64-element blocks of zeros
    assert_equal_to_bnb(weight, "nf4", 64, True)
    assert_equal_to_bnb(torch.ones(64, 128), "nf4", 64, True)  # centred absmax all zero


# Deterministic (derandomize) and without an example database, so that no run and no saved example decides CI.
@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    rows=st.integers(1, 70),
    cols=st.integers(1, 200),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**31 - 1),
)
def test_equal_to_bitsandbytes_random_shapes(rows, cols, quant_type, double_quant, scale, seed):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    assert_equal_to_bnb(weight, quant_type, 64, double_quant)


def test_dequantize_is_close_to_the_weight():
    # Sanity beyond equality: 4-bit NF4 on gaussian weights keeps the signal (SNR above 18 dB).
    weight = torch.randn(256, 512)
    scheme = QuantScheme("nf4", 64, True)
    restored = get_format("nf4").dequantize(get_format("nf4").quantize(weight, scheme), 256, 512, scheme, torch.float32)
    snr_db = 10 * torch.log10(weight.pow(2).mean() / (weight - restored).pow(2).mean())
    assert snr_db > 18


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_equal_to_bitsandbytes_across_quantization_chunks(quant_type):
    # more elements than one quantization chunk (2^22), with a short tail block: chunks must join seamlessly
    weight = torch.randn(4099, 1025, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert_equal_to_bnb(weight, quant_type, 64, True)
