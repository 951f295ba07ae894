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

import hashlib
import importlib.util
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

NATIVE_ENV = "QUANTIZER_PLUGIN_NATIVE"
SOURCES = [Path(__file__).with_name("csrc") / name
           for name in ("cpu_features.cpp", "codebook4bit.cpp", "int8.cpp", "int8_amx.cpp", "llm_int8.cpp", "affine.cpp", "float8.cpp", "dense.cpp",
                         "q8_0.cpp", "module.cpp")]
# Caps the instruction sets the kernels use (csrc/cpu_features.cpp), read once per process: a machine with AMX runs
# the paths of a CPU without it. From the most to the least: everything the CPU has, then without AMX, without the
# BF16 instructions too, without AVX-512, and plain C++ only.
MAX_ISA_ENV = "QUANTIZER_PLUGIN_MAX_ISA"
MAX_ISA_VALUES = ("amx", "avx512_bf16", "avx512", "avx2", "scalar")
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


NAME = "quantizer_plugin_cpu"
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")  # torch.utils.cpp_extension.load extends the lists it is given
LDFLAGS = ("-fopenmp",)
# Measured: 70 s on a 2-core AMD EPYC (no AVX-512), g++ 12, torch 2.13.0, in CI; the issue that asked saw 2 minutes.
BUILD_ESTIMATE = "1 to 2 minutes on 2 cores"


def build_directory() -> Path:
    """Where this build of the kernels is cached: torch's extensions folder (TORCH_EXTENSIONS_DIR, default
    ~/.cache/torch_extensions), one subfolder per hash of the sources, flags, torch and Python, so that a library
    found there is always the one these sources make, and its absence means a build is coming."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES[0].parent.iterdir()):
        if path.suffix in (".cpp", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join([*CFLAGS, *LDFLAGS, torch.__version__, sys.version]).encode())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    return root / f"{NAME}-{digest.hexdigest()[:16]}"


def _build() -> ModuleType | None:
    check_max_isa()  # before the build, so that a typo is an error rather than a silent cap
    try:
        from torch.utils.cpp_extension import load as load_extension

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        library = directory / f"{NAME}.so"
        # torch's builder holds `lock` in the folder while it builds there
        if library.exists() and not (directory / "lock").exists():
            # The folder's name is a hash of everything the library depends on, so a library found there is the one
            # these sources make: import it without torch's builder, whose ninja file names this torch's install
            # path and would rebuild everything for another venv with the same torch (CI's lower-bounds venv).
            module = _import_library(library)
        else:  # the one slow step of a first use: say so before it starts
            print(f"quantizer_plugin: building the native CPU kernels once ({BUILD_ESTIMATE}; cached in {directory}; "
                  "`quantizer-plugin build-kernels` does it ahead of time)", file=sys.stderr, flush=True)  # fmt: skip
            started = time.perf_counter()
            module = load_extension(name=NAME, sources=[str(source) for source in SOURCES], extra_cflags=list(CFLAGS),
                                    extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)  # fmt: skip
            print(f"quantizer_plugin: built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
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


def _import_library(path: Path) -> ModuleType:
    """The built extension imported from its file, as torch's builder imports it after a build."""
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CPU_CHECKS = ("uses_avx2", "uses_avx512", "uses_avx512_vnni", "uses_avx512_bf16", "uses_amx_bf16", "uses_amx_int8")


def _answer_checks_once(module: ModuleType) -> None:
    # What this CPU supports never changes within a process. Answered by Python functions returning the first
    # answer, the checks the entry points make on every call are traced by torch.compile; a pybind11 call would
    # break its graph.
    for name in CPU_CHECKS:
        answer = getattr(module, name)()
        setattr(module, name, lambda answer=answer: answer)
