"""Time to GPTQ-quantize the 0.4B Llama of cpu_decode.py on this CPU: ours (from_pretrained with method="gptq"), and
GPTQModel's on the same model and the same calibration windows where it installs.

    python benchmarks/gptq_time.py                                   # ours, int4, group 128, 128 x 512 tokens
    python benchmarks/gptq_time.py --gptqmodel-python VENV/bin/python  # GPTQModel too, run by that interpreter

GPTQModel 7.7 needs torch >= 2.14.1, newer than this project's torch; 7.6.0 installs beside torch 2.13 in a venv of
its own (`pip install torch==2.13.0 gptqmodel==7.6.0`, GPTQMODEL_CPU_WORKERS=2 on a 2-core machine). The calibration
data is a seeded stream of random token ids (the time does not depend on the text), cut into the windows
quantizer_plugin/calibration.py cuts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GPTQMODEL_CHILD = """
import json, sys, time, torch
from gptqmodel import GPTQModel, QuantizeConfig
path, windows, bits, group = sys.argv[1], torch.load(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in windows]
started = time.perf_counter()
model = GPTQModel.load(path, QuantizeConfig(bits=bits, group_size=group, desc_act=True, damp_percent=0.01, sym=False),
                       device="cpu")
model.quantize(data, batch_size=8)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def main(argv: list[str] | None = None) -> int:
    from cpu_decode import MODEL, build_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "out"))
    parser.add_argument("--weights", default="int4", choices=["int8", "int4", "int3", "int2"])
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--gptqmodel-python", default=None, help="an interpreter with gptqmodel installed")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    import quantizer_plugin  # noqa: F401
    from quantizer_plugin import LowBitConfig
    from quantizer_plugin.calibration import calibration_ids

    path = Path(args.out) / "llama-0.4b"
    if not (path / "config.json").exists():
        build_model(path, MODEL)
    stream = torch.randint(0, MODEL["vocab_size"], (args.samples * args.length * 4,), generator=torch.Generator().manual_seed(0))
    windows = calibration_ids(stream, samples=args.samples, length=args.length)
    config = LowBitConfig(weights=args.weights, block_size=args.group, method="gptq", dataset=windows,
                          calibration_samples=args.samples, calibration_length=args.length)  # fmt: skip
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16, device_map="cpu")
    ours = time.perf_counter() - started
    print(json.dumps({"provider": "ours", "seconds": round(ours, 1), "record": model.hf_quantizer.calibration}))
    if args.gptqmodel_python:
        del model
        saved = Path(args.out) / "gptq-windows.pt"
        torch.save(windows, saved)
        if not (path / "tokenizer.json").exists():  # GPTQModel loads the model's tokenizer
            from llama_cpp_peer import write_made_up_tokenizer

            write_made_up_tokenizer(path, MODEL["vocab_size"])
        bits = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}[args.weights]
        result = subprocess.run([args.gptqmodel_python, "-c", GPTQMODEL_CHILD, str(path), str(saved), str(bits), str(args.group)],
                                capture_output=True, text=True, env=os.environ | {"GPTQMODEL_CPU_WORKERS": str(torch.get_num_threads())})  # fmt: skip
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        theirs = json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
        print(json.dumps({"provider": "gptqmodel", "seconds": round(theirs, 1)}))
        print(f"ours {ours:.1f} s, GPTQModel {theirs:.1f} s: {theirs / ours:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
