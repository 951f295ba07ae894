"""What the CPU kernels may use here, read independently of the kernels' own checks: this CPU's flags in
/proc/cpuinfo, capped by QUANTIZER_PLUGIN_MAX_ISA (the switch that runs a CPU without AMX, AVX-512 or AVX2's paths on a
machine that has them; quantizer_plugin/cpu/native.py)."""

from __future__ import annotations

import os

LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16", "amx")  # least to most


def cpu_flags() -> list[str]:
    try:
        return next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []


def allowed(level: str) -> bool:
    cap = os.environ.get("QUANTIZER_PLUGIN_MAX_ISA") or "amx"
    return LEVELS.index(level) <= LEVELS.index(cap)


def avx2_here() -> bool:
    return allowed("avx2") and {"avx2", "fma", "f16c"} <= set(cpu_flags())


def avx512_here() -> bool:
    return allowed("avx512") and avx2_here() and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(cpu_flags())


def avx512_vnni_here() -> bool:
    return avx512_here() and "avx512_vnni" in cpu_flags()


def avx512_bf16_here() -> bool:
    return allowed("avx512_bf16") and avx512_here() and "avx512_bf16" in cpu_flags()


def bf16_lookups_here() -> bool:
    """Whether bfloat16 decode looks the 4-bit codebook up as bfloat16 (vdpbf16ps with AVX512-BF16, vpshufb with AVX2
    alone): the "fused_bf16" kernel."""
    return avx512_bf16_here() or (avx2_here() and not avx512_here())


def amx_here() -> bool:
    """Whether the AMX-BF16 tile kernels run here."""
    return allowed("amx") and avx512_bf16_here() and {"amx_bf16", "amx_tile"} <= set(cpu_flags())


def amx_int8_here() -> bool:
    return amx_here() and "amx_int8" in cpu_flags()


def llm_int8_kernel(m: int, k: int) -> str:
    """The CPU kernel LLM.int8 of m activation rows and k input features runs here (quantizer_plugin/cpu/int8.py)."""
    from quantizer_plugin.cpu import int8

    if m >= int8.LLM_INT8_TILES_MIN_M and k % 64 == 0 and amx_int8_here():
        return "cpu.int8.llm_int8_tiles"
    return "cpu.int8.llm_int8_vnni" if avx512_vnni_here() else "cpu.int8.llm_int8"


def fused_rows_here(dtype, decode_rows: int) -> float:
    """The most activation rows the weight-only formats' fused kernels serve here, by the rule of
    quantizer_plugin/cpu/chunks.py's fused_rows from this CPU's flags: every batch for a 16-bit compute dtype without
    AVX512-BF16 (AVX2 alone, or AVX-512 without it: torch's 16-bit GEMM has no hardware there),
    chunks.BF16_WITHOUT_AMX_FUSED_ROWS with AVX512-BF16 but no AMX, `decode_rows` (the family's GEMV_MAX_M) otherwise."""
    import torch

    from quantizer_plugin.cpu import chunks

    if dtype == torch.float32 or not avx2_here():
        return decode_rows
    if not avx512_bf16_here():
        return float("inf")
    return decode_rows if amx_here() else max(decode_rows, chunks.BF16_WITHOUT_AMX_FUSED_ROWS)
