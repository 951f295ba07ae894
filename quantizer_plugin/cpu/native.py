"""The one place that decides "compiled or fallback" for the CPU backend's native kernels.

The C++ sources in csrc/ are built on first use with torch.utils.cpp_extension.load (g++ and ninja) and cached by
torch in its extensions folder (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), so later processes only
load the library. The build uses -O3 and no -march=native: the AVX-512 paths are compiled with target attributes
and chosen at run time, so a cached build is safe on any x86-64 machine. -ffp-contract=off keeps every code x absmax
product a single rounding, as in the reference.

If the build or the load fails (no compiler, no ninja, an unsupported platform), `load()` returns None after one
warning that says why, and the CPU backend runs the plain-torch reference instead. QUANTIZER_PLUGIN_NATIVE=0 turns
the native kernels off on purpose (the tests use it to check that fallback), and QUANTIZER_PLUGIN_MAX_ISA caps the
instruction sets they use (MAX_ISA_VALUES), so that every path a CPU chooses at run time can be run on one machine.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

NATIVE_ENV = "QUANTIZER_PLUGIN_NATIVE"
SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("cpu_features.cpp", "codebook4bit.cpp", "int8.cpp", "int8_amx.cpp", "affine.cpp", "module.cpp")]
# Caps the instruction sets the kernels use (csrc/cpu_features.cpp), read once per process: a machine with AMX runs
# the paths of a CPU without it. From the most to the least: everything the CPU has, then without AMX, without the
# BF16 instructions too, and plain C++ only.
MAX_ISA_ENV = "QUANTIZER_PLUGIN_MAX_ISA"
MAX_ISA_VALUES = ("amx", "avx512_bf16", "avx512", "scalar")
# The weight dtypes the native quantizers read; others go to the format's own quantize.
QUANTIZER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    return os.environ.get(NATIVE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def load() -> ModuleType | None:
    """The compiled kernels, built on first use; None (after one warning) when they cannot be built here."""
    if not enabled():
        return None
    if "module" in _loaded:  # every forward asks: no lock once the build is decided
        return _loaded["module"]
    with _lock:
        if "module" not in _loaded:
            _loaded["module"] = _build()
        return _loaded["module"]


def check_max_isa() -> None:
    value = os.environ.get(MAX_ISA_ENV, "")
    if value and value not in MAX_ISA_VALUES:
        raise ValueError(f"{MAX_ISA_ENV}={value!r}: expected one of {', '.join(MAX_ISA_VALUES)}")


def _build() -> ModuleType | None:
    check_max_isa()  # before the build, so that a typo is an error rather than a silent cap
    try:
        from torch.utils.cpp_extension import load as load_extension

        module = load_extension(
            name="quantizer_plugin_cpu",
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # a missing compiler surfaces as OSError, RuntimeError or CalledProcessError
        warnings.warn(
            f"quantizer_plugin: the native CPU kernels could not be built ({type(error).__name__}: {error}); "
            "quantized layers on the CPU run the plain-torch reference instead, which is much slower. "
            "Install g++ and ninja to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    _answer_checks_once(module)
    return module


CPU_CHECKS = ("uses_avx512", "uses_avx512_bf16", "uses_amx_bf16", "uses_amx_int8")


def _answer_checks_once(module: ModuleType) -> None:
    # What this CPU supports never changes within a process. Answered by Python functions returning the first
    # answer, the checks the entry points make on every call are traced by torch.compile; a pybind11 call would
    # break its graph.
    for name in CPU_CHECKS:
        answer = getattr(module, name)()
        setattr(module, name, lambda answer=answer: answer)
