"""Per-group affine integers (int4, int3, int2: the affine family, formats/records.py) on the CPU backend.

- Decode (at most GEMV_MAX_M activation rows, more in a 16-bit compute dtype on CPUs without AMX:
  chunks.fused_rows; K a multiple of the group and the group of 64 or more): the native
  fused kernel reads the packed codes once and multiplies the codes themselves (small integers, exact in bfloat16
  and float32); each group's sum is then scaled, and the zero points' share (s * z times the group's sum of
  activations) taken off. bfloat16 compute on CPUs with AVX512-BF16 multiplies bfloat16 activations by pairs
  (vdpbf16ps); otherwise float32. The weight is never rounded to the compute dtype here, so the result is at least
  as close to the exact product as the reference's; it is then rounded to the compute dtype, as the reference's is.
- More rows (up to chunks.TILES_MAX_M) with a bfloat16 compute dtype on CPUs with AMX (K a multiple of the group
  and of 128, the group of 64 or more): the tile kernel (csrc/amx.h) writes the weight in bfloat16, bit for bit the
  reference's, a chunk of 64 rows at a time into L1, through a table of each group's (i - z) * s, and the tile unit
  multiplies it there.
- Anything else: the native dequantize writes row chunks in the compute dtype, bit for bit the reference's weight,
  and torch's GEMM multiplies each chunk while it is in L2 (chunks.py); the input gradient (LoRA) takes the same
  chunks.
With activations="q8_0" (formats/activations.py; int4 and int2, int3 has no such mode), every batch on CPUs with AVX2
takes the integer kernel: the activations rounded to int8 in blocks of 32, the codes multiplied as bytes with
vpmaddubsw into exact int32 sums, or with AVX512-VNNI's vpdpbusd 64 at a time (K a multiple of 64 bytes of a row,
groups that hold whole 64-byte steps or at most 4 of them in one).
Decode on CPUs with AVX2 only takes the float32 fused kernel, 8 lanes wide; without AVX2 every batch size takes the
native chunks (plain C++ dequantize, torch's GEMM); without the native build the plain-torch reference runs.
"""

from __future__ import annotations

import torch

from ..formats.activations import Q8Activations
from ..formats.records import AffineWeight
from ..ops import reference_backward, reference_forward, register_kernel, served
from . import chunks, library, native

GEMV_MAX_M = 6  # as for the 4-bit codebooks: past this, the chunks' GEMM is faster where it has 16-bit hardware
FUSED_STEP = 64  # columns a fused kernel step reads: the group must be a multiple of it


def fused_kernel(kernels, m: int, weight: AffineWeight, compute_dtype: torch.dtype) -> str | None:
    """Which fused decode kernel serves `m` activation rows: "fused_bf16", "fused" or None (chunks)."""
    block, k = weight.block_size, weight.in_features
    if m > chunks.fused_rows(kernels, GEMV_MAX_M, compute_dtype) or k % block or block % FUSED_STEP or not kernels.uses_avx2():
        return None
    return "fused_bf16" if compute_dtype == torch.bfloat16 and kernels.uses_avx512_bf16() else "fused"


def uses_tiles(kernels, m: int, weight: AffineWeight, compute_dtype: torch.dtype) -> bool:
    """Whether a batch of `m` rows past decode runs on the AMX tiles: at most chunks.TILES_MAX_M rows, bfloat16
    compute, K a multiple of the group and of 128, the group of 64 or more, and AMX on this CPU."""
    block, k = weight.block_size, weight.in_features
    bf16 = compute_dtype == torch.bfloat16
    return (bf16 and m <= chunks.TILES_MAX_M and block % 64 == 0 and k % block == 0 and k % 128 == 0
            and kernels.uses_amx_bf16())  # fmt: skip


def weight_arguments(weight: AffineWeight) -> tuple:
    """The native kernels' weight arguments (library.AFFINE_WEIGHT)."""
    return weight.packed, weight.scale, weight.zero, weight.bits, weight.block_size


