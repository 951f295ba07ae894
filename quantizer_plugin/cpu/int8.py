"""int8 on the CPU backend: weight-only, with 16-bit activations (optimum-quanto's w8a16), not LLM.int8.

For decode-sized batches (at most PACKED_MAX_M rows) torch's `_weight_int8pack_mm` multiplies the activations in
the compute dtype by the int8 weight scaled per output row (weight_scale / 127), in one pass over the int8 weight;
larger batches dequantize row chunks natively for torch's 16-bit GEMM (chunks.py), as does the input gradient. The activations are not quantized, so the result sits
closer to the 16-bit model than LLM.int8's, which also rounds every activation row to int8 (outlier columns
aside); the stored tensors and the checkpoint are those of LLM.int8, unchanged, and the reference and the Triton
kernels keep LLM.int8's numerics.

`_weight_int8pack_mm` (torch 2.13) returns NaN or crashes when in_features is not a multiple of 16, and crashes on a
weight that does not start on a 16-byte boundary (both measured). Layers of such a K multiply by the dequantized
weight instead (the same weight-only numerics, without the fused read); a misaligned weight (LowBitLinear.realign
aligns resident layers at load, but an offloaded layer's weight is brought in per call) is copied first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..formats.int8 import INT8_MAX
from ..ops import reference_backward, register_kernel, served
from . import chunks, native

if TYPE_CHECKING:
    from ..modules import LowBitLinear

PACKED_K_MULTIPLE = 16
PACKED_MAX_M = 8  # above this, torch's int8 kernel is slower than dequantizing row chunks for a 16-bit GEMM
ALIGNMENT = 64  # what torch's allocator gives; the kernel needs 16


def fill(kernels, layer: LowBitLinear):
    """The chunk filler for chunks.py: rows of the weight, dequantized by the native kernel."""
    weight, scale = layer.weight, layer.weight_scale

    def rows(first: int, last: int, out: torch.Tensor) -> None:
        kernels.dequantize_int8(weight, scale, first, last, out)

    return rows


@register_kernel("int8", "cpu")
def linear_forward(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    dtype = layer.compute_dtype
    x2d = x.reshape(-1, layer.in_features).to(dtype).contiguous()
    kernels = native.load()
    if x2d.shape[0] > PACKED_MAX_M and kernels is not None:
        rows = chunks.rows_per_chunk(layer.in_features, dtype)
        y = kernels.linear_int8_chunked(x2d, layer.weight, layer.weight_scale, rows)
        served("cpu.int8.dequantize_matmul")
    elif layer.in_features % PACKED_K_MULTIPLE == 0:
        scales = (layer.weight_scale / INT8_MAX).to(dtype)
        weight = layer.weight if layer.weight.data_ptr() % ALIGNMENT == 0 else layer.weight.clone()
        y = torch._weight_int8pack_mm(x2d, weight, scales)
        served("cpu.int8.weight_only")
    else:
        scales = (layer.weight_scale / INT8_MAX).to(dtype)
        y = x2d @ (layer.weight.to(dtype) * scales[:, None]).T
        served("cpu.int8.weight_only_dequantized")
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


@register_kernel("int8", "cpu", backward=True)
def linear_grad_input(grad_y: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    kernels = native.load()
    if kernels is None:
        return reference_backward(grad_y, layer)
    g2d = grad_y.reshape(-1, layer.out_features).to(layer.compute_dtype)
    grad_x = chunks.grad_input(g2d, layer.out_features, layer.in_features, fill(kernels, layer))
    served("cpu.int8.grad_input")
    return grad_x.to(layer.compute_dtype).to(grad_y.dtype).reshape(*grad_y.shape[:-1], layer.in_features)
