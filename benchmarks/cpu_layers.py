"""One quantized linear layer on the CPU: ours against the bf16 matmul and every installed peer, in one process.

    python benchmarks/cpu_layers.py                 # 4096x4096 and 14336x4096, M = 1, 16, 128
    python benchmarks/cpu_layers.py --smoke         # tiny shapes, a few rounds: checks that it runs

Providers (each skipped, with the reason in the report, where its library is missing or refuses the layer):
- bf16: torch.nn.functional.linear on the 16-bit weight (oneDNN; AMX on CPUs that have it);
- lowbit-nf4, lowbit-fp4 (block 64, double quant), lowbit-int8 (LLM.int8: int8 activations, outlier
  columns in 16-bit), lowbit-int8-wo (activations=None: weight-only), lowbit-int4, lowbit-int2 (group 64),
  lowbit-fp8 (e4m3fn, a scale per row), lowbit-fp8-b128 (a scale per 128 columns of a row, the block of
  transformers' FP8 checkpoints), lowbit-nf4-q8_0, lowbit-int4-q8_0, lowbit-int2-q8_0 (activations="q8_0"): our
  LowBitLinear through the dispatch
  seam, i.e. the CPU backend (the record of which kernel served the calls goes in the report), its tensors on huge
  pages as from_pretrained places a model's (huge_pages.py);
- bnb-nf4, bnb-int8: bitsandbytes' Linear4bit / Linear8bitLt;
- lowbit-w8a8 (int8 weights, static int8 activations), lowbit-w8a8-fp8 (fp8 weights, static e4m3 activations),
  their step STATIC_INPUT_ABSMAX over the grid's largest value; lowbit-int8-dynamic (LLM.int8 with outlier_threshold
  0: per-token int8 activations);
- quanto-int2, quanto-int4, quanto-int8, quanto-fp8: optimum-quanto's qint2 / qint4 (group 64) / qint8 / qfloat8
  weights, bf16 activations; quanto-w8a8, quanto-w8a8-fp8: qint8 / qfloat8 weights and activations, calibrated by
  its Calibration on 128 standard normal rows;
- torch-int4: torch's own CPU int4 kernel (_weight_int4pack_mm_for_cpu) on lowbit-int4's codes, group 64 (its scale
  and zero point rounded to bfloat16, as that op takes them);
- torchao-int8: torchao's Int8WeightOnlyConfig; torchao-int4: Int4WeightOnlyConfig (group 64, plain packing).
Timings are medians (with p20-p80) over interleaved rounds: each round times every provider once, in turn, so that
drift of the machine touches all of them alike. Each sample is the mean of enough back-to-back calls to last about
2 ms. The error column is max |y - y_exact| / max |y_exact| against the float64 product with the 16-bit weight.
All weights stay resident (no rotation): every provider reads its weight from the same cache level.

Writes benchmarks/out/cpu_layers.jsonl (one row per shape, M and provider) and benchmarks/out/cpu_layers.md (the
table, the environment and the targets of the CPU-speed issue with pass/fail).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    RESULTS, Row, cpu_environment, interleaved_medians, markdown_table, read_bandwidth_gb_s, publish, write_rows,
)

SHAPES = [(4096, 4096), (14336, 4096)]
BATCH_SIZES = [1, 16, 128]
SMOKE_SHAPES = [(256, 512)]
SMOKE_BATCH_SIZES = [1, 16]
DTYPE = torch.bfloat16
OURS = ["lowbit-nf4", "lowbit-fp4", "lowbit-int8", "lowbit-int8-wo", "lowbit-int4", "lowbit-int3", "lowbit-int2",
        "lowbit-fp8", "lowbit-fp8-b128", "lowbit-nf4-q8_0", "lowbit-int4-q8_0", "lowbit-int2-q8_0", "lowbit-w8a8",
        "lowbit-w8a8-fp8", "lowbit-int8-dynamic"]  # fmt: skip
PEERS = ["bnb-nf4", "bnb-int8", "quanto-int2", "quanto-int4", "quanto-int8", "quanto-fp8", "quanto-w8a8",
         "quanto-w8a8-fp8", "torchao-int4", "torchao-int8", "torch-int4"]  # fmt: skip
# Static activations' step in the benchmark (the inputs are standard normal, |x| up to about 5): 5 over the grid's
# largest value, as a calibration on such inputs would record.
STATIC_INPUT_ABSMAX = 5.0
# Prefill targets against bf16 (the activations issue's W8A8 int8 at M = 128, on VNNI or AMX-INT8).
PREFILL_TARGETS = {"lowbit-w8a8": 1.3}
# At M = 1 a layer streams its weight once: each of ours (and bf16) should read it at this share of the machine's
# measured read bandwidth (the decode-speed issue's target).
BANDWIDTH_TARGET = 0.85
# Decode (M = 1) targets against bf16: the CPU-speed issue's (nf4, fp4, int8) and the integer formats issue's.
DECODE_TARGETS = {"lowbit-nf4": 2.0, "lowbit-fp4": 2.0, "lowbit-int8": 1.5, "lowbit-int8-wo": 1.5, "lowbit-int4": 2.0,
                  "lowbit-int3": 2.5, "lowbit-int2": 1.0, "lowbit-fp8": 1.5, "lowbit-fp8-b128": 1.5}  # fmt: skip
# The fp8 issue's decode target against our own weight-only int8 (the same bytes per weight): at least as fast.
PEER_DECODE_TARGETS = {"lowbit-fp8": "lowbit-int8-wo", "lowbit-fp8-b128": "lowbit-int8-wo"}


def scheme_of(provider: str):
    from quantizer_plugin.formats import QuantScheme

    weights = provider.removeprefix("lowbit-")
    if weights == "int8-wo":
        return QuantScheme("int8", activations=None)
    if weights == "int8-dynamic":  # per-token int8 activations, no outlier columns
        return QuantScheme("int8", activations="int8", outlier_threshold=0.0)
    if weights.startswith("w8a8"):  # static activations, one calibrated step per layer (no smoothing: the kernel)
        fp8 = weights.endswith("fp8")
        return QuantScheme("fp8" if fp8 else "int8", activations="fp8_static" if fp8 else "int8_static")
    if weights.startswith("fp8"):
        return QuantScheme("fp8", block_size=128 if weights.endswith("-b128") else None)
    # activations="q8_0" where named; otherwise the format's default (LLM.int8's int8 activations for int8)
    modes = {"activations": "q8_0"} if weights.endswith("-q8_0") else {}
    weights = weights.removesuffix("-q8_0")
    if weights in ("nf4", "fp4"):
        return QuantScheme(weights, 64, True, **modes)
    return QuantScheme(weights, 64, **modes)


class TorchInt4(torch.nn.Module):
    """torch's CPU int4 weight-only matmul on an int4 LowBitLinear's codes: w = (q - 8) * scale + offset per group,
    with offset = (8 - z) * s, both in bfloat16."""

    def __init__(self, layer):
        super().__init__()
        codes = layer.fmt.unpack(layer.weight, layer.in_features).to(torch.int32)
        scale, zero = layer.weight_scale.float(), layer.weight_zero.float()
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.scale_and_offset = torch.stack([scale.T, ((8 - zero) * scale).T], dim=-1).to(DTYPE).contiguous()
        self.group = layer.scheme.block_size

    def forward(self, x):
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scale_and_offset)


def build(provider: str, linear: torch.nn.Linear) -> torch.nn.Module:
    """`linear` (bf16, on CPU) in `provider`'s form; raises with the reason when the provider is unavailable."""
    import copy

    if provider == "bf16":
        return linear
    if provider.startswith("lowbit-"):
        from quantizer_plugin import LowBitLinear
        from quantizer_plugin.formats.activations import STATIC_MODES
        from quantizer_plugin.huge_pages import place_on_huge_pages

        layer = LowBitLinear.from_float(linear, scheme_of(provider), compute_dtype=DTYPE)
        if layer.static_activations:
            largest = STATIC_MODES[layer.scheme.activations].largest
            layer.input_scale.data.fill_(STATIC_INPUT_ABSMAX / largest)
        place_on_huge_pages(layer)  # where from_pretrained puts a loaded model's layers (huge_pages.py)
        return layer
    if provider == "torch-int4":
        return TorchInt4(build("lowbit-int4", linear))
    if provider.startswith("bnb-"):
        import bitsandbytes as bnb

        n, k = linear.out_features, linear.in_features
        if provider == "bnb-nf4":
            layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=DTYPE, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=64, compress_statistics=True).to("cpu")  # fmt: skip
        else:
            layer = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
            layer.load_state_dict({"weight": linear.weight.detach().clone()})
            layer = layer.to("cpu")
        return layer.eval()
    if provider.startswith("quanto-"):
        from optimum.quanto import freeze, qfloat8, qint2, qint4, qint8, quantize

        model = torch.nn.Sequential(copy.deepcopy(linear))
        qtypes = {"quanto-int2": qint2, "quanto-int4": qint4, "quanto-int8": qint8, "quanto-fp8": qfloat8,
                  "quanto-w8a8": qint8, "quanto-w8a8-fp8": qfloat8}  # fmt: skip
        static = provider.startswith("quanto-w8a8")
        quantize(model, weights=qtypes[provider], activations=qtypes[provider] if static else None)
        if static:  # its Calibration, on inputs like the benchmark's
            from optimum.quanto import Calibration

            with torch.no_grad(), Calibration():
                model(torch.randn(128, linear.in_features, generator=torch.Generator().manual_seed(7)).to(DTYPE))
        freeze(model)
        return model
    if provider.startswith("torchao-"):
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        model = torch.nn.Sequential(copy.deepcopy(linear))
        if provider == "torchao-int8":
            config = Int8WeightOnlyConfig()
        else:
            config = Int4WeightOnlyConfig(group_size=64)  # torchao 0.18 has no CPU-specific int4 packing
        quantize_(model, config)
        return model
    raise ValueError(f"unknown provider {provider!r}")


