"""Per-token overhead of a decode step: what a greedy decode step of cpu_decode.py's 0.4B Llama spends outside the
quantized linear layers and the output head (issue 25 asks for at most 2 ms).

    python benchmarks/decode_overhead.py [--record]   # the model of cpu_decode.py (built once in benchmarks/out)
    python benchmarks/decode_overhead.py --smoke      # a tiny Llama: checks that it runs

Each provider's model is timed as loaded and with every quantized linear and the head replaced by a stand-in that
costs next to nothing yet still reads its input (column 0 of x, broadcast to the output width), so that
torch.compile cannot drop the attention and norms that feed them. The stand-in step's ms per token is the overhead:
attention, norms, rotary, the cache, generate's own work per token and Python. Both variants of every provider run
in one process, in interleaved rounds, timed as cpu_decode.py times decode (from the first new token to the last).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpu_decode import COMPILED, PROMPT_TOKENS, decode_ms_per_token, load, push_times, run_settings, settings_line  # noqa: E402
from harness import RESULTS, cpu_environment, publish  # noqa: E402

PROVIDERS = ["lowbit-nf4", "lowbit-nf4-compiled", "lowbit-nf4-q8_0-compiled", "lowbit-int8-compiled"]
TARGET_MS = 2.0  # issue 25: a decode step spends at most this outside the linear layers and the head


@contextlib.contextmanager
def layers_stood_in():
    """Every quantized linear and the kept head answer with column 0 of their input, broadcast to their width."""
    from quantizer_plugin import ops

    real = ops.lowbit_linear, ops.kept_linear
    ops.lowbit_linear = lambda x, layer: x[..., :1].expand(*x.shape[:-1], layer.out_features).contiguous()
    ops.kept_linear = lambda x, weight, bias: x[..., :1].expand(*x.shape[:-1], weight.shape[0]).contiguous()
    try:
        yield
    finally:
        ops.lowbit_linear, ops.kept_linear = real


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, smoke 2)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--record", nargs="?", const=str(RESULTS), default=None,
                        help="also write the report into benchmarks/RESULTS.md (or the file given)")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    path, rounds, new_tokens, prompt = run_settings(out, args.smoke, args.rounds)
    variants = {"as loaded": contextlib.nullcontext, "stand-ins": layers_stood_in}
    models = {provider: load(provider, path, None, out, PROMPT_TOKENS + new_tokens + 8)
              for provider in args.providers.split(",")}  # fmt: skip
    for provider, model in models.items():  # warm-up, and each variant's compilation
        for stand_in in variants.values():
            with stand_in():
                push_times(provider, model, prompt, new_tokens if provider.endswith(COMPILED) else 2, warm=False)
    samples = {(provider, variant): [] for provider in models for variant in variants}
    for _ in range(rounds):
        for provider, model in models.items():
            for variant, stand_in in variants.items():
                with stand_in():
                    # with dynamo's guards checked (warm=False): both variants' graphs are cached for one code
                    # object, and only the guards tell them apart
                    times = push_times(provider, model, prompt, new_tokens, warm=False)
                    samples[provider, variant].append(decode_ms_per_token(times))
    median = {key: torch.tensor(values).median().item() for key, values in samples.items()}

    env = cpu_environment()
    lines = [
        "# Decode step overhead" + (" (smoke run: a tiny model, not a measurement)" if args.smoke else ""),
        "",
        settings_line(env, new_tokens, rounds),
        "",
        "| provider | ms per token | with the layers stood in (overhead) | the layers and the head |",
        "|---|---|---|---|",
    ]
    for provider in models:
        whole, overhead = median[provider, "as loaded"], median[provider, "stand-ins"]
        lines.append(f"| {provider} | {whole:.1f} | {overhead:.1f} | {whole - overhead:.1f} |")
    lines += ["", "Targets:"]
    for provider in models:
        overhead = median[provider, "stand-ins"]
        verdict = "PASS" if overhead <= TARGET_MS else "FAIL"
        lines.append(f"- {provider}: {overhead:.1f} ms per step outside the layers and the head "
                     f"(target <= {TARGET_MS}): {verdict}")  # fmt: skip
    publish("decode_overhead", lines, env, out, args.record, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
