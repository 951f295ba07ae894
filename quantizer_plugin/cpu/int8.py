"""int8 on the CPU backend, in both activations modes of the format, each computing what its reference computes.

LLM.int8 (activations="int8", the default): the native kernel (csrc/llm_int8.cpp) quantizes each activation row to
int8 with its absmax exactly as the reference does, finds the outlier columns (any |x| >= the threshold), sums the
int8 products exactly in int32, scales them as the reference does, and adds the outlier columns' products in float,
the weight dequantized as the reference dequantizes it. The int32 sums come from AVX512-VNNI's byte dot products
("llm_int8_vnni"), else AVX2's 16-bit multiply-adds, else plain C++ ("llm_int8"); past LLM_INT8_TILES_MIN_M rows, on
CPUs with AMX-INT8 and K a multiple of 64, from the int8 tiles ("llm_int8_tiles"). Every path gives the same bytes.
Its result is the reference's to within the order of the outlier columns' float sums (tests/test_cpu_backend.py), and
bitsandbytes' LLM.int8 to within its rounding (tests/test_int8.py). Without the native build, the reference runs.
Static int8 activations (activations="int8_static", W8A8) run on the same kernel and paths, every row's codes
round(x / input_scale) and its "absmax" 127 steps, with no outlier columns.

Weight-only (activations=None, optimum-quanto's w8a16): the activations stay 16-bit.
- Decode (at most GEMV_MAX_M activation rows; more in a 16-bit compute dtype on CPUs without AMX:
  chunks.fused_rows): the native kernel streams the int8 weight once per call (prefetched) and
  multiplies in float32, scaling each output by its row's weight_scale / 127.
- Up to AMX_INT8_MAX_M rows, bfloat16 or float16 compute on CPUs with AMX-INT8 (K a multiple of 64): the int8 tile
  kernel (csrc/int8_amx.cpp) multiplies the weight as stored (no conversion, no copy) by the activations split into
  two int8 pieces per row (x ~ s * (high + low / 254), within max|x_row| / 64516 of x: far inside the rounding of
  16-bit activations), int32 sums, the scales applied once at the end.
- More rows, up to chunks.TILES_MAX_M, bfloat16 on CPUs with AMX (K a multiple of 32): the tile kernel (csrc/amx.h)
  multiplies the int8 values as bfloat16 (exact) and scales each output by its row's weight_scale / 127, as the decode
  kernel does.
- Otherwise: native dequantize of row chunks for torch's 16-bit GEMM (chunks.py), as does the input gradient.
torch's own `_weight_int8pack_mm` was measured here too: 1.8x slower than the decode kernel at K = 2048 (the 0.4B
Llama of benchmarks/cpu_decode.py), 1.2x faster at K = 4096, and it needs K % 16 == 0 and a 16-byte aligned weight
(it crashes otherwise); one kernel for every shape is kept.

Loading quantizes each weight with the native quantizer (the format's own values, one pass), in either mode.
"""

from __future__ import annotations

import torch

from ..formats import QuantScheme, WeightFormat
from ..formats.base import NonFiniteWeightError
from ..formats.activations import Int8Activations, StaticInt8Activations
from ..formats.records import RowScaledWeight
from ..ops import reference_backward, reference_forward, reference_quantize, register_kernel, served
from . import chunks, library, native

GEMV_MAX_M = 6  # above this, dequantizing row chunks for a 16-bit GEMM is faster (measured at 4096 x 4096)
# Above this the int8 tiles re-read each weight row from L2 once per 16 activation rows, and the bfloat16 tiles win
# (measured at 4096 x 4096 and 14336 x 4096: int8 tiles 1.7-2.7x bf16 at M = 16, 1.2-1.5x at 48, 0.9-1.0x at 96).
AMX_INT8_MAX_M = 48
# LLM.int8 from this many activation rows on the AMX-INT8 tiles (16 rows a tile) rather than the VNNI register tiles
# (4 rows; they re-read the weight from L2 per 4 rows): on the Xeon with AMX, 2 threads, 4096 x 4096, 0.79 ms against
# the tiles' 0.91 at M = 5, 1.06 against 0.99 at 8, 1.89 against 1.16 at 16 (14336 x 4096: 5.7 against 5.3 at 8).
LLM_INT8_TILES_MIN_M = 8


def uses_int8_tiles(kernels, m: int, weight: RowScaledWeight, compute_dtype: torch.dtype) -> bool:
    """Whether `m` activation rows run on the AMX-INT8 kernel (past decode, up to AMX_INT8_MAX_M rows)."""
    sixteen_bit = compute_dtype in (torch.bfloat16, torch.float16)
    return GEMV_MAX_M < m <= AMX_INT8_MAX_M and sixteen_bit and weight.in_features % 64 == 0 and kernels.uses_amx_int8()


def uses_llm_int8_tiles(kernels, m: int, weight: RowScaledWeight) -> bool:
    """Whether LLM.int8 of `m` activation rows runs on the AMX-INT8 tiles."""
    return m >= LLM_INT8_TILES_MIN_M and weight.in_features % 64 == 0 and kernels.uses_amx_int8()


