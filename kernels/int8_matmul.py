"""LLM.int8 mixed-precision matmul: y = int8(x_inliers) @ int8(W).T, rescaled, + x_outliers @ dequant(W).T + bias.

Both parts land in one output tile, so there is no host synchronisation to learn the outlier count (bitsandbytes
pays one to gather the outlier columns). The int8 x int8 product accumulates exactly in int32 on the tensor cores
(tl.dot on int8); the row absmax of x / 127 turns it into a float32 tile. The outlier columns come from a
device-side column mask, in a second sweep over K: a K-tile whose mask is all zero skips the 16-bit product, so
with a few outlier columns only a few K-tiles pay for it. In a K-tile that has outliers, the int8 weight tile is
converted to 16 bits (exact: |code| <= 127) and multiplied by the outlier columns of x, read in 16 bits, into the
same float32 tile; W's row absmax / 127 scales the sum last.

Two kernels:
- `_tiled_kernel` (M > STREAMING_MAX_M): output tiles over (M, N) in grouped order, fed by the one-pass
  activation kernel of int8_activation (int8 codes, row absmax, column mask); the codes it leaves in flagged
  columns are cancelled exactly in int32 before the scales apply;
- `_streaming_kernel` (decode): all rows sit in one program, so each program finds the outlier columns and the
  row absmax itself (a first sweep over x, which is small and shared through L2), then streams its
  BLOCK_N rows of the int8 weight once along K (or along its slice of K, with split-K). One launch, and the weight
  is read exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantizer_plugin.ops import served

from .int8_activation import int8_scale, quantize_activations, quantize_to_int8
from .int8_configs import m_bucket, streaming_configs, tiled_configs
from .interpreter import INTERPRETED, cast_rounded, dot_16bit
from . import split_k
from .split_k import k_slice, reduce_splits
from .tile_order import grouped_tile

# Up to this many rows the streaming kernel holds every row in one program. Each of its programs repeats the
# activation quantization, which grows with M while the weight traffic it saves does not.
STREAMING_MAX_M = 16
# The largest M the streaming kernel accepts when asked for explicitly (its row tile is next_power_of_2(M)).
STREAMING_LIMIT_M = 64
# The kernels index with 32-bit offsets.
MAX_ELEMENTS = 2**31 - 1
DOT_PRECISION = {torch.float16: "tf32", torch.bfloat16: "tf32", torch.float32: "ieee"}  # tf32 is moot for 16-bit


@triton.jit
def _load_rows(x_ptr, rows, ks, M, K, stride_xm):
    return tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _weight_codes_t(w_ptr, cols, ks, N, K, stride_wn):
    """The int8 codes W[cols, ks] as a [len(ks), len(cols)] tile (tl.dot's right operand), 0 outside W."""
    return tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=(ks < K)[:, None] & (cols < N)[None, :], other=0)


@triton.jit
def _outlier_mask(x, threshold):
    """Per column of the (all rows) tile x: whether any |x| reaches the threshold."""
    return tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0) > 0


@triton.jit
def _cancel_outlier_codes(
    acc, codes_ptr, flags_ptr, w_ptr, rows, cols, M, N, K, stride_cm, stride_wn, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """acc minus the int8 products of the flagged columns' codes, exactly (int32): as if those codes were 0.

    The one-pass activation kernel cannot zero them (a column is flagged by any row), and the outlier columns are
    multiplied in 16 bits instead. Only the K tiles that hold a flagged column are visited.
    """
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        flagged = tl.load(flags_ptr + ks, mask=k_in, other=0) != 0
        if tl.max(flagged.to(tl.int32), axis=0) > 0:
            a = tl.load(codes_ptr + rows[:, None] * stride_cm + ks[None, :], mask=(rows < M)[:, None] & flagged[None, :], other=0)
            w_t = _weight_codes_t(w_ptr, cols, ks, N, K, stride_wn)
            acc = tl.dot(-a, w_t, acc, out_dtype=tl.int32)  # codes lie in [-127, 127], so their negation is exact in int8
    return acc


@triton.jit
def _add_outlier_products(
    y, x_ptr, flags_ptr, w_ptr, rows, cols, M, N, K, k_start, k_end, stride_xm, stride_wn, threshold,
    FLAGGED: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):  # fmt: skip
    """y + x[rows, outlier columns] @ codes(W)[cols, outlier columns].T, in float32, over the K tiles of
    [k_start, k_end) that hold an outlier column; the int8 codes are exact in 16 bits.

    The outlier columns come from the activation pass's flags (FLAGGED), or from |x| >= threshold in any row (the
    streaming kernel holds every row). A separate sweep after the int8 one, rather than a second accumulator in it,
    keeps one accumulator tile live at a time, which leaves the registers to larger tiles; it re-reads only the
    weight tiles that meet an outlier column, a few of them at realistic outlier rates.
    """
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        if FLAGGED:
            outlier = tl.load(flags_ptr + ks, mask=k_in, other=0) != 0
        else:
            outlier = _outlier_mask(_load_rows(x_ptr, rows, ks, M, K, stride_xm).to(tl.float32), threshold)
        if tl.max(outlier.to(tl.int32), axis=0) > 0:
            x_out = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows < M)[:, None] & outlier[None, :], other=0.0)
            w_t = _weight_codes_t(w_ptr, cols, ks, N, K, stride_wn)
            y = dot_16bit(x_out, w_t, y, PRECISION, INTERPRETED)
    return y


