"""A safetensors checkpoint folder to convert, read lazily, and the plan of the checkpoint a conversion writes.

`SourceCheckpoint` checks the folder's shard names (model.safetensors, or the shards its index names) and reads only
their headers up front; a tensor's data is read when a conversion asks for it. `ConversionPlan` starts as a copy of
the source, entry by entry, each entry a promise of a tensor (read from the source when written) and the shard it
goes to; an importer or exporter renames, reshapes, drops and adds entries; `write` then produces one shard at a
time. Peak memory is one output shard, not the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .headers import TensorHeader, UnreadableCheckpointError, load_tensor, read_headers
from .paths import CheckpointPathError, inside, plain_file_name

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor at fault."""


class SourceCheckpoint:
    def __init__(self, folder: Path):
        self.folder = folder
        self.shards = _shards(folder)
        try:
            self.headers: dict[str, TensorHeader] = read_headers([folder / shard for shard in self.shards])
        except UnreadableCheckpointError as error:
            raise ConversionError(str(error)) from None
        if (folder / INDEX).is_file():
            _check_index(folder / INDEX, {key: header.file.name for key, header in self.headers.items()})

    def shard_of(self, key: str) -> str:
        return self.headers[key].file.name

    def load(self, key: str) -> torch.Tensor:
        return load_tensor(self.headers[key], key)


Producer = Callable[[], torch.Tensor]


class ConversionPlan:
    """Output tensor name -> (shard, producer): what the converted checkpoint holds, produced as it is written."""

    def __init__(self, source: SourceCheckpoint):
        self.source = source
        self.entries: dict[str, tuple[str, Producer]] = {
            key: (source.shard_of(key), lambda key=key: source.load(key)) for key in source.headers
        }

    def keys(self) -> list[str]:
        return list(self.entries)

    def header(self, key: str) -> TensorHeader | None:
        """The source header of an entry still read as it is from the source, else None."""
        return self.source.headers.get(key)

    def file_of(self, module: str) -> Path:
        """The source file that holds a layer's tensors (its weight's, or else any of them)."""
        key = f"{module}.weight" if f"{module}.weight" in self.source.headers else next(
            k for k in self.source.headers if k.startswith(module + "."))  # fmt: skip
        return self.source.headers[key].file

    def checked(self, module: str, name: str, what: str, shape: tuple | None = None,
                dtype: torch.dtype | None = None) -> TensorHeader:  # fmt: skip
        """The source header of tensor `module.name`, checked for presence, shape and dtype (its data is not read)."""
        key = f"{module}.{name}"
        header = self.source.headers.get(key)
        if header is None:
            raise ConversionError(f"{self.file_of(module)}: {what} tensor {key!r} is missing")
        if shape is not None and header.shape != tuple(shape):
            raise ConversionError(f"{header.file}: tensor {key!r} has shape {header.shape}, expected {tuple(shape)}")
        if dtype is not None and not header.is_a(dtype):
            raise ConversionError(f"{header.file}: tensor {key!r} is {header.dtype}, expected {dtype}")
        return header

    def drop(self, key: str) -> None:
        self.entries.pop(key, None)

    def put(self, key: str, shard: str, producer: Producer) -> None:
        self.entries[key] = (shard, producer)

    def put_source(self, key: str, shard: str, source_key: str, shape: tuple | None = None) -> None:
        """Entry `key` is source tensor `source_key`, reshaped to `shape` if given, read when written."""
        load = self.source.load
        self.put(key, shard, (lambda: load(source_key)) if shape is None else (lambda: load(source_key).reshape(shape)))

    def write(self, folder: Path, shards: list[str]) -> None:
        """Each shard in turn (only its tensors in memory), and the index when there are several."""
        total, weight_map = 0, {}
        for shard in shards:
            content = {key: producer().contiguous() for key, (home, producer) in self.entries.items() if home == shard}
            save_file(content, str(folder / shard), metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in content.values())
            weight_map.update({key: shard for key in content})
            del content
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _shards(folder: Path) -> list[str]:
    """The checkpoint's safetensors files, each a plain file name whose file lies inside `folder`."""
    if (folder / INDEX).is_file():
        weight_map = _weight_map(folder / INDEX)
        for key, shard in weight_map.items():
            _checked_shard(folder, shard, f"{folder / INDEX}: weight_map[{key!r}]")
        return sorted(set(weight_map.values()))
    if (folder / SINGLE).is_file():
        return [_checked_shard(folder, SINGLE, str(folder / SINGLE))]
    raise ConversionError(f"{folder}: no safetensors checkpoint ({SINGLE} or {INDEX}); .bin checkpoints are not read")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{index}: not a JSON object with a weight_map ({error})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
    return weight_map


def _checked_shard(folder: Path, shard, source: str) -> str:
    try:
        inside(folder, folder / plain_file_name(shard, source), source)
    except CheckpointPathError as error:
        raise ConversionError(str(error)) from None
    if not (folder / shard).is_file():
        raise ConversionError(f"{source}: shard {shard!r} is not a file in {folder}")
    return shard


def _check_index(index: Path, home: dict[str, str]) -> None:
    """The index names each tensor's shard as the shards themselves hold them."""
    weight_map = _weight_map(index)
    for key, shard in weight_map.items():
        if home.get(key) != shard:
            where = f"it is in {home[key]}" if key in home else "no shard holds it"
            raise ConversionError(f"{index}: weight_map puts tensor {key!r} in {shard}, but {where}")
    unlisted = sorted(set(home) - set(weight_map))
    if unlisted:
        raise ConversionError(f"{index}: weight_map does not list tensor {unlisted[0]!r} of {home[unlisted[0]]}")
