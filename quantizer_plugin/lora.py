"""LoRA (QLoRA) on our quantized layers, for PEFT.

This module imports peft at its top, so the package only imports it once peft itself has been imported (see
`quantizer_plugin/__init__.py`): peft is an optional dependency, never a runtime one.

How a plain `get_peft_model(model, LoraConfig(...))` finds `LowBitLoraLinear`, with no step from the user:
PEFT's extension point for LoRA on a custom layer type is `LoraConfig._register_custom_module`, but it is per config
object, and `PeftModel.from_pretrained` builds a fresh config from adapter_config.json, so a user would have to
register on every config, by hand. PEFT also resolves `target_modules="all-linear"` by `isinstance(nn.Linear)`,
which our layer is not (making it one would expose its packed uint8 weight to every nn.Linear code path in
transformers). `register_with_peft` therefore wraps one PEFT function, `tuners_utils._maybe_include_all_linear_layers`
(integrations/peft.py), which PEFT calls once per adapter injection, after the config is final and before any module
is replaced. For a LoRA
config on a model holding LowBitLinear layers (and only then) the wrapper
  1. resolves "all-linear" to include our layers (the output head stays excluded, as PEFT does),
  2. checks every targeted module up front, so that a target LoRA cannot wrap fails with its name before anything is
     replaced (PEFT itself replaces module by module and leaves a half-wrapped model behind when one fails),
  3. registers `LowBitLoraLinear` for `LowBitLinear` on the config through `_register_custom_module`, so the layer is
     then built by PEFT's own custom-module dispatch. A mapping the user registered for LowBitLinear is kept.
Every other model and config goes through PEFT untouched.

`register_with_peft` also wraps `PeftModel.get_nb_trainable_parameters` so that `print_trainable_parameters()`
counts a quantized layer's weights rather than its packed bytes and statistics (see parameter_count.py).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge, check_target_module_exists
from peft.utils import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from .integrations.peft import (
    custom_module_types,
    register_custom_module,
    wrap_target_resolution,
    wrap_trainable_count,
)
from .modules import LowBitLinear
from .parameter_count import count_correction

# Module types that PEFT's default LoRA dispatch can wrap (peft/tuners/lora/layer.py: dispatch_default).
_PEFT_WRAPPABLE = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, Conv1D)


class LowBitLoraLinear(nn.Module, LoraLayer):
    """LoRA adapters on a frozen LowBitLinear: y = base(x) + sum over active adapters of B(A(dropout(x))) * scaling.

    The base forward is the quantized layer's own (quantizer_plugin.ops: the frozen-weight autograd rule, Triton on
    CUDA), so gradients reach the adapters and the layer input, never the stored tensors. Merging cannot happen in
    place: the low-bit storage cannot hold W + delta without re-quantizing, which would lose the delta in rounding.
    `merge_and_unload()` instead returns a plain nn.Linear in the compute dtype holding dequant(W) + delta.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        # PEFT's generic lookup warns "unsupported layer type" for any layer outside its own list.
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        # LoraLayer's variant table holds plain LoRA only, so any requested variant fails there; say why.
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as exc:
            raise ValueError(
                f"LoRA variants are not supported on quantized LowBitLinear layers ({exc}): LowBitLoraLinear "
                "implements plain LoRA only (no DoRA, aLoRA, Arrow, ...)"
            ) from None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A, (out_features, in_features), in float32."""
        weight_a = self.lora_A[adapter].weight.float()
        weight_b = self.lora_B[adapter].weight.float()
        return (weight_b @ weight_a) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        if check_adapters_to_merge(self, adapter_names):
            raise NotImplementedError(
                "LoRA adapters cannot be merged into a quantized LowBitLinear in place (its low-bit storage cannot "
                "hold the merged weight without re-quantizing it); use merge_and_unload(), which replaces each "
                "layer by an nn.Linear holding the dequantized weight plus the LoRA delta"
            )

    def unmerge(self) -> None:
        # merge() never changes the base layer, so there is never anything to undo.
        warnings.warn("Already unmerged. Nothing to do.")

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: list[str] | None
    ) -> nn.Module:
        """PEFT's unload hook: the quantized base layer (unload), or an nn.Linear with the adapters merged in."""
        base = self.get_base_layer()
        if not merge:
            return base
        adapters = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.lora_A]
        weight = base.dequantize_weight(torch.float32)
        bias = None if base.bias is None else base.bias.detach().float()
        for adapter in adapters:
            weight = weight + self.get_delta_weight(adapter).to(weight.device)
            if self.lora_bias[adapter]:
                adapter_bias = self.lora_B[adapter].bias.detach().float() * self.scaling[adapter]
                bias = adapter_bias if bias is None else bias + adapter_bias
        if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs or infinities in the merged weight of adapters {adapters}; they seem to be broken")
        merged = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta")
        merged.weight = nn.Parameter(weight.to(base.compute_dtype), requires_grad=False)
        if bias is not None:
            merged.bias = nn.Parameter(bias.to(base.compute_dtype), requires_grad=False)
        return merged

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            # Under autocast the adapters run in the autocast dtype; otherwise in their own (float32 after PEFT's
            # autocast_adapter_dtype), whatever the dtype of the hidden states.
            adapter_input = x if torch.is_autocast_enabled() else self._cast_input_dtype(x, lora_a.weight.dtype)
            delta = lora_b(lora_a(self.lora_dropout[adapter](adapter_input))) * self.scaling[adapter]
            result = result + delta.to(result_dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _targets_lowbit_model(peft_config, model: nn.Module) -> bool:
    return peft_config.peft_type == PeftType.LORA and any(isinstance(m, LowBitLinear) for m in model.modules())


def _include_lowbit_layers_in_all_linear(peft_config, model: nn.Module, requested) -> None:
    if not (isinstance(requested, str) and requested.lower() == "all-linear"):
        return
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inside_adapters = _names_inside_adapter_layers(model)
    found = {
        name
        for name, module in model.named_modules()
        if isinstance(module, LowBitLinear) and module is not output_head and name not in inside_adapters
    }
    peft_config.target_modules = set(peft_config.target_modules) | found


def _names_inside_adapter_layers(model: nn.Module) -> set[str]:
    inside = set()
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            inside.update(f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix)
    return inside


def _check_targets_wrappable(peft_config, model: nn.Module) -> None:
    """Raise, naming each one, if a targeted module is a type LoRA cannot wrap; called before any is replaced."""
    custom = custom_module_types(peft_config)
    inside_adapters = _names_inside_adapter_layers(model)
    unwrappable = []
    for name, module in model.named_modules():
        if not name or name in inside_adapters or not check_target_module_exists(peft_config, name):
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(module, BaseTunerLayer) and not isinstance(base, (LowBitLinear, *_PEFT_WRAPPABLE, *custom)):
            unwrappable.append(f"{name} ({type(base).__name__})")
    if unwrappable:
        raise ValueError(
            f"LoRA cannot wrap target module(s) {', '.join(unwrappable)}: only linear layers (LowBitLinear, nn.Linear, "
            "Conv1D), embeddings, convolutions and attention can carry LoRA adapters; fix target_modules. "
            "No module was changed."
        )


def _after_target_resolution(peft_config, model: nn.Module, requested) -> None:
    if _targets_lowbit_model(peft_config, model):
        _include_lowbit_layers_in_all_linear(peft_config, model, requested)
        _check_targets_wrappable(peft_config, model)
        if not any(issubclass(LowBitLinear, key) for key in custom_module_types(peft_config)):
            register_custom_module(peft_config, {LowBitLinear: LowBitLoraLinear})


def register_with_peft() -> None:
    """Make PEFT's LoRA handle LowBitLinear layers (see the module docstring). Idempotent."""
    wrap_trainable_count(count_correction)
    wrap_target_resolution(_after_target_resolution)
