"""LLM.int8 GEMM: ours (LowBitLinear on the Triton kernels) against torch's 16-bit matmul and bitsandbytes' Linear8bitLt.

    python benchmarks/gemm_int8.py                    # on a CUDA GPU: every Llama shape x M = 1..4096 x outlier rate
    python benchmarks/gemm_int8.py --dtype bfloat16
    python benchmarks/gemm_int8.py --cuda-graph       # time CUDA-graph replays: the GPU work without launch overhead
    python benchmarks/gemm_int8.py --smoke            # tiny shapes, checks the script itself (CPU: Triton interpreter)

For each Llama-style (N, K) and M, the activations are random in [-4, 4] with 0%, 0.1% or 1% of the input
columns planted as outliers (scaled up, each with one entry >= the threshold of 6), so that every int8 provider
decomposes the same columns. Each provider is timed on its module's forward (what a model calls) with
benchmarks.harness: do_bench medians and p20/p80, rotating weight copies so that decode shapes read the weight
from HBM, not L2. The error column is max |y - y_fp32| / max |y_fp32| against the float32 product with the
unquantized 16-bit weight. With --cuda-graph, bitsandbytes rows are left out where its forward cannot be captured
(with outliers it learns their columns on the host, a synchronisation that graph capture forbids).

Writes benchmarks/out/gemm_int8-<dtype>.jsonl (long-form rows with device, versions, date) and a markdown table
with the environment and the issue's targets checked (benchmarks/out/gemm_int8-<dtype>.md).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BATCH_SIZES, LLAMA_SHAPES, Row, copies_to_defeat_l2, environment, print_table, time_rotating, write_rows  # noqa: E402

THRESHOLD = 6.0
OUTLIER_RATES = [0.0, 0.001, 0.01]
OURS, BASELINE, PEER = "lowbit-int8", "torch-16bit", "bnb-int8"
SMOKE_SHAPES, SMOKE_BATCH_SIZES = [(40, 72)], [1, 33]


def planted_activations(m: int, k: int, rate: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(m * 7919 + k)
    x = torch.randn(m, k, generator=generator).clamp(-4.0, 4.0)
    columns = torch.randperm(k, generator=generator)[: round(rate * k)]
    x[:, columns] *= 3.0
    x[torch.randint(0, m, (len(columns),), generator=generator), columns] = 2 * THRESHOLD
    return x.to(device=device, dtype=dtype)


class Providers:
    """The three layers for one (N, K), each in enough copies that rotating through them defeats the L2 cache."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: str, rotate: bool = True):
        import bitsandbytes as bnb

        from quantizer_plugin import LowBitLinear
        from quantizer_plugin.formats import QuantScheme

        torch.manual_seed(n + k)
        self.linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        scheme = QuantScheme("int8", outlier_threshold=THRESHOLD)
        self.weight_bytes = {BASELINE: n * k * self.linear.weight.element_size(), OURS: n * k, PEER: n * k}

        def ours():
            return LowBitLinear.from_float(self.linear, scheme, compute_dtype=dtype)

        def peer():
            layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=THRESHOLD)
            layer.load_state_dict(self.linear.state_dict())
            return layer.to(device).eval()  # the move to the device quantizes the weight

        def baseline():
            weight = self.linear.weight.detach().clone()
            return lambda x: torch.nn.functional.linear(x, weight)

        builders = {BASELINE: baseline, OURS: ours, PEER: peer}
        copies = {p: copies_to_defeat_l2(size) if rotate else 1 for p, size in self.weight_bytes.items()}
        self.layers = {p: [build() for _ in range(copies[p])] for p, build in builders.items()}

    def check_ours_runs_on_triton(self, device: str) -> None:
        from quantizer_plugin.ops import select_backend

        if select_backend("int8", torch.device(device)) != "triton":
            raise RuntimeError("the int8 layers would run on the torch reference, not the Triton kernels")


