"""The on-disk layout of a quantized checkpoint, and its check before a pre-quantized load.

save_pretrained writes each LowBitLinear's stored tensors (quantizer_plugin.formats gives their names, shapes and
dtypes) as ordinary safetensors entries beside the model's other weights, and the LowBitConfig (with its
format_version) into config.json. Before a pre-quantized load we read only the safetensors headers and check that
every quantized module's tensors are there with the right shape and dtype, so that a bad checkpoint fails with an
error naming the module, before any weight is loaded, and no half-loaded model is returned.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from torch import nn

from .checkpoints.headers import SAFETENSORS_DTYPES, TensorHeader, UnreadableCheckpointError, read_headers
from .formats import FORMAT_VERSION
from .modules import LowBitLinear

if TYPE_CHECKING:
    from .config import LowBitConfig


class CheckpointFormatError(ValueError):
    """A pre-quantized checkpoint does not hold what its quantization config says it holds."""


def read_tensor_headers(checkpoint_files: list[str]) -> dict[str, TensorHeader]:
    """Name -> header (shape, safetensors dtype, file) for every tensor of the checkpoint, reading headers only."""
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointFormatError(f"{path}: pre-quantized lowbit checkpoints are read from safetensors files only")
    try:
        return read_headers(checkpoint_files)
    except UnreadableCheckpointError as error:
        raise CheckpointFormatError(str(error)) from error


def find_key(headers: dict, key: str, base_prefix: str) -> str | None:
    # A checkpoint saved from a model with a head (`model.layers...`) may be loaded into the bare model and back.
    for candidate in (key, f"{base_prefix}.{key}", key.removeprefix(f"{base_prefix}.")):
        if candidate in headers:
            return candidate
    return None


def check_prequantized_checkpoint(model: nn.Module, checkpoint_files: list[str]) -> int:
    """Raise CheckpointFormatError naming the first module whose stored tensors are missing or malformed.

    Returns the number of quantized modules checked.
    """
    headers = read_tensor_headers(checkpoint_files)
    base_prefix = getattr(model, "base_model_prefix", "") or "\0"
    checked = 0
    for module_name, module in model.named_modules():
        if not isinstance(module, LowBitLinear):
            continue
        for tensor_name, spec in module.tensor_specs().items():
            key = find_key(headers, f"{module_name}.{tensor_name}", base_prefix)
            what = f"quantized module '{module_name}': tensor '{tensor_name}'"
            if key is None:
                raise CheckpointFormatError(f"{what} is missing from the checkpoint")
            shape, dtype = headers[key].shape, headers[key].dtype
            if shape != spec.shape:
                raise CheckpointFormatError(f"{what} has shape {shape} in the checkpoint, expected {spec.shape}")
            if dtype != SAFETENSORS_DTYPES[spec.dtype]:
                raise CheckpointFormatError(
                    f"{what} has dtype {dtype} in the checkpoint, expected {SAFETENSORS_DTYPES[spec.dtype]}"
                )
        checked += 1
    return checked


def upgrade_layout(model: nn.Module, config: LowBitConfig) -> bool:
    """Bring a model loaded from an older layout (config.format_version) to FORMAT_VERSION; True if it was.

    Layouts differ only by tensor shapes, so this is a reshape of each stored tensor, no copy. A layer offloaded by
    accelerate has no tensors here to reshape (its hook reloads them in the checkpoint's shapes at every forward),
    so a model with an offloaded quantized layer keeps the old layout throughout, and its config says so: what it
    saves is then a consistent old-layout checkpoint.
    """
    if config.format_version >= FORMAT_VERSION:
        return False
    layers = [module for module in model.modules() if isinstance(module, LowBitLinear)]
    if any(tensor.is_meta for layer in layers for tensor in layer.quantized_tensors().values()):
        return False
    for layer in layers:
        scheme = replace(layer.scheme, format_version=FORMAT_VERSION)
        tensors = layer.fmt.conform(layer.quantized_tensors(), layer.out_features, layer.in_features, scheme)
        layer.scheme = scheme
        layer.load_quantized(tensors)
    config.format_version = FORMAT_VERSION
    return True