def layer_rows(shapes, batch_sizes, providers, rounds: int) -> tuple[list[Row], dict[str, str], dict[str, set]]:
    """Rows for every (shape, M, provider) that ran; the reason each skipped provider was skipped; our kernels."""
    from quantizer_plugin import ops

    rows, skipped, kernels = [], {}, {}
    for n, k in shapes:
        torch.manual_seed(0)
        linear = torch.nn.Linear(k, n, bias=False).to(DTYPE)
        torch.nn.init.normal_(linear.weight, std=0.02)
        layers = {}
        for provider in providers:
            try:
                layers[provider] = build(provider, linear)
            except Exception as error:  # a missing library or a layer it refuses: reported, not fatal
                skipped[provider] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        exact_weight = linear.weight.double().T
        for m in batch_sizes:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DTYPE)
            exact = x.double() @ exact_weight
            calls: dict[str, Callable[[], object]] = {}
            errors = {}
            for provider, layer in list(layers.items()):
                try:
                    with torch.no_grad(), ops.record_dispatch() as served:
                        y = layer(x)
                except Exception as error:
                    skipped[provider] = f"{type(error).__name__} at M={m}: {str(error).splitlines()[0][:160]}"
                    del layers[provider]
                    continue
                kernels.setdefault(provider, set()).update(served)
                errors[provider] = ((y.double() - exact).abs().max() / exact.abs().max()).item()
                calls[provider] = (lambda layer: lambda: layer(x))(layer)
            with torch.no_grad():
                timings = interleaved_medians(calls, rounds)
            for provider, (median, p20, p80) in timings.items():
                stored = sum(t.nbytes for t in [*layers[provider].parameters(), *layers[provider].buffers()])
                rows.append(Row(f"{n}x{k}", m, provider, median, p20, p80, bytes_moved=stored if m == 1 else 0,
                                extra={"rel_error": errors[provider]}))  # fmt: skip
                print(f"{n}x{k} M={m} {provider}: {median:.3f} ms, error {errors[provider]:.2e}", flush=True)
    return rows, skipped, {p: k for p, k in kernels.items() if k}


