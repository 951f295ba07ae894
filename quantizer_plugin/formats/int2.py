"""int2: 2-bit per-group affine integers (4 levels), four codes per byte; see affine.py."""

from .affine import IntAffineFormat
from .base import register_format

INT2 = register_format(IntAffineFormat("int2", 2))
