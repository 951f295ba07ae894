"""The order in which a tiled kernel's programs visit output tiles, shared by the 4-bit and the int8 kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, tiles_m, tiles_other, GROUP_M: tl.constexpr):
    """(row tile, other tile) of program `pid` in grouped order: GROUP_M row tiles sweep the other dimension
    together, so that the weight tiles they share (dequantized or int8) are still in L2 when the next one needs them."""
    group = pid // (GROUP_M * tiles_other)
    first_m = group * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    within = pid % (GROUP_M * tiles_other)
    return first_m + within % group_rows, within // group_rows
