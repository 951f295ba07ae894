"""Peak memory while from_pretrained quantizes a >= 300M-parameter model, ours against bitsandbytes, on CPU.

    python benchmarks/load_memory.py            # builds a random 374M-parameter Llama in bf16 once, then measures
    python benchmarks/load_memory.py --record   # also writes the table into benchmarks/RESULTS.md (this CPU's section)

Each load runs in a fresh process. For each we report:
- peak RSS (VmHWM): everything resident, including the checkpoint pages safetensors maps from the page cache;
- peak anonymous memory (RssAnon sampled every 2 ms): memory the load itself allocated, which is what has to fit
  (the mapped checkpoint pages are clean file cache the kernel can drop);
both as the increase over the process right before from_pretrained, beside the size of the loaded model's tensors,
the bf16 checkpoint and its largest tensor.

Each provider is measured twice: with glibc's default allocator settings, whose dynamic mmap threshold keeps
freed multi-megabyte temporaries in the heap (so RssAnon shows the most the heap ever grew to), and with
MALLOC_MMAP_THRESHOLD_=131072, which returns them to the system on free (so RssAnon shows what was live).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROVIDERS = ["bf16", "lowbit-nf4", "bnb-nf4", "lowbit-int8", "bnb-int8", "lowbit-int4-gptq"]
# lowbit-int4-gptq: method="gptq" on 32 sequences of 256 random token ids (seeded): calibration activations of
# 32 x 256 x 1024 bf16 values, two copies (a block's inputs and its outputs), 32 MB; the rest of the peak is the model
ALLOCATORS = {"glibc default": {}, "mmap threshold 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def build_model(path: Path, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(provider: str, path: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import quantizer_plugin
    from quantizer_plugin import LowBitConfig

    configs = {
        "bf16": None,
        "lowbit-nf4": LowBitConfig(weights="nf4"),
        "lowbit-int8": LowBitConfig(weights="int8"),
        "bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16),
        "bnb-int8": BitsAndBytesConfig(load_in_8bit=True),
        "lowbit-int4-gptq": LowBitConfig(
            weights="int4", method="gptq", calibration_samples=32, calibration_length=256,
            dataset=torch.randint(0, 32000, (32 * 256 * 4,), generator=torch.Generator().manual_seed(0)),
        ),  # fmt: skip
    }
    if provider.startswith("bnb"):
        import bitsandbytes  # noqa: F401  (imported before the baseline, as ours is)
    if provider.startswith("lowbit"):  # our native CPU library loaded before the baseline, as bitsandbytes' is
        from quantizer_plugin.cpu import native  # (built on a machine's first use, then cached: not a load's cost)

        native.load()

    peak_anon = [memory_kb("RssAnon")]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], memory_kb("RssAnon"))
            time.sleep(0.002)

    base_rss, base_anon = memory_kb("VmRSS"), memory_kb("RssAnon")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=configs[provider], dtype=torch.bfloat16, device_map="cpu")
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], memory_kb("RssAnon"))
    model_bytes = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
    # bitsandbytes keeps its 4-bit absmax and 8-bit scales outside the parameters
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            model_bytes += state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        if scb is not None:
            model_bytes += scb.nbytes
    return {
        "provider": provider,
        "load_seconds": round(seconds, 1),
        "peak_rss_increase_mb": round((memory_kb("VmHWM") - base_rss) / 1024, 1),
        "peak_anon_increase_mb": round((peak_anon[0] - base_anon) / 1024, 1),
        "model_tensors_mb": round(model_bytes / 2**20, 1),
    }


def checkpoint_facts(path: Path) -> dict:
    from safetensors import safe_open

    total, largest, count = 0, 0, 0
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                shape = tensor_slice.get_shape()
                size = 2
                for dim in shape:
                    size *= dim
                total, largest, count = total + size, max(largest, size), count + 1
    return {"checkpoint_mb": round(total / 2**20, 1), "largest_tensor_mb": round(largest / 2**20, 1), "parameters_m": round(total / 2 / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads per cell; the table shows medians")
    parser.add_argument("--record", nargs="?", const=str(HERE / "RESULTS.md"), default=None,
                        help="also write the report into benchmarks/RESULTS.md (or the file given), as this machine's "
                             "section of this benchmark, in place of the one it had")  # fmt: skip
    parser.add_argument("--child", nargs=2, metavar=("PROVIDER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    out = Path(args.out)
    model_dir = out / f"llama-{args.layers}layers-bf16"
    if not (model_dir / "config.json").exists():
        print(f"building the model in {model_dir} ...", flush=True)
        build_model(model_dir, args.layers)
    facts = checkpoint_facts(model_dir)
    print(f"model: {facts['parameters_m']}M parameters, bf16 checkpoint {facts['checkpoint_mb']} MB, "
          f"largest tensor {facts['largest_tensor_mb']} MB", flush=True)  # fmt: skip
    rows = []
    for allocator, variables in ALLOCATORS.items():
        for provider in args.providers:
            print(f"loading with {provider} ({allocator}) x{args.repeats} ...", flush=True)
            runs = []
            for _ in range(args.repeats):
                result = subprocess.run(
                    [sys.executable, __file__, "--child", provider, str(model_dir)],
                    capture_output=True, text=True, check=True, env=os.environ | variables,
                )  # fmt: skip
                runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
            medians = {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "provider"}
            rows.append({"provider": provider, "allocator": allocator, "repeats": len(runs)} | medians | facts | {"runs": runs})
    sys.path.insert(0, str(HERE))
    from harness import cpu_environment, record_section

    environment = cpu_environment()
    (out / "load_memory.json").write_text(json.dumps({"environment": environment, "rows": rows}, indent=2))
    lines = [
        ", ".join(f"{key} {value}" for key, value in environment.items()),
        "",
        f"A random {facts['parameters_m']}M-parameter Llama ({args.layers} layers, hidden 1024, MLP 2816, vocab 32000) "
        f"saved in bf16 ({facts['checkpoint_mb']} MB, largest tensor {facts['largest_tensor_mb']} MB), loaded with "
        f'device_map="cpu"; medians of {args.repeats} fresh-process loads per row; increases are over the process '
        "right before from_pretrained.",
        "",
        "| provider | allocator | load s | peak anon increase MB | peak RSS increase MB | loaded tensors MB |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['provider']} | {r['allocator']} | {r['load_seconds']} | {r['peak_anon_increase_mb']} | "
              f"{r['peak_rss_increase_mb']} | {r['model_tensors_mb']} |" for r in rows]  # fmt: skip
    print("\n" + "\n".join(lines))
    if args.record:
        key = record_section("load_memory", "\n".join(lines), environment, Path(args.record))
        print(f"recorded in {args.record}: {key}")

if __name__ == "__main__":
    main()
