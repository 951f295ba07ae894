"""Every kernel benchmark the kernel issues ask for, in one unattended command, collected into benchmarks/RESULTS-gpu.md
(the CPU tables are in benchmarks/RESULTS.md).

    python benchmarks/results.py                      # on a GPU: writes benchmarks/RESULTS-gpu.md
    python benchmarks/results.py --smoke --out DIR    # tiny shapes, any machine: checks the whole run works

Runs, in order, each writing its own rows and report into a folder of benchmarks/out/ (or DIR):
- gemm_4bit.py --cuda-graph: NF4 GEMMs and the decoder block in bf16, timed as CUDA-graph replays (the GPU work
  alone, as a decode loop captured with CUDA graphs runs it); the 4-bit targets are checked on these rows;
- gemm_4bit.py: the same, launched eagerly from Python (what a plain eager forward pays per call);
- gemm_int8.py --cuda-graph, in fp16 and in bf16: LLM.int8 at 0, 0.1 and 1% outlier columns.
RESULTS-gpu.md is those reports one after another, each under its command line. A run that fails stops the script and
writes no RESULTS-gpu.md, so a half-measured file is never mistaken for a result.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gemm_4bit  # noqa: E402
import gemm_int8  # noqa: E402

# (folder under --out, title, benchmark module, its arguments); each run writes one .md report into its folder
RUNS = [
    ("nf4-bf16-graph", "NF4, bf16, CUDA-graph replays", gemm_4bit, ["--cuda-graph"]),
    ("nf4-bf16-eager", "NF4, bf16, eager launches", gemm_4bit, []),
    ("int8-fp16-graph", "LLM.int8, fp16, CUDA-graph replays", gemm_int8, ["--cuda-graph", "--dtype", "float16"]),
    ("int8-bf16-graph", "LLM.int8, bf16, CUDA-graph replays", gemm_int8, ["--cuda-graph", "--dtype", "bfloat16"]),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes through every run (any machine)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the reports (default benchmarks/out)")
    parser.add_argument("--results", type=Path, default=None, help="where to write the results (default benchmarks/RESULTS-gpu.md)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("timings need a GPU; on this machine only --smoke runs (through Triton's interpreter)")
    out = args.out or HERE / "out"
    results = args.results or (out / "RESULTS-gpu.md" if args.smoke else HERE / "RESULTS-gpu.md")

    sections = []
    for folder, title, module, run_args in RUNS:
        run_args = [*run_args, *(["--smoke"] if args.smoke else [])]
        command = f"python benchmarks/{Path(module.__file__).name} {' '.join(run_args)}".strip()
        print(f"\n=== {title}: {command}", flush=True)
        if module.main([*run_args, "--out", str(out / folder)]) != 0:
            print(f"{title} failed; {results} not written", file=sys.stderr)
            return 1
        # the run's own headings, one level down
        (report,) = (out / folder).glob("*.md")
        body = report.read_text().replace("\n## ", "\n### ").removeprefix("# ")
        sections.append(f"## {title}\n\n`{command}` ({body.splitlines()[0]})\n" + "\n".join(body.splitlines()[1:]))

    header = "# Kernel benchmark results\n\nWritten by `python benchmarks/results.py`" + (
        " (--smoke: tiny shapes, not a measurement)" if args.smoke else ""
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n\n".join([header, *sections]) + "\n")
    print(f"\nwrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