@register_kernel(RowScaledWeight.family, "cpu", quantize=True)
def quantize(fmt: WeightFormat, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """The format's quantize by the native kernel (the same values, one pass)."""
    kernels = native.load()
    if kernels is None or not kernels.uses_avx512() or weight.dtype not in native.QUANTIZER_DTYPES:
        return reference_quantize(fmt, weight, scheme)
    values, absmax, finite = kernels.quantize_int8(weight.contiguous().reshape(-1, weight.shape[-1]))
    if not finite:
        raise NonFiniteWeightError()
    served("cpu.int8.quantize")
    return {"weight": values, "weight_scale": absmax}


@register_kernel(RowScaledWeight.family, "cpu", activations=Int8Activations.mode)
@register_kernel(RowScaledWeight.family, "cpu", activations=StaticInt8Activations.mode)
def llm_int8_forward(x: torch.Tensor, weight: RowScaledWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                     activations: Int8Activations | StaticInt8Activations) -> torch.Tensor:  # fmt: skip
    """LLM.int8 by the native kernel: its int8 part exactly the reference's, its outlier part in float. Static int8
    activations are the same kernel with every row's codes on the input_scale's grid, and no outlier columns."""
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, weight, bias, compute_dtype, activations)
    x2d = x.reshape(-1, weight.in_features).to(compute_dtype)
    static = isinstance(activations, StaticInt8Activations)
    x2d = (activations.smooth(x2d) if static else x2d).contiguous()  # smoothed: float32, as the reference rounds it
    threshold, input_scale = (0.0, activations.input_scale) if static else (float(activations.outlier_threshold), None)
    kind = "static_int8" if static else "llm_int8"
    if uses_llm_int8_tiles(kernels, x2d.shape[0], weight):
        y = library.call(kernels, "linear_llm_int8_tiles", x2d, weight.values, weight.scale, threshold, input_scale)
        served(f"cpu.int8.{kind}_tiles")
    else:  # the kernel takes VNNI, AVX2 or plain C++, as the CPU has them
        y = library.call(kernels, "linear_llm_int8", x2d, weight.values, weight.scale, threshold, input_scale)
        served(f"cpu.int8.{kind}_vnni" if kernels.uses_avx512_vnni() else f"cpu.int8.{kind}")
    if bias is not None:
        y = y + bias.float()  # as the reference: the bias added in float32, one rounding to the compute dtype
    return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


@register_kernel(RowScaledWeight.family, "cpu")
def linear_forward(x: torch.Tensor, weight: RowScaledWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype,
                   activations=None) -> torch.Tensor:  # fmt: skip
    """Weight-only int8: x @ dequant(W).T with 16-bit activations."""
    kernels = native.load()
    if kernels is None:
        return reference_forward(x, weight, bias, compute_dtype, activations)
    dtype = compute_dtype
    x2d = x.reshape(-1, weight.in_features)
    if x2d.shape[0] <= chunks.fused_rows(kernels, GEMV_MAX_M, dtype) and kernels.uses_avx2():
        y = library.call(kernels, "gemv_int8", x2d.to(dtype).float().contiguous(), weight.values, weight.scale)
        served("cpu.int8.fused")
    elif uses_int8_tiles(kernels, x2d.shape[0], weight, dtype):
        y = library.call(kernels, "linear_int8_amx", x2d.to(dtype), weight.values, weight.scale)
        served("cpu.int8.int8_tiles")
    elif (dtype == torch.bfloat16 and x2d.shape[0] <= chunks.TILES_MAX_M and weight.in_features % 32 == 0
          and kernels.uses_amx_bf16()):  # fmt: skip
        y = library.call(kernels, "linear_int8_tiles", x2d.to(dtype), weight.values, weight.scale)
        served("cpu.int8.tiles")
    else:
        rows = chunks.rows_per_chunk(weight.in_features, dtype)
        y = library.call(kernels, "linear_int8_chunked", x2d.to(dtype).contiguous(), weight.values, weight.scale, rows)
        served("cpu.int8.dequantize_matmul")
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(dtype).to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


@library.grad_input_op("grad_input_int8", library.INT8_WEIGHT)
def grad_input(g2d: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """g2d (M, N) @ dequant(W) in float32, W's rows dequantized by the native kernel in chunks."""
    kernels = native.load()

    def rows(first: int, last: int, out: torch.Tensor) -> None:
        kernels.dequantize_int8(weight, scale, first, last, out)

    grad_x = chunks.grad_input(g2d, g2d.shape[1], k, rows)
    served("cpu.int8.grad_input")
    return grad_x


@register_kernel(RowScaledWeight.family, "cpu", backward=True)
def linear_grad_input(grad_y: torch.Tensor, weight: RowScaledWeight, compute_dtype: torch.dtype) -> torch.Tensor:
    if native.load() is None:
        return reference_backward(grad_y, weight, compute_dtype)
    g2d = grad_y.reshape(-1, weight.out_features).to(compute_dtype)
    grad_x = grad_input(g2d, weight.values, weight.scale, weight.in_features)
    return grad_x.to(compute_dtype).to(grad_y.dtype).reshape(*grad_y.shape[:-1], weight.in_features)
