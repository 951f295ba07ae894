"""Input gradient through a frozen LLM.int8 weight: grad_x = grad_y @ dequant(W), for LoRA training on an int8 base.

Output tiles over (M, K), reduction over N. Each int8 weight tile [BLOCK_N, BLOCK_K] is dequantized in registers
exactly as the format's dequantize does it (code * (row absmax / 127) in float32, rounded to the compute dtype),
then fed to tl.dot against grad_y in the compute dtype with a float32 accumulator; the 16-bit weight is never
written to memory. No activation quantization is involved: the backward of LLM.int8 is an ordinary matmul
with the dequantized weight, as in bitsandbytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantizer_plugin.ops import served

from .int8_configs import grad_input_configs, m_bucket
from .interpreter import INTERPRETED, cast_rounded, dot_16bit
from .int8_matmul import DOT_PRECISION, check_32bit_offsets
from .tile_order import grouped_tile


@triton.autotune(configs=grad_input_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _grad_input_kernel(
    g_ptr, w_ptr, w_absmax_ptr, gx_ptr, M, N, K, M_BUCKET, stride_gm, stride_wn, stride_gxm,
    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_in = rows < M
    k_in = ks < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_in = ns < N
        g = tl.load(g_ptr + rows[:, None] * stride_gm + ns[None, :], mask=row_in[:, None] & n_in[None, :], other=0.0)
        codes = tl.load(w_ptr + ns[:, None] * stride_wn + ks[None, :], mask=n_in[:, None] & k_in[None, :], other=0)
        step = tl.math.div_rn(tl.load(w_absmax_ptr + ns, mask=n_in, other=0.0), tl.full([BLOCK_N], 127.0, tl.float32))
        weight = cast_rounded(codes.to(tl.float32) * step[:, None], g.dtype, INTERPRETED)
        acc = dot_16bit(g, weight, acc, PRECISION, INTERPRETED)
    mask = row_in[:, None] & k_in[None, :]
    tl.store(gx_ptr + rows[:, None] * stride_gxm + ks[None, :], cast_rounded(acc, gx_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def int8_grad_input(grad_y2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """grad_x = grad_y2d @ dequant(weight), in grad_y2d's dtype (the compute dtype).

    grad_y2d (M, N) float16/bfloat16/float32, contiguous along N; weight int8 (N, K); weight_scale float32 (N,).
    """
    if grad_y2d.dim() != 2 or grad_y2d.stride(-1) != 1:
        raise ValueError(f"grad_y must be 2-D and contiguous along out_features, got shape "
                         f"{tuple(grad_y2d.shape)} strides {grad_y2d.stride()}")  # fmt: skip
    if grad_y2d.dtype not in DOT_PRECISION:
        raise TypeError(f"grad_y must be float16, bfloat16 or float32 (the compute dtype), got {grad_y2d.dtype}")
    m, n = grad_y2d.shape
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[0] != n or weight.stride(-1) != 1:
        raise ValueError(f"weight must be int8 ({n}, in_features) contiguous along in_features, got "
                         f"{weight.dtype} {tuple(weight.shape)} strides {weight.stride()}")  # fmt: skip
    if weight_scale.dtype != torch.float32 or tuple(weight_scale.shape) != (n,):
        raise ValueError(f"weight_scale must be float32 ({n},), got {weight_scale.dtype} {tuple(weight_scale.shape)}")
    k = weight.shape[1]
    check_32bit_offsets(grad_y=m * n, weight=n * k, grad_x=m * k)
    grad_x = torch.empty((m, k), dtype=grad_y2d.dtype, device=grad_y2d.device)
    if m == 0 or k == 0:
        return grad_x
    if n == 0:
        return grad_x.zero_()
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    _grad_input_kernel[grid](
        grad_y2d, weight, weight_scale, grad_x, m, n, k, m_bucket(m), grad_y2d.stride(0), weight.stride(0),
        grad_x.stride(0), PRECISION=DOT_PRECISION[grad_y2d.dtype], INTERPRETED=INTERPRETED,
    )  # fmt: skip
    served("triton.int8.grad_input")
    return grad_x
