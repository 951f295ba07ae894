"""Activation quantization modes: typed records of their settings, handed to the kernels beside the weight's record,
and their plain-torch reference, the oracle of every backend's kernel for that mode.

A layer with 16-bit activations has none (None). A mode's kernels are registered under (weight family, mode, backend)
in quantizer_plugin.ops; a backend with no kernel for a mode runs this reference, never another mode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from .records import FLOAT8_DTYPES, INT8_MAX, AffineWeight, CodebookWeight, Float8Weight, RowScaledWeight

__all__ = ["INPUT_SCALE", "INPUT_SMOOTHING", "INT8_MAX", "Int8Activations", "Q8Activations", "STATIC_MODES", "StaticFloat8Activations",
           "StaticInt8Activations", "outlier_columns", "quantize_activations", "quantize_blocks",
           "quantize_rows"]  # fmt: skip


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of a 2-D float tensor: (int8 values, float32 row absmax)."""
    matrix = matrix.float()
    absmax = matrix.abs().amax(dim=1)
    scaled = matrix * (INT8_MAX / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None]
    return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), absmax


def outlier_columns(x2d: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which input features have an activation with |x| >= threshold, as a boolean mask over the columns (none when
    threshold is 0). A mask, not indices: its shape does not depend on the data, so torch.compile traces it.

    Compared in float32, as every backend compares (a 16-bit tensor compared with a Python number would round the
    threshold to its own dtype, which bitsandbytes does: the same columns for any threshold that dtype holds, as 6.0).
    """
    if threshold <= 0:
        return torch.zeros(x2d.shape[-1], dtype=torch.bool, device=x2d.device)
    return (x2d.float().abs() >= threshold).any(dim=0)


def quantize_activations(x2d: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8's activation side as bitsandbytes computes it (int8_vectorwise_quant): (int8 codes, float32 row
    absmax, outlier column mask).

    An entry with |x| >= threshold is an outlier, and a column holding one is multiplied in floating point. Each
    row's absmax is taken over its entries that are not outliers (the other entries of an outlier column count, as
    in bitsandbytes), and the codes of the outlier columns are 0.
    """
    x = x2d.float()
    outliers = outlier_columns(x2d, threshold)
    if threshold > 0:
        x = x.masked_fill(x.abs() >= threshold, 0.0)
    codes, absmax = quantize_rows(x)
    return codes.masked_fill(outliers[None, :], 0), absmax, outliers


@dataclass(frozen=True)
class Int8Activations:
    """LLM.int8 (Dettmers et al. 2022): each activation row in int8 with its absmax, multiplied by row-scaled int8
    weights in integers; the input features holding any |x| >= outlier_threshold multiplied in 16-bit instead (a
    threshold of 0 turns the decomposition off)."""

    mode: ClassVar[str] = "int8"
    outlier_threshold: float

    def reference_linear(
        self, x: torch.Tensor, weight: RowScaledWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> torch.Tensor:
        """y = LLM.int8(x, W) + bias in plain torch, returned in x's dtype."""
        x2d = x.reshape(-1, weight.in_features).to(compute_dtype)
        x_int8, x_absmax, outliers = quantize_activations(x2d, self.outlier_threshold)
        # int8 x int8 products summed exactly: float64 holds every partial sum of |127 * 127| * K for K < 2^39.
        accumulated = x_int8.double() @ weight.values.double().T
        scales = x_absmax.double()[:, None] * weight.scale.double()[None, :] / (INT8_MAX * INT8_MAX)
        y = (accumulated * scales).float()
        # The outlier columns in 16-bit: every column, the others zeroed (no data-dependent shape; zeros add nothing).
        w_outlier_cols = weight.dequantize(torch.float32).masked_fill(~outliers[None, :], 0.0)
        x_outlier_cols = x2d.masked_fill(~outliers[None, :], 0.0)
        y = y + (x_outlier_cols.to(compute_dtype) @ w_outlier_cols.to(compute_dtype).T).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


def quantize_blocks(x2d: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of a 2-D tensor in blocks of `block` columns (the last one zero-padded), each block as int8 codes
    round(x * 127 / absmax) with its float32 scale absmax / 127, computed in that order in float32, rounded half to
    even: llama.cpp's q8_0 with a float32 scale. Returns (codes (M, blocks, block), scales (M, blocks)). A block
    holding a NaN or an infinity gets codes 0 and a NaN scale: every product it reaches is NaN, as it would be in 16
    bits, never a silent number."""
    x = x2d.float()
    x = torch.nn.functional.pad(x, (0, -x.shape[1] % block)).unflatten(1, (-1, block))
    absmax = x.abs().amax(dim=2)
    finite = torch.isfinite(x).all(dim=2)
    inverse = INT8_MAX / absmax.clamp(min=torch.finfo(torch.float32).tiny)
    codes = (x * inverse[..., None]).clamp(-INT8_MAX, INT8_MAX).round()
    codes = codes.masked_fill(~finite[..., None], 0).to(torch.int8)
    return codes, (absmax / INT8_MAX).masked_fill(~finite, float("nan"))


def int8_steps(code: torch.Tensor) -> torch.Tensor:
    """A codebook rounded to int8 steps, round(127 c) / 127: what the q8_0 kernels multiply in integers."""
    return (code.float() * INT8_MAX).round() / INT8_MAX


@dataclass(frozen=True)
class Q8Activations:
    """The activations rounded as llama.cpp rounds them for its 4-bit and 2-bit dot products (q8_0): each row in blocks
    of 32 columns, each block int8 with one scale, so that the kernels multiply bytes by the weight's codes, 32 at a
    time, in exact integer sums (`activations="q8_0"`, for the 4-bit codebooks and the integer formats). A codebook's
    values are rounded to int8 steps too (round(127 c) / 127, as llama.cpp's IQ4_NL stores its codebook); integer codes
    are multiplied as they are. Both roundings are far below the 4-bit weight's own error (a step of NF4 is 0.08 to
    0.30 of the absmax; an int8 step, 0.008), and they trade exactness for speed where the CPU lacks 16-bit dot
    products (AVX2 alone: docs/kernels.md)."""

    mode: ClassVar[str] = "q8_0"
    block: ClassVar[int] = 32

    def multiplied_weight(self, weight) -> torch.Tensor:
        """The float32 weight the mode multiplies: the codebook in int8 steps, integer codes as they are."""
        if isinstance(weight, CodebookWeight):
            return replace(weight, code=int8_steps(weight.code)).dequantize(torch.float32)
        if isinstance(weight, AffineWeight):
            return weight.dequantize(torch.float32)
        raise TypeError(f"activations={self.mode!r} takes 4-bit codebook or integer weights, not {type(weight).__name__}")

    def reference_linear(
        self, x: torch.Tensor, weight, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> torch.Tensor:
        """y = q8_0(x) @ W.T + bias in plain torch (float64 sums), returned in x's dtype through the compute dtype."""
        k = weight.in_features
        x2d = x.reshape(-1, k).to(compute_dtype)
        codes, scales = quantize_blocks(x2d, self.block)
        rounded = (codes.double() * scales.double()[..., None]).flatten(1)[:, :k]
        y = (rounded @ self.multiplied_weight(weight).double().T).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


# The tensors a layer with static activations stores beside its weight: the activations' step, one float32 (shape
# (1,): no stored tensor is 0-d, formats/base.py), NaN until a calibration pass sets it; and with SmoothQuant
# (smoothing_alpha), the factors its input is multiplied by first, float32 (in_features,): ones where the smoothing
# is folded into the norm before the layer (quantizer_plugin/activation_scales.py).
INPUT_SCALE = "input_scale"
INPUT_SMOOTHING = "input_smoothing"


@dataclass(frozen=True)
class _StaticActivations:
    input_scale: torch.Tensor  # float32 (1,)
    input_smoothing: torch.Tensor | None = None  # float32 (in_features,)

    def smooth(self, x2d: torch.Tensor) -> torch.Tensor:
        """x times the input smoothing factors, in float32 (x itself without them)."""
        return x2d if self.input_smoothing is None else x2d.float() * self.input_smoothing

    def output(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype,
               out_features: int) -> torch.Tensor:  # fmt: skip
        """The layer's output from the float32 products y (M, N), already scaled: plus the bias in float32, rounded
        once to the compute dtype, in x's dtype and leading shape (the reference's end, and every kernel's)."""
        if bias is not None:
            y = y + bias.float()
        return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], out_features)


@dataclass(frozen=True)
class StaticInt8Activations(_StaticActivations):
    """Static int8 activations (W8A8 with row-scaled int8 weights): every activation rounded to int8 on one grid,
    round(x / input_scale) clamped to +-127, the step recorded by calibration (the activations' absmax over the
    calibration data / 127) and stored with the layer. The int8 products are summed exactly, as LLM.int8's, and
    scaled by input_scale * the weight row's scale / 127: LLM.int8's arithmetic with every row's absmax replaced by
    127 steps, and no outlier columns."""

    mode: ClassVar[str] = "int8_static"
    largest: ClassVar[float] = INT8_MAX

    def codes(self, x2d: torch.Tensor) -> torch.Tensor:
        """round(smoothed x * (1 / input_scale)) clamped to +-127, as float32 (NaN where x is NaN)."""
        return (self.smooth(x2d).float() * torch.reciprocal(self.input_scale)).round().clamp(-INT8_MAX, INT8_MAX)

    def reference_linear(
        self, x: torch.Tensor, weight: RowScaledWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> torch.Tensor:
        """y = (codes @ W's int8 values.T) * input_scale * row scale / 127 + bias in plain torch (float64 sums, which
        hold int8 products exactly), in x's dtype through the compute dtype."""
        if not isinstance(weight, RowScaledWeight):
            raise TypeError(f"activations={self.mode!r} takes row-scaled int8 weights, not {type(weight).__name__}")
        x2d = x.reshape(-1, weight.in_features).to(compute_dtype)
        accumulated = self.codes(x2d).double() @ weight.values.double().T
        absmax = (self.input_scale * INT8_MAX).double()  # 127 steps, as LLM.int8's row absmax (the kernels' order)
        y = (accumulated * (absmax * weight.scale.double()[None, :] / (INT8_MAX * INT8_MAX))).float()
        return self.output(x, y, bias, compute_dtype, weight.out_features)


@dataclass(frozen=True)
class StaticFloat8Activations(_StaticActivations):
    """Static fp8 activations (W8A8 with fp8 weights): every activation divided by input_scale and rounded to the
    nearest float8 e4m3fn (clamped to +-448, the largest finite value), the step recorded by calibration (absmax over
    the calibration data / 448) and stored with the layer; y = (those fp8 values @ dequant(W).T) * input_scale. An fp8
    value is exact in bfloat16, so CPUs multiply it on their bf16 dot products."""

    mode: ClassVar[str] = "fp8_static"
    largest: ClassVar[float] = float(torch.finfo(torch.float8_e4m3fn).max)

    def codes(self, x2d: torch.Tensor) -> torch.Tensor:
        """smoothed x * (1 / input_scale) clamped to +-448, rounded to e4m3fn, as float32 (NaN where x is NaN)."""
        scaled = (self.smooth(x2d).float() * torch.reciprocal(self.input_scale)).clamp(-self.largest, self.largest)
        return scaled.to(FLOAT8_DTYPES[4]).float()

    def reference_linear(
        self, x: torch.Tensor, weight: Float8Weight, bias: torch.Tensor | None, compute_dtype: torch.dtype
    ) -> torch.Tensor:
        """y = (fp8(x / input_scale) @ dequant(W).T) * input_scale + bias in plain torch (float64 sums), in x's dtype
        through the compute dtype."""
        if not isinstance(weight, Float8Weight):
            raise TypeError(f"activations={self.mode!r} takes fp8 weights, not {type(weight).__name__}")
        x2d = x.reshape(-1, weight.in_features).to(compute_dtype)
        products = self.codes(x2d).double() @ weight.dequantize(torch.float32).double().T
        return self.output(x, (products * self.input_scale.double()).float(), bias, compute_dtype, weight.out_features)


StaticActivations = StaticInt8Activations | StaticFloat8Activations
# mode -> its record class, for the 8-bit weight families that take it
STATIC_MODES = {cls.mode: cls for cls in (StaticInt8Activations, StaticFloat8Activations)}
ActivationRecord = Int8Activations | Q8Activations | StaticActivations
