"""What every weight format provides, and the registry that maps a format name to its implementation.

A format is a storage spec (the tensors a quantized linear layer holds, with their shapes and dtypes), a quantize
step, and the typed record (formats/records.py) that hands those tensors to the kernels of its family. The family's
plain-PyTorch dequantize and reference linear run on any device and are every kernel's oracle.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .activations import INPUT_SCALE, INPUT_SMOOTHING, STATIC_MODES, ActivationRecord, Q8Activations


# The on-disk layout version (tensor names, shapes, codebooks); LowBitConfig.format_version records it in config.json.
# 1: the 4-bit packed weight and absmax codes were 1-D and the double-quant offset 0-d.
# 2: no stored tensor is 1-D and 8-bit or packed (the classic fine-tuning recipe casts every 1-D parameter to float32)
#    and none is 0-d (FSDP2's fully_shard refuses scalar parameters). Same element order: v1 -> v2 is a reshape.
FORMAT_VERSION = 2


# QuantScheme.activations' default: the format's first activations mode (LLM.int8's int8 for weights="int8").
FORMAT_DEFAULT = "the format's default"


@dataclass(frozen=True)
class QuantScheme:
    """The per-layer quantization settings a format needs (a projection of LowBitConfig)."""

    weights: str
    block_size: int | None = FORMAT_DEFAULT  # the format's default (64; fp8: None, one scale per row)
    double_quant: bool = True
    outlier_threshold: float = 6.0
    smoothing_alpha: float | None = None  # static activations: SmoothQuant's migration strength (None: no smoothing)
    format_version: int = FORMAT_VERSION
    # "int8" (LLM.int8), "q8_0", "int8_static", "fp8_static" (formats/activations.py) or None (16-bit activations)
    activations: str | None = FORMAT_DEFAULT

    def __post_init__(self):
        fmt = get_format(self.weights)
        if self.activations == FORMAT_DEFAULT:
            object.__setattr__(self, "activations", fmt.default_activations)
        if self.block_size == FORMAT_DEFAULT:
            object.__setattr__(self, "block_size", fmt.settings.get(self.activations, {}).get("block_size", 64))

    def detail(self) -> str:
        """The settings that apply to this format and activations mode, as `name=value` pairs."""
        applicable = get_format(self.weights).settings[self.activations]
        return ", ".join([f"activations={self.activations}", *(f"{name}={getattr(self, name)}" for name in applicable)])


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one stored tensor of a quantized layer."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def refuse_non_finite(weight: torch.Tensor) -> None:
    """Quantizing a NaN or an infinity would give garbage codes (or an obscure error): refuse the weight instead."""
    if not bool(torch.isfinite(weight).all()):
        raise NonFiniteWeightError()


class NonFiniteWeightError(ValueError):
    def __init__(self):
        super().__init__("the weight holds NaN or infinite values, which quantized formats cannot represent")


class WeightFormat(ABC):
    """One low-bit storage format. Subclasses are stateless; one instance per format is registered.

    A format is a member of a family (formats/records.py): it lays its stored tensors out as the family's record
    reads them, and `record` hands them to the kernels as that record. Dequantizing and the reference linear are the
    family's arithmetic on the record, so a new format of an existing family needs no kernel code.
    """

    name: str
    bits: int
    family: str  # the records.py family whose record `record` builds
    # The LowBitConfig fields this format reads (besides weights and compute_dtype) with their defaults, for each
    # activations mode it accepts; the first mode is the default. 16-bit activations (None) for weight-only formats.
    settings: dict[str | None, dict[str, object]] = {None: {}}

    @property
    def default_activations(self) -> str | None:
        return next(iter(self.settings))

    @abstractmethod
    def tensor_specs(self, out_features: int, in_features: int, scheme: QuantScheme) -> dict[str, TensorSpec]:
        """The tensors a layer of this shape stores, keyed by attribute name (`weight` first)."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        """Quantize a float weight of shape (out_features, in_features) into the tensors of `tensor_specs`."""

    @abstractmethod
    def record(self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme):
        """The stored tensors (as `tensor_specs` names them, in their stored dtypes) as the family's typed record."""

    def activations(self, scheme: QuantScheme, tensors: dict[str, torch.Tensor] | None = None) -> ActivationRecord | None:
        """The record of the scheme's activations mode: None for 16-bit activations (every format's default); q8_0
        or a static mode where the format's settings name it (a static mode's record holds the layer's input_scale
        from `tensors`, None without them)."""
        if scheme.activations is None:
            return None
        if scheme.activations == Q8Activations.mode and Q8Activations.mode in self.settings:
            return Q8Activations()
        if scheme.activations in STATIC_MODES and scheme.activations in self.settings:
            tensors = tensors or {}
            return STATIC_MODES[scheme.activations](tensors.get(INPUT_SCALE), tensors.get(INPUT_SMOOTHING))
        raise ValueError(f"weights={self.name!r} takes activations in {list(self.settings)}, got {scheme.activations!r}")

    @staticmethod
    def activation_specs(in_features: int, scheme: QuantScheme) -> dict[str, TensorSpec]:
        """The tensors the scheme's activations mode stores beside the weight's: a static mode's input_scale, and
        its input_smoothing with SmoothQuant (formats/activations.py)."""
        if scheme.activations not in STATIC_MODES:
            return {}
        specs = {INPUT_SCALE: TensorSpec((1,), torch.float32)}
        if scheme.smoothing_alpha is not None:
            specs[INPUT_SMOOTHING] = TensorSpec((in_features,), torch.float32)
        return specs

    def conform(
        self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme
    ) -> dict[str, torch.Tensor]:
        """The same tensors shaped as `scheme.format_version` lays them out (layouts differ only by shape)."""
        specs = self.tensor_specs(out_features, in_features, scheme) | self.activation_specs(in_features, scheme)
        return {name: tensor.reshape(specs[name].shape) for name, tensor in tensors.items()}

    def dequantize(
        self, tensors: dict[str, torch.Tensor], out_features: int, in_features: int, scheme: QuantScheme, dtype: torch.dtype
    ) -> torch.Tensor:
        """Rebuild the (out_features, in_features) weight in `dtype`."""
        return self.record(tensors, out_features, in_features, scheme).dequantize(dtype)

    def reference_linear(
        self,
        x: torch.Tensor,
        tensors: dict[str, torch.Tensor],
        bias: torch.Tensor | None,
        out_features: int,
        in_features: int,
        scheme: QuantScheme,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        """The layer's plain-torch forward in the scheme's activations mode (see `reference_linear` below)."""
        weight = self.record(tensors, out_features, in_features, scheme)
        return reference_linear(x, weight, bias, compute_dtype, self.activations(scheme, tensors))


def reference_linear(
    x: torch.Tensor, weight, bias: torch.Tensor | None, compute_dtype: torch.dtype, activations: ActivationRecord | None
) -> torch.Tensor:
    """y = x @ dequant(W).T + bias in `compute_dtype` (or the activations mode's own reference), in x's dtype. Plain
    torch, differentiable in x: the oracle of every kernel."""
    if activations is not None:
        return activations.reference_linear(x, weight, bias, compute_dtype)
    bias = None if bias is None else bias.to(compute_dtype)
    return F.linear(x.to(compute_dtype), weight.dequantize(compute_dtype), bias).to(x.dtype)


_FORMATS: dict[str, WeightFormat] = {}


def register_format(fmt: WeightFormat) -> WeightFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"weight format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> WeightFormat:
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; known formats: {sorted(_FORMATS)}") from None


def format_names() -> list[str]:
    return sorted(_FORMATS)
