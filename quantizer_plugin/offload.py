"""Device maps and disk offload that stays quantized: the offload folder holds packed weights and statistics.

transformers (5.23) builds its disk-offload index before any weight loads: an offloaded parameter whose checkpoint
tensor can be used as it is gets an entry pointing at that tensor in the checkpoint, and is not written to the
offload folder. For a weight quantized while loading, that checkpoint tensor is the 16-bit source: when its layer
ran, accelerate would read the 16-bit tensor and cast it to uint8/int8. The statistics (`weight_absmax`, ...) are not
in the checkpoint, so transformers writes what our quantize op made for them; only the packed `weight` is lost.
After the model is dispatched we find those entries, quantize the source once more and write the packed tensors to
the offload folder in transformers' own layout (one safetensors file per tensor), so that accelerate moves packed
bytes to the execution device when the layer runs. A pre-quantized checkpoint already holds the packed tensors,
so its entries point straight at it and nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate.hooks import add_hook_to_module
from safetensors.torch import save_file
from torch import nn

from .checkpoints.headers import SAFETENSORS_DTYPES, load_tensor, read_header
from .checkpoints.paths import plain_file_name
from .integrations.accelerate import (
    disk_entry,
    find_offload_loader,
    forget,
    has_disk_entries,
    in_memory_mapping,
    offload_folder,
    offload_hook,
    offloaded_store,
    offloaded_tensor,
    point_at_file,
)
from .modules import LowBitLinear
from .serialization import CheckpointFormatError


def offload_file_name(key: str) -> str:
    """The staging file of one offloaded tensor, named after it (transformers' layout), never a path elsewhere."""
    return plain_file_name(f"{key}.safetensors.partial", f"offload folder: tensor {key!r}")


def check_device_map(model: nn.Module, device_map) -> None:
    """Raise naming every device_map entry that is not a module, parameter or buffer of `model`.

    accelerate only warns about such an entry and places the module the user meant by the map's other entries
    (often the wrong device), or fails later listing parameters rather than the misspelt entry.
    """
    if not isinstance(device_map, dict):
        return
    names = {""} | {name for name, _ in model.named_modules()}
    names |= {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    unknown = [key for key in device_map if key not in names]
    if unknown:
        raise ValueError(
            f"device_map entries {unknown} name no module, parameter or buffer of {type(model).__name__} "
            f"(top-level modules: {[name for name, _ in model.named_children()]})"
        )


def repack_offloaded_weights(model: nn.Module, quantize_op) -> list[str]:
    """Point every disk-offloaded quantized tensor at its packed form; returns the modules repacked.

    `quantize_op` is the loader's per-weight quantize op (quantizer_plugin.loading.LowBitQuantize), so the packed
    tensors are the very ones a non-offloaded load makes. All or nothing: every packed tensor is first written to a
    temporary file, and only once every module has been repacked are the files moved into place and the index
    pointed at them; a failure partway removes the temporary files and leaves the folder and the index as they were.
    """
    loader = find_offload_loader(model)
    if loader is None or not has_disk_entries(loader):
        return []
    staged: dict[str, tuple[Path, str]] = {}  # tensor key -> (temporary file, dtype)
    repacked = []
    try:
        for name, module in model.named_modules():
            if not isinstance(module, LowBitLinear):
                continue
            packed = _repacked_tensors(name, module, loader, quantize_op, model)
            for key, tensor in packed.items():
                temporary = offload_folder(loader) / offload_file_name(key)
                staged[key] = (temporary, str(tensor.dtype).removeprefix("torch."))
                save_file({key: tensor.contiguous()}, str(temporary))
            if packed:
                repacked.append(name)
    except BaseException:
        for temporary, _ in staged.values():
            temporary.unlink(missing_ok=True)
        raise
    # The same layout as transformers' offload_weight: one file per tensor, named after it.
    for key, (temporary, dtype) in staged.items():
        final = temporary.with_name(f"{key}.safetensors")
        os.replace(temporary, final)
        point_at_file(loader, key, final, dtype)
    return repacked


def _repacked_tensors(name: str, module: LowBitLinear, loader, quantize_op, model) -> dict:
    """The packed tensors of module `name` if its offloaded weight is still the 16-bit source, else {}."""
    stale = []
    for tensor_name, spec in module.tensor_specs().items():
        entry = disk_entry(loader, f"{name}.{tensor_name}")
        if entry is None or entry.get("safetensors_file") is None:
            continue  # kept in memory, or a raw .dat file accelerate wrote from the packed tensor itself
        header = read_header(entry["safetensors_file"], entry.get("weight_name"))
        shape, dtype = header.shape, header.dtype
        if shape != spec.shape or dtype != SAFETENSORS_DTYPES[spec.dtype]:
            stale.append((tensor_name, entry, shape, dtype))
    if not stale:
        return {}
    if [tensor_name for tensor_name, *_ in stale] != ["weight"]:
        found = ", ".join(f"'{t}' is {s} {d}" for t, _, s, d in stale)
        raise CheckpointFormatError(f"quantized module '{name}': offloaded tensors differ from its format: {found}")
    if offload_folder(loader) is None:
        raise ValueError(f"quantized module '{name}' is offloaded to disk: give from_pretrained an offload_folder")
    _, entry, _, _ = stale[0]
    source = load_tensor(entry["safetensors_file"], entry["weight_name"])
    return {key: tensor.data for key, tensor in quantize_op.convert({f"{name}.weight": source}, model=model).items()}


def dequantize_offloaded_layers(model: nn.Module, dtype: torch.dtype) -> dict[str, nn.Linear]:
    """An nn.Linear (on meta, offloaded like the layer it replaces) for every offloaded LowBitLinear of `model`.

    Each layer's dequantized weight is written where its packed weight was offloaded: into the offload folder for a
    disk entry (one safetensors file per tensor, as transformers writes them) or into the offloaded state dict for a
    CPU entry; the statistics' entries are dropped. All or nothing: an offloaded layer without a hook of its own is
    refused before anything is read, and the disk files are staged and moved into place only once every layer has
    been dequantized; a failure removes them and leaves the model and its offload folder as they were.
    """
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LowBitLinear) and m.weight.is_meta}
    for name, layer in layers.items():
        if offload_hook(layer) is None:
            raise NotImplementedError(
                f"quantized module '{name}' has its tensors on the meta device but no accelerate offload hook of its "
                "own (as device_map loading attaches), so dequantize() cannot read them or offload its result; "
                "nothing was changed"
            )
    staged: list[tuple[object, str, Path, str]] = []  # loader, key, temporary file, dtype
    in_memory: list[tuple[dict, str, torch.Tensor]] = []
    try:
        for name, layer in layers.items():
            hook = offload_hook(layer)
            store, prefix = offloaded_store(hook)
            stored = {tensor_name: offloaded_tensor(hook, tensor_name) for tensor_name in layer.quantized_tensors()}
            weight = layer.fmt.dequantize(stored, layer.out_features, layer.in_features, layer.scheme, dtype)
            key = f"{prefix}weight"
            if disk_entry(store, key) is not None:
                if offload_folder(store) is None:
                    raise ValueError(f"quantized module '{name}' is offloaded to disk without an offload folder")
                temporary = offload_folder(store) / offload_file_name(key)
                staged.append((store, key, temporary, str(dtype).removeprefix("torch.")))
                save_file({key: weight.contiguous().cpu()}, str(temporary))
            else:
                in_memory.append((in_memory_mapping(store), key, weight))
    except BaseException:
        for _, _, temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise

    for loader, key, temporary, dtype_name in staged:
        final = temporary.with_name(f"{key}.safetensors")
        os.replace(temporary, final)
        point_at_file(loader, key, final, dtype_name)
    for mapping, key, weight in in_memory:
        mapping[key] = weight
    linears = {}
    for name, layer in layers.items():
        hook = offload_hook(layer)
        store, prefix = offloaded_store(hook)
        for tensor_name in layer.quantized_tensors():
            if tensor_name != "weight":
                forget(store, f"{prefix}{tensor_name}")
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype)
        add_hook_to_module(linear, hook)  # re-initialised on the new module: its tensors stay on meta, read on demand
        linears[name] = linear
    return linears
