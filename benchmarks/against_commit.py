"""This tree against an earlier commit on the same CPU: a CPU benchmark run in both, the runs interleaved.

    python benchmarks/against_commit.py 993e336 cpu_decode --providers bf16,lowbit-nf4,lowbit-int8 --rounds 3
    python benchmarks/against_commit.py 993e336 cpu_layers --providers bf16,lowbit-nf4,lowbit-int4 --rounds 7

A refactoring must not slow the kernels down; this shows it. The earlier commit's sources (and the later one's,
with --new; by default the working tree runs) are exported (git archive) into the output folder, and the benchmark
(cpu_decode.py or cpu_layers.py, the arguments after the benchmark's name passed through) runs alternately from each
tree, `--repeats` times each, in fresh processes that import that tree's package first (PYTHONPATH). Two processes
never share a timing, so each run's figures are its providers' times over bf16's in that same run (bf16 is in every
run and the same code in both trees); the report gives, per row, the median of those ratios for each tree and
new/old (below 1: the later tree is faster). Both trees build their own native kernels once. Nothing else should
run meanwhile: the decode-sized rows are bound by memory bandwidth, which other work takes.

Writes benchmarks/out/against_<rev>/<bench>.md (and keeps each run's jsonl there).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHMARKS = ("cpu_decode", "cpu_layers")
BASELINE = "bf16"


def _short(rev: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def export(rev: str, tree: Path) -> Path:
    """The commit's tracked files under `tree` (once)."""
    if not (tree / "pyproject.toml").exists():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        tree.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
    return tree


def run(tree: Path, bench: str, out: Path, arguments: list[str]) -> list[dict]:
    """One run of the benchmark from `tree`: its jsonl rows."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(tree / "benchmarks" / f"{bench}.py"), "--out", str(out), *arguments]
    done = subprocess.run(command, env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in (out / f"{bench}.jsonl").read_text().splitlines()]


def ratios(rows: list[dict]) -> dict[tuple, float]:
    """(shape, M, provider) -> its median time over bf16's at the same shape and M, in this run."""
    baseline = {(r["shape"], r["m"]): r["median_ms"] for r in rows if r["provider"] == BASELINE}
    return {(r["shape"], r["m"], r["provider"]): r["median_ms"] / baseline[(r["shape"], r["m"])]
            for r in rows if (r["shape"], r["m"]) in baseline}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the earlier commit")
    parser.add_argument("--new", default=None,
                        help="the later commit (default: this working tree, which must then not change during the run)")
    parser.add_argument("bench", choices=BENCHMARKS)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each tree, interleaved (default 3)")
    args, passed = parser.parse_known_args(argv)
    label = _short(args.rev)
    folder = HERE / "out" / f"against_{label}"
    new = export(args.new, folder / f"tree-{_short(args.new)}") if args.new else ROOT
    trees = {"old": export(args.rev, folder / "tree"), "new": new}
    shared_model = folder / "model"  # cpu_decode's checkpoint, built once for both trees
    runs: dict[str, list[dict[tuple, float]]] = {"old": [], "new": []}
    env_line = ""
    for repeat in range(args.repeats):
        for name, tree in trees.items():
            out = folder / f"{name}-{repeat}"
            if args.bench == "cpu_decode":
                out.mkdir(parents=True, exist_ok=True)
                (shared_model / "llama-0.4b").mkdir(parents=True, exist_ok=True)
                link = out / "llama-0.4b"
                if not link.exists():
                    link.symlink_to(shared_model / "llama-0.4b", target_is_directory=True)
            rows = run(tree, args.bench, out, passed)
            runs[name].append(ratios(rows))
            facts = ("device", "threads", "our kernels use", "torch")
            env_line = ", ".join(f"{key} {rows[0][key]}" for key in facts if key in rows[0])
            print(f"{name} run {repeat + 1}/{args.repeats} done", flush=True)
    keys = [key for key in runs["new"][0] if key[2] != BASELINE and all(key in r for r in runs["old"] + runs["new"])]
    lines = [
        f"# {args.bench}: {_short(args.new) if args.new else 'this tree'} against {label}, {args.repeats} interleaved "
        "runs each",
        "",
        f"{env_line}; arguments: {' '.join(passed) or '(defaults)'}.",
        "Each figure is a provider's median time over bf16's in the same run (lower is faster); new/old below 1: this "
        "tree is faster.",
        "",
        "| shape | M | provider | old / bf16 | new / bf16 | new / old |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        old = statistics.median(r[key] for r in runs["old"])
        new = statistics.median(r[key] for r in runs["new"])
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {old:.3f} | {new:.3f} | {new / old:.3f} |")
    (folder / f"{args.bench}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
