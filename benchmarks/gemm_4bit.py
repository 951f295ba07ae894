"""Our NF4 Triton GEMM against torch's 16-bit matmul (cuBLAS) and bitsandbytes' 4-bit matmul, and a decoder block.

    python benchmarks/gemm_4bit.py            # on a GPU: Llama shapes x M = 1..4096, then a Llama-3-8B decoder block
    python benchmarks/gemm_4bit.py --smoke    # tiny shapes, any machine (CPU: Triton's interpreter), checks it runs

Per (N x K, M) it times, with do_bench medians (p20-p80), in bf16 (or --dtype float16):
- bf16:     torch.nn.functional.linear on the 16-bit weight (cuBLAS);
- lowbit:   our fused dequantize-and-multiply kernel on the NF4 weight (block 64, double quant);
- bnb:      bitsandbytes.matmul_4bit on the same NF4 weight, when bitsandbytes is installed;
rotating through enough weight copies that no call finds its weight in L2. Decode rows (M <= 16) report effective
GB/s (weight + activations + output bytes), prefill rows TFLOP/s. Each provider's error is measured before timing,
against one reference that shares no code with any provider: the float64 product with the 16-bit weight they were
all made from (so the 4-bit rows show the quantization error, ours and bitsandbytes' alike). Then a Llama-3-8B
decoder block (attention + MLP, 7 projections) built from these layers is timed at a batch-1 decode step and a
2048-token prefill.

Writes benchmarks/out/gemm_4bit.jsonl (long-form rows) and benchmarks/out/gemm_4bit.md (the report: device,
versions, date, tables and the issue's targets with pass/fail).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import BATCH_SIZES, LLAMA_SHAPES, Row, bench, copies_to_defeat_l2, environment, print_table, time_rotating, write_rows  # noqa: E402

SMOKE_SHAPES = [(96, 128), (80, 200)]
SMOKE_BATCH_SIZES = [1, 3, 33]
PROVIDERS = ["bf16", "lowbit", "bnb"]
# The targets on an H100, bf16: our speedup over the 16-bit matmul at M = 1 and 16 on the large shapes,
# no more than 15% slower at M >= 1024, and faster than bitsandbytes at every M.
TARGETS = {1: 3.3, 16: 2.5}
LARGE_M_FLOOR = 0.85


def bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


class Operands:
    """One copy of a layer's operands for every provider: the 16-bit weight, ours, and bitsandbytes'."""

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: str, providers: list[str], seed: int):
        from quantizer_plugin import LowBitLinear
        from quantizer_plugin.formats import QuantScheme

        generator = torch.Generator(device=device).manual_seed(seed)
        weight = torch.randn(n, k, device=device, dtype=dtype, generator=generator) * 0.02
        self.n, self.k, self.dtype = n, k, dtype
        self.weight = weight
        linear = torch.nn.Linear(k, n, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.layer = LowBitLinear.from_float(linear, QuantScheme("nf4", 64, True), compute_dtype=dtype)
        if "bnb" in providers:
            import bitsandbytes.functional as bnbf

            self.bnb_weight, self.bnb_state = bnbf.quantize_4bit(
                weight, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8
            )

    def weight_bytes(self, provider: str) -> int:
        if provider == "bf16":
            return self.weight.nbytes
        return sum(t.nbytes for t in self.layer.quantized_tensors().values())

    def call(self, provider: str, x: torch.Tensor):
        from quantizer_plugin.kernels.layers import linear_forward

        if provider == "bf16":
            return lambda: torch.nn.functional.linear(x, self.weight)
        if provider == "lowbit":
            # the layer's own entry point, so the timing includes what a model's forward pays per call
            layer = self.layer
            return lambda: linear_forward(x, layer.weight_record(), layer.bias, layer.compute_dtype)
        import bitsandbytes

        return lambda: bitsandbytes.matmul_4bit(x, self.bnb_weight.t(), quant_state=self.bnb_state)


def relative_error(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.double() - exact).abs().max() / exact.abs().max()).item()


def gemm_rows(shapes, batch_sizes, providers, dtype, device, rep, cuda_graph) -> list[Row]:
    rows = []
    for n, k in shapes:
        first = Operands(n, k, dtype, device, providers, seed=0)
        copies = 1 if device == "cpu" else copies_to_defeat_l2(first.weight_bytes("lowbit"))
        operand_sets = [first] + [Operands(n, k, dtype, device, providers, seed=i) for i in range(1, copies)]
        for m in batch_sizes:
            xs = [torch.randn(m, k, device=device, dtype=dtype) for _ in operand_sets]
            exact = xs[0].double() @ first.weight.double().T
            for provider in providers:
                y = first.call(provider, xs[0])()
                error = relative_error(y, exact)
                # the 16-bit weight is 4x larger, so fewer copies already keep it out of L2
                used = min(len(operand_sets), copies_to_defeat_l2(first.weight_bytes(provider)))
                median, p20, p80 = time_rotating(
                    lambda i: operand_sets[i].call(provider, xs[i]), used, rep=rep, cuda_graph=cuda_graph
                )
                moved = first.weight_bytes(provider) + xs[0].nbytes + y.nbytes
                rows.append(Row(f"{n}x{k}", m, provider, median, p20, p80, moved, 2 * m * n * k, {"rel_error": error}))
                print(f"{n}x{k} M={m} {provider}: {median:.4f} ms, error {error:.2e}", flush=True)
        del operand_sets
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def decoder_block_rows(providers, dtype, device, smoke: bool, rep: int) -> list[Row]:
    """A Llama-3-8B decoder layer with its 7 projections in each provider's form, at decode and 2048-token prefill."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from quantizer_plugin import LowBitLinear
    from quantizer_plugin.formats import QuantScheme

    if smoke:
        config = LlamaConfig(hidden_size=128, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2)
        prefill = 33
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
        prefill = 2048
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=dtype).eval()
    rotary = LlamaRotaryEmbedding(config).to(device)

    def converted(provider: str) -> torch.nn.Module:
        block = LlamaDecoderLayer(config, layer_idx=0).to(device=device, dtype=dtype).eval()
        block.load_state_dict(reference.state_dict())
        if provider == "bf16":
            return block
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, to_provider(child, provider))
        return block

    def to_provider(linear: torch.nn.Linear, provider: str) -> torch.nn.Module:
        if provider == "lowbit":
            return LowBitLinear.from_float(linear, QuantScheme("nf4", 64, True), compute_dtype=dtype)
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=dtype,
            compress_statistics=True, quant_type="nf4", device="meta",
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(
            linear.weight.detach().cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
        ).to(device)
        return layer

    rows = []
    for provider in providers:
        block = converted(provider)
        for label, tokens in (("decode, batch 1", 1), (f"prefill, {prefill} tokens", prefill)):
            hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype)
            positions = torch.arange(tokens, device=device)[None]
            embeddings = rotary(hidden, positions)
            with torch.no_grad():
                median, p20, p80 = bench(lambda: block(hidden, position_embeddings=embeddings, position_ids=positions), rep=rep)
            rows.append(Row(f"decoder block ({label})", tokens, provider, median, p20, p80))
            print(f"decoder block {label} {provider}: {median:.4f} ms", flush=True)
        del block
    return rows


