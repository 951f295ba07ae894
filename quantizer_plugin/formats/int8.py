"""int8 weights with one absmax scale per output row (the rowscaled8 family, formats/records.py): LLM.int8 (Dettmers
et al. 2022) by default, whose int8 activations and outlier decomposition are in activations.py; or, with
activations=None, the same weights multiplied by 16-bit activations (weight-only int8, optimum-quanto's w8a16).

Stored tensors:
  weight        int8    (out_features, in_features)  round(W * 127 / row_absmax)
  weight_scale  float32 (out_features,)              row_absmax (bitsandbytes' SCB)
  input_scale   float32 (1,)                         activations="int8_static" only: the activations' step
"""

from __future__ import annotations

import torch

from .activations import INT8_MAX, Int8Activations, outlier_columns, quantize_activations, quantize_rows
from .base import QuantScheme, TensorSpec, WeightFormat, refuse_non_finite, register_format
from .records import RowScaledWeight

__all__ = ["INT8", "INT8_MAX", "Int8RowwiseFormat", "outlier_columns", "quantize_activations", "quantize_rows"]


class Int8RowwiseFormat(WeightFormat):
    name = "int8"
    bits = 8
    family = RowScaledWeight.family
    # LLM.int8 by default (outlier_threshold=0: dynamic per-token int8 activations without outlier columns);
    # activations=None is weight-only: the same stored tensors, and x @ dequant(W).T in 16-bit; "int8_static" is W8A8
    # with a calibrated input_scale stored beside them (activations.py: StaticInt8Activations).
    settings = {"int8": {"outlier_threshold": 6.0}, None: {}, "int8_static": {"smoothing_alpha": 0.5}}

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

    def record(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme):
        return RowScaledWeight(out_features, in_features, values=tensors["weight"], scale=tensors["weight_scale"])

    def activations(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor] | None = None):
        if scheme.activations == "int8":
            return Int8Activations(scheme.outlier_threshold)
        return super().activations(scheme, tensors)


INT8 = register_format(Int8RowwiseFormat())
