"""accelerate's internals we touch: where a dispatched model's offloaded tensors live, and the offload index that
says where each one is read from (see README.md for why no public seam serves).

A module that device_map offloads gets an AlignDevicesHook in its `_hf_hook` attribute; the hook reads the module's
tensors from its `weights_map`: a PrefixedDataset (the module's key prefix) over the model's OffloadedWeightsLoader,
whose `index` points each disk tensor at a safetensors file, `state_dict` holds the CPU-offloaded ones and
`save_folder` is the offload folder. Keeping offloaded quantized layers packed, and dequantize() of offloaded layers,
rewrite those entries; accelerate has no API to do so.
"""

from __future__ import annotations

from pathlib import Path

from accelerate.hooks import AlignDevicesHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
from torch import nn


def offload_hook(module: nn.Module) -> AlignDevicesHook | None:
    """The accelerate hook that brings `module`'s own offloaded tensors in around its forward, if it has one."""
    hook = getattr(module, "_hf_hook", None)
    if isinstance(hook, AlignDevicesHook) and hook.offload and hook.weights_map is not None:
        return hook
    return None


def find_offload_loader(model: nn.Module) -> OffloadedWeightsLoader | None:
    """The loader accelerate's hooks read offloaded tensors from (one per dispatched model), if any."""
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        loader = getattr(weights_map, "dataset", weights_map)
        if isinstance(loader, OffloadedWeightsLoader):
            return loader
    return None


def offloaded_store(hook: AlignDevicesHook) -> tuple[object, str]:
    """The mapping the hook reads from (an OffloadedWeightsLoader or a plain dict) and the module's key prefix in it."""
    weights_map = hook.weights_map
    if isinstance(weights_map, PrefixedDataset):
        return weights_map.dataset, weights_map.prefix
    return weights_map, ""


def offloaded_tensor(hook: AlignDevicesHook, name: str):
    """The module's offloaded tensor `name` (its key without the module's prefix), read as the hook reads it."""
    return hook.weights_map[name]


def disk_entry(store, key: str) -> dict | None:
    """The offload index's entry for `key` if the store reads it from a file (keys "safetensors_file", "weight_name",
    "dtype"), else None."""
    if isinstance(store, OffloadedWeightsLoader):
        return store.index.get(key)
    return None


def has_disk_entries(store) -> bool:
    return isinstance(store, OffloadedWeightsLoader) and bool(store.index)


def offload_folder(store) -> Path | None:
    """The folder the store's disk entries are written to (from_pretrained's offload_folder), if it has one."""
    folder = getattr(store, "save_folder", None) if isinstance(store, OffloadedWeightsLoader) else None
    return None if folder is None else Path(folder)


def point_at_file(store: OffloadedWeightsLoader, key: str, file: Path, dtype: str) -> None:
    """Make the store read `key` from the safetensors file `file` (one tensor, named `key`, of dtype `dtype`)."""
    store.index[key] = {"safetensors_file": str(file), "weight_name": key, "dtype": dtype}


def in_memory_mapping(store) -> dict:
    """The dict of the store's tensors held in memory (CPU offload)."""
    return store.state_dict if isinstance(store, OffloadedWeightsLoader) else store


def forget(store, key: str) -> None:
    """Drop an offloaded entry (and its file, if it lies in the offload folder) that no module reads any more."""
    if isinstance(store, OffloadedWeightsLoader):
        store.state_dict.pop(key, None)
        entry = store.index.pop(key, None)
        path = None if entry is None else entry.get("safetensors_file")
        folder = offload_folder(store)
        if path and folder and Path(path).parent == folder:
            Path(path).unlink(missing_ok=True)
    elif isinstance(store, dict):
        store.pop(key, None)
