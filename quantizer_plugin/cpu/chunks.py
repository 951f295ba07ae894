"""Dequantize-then-GEMM in row chunks: the CPU backend's path for batches too large for a fused kernel (fused_rows).

A chunk is about CHUNK_BYTES of the weight's rows dequantized into the compute dtype, multiplied by torch's GEMM
(oneDNN; AMX where the CPU has it) while it is still in L2; the whole 16-bit weight is never held. The forward runs
in the native kernels (`linear_*_chunked`: each thread dequantizes and multiplies its own chunks, in its own core's
L2); the input gradient, below, runs chunk after chunk from Python, each chunk's GEMM on all threads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_BYTES = 1 << 21  # a dequantized chunk of rows: well inside a 2-4 MB L2
# Past this many activation rows the chunks serve batches the bfloat16 AMX tiles (csrc/amx.h) would: the tiles
# multiply every activation row by each 64 weight rows in turn, so they stream all of x once per 64 rows of W, while
# torch's GEMM blocks x itself. int4 on the Xeon with AMX, 2 threads, tiles against chunks (x bf16's time): at
# 4096 x 4096 M = 256 1.30 against 1.32, 512 1.57 against 1.23, 2048 2.14 against 1.17; at 2048 x 5632 M = 512
# 1.72 against 1.34, 2048 1.92 against 1.25.
TILES_MAX_M = 256

# fill(first_row, last_row, out): writes rows [first_row, last_row) of the dequantized weight into `out` (contiguous)
Fill = Callable[[int, int, torch.Tensor], None]


def fused_rows(kernels, decode_rows: int, compute_dtype: torch.dtype) -> float:
    """The most activation rows a family's fused kernel serves before the chunks take over: `decode_rows` (measured on
    CPUs with AVX-512, where the chunks' GEMM wins past a few rows), or every batch for a 16-bit compute dtype on a CPU
    with AVX2 alone, where torch's 16-bit GEMM has no hardware to run on. There, at 4096 x 4096 on a 2-core AMD EPYC,
    M = 16 took 26.3 ms in bf16, 8.7 in the nf4 fused kernel and 60.2 in the nf4 chunks; M = 128 206.5, 68.6 and
    223.4 (int4: 12.2 and 96.4 at 16, 96.4 and 259.1 at 128)."""
    if compute_dtype != torch.float32 and kernels.uses_avx2() and not kernels.uses_avx512():
        return float("inf")
    return decode_rows


def rows_per_chunk(k: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (k * dtype.itemsize))


def _chunks(n: int, k: int, dtype: torch.dtype, fill: Fill):
    rows = rows_per_chunk(k, dtype)
    buffer = torch.empty(min(rows, n) * k, dtype=dtype)
    for first in range(0, n, rows):
        last = min(n, first + rows)
        chunk = buffer[: (last - first) * k]
        fill(first, last, chunk)
        yield first, chunk.view(last - first, k)


def grad_input(g2d: torch.Tensor, n: int, k: int, fill: Fill) -> torch.Tensor:
    """g2d (M, N) @ W in float32, W (N, K) produced chunk by chunk by `fill` in g2d's dtype."""
    grad_x = torch.zeros(g2d.shape[0], k, dtype=torch.float32)
    for first, weight in _chunks(n, k, g2d.dtype, fill):
        grad_x += (g2d[:, first : first + weight.shape[0]] @ weight).float()
    return grad_x
