"""The layer entry points of the Triton kernels, registered with the dispatch seam (quantizer_plugin.ops).

- Every weight family with 16-bit activations (4-bit codebooks, per-group affine integers, row-scaled int8, fp8): the
  generic dequantize-in-registers kernels of dequant_matmul.py, forward and input gradient. The row-scaled family's
  input gradient is int8_backward.py's, for both activations modes.
- LLM.int8 (row-scaled weights, activations="int8"): the outlier-decomposed GEMM of int8_matmul.py (its maths in
  int8_activation.py).
- Static activations (W8A8: "int8_static" on row-scaled weights, "fp8_static" on fp8): the grid values through the
  generic kernel, scaled by the input_scale.
Like the references, the input is cast to the layer's compute dtype, the kernels compute in it, and the result is
returned in the input's dtype. While torch.compile traces, each launch goes through its custom op (library.py).
"""

from __future__ import annotations

import torch

from quantizer_plugin.formats.activations import StaticFloat8Activations, StaticInt8Activations
from quantizer_plugin.formats.records import AffineWeight, CodebookWeight, Float8Weight, RowScaledWeight, op_arguments
from quantizer_plugin.ops import reference_backward, reference_forward, register_kernel

from . import library
from .dequant_matmul import MAX_ELEMENTS, dequant_matmul, dequant_matmul_grad_input
from .int8_backward import int8_grad_input
from .int8_matmul import int8_linear


def _fits(weight) -> bool:
    return weight.out_features * weight.in_features <= MAX_ELEMENTS  # the kernels index with 32-bit integers


@register_kernel(CodebookWeight.family, "triton")
@register_kernel(AffineWeight.family, "triton")
@register_kernel(RowScaledWeight.family, "triton")
@register_kernel(Float8Weight.family, "triton")
def linear_forward(x: torch.Tensor, weight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                   activations=None) -> torch.Tensor:  # fmt: skip
    if not _fits(weight):
        return reference_forward(x, weight, bias, compute_dtype)
    x2d = x.reshape(-1, weight.in_features).to(compute_dtype).contiguous()
    if torch.compiler.is_compiling():
        y = library.dequant_matmul_op(x2d, *op_arguments(weight), bias)
    else:
        y = dequant_matmul(x2d, weight, bias, check_weight=False)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


@register_kernel(RowScaledWeight.family, "triton", activations=StaticInt8Activations.mode)
@register_kernel(Float8Weight.family, "triton", activations=StaticFloat8Activations.mode)
def static_forward(x: torch.Tensor, weight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                   activations: StaticInt8Activations | StaticFloat8Activations) -> torch.Tensor:  # fmt: skip
    """Static activations (W8A8): their grid values (int8 codes or e4m3 values, exact in every 16-bit dtype) through
    the generic kernel, the products scaled by input_scale once in float32 (the int8 x int8 tensor-core path would
    need the grid inside the kernel; on a CPU-only project the generic one is what the interpreter checks)."""
    codes = activations.codes(x.reshape(-1, weight.in_features)).to(compute_dtype)
    y = linear_forward(codes, weight, None, compute_dtype).float() * activations.input_scale
    return activations.output(x, y, bias, compute_dtype, weight.out_features)


@register_kernel(CodebookWeight.family, "triton", backward=True)
@register_kernel(AffineWeight.family, "triton", backward=True)
@register_kernel(Float8Weight.family, "triton", backward=True)
def linear_grad_input(grad_y: torch.Tensor, weight, compute_dtype: torch.dtype) -> torch.Tensor:
    if not _fits(weight):
        return reference_backward(grad_y, weight, compute_dtype)
    g2d = grad_y.reshape(-1, weight.out_features).to(compute_dtype).contiguous()
    if torch.compiler.is_compiling():
        grad_x = library.dequant_matmul_grad_input_op(g2d, *op_arguments(weight))
    else:
        grad_x = dequant_matmul_grad_input(g2d, weight, check_weight=False)
    return grad_x.to(grad_y.dtype).reshape(*grad_y.shape[:-1], weight.in_features)


@register_kernel(RowScaledWeight.family, "triton", activations="int8")
def int8_forward(x: torch.Tensor, weight: RowScaledWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                 activations) -> torch.Tensor:  # fmt: skip
    x2d = x.reshape(-1, weight.in_features).to(compute_dtype).contiguous()
    bias = bias.detach() if bias is not None else None
    threshold = activations.outlier_threshold
    if torch.compiler.is_compiling():
        y = library.int8_linear_op(x2d, weight.values, weight.scale, bias, threshold)
    else:
        y = int8_linear(x2d, weight.values, weight.scale, bias, threshold, check_operands=False)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


@register_kernel(RowScaledWeight.family, "triton", backward=True)
def int8_backward(grad_y: torch.Tensor, weight: RowScaledWeight, compute_dtype: torch.dtype) -> torch.Tensor:
    g2d = grad_y.reshape(-1, weight.out_features).to(compute_dtype).contiguous()
    grad_input = library.int8_grad_input_op if torch.compiler.is_compiling() else int8_grad_input
    grad_x = grad_input(g2d, weight.values, weight.scale)
    return grad_x.to(grad_y.dtype).reshape(*grad_y.shape[:-1], weight.in_features)
