"""Two operations the kernels need to compute the same on Triton's CPU interpreter as on a GPU.

The interpreter keeps bfloat16 as raw uint16 bits: its tl.dot multiplies those bits as integers, its int -> bfloat16
cast reinterprets the integer, and its float32 -> bfloat16 cast truncates where a GPU rounds to nearest even.
INTERPRETED is a tl.constexpr, so on a GPU only the plain branch is compiled.
Shared by the 4-bit and the int8 kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tuning import interpreting

# Fixed when the kernels are defined: @triton.jit builds interpreted kernels exactly when this is true.
INTERPRETED = interpreting()


@triton.jit
def dot_16bit(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b for a 16-bit (or float32) `a` and a `b` in a's dtype or int8, with a float32 accumulator."""
    if INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)


@triton.jit
def cast_rounded(v, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """float32 `v` in `dtype`, rounded to nearest even."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return v.to(dtype)
