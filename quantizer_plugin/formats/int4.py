"""int4: 4-bit per-group affine integers (16 levels), two codes per byte; see affine.py."""

from .affine import IntAffineFormat
from .base import register_format

INT4 = register_format(IntAffineFormat("int4", 4))
