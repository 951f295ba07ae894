"""The layer entry points of the Triton kernels, registered with the dispatch seam (quantizer_plugin.ops).

- NF4/FP4, int4/int2 and weight-only int8 (weights="int8", activations=None): the generic dequantize-in-registers
  kernels of dequant_matmul.py, forward and input gradient. Weight-only int8's input gradient is LLM.int8's below.
- LLM.int8 (activations="int8"): the outlier-decomposed GEMM of int8_matmul.py (its maths in int8_activation.py)
  and the input gradient of int8_backward.py.
Like the references, the input is cast to the layer's compute dtype, the kernels compute in it, and the result is
returned in the input's dtype. While torch.compile traces, each launch goes through its custom op (library.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantizer_plugin.ops import reference_backward, reference_forward, register_kernel

from . import library
from .dequant_matmul import MAX_ELEMENTS, dequant_matmul, dequant_matmul_grad_input
from .int8_backward import int8_grad_input
from .int8_matmul import int8_linear

if TYPE_CHECKING:
    from quantizer_plugin.modules import LowBitLinear


def _fits(layer: LowBitLinear) -> bool:
    return layer.out_features * layer.in_features <= MAX_ELEMENTS  # the kernels index with 32-bit integers


def _format_arguments(layer: LowBitLinear) -> tuple:
    """The stored tensors in spec order and the format's settings: the custom ops' weight arguments."""
    return list(layer.quantized_tensors().values()), layer.fmt.name, layer.scheme.block_size, layer.scheme.double_quant


@register_kernel("nf4", "triton")
@register_kernel("fp4", "triton")
@register_kernel("int4", "triton")
@register_kernel("int2", "triton")
def linear_forward(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    if not _fits(layer):
        return reference_forward(x, layer)
    x2d = x.reshape(-1, layer.in_features).to(layer.compute_dtype).contiguous()
    n = layer.out_features
    if torch.compiler.is_compiling():
        y = library.dequant_matmul_op(x2d, *_format_arguments(layer), n, layer.bias)
    else:
        y = dequant_matmul(x2d, layer.quantized_tensors(), layer.fmt, layer.scheme, n, layer.bias, check_weight=False)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@register_kernel("nf4", "triton", backward=True)
@register_kernel("fp4", "triton", backward=True)
@register_kernel("int4", "triton", backward=True)
@register_kernel("int2", "triton", backward=True)
def linear_grad_input(grad_y: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    if not _fits(layer):
        return reference_backward(grad_y, layer)
    g2d = grad_y.reshape(-1, layer.out_features).to(layer.compute_dtype).contiguous()
    k = layer.in_features
    if torch.compiler.is_compiling():
        grad_x = library.dequant_matmul_grad_input_op(g2d, *_format_arguments(layer), k)
    else:
        grad_x = dequant_matmul_grad_input(g2d, layer.quantized_tensors(), layer.fmt, layer.scheme, k, check_weight=False)
    return grad_x.to(grad_y.dtype).reshape(*grad_y.shape[:-1], k)


@register_kernel("int8", "triton")
def int8_forward(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    if layer.scheme.activations is None:
        return linear_forward(x, layer)
    x2d = x.reshape(-1, layer.in_features).to(layer.compute_dtype).contiguous()
    bias = layer.bias.detach() if layer.bias is not None else None
    threshold = layer.scheme.outlier_threshold
    if torch.compiler.is_compiling():
        y = library.int8_linear_op(x2d, layer.weight, layer.weight_scale, bias, threshold)
    else:
        y = int8_linear(x2d, layer.weight, layer.weight_scale, bias, threshold, check_operands=False)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


@register_kernel("int8", "triton", backward=True)
def int8_backward(grad_y: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    g2d = grad_y.reshape(-1, layer.out_features).to(layer.compute_dtype).contiguous()
    grad_input = library.int8_grad_input_op if torch.compiler.is_compiling() else int8_grad_input
    grad_x = grad_input(g2d, layer.weight, layer.weight_scale)
    return grad_x.to(grad_y.dtype).reshape(*grad_y.shape[:-1], layer.in_features)
