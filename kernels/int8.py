"""LLM.int8 on Triton: registers the forward and the input-gradient kernels with the dispatch seam.

The maths lives in int8_activation (outlier columns, row quantization), int8_matmul (the mixed-precision GEMM,
tiled and weight-streaming) and int8_backward (grad_x through the frozen weight). Like the reference
(quantizer_plugin.formats.int8.reference_linear), the input is first cast to the layer's compute dtype, the
kernels compute in it, and the result is returned in the input's dtype. Weight-only int8 (activations=None) runs
the weight-only kernel of dequant_matmul.py (16-bit activations, the weight dequantized in registers); its input
gradient is the same as LLM.int8's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantizer_plugin.ops import register_kernel

from . import dequant_matmul
from .int8_backward import int8_grad_input
from .int8_matmul import int8_linear

if TYPE_CHECKING:
    from quantizer_plugin.modules import LowBitLinear


@register_kernel("int8", "triton")
def int8_forward(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    if layer.scheme.activations is None:
        return dequant_matmul.linear_forward(x, layer)
    tensors = layer.quantized_tensors()
    x2d = x.reshape(-1, layer.in_features).to(layer.compute_dtype).contiguous()
    bias = layer.bias.detach() if layer.bias is not None else None
    y = int8_linear(
        x2d, tensors["weight"], tensors["weight_scale"], bias, layer.scheme.outlier_threshold, check_operands=False
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


@register_kernel("int8", "triton", backward=True)
def int8_backward(grad_y: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    tensors = layer.quantized_tensors()
    grad_y2d = grad_y.reshape(-1, layer.out_features).to(layer.compute_dtype).contiguous()
    grad_x = int8_grad_input(grad_y2d, tensors["weight"], tensors["weight_scale"])
    return grad_x.to(grad_y.dtype).reshape(*grad_y.shape[:-1], layer.in_features)
