"""The timing harness shared by the GEMM benchmarks (4-bit and int8): medians, rows, the summary table.

Timings are triton.testing.do_bench medians with the 20th and 80th percentiles. A decode-shaped GEMM reads its
weight once, and an H100's 50 MB L2 holds a whole 4-bit 4096x4096 weight, so `rotating` cycles through enough
copies of the operands that each call finds its weight in HBM, not in L2.

Every measurement becomes one long-form row (shape, M, provider, median, p20, p80, derived rates, device,
versions, date), written as JSON lines so runs can be compared later; `print_table` summarises them.
"""

from __future__ import annotations

import datetime
import json
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Llama-style (N, K) = (out_features, in_features) of the projections of Llama-3 8B and 70B.
LLAMA_SHAPES: list[tuple[int, int]] = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]
BATCH_SIZES: list[int] = [1, 4, 16, 64, 256, 1024, 4096]
L2_BYTES = 50 * 2**20  # H100 L2; a safe overestimate for A100 (40 MB) too


@dataclass
class Row:
    shape: str
    m: int
    provider: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    bytes_moved: int = 0
    flops: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_moved / self.median_ms / 1e6

    @property
    def tflop_per_s(self) -> float:
        return self.flops / self.median_ms / 1e9


def environment() -> dict:
    """Device, versions and date, stored with every result file."""
    import transformers
    import triton

    info = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def copies_to_defeat_l2(bytes_per_call: int) -> int:
    """How many operand sets to rotate through so that consecutive calls never share a cached weight."""
    return max(1, -(-2 * L2_BYTES // max(bytes_per_call, 1)))


def time_rotating(
    make_call: Callable[[int], Callable[[], object]], copies: int, warmup: int = 25, rep: int = 100, cuda_graph: bool = False
):
    """Median, p20 and p80 in ms of calls that cycle through `copies` prepared operand sets.

    `make_call(i)` returns a zero-argument callable using the i-th operand set; all are built before timing.
    """
    calls = [make_call(i) for i in range(copies)]
    state = {"i": 0}

    def run():
        calls[state["i"] % copies]()
        state["i"] += 1

    return bench(run, warmup=warmup, rep=rep, cuda_graph=cuda_graph)


def bench(fn: Callable[[], object], warmup: int = 25, rep: int = 100, cuda_graph: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) in ms: triton's do_bench on a GPU; on CPU (smoke runs only) a wall-clock loop.

    do_bench times calls launched from Python one after another, so a kernel shorter than its launch overhead is
    timed at the launch rate; `cuda_graph` replays the calls from a CUDA graph instead (as a decode loop captured
    with CUDA graphs would run them), which times the GPU work alone.
    """
    if torch.cuda.is_available():
        import triton.testing

        if cuda_graph:
            # the calls are captured one after another, so a rotating `fn` cycles through its copies in the graph too
            median, p20, p80 = triton.testing.do_bench_cudagraph(fn, rep=rep, quantiles=[0.5, 0.2, 0.8])
        else:
            median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return median, p20, p80
    import time

    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = torch.tensor(times).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return quantiles[0], quantiles[1], quantiles[2]


def write_rows(rows: Sequence[Row], path: Path, env: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for row in rows:
            record = {**asdict(row), "gb_per_s": row.gb_per_s, "tflop_per_s": row.tflop_per_s, **env}
            out.write(json.dumps(record) + "\n")


def print_table(rows: Sequence[Row], baseline: str, peers: Sequence[str], ours: str, decode_max_m: int = 16) -> str:
    """A markdown table: one line per (shape, M, provider), rate, and our speedups over the baseline and peers."""
    index = {(r.shape, r.m, r.provider): r for r in rows}
    header = "| shape (N x K) | M | provider | median ms | p20-p80 ms | GB/s or TFLOP/s | " + " | ".join(
        f"{ours} speedup vs {p}" for p in [baseline, *peers]
    ) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if not (r.bytes_moved or r.flops):
            rate = ""
        elif r.m <= decode_max_m:
            rate = f"{r.gb_per_s:.0f} GB/s"
        else:
            rate = f"{r.tflop_per_s:.1f} TFLOP/s"
        speedups = []
        for peer in [baseline, *peers]:
            other = index.get((r.shape, r.m, peer))
            speedups.append(f"{other.median_ms / r.median_ms:.2f}x" if r.provider == ours and other else "")
        lines.append(
            f"| {r.shape} | {r.m} | {r.provider} | {r.median_ms:.4f} | {r.p20_ms:.4f}-{r.p80_ms:.4f} | {rate} | "
            + " | ".join(speedups) + " |"
        )
    table = "\n".join(lines)
    print(table)
    return table


# --- CPU timing: interleaved rounds --------------------------------------------------------------------------------


def native_paths() -> str:
    """Which instruction sets our CPU kernels use here (after QUANTIZER_PLUGIN_MAX_ISA): the same figures mean
    different paths on a CPU with AMX, one with AVX-512 only, and one without."""
    import os

    from quantizer_plugin.cpu import native

    kernels = native.load()
    if kernels is None:
        return "none (the plain-torch reference)"
    used = [name.removeprefix("uses_") for name in native.CPU_CHECKS if getattr(kernels, name)()]
    cap = os.environ.get(native.MAX_ISA_ENV)
    return (", ".join(used) or "plain C++ only") + (f" ({native.MAX_ISA_ENV}={cap})" if cap else "")


def cpu_environment() -> dict:
    """CPU model, threads, versions and date, stored with every CPU result file."""
    from importlib import metadata

    model = platform.processor() or "cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    info = {"date": datetime.date.today().isoformat(), "device": model, "threads": torch.get_num_threads(),
            "cpu capability": torch.backends.cpu.get_cpu_capability(), "our kernels use": native_paths()}  # fmt: skip
    for package in ("torch", "transformers", "bitsandbytes", "optimum-quanto", "torchao"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def read_bandwidth_gb_s(megabytes: int = 512, repeats: int = 7) -> float:
    """The machine's read bandwidth on torch's threads, in GB/s: the median time of summing a float32 buffer of
    `megabytes` MiB (far past every cache; a vectorised, threaded sum of it is a pure stream of reads)."""
    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    buffer.sum()  # first touch
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - started)
    return buffer.nbytes / sorted(times)[repeats // 2] / 1e9


def interleaved_medians(
    calls: dict[str, Callable[[], object]], rounds: int, sample_ms: float = 2.0
) -> dict[str, tuple[float, float, float]]:
    """(median, p20, p80) in ms per call for each named call, over `rounds` rounds that time every call in turn,
    each round in its own shuffled order.

    Each sample is the mean of enough back-to-back calls to last about `sample_ms` (a fast call is otherwise
    below the timer's resolution and the loop's own overhead).
    """
    import time

    repeats = {}
    for name, fn in calls.items():
        fn()  # warm-up: first-call costs (a native build, oneDNN's primitive cache) stay out of the samples
        start = time.perf_counter()
        fn()
        once_ms = (time.perf_counter() - start) * 1e3
        repeats[name] = max(1, int(sample_ms / max(once_ms, 1e-4)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(rounds):
        # each round in its own (seeded) order, so that no provider always runs right after the same other one (one
        # that follows a 16-bit provider finds its weights pushed out of the caches)
        order = list(calls)
        random.Random(round_index).shuffle(order)
        for name in order:
            fn = calls[name]
            start = time.perf_counter()
            for _ in range(repeats[name]):
                fn()
            samples[name].append((time.perf_counter() - start) * 1e3 / repeats[name])
    result = {}
    for name, values in samples.items():
        median, p20, p80 = torch.tensor(values).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
        result[name] = (median, p20, p80)
    return result


def markdown_table(rows: Sequence[Row], baseline: str, ours: Sequence[str]) -> str:
    """Shape, M, provider, median and p20-p80 ms, speedup over the baseline (>1: faster), and the error column."""
    index = {(r.shape, r.m, r.provider): r for r in rows}
    lines = [f"| shape (N x K) | M | provider | median ms | p20-p80 ms | speedup vs {baseline} | max rel error |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        base = index.get((r.shape, r.m, baseline))
        speedup = f"{base.median_ms / r.median_ms:.2f}x" if base else ""
        name = f"**{r.provider}**" if r.provider in ours else r.provider
        error = r.extra.get("rel_error")
        lines.append(f"| {r.shape} | {r.m} | {name} | {r.median_ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | {speedup} | "
                     f"{'' if error is None else f'{error:.1e}'} |")  # fmt: skip
    return "\n".join(lines)


RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def publish(benchmark: str, lines: list[str], env: dict, out: Path, record: str | None, smoke: bool) -> None:
    """A benchmark's report: written to out/<benchmark>.md and printed, and with `record` (a path) also written into
    that results file as this machine's section (record_section), without its title and environment lines (the
    section's heading gives them)."""
    text = "\n".join(lines)
    (out / f"{benchmark}.md").write_text(text + "\n")
    print(text)
    if record:
        name = benchmark + (" (smoke run, not a measurement)" if smoke else "")
        key = record_section(name, "\n".join(lines[2:]), env, Path(record))
        print(f"recorded in {record}: {key}")


def record_section(benchmark: str, report: str, env: dict, results: Path = RESULTS) -> str:
    """Write `report` into results (benchmarks/RESULTS.md) as the section of this benchmark on this machine, in place of
    the one it had there, and return its key; other benchmarks' and other machines' sections are left as they are.

    A section is keyed by the benchmark, the CPU model and the kernel paths ours used (the same figures mean different
    things on a CPU with AMX, with AVX-512 only and with AVX2 only), and opens with the environment and the date."""
    key = f"{benchmark} on {env.get('device', 'unknown CPU')} ({env.get('our kernels use', 'unknown paths')})"
    begin, end = f"<!-- results: {key} -->", f"<!-- /results: {key} -->"
    title = f"### {key}, {env.get('date', 'undated')}"
    body = "\n".join([begin, title, "", report.strip(), end])
    text = results.read_text() if results.exists() else "# Measured results\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    results.write_text(text)
    return key
