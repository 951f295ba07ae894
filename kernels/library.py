"""The Triton launchers as torch custom ops, so that torch.compile keeps each launch as one node of its graph.

Dynamo cannot trace a launcher (its autotuner, grid lambdas and scratch buffers are Python it does not model), and
inductor would not know the output's shape without running it. Each op below wraps one launcher with arguments a
schema can hold (the weight's record taken apart by formats.records.op_arguments: its family's name, its tensors and
its integer settings) and has a fake implementation that gives the output's shape and dtype without running anything.
The layer entry points (layers.py) call the ops while torch.compile traces and the launchers directly otherwise,
which skips the dispatcher's microseconds on every eager decode step.

The ops are registered for every device: on CUDA they launch the compiled kernels; on CPU, under TRITON_INTERPRET=1,
the interpreter runs them, which is how the tests check them with torch.library.opcheck on a machine without a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from quantizer_plugin.formats.records import from_op_arguments

from .dequant_matmul import dequant_matmul, dequant_matmul_grad_input
from .int8_backward import int8_grad_input
from .int8_matmul import int8_linear


@torch.library.custom_op("quantizer_plugin::triton_dequant_matmul", mutates_args=())
def dequant_matmul_op(
    x: torch.Tensor, family: str, tensors: list[Optional[torch.Tensor]], settings: list[int],
    bias: Optional[torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """dequant_matmul.dequant_matmul: y (M, out_features) in x's dtype, x (M, K) in the compute dtype."""
    return dequant_matmul(x, from_op_arguments(family, tensors, settings), bias, check_weight=False)


@dequant_matmul_op.register_fake
def _(x, family, tensors, settings, bias):
    return x.new_empty((x.shape[0], from_op_arguments(family, tensors, settings).out_features))


@torch.library.custom_op("quantizer_plugin::triton_dequant_matmul_grad_input", mutates_args=())
def dequant_matmul_grad_input_op(
    grad_y: torch.Tensor, family: str, tensors: list[Optional[torch.Tensor]], settings: list[int]
) -> torch.Tensor:
    """dequant_matmul.dequant_matmul_grad_input: grad_x (M, in_features) in grad_y's dtype."""
    return dequant_matmul_grad_input(grad_y, from_op_arguments(family, tensors, settings), check_weight=False)


@dequant_matmul_grad_input_op.register_fake
def _(grad_y, family, tensors, settings):
    return grad_y.new_empty((grad_y.shape[0], from_op_arguments(family, tensors, settings).in_features))


@torch.library.custom_op("quantizer_plugin::triton_int8_linear", mutates_args=())
def int8_linear_op(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor], threshold: float
) -> torch.Tensor:
    """int8_matmul.int8_linear (LLM.int8): y (M, N) in x's dtype."""
    return int8_linear(x, weight, weight_scale, bias, threshold, check_operands=False)


@int8_linear_op.register_fake
def _(x, weight, weight_scale, bias, threshold):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("quantizer_plugin::triton_int8_grad_input", mutates_args=())
def int8_grad_input_op(grad_y: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """int8_backward.int8_grad_input: grad_x (M, K) in grad_y's dtype."""
    return int8_grad_input(grad_y, weight, weight_scale)


@int8_grad_input_op.register_fake
def _(grad_y, weight, weight_scale):
    return grad_y.new_empty((grad_y.shape[0], weight.shape[1]))
