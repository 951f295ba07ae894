"""LowBitLinear: the module that replaces nn.Linear (and GPT-2's Conv1D) in a quantized model; KeptLinear: the
class of the layer a quantized model keeps in 16-bit at its output (the head)."""

from __future__ import annotations

import torch
from torch import nn

from .formats import QuantScheme, get_format
from .formats.activations import INPUT_SCALE, INPUT_SMOOTHING
from . import ops


class LowBitLinear(nn.Module):
    """A linear layer whose weight is stored in a low-bit format (see quantizer_plugin.formats).

    The stored tensors are frozen parameters named after the format's spec (`weight`, `weight_absmax`, ...), so
    that transformers' loader, accelerate's offloading and save_pretrained handle them like any other parameter.
    Their dtypes are part of the format: `.to(dtype)`/`.half()` on the model move them but never cast them. Code
    that assigns `param.data` directly can still change one: PEFT's prepare_model_for_kbit_training upcasts every
    float16 parameter to float32, int4/int2's scales and zero points included. That cast is exact, so the layer reads
    them back in the format's dtype (`quantized_tensors`) and saves them so (a state-dict hook).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: QuantScheme,
        compute_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        source_is_conv1d: bool = False,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.fmt = get_format(scheme.weights)
        # None (16-bit), or the activations mode's typed settings; a static mode's are built at each call from the
        # stored input_scale (activation_record)
        self.activations = self.fmt.activations(scheme)
        self.static_activations = bool(self.fmt.activation_specs(in_features, scheme))
        self.module_name: str | None = None  # the model's name for this layer, for errors (set where it is swapped in)
        # calibration (activation_scales.py): while set, called with each input, and the layer runs in 16-bit
        self.observer = None
        self._checked_scale = None  # the input_scale last found calibrated: (data pointer, version)
        self.compute_dtype = compute_dtype
        # GPT-2's Conv1D stores its weight as (in, out); the quantize step transposes it once, at load.
        self.source_is_conv1d = source_is_conv1d
        self._tensor_names = []
        self._stored_dtypes = {}
        for name, spec in self.tensor_specs().items():
            tensor = torch.empty(spec.shape, dtype=spec.dtype, device=device)
            self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
            self._tensor_names.append(name)
            self._stored_dtypes[name] = spec.dtype
        self.register_state_dict_post_hook(_stored_dtypes_in_state_dict)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: QuantScheme, compute_dtype: torch.dtype = torch.bfloat16):
        """Quantize an existing nn.Linear (outside from_pretrained, e.g. in tests and benchmarks)."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, scheme, compute_dtype,
            device=linear.weight.device,
        )  # fmt: skip
        layer.load_quantized(ops.quantize(layer.fmt, linear.weight.detach(), scheme))
        ops.prepare(layer.fmt.name, linear.weight.device)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def tensor_specs(self):
        """The stored tensors: the format's, then the activations mode's (a static mode's input_scale)."""
        specs = self.fmt.tensor_specs(self.out_features, self.in_features, self.scheme)
        return specs | self.fmt.activation_specs(self.in_features, self.scheme)

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors, each in its format's dtype (see the class docstring)."""
        tensors = {name: getattr(self, name) for name in self._tensor_names}
        return {name: t if t.dtype == self._stored_dtypes[name] else t.to(self._stored_dtypes[name])
                for name, t in tensors.items()}  # fmt: skip

    def weight_record(self):
        """The stored tensors as the format family's typed record (formats/records.py), what the kernels are handed.

        Built from the parameters at each call rather than kept: accelerate's offload hooks, FSDP2 and PEFT's
        upcast replace the parameters (or their data) between calls, and a kept record would go on reading the old
        tensors. Building it is a few attribute reads; under torch.compile it is traced away.
        """
        return self.fmt.record(self.quantized_tensors(), self.out_features, self.in_features, self.scheme)

    def activation_record(self):
        """The activations mode's record for this call: a static mode's holds the stored input_scale, which must have
        been calibrated (UncalibratedLayerError otherwise; checked once per value of the tensor, and not while
        torch.compile traces, which a calibrated layer has passed in eager calls)."""
        if not self.static_activations:
            return self.activations
        tensors = {name: tensor for name, tensor in self.quantized_tensors().items() if name in STATIC_TENSORS}
        scale = tensors[INPUT_SCALE]
        if not torch.compiler.is_compiling() and not scale.is_meta:
            key = (scale.data_ptr(), scale._version)
            if key != self._checked_scale:
                if not bool((torch.isfinite(scale) & (scale > 0)).all()):
                    raise UncalibratedLayerError(self)
                self._checked_scale = key
        return self.fmt.activations(self.scheme, tensors)

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the stored tensors, checking each against the format's spec. A static activations mode's input_scale,
        when not given, is NaN: not calibrated (the layer refuses to run until a calibration sets it)."""
        specs = self.tensor_specs()
        device = next(iter(tensors.values())).device if tensors else None
        tensors = uncalibrated_tensors(self.in_features, self.scheme, device) | dict(tensors)
        if set(tensors) != set(specs):
            raise ValueError(f"expected tensors {sorted(specs)}, got {sorted(tensors)}")
        for name, tensor in tensors.items():
            spec = specs[name]
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(
                    f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, the format expects {spec.shape} {spec.dtype}"
                )
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out_features, in_features) weight in `dtype` (default: the compute dtype)."""
        return self.weight_record().dequantize(dtype or self.compute_dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """An ordinary nn.Linear holding the dequantized weight."""
        dtype = dtype or self.compute_dtype
        weight = self.dequantize_weight(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:  # calibrating: the input observed, the product taken with 16-bit activations
            self.observer(x)
            return ops.lowbit_linear(x, self, activations=None)
        return ops.lowbit_linear(x, self)

    def _apply(self, fn, recurse=True):
        # nn.Module._apply casts every float parameter on .to(dtype)/.half(); the stored tensors' dtypes are part of
        # the format, so they only follow the device. `fn` applied to an empty float tensor tells which device.
        order = list(self._parameters)
        stored = {name: self._parameters.pop(name) for name in self._tensor_names}
        try:
            super()._apply(fn, recurse)
        finally:
            for name, param in stored.items():
                probe = fn(torch.empty(0, device=param.device))
                if probe.device != param.device:
                    moved = torch.empty_like(param, device=probe.device) if param.is_meta else param.to(probe.device)
                    stored[name] = nn.Parameter(moved, requires_grad=False)
            merged = {name: stored[name] if name in stored else self._parameters[name] for name in order}
            self._parameters.clear()
            self._parameters.update(merged)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weights={self.scheme.weights}, {self.scheme.detail()}, compute_dtype={self.compute_dtype}"
        )


class UncalibratedLayerError(RuntimeError):
    def __init__(self, layer: LowBitLinear):
        name = layer.module_name or f"a LowBitLinear ({layer.in_features} -> {layer.out_features})"
        super().__init__(
            f"{name}: activations={layer.scheme.activations!r} needs the input_scale a calibration pass records, and "
            "this layer has none (never calibrated, or its calibration saw no input): run "
            "quantizer_plugin.calibrate(model, dataset, tokenizer=...) or load with LowBitConfig(dataset=...)"
        )


STATIC_TENSORS = (INPUT_SCALE, INPUT_SMOOTHING)


def uncalibrated_tensors(in_features: int, scheme: QuantScheme, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """A fresh layer's activation tensors: a static mode's input_scale as NaN, which no calibration leaves, and its
    input smoothing as ones (none)."""
    specs = get_format(scheme.weights).activation_specs(in_features, scheme)
    fill = {INPUT_SCALE: float("nan"), INPUT_SMOOTHING: 1.0}
    return {name: torch.full(spec.shape, fill[name], dtype=spec.dtype, device=device) for name, spec in specs.items()}


def _stored_dtypes_in_state_dict(module: LowBitLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    for name, dtype in module._stored_dtypes.items():
        key = prefix + name
        if key in state_dict and state_dict[key].dtype != dtype:
            state_dict[key] = state_dict[key].to(dtype)


class KeptLinear(nn.Linear):
    """The output head a quantized model keeps in 16-bit (skip_modules), which is then the largest weight a decode
    step reads: an nn.Linear in every respect (state dict, PEFT, training, save), whose inference runs on the kernel
    the dispatch seam registers for kept layers on its device (ops.kept_linear; on the CPU one that streams the
    weight once per step). The quantizer sets it as the class of the model's own head after loading
    (`keep(module)`), and `release(module)` makes it a plain nn.Linear again (dequantize)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.kept_linear(x, self.weight, self.bias)

    @staticmethod
    def keep(module: nn.Module) -> bool:
        """Make an exact nn.Linear a KeptLinear in place (its parameters untouched); False for any other module."""
        if type(module) is not nn.Linear:
            return False
        module.__class__ = KeptLinear
        return True

    @staticmethod
    def release(module: nn.Module) -> None:
        if type(module) is KeptLinear:
            module.__class__ = nn.Linear
