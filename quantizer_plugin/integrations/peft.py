"""PEFT's internals we touch (see README.md): when our LoRA layer is registered, and the PEFT functions it wraps.

quantizer_plugin.lora is registered with peft once peft is imported.

peft is optional, so the plugin never imports it itself; importing peft costs about 2.7 s on our CPU machines (it
imports bitsandbytes), more than an nf4 load of a small model, so a quantized load must not import it either.
Registration therefore happens at whichever of these comes first, in any import order:
  - at plugin import, when peft is imported already;
  - when a quantized model is built, when peft is imported by then;
  - when peft's own `__init__` runs later, through a finder on sys.meta_path.
The finder is never used up: a probe such as transformers' `is_peft_available()` (importlib.util.find_spec("peft"))
finds peft without running it and leaves the finder in place; it acts only when peft's `__init__` actually runs,
and again after a re-import, since registering is idempotent per peft module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable


def register_with_peft() -> None:
    try:
        importlib.import_module("quantizer_plugin.lora").register_with_peft()
    except (ImportError, AttributeError) as exc:
        # A peft whose internals moved must still import; only LoRA on our layers is then unavailable.
        warnings.warn(f"quantizer_plugin: LoRA on quantized layers is unavailable with this peft version ({exc!r})")


def register_if_peft_imported() -> None:
    if sys.modules.get("peft") is not None:  # None: a blocked import, as if peft were not installed
        register_with_peft()


class _RegisterWhenPeftRuns(importlib.abc.MetaPathFinder):
    """Finds peft through the other finders and wraps its loader so that registration follows peft's __init__."""

    def __init__(self):
        self._resolving = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" or self._resolving:
            return None
        self._resolving = True  # importlib.util.find_spec below consults sys.meta_path, this finder included
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            self._resolving = False
        if spec is None or spec.loader is None:
            return None
        run_peft_init = spec.loader.exec_module  # each find returns a fresh loader, so this wraps only this one

        def exec_module(module):
            run_peft_init(module)
            register_with_peft()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Called at plugin import: register now if peft is imported, else when it is (idempotent)."""
    register_if_peft_imported()
    if not any(isinstance(finder, _RegisterWhenPeftRuns) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterWhenPeftRuns())


# --- the PEFT functions LoRA on our layers needs (each imports peft: called only once peft is imported) -------------


def wrap_target_resolution(after: Callable) -> None:
    """Call after(peft_config, model, requested_target_modules) each time PEFT has resolved an adapter config's targets
    (tuners_utils._maybe_include_all_linear_layers: once per adapter injection, after the config is final and before
    any module is replaced; PEFT's public extension point, LoraConfig._register_custom_module, is per config object,
    and PeftModel.from_pretrained builds a fresh config). Idempotent."""
    from peft.tuners import tuners_utils

    original = tuners_utils._maybe_include_all_linear_layers
    if getattr(original, "_lowbit_wrapped", False):
        return

    def maybe_include_all_linear_layers(peft_config, model):
        requested = getattr(peft_config, "target_modules", None)
        peft_config = original(peft_config, model)
        after(peft_config, model, requested)
        return peft_config

    maybe_include_all_linear_layers._lowbit_wrapped = True
    maybe_include_all_linear_layers.__wrapped__ = original
    tuners_utils._maybe_include_all_linear_layers = maybe_include_all_linear_layers


def wrap_trainable_count(correction: Callable) -> None:
    """Add correction(peft_model) to the total of PeftModel.get_nb_trainable_parameters (print_trainable_parameters),
    which sums stored elements and recognises only bitsandbytes' packed parameters. Idempotent."""
    from peft import PeftModel

    original = PeftModel.get_nb_trainable_parameters
    if getattr(original, "_lowbit_wrapped", False):
        return

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable, total = original(self)
        return trainable, total + correction(self)

    get_nb_trainable_parameters._lowbit_wrapped = True
    get_nb_trainable_parameters.__wrapped__ = original
    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters


def custom_module_types(peft_config) -> tuple[type, ...]:
    """The layer types the config maps to custom LoRA layers (LoraConfig._custom_modules)."""
    return tuple(peft_config._custom_modules or ())


def register_custom_module(peft_config, mapping: dict) -> None:
    """Map base layer types to LoRA layer types on this config (LoraConfig._register_custom_module)."""
    peft_config._register_custom_module(mapping)
