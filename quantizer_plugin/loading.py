"""The per-weight quantize operation transformers' loader runs on each eligible weight as it streams in."""

from __future__ import annotations

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.quantizers_utils import get_module_from_name

from . import ops
from .formats.base import NonFiniteWeightError
from .modules import LowBitLinear, uncalibrated_tensors


class LowBitQuantize(ConversionOps):
    """Turns `<layer>.weight` (full precision, just read from the checkpoint) into the layer's stored tensors.

    Only this one weight is ever held in full precision: the loader frees it once the quantized tensors are set.
    """

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model: nn.Module | None = None, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for key, value in input_dict.items():
            weight = value[0] if isinstance(value, list) else value
            layer, tensor_name = get_module_from_name(model, key)
            if not isinstance(layer, LowBitLinear) or tensor_name != "weight":
                raise TypeError(f"{key}: the lowbit quantize op only applies to the weight of a LowBitLinear")
            if layer.source_is_conv1d:
                weight = weight.T
            expected = (layer.out_features, layer.in_features)
            if tuple(weight.shape) != expected:
                raise ValueError(f"{key}: checkpoint weight has shape {tuple(weight.shape)}, the layer expects {expected}")
            prefix = key.rpartition(".")[0]
            stash = self.hf_quantizer.stash
            if stash is not None and prefix in self.hf_quantizer.calibrated_layers:
                # method="gptq": the 16-bit weight waits on disk for its block's calibration; placeholders meanwhile
                stash.put(key, weight)
                specs = layer.tensor_specs()
                for name, spec in specs.items():
                    result[f"{prefix}.{name}"] = nn.Parameter(torch.zeros(spec.shape, dtype=spec.dtype), requires_grad=False)
                continue
            try:
                tensors = ops.quantize(layer.fmt, weight, layer.scheme)
            except NonFiniteWeightError as error:
                raise ValueError(f"{key}: {error}") from None
            # a static activations mode's input_scale: NaN until calibration (after loading) records it
            for name, tensor in (uncalibrated_tensors(layer.in_features, layer.scheme, weight.device) | tensors).items():
                result[f"{prefix}.{name}"] = nn.Parameter(tensor, requires_grad=False)
        return result
