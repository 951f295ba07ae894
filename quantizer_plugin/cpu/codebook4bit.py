"""4-bit codebooks (NF4, FP4, any 16-value code: the codebook4bit family) on the CPU backend.

- Decode (at most GEMV_MAX_M activation rows, K a multiple of the block, blocks of 32 or more; more in a 16-bit
  compute dtype on CPUs without AMX, chunks.fused_rows): the native fused kernel reads the packed codes once per
  call (csrc/simd.h's row tiles), looks each one up in the codebook in registers, and multiplies (the 16-bit weight is
  never written): for a bfloat16 compute dtype on CPUs with AVX512-BF16, bfloat16 codes and activations in
  vdpbf16ps pairs; with AVX2 alone, the bfloat16 codes looked up with vpshufb and multiplied in float32; otherwise
  in float32. Its output is then rounded to the compute dtype, as the reference's is.
- More rows (up to chunks.TILES_MAX_M) with a bfloat16 compute dtype on CPUs with AMX (K a multiple of the block and
  of 128, blocks of 64 or more): the tile kernel (csrc/amx.h) writes the weight in bfloat16, bit for bit the
  reference's, a chunk of 64 rows at a time into L1, and the tile unit multiplies it there (the activations packed in
  the order it writes them).
- Anything else (float16/float32, no AMX, blocks that straddle rows): the native dequantize writes the weight's
  rows in chunks of about chunks.CHUNK_BYTES in the compute dtype, bit for bit the reference's dequantized weight,
  and torch's GEMM multiplies each chunk while it is still in L2. The input gradient (QLoRA) takes the same chunks.
  When K is a multiple of 32 the chunks are written group-permuted (each 32 columns as their 16 even, then 16 odd
  ones: no interleaving shuffle), and the activations' columns are permuted the same way, which leaves the product
  as it is.
With activations="q8_0" (formats/activations.py), every batch on CPUs with AVX2 takes the integer kernel: the activations
rounded to int8 in blocks of 32, the codebook to int8 steps, bytes multiplied with vpmaddubsw into exact int32 sums, or
with AVX512-VNNI's vpdpbusd 64 at a time (blocks of 64 or more, K a multiple of 128).
Loading quantizes each weight with the native quantizer (the format's own codes and absmax, one pass). If the native
kernels cannot be built, everything runs the plain-torch reference (native.py warns once).
"""

from __future__ import annotations

import torch

from ..formats import QuantScheme
from ..formats.activations import Q8Activations
from ..formats.base import NonFiniteWeightError
from ..formats.codebook4bit import Codebook4BitFormat
from ..formats.records import CodebookWeight
from ..ops import reference_backward, reference_forward, reference_quantize, register_kernel, served
from . import chunks, library, native

GEMV_MAX_M = 6


def weight_arguments(weight: CodebookWeight) -> tuple:
    """The native kernels' weight arguments (library.CODEBOOK_WEIGHT): the record's fields, None where not stored."""
    return (weight.packed, weight.absmax, weight.absmax_code, weight.absmax_scale, weight.absmax_offset,
            weight.dynamic_code, weight.code)  # fmt: skip


def fused_kernel(kernels, m: int, weight: CodebookWeight, compute_dtype: torch.dtype) -> str | None:
    """Which fused decode kernel serves `m` activation rows: "fused_bf16", "fused" or None (chunks)."""
    block, k = weight.block_size, weight.in_features
    if m > chunks.fused_rows(kernels, GEMV_MAX_M, compute_dtype) or k % block or block % 32:
        return None
    # bfloat16 compute: the codebook rounded to bfloat16, as the reference's bfloat16 weights are; vdpbf16ps with
    # AVX512-BF16, and with AVX2 alone vpshufb lookups (4x fewer shuffles per weight than AVX2's float32 lookups)
    bf16_lookups = kernels.uses_avx512_bf16() or (kernels.uses_avx2() and not kernels.uses_avx512())
    if compute_dtype == torch.bfloat16 and block % 64 == 0 and bf16_lookups:
        return "fused_bf16"
    return "fused"


def uses_tiles(kernels, m: int, weight: CodebookWeight, compute_dtype: torch.dtype) -> bool:
    """Whether a batch of `m` rows past decode runs on the AMX tiles (csrc/amx.h): at most chunks.TILES_MAX_M rows,
    bfloat16 compute, K a multiple of the block and of 128, the block of 64 or more, and AMX on this CPU."""
    block, k = weight.block_size, weight.in_features
    bf16 = compute_dtype == torch.bfloat16
    return (bf16 and m <= chunks.TILES_MAX_M and block % 64 == 0 and k % block == 0 and k % 128 == 0
            and kernels.uses_amx_bf16())  # fmt: skip


def grouped_columns(kernels, weight: CodebookWeight) -> bool:
    return weight.in_features % 32 == 0 and kernels.uses_avx512()


def group_permuted_columns(t: torch.Tensor) -> torch.Tensor:
    """Each 32 columns as their 16 even columns, then their 16 odd ones (the grouped weight chunks' order)."""
    return t.unflatten(-1, (-1, 16, 2)).transpose(-1, -2).flatten(-3)


def ungroup_columns(t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (-1, 2, 16)).transpose(-1, -2).flatten(-3)


