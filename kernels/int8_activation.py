"""LLM.int8 activation side: find the outlier columns of x and quantize the rest of each row to int8.

A column (input feature) is an outlier when ANY row reaches the threshold, so the row quantization cannot start
before every row has been seen. For large M this takes two cheap passes over x, two launches and no host sync:

  1. `_outlier_scan_kernel`: a column-wise max over row chunks, flagged into an int32 mask with atomic_max;
  2. `_row_quantize_kernel`: per row, the absmax of the inlier columns, then the int8 codes (outlier columns
     written as 0, as the reference zeroes them) and the row absmax.

With the threshold at 0 the first pass is skipped. For small M the matmul module does all of this inside the
weight-streaming GEMM instead (every row sits in one program there, so the column test needs no second pass).

Numerics match quantizer_plugin.formats.int8.quantize_rows code for code: the scale is computed as torch computes
`127.0 / absmax` (a correctly rounded reciprocal, div_rn, times 127) and the codes round half to even, as
torch.round does. The rounding is built from floor
because libdevice.rint does not run in the interpreter; kernels using it are launched with
enable_fp_fusion=False, since a fused multiply-add would round x * scale differently from torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_configs import outlier_scan_tile, row_quantize_tile

INT8_MAX = 127.0


@triton.jit
def round_half_even(v):
    """torch.round on float32: nearest integer, ties to even."""
    down = tl.floor(v)
    frac = v - down
    half_down = down * 0.5
    down_is_odd = half_down != tl.floor(half_down)
    round_up = (frac > 0.5) | ((frac == 0.5) & down_is_odd)
    return tl.where(round_up, down + 1.0, down)


@triton.jit
def quantize_to_int8(values, scale):
    """int8 codes of float32 `values` times their per-row `scale` (127 / row absmax), clamped to +-127."""
    codes = round_half_even(values * scale[:, None])
    return tl.minimum(tl.maximum(codes, -127.0), 127.0).to(tl.int8)


@triton.jit
def int8_scale(absmax):
    """127 / absmax as torch evaluates `127.0 / absmax` (reciprocal, then times 127); 0 for an all-zero row."""
    safe = tl.where(absmax > 0.0, absmax, 1.0)
    reciprocal = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), safe)
    return tl.where(absmax > 0.0, reciprocal * 127.0, 0.0)


@triton.jit
def _outlier_scan_kernel(
    x_ptr, flags_ptr, M, K, stride_xm, threshold,
    ROWS_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_in = cols < K
    first_row = tl.program_id(1) * ROWS_PER_PROGRAM
    hit = tl.zeros([BLOCK_K], dtype=tl.int32)
    for r in tl.static_range(0, ROWS_PER_PROGRAM, BLOCK_M):
        rows = first_row + r + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_in[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        hit = tl.maximum(hit, tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0))
    # Only flagged columns touch global memory: most chunks of most columns issue no atomic at all.
    tl.atomic_max(flags_ptr + cols, hit, mask=col_in & (hit > 0))


@triton.jit
def _row_quantize_kernel(
    x_ptr, flags_ptr, codes_ptr, absmax_ptr, M, K, stride_xm, stride_cm,
    HAS_OUTLIERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < M
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        inlier = cols < K
        if HAS_OUTLIERS:
            inlier = inlier & (tl.load(flags_ptr + cols, mask=cols < K, other=0) == 0)
        mask = row_in[:, None] & inlier[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = int8_scale(absmax)
    # The second read of the row block comes mostly from L1/L2: a row of x is at most a few tens of KB.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        inlier = cols < K
        if HAS_OUTLIERS:
            inlier = inlier & (tl.load(flags_ptr + cols, mask=cols < K, other=0) == 0)
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_in[:, None] & inlier[None, :], other=0.0
        ).to(tl.float32)
        tl.store(
            codes_ptr + rows[:, None] * stride_cm + cols[None, :], quantize_to_int8(x, scale),
            mask=row_in[:, None] & (cols < K)[None, :],
        )  # fmt: skip
    tl.store(absmax_ptr + rows, absmax, mask=row_in)


def outlier_column_flags(x2d: torch.Tensor, threshold: float) -> torch.Tensor:
    """int32 (K,) mask, nonzero where any |x| in the column is >= threshold; stays on the device (no sync)."""
    m, k = x2d.shape
    flags = torch.zeros(k, dtype=torch.int32, device=x2d.device)
    tile = outlier_scan_tile()
    grid = (triton.cdiv(k, tile["BLOCK_K"]), triton.cdiv(m, tile["ROWS_PER_PROGRAM"]))
    _outlier_scan_kernel[grid](x2d, flags, m, k, x2d.stride(0), float(threshold), **tile)
    return flags


def quantize_activations(
    x2d: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes (M, K), float32 row absmax (M,), int32 outlier flags (K,) or None when threshold is 0).

    `x2d` is (M, K) in the compute dtype, contiguous along K.
    """
    if x2d.dim() != 2 or x2d.stride(1) != 1:
        raise ValueError(f"activations must be a 2-D tensor contiguous along features, got shape "
                         f"{tuple(x2d.shape)} strides {x2d.stride()}")  # fmt: skip
    m, k = x2d.shape
    flags = outlier_column_flags(x2d, threshold) if threshold > 0 else None
    codes = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    absmax = torch.empty(m, dtype=torch.float32, device=x2d.device)
    tile = row_quantize_tile()
    _row_quantize_kernel[(triton.cdiv(m, tile["BLOCK_M"]),)](
        x2d, flags if flags is not None else codes, codes, absmax, m, k, x2d.stride(0), codes.stride(0),
        HAS_OUTLIERS=flags is not None, enable_fp_fusion=False, **tile,
    )  # fmt: skip
    return codes, absmax, flags
