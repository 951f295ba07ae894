"""LowBitLinear: the module that replaces nn.Linear (and GPT-2's Conv1D) in a quantized model; KeptLinear: the
class of the layer a quantized model keeps in 16-bit at its output (the head)."""

from __future__ import annotations

import torch
from torch import nn

from .formats import QuantScheme, get_format
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
        self.activations = self.fmt.activations(scheme)  # None (16-bit), or the activations mode's typed settings
        self.compute_dtype = compute_dtype
        # GPT-2's Conv1D stores its weight as (in, out); the quantize step transposes it once, at load.
        self.source_is_conv1d = source_is_conv1d
        self._tensor_names = []
        self._stored_dtypes = {}
        for name, spec in self.fmt.tensor_specs(out_features, in_features, scheme).items():
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
        return self.fmt.tensor_specs(self.out_features, self.in_features, self.scheme)

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

    def load_quantized(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the stored tensors, checking each against the format's spec."""
        specs = self.tensor_specs()
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
