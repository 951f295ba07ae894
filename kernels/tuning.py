"""Autotuning: the candidate tile configurations (data, per kernel family and shape regime) and the M buckets.

The candidates are starting points chosen from the shapes of the problem (a decode GEMM streams the weight, a
prefill GEMM is tensor-core bound), not yet narrowed by measurement on a particular GPU; measured winners belong
here, per GPU, once benchmarks/ has run there. Every GPU candidate compiles for sm_90 without spilling registers
(compile_report.py, checked by the tests): larger tiles that spilled were dropped. Under Triton's interpreter
(CPU tests) only the first configuration is used: the interpreter cannot time candidates, and its cost is per
program, so its tiles are few but not so large that small test shapes fit in one tile.
"""

from __future__ import annotations

import triton

# M up to this takes the weight-streaming (decode) configurations.
DECODE_MAX_M = 16


def make_config(meta: dict, warps: int, stages: int) -> triton.Config:
    return triton.Config(meta, num_warps=warps, num_stages=stages)


def _config(block_m, block_n, block_k, warps, stages, split_k=None, group_m=8):
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m)
    if split_k is not None:
        meta["SPLIT_K"] = split_k
    return make_config(meta, warps, stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K]); the first entry of each list is the interpreter's.
CANDIDATES: dict[str, dict[str, list[tuple[int, ...]]]] = {
    "4bit": {
        # 16-row x tile (tl.dot's minimum); narrow N tiles so that N / BLOCK_N programs cover the SMs; long K tiles
        # so that each program issues large contiguous loads of packed weight. Split-K (split_k.py) multiplies the
        # programs where N / BLOCK_N alone is too few to keep every SM streaming (N = 4096 at BLOCK_N = 32 is 128
        # programs for an H100's 132 SMs), and shortens the long-K loops (K = 14336). The interpreter's entry
        # splits K in two so that the tests run the reduction.
        "decode": [
            (16, 32, 64, 4, 1, 2),
            (16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 16, 512, 4, 3), (16, 64, 128, 4, 4),
            (16, 32, 256, 4, 4, 2), (16, 32, 256, 4, 4, 4), (16, 16, 256, 4, 4, 4), (16, 16, 512, 4, 3, 4),
            (16, 32, 128, 4, 4, 8),
        ],
        "prefill": [
            (64, 32, 64, 4, 1),
            (128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
            (64, 64, 64, 4, 4), (128, 128, 128, 8, 3), (64, 256, 64, 8, 3),
        ],
        # grad_x = grad_y @ W: tiles over (M, K), reduction over N.
        "grad_input": [
            (32, 32, 64, 4, 1),
            (16, 64, 64, 4, 3), (64, 64, 64, 4, 4), (128, 64, 128, 8, 3), (128, 64, 64, 4, 4),
            (128, 128, 128, 8, 3), (64, 128, 128, 8, 3), (256, 64, 128, 8, 3),
        ],
    },
}


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def matmul_configs(family: str, regime: str, splits_k: bool = False) -> list:
    """The regime's candidates as triton.Configs; `splits_k` for a kernel with a SPLIT_K parameter (1 unless
    the entry names one)."""
    candidates = CANDIDATES[family][regime]
    chosen = candidates[:1] if interpreting() else candidates[1:]
    if splits_k:
        chosen = [(*c, 1) if len(c) == 5 else c for c in chosen]
    return [_config(*c) for c in chosen]


def autotuned(kernel, configs: list, key: list[str]):
    return triton.autotune(configs=configs, key=key)(kernel)


def m_bucket(m: int) -> int:
    """The autotuning key for M: the next power of two, so that one tuning serves a range of batch sizes."""
    return 1 << max(m - 1, 0).bit_length()
