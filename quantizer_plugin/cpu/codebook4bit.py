"""NF4/FP4 on the CPU backend.

- Decode (at most GEMV_MAX_M activation rows, K a multiple of the block, blocks of 32 or more): the native fused
  kernel reads the packed codes once, looks each one up in the codebook in registers, and multiplies in float32
  (the 16-bit weight is never written). Its output is then rounded to the compute dtype, as the reference's is.
- Anything else (more rows, or blocks that straddle rows): the native dequantize writes the weight's rows in chunks
  of about CHUNK_BYTES in the compute dtype, bit for bit the reference's dequantized weight, and torch's GEMM
  multiplies each chunk while it is still in L2. The input gradient (QLoRA) takes the same chunks.
If the native kernels cannot be built, both run the plain-torch reference (native.py warns once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..formats.codebook4bit import Codebook4BitFormat
from ..formats.dynamic8bit import dynamic_code
from ..ops import reference_backward, reference_forward, register_kernel, served
from . import native

if TYPE_CHECKING:
    from ..modules import LowBitLinear

GEMV_MAX_M = 4
CHUNK_BYTES = 1 << 21  # a dequantized chunk of rows: well inside a 2-4 MB L2
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


def uses_fused_kernel(m: int, layer: LowBitLinear) -> bool:
    block = layer.scheme.block_size
    return m <= GEMV_MAX_M and layer.in_features % block == 0 and block % 32 == 0


def weight_chunks(kernels, layer: LowBitLinear, dtype: torch.dtype):
    """(first row, dequantized rows) for consecutive chunks of the weight's rows, reusing one buffer."""
    n, k = layer.out_features, layer.in_features
    rows = max(1, CHUNK_BYTES // (k * dtype.itemsize))
    buffer = torch.empty(min(rows, n) * k, dtype=dtype)
    packed, args = layer.weight.reshape(-1), statistics(layer)
    for first in range(0, n, rows):
        last = min(n, first + rows)
        chunk = buffer[: (last - first) * k]
        kernels.dequantize_4bit(packed, *args, layer.scheme.block_size, first * k, last * k, chunk)
        yield first, chunk.view(last - first, k)


@register_kernel("nf4", "cpu")
@register_kernel("fp4", "cpu")
def linear_forward(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, layer)
    n, k = layer.out_features, layer.in_features
    x2d = x.reshape(-1, k)
    m = x2d.shape[0]
    if uses_fused_kernel(m, layer):
        y = kernels.gemv_4bit(x2d.float().contiguous(), layer.weight.reshape(-1), *statistics(layer), n,
                              layer.scheme.block_size)  # fmt: skip
        if layer.bias is not None:
            y += layer.bias.float()
        served("cpu.codebook4bit.fused")
        return y.to(layer.compute_dtype).to(x.dtype).reshape(*x.shape[:-1], n)
    dtype = layer.compute_dtype
    xc = x2d.to(dtype)
    y_t = torch.empty(n, m, dtype=dtype)  # y transposed: each chunk of weight rows fills contiguous rows of it
    for first, weight in weight_chunks(kernels, layer, dtype):
        torch.mm(weight, xc.T, out=y_t[first : first + weight.shape[0]])
    y = y_t.T
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    served("cpu.codebook4bit.dequantize_matmul")
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@register_kernel("nf4", "cpu", backward=True)
@register_kernel("fp4", "cpu", backward=True)
def linear_grad_input(grad_y: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    kernels = native.load()
    if kernels is None:
        return reference_backward(grad_y, layer)
    dtype = layer.compute_dtype
    g2d = grad_y.reshape(-1, layer.out_features).to(dtype)
    grad_x = torch.zeros(g2d.shape[0], layer.in_features, dtype=torch.float32)
    for first, weight in weight_chunks(kernels, layer, dtype):
        grad_x += (g2d[:, first : first + weight.shape[0]] @ weight).float()
    served("cpu.codebook4bit.grad_input")
    return grad_x.to(dtype).to(grad_y.dtype).reshape(*grad_y.shape[:-1], layer.in_features)
