"""convert_checkpoint: other quantizers' checkpoints into ours, and ours into theirs, losslessly and without their
libraries.

One importer per foreign `quant_method` (IMPORTERS) and one exporter per target library (EXPORTERS); bitsandbytes
(bitsandbytes.py) is the first of each, transformers' fine-grained FP8 (fp8.py) the second importer. Each rewrites a ConversionPlan (source.py): the source folder read lazily,
the output written one shard at a time, so converting a checkpoint needs memory for one shard, not the model.

The folder's other tensors and files are copied as they are; config.json gets the new quantization config; a sharded
checkpoint stays sharded (each layer's tensors go to the shard that held its weight). Output is written next to OUT
and moved into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from . import bitsandbytes, fp8
from .paths import CheckpointPathError, check_tree, relative_path
from .source import INDEX, ConversionError, ConversionPlan, SourceCheckpoint
from .staging import staged_folder

__all__ = ["ConversionError", "EXPORTERS", "IMPORTERS", "convert_checkpoint"]

# fn(plan, the source's quantization_config, the model's linear shapes) -> the output's quantization_config
Rewrite = Callable[[ConversionPlan, dict, dict], dict]
# by the source's quant_method
IMPORTERS: dict[str, Rewrite] = {"bitsandbytes": bitsandbytes.import_checkpoint, "fp8": fp8.import_checkpoint}
EXPORTERS: dict[str, Rewrite] = {"bitsandbytes": bitsandbytes.export_checkpoint}  # by the target library
OURS = "lowbit"


def _copied_entries(folder: Path, shards: list[str]) -> list[Path]:
    """The folder's other files and folders, which the output keeps; each checked to stay inside the folder."""
    entries = []
    for entry in sorted(folder.iterdir()):
        if entry.name in (*shards, INDEX, "config.json") or entry.name.startswith("."):
            continue
        try:
            check_tree(folder, entry, f"{folder}: entry {entry.name!r}")
        except CheckpointPathError as error:
            raise ConversionError(str(error)) from None
        entries.append(entry)
    return entries


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, to: str = OURS,
                       progress: Callable[[str], None] | None = None) -> Path:  # fmt: skip
    """Convert the checkpoint `src` (a folder, or a Hub repo id fetched with snapshot_download) into ours at `out`
    (to="lowbit", from any quant_method in IMPORTERS), or our checkpoint into one another library loads (to= a
    library in EXPORTERS, e.g. "bitsandbytes"). Returns `out`."""
    targets = (OURS, *EXPORTERS)
    if to not in targets:
        raise ValueError(f"convert_checkpoint: to must be one of {targets}, got {to!r}")
    folder = _local_folder(src)
    out = Path(out)
    report = progress or (lambda message: None)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: not a model folder (no config.json)")
    model_config = json.loads(config_path.read_text())
    quantization = model_config.get("quantization_config")
    if quantization is None:
        raise ConversionError(f"{config_path}: the model is not quantized (no quantization_config)")
    method = quantization.get("quant_method")
    if to == OURS:
        if method not in IMPORTERS:
            raise ConversionError(f"{config_path}: quant_method is {method!r}; converting to {to!r} reads "
                                  f"{', '.join(map(repr, IMPORTERS))} checkpoints")  # fmt: skip
        rewrite = IMPORTERS[method]
    else:
        if method != OURS:
            raise ConversionError(
                f"{config_path}: quant_method is {method!r}; converting to {to!r} reads {OURS!r} checkpoints"
            )
        rewrite = EXPORTERS[to]
    source = SourceCheckpoint(folder)
    copied = _copied_entries(folder, source.shards)  # every name checked before anything is read or written
    report(f"reading {len(source.shards)} safetensors file(s) from {folder}")
    plan = ConversionPlan(source)
    new_quantization = rewrite(plan, quantization, _linear_shapes(model_config))
    with staged_folder(out) as staging:
        report(f"writing {out}")
        plan.write(staging, source.shards)
        for entry in copied:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        model_config["quantization_config"] = new_quantization
        (staging / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    return out


def _local_folder(src) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or str(src).count("/") != 1:
        raise ConversionError(f"{src}: neither a model folder nor a Hub repo id (owner/name)")
    from huggingface_hub import HfApi, snapshot_download

    for name in HfApi().list_repo_files(str(src)):  # checked before any file is downloaded
        try:
            relative_path(name, f"Hub repository {src}: file list")
        except CheckpointPathError as error:
            raise ConversionError(str(error)) from None
    return Path(snapshot_download(str(src)))


def _linear_shapes(model_config: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each of the model's nn.Linear modules (and GPT-2's Conv1D), by name: the model
    built from its config on the meta device (no weights read, no quantization applied)."""
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.pytorch_utils import Conv1D

    plain = {key: value for key, value in model_config.items() if key != "quantization_config"}
    config = AutoConfig.for_model(**plain)
    classes = [getattr(transformers, name, None) for name in model_config.get("architectures") or []]
    cls = next((c for c in classes if c is not None), AutoModel)
    with torch.device("meta"):
        model = AutoModel.from_config(config) if cls is AutoModel else cls(config)
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes[name] = (m.out_features, m.in_features)
        elif isinstance(m, Conv1D):
            shapes[name] = (m.nf, m.weight.shape[0])
    return shapes
