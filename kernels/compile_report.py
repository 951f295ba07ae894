"""Compiles every kernel at its GPU tile configurations for a GPU architecture, with Triton's own compiler and its
bundled ptxas, no GPU needed, and reports what the compiler says of each: registers per thread, bytes spilled to
local memory, shared memory.

What it catches on a machine without a GPU: code that Triton's interpreter runs but the GPU compiler rejects, and
candidate configurations that spill registers (a spilling weight-streaming kernel cannot run at memory bandwidth,
so such a candidate only costs autotuning time). Every candidate is compiled with the default NF4 layout (or the
int8 format); the other tile layouts and dtypes are compiled at the first candidate of each kernel.

    python -m quantizer_plugin.kernels.compile_report [--arch 90] [--match TEXT] [--jobs N]

Run it where TRITON_INTERPRET is unset: the kernels must have been defined for the GPU compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from . import dequant_matmul, int8_activation, int8_backward, int8_matmul
from .tuning import interpreting

HOPPER = 90
WARP_SIZE = 32


@dataclass
class Build:
    """One kernel at one tile configuration: what to compile."""

    name: str
    kernel: object  # a JITFunction or an Autotuner around one
    pointers: dict[str, str]  # pointer argument -> Triton pointer type ("*bf16", ...)
    constexprs: dict
    config: triton.Config | None = None  # None: the kernel's launch options are in `options`
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        meta = dict(self.config.kwargs) if self.config else {}
        shown = {k: v for k, v in {**self.constexprs, **meta}.items() if k.isupper() and not k.startswith("INTERP")}
        return f"{self.name} " + " ".join(f"{k}={v}" for k, v in shown.items())


@dataclass
class Report:
    build: str  # Build.describe()
    registers: int
    spilled_bytes: int  # spill stores + spill loads, per thread
    shared_bytes: int
    warps: int
    stages: int


def _fn(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


def _launch_attributes(names: list[str], types: dict[str, str]) -> dict:
    """What a launch at Llama-style shapes tells the compiler: torch's allocations are 16-byte aligned, and N, K
    and the row strides are multiples of 16. Without it loads cannot be vectorised or pipelined through shared
    memory, and the registers reported would be those of a kernel no real launch runs."""
    aligned = [
        (index,) for index, name in enumerate(names)
        if types[name].startswith("*") or name in ("N", "K") or name.startswith("stride")
    ]  # fmt: skip
    return {path: [["tt.divisibility", 16]] for path in aligned}


def compile_one(build: Build, arch: int) -> Report:
    fn = _fn(build.kernel)
    constexprs = dict(build.constexprs, **(build.config.kwargs if build.config else {}))
    options = dict(build.options)
    if build.config is not None:
        options.update(num_warps=build.config.num_warps, num_stages=build.config.num_stages)
    types = {name: build.pointers.get(name, "fp32" if name == "threshold" else "i32") for name in fn.arg_names}
    types.update(dict.fromkeys(constexprs, "constexpr"))
    source = ASTSource(fn, types, constexprs=constexprs, attrs=_launch_attributes(fn.arg_names, types))
    log = io.StringIO()
    # A cached binary would skip ptxas and its log, so compile afresh; ptxas prints its log to stdout.
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, WARP_SIZE), options=options)
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise RuntimeError(f"{build.describe()}: no register report in ptxas's log:\n{text}")
    return Report(
        build.describe(), int(registers.group(1)), int(spills.group(1)) + int(spills.group(2)), compiled.metadata.shared,
        compiled.metadata.num_warps, compiled.metadata.num_stages,
    )  # fmt: skip


def _dequant_matmul_builds() -> list[Build]:
    weight = dict(
        packed_ptr="*u8", absmax_ptr="*fp32", absmax_code_ptr="*u8", absmax_scale_ptr="*fp32",
        absmax_offset_ptr="*fp32", dynamic_code_ptr="*fp32", codebook_ptr="*fp32", scale_ptr="*fp32",
        zero_ptr="*fp32",
    )  # fmt: skip
    affine = dict(weight, scale_ptr="*fp16", zero_ptr="*fp16")
    int8 = dict(weight, packed_ptr="*i8")
    kinds = dequant_matmul.CODEBOOK, dequant_matmul.AFFINE, dequant_matmul.INT8, dequant_matmul.FLOAT8
    # (name, weight pointers, KIND, BITS, dtype, block size, aligned rows, double quant): the default NF4 and int4
    # layouts at every tile candidate; then, at the first candidate, NF4 with a block inside one K tile in fp16, rows
    # that straddle blocks and bytes, and a block longer than any K tile; int4 and int2 with short last groups
    # (per-element loads), int2 with whole groups, int3 (per-element loads of its bit planes), weight-only int8, and
    # fp8 (e4m3fn with a scale per row, e5m2 with one per 128 columns).
    every_candidate = [("4bit", weight, kinds[0], 4, "bf16", 64, True, True), ("int4", affine, kinds[1], 4, "bf16", 64, True, False)]
    layouts = every_candidate + [
        ("4bit", weight, kinds[0], 4, "fp16", 16, True, False), ("4bit", weight, kinds[0], 4, "bf16", 64, False, True),
        ("4bit", weight, kinds[0], 4, "bf16", 4096, True, True), ("int4", affine, kinds[1], 4, "bf16", 64, False, False),
        ("int2", affine, kinds[1], 2, "fp16", 64, True, False), ("int2", affine, kinds[1], 2, "fp16", 64, False, False),
        ("int3", affine, kinds[1], 3, "bf16", 64, True, False),
        ("int8 weight-only", int8, kinds[2], 8, "bf16", 64, False, False),
        ("fp8", weight, kinds[3], 8, "bf16", 4096, True, False), ("fp8_e5m2", weight, kinds[3], 8, "fp16", 128, True, False),
    ]  # fmt: skip
    builds = []
    for index, (family, pointers, kind, bits, dt, block, aligned, dq) in enumerate(layouts):
        exponent_bits = {"fp8": 4, "fp8_e5m2": 5}.get(family, 0)
        common = dict(QUANT_BLOCK=block, DQ_BLOCK=256, DOUBLE_QUANT=dq, ALIGNED=aligned, KIND=kind, BITS=bits,
                      EXPONENT_BITS=exponent_bits, DOT_PRECISION="tf32", INTERPRETED=False)  # fmt: skip
        forward = dict(x_ptr="*" + dt, **pointers, bias_ptr="*" + dt, y_ptr="*" + dt, workspace_ptr="*fp32",
                       counter_ptr="*i32")  # fmt: skip
        backward = dict(grad_y_ptr="*" + dt, **pointers, grad_x_ptr="*" + dt)
        for name, kernel, arguments, constexprs in [
            (f"{family} forward, decode", dequant_matmul._FORWARD_DECODE, forward, dict(common, HAS_BIAS=True)),
            (f"{family} forward, prefill", dequant_matmul._FORWARD_PREFILL, forward, dict(common, HAS_BIAS=True)),
            (f"{family} grad_input", dequant_matmul._GRAD_INPUT, backward, common),
        ]:
            configs = kernel.configs if index < len(every_candidate) else kernel.configs[:1]
            builds += [Build(f"{name} ({dt})", kernel, arguments, constexprs, config) for config in configs]
    return builds


def _int8_builds() -> list[Build]:
    builds = []
    for index, dt in enumerate(("bf16", "fp16")):
        first = slice(None) if index == 0 else slice(1)
        tiled = dict(codes_ptr="*i8", x_absmax_ptr="*fp32", x_ptr="*" + dt, flags_ptr="*i32", w_ptr="*i8",
                     w_absmax_ptr="*fp32", bias_ptr="*fp32", y_ptr="*" + dt)  # fmt: skip
        streaming = dict(x_ptr="*" + dt, w_ptr="*i8", w_absmax_ptr="*fp32", bias_ptr="*fp32", y_ptr="*" + dt,
                         workspace_ptr="*fp32", counter_ptr="*i32")  # fmt: skip
        backward = dict(g_ptr="*" + dt, w_ptr="*i8", w_absmax_ptr="*fp32", gx_ptr="*" + dt)
        common = dict(PRECISION="tf32", INTERPRETED=False)
        for name, kernel, pointers, constexprs, options in [
            ("int8 tiled", int8_matmul._tiled_kernel, tiled, dict(common, HAS_OUTLIERS=True, HAS_BIAS=True), {}),
            ("int8 streaming", int8_matmul._streaming_kernel, streaming,
             dict(common, HAS_THRESHOLD=True, HAS_BIAS=True, BLOCK_M=16), dict(enable_fp_fusion=False)),
            ("int8 grad_input", int8_backward._grad_input_kernel, backward, common, {}),
        ]:  # fmt: skip
            builds += [Build(f"{name} ({dt})", kernel, pointers, constexprs, c, options) for c in kernel.configs[first]]
    builds.append(Build("int8 row quantize", int8_activation._quantize_rows_kernel,
                        dict(x_ptr="*bf16", flags_ptr="*i32", codes_ptr="*i8", absmax_ptr="*fp32"),
                        dict(int8_activation.row_quantize_tile(), HAS_THRESHOLD=True),
                        options=dict(enable_fp_fusion=False)))  # fmt: skip
    return builds


def all_builds() -> list[Build]:
    if interpreting():
        raise RuntimeError("the kernels were defined for Triton's interpreter: run this with TRITON_INTERPRET unset")
    return _dequant_matmul_builds() + _int8_builds()


def print_reports(reports: list[Report], file=sys.stdout) -> None:
    print(f"{'regs':>5} {'spill B':>7} {'smem KiB':>8} {'warps':>5} {'stages':>6}  kernel and tile", file=file)
    for r in reports:
        print(f"{r.registers:5d} {r.spilled_bytes:7d} {r.shared_bytes / 1024:8.1f} {r.warps:5d} {r.stages:6d}  "
              f"{r.build}", file=file)  # fmt: skip


def _compile_index(index: int, arch: int, match: str) -> Report:
    return compile_one(select_builds(match)[index], arch)


def select_builds(match: str = "") -> list[Build]:
    return [build for build in all_builds() if match in build.describe()]


def compile_all(arch: int = HOPPER, match: str = "", jobs: int | None = None) -> list[Report]:
    """Reports for every build whose description contains `match`, compiled in `jobs` processes (ptxas and
    Triton's passes are single-threaded)."""
    count = len(select_builds(match))
    with ProcessPoolExecutor(jobs or os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_index, range(count), [arch] * count, [match] * count))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=HOPPER, help="compute capability as an integer (default 90)")
    parser.add_argument("--match", default="", help="only the builds whose description contains this")
    parser.add_argument("--jobs", type=int, default=None, help="compiler processes (default: one per CPU)")
    args = parser.parse_args(argv)
    reports = compile_all(args.arch, args.match, args.jobs)
    print_reports(reports)
    spilling = [r for r in reports if r.spilled_bytes]
    print(f"{len(reports)} builds for sm_{args.arch}, {len(spilling)} spilling")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
