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


def fused_at_every_batch(dtype) -> bool:
    """Whether the weight-only formats' fused kernels serve every batch size: a 16-bit compute dtype on a CPU with
    AVX2 alone (torch's 16-bit GEMM has no hardware there; the chunks lose to the fused kernels at every size)."""
    import torch

    return dtype != torch.float32 and avx2_here() and not avx512_here()
