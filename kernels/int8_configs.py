"""Tile configurations for the LLM.int8 kernels, kept as data.

The GPU lists are starting points for Hopper/Ampere-class parts (int8 tl.dot wants BLOCK_K >= 32); the
autotuner picks among them per (bucketed M, N, K). They have not been tuned on a GPU yet: add per-GPU lists here
when they are, rather than editing the kernels. Every one compiles for sm_90 without spilling registers
(compile_report.py, checked by the tests).

Under TRITON_INTERPRET=1 every kernel gets one small tile, so that the tests' odd shapes span several tiles
and the interpreter never benchmarks configurations against each other.
"""

from __future__ import annotations

import triton

from .tuning import interpreting, make_config, m_bucket  # noqa: F401  (shared with the 4-bit kernels)


def _configs(rows: list[tuple[dict, int, int]]) -> list[triton.Config]:
    return [make_config(meta, warps, stages) for meta, warps, stages in rows]


# Large M: output tiles over (M, N), int8 x int8 dot over K.
TILED_GPU = _configs([
    ({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4),
    ({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, 8, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, 4, 5),
    ({"BLOCK_M": 32, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, 4, 5),
])  # fmt: skip
TILED_INTERPRETER = _configs([({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}, 4, 1)])

# Small M (decode): every row in one program, tiles over N only, the weight streamed once along K.
# Split-K (split_k.py) adds programs where N / BLOCK_N alone would leave SMs idle (N = 4096) and shortens long-K
# loops; the interpreter's entry splits K in two so that the tests run the reduction.
STREAMING_GPU = _configs([
    ({"BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 1}, 4, 4),
    ({"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1}, 4, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1}, 4, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 1}, 8, 3),
    ({"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2}, 4, 4),
    ({"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4}, 4, 4),
    ({"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT_K": 4}, 8, 3),
])  # fmt: skip
STREAMING_INTERPRETER = _configs([({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}, 4, 1)])

# Input gradient: output tiles over (M, K), reduction over N with the weight dequantized in registers.
GRAD_INPUT_GPU = _configs([
    ({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_N": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_K": 64, "BLOCK_N": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_N": 128, "GROUP_M": 1}, 4, 4),
    ({"BLOCK_M": 32, "BLOCK_K": 128, "BLOCK_N": 64, "GROUP_M": 1}, 4, 4),
])  # fmt: skip
GRAD_INPUT_INTERPRETER = _configs([({"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 32, "GROUP_M": 2}, 4, 1)])

# Activation pass: row quantization and outlier column flags.
ROW_QUANTIZE_GPU = {"BLOCK_M": 4, "BLOCK_K": 512}
ROW_QUANTIZE_INTERPRETER = {"BLOCK_M": 4, "BLOCK_K": 32}


def tiled_configs() -> list[triton.Config]:
    return TILED_INTERPRETER if interpreting() else TILED_GPU


def streaming_configs() -> list[triton.Config]:
    return STREAMING_INTERPRETER if interpreting() else STREAMING_GPU


def grad_input_configs() -> list[triton.Config]:
    return GRAD_INPUT_INTERPRETER if interpreting() else GRAD_INPUT_GPU


def row_quantize_tile() -> dict:
    return ROW_QUANTIZE_INTERPRETER if interpreting() else ROW_QUANTIZE_GPU

