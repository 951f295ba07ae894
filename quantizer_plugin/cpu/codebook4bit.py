"""NF4/FP4 on the CPU backend.

- Decode (at most GEMV_MAX_M activation rows, K a multiple of the block, blocks of 32 or more): the native fused
  kernel reads the packed codes once, looks each one up in the codebook in registers, and multiplies (the 16-bit
  weight is never written): for a bfloat16 compute dtype on CPUs with AVX512-BF16, bfloat16 codes and activations
  in vdpbf16ps pairs; otherwise in float32. Its output is then rounded to the compute dtype, as the reference's is.
- More rows with a bfloat16 compute dtype on CPUs with AMX (K a multiple of the block and of 128, blocks of 64 or
  more): the tile kernel (csrc/amx.h) writes the weight in bfloat16, bit for bit the reference's, a chunk of 64 rows
  at a time into L1, and the tile unit multiplies it there (the activations packed in the order it writes them).
- Anything else (float16/float32, no AMX, blocks that straddle rows): the native dequantize writes the weight's
  rows in chunks of about chunks.CHUNK_BYTES in the compute dtype, bit for bit the reference's dequantized weight,
  and torch's GEMM multiplies each chunk while it is still in L2. The input gradient (QLoRA) takes the same chunks.
  When K is a multiple of 32 the chunks are written group-permuted (each 32 columns as their 16 even, then 16 odd
  ones: no interleaving shuffle), and the activations' columns are permuted the same way, which leaves the product
  as it is.
Loading quantizes each weight with the native quantizer (the format's own codes and absmax, one pass). If the native
kernels cannot be built, everything runs the plain-torch reference (native.py warns once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..formats import QuantScheme
from ..formats.base import NonFiniteWeightError
from ..formats.codebook4bit import Codebook4BitFormat
from ..formats.dynamic8bit import dynamic_code
from ..ops import reference_backward, reference_forward, reference_quantize, register_kernel, served
from . import chunks, library, native

if TYPE_CHECKING:
    from ..modules import LowBitLinear

GEMV_MAX_M = 6
_EMPTY = torch.empty(0)


def statistics(layer: LowBitLinear) -> tuple:
    """The native kernels' weight arguments after `packed`: absmax (or its double-quant parts), and the codebook."""
    stored = layer.quantized_tensors()
    fmt: Codebook4BitFormat = layer.fmt
    if layer.scheme.double_quant:
        offset = stored["weight_absmax_offset"].reshape(1)
        return (_EMPTY, stored["weight_absmax_code"].reshape(-1), stored["weight_absmax_scale"], offset,
                dynamic_code(), fmt.code())  # fmt: skip
    return stored["weight_absmax"], _EMPTY, _EMPTY, _EMPTY, _EMPTY, fmt.code()


def fused_kernel(kernels, m: int, layer: LowBitLinear) -> str | None:
    """Which fused decode kernel serves `m` activation rows of `layer`: "fused_bf16", "fused" or None (chunks)."""
    block, k = layer.scheme.block_size, layer.in_features
    if m > GEMV_MAX_M or k % block or block % 32:
        return None
    if layer.compute_dtype == torch.bfloat16 and block % 64 == 0 and kernels.uses_avx512_bf16():
        return "fused_bf16"
    return "fused"


def uses_tiles(kernels, layer: LowBitLinear) -> bool:
    """Whether batches past decode run on the AMX tiles (csrc/amx.h): bfloat16 compute, K a multiple of the block and
    of 128, the block of 64 or more, and AMX on this CPU."""
    block, k = layer.scheme.block_size, layer.in_features
    bf16 = layer.compute_dtype == torch.bfloat16
    return bf16 and block % 64 == 0 and k % block == 0 and k % 128 == 0 and kernels.uses_amx_bf16()


def grouped_columns(kernels, layer: LowBitLinear) -> bool:
    return layer.in_features % 32 == 0 and kernels.uses_avx512()


def group_permuted_columns(t: torch.Tensor) -> torch.Tensor:
    """Each 32 columns as their 16 even columns, then their 16 odd ones (the grouped weight chunks' order)."""
    return t.unflatten(-1, (-1, 16, 2)).transpose(-1, -2).flatten(-3)


def ungroup_columns(t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (-1, 2, 16)).transpose(-1, -2).flatten(-3)


@register_kernel("nf4", "cpu")
@register_kernel("fp4", "cpu")
def linear_forward(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, layer)
    n, k = layer.out_features, layer.in_features
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    fused = fused_kernel(kernels, m, layer)
    if fused is not None:
        gemv, x_dtype = ("gemv_4bit_bf16", torch.bfloat16) if fused == "fused_bf16" else ("gemv_4bit", torch.float32)
        y = library.call(kernels, gemv, x2d.to(x_dtype).contiguous(), layer.weight.reshape(-1), *statistics(layer), n,
                         layer.scheme.block_size)  # fmt: skip
        if layer.bias is not None:
            y += layer.bias.float()
        served(f"cpu.codebook4bit.{fused}")
        return y.to(layer.compute_dtype).to(x.dtype).reshape(*x.shape[:-1], n)
    dtype = layer.compute_dtype
    if uses_tiles(kernels, layer):
        packed, block = layer.weight.reshape(-1), layer.scheme.block_size
        y = library.call(kernels, "linear_4bit_tiles", x2d.to(dtype), packed, *statistics(layer), n, block)
        if layer.bias is not None:
            y += layer.bias.float()
        served("cpu.codebook4bit.tiles")
        return y.to(dtype).to(x.dtype).reshape(*x.shape[:-1], n)
    grouped = grouped_columns(kernels, layer)
    xc = group_permuted_columns(x2d.to(dtype)) if grouped else x2d.to(dtype)
    y = library.call(kernels, "linear_4bit_chunked", xc.contiguous(), layer.weight.reshape(-1), *statistics(layer), n,
                     layer.scheme.block_size, grouped, chunks.rows_per_chunk(k, dtype))  # fmt: skip
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    served("cpu.codebook4bit.dequantize_matmul")
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@register_kernel("nf4", "cpu", quantize=True)
@register_kernel("fp4", "cpu", quantize=True)
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
def grad_input(g2d, packed, absmax, codes, scales, offset, code8, lut, block: int, grouped: bool, k: int) -> torch.Tensor:
    """g2d (M, N) @ dequant(W) in float32, W's rows dequantized by the native kernel in chunks (grouped: in the
    group-permuted column order, undone at the end)."""
    kernels = native.load()
    statistics = (absmax, codes, scales, offset, code8, lut)

    def rows(first: int, last: int, out: torch.Tensor) -> None:
        kernels.dequantize_4bit(packed, *statistics, block, first * k, last * k, out, grouped)

    grad_x = chunks.grad_input(g2d, g2d.shape[1], k, rows)
    served("cpu.codebook4bit.grad_input")
    return ungroup_columns(grad_x).contiguous() if grouped else grad_x


@register_kernel("nf4", "cpu", backward=True)
@register_kernel("fp4", "cpu", backward=True)
def linear_grad_input(grad_y: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    kernels = native.load()
    if kernels is None:
        return reference_backward(grad_y, layer)
    g2d = grad_y.reshape(-1, layer.out_features).to(layer.compute_dtype)
    grad_x = grad_input(g2d, layer.weight.reshape(-1), *statistics(layer), layer.scheme.block_size,
                        grouped_columns(kernels, layer), layer.in_features)  # fmt: skip
    return grad_x.to(layer.compute_dtype).to(grad_y.dtype).reshape(*grad_y.shape[:-1], layer.in_features)
