"""LLM.int8 activation side: find the outlier columns of x and quantize the rest of each row to int8, as
bitsandbytes' int8_vectorwise_quant does it, in one pass over x.

An entry with |x| >= threshold is an outlier and its column an outlier column. Each row's absmax is taken over its
entries below the threshold (the other entries of an outlier column count, as in bitsandbytes), so a row block
needs nothing from the other rows: `_quantize_rows_kernel` reads its rows once (then again from cache), writes
their codes and absmax, and flags the outlier columns it meets with atomic_max into an int32 mask, in one launch
and with no host synchronisation. With the threshold at 0 nothing is flagged. For small M the matmul module does
all of this inside the weight-streaming GEMM instead (every row sits in one program there).

Numerics match quantizer_plugin.formats.int8 code for code: the scale is computed as torch computes
`127.0 / absmax` (a correctly rounded reciprocal, div_rn, times 127) and the codes round half to even, as
torch.round does. The rounding is built from floor because libdevice.rint does not run in the interpreter; kernels
using it are launched with enable_fp_fusion=False, since a fused multiply-add would round x * scale differently
from torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .int8_configs import row_quantize_tile

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
def _quantize_rows_kernel(
    x_ptr, flags_ptr, codes_ptr, absmax_ptr, M, K, stride_xm, stride_cm, threshold,
    HAS_THRESHOLD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_M] of x: absmax over the entries below the threshold, codes with the outlier entries at 0, and
    the columns holding an outlier flagged (atomic_max into `flags`)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < M
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=row_in[:, None] & (cols < K)[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
        if HAS_THRESHOLD:
            outlier = tl.abs(x) >= threshold
            hit = tl.max(outlier.to(tl.int32), axis=0)
            # Only flagged columns touch the flags: most tiles of most rows issue no atomic at all.
            tl.atomic_max(flags_ptr + cols, hit, mask=(cols < K) & (hit > 0))
            x = tl.where(outlier, 0.0, x)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = int8_scale(absmax)
    # The second read of the row block comes mostly from L1/L2: a row of x is at most a few tens of KB.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_in[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_THRESHOLD:
            x = tl.where(tl.abs(x) >= threshold, 0.0, x)
        tl.store(codes_ptr + rows[:, None] * stride_cm + cols[None, :], quantize_to_int8(x, scale), mask=mask)
    tl.store(absmax_ptr + rows, absmax, mask=row_in)


def quantize_activations(
    x2d: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(int8 codes (M, K), float32 row absmax (M,), int32 outlier column flags (K,) or None when threshold is 0),
    in one pass over x and one launch, with no host synchronisation.

    `x2d` is (M, K) in the compute dtype, contiguous along K. The absmax and the flags are bitsandbytes'
    (quantizer_plugin.formats.int8.quantize_activations). The codes are too except in the flagged columns, which
    only the whole pass can tell: there a code is that of an entry below the threshold, or 0. The matmul cancels
    them exactly (int8_matmul), so x is never read a second time to zero them.
    """
    if x2d.dim() != 2 or x2d.stride(1) != 1:
        raise ValueError(f"activations must be a 2-D tensor contiguous along features, got shape "
                         f"{tuple(x2d.shape)} strides {x2d.stride()}")  # fmt: skip
    m, k = x2d.shape
    flags = torch.zeros(k, dtype=torch.int32, device=x2d.device) if threshold > 0 else None
    codes = torch.empty((m, k), dtype=torch.int8, device=x2d.device)
    absmax = torch.empty(m, dtype=torch.float32, device=x2d.device)
    tile = row_quantize_tile()
    _quantize_rows_kernel[(triton.cdiv(m, tile["BLOCK_M"]),)](
        x2d, flags if flags is not None else codes, codes, absmax, m, k, x2d.stride(0), codes.stride(0),
        float(threshold), HAS_THRESHOLD=flags is not None, enable_fp_fusion=False, **tile,
    )  # fmt: skip
    return codes, absmax, flags
