"""Autotuning: the candidate tile configurations (data, per kernel family and shape regime) and the M buckets.

The candidates are starting points chosen from the shapes of the problem (a decode GEMM streams the weight, a
prefill GEMM is tensor-core bound), not yet narrowed by measurement on a particular GPU; measured winners belong
here, per GPU, once benchmarks/ has run there. Under Triton's interpreter (CPU tests) only the first configuration
is used: the interpreter cannot time candidates, and its cost is per program, so its tiles are few but not so large
that small test shapes fit in one tile.
"""

from __future__ import annotations

import triton

# M up to this takes the weight-streaming (decode) configurations.
DECODE_MAX_M = 16


def _config(block_m, block_n, block_k, warps, stages, group_m=8):
    return triton.Config(
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m), num_warps=warps, num_stages=stages
    )


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the first entry of each list is the interpreter's.
CANDIDATES: dict[str, dict[str, list[tuple[int, int, int, int, int]]]] = {
    "4bit": {
        # 16-row x tile (tl.dot's minimum); narrow N tiles so that N / BLOCK_N programs cover the SMs; long K tiles
        # so that each program issues large contiguous loads of packed weight.
        "decode": [
            (16, 32, 64, 4, 1),
            (16, 16, 256, 4, 4), (16, 16, 512, 4, 3), (16, 32, 256, 4, 4), (16, 32, 512, 4, 3),
            (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 32, 128, 2, 5), (16, 16, 1024, 8, 2),
        ],
        "prefill": [
            (64, 32, 64, 4, 1),
            (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3),
        ],
        # grad_x = grad_y @ W: tiles over (M, K), reduction over N.
        "grad_input": [
            (32, 32, 64, 4, 1),
            (16, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 64, 128, 8, 3), (128, 64, 64, 4, 4),
            (128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (256, 64, 128, 8, 3),
        ],
    },
}


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def matmul_configs(family: str, regime: str) -> list:
    candidates = CANDIDATES[family][regime]
    chosen = candidates[:1] if interpreting() else candidates[1:]
    return [_config(*c) for c in chosen]


def autotuned(kernel, configs: list, key: list[str]):
    return triton.autotune(configs=configs, key=key)(kernel)


def m_bucket(m: int) -> int:
    """The autotuning key for M: the next power of two, so that one tuning serves a range of batch sizes."""
    return 1 << max(m - 1, 0).bit_length()
