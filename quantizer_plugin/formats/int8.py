"""LLM.int8 (Dettmers et al. 2022): int8 weights with one absmax scale per output row, and a mixed-precision matmul;
or, with activations=None, the same weights multiplied by 16-bit activations (weight-only int8).

At matmul time the activation columns (input features) holding any |x| >= outlier_threshold are multiplied in
floating point against the dequantized weight columns; every other column goes through int8 x int8 with one
absmax scale per activation row and per weight row; the two parts are summed. A threshold of 0 turns the
decomposition off. The activation codes and row scales are those of bitsandbytes' int8_vectorwise_quant.

Stored tensors:
  weight        int8    (out_features, in_features)  round(W * 127 / row_absmax)
  weight_scale  float32 (out_features,)              row_absmax (bitsandbytes' SCB)
"""

from __future__ import annotations

import torch

from .base import QuantScheme, TensorSpec, WeightFormat, refuse_non_finite, register_format

INT8_MAX = 127.0


def quantize_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of a 2-D float tensor: (int8 values, float32 row absmax)."""
    matrix = matrix.float()
    absmax = matrix.abs().amax(dim=1)
    scaled = matrix * (INT8_MAX / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None]
    return scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8), absmax


def outlier_columns(x2d: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which input features have an activation with |x| >= threshold, as a boolean mask over the columns (none when
    threshold is 0). A mask, not indices: its shape does not depend on the data, so torch.compile traces it."""
    if threshold <= 0:
        return torch.zeros(x2d.shape[-1], dtype=torch.bool, device=x2d.device)
    return (x2d.abs() >= threshold).any(dim=0)


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


class Int8RowwiseFormat(WeightFormat):
    name = "int8"
    bits = 8
    # LLM.int8 by default; activations=None is weight-only (optimum-quanto's w8a16): the same stored tensors, and
    # x @ dequant(W).T in 16-bit.
    settings = {"int8": {"outlier_threshold": 6.0}, None: {}}

    def tensor_specs(self, out_features: int, in_features: int, scheme: QuantScheme) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((out_features, in_features), torch.int8),
            "weight_scale": TensorSpec((out_features,), torch.float32),
        }

    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        if not weight.is_floating_point():
            raise TypeError(f"int8 quantizes float weights, got {weight.dtype}")
        refuse_non_finite(weight)
        values, absmax = quantize_rows(weight)
        return {"weight": values, "weight_scale": absmax}

    def dequantize(
        self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme, dtype: torch.dtype
    ) -> torch.Tensor:
        scale = tensors["weight_scale"] / INT8_MAX
        return (tensors["weight"].float() * scale[:, None]).to(dtype)

    def reference_linear(
        self,
        x: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
        out_features: int,
        in_features: int,
        scheme: QuantScheme,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        if scheme.activations is None:
            return super().reference_linear(x, tensors, bias, out_features, in_features, scheme, compute_dtype)
        w_int8, w_absmax = tensors["weight"], tensors["weight_scale"]
        x2d = x.reshape(-1, in_features).to(compute_dtype)
        x_int8, x_absmax, outliers = quantize_activations(x2d, scheme.outlier_threshold)
        # int8 x int8 products summed exactly: float64 holds every partial sum of |127 * 127| * K for K < 2^39.
        accumulated = x_int8.double() @ w_int8.double().T
        y = (accumulated * (x_absmax.double()[:, None] * w_absmax.double()[None, :] / (INT8_MAX * INT8_MAX))).float()

        # The outlier columns in 16-bit: every column, the others zeroed (no data-dependent shape; zeros add nothing).
        w_outlier_cols = (w_int8.float() * (w_absmax / INT8_MAX)[:, None]).masked_fill(~outliers[None, :], 0.0)
        x_outlier_cols = x2d.masked_fill(~outliers[None, :], 0.0)
        y = y + (x_outlier_cols.to(compute_dtype) @ w_outlier_cols.to(compute_dtype).T).float()
        if bias is not None:
            y = y + bias.float()
        return y.to(compute_dtype).to(x.dtype).reshape(*x.shape[:-1], out_features)


INT8 = register_format(Int8RowwiseFormat())
