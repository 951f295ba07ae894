"""Kept 16-bit layers on the CPU backend: the output head a quantized model keeps in 16-bit by default (modules.py
KeptLinear), at decode.

torch's bfloat16 matmul on a CPU without bfloat16 hardware (AVX2 only) does not stream a weight at the machine's
bandwidth: the head of the 0.4B Llama of benchmarks/cpu_decode.py (32000 x 2048, 131 MB in bfloat16) took 7.5 ms at
M = 1 there and 27.3 at M = 4 (6.6 and 8.0 here), of an nf4 decode step of 40 ms. The native kernel (csrc/dense.cpp) reads each weight row once, prefetched, and multiplies
in float32 (products of 16-bit values are exact there; only the order of the float32 sums differs from torch's). More
activation rows than GEMV_MAX_M, a weight it does not read, or a call that needs gradients run torch's F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import register_kept_kernel, served
from . import library, native

GEMV_MAX_M = 4  # the activation rows one pass over the weight serves (a group of for_row_groups in csrc/simd.h)
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@register_kept_kernel("cpu")
def kept_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight.T + bias, in x's dtype, as F.linear computes it to within the order of float32 sums."""
    kernels = native.load()
    x2d = x.reshape(-1, weight.shape[1])
    if (kernels is None or not kernels.uses_avx2() or x2d.shape[0] > GEMV_MAX_M or weight.dtype not in WEIGHT_DTYPES
            or x.dtype != weight.dtype or x.device.type != "cpu" or weight.device.type != "cpu"
            or not weight.is_contiguous()):  # fmt: skip
        return F.linear(x, weight, bias)
    y = library.call(kernels, "gemv_dense", x2d.float().contiguous(), weight)
    served("cpu.kept16.gemv")
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