def bandwidth(rows: list[Row], read_gb_s: float, megabytes: int) -> list[str]:
    """At M = 1, the GB/s at which bf16 and each of ours read their stored weight, and its share of the measured read
    bandwidth against BANDWIDTH_TARGET."""
    lines = [f"Read bandwidth of this machine (a threaded sum of {megabytes} MiB): {read_gb_s:.1f} GB/s. At M = 1:", ""]
    for r in rows:
        if r.m == 1 and r.bytes_moved and (r.provider == "bf16" or r.provider in OURS):
            share = r.gb_per_s / read_gb_s
            verdict = "PASS" if share >= BANDWIDTH_TARGET else "FAIL"
            lines.append(f"- {r.shape}, {r.provider}: {r.bytes_moved / 2**20:.1f} MiB in {r.median_ms:.3f} ms, "
                         f"{r.gb_per_s:.1f} GB/s, {share:.0%} of it (target >= {BANDWIDTH_TARGET:.0%}): {verdict}")  # fmt: skip
    return lines


def targets(rows: list[Row]) -> list[str]:
    """The CPU-speed issue's layer targets, each with its measured ratio and PASS/FAIL."""
    index = {(r.shape, r.m, r.provider): r for r in rows}
    lines = []

    def ratio(shape, m, provider, other):
        ours, theirs = index.get((shape, m, provider)), index.get((shape, m, other))
        return None if ours is None or theirs is None else theirs.median_ms / ours.median_ms

    def verdict(what, value, goal):
        if value is not None:
            lines.append(f"- {what}: {value:.2f}x (target >= {goal:.2f}x): {'PASS' if value >= goal else 'FAIL'}")

    for shape in sorted({r.shape for r in rows}):
        for provider, goal in DECODE_TARGETS.items():
            verdict(f"{shape}, M=1, {provider} vs bf16", ratio(shape, 1, provider, "bf16"), goal)
        for provider, other in PEER_DECODE_TARGETS.items():
            verdict(f"{shape}, M=1, {provider} vs {other}", ratio(shape, 1, provider, other), 1.0)
        for provider, goal in PREFILL_TARGETS.items():
            for m in sorted({r.m for r in rows if r.m >= 128}):
                verdict(f"{shape}, M={m}, {provider} vs bf16", ratio(shape, m, provider, "bf16"), goal)
        for provider in OURS:
            verdict(f"{shape}, M=16, {provider} vs bf16", ratio(shape, 16, provider, "bf16"), 1.0)
            for m in sorted({r.m for r in rows if r.m >= 128}):
                verdict(f"{shape}, M={m}, {provider} vs bf16 (at most 1.5x slower)", ratio(shape, m, provider, "bf16"),
                        1 / 1.5)  # fmt: skip
        for m in sorted({r.m for r in rows}):
            for provider, peer in (("lowbit-nf4", "bnb-nf4"), ("lowbit-int8", "bnb-int8")):
                verdict(f"{shape}, M={m}, {provider} vs {peer}", ratio(shape, m, provider, peer), 1.0)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 15, smoke 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--providers", default=",".join(["bf16", *OURS, *PEERS]))
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--record", nargs="?", const=str(RESULTS), default=None,
                        help="also write the report into benchmarks/RESULTS.md (or the file given), as this machine's "
                             "section of this benchmark, in place of the one it had")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, batch_sizes = (SMOKE_SHAPES, SMOKE_BATCH_SIZES) if args.smoke else (SHAPES, BATCH_SIZES)
    rounds = args.rounds or (3 if args.smoke else 15)
    rows, skipped, kernels = layer_rows(shapes, batch_sizes, args.providers.split(","), rounds)
    probe_megabytes = 64 if args.smoke else 512
    read_gb_s = read_bandwidth_gb_s(probe_megabytes)
    env = cpu_environment()
    out = Path(args.out)
    write_rows(rows, out / "cpu_layers.jsonl", env)
    report = [
        "# One linear layer on the CPU" + (" (smoke run: tiny shapes, not a measurement)" if args.smoke else ""),
        "",
        ", ".join(f"{key} {value}" for key, value in env.items()) + f"; {rounds} interleaved rounds; activations bf16.",
        "",
        markdown_table(rows, baseline="bf16", ours=OURS),
        "",
        "Kernels that served our layers: " + "; ".join(f"{p}: {', '.join(sorted(k))}" for p, k in kernels.items()),
        "",
        "Skipped: " + ("; ".join(f"{p} ({reason})" for p, reason in skipped.items()) or "none"),
        "",
        "Targets:",
        *targets(rows),
        "",
        *bandwidth(rows, read_gb_s, probe_megabytes),
    ]
    publish("cpu_layers", report, env, out, args.record, args.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
