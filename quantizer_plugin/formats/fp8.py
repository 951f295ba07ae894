"""fp8 weights: each weight an 8-bit float, e4m3fn (weights="fp8": 4 exponent bits, 3 of mantissa, finite up to 448,
no infinities; NVIDIA's and transformers' FP8 checkpoints) or e5m2 (weights="fp8_e5m2": 5 and 2, up to 57344), times
a float32 scale per row, or per `block_size` columns of a row (the records.py float8 family). The scale is the group's
absmax over the encoding's largest finite value, so that the group's largest weight lands on it; each weight is
rounded to the nearest fp8 value (half to even), as torch's conversion does. optimum-quanto's qfloat8 weights are the
same rule with one scale per row.

Stored tensors (groups = 1 per row by default, else ceil(in_features / block_size)):
  weight        uint8   (out_features, in_features)  the fp8 bit patterns (uint8, so that a model-wide cast to a
                                                     float dtype, which converts every floating tensor, leaves them)
  weight_scale  float32 (out_features, groups)       absmax / largest finite value (0 for a group of zeros)
  input_scale   float32 (1,)                         activations="fp8_static" only: the activations' step
"""

from __future__ import annotations

import torch

from .base import QuantScheme, TensorSpec, WeightFormat, cdiv, refuse_non_finite, register_format
from .records import FLOAT8_DTYPES, Float8Weight

# Rows quantized at a time: the float32 temporaries stay a few tens of megabytes whatever the weight's size.
_CHUNK_ELEMENTS = 1 << 22


class Float8Format(WeightFormat):
    bits = 8
    family = Float8Weight.family
    # block_size None: one scale per row. "fp8_static": W8A8, e4m3 activations with a calibrated input_scale stored
    # beside the weight (activations.py: StaticFloat8Activations).
    settings = {None: {"block_size": None}, "fp8_static": {"block_size": None, "smoothing_alpha": None}}

    def __init__(self, name: str, exponent_bits: int):
        if exponent_bits not in FLOAT8_DTYPES:
            raise ValueError(f"{name}: fp8 has 4 (e4m3fn) or 5 (e5m2) exponent bits, got {exponent_bits}")
        self.name, self.exponent_bits = name, exponent_bits
        self.dtype = FLOAT8_DTYPES[exponent_bits]
        self.largest = float(torch.finfo(self.dtype).max)

    def block_of(self, in_features: int, scheme: QuantScheme) -> int:
        """The columns one scale covers: block_size, or the whole row."""
        return scheme.block_size or in_features

    def tensor_specs(self, out_features: int, in_features: int, scheme: QuantScheme) -> dict[str, TensorSpec]:
        groups = cdiv(in_features, self.block_of(in_features, scheme))
        return {
            "weight": TensorSpec((out_features, in_features), torch.uint8),
            "weight_scale": TensorSpec((out_features, groups), torch.float32),
        }

    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        if not weight.is_floating_point():
            raise TypeError(f"{self.name} quantizes float weights, got {weight.dtype}")
        refuse_non_finite(weight)
        weight = weight.reshape(-1, weight.shape[-1])
        block = self.block_of(weight.shape[1], scheme)
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[1])
        parts = [self._quantize_rows(weight[r : r + rows], block) for r in range(0, len(weight), rows)]
        return {name: torch.cat([part[name] for part in parts]) for name in ("weight", "weight_scale")}

    def _quantize_rows(self, rows: torch.Tensor, block: int) -> dict[str, torch.Tensor]:
        n, k = rows.shape
        groups = cdiv(k, block)
        padded = torch.nn.functional.pad(rows.float(), (0, groups * block - k)).view(n, groups, block)
        scale = padded.abs().amax(dim=2) / self.largest
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # a group of zeros stays zeros
        # the clamp only catches a quotient that float32 rounding put a hair past the largest value
        scaled = (padded / divisor[..., None]).clamp_(-self.largest, self.largest)
        values = scaled.to(self.dtype).view(torch.uint8).view(n, groups * block)[:, :k].contiguous()
        return {"weight": values, "weight_scale": scale}

    def record(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme):
        return Float8Weight(
            out_features, in_features, self.block_of(in_features, scheme), self.exponent_bits,
            values=tensors["weight"], scale=tensors["weight_scale"],
        )  # fmt: skip


FP8 = register_format(Float8Format("fp8", 4))
FP8_E5M2 = register_format(Float8Format("fp8_e5m2", 5))
