"""fp8 weights (fp8, fp8_e5m2) on the CPU backend, with 16-bit activations, computing what the reference computes.

- Decode (at most GEMV_MAX_M activation rows; more in a 16-bit compute dtype on CPUs without AMX:
  chunks.fused_rows): the native kernel (csrc/float8.cpp) streams the weight once per call, turns each byte into a
  float16 by moving its bits (exact, no fp8 hardware: vcvtph2ps widens 16 at a time) and multiplies in float32, 8
  activation rows per pass on AVX-512.
- More rows, up to chunks.TILES_MAX_M, bfloat16 on CPUs with AMX (K a multiple of 32, the scale block of 16): the tile
  kernel (csrc/amx.h) on the weight decoded to bfloat16 (exact); a scale per row applied to the products, as int8's
  tiles apply theirs, a scale per block multiplied into the weight before its rounding to bfloat16, as the reference
  dequantizes it.
- Otherwise: native dequantize of row chunks for torch's 16-bit GEMM (chunks.py), as does the input gradient.

Static fp8 activations (activations="fp8_static", W8A8): each activation rounded to e4m3 on the calibrated grid (exact
in bfloat16), multiplied on the same paths (bf16 dot products on the tiles), the products scaled by input_scale.

Loading quantizes with the format's own quantize (torch's conversion to float8 is already one vectorised pass).
"""

from __future__ import annotations

import torch

from ..formats.activations import StaticFloat8Activations
from ..formats.records import Float8Weight
from ..ops import reference_backward, reference_forward, register_kernel, served
from . import chunks, library, native

GEMV_MAX_M = 6  # as weight-only int8, whose decode kernel reads the same bytes per weight


def weight_arguments(weight: Float8Weight) -> tuple:
    return weight.values, weight.scale, weight.block_size, weight.exponent_bits


@register_kernel(Float8Weight.family, "cpu")
def linear_forward(x: torch.Tensor, weight: Float8Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                   activations=None) -> torch.Tensor:  # fmt: skip
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, weight, bias, compute_dtype, activations)
    y = _product(kernels, x.reshape(-1, weight.in_features), weight, compute_dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


@register_kernel(Float8Weight.family, "cpu", activations=StaticFloat8Activations.mode)
def static_fp8_forward(x: torch.Tensor, weight: Float8Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                       activations: StaticFloat8Activations) -> torch.Tensor:  # fmt: skip
    """Static fp8 activations: their e4m3 values (exact in every 16-bit dtype) through the kernels above, the
    products then scaled by input_scale, once, in float32."""
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, weight, bias, compute_dtype, activations)
    codes = activations.codes(x.reshape(-1, weight.in_features)).to(compute_dtype)
    y = _product(kernels, codes, weight, compute_dtype).float() * activations.input_scale
    return activations.output(x, y, bias, compute_dtype, weight.out_features)


def _product(kernels, x2d: torch.Tensor, weight: Float8Weight, dtype: torch.dtype) -> torch.Tensor:
    """x2d @ dequant(W).T on the path the shape takes (the module docstring): float32, or `dtype` when chunked."""
    if x2d.shape[0] <= chunks.fused_rows(kernels, GEMV_MAX_M, dtype) and kernels.uses_avx2():
        y = library.call(kernels, "gemv_float8", x2d.to(dtype).float().contiguous(), *weight_arguments(weight))
        served("cpu.float8.fused")
    elif (dtype == torch.bfloat16 and x2d.shape[0] <= chunks.TILES_MAX_M and weight.in_features % 32 == 0
          and weight.block_size % 16 == 0 and kernels.uses_amx_bf16()):  # fmt: skip
        y = library.call(kernels, "linear_float8_tiles", x2d.to(dtype).contiguous(), *weight_arguments(weight))
        served("cpu.float8.tiles")
    else:
        rows = chunks.rows_per_chunk(weight.in_features, dtype)
        y = library.call(kernels, "linear_float8_chunked", x2d.to(dtype).contiguous(), *weight_arguments(weight), rows)
        served("cpu.float8.dequantize_matmul")
    return y


@library.grad_input_op("grad_input_float8", library.FLOAT8_WEIGHT)
def grad_input(g2d: torch.Tensor, values: torch.Tensor, scale: torch.Tensor, block: int, exponent_bits: int,
               k: int) -> torch.Tensor:  # fmt: skip
    """g2d (M, N) @ dequant(W) in float32, W's rows dequantized by the native kernel in chunks."""
    kernels = native.load()

    def rows(first: int, last: int, out: torch.Tensor) -> None:
        kernels.dequantize_float8(values, scale, block, exponent_bits, first, last, out)

    grad_x = chunks.grad_input(g2d, g2d.shape[1], k, rows)
    served("cpu.float8.grad_input")
    return grad_x


@register_kernel(Float8Weight.family, "cpu", backward=True)
def linear_grad_input(grad_y: torch.Tensor, weight: Float8Weight, compute_dtype: torch.dtype) -> torch.Tensor:
    if native.load() is None:
        return reference_backward(grad_y, weight, compute_dtype)
    g2d = grad_y.reshape(-1, weight.out_features).to(compute_dtype)
    grad_x = grad_input(g2d, *weight_arguments(weight), weight.in_features)
    return grad_x.to(compute_dtype).to(grad_y.dtype).reshape(*grad_y.shape[:-1], weight.in_features)
