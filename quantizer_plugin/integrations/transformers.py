"""transformers' internals we touch: the quantizer registry's mappings, the config merge of a pre-quantized load, and
two methods we override on the models we quantize (see README.md for why no public seam serves)."""

from __future__ import annotations

import types
from collections.abc import Callable

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoHfQuantizer,
    register_quantization_config,
    register_quantizer,
)

_ORIGINAL_MERGE = "_lowbit_original_merge"


def register_quantization_method(name: str, config_class: type, quantizer_class: type) -> None:
    """Register a quantization method with transformers, idempotently: register_quantization_config and
    register_quantizer refuse a name that is taken, and a re-import of the plugin (importlib.reload in a notebook)
    must not fail, so a stale entry of ours is popped from the mappings first."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(name) is not config_class:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(name, None)
        register_quantization_config(name)(config_class)
    if AUTO_QUANTIZER_MAPPING.get(name) is not quantizer_class:
        AUTO_QUANTIZER_MAPPING.pop(name, None)
        register_quantizer(name)(quantizer_class)


def wrap_config_merge(merge: Callable) -> None:
    """Route AutoHfQuantizer.merge_quantization_configs through merge(original, quantization_config,
    quantization_config_from_args), once (a re-import of the plugin finds it wrapped)."""
    if hasattr(AutoHfQuantizer, _ORIGINAL_MERGE):
        return
    original = AutoHfQuantizer.merge_quantization_configs
    setattr(AutoHfQuantizer, _ORIGINAL_MERGE, original)

    def merged(cls, quantization_config, quantization_config_from_args):
        return merge(getattr(cls, _ORIGINAL_MERGE), quantization_config, quantization_config_from_args)

    AutoHfQuantizer.merge_quantization_configs = classmethod(merged)


def override_method(model: nn.Module, name: str, function: Callable) -> None:
    """Give this one model its own `name` method, function(model, *args, **kwargs), in its __dict__: it follows the
    model through deepcopy, and `restore_method` removes it. `function` calls the class's own method to do the rest."""
    setattr(model, name, types.MethodType(function, model))


def restore_method(model: nn.Module, name: str) -> None:
    model.__dict__.pop(name, None)


def class_method(model: nn.Module, name: str) -> Callable:
    """The class's own `name` (what an override of this model's calls), bound to the model."""
    return types.MethodType(getattr(type(model), name), model)


def keep_in_fp32_modules(model: nn.Module) -> list[str] | None:
    """The modules the model's class keeps in float32 (`_keep_in_fp32_modules`, a class attribute that transformers'
    own quantizers read as we do, to leave them unquantized)."""
    return getattr(model, "_keep_in_fp32_modules", None)


_UPLOAD = "_upload_modified_files"  # PushToHubMixin's: the one call every push path makes after writing README.md


def run_before_upload(model: nn.Module, before: Callable) -> None:
    """Make every push of `model` (push_to_hub, save_pretrained(push_to_hub=True), the distributed save) call
    before(model, folder, repo_id) once the folder to upload is written, README.md included, then upload it."""

    def upload(self, working_dir, repo_id, *args, **kwargs):
        before(self, working_dir, repo_id)
        return class_method(self, _UPLOAD)(working_dir, repo_id, *args, **kwargs)

    override_method(model, _UPLOAD, upload)


def stop_running_before_upload(model: nn.Module) -> None:
    restore_method(model, _UPLOAD)