@register_kernel(AffineWeight.family, "cpu")
def linear_forward(x: torch.Tensor, weight: AffineWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                   activations=None) -> torch.Tensor:  # fmt: skip
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, weight, bias, compute_dtype)
    n, k, dtype = weight.out_features, weight.in_features, compute_dtype
    x2d = x.reshape(-1, k)
    kernel = fused_kernel(kernels, x2d.shape[0], weight, dtype)
    if kernel == "fused_bf16":
        y = library.call(kernels, "gemv_affine_bf16", x2d.to(torch.bfloat16).contiguous(), *weight_arguments(weight))
    elif kernel == "fused":
        y = library.call(kernels, "gemv_affine", x2d.to(dtype).float().contiguous(), *weight_arguments(weight))
    elif uses_tiles(kernels, x2d.shape[0], weight, dtype):
        kernel = "tiles"
        y = library.call(kernels, "linear_affine_tiles", x2d.to(dtype), *weight_arguments(weight))
    else:
        kernel = "dequantize_matmul"
        rows = chunks.rows_per_chunk(k, dtype)
        y = library.call(kernels, "linear_affine_chunked", x2d.to(dtype).contiguous(), *weight_arguments(weight), rows)
    if bias is not None:
        y = y + bias.to(y.dtype)
    served(f"cpu.affine.{kernel}")
    return y.to(dtype).to(x.dtype).reshape(*x.shape[:-1], n)


@register_kernel(AffineWeight.family, "cpu", activations=Q8Activations.mode)
def linear_forward_q8(x: torch.Tensor, weight: AffineWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                      activations: Q8Activations) -> torch.Tensor:  # fmt: skip
    """activations="q8_0": every batch through the native integer kernel on CPUs with AVX2, for groups of 32 or more
    that tile the rows; the mode's reference otherwise."""
    kernels = native.load()
    n, k, block = weight.out_features, weight.in_features, weight.block_size
    if kernels is None or not kernels.uses_avx2() or k % block or block % activations.block:
        return reference_forward(x, weight, bias, compute_dtype, activations)
    x2d = x.reshape(-1, k).to(compute_dtype).float().contiguous()
    y = library.call(kernels, "gemv_affine_q8", x2d, *weight_arguments(weight))
    if bias is not None:
        y += bias.float()
    # the native kernel takes its AVX512-VNNI loop on this condition (csrc q8_0_vnni_takes_affine)
    span = 64 * 8 // weight.bits
    fits = block % span == 0 or (span % block == 0 and span // block <= 4)
    vnni = kernels.uses_avx512_vnni() and k % span == 0 and fits
    served("cpu.affine.q8_0_vnni" if vnni else "cpu.affine.q8_0")
    return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], n)


@library.grad_input_op("grad_input_affine", library.AFFINE_WEIGHT)
def grad_input(g2d, packed, scale, zero, bits: int, block: int, k: int) -> torch.Tensor:
    """g2d (M, N) @ dequant(W) in float32, W's rows dequantized by the native kernel in chunks."""
    kernels = native.load()

    def rows(first: int, last: int, out: torch.Tensor) -> None:
        kernels.dequantize_affine(packed, scale, zero, bits, block, first, last, out.view(last - first, k))

    grad_x = chunks.grad_input(g2d, g2d.shape[1], k, rows)
    served("cpu.affine.grad_input")
    return grad_x


@register_kernel(AffineWeight.family, "cpu", backward=True)
def linear_grad_input(grad_y: torch.Tensor, weight: AffineWeight, compute_dtype: torch.dtype) -> torch.Tensor:
    if native.load() is None:
        return reference_backward(grad_y, weight, compute_dtype)
    g2d = grad_y.reshape(-1, weight.out_features).to(compute_dtype)
    grad_x = grad_input(g2d, *weight_arguments(weight), weight.in_features)
    return grad_x.to(compute_dtype).to(grad_y.dtype).reshape(*grad_y.shape[:-1], weight.in_features)
