"""int8 on the CPU backend: weight-only, with 16-bit activations (optimum-quanto's w8a16), not LLM.int8.

torch's `_weight_int8pack_mm` multiplies the activations in the compute dtype by the int8 weight scaled per output
row (weight_scale / 127), in one pass over the int8 weight. The activations are not quantized, so the result sits
closer to the 16-bit model than LLM.int8's, which also rounds every activation row to int8 (outlier columns
aside); the stored tensors and the checkpoint are those of LLM.int8, unchanged, and the reference and the Triton
kernels keep LLM.int8's numerics. The input gradient multiplies by the dequantized weight, as the reference does.

`_weight_int8pack_mm` (torch 2.13) returns NaN or crashes when in_features is not a multiple of 16, and crashes on a
weight that does not start on a 16-byte boundary (both measured). Layers of such a K multiply by the dequantized
weight instead (the same weight-only numerics, without the fused read); a misaligned weight (LowBitLinear.realign
aligns resident layers at load, but an offloaded layer's weight is brought in per call) is copied first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..formats.int8 import INT8_MAX
from ..ops import register_kernel, served

if TYPE_CHECKING:
    from ..modules import LowBitLinear

PACKED_K_MULTIPLE = 16
ALIGNMENT = 64  # what torch's allocator gives; the kernel needs 16


@register_kernel("int8", "cpu")
def linear_forward(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    dtype = layer.compute_dtype
    x2d = x.reshape(-1, layer.in_features).to(dtype).contiguous()
    scales = (layer.weight_scale / INT8_MAX).to(dtype)
    if layer.in_features % PACKED_K_MULTIPLE == 0:
        weight = layer.weight if layer.weight.data_ptr() % ALIGNMENT == 0 else layer.weight.clone()
        y = torch._weight_int8pack_mm(x2d, weight, scales)
        served("cpu.int8.weight_only")
    else:
        y = x2d @ (layer.weight.to(dtype) * scales[:, None]).T
        served("cpu.int8.weight_only_dequantized")
    if layer.bias is not None:
        y = y + layer.bias.to(dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)