def target_lines(rows: list[Row], large_shapes: list[str]) -> list[str]:
    index = {(r.shape, r.m, r.provider): r for r in rows}
    lines = []
    for (shape, m, provider), row in sorted(index.items()):
        if provider != "lowbit" or shape not in large_shapes:
            continue
        bf16 = index.get((shape, m, "bf16"))
        if bf16 is not None:
            speedup = bf16.median_ms / row.median_ms
            goal = TARGETS.get(m, LARGE_M_FLOOR if m >= 1024 else None)
            if goal is not None:
                verdict = "PASS" if speedup >= goal else "FAIL"
                lines.append(f"- {shape}, M={m}: {speedup:.2f}x the bf16 matmul (target >= {goal}x): {verdict}")
        peer = index.get((shape, m, "bnb"))
        if peer is not None:
            verdict = "PASS" if peer.median_ms > row.median_ms else "FAIL"
            lines.append(f"- {shape}, M={m}: {peer.median_ms / row.median_ms:.2f}x bitsandbytes (target > 1x): {verdict}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few repetitions: checks the script runs")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-block", action="store_true", help="skip the decoder-block timing")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="time replays of CUDA graphs (GPU work alone, no launch overhead)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "out", help="folder for gemm_4bit.jsonl and gemm_4bit.md")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("timings need a GPU; on this machine only --smoke runs (through Triton's interpreter)")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Our layers inside the decoder block must run on the kernels on CPU too (the reference is the default there).
    os.environ.setdefault("QUANTIZER_PLUGIN_KERNELS", "triton")
    dtype = getattr(torch, args.dtype)
    providers = [p for p in PROVIDERS if p != "bnb" or bnb_available()]
    shapes = SMOKE_SHAPES if args.smoke else LLAMA_SHAPES
    batch_sizes = SMOKE_BATCH_SIZES if args.smoke else BATCH_SIZES
    rep = 5 if args.smoke else 100
    env = environment()
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, bitsandbytes {env['bitsandbytes']}")

    cuda_graph = args.cuda_graph and device == "cuda"
    rows = gemm_rows(shapes, batch_sizes, providers, dtype, device, rep, cuda_graph)
    if not args.no_block:
        rows += decoder_block_rows(providers, dtype, device, args.smoke, rep)
    write_rows(rows, args.out / "gemm_4bit.jsonl", env)

    gemm_table = print_table([r for r in rows if "x" in r.shape and "block" not in r.shape], "bf16", [p for p in providers if p == "bnb"], "lowbit")
    block_rows = [r for r in rows if "block" in r.shape]
    block_table = print_table(block_rows, "bf16", [p for p in providers if p == "bnb"], "lowbit", decode_max_m=0) if block_rows else ""
    errors = "\n".join(f"- {r.shape}, M={r.m}, {r.provider}: {r.extra['rel_error']:.2e}" for r in rows if "rel_error" in r.extra)
    targets = "\n".join(target_lines(rows, [f"{n}x{k}" for n, k in shapes[1:]] if not args.smoke else []))
    report = "\n\n".join(
        [
            "# NF4 GEMM: ours vs cuBLAS 16-bit vs bitsandbytes",
            "\n".join(f"- {key}: {value}" for key, value in env.items())
            + f"\n- dtype: {args.dtype}\n- timing: {'CUDA graph replays' if cuda_graph else 'eager launches from Python'}",
            "## GEMMs (do_bench medians, weight rotated out of L2)\n\n" + gemm_table,
            "## Decoder block (Llama-3-8B layer: attention and MLP, 7 projections; decode without a KV cache)\n\n" + block_table,
            "## Targets (H100, bf16)\n\n" + (targets or "- (smoke run: targets not evaluated)"),
            "## Max error relative to the largest |output| (against the float64 product with the 16-bit weight)\n\n" + errors,
        ]
    )
    (args.out / "gemm_4bit.md").write_text(report + "\n")
    print(f"\nwrote {args.out / 'gemm_4bit.md'} and {args.out / 'gemm_4bit.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