@triton.jit
def _weight_step(cols, N, w_absmax_ptr):
    """float32 W row absmax / 127 of output columns `cols`: the per-column factor of the epilogue."""
    return tl.load(w_absmax_ptr + cols, mask=cols < N, other=0.0) * (1.0 / 127.0)


@triton.jit
def _store_output(y, mask, rows, cols, N, bias_ptr, y_ptr, stride_ym, HAS_BIAS: tl.constexpr, INTERPRETED: tl.constexpr):
    """y (+ bias) stored in y's dtype where `mask` holds."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], cast_rounded(y, y_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.autotune(configs=tiled_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _tiled_kernel(
    codes_ptr, x_absmax_ptr, x_ptr, flags_ptr, w_ptr, w_absmax_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET, stride_cm, stride_xm, stride_wn, stride_ym,
    HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < M
    col_in = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_in = ks < K
        a = tl.load(codes_ptr + rows[:, None] * stride_cm + ks[None, :], mask=row_in[:, None] & k_in[None, :], other=0)
        w_t = _weight_codes_t(w_ptr, cols, ks, N, K, stride_wn)
        acc = tl.dot(a, w_t, acc, out_dtype=tl.int32)
    if HAS_OUTLIERS:
        acc = _cancel_outlier_codes(acc, codes_ptr, flags_ptr, w_ptr, rows, cols, M, N, K, stride_cm, stride_wn, BLOCK_K)
    y = acc.to(tl.float32) * (tl.load(x_absmax_ptr + rows, mask=row_in, other=0.0) * (1.0 / 127.0))[:, None]
    if HAS_OUTLIERS:
        y = _add_outlier_products(y, x_ptr, flags_ptr, w_ptr, rows, cols, M, N, K, 0, K, stride_xm, stride_wn, 0.0,
                                  True, BLOCK_K, PRECISION, INTERPRETED)  # fmt: skip
    y *= _weight_step(cols, N, w_absmax_ptr)[None, :]
    _store_output(y, row_in[:, None] & col_in[None, :], rows, cols, N, bias_ptr, y_ptr, stride_ym, HAS_BIAS, INTERPRETED)


@triton.autotune(configs=streaming_configs(), key=["BLOCK_M", "N", "K"])
@triton.jit
def _streaming_kernel(
    x_ptr, w_ptr, w_absmax_ptr, bias_ptr, y_ptr, workspace_ptr, counter_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, threshold,
    HAS_THRESHOLD: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    # Program (tile, split) multiplies split `split` of K for output columns `tile` (split_k.py); the row absmax
    # needs all of K, so sweep 1 always covers it.
    tile = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)  # every row of x
    cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < N

    # Sweep 1 over x: the absmax of each row over its entries below the threshold (as bitsandbytes takes it).
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _load_rows(x_ptr, rows, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm).to(tl.float32)
        if HAS_THRESHOLD:
            x = tl.where(tl.abs(x) >= threshold, 0.0, x)
        absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
    scale = int8_scale(absmax)

    # Sweep 2: quantize x in registers and stream the weight tiles; sweep 3 adds the outlier columns' products.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    k_start, k_end = k_slice(K, tl.program_id(1), SPLIT_K, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _load_rows(x_ptr, rows, ks, M, K, stride_xm).to(tl.float32)
        w_t = _weight_codes_t(w_ptr, cols, ks, N, K, stride_wn)
        if HAS_THRESHOLD:
            # All rows are here, so a column's outlier test is a reduction inside the tile: its codes are 0.
            x = tl.where(_outlier_mask(x, threshold)[None, :], 0.0, x)
        acc = tl.dot(quantize_to_int8(x, scale), w_t, acc, out_dtype=tl.int32)
    y = acc.to(tl.float32) * (absmax * (1.0 / 127.0))[:, None]
    if HAS_THRESHOLD:
        y = _add_outlier_products(y, x_ptr, x_ptr, w_ptr, rows, cols, M, N, K, k_start, k_end, stride_xm, stride_wn,
                                  threshold, False, BLOCK_K, PRECISION, INTERPRETED)  # fmt: skip
    y *= _weight_step(cols, N, w_absmax_ptr)[None, :]
    mask = (rows < M)[:, None] & col_in[None, :]
    y, mask = reduce_splits(y, mask, tile, tl.program_id(1), rows[:, None] * N + cols[None, :], M, N, workspace_ptr,
                            counter_ptr, SPLIT_K)  # fmt: skip
    _store_output(y, mask, rows, cols, N, bias_ptr, y_ptr, stride_ym, HAS_BIAS, INTERPRETED)


def check_32bit_offsets(**sizes: int) -> None:
    for name, size in sizes.items():
        if size > MAX_ELEMENTS:
            raise ValueError(f"{name} would hold {size} elements; the int8 kernels index with 32-bit offsets "
                             f"(at most {MAX_ELEMENTS})")  # fmt: skip


def _check_operands(x2d, weight, weight_scale, bias) -> None:
    if x2d.dim() != 2 or x2d.stride(-1) != 1:
        raise ValueError(f"x must be 2-D and contiguous along features, got shape {tuple(x2d.shape)} strides {x2d.stride()}")
    if x2d.dtype not in DOT_PRECISION:
        raise TypeError(f"x must be float16, bfloat16 or float32 (the compute dtype), got {x2d.dtype}")
    n, k = weight.shape if weight.dim() == 2 else (None, None)
    if weight.dtype != torch.int8 or k != x2d.shape[1] or weight.stride(-1) != 1:
        raise ValueError(f"weight must be int8 (out_features, {x2d.shape[1]}) contiguous along in_features, got "
                         f"{weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")  # fmt: skip
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (n,):
        raise ValueError(f"weight_scale must be float32 ({n},), got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous ({n},) tensor, got {tuple(bias.shape)}")
    devices = {t.device for t in (x2d, weight, weight_scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, weight, weight_scale and bias must share one device, got {sorted(map(str, devices))}")


def int8_linear(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    path: str | None = None,
    check_operands: bool = True,
) -> torch.Tensor:
    """LLM.int8 y = x2d @ dequant(weight).T + bias, in x2d's dtype (the compute dtype).

    x2d (M, K) float16/bfloat16/float32; weight int8 (N, K); weight_scale float32 (N,) row absmax; columns of x2d
    with any |x| >= threshold are multiplied in x2d's dtype (threshold 0: none). `path` forces "streaming" or
    "tiled" (tests); by default M <= STREAMING_MAX_M streams. `check_operands=False` (LowBitLinear, whose tensors
    were checked against the format's spec on load and whose x the caller prepared) checks only the sizes and that
    the weight is on x's device: a decode step is a few microseconds of GPU time, the full checks about as long.
    """
    if check_operands:
        _check_operands(x2d, weight, weight_scale, bias)
    elif weight.device != x2d.device:
        raise ValueError(f"weight is on {weight.device}, x on {x2d.device}")
    m, k = x2d.shape
    n = weight.shape[0]
    check_32bit_offsets(x=m * k, weight=n * k, output=m * n)
    path = path or ("streaming" if m <= STREAMING_MAX_M else "tiled")
    if path not in ("streaming", "tiled"):
        raise ValueError(f"path must be 'streaming' or 'tiled', got {path!r}")
    if path == "streaming" and m > STREAMING_LIMIT_M:
        raise ValueError(f"the streaming path holds at most {STREAMING_LIMIT_M} rows, got M={m}")
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0 or n == 0:
        return y
    bias_arg = bias if bias is not None else weight_scale  # never read when HAS_BIAS is False
    precision = DOT_PRECISION[x2d.dtype]
    if path == "streaming":
        block_m = max(16, triton.next_power_of_2(m))
        work, arrivals = split_k.buffers([c.kwargs for c in _streaming_kernel.configs], m, n, x2d.device, block_m)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
        _streaming_kernel[grid](
            x2d, weight, weight_scale, bias_arg, y, work, arrivals, m, n, k, x2d.stride(0), weight.stride(0), y.stride(0),
            float(threshold), HAS_THRESHOLD=threshold > 0, HAS_BIAS=bias is not None, PRECISION=precision,
            INTERPRETED=INTERPRETED, BLOCK_M=block_m, enable_fp_fusion=False,
        )  # fmt: skip
        served("triton.int8.streaming")
        return y
    codes, x_absmax, flags = quantize_activations(x2d, threshold)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _tiled_kernel[grid](
        codes, x_absmax, x2d, flags if flags is not None else codes, weight, weight_scale, bias_arg, y,
        m, n, k, m_bucket(m), codes.stride(0), x2d.stride(0), weight.stride(0), y.stride(0),
        HAS_OUTLIERS=flags is not None, HAS_BIAS=bias is not None, PRECISION=precision, INTERPRETED=INTERPRETED,
    )  # fmt: skip
    served("triton.int8.tiled")
    return y
