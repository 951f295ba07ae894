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

from accelerate.utils import OffloadedWeightsLoader
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .modules import LowBitLinear
from .serialization import SAFETENSORS_DTYPES, CheckpointFormatError


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


def find_offload_loader(model: nn.Module) -> OffloadedWeightsLoader | None:
    """The loader accelerate's hooks read offloaded tensors from (one per dispatched model), if any."""
    for module in model.modules():
        weights_map = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        loader = getattr(weights_map, "dataset", weights_map)
        if isinstance(loader, OffloadedWeightsLoader):
            return loader
    return None


def _stored_header(entry: dict) -> tuple[tuple[int, ...], str]:
    with safe_open(entry["safetensors_file"], framework="pt") as handle:
        tensor_slice = handle.get_slice(entry.get("weight_name"))
        return tuple(tensor_slice.get_shape()), tensor_slice.get_dtype()


def repack_offloaded_weights(model: nn.Module, quantize_op) -> list[str]:
    """Point every disk-offloaded quantized tensor at its packed form; returns the modules repacked.

    `quantize_op` is the loader's per-weight quantize op (quantizer_plugin.loading.LowBitQuantize), so the packed
    tensors are the very ones a non-offloaded load makes. All or nothing: every packed tensor is first written to a
    temporary file, and only once every module has been repacked are the files moved into place and the index
    pointed at them; a failure partway removes the temporary files and leaves the folder and the index as they were.
    """
    loader = find_offload_loader(model)
    if loader is None or not loader.index:
        return []
    staged: dict[str, tuple[Path, str]] = {}  # tensor key -> (temporary file, dtype)
    repacked = []
    try:
        for name, module in model.named_modules():
            if not isinstance(module, LowBitLinear):
                continue
            packed = _repacked_tensors(name, module, loader, quantize_op, model)
            for key, tensor in packed.items():
                temporary = Path(loader.save_folder) / f"{key}.safetensors.partial"
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
        loader.index[key] = {"safetensors_file": str(final), "weight_name": key, "dtype": dtype}
    return repacked


def _repacked_tensors(name: str, module: LowBitLinear, loader: OffloadedWeightsLoader, quantize_op, model) -> dict:
    """The packed tensors of module `name` if its offloaded weight is still the 16-bit source, else {}."""
    stale = []
    for tensor_name, spec in module.tensor_specs().items():
        entry = loader.index.get(f"{name}.{tensor_name}")
        if entry is None or entry.get("safetensors_file") is None:
            continue  # kept in memory, or a raw .dat file accelerate wrote from the packed tensor itself
        shape, dtype = _stored_header(entry)
        if shape != spec.shape or dtype != SAFETENSORS_DTYPES[spec.dtype]:
            stale.append((tensor_name, entry, shape, dtype))
    if not stale:
        return {}
    if [tensor_name for tensor_name, *_ in stale] != ["weight"]:
        found = ", ".join(f"'{t}' is {s} {d}" for t, _, s, d in stale)
        raise CheckpointFormatError(f"quantized module '{name}': offloaded tensors differ from its format: {found}")
    if loader.save_folder is None:
        raise ValueError(f"quantized module '{name}' is offloaded to disk: give from_pretrained an offload_folder")
    _, entry, _, _ = stale[0]
    with safe_open(entry["safetensors_file"], framework="pt") as handle:
        source = handle.get_tensor(entry["weight_name"])
    return {key: tensor.data for key, tensor in quantize_op.convert({f"{name}.weight": source}, model=model).items()}
