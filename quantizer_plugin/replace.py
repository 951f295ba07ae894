"""Module swap: nn.Linear and GPT-2 style Conv1D -> LowBitLinear, on the meta-device skeleton before weights load."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.quantizers_utils import should_convert_module

from .formats import QuantScheme
from .modules import LowBitLinear
from .offload import dequantize_offloaded_layers


def is_skipped(name: str, modules_to_not_convert: list[str] | None) -> bool:
    """A module is kept in full precision when it, or any module containing it, matches a skip pattern."""
    parts = name.split(".")
    prefixes = (".".join(parts[: i + 1]) for i in range(len(parts)))
    return any(not should_convert_module(prefix, modules_to_not_convert) for prefix in prefixes)


def check_skip_patterns(model: nn.Module, patterns: list[str]) -> None:
    """Raise naming every skip pattern that matches no module of `model` (it would silently skip nothing)."""
    names = [name for name, _ in model.named_modules() if name]
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"LowBitConfig.skip_modules: {pattern!r} is not a valid pattern ({error})") from None
    unmatched = [pattern for pattern in patterns if all(should_convert_module(name, [pattern]) for name in names)]
    if unmatched:
        top = [name for name, _ in model.named_children()]
        raise ValueError(
            f"LowBitConfig.skip_modules: {unmatched} match no module of {type(model).__name__} "
            f"(top-level modules: {top}; a pattern matches a module name from its start, as a regex, or as a suffix)"
        )


def output_head_name(model: nn.Module, skip_patterns: list[str] | None) -> str:
    """The name of the output head `LowBitConfig.head` quantizes, checked: an exact nn.Linear, not tied to the input
    embeddings, not named by the user's skip_modules."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = next((name for name, module in model.named_modules() if head is not None and module is head), None)
    if name is None or type(head) is not nn.Linear:
        raise ValueError(
            f"LowBitConfig.head: {type(model).__name__} has no nn.Linear output head to quantize "
            f"(get_output_embeddings() gives {type(head).__name__}); pass head=None"
        )
    tied_keys = getattr(model, "all_tied_weights_keys", None) or {}  # tied parameter -> its source, as transformers ties
    tied = set(tied_keys) | set(tied_keys.values())
    if f"{name}.weight" in tied:
        raise ValueError(
            f"LowBitConfig.head: {type(model).__name__}'s head {name!r} is tied to its input embeddings "
            "(tie_word_embeddings), and quantizing the two as one weight is not supported yet; pass head=None"
        )
    if skip_patterns and is_skipped(name, skip_patterns):
        raise ValueError(
            f"LowBitConfig.head quantizes the output head {name!r}, which skip_modules {skip_patterns} keeps in "
            "16-bit: set one or the other"
        )
    return name


def replace_output_head(model: nn.Module, name: str, scheme: QuantScheme, compute_dtype: torch.dtype) -> None:
    """Swap the output head `name` (see output_head_name) for a LowBitLinear in its own scheme."""
    module = model.get_submodule(name)
    _swap(model, name, module, module.in_features, module.out_features, scheme, compute_dtype, is_conv1d=False)


def _swap(model, name, module, in_features, out_features, scheme, compute_dtype, is_conv1d) -> None:
    """Put a LowBitLinear on the meta device in place of `module` (its bias, if any, to be loaded too)."""
    with torch.device("meta"):
        new_module = LowBitLinear(
            in_features, out_features, module.bias is not None, scheme, compute_dtype, source_is_conv1d=is_conv1d
        )
    if module.bias is not None:
        new_module.bias = nn.Parameter(torch.empty_like(module.bias, device="meta"), requires_grad=False)
    new_module.module_name = name
    model.set_submodule(name, new_module)


def replace_linear_modules(
    model: nn.Module, scheme: QuantScheme, compute_dtype: torch.dtype, modules_to_not_convert: list[str] | None
) -> list[str]:
    """Swap every eligible layer of `model` in place; returns the names of the swapped modules."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not name or is_skipped(name, modules_to_not_convert):
            continue
        # Exact nn.Linear only: subclasses (e.g. NonDynamicallyQuantizableLinear inside attention) carry extra behaviour.
        if type(module) is nn.Linear:
            in_features, out_features, is_conv1d = module.in_features, module.out_features, False
        elif isinstance(module, Conv1D):
            (in_features, out_features), is_conv1d = module.weight.shape, True
        else:
            continue
        _swap(model, name, module, in_features, out_features, scheme, compute_dtype, is_conv1d)
        replaced.append(name)
    return replaced


def dequantize_modules(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap every LowBitLinear back for an nn.Linear holding its dequantized weight; returns how many.

    An offloaded layer becomes an nn.Linear that stays offloaded (offload.dequantize_offloaded_layers).
    """
    offloaded = dequantize_offloaded_layers(model, dtype)
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LowBitLinear):
            model.set_submodule(name, offloaded[name] if name in offloaded else module.to_linear(dtype))
            count += 1
    return count
