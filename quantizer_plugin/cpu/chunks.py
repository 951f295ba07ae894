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


# Activation rows the fused kernels serve on CPUs with AVX512-BF16 but no AMX, for a 16-bit compute dtype: there
# torch's bfloat16 GEMM runs on vdpbf16ps and the fused kernels, which read the weight from memory once per call
# however many rows x has (csrc/simd.h, ROW_TILE), race it. Ours against bf16 at 4096 x 4096 and 14336 x 4096, nf4,
# int4 and weight-only int8, 2 threads of the Xeon with AMX capped at AVX512-BF16 (QUANTIZER_PLUGIN_MAX_ISA): at
# M = 8 fused 1.24x to 1.96x, chunks 0.55x to 1.08x; at 16 fused 0.94x to 1.07x, chunks 0.63x to 0.84x; at 32 fused
# 0.73x to 0.93x, chunks 0.69x to 0.86x, and past it the chunks lead.
BF16_WITHOUT_AMX_FUSED_ROWS = 16


def fused_rows(kernels, decode_rows: int, compute_dtype: torch.dtype) -> float:
    """The most activation rows a family's fused kernel serves before the chunks (or the AMX tiles) take over:
    `decode_rows` (measured on CPUs with AMX, where the tiles win past a few rows, and for float32, whose GEMM every
    AVX-512 CPU runs at full speed); BF16_WITHOUT_AMX_FUSED_ROWS for a 16-bit compute dtype on a CPU with AVX512-BF16
    but no AMX; every batch for a 16-bit compute dtype on a CPU without AVX512-BF16 (AVX2 alone, or AVX-512 without
    its BF16 instructions), where torch's 16-bit GEMM has no hardware to run on. There, at 4096 x 4096 on a 2-core AMD
    EPYC, M = 16 took 26.3 ms in bf16, 8.7 in the nf4 fused kernel and 60.2 in the nf4 chunks; M = 128 206.5, 68.6
    and 223.4 (int4: 12.2 and 96.4 at 16, 96.4 and 259.1 at 128); on the Xeon capped at AVX-512 without BF16, M = 16
    ran 2.2x to 2.6x bf16 fused and 0.9x to 1.05x in the chunks."""
    if compute_dtype == torch.float32 or not kernels.uses_avx2():
        return decode_rows
    if not kernels.uses_avx512_bf16():
        return float("inf")
    if not kernels.uses_amx_bf16():
        return max(decode_rows, BF16_WITHOUT_AMX_FUSED_ROWS)
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
