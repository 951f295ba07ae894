"""Activation quantization modes: typed records of their settings, handed to the kernels beside the weight's record,
and their plain-torch reference, the oracle of every backend's kernel for that mode.

A layer with 16-bit activations has none (None). A mode's kernels are registered under (weight family, mode, backend)
in quantizer_plugin.ops; a backend with no kernel for a mode runs this reference, never another mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .records import INT8_MAX, RowScaledWeight

__all__ = ["INT8_MAX", "Int8Activations", "outlier_columns", "quantize_activations", "quantize_rows"]


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


ActivationRecord = Int8Activations
