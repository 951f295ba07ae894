"""FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2, no inf/nan), normalised to [-1, 1]."""

import torch

from .base import register_format
from .codebook4bit import Codebook4BitFormat


def _fp4_code() -> torch.Tensor:
    # Magnitudes in the bit order 0b000..0b111 of the three non-sign bits (0b001 is the one subnormal); the sign bit
    # is the high bit. Code 0b1000 is +0.0, as in bitsandbytes, so that dequantized zeros carry no sign.
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    values = torch.tensor(magnitudes + [-m if m else 0.0 for m in magnitudes], dtype=torch.float32)
    return values / values.abs().max()


FP4 = register_format(Codebook4BitFormat("fp4", _fp4_code()))
