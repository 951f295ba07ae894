"""Fused dequantize-and-multiply kernels for the weight-only formats, forward and input gradient: the 4-bit codebooks
(NF4, FP4), the integer affine formats (int4, int2) and int8 with 16-bit activations (weights="int8",
activations=None).

The weight stays in its format's stored layout (quantizer_plugin.formats), so checkpoints and kernels share one
format. Each kernel dequantizes a [rows, BLOCK_K] tile of W in registers and feeds it to tl.dot; the 16-bit weight is
never written to memory. One generic kernel serves every format, specialised by tl.constexpr: KIND picks the tile
dequantizer (below), BITS the integer width, DOUBLE_QUANT the codebook variant, ALIGNED the layout of the tile load.
- Codebook (NF4/FP4: flat row-major codes, two per byte, the first element in the high nibble; one absmax per
  `block_size` consecutive elements, optionally double-quantized): code -> codebook value (a 16-entry table passed
  by pointer) -> times the block's absmax, itself decoded from its 8-bit code, block scale and offset with double
  quantization. Two layouts of the tile load, picked by the launcher:
  - ALIGNED (in_features a multiple of block_size): each row starts on a byte and a block boundary, so the tile is
    loaded as whole bytes split into two nibbles, and its absmax as one value per (row, block), broadcast;
  - otherwise (blocks and bytes may straddle rows): every element finds its byte and its block by its flat index.
- Affine (int4/int2: each row in its own ceil(K * bits / 8) bytes, codes from the high bits; int3: bit planes, 8 codes
  in 3 bytes; a float16 scale and zero point per group of a row): (q - z) * s, as the reference computes it. The same
  two layouts of the tile load: ALIGNED (in_features a multiple of the group) loads whole bytes, split into 2 or 4
  codes, and one scale and zero point per (row, group), broadcast; otherwise, and always for int3, every element
  finds its bytes and its group.
- Int8 (int8 values (N, K), float32 row absmax): q * (absmax / 127), as the reference computes it.
- Float8 (fp8, fp8_e5m2: one byte per weight, its fp8 bit pattern; a float32 scale per group of a row): each byte's
  value by the encoding's formula in integer and exact float32 arithmetic (no fp8 hardware or conversion needed),
  times its group's scale. EXPONENT_BITS picks the encoding.
Each tile is then rounded to the activations' dtype, as the reference rounds the whole weight.

Shapes: decode (M <= 16) uses a weight-streaming configuration (a 16-row x tile, narrow N tiles so that enough
programs stream the weight to fill the GPU, long K tiles); prefill uses tensor-core-sized tiles. Both are autotuned
on (M bucket, N, K, format).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantizer_plugin.formats.dynamic8bit import DOUBLE_QUANT_BLOCK
from quantizer_plugin.formats.records import AffineWeight, CodebookWeight, Float8Weight, RowScaledWeight, check_record
from quantizer_plugin.ops import served

from .interpreter import cast_rounded, dot_16bit
from . import split_k
from .split_k import k_slice, reduce_splits
from .tile_order import grouped_tile
from .tuning import DECODE_MAX_M, autotuned, interpreting, m_bucket, matmul_configs

# The kernels index the flat weight with 32-bit integers; larger layers take the reference path.
MAX_ELEMENTS = 2**31 - 1
# KIND: which tile dequantizer a launch is specialised for, and the name its launches are recorded under.
CODEBOOK, AFFINE, INT8, FLOAT8 = 0, 1, 2, 3
FAMILY = {CODEBOOK: "codebook4bit", AFFINE: "affine", INT8: "int8_weight_only", FLOAT8: "float8"}


@triton.jit
def _load_absmax(
    absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr, blocks, mask,
    DOUBLE_QUANT: tl.constexpr, DQ_BLOCK: tl.constexpr,
):  # fmt: skip
    """float32 absmax of the quantization blocks `blocks` (0 where masked)."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_code_ptr + blocks, mask=mask, other=0).to(tl.int32)
        centred = tl.load(dynamic_code_ptr + code) * tl.load(absmax_scale_ptr + blocks // DQ_BLOCK, mask=mask, other=0.0)
        return tl.where(mask, centred + tl.load(absmax_offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + blocks, mask=mask, other=0.0)


@triton.jit
def _codebook_tile(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr, codebook_ptr,
    rows, k0, N, K,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, QUANT_BLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """NF4/FP4: float32 tile dequant(W)[rows, k0 : k0 + BLOCK_K], zero outside W. k0 is a multiple of BLOCK_K."""
    row_ok = rows < N
    if ALIGNED:
        # K % QUANT_BLOCK == 0, so K is even: row r's codes are bytes r*K/2 .. (r+1)*K/2 - 1.
        pairs = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        pair_ok = row_ok[:, None] & (pairs[None, :] < K // 2)
        packed = tl.load(packed_ptr + rows[:, None] * (K // 2) + pairs[None, :], mask=pair_ok, other=0)
        codes = tl.reshape(tl.join(packed >> 4, packed & 0xF), (ROWS, BLOCK_K)).to(tl.int32)
        values = tl.load(codebook_ptr + codes)
        if BLOCK_K >= QUANT_BLOCK:
            # BLOCK_K / QUANT_BLOCK whole blocks per tile row
            first = (rows * K + k0) // QUANT_BLOCK
            index = tl.arange(0, BLOCK_K // QUANT_BLOCK)
            blocks = first[:, None] + index[None, :]
            block_ok = row_ok[:, None] & ((k0 + index * QUANT_BLOCK)[None, :] < K)
            absmax = _load_absmax(
                absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr, blocks, block_ok,
                DOUBLE_QUANT, DQ_BLOCK,
            )  # fmt: skip
            scaled = tl.reshape(values, (ROWS, BLOCK_K // QUANT_BLOCK, QUANT_BLOCK)) * absmax[:, :, None]
            return tl.reshape(scaled, (ROWS, BLOCK_K))
        else:
            # a tile row lies inside one block (both are powers of two and k0 is a multiple of BLOCK_K)
            blocks = (rows * K + k0) // QUANT_BLOCK
            absmax = _load_absmax(
                absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr, blocks,
                row_ok, DOUBLE_QUANT, DQ_BLOCK,
            )  # fmt: skip
            return values * absmax[:, None]
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols[None, :] < K)
        flat = rows[:, None] * K + cols[None, :]
        packed = tl.load(packed_ptr + flat // 2, mask=ok, other=0)
        codes = (packed.to(tl.int32) >> (4 - 4 * (flat % 2))) & 0xF  # even elements sit in the high nibble
        values = tl.load(codebook_ptr + codes)
        absmax = _load_absmax(
            absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr, flat // QUANT_BLOCK, ok,
            DOUBLE_QUANT, DQ_BLOCK,
        )  # fmt: skip
        return values * absmax


@triton.jit
def _affine_tile(packed_ptr, scale_ptr, zero_ptr, rows, k0, N, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP: tl.constexpr, BITS: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """int4/int3/int2: float32 tile (q - z) * s of rows `rows`, columns k0 : k0 + BLOCK_K, zero outside W."""
    row_ok = rows < N
    groups_per_row = tl.cdiv(K, GROUP)
    if ALIGNED and BITS != 3:
        # K % GROUP == 0, so every row is whole bytes (K / PER_BYTE of them) and whole groups: the tile is loaded as
        # whole bytes, each split into its codes, and its scale and zero point as one value per (row, group).
        PER_BYTE: tl.constexpr = 8 // BITS
        byte = k0 // PER_BYTE + tl.arange(0, BLOCK_K // PER_BYTE)
        packed = tl.load(packed_ptr + rows[:, None] * (K // PER_BYTE) + byte[None, :],
                         mask=row_ok[:, None] & (byte < K // PER_BYTE)[None, :], other=0)  # fmt: skip
        if BITS == 4:
            codes = tl.join(packed >> 4, packed & 0xF)  # the first code of a byte is in its high bits
        else:
            # join stacks along a new last axis: joining (c0, c2) with (c1, c3) puts c0, c1, c2, c3 in order
            codes = tl.join(tl.join(packed >> 6, (packed >> 2) & 0x3), tl.join((packed >> 4) & 0x3, packed & 0x3))
        codes = tl.reshape(codes, (ROWS, BLOCK_K)).to(tl.float32)
        if BLOCK_K >= GROUP:
            index = tl.arange(0, BLOCK_K // GROUP)  # BLOCK_K / GROUP whole groups per tile row
            at = rows[:, None] * groups_per_row + (k0 // GROUP + index)[None, :]
            ok = row_ok[:, None] & ((k0 + index * GROUP) < K)[None, :]
            scale = tl.load(scale_ptr + at, mask=ok, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + at, mask=ok, other=0.0).to(tl.float32)
            grouped = (tl.reshape(codes, (ROWS, BLOCK_K // GROUP, GROUP)) - zero[:, :, None]) * scale[:, :, None]
            return tl.reshape(grouped, (ROWS, BLOCK_K))
        else:
            # a tile row lies inside one group (both are powers of two and k0 is a multiple of BLOCK_K)
            at = rows * groups_per_row + k0 // GROUP
            scale = tl.load(scale_ptr + at, mask=row_ok, other=0.0).to(tl.float32)
            zero = tl.load(zero_ptr + at, mask=row_ok, other=0.0).to(tl.float32)
            return (codes - zero[:, None]) * scale[:, None]
    else:
        # groups and bytes may end inside a tile (a short last group per row): every element finds its byte and group
        cols = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (cols < K)[None, :]
        if BITS == 3:
            # int3's bit planes (records.affine_row_bytes): column c is code j = c % 64 of run c // 64, whose three
            # planes (8 bytes each, ceil(r / 8) in a row's short last run) hold its bits p in bit j % 8 of byte j // 8
            run, j = cols // 64, cols % 64
            tail = K % 64
            row_bytes = K // 64 * 24 + 3 * ((tail + 7) // 8)
            plane = tl.where(run < K // 64, 8, (tail + 7) // 8)
            at = rows[:, None] * row_bytes + (run * 24 + j // 8)[None, :]
            codes = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
            for p in tl.static_range(3):
                byte = tl.load(packed_ptr + at + (p * plane)[None, :], mask=ok, other=0).to(tl.int32)
                codes += ((byte >> (j % 8)[None, :]) & 1) << p
        else:
            row_bytes = (K * BITS + 7) // 8
            packed = tl.load(packed_ptr + rows[:, None] * row_bytes + (cols // (8 // BITS))[None, :], mask=ok, other=0)
            shift = 8 - BITS * (cols % (8 // BITS) + 1)  # the first code of a byte is in its high bits
            codes = (packed.to(tl.int32) >> shift[None, :]) & ((1 << BITS) - 1)
        at = rows[:, None] * groups_per_row + (cols // GROUP)[None, :]
        scale = tl.load(scale_ptr + at, mask=ok, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + at, mask=ok, other=0.0).to(tl.float32)
        return (codes.to(tl.float32) - zero) * scale


@triton.jit
def _int8_tile(packed_ptr, scale_ptr, rows, k0, N, K, BLOCK_K: tl.constexpr):
    """int8 (weight-only): float32 tile q * (absmax / 127) of rows `rows`, columns k0 : k0 + BLOCK_K, zero outside W."""
    cols = k0 + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < K)[None, :]
    values = tl.load(packed_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0).to(tl.float32)
    return values * (tl.load(scale_ptr + rows, mask=row_ok, other=0.0) / 127.0)[:, None]


@triton.jit
def _float8_tile(packed_ptr, scale_ptr, rows, k0, N, K, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                 EXPONENT_BITS: tl.constexpr):  # fmt: skip
    """fp8: float32 tile value(byte) * scale of rows `rows`, columns k0 : k0 + BLOCK_K, zero outside W. A byte is a
    sign bit, an exponent field e of EXPONENT_BITS bits and a mantissa m of the MANTISSA others: its magnitude is
    m * 2^(1 - bias - MANTISSA) when e = 0 (subnormal), else (2^MANTISSA + m) * 2^(e - bias - MANTISSA); the power of
    two is built from its float32 bits, so every step is exact."""
    MANTISSA: tl.constexpr = 7 - EXPONENT_BITS
    BIAS: tl.constexpr = (1 << (EXPONENT_BITS - 1)) - 1
    cols = k0 + tl.arange(0, BLOCK_K)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < K)[None, :]
    byte = tl.load(packed_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0).to(tl.int32)
    e = (byte >> MANTISSA) & ((1 << EXPONENT_BITS) - 1)
    m = byte & ((1 << MANTISSA) - 1)
    power = ((tl.maximum(e, 1) + (127 - BIAS - MANTISSA)) << 23).to(tl.float32, bitcast=True)
    magnitude = tl.where(e == 0, m, m + (1 << MANTISSA)).to(tl.float32) * power
    value = tl.where((byte & 0x80) != 0, -magnitude, magnitude)
    at = rows[:, None] * tl.cdiv(K, GROUP) + (cols // GROUP)[None, :]
    return value * tl.load(scale_ptr + at, mask=ok, other=0.0)


@triton.jit
def _dequantize_tile(
    packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr, codebook_ptr,
    scale_ptr, zero_ptr, rows, k0, N, K,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, QUANT_BLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
    EXPONENT_BITS: tl.constexpr,
):  # fmt: skip
    """float32 tile dequant(W)[rows, k0 : k0 + BLOCK_K] of the KIND of weight, zero outside W. The codebook formats
    read the absmax pointers and the codebook; the affine ones scale_ptr and zero_ptr; int8 its row absmax at
    scale_ptr; fp8 its group scales at scale_ptr. Pointers a KIND does not read are placeholders."""
    if KIND == 1:
        return _affine_tile(packed_ptr, scale_ptr, zero_ptr, rows, k0, N, K, ROWS, BLOCK_K, QUANT_BLOCK, BITS, ALIGNED)
    elif KIND == 2:
        return _int8_tile(packed_ptr, scale_ptr, rows, k0, N, K, BLOCK_K)
    elif KIND == 3:
        return _float8_tile(packed_ptr, scale_ptr, rows, k0, N, K, BLOCK_K, QUANT_BLOCK, EXPONENT_BITS)
    else:
        return _codebook_tile(
            packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr,
            codebook_ptr, rows, k0, N, K, ROWS, BLOCK_K, QUANT_BLOCK, DQ_BLOCK, DOUBLE_QUANT, ALIGNED,
        )  # fmt: skip


@triton.jit
def _matmul_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr,
    codebook_ptr, scale_ptr, zero_ptr, bias_ptr, y_ptr, workspace_ptr, counter_ptr,
    M, N, K, M_BUCKET, stride_xm, stride_ym,
    QUANT_BLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    KIND: tl.constexpr, BITS: tl.constexpr, EXPONENT_BITS: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """y[M, N] = x[M, K] @ dequant(W)[N, K].T (+ bias), accumulated in float32; program (tile, split) reduces
    split `split` of K (split_k.py), SPLIT_K = 1 for the whole of K."""
    tile = tl.program_id(0)
    pid_m, pid_n = grouped_tile(tile, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    k_start, k_end = k_slice(K, tl.program_id(1), SPLIT_K, BLOCK_K)

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x_ok = (rows_m[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + cols[None, :], mask=x_ok, other=0.0)
        w = _dequantize_tile(
            packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr,
            codebook_ptr, scale_ptr, zero_ptr, rows_n, k0, N, K, BLOCK_N, BLOCK_K, QUANT_BLOCK, DQ_BLOCK,
            DOUBLE_QUANT, ALIGNED, KIND, BITS, EXPONENT_BITS,
        )  # fmt: skip
        acc = dot_16bit(x, tl.trans(cast_rounded(w, x.dtype, INTERPRETED)), acc, DOT_PRECISION, INTERPRETED)
    y_ok = (rows_m[:, None] < M) & (rows_n[None, :] < N)
    acc, y_ok = reduce_splits(acc, y_ok, tile, tl.program_id(1), rows_m[:, None] * N + rows_n[None, :], M, N,
                              workspace_ptr, counter_ptr, SPLIT_K)  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=rows_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows_m[:, None] * stride_ym + rows_n[None, :], cast_rounded(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=y_ok)


@triton.jit
def _grad_input_kernel(
    grad_y_ptr, packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr,
    codebook_ptr, scale_ptr, zero_ptr, grad_x_ptr,
    M, N, K, M_BUCKET, stride_gm, stride_xm,
    QUANT_BLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, ALIGNED: tl.constexpr,
    KIND: tl.constexpr, BITS: tl.constexpr, EXPONENT_BITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """grad_x[M, K] = grad_y[M, N] @ dequant(W)[N, K], accumulated in float32 (the frozen weight's backward)."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows_n = n0 + tl.arange(0, BLOCK_N)
        g_ok = (rows_m[:, None] < M) & (rows_n[None, :] < N)
        g = tl.load(grad_y_ptr + rows_m[:, None] * stride_gm + rows_n[None, :], mask=g_ok, other=0.0)
        w = _dequantize_tile(
            packed_ptr, absmax_ptr, absmax_code_ptr, absmax_scale_ptr, absmax_offset_ptr, dynamic_code_ptr,
            codebook_ptr, scale_ptr, zero_ptr, rows_n, k0, N, K, BLOCK_N, BLOCK_K, QUANT_BLOCK, DQ_BLOCK,
            DOUBLE_QUANT, ALIGNED, KIND, BITS, EXPONENT_BITS,
        )  # fmt: skip
        acc = dot_16bit(g, cast_rounded(w, g.dtype, INTERPRETED), acc, DOT_PRECISION, INTERPRETED)
    x_ok = (rows_m[:, None] < M) & (cols[None, :] < K)
    tl.store(grad_x_ptr + rows_m[:, None] * stride_xm + cols[None, :], cast_rounded(acc, grad_x_ptr.dtype.element_ty, INTERPRETED), mask=x_ok)


_KEY = ["M_BUCKET", "N", "K", "QUANT_BLOCK", "DOUBLE_QUANT", "ALIGNED", "KIND", "BITS", "EXPONENT_BITS"]
_FORWARD_DECODE = autotuned(_matmul_kernel, matmul_configs("4bit", "decode", splits_k=True), _KEY)
_FORWARD_PREFILL = autotuned(_matmul_kernel, matmul_configs("4bit", "prefill", splits_k=True), _KEY)
_GRAD_INPUT = autotuned(_grad_input_kernel, matmul_configs("4bit", "grad_input"), _KEY)

# The weight's pointer parameters of the kernels, in order.
_POINTERS = ("packed_ptr", "absmax_ptr", "absmax_code_ptr", "absmax_scale_ptr", "absmax_offset_ptr",
             "dynamic_code_ptr", "codebook_ptr", "scale_ptr", "zero_ptr")  # fmt: skip


def codebook_pointers(weight: CodebookWeight) -> dict:
    return dict(packed_ptr=weight.packed, absmax_ptr=weight.absmax, absmax_code_ptr=weight.absmax_code,
                absmax_scale_ptr=weight.absmax_scale, absmax_offset_ptr=weight.absmax_offset,
                dynamic_code_ptr=weight.dynamic_code, codebook_ptr=weight.code)  # fmt: skip


def affine_pointers(weight: AffineWeight) -> dict:
    return dict(packed_ptr=weight.packed, scale_ptr=weight.scale, zero_ptr=weight.zero)


def row_scaled_pointers(weight: RowScaledWeight) -> dict:
    return dict(packed_ptr=weight.values, scale_ptr=weight.scale)


def float8_pointers(weight: Float8Weight) -> dict:
    return dict(packed_ptr=weight.values, scale_ptr=weight.scale)


# family -> (KIND, the kernel pointers its record's fields fill): a new family's Triton kernel is an entry here
FAMILIES = {
    CodebookWeight.family: (CODEBOOK, codebook_pointers),
    AffineWeight.family: (AFFINE, affine_pointers),
    RowScaledWeight.family: (INT8, row_scaled_pointers),
    Float8Weight.family: (FLOAT8, float8_pointers),
}


def _family(weight) -> tuple:
    if weight.family not in FAMILIES:
        raise ValueError(f"weight family {weight.family!r} has no weight-only Triton kernel")
    return FAMILIES[weight.family]


def _weight_pointers(weight) -> tuple:
    """The weight's pointer arguments, in kernel order (the packed weight first); a pointer its KIND does not read
    (None in the record, or no field at all) gets the packed weight as a placeholder that is never read."""
    named = _family(weight)[1](weight)
    return tuple(named[name] if named.get(name) is not None else named["packed_ptr"] for name in _POINTERS)


def _check(name: str, tensor: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device != device or not tensor.is_contiguous():
        raise ValueError(
            f"{name} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} (contiguous={tensor.is_contiguous()}), "
            f"expected contiguous {shape} {dtype} on {device}"
        )


def _check_weight(weight, packed: torch.Tensor, device: torch.device, full: bool) -> None:
    if not full:
        # A LowBitLinear's tensors were checked against the spec when loaded; a decode step is only a few
        # microseconds of GPU time, so per call only what could have changed since (the device) is checked.
        if packed.device != device:
            raise ValueError(f"the stored weight is on {packed.device}, the input on {device}")
        return
    check_record(weight, device)


def _meta(weight, dtype: torch.dtype) -> dict:
    kind = _family(weight)[0]
    block = getattr(weight, "block_size", 1)  # row-scaled weights have no block: fixed, so that they compile once
    return dict(
        QUANT_BLOCK=block, DQ_BLOCK=DOUBLE_QUANT_BLOCK, DOUBLE_QUANT=kind == CODEBOOK and weight.double_quant,
        ALIGNED=kind != INT8 and weight.in_features % block == 0, KIND=kind, BITS=weight.bits,
        EXPONENT_BITS=getattr(weight, "exponent_bits", 0),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", INTERPRETED=interpreting(),
    )  # fmt: skip


def dequant_matmul(
    x: torch.Tensor,
    weight,
    bias: torch.Tensor | None = None,
    config: dict | None = None,
    check_weight: bool = True,
) -> torch.Tensor:
    """y = x @ dequant(W).T (+ bias) for a 2-D x (M, K) in fp16/bf16/fp32 and W's record (formats/records.py); y in
    x's dtype.

    `config` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) bypasses autotuning; tests use it to
    reach every tile layout. `check_weight=False` checks only the weight's device (for LowBitLinear, whose tensors
    were checked on load).
    """
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(1) != 1:
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor with unit stride along K, got {tuple(x.shape)} {x.dtype}")
    m, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(f"x has {k} features, the weight {weight.in_features}")
    pointers = _weight_pointers(weight)
    _check_weight(weight, pointers[0], x.device, check_weight)
    if bias is not None:
        _check("bias", bias, (n,), bias.dtype, x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    meta = _meta(weight, x.dtype)
    kernel = _FORWARD_DECODE if m <= DECODE_MAX_M else _FORWARD_PREFILL
    if config is not None:
        kernel, config = _matmul_kernel, dict(config, SPLIT_K=config.get("SPLIT_K", 1))
    split_buffers = split_k.buffers([config] if config else [c.kwargs for c in kernel.configs], m, n, x.device)
    args = (x, *pointers, bias if bias is not None else y, y, *split_buffers)
    args += (m, n, k, m_bucket(m), x.stride(0), y.stride(0))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    kernel[grid(config) if config else grid](*args, HAS_BIAS=bias is not None, **meta, **(config or {}))
    served(f"triton.{FAMILY[meta['KIND']]}.{'config' if config else 'decode' if m <= DECODE_MAX_M else 'prefill'}")
    return y


def dequant_matmul_grad_input(
    grad_y: torch.Tensor,
    weight,
    config: dict | None = None,
    check_weight: bool = True,
) -> torch.Tensor:
    """grad_x = grad_y @ dequant(W) for a 2-D grad_y (M, N) and W's record; grad_x in grad_y's dtype."""
    if grad_y.dim() != 2 or grad_y.dtype not in (torch.float16, torch.bfloat16, torch.float32) or grad_y.stride(1) != 1:
        raise ValueError(f"grad_y must be a 2-D fp16/bf16/fp32 tensor with unit stride, got {tuple(grad_y.shape)} {grad_y.dtype}")
    m, n = grad_y.shape
    k = weight.in_features
    if n != weight.out_features:
        raise ValueError(f"grad_y has {n} features, the weight {weight.out_features} outputs")
    pointers = _weight_pointers(weight)
    _check_weight(weight, pointers[0], grad_y.device, check_weight)
    grad_x = torch.empty((m, k), dtype=grad_y.dtype, device=grad_y.device)
    if m == 0:
        return grad_x
    meta = _meta(weight, grad_y.dtype)
    args = (grad_y, *pointers, grad_x)
    args += (m, n, k, m_bucket(m), grad_y.stride(0), grad_x.stride(0))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)

    if config is not None:
        _grad_input_kernel[grid(config)](*args, **meta, **config)
    else:
        _GRAD_INPUT[grid](*args, **meta)
    served(f"triton.{FAMILY[meta['KIND']]}.grad_input")
    return grad_x