@register_kernel(CodebookWeight.family, "cpu")
def linear_forward(x: torch.Tensor, weight: CodebookWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                   activations=None) -> torch.Tensor:  # fmt: skip
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, weight, bias, compute_dtype)
    n, k, block = weight.out_features, weight.in_features, weight.block_size
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    fused = fused_kernel(kernels, m, weight, compute_dtype)
    if fused is not None:
        gemv, x_dtype = ("gemv_4bit_bf16", torch.bfloat16) if fused == "fused_bf16" else ("gemv_4bit", torch.float32)
        y = library.call(kernels, gemv, x2d.to(x_dtype).contiguous(), *weight_arguments(weight), n, block)
        if bias is not None:
            y += bias.float()
        served(f"cpu.codebook4bit.{fused}")
        return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], n)
    if uses_tiles(kernels, m, weight, compute_dtype):
        y = library.call(kernels, "linear_4bit_tiles", x2d.to(compute_dtype), *weight_arguments(weight), n, block)
        if bias is not None:
            y += bias.float()
        served("cpu.codebook4bit.tiles")
        return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], n)
    grouped = grouped_columns(kernels, weight)
    xc = group_permuted_columns(x2d.to(compute_dtype)) if grouped else x2d.to(compute_dtype)
    y = library.call(kernels, "linear_4bit_chunked", xc.contiguous(), *weight_arguments(weight), n, block, grouped,
                     chunks.rows_per_chunk(k, compute_dtype))  # fmt: skip
    if bias is not None:
        y = y + bias.to(compute_dtype)
    served("cpu.codebook4bit.dequantize_matmul")
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@register_kernel(CodebookWeight.family, "cpu", activations=Q8Activations.mode)
def linear_forward_q8(x: torch.Tensor, weight: CodebookWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                      activations: Q8Activations) -> torch.Tensor:  # fmt: skip
    """activations="q8_0": every batch through the native integer kernel (csrc/q8_0.cpp) on CPUs with AVX2, for
    blocks of 32 or more that tile the rows; the mode's reference otherwise."""
    kernels = native.load()
    n, k, block = weight.out_features, weight.in_features, weight.block_size
    if kernels is None or not kernels.uses_avx2() or k % block or block % activations.block:
        return reference_forward(x, weight, bias, compute_dtype, activations)
    x2d = x.reshape(-1, k).to(compute_dtype).float().contiguous()
    y = library.call(kernels, "gemv_4bit_q8", x2d, *weight_arguments(weight), n, block)
    if bias is not None:
        y += bias.float()
    # the native kernel takes its AVX512-VNNI loop on this condition (csrc q8_0_vnni_takes)
    vnni = kernels.uses_avx512_vnni() and block % 64 == 0 and k % 128 == 0
    served("cpu.codebook4bit.q8_0_vnni" if vnni else "cpu.codebook4bit.q8_0")
    return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], n)


@register_kernel(CodebookWeight.family, "cpu", quantize=True)
def quantize(fmt: Codebook4BitFormat, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """The format's quantize with the codes and absmax from the native kernel (the same, one pass, no temporaries)."""
    kernels = native.load()
    if kernels is None or weight.dtype not in native.QUANTIZER_DTYPES:
        return reference_quantize(fmt, weight, scheme)
    midpoints, order = fmt.bounds(weight.device)
    codes, absmax, finite = kernels.quantize_4bit(weight.contiguous().reshape(-1), scheme.block_size,
                                                  midpoints.contiguous(), order)  # fmt: skip
    if not finite:
        raise NonFiniteWeightError()
    served("cpu.codebook4bit.quantize")
    return fmt.stored_tensors(codes, absmax, weight, scheme)


@library.grad_input_op("grad_input_4bit", f"{library.CODEBOOK_WEIGHT}, int block, bool grouped")
def grad_input(g2d, packed, absmax, absmax_code, absmax_scale, absmax_offset, dynamic_code, code, block: int,
               grouped: bool, k: int) -> torch.Tensor:  # fmt: skip
    """g2d (M, N) @ dequant(W) in float32, W's rows dequantized by the native kernel in chunks (grouped: in the
    group-permuted column order, undone at the end)."""
    kernels = native.load()
    statistics = (absmax, absmax_code, absmax_scale, absmax_offset, dynamic_code, code)

    def rows(first: int, last: int, out: torch.Tensor) -> None:
        kernels.dequantize_4bit(packed, *statistics, block, first * k, last * k, out, grouped)

    grad_x = chunks.grad_input(g2d, g2d.shape[1], k, rows)
    served("cpu.codebook4bit.grad_input")
    return ungroup_columns(grad_x).contiguous() if grouped else grad_x


@register_kernel(CodebookWeight.family, "cpu", backward=True)
def linear_grad_input(grad_y: torch.Tensor, weight: CodebookWeight, compute_dtype: torch.dtype) -> torch.Tensor:
    kernels = native.load()
    if kernels is None:
        return reference_backward(grad_y, weight, compute_dtype)
    g2d = grad_y.reshape(-1, weight.out_features).to(compute_dtype)
    grad_x = grad_input(g2d, *weight_arguments(weight), weight.block_size, grouped_columns(kernels, weight),
                        weight.in_features)  # fmt: skip
    return grad_x.to(compute_dtype).to(grad_y.dtype).reshape(*grad_y.shape[:-1], weight.in_features)
