"""Weight formats, one module each; importing this package registers them all."""

from . import fp4, fp8, int2, int3, int4, int8, nf4  # noqa: F401  (registration side effect)
from .base import FORMAT_VERSION, QuantScheme, TensorSpec, WeightFormat, format_names, get_format, register_format

__all__ = ["FORMAT_VERSION", "QuantScheme", "TensorSpec", "WeightFormat", "format_names", "get_format", "register_format"]