def measure(
    providers: Providers, shape: str, m: int, n: int, k: int, rate: float, x: torch.Tensor, cuda_graph: bool
) -> list[Row]:
    exact = x.float() @ providers.linear.weight.float().T
    rows = []
    for provider, layers in providers.layers.items():
        with torch.no_grad():
            error = ((layers[0](x).float() - exact).abs().max() / exact.abs().max()).item()
            try:
                timing = time_rotating(lambda i, layers=layers: (lambda: layers[i](x)), len(layers), cuda_graph=cuda_graph)
            except RuntimeError as failure:
                if not cuda_graph or provider != PEER:
                    raise
                print(f"{provider} {shape} M={m}: not capturable in a CUDA graph ({failure})", file=sys.stderr)
                continue
        median, p20, p80 = timing
        moved = providers.weight_bytes[provider] + x.numel() * x.element_size() + m * n * x.element_size()
        extra = {"max_rel_error": error, "outlier_rate": rate}
        rows.append(Row(shape, m, provider, median, p20, p80, moved, 2 * m * n * k, extra))
    return rows


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets, checked on these rows (each: met in how many of the rows it covers)."""
    index = {(r.shape, r.m, r.provider): r for r in rows}
    def speedup(r: Row, peer: str) -> float | None:
        other = index.get((r.shape, r.m, peer))
        return other.median_ms / r.median_ms if other else None

    speedups = [(r, speedup(r, BASELINE), speedup(r, PEER)) for r in rows if r.provider == OURS]

    def verdict(name, covered, ok):
        met = sum(ok(s) for s in covered)
        return f"- {name}: met in {met} of {len(covered)} rows" if covered else f"- {name}: no rows measured"

    prefill = [s for s in speedups if s[0].m >= 1024 and s[0].extra["outlier_rate"] <= 0.001]
    decode = [s for s in speedups if s[0].m == 1]
    return [
        verdict("M >= 1024, <= 0.1% outliers: faster than the 16-bit matmul", prefill, lambda s: s[1] > 1.0),
        verdict("M = 1: at least 1.7x faster than the 16-bit matmul", decode, lambda s: s[1] >= 1.7),
        verdict("every M and outlier rate: faster than bitsandbytes", [s for s in speedups if s[2] is not None], lambda s: s[2] > 1.0),
    ]


def error_table(rows: list[Row]) -> str:
    """One line per (shape, M): each provider's error against the float32 product with the 16-bit weight."""
    errors: dict[tuple[str, int], dict[str, float]] = {}
    for r in rows:
        errors.setdefault((r.shape, r.m), {})[r.provider] = r.extra["max_rel_error"]
    providers = [BASELINE, OURS, PEER]
    lines = ["| shape (N x K) | M | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
    for (shape, m), by_provider in errors.items():
        lines.append(f"| {shape} | {m} | " + " | ".join(f"{by_provider[p]:.2e}" for p in providers) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU through Triton's interpreter")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (GPU work alone)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            sys.exit("gemm_int8.py measures GPU kernels: run it on a CUDA machine (or pass --smoke to check the script)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before quantizer_plugin.kernels defines its kernels
        os.environ.setdefault("QUANTIZER_PLUGIN_KERNELS", "triton")
    dtype = getattr(torch, args.dtype)
    shapes, batch_sizes = (SMOKE_SHAPES, SMOKE_BATCH_SIZES) if args.smoke else (LLAMA_SHAPES, BATCH_SIZES)

    rows: list[Row] = []
    for n, k in shapes:
        providers = Providers(n, k, dtype, device, rotate=not args.smoke)
        providers.check_ours_runs_on_triton(device)
        for m in batch_sizes:
            for rate in OUTLIER_RATES:
                shape = f"{n}x{k}, {rate:.1%} outlier cols"
                x = planted_activations(m, k, rate, dtype, device)
                rows += measure(providers, shape, m, n, k, rate, x, cuda_graph=args.cuda_graph and device == "cuda")
                print(f"done {shape} M={m}", file=sys.stderr, flush=True)
        del providers
        if device == "cuda":
            torch.cuda.empty_cache()

    env = environment()
    stem = f"gemm_int8-{args.dtype}" + ("-cuda-graph" if args.cuda_graph else "") + ("-smoke" if args.smoke else "")
    write_rows(rows, args.out / f"{stem}.jsonl", env)
    table = print_table(rows, BASELINE, [PEER], OURS)
    header = ", ".join(f"{key} {value}" for key, value in env.items())
    timing = "CUDA graph replays" if args.cuda_graph and device == "cuda" else "eager launches from Python"
    report = "\n\n".join([f"LLM.int8 GEMM, {args.dtype} activations, {timing} ({header})", table, "Targets:\n" + "\n".join(targets(rows)),
                          "max |y - y_fp32| / max |y_fp32|:\n\n" + error_table(rows)])  # fmt: skip
    (args.out / f"{stem}.md").write_text(report + "\n")
    print("\n".join(targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
