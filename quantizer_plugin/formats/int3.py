"""int3: 3-bit per-group affine integers (8 levels), 8 codes in 3 bytes as bit planes; see affine.py."""

from .affine import IntAffineFormat
from .base import register_format

INT3 = register_format(IntAffineFormat("int3", 3))
