"""The one dispatch seam between a quantized layer and the code that multiplies by its weight.

A kernel is handed the layer's weight as its family's typed record (formats/records.py), never the layer: a forward
kernel is fn(x, weight, bias, compute_dtype, activations) -> y, with `activations` None (16-bit) or the record of an
activations mode (formats/activations.py). Kernels register per (weight family, activations mode, backend), so every
format of a family reaches them. Each family has a plain-PyTorch reference ("torch" backend) that runs on any device;
faster backends register their kernels: "cpu" (quantizer_plugin.cpu: native and torch CPU kernels) and "triton" (the
Triton kernels in quantizer_plugin.kernels). The backend is chosen by device (CPU tensors take "cpu", CUDA tensors
"triton", where the family has a kernel for the mode there; the reference otherwise) unless the environment variable
QUANTIZER_PLUGIN_KERNELS names one ("torch", "cpu" or "triton"): tests force the reference, and the Triton kernels on
CPU under TRITON_INTERPRET=1. A backend without a kernel for a mode runs the mode's reference, never another mode.

The autograd rule lives here too, once for all backends: the weight is frozen, so the backward is
grad_x = grad_y @ dequant(W), the product QLoRA needs to train adapters on a quantized base.

Which implementation served each call is recorded where it runs: the reference paths below and every kernel
launcher call `served(name)` (the launchers right after launching), and `record_dispatch()` collects those names
while it is active. Tests use it to prove that a kernel ran, so that a silent fall-back to the reference fails them;
outside a `record_dispatch()` block it costs one check of an empty list.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from .formats import get_format
from .formats.base import FORMAT_DEFAULT, reference_linear

if TYPE_CHECKING:
    from .formats import QuantScheme, WeightFormat
    from .formats.activations import ActivationRecord
    from .formats.records import WeightRecord
    from .modules import LowBitLinear

KERNELS_ENV = "QUANTIZER_PLUGIN_KERNELS"
BACKENDS = ("torch", "cpu", "triton")
# The backend each device type takes by default, and the package that registers its kernels (imported on first need).
DEFAULT_BACKENDS = {"cpu": "cpu", "cuda": "triton"}
_KERNEL_PACKAGES = {"cpu": "quantizer_plugin.cpu", "triton": "quantizer_plugin.kernels"}

# (family, activations mode, backend) -> fn(x, weight, bias, compute_dtype, activations) -> y
#   y = x @ dequant(W).T + bias (in the mode's arithmetic), in x's dtype
ForwardKernel = Callable[
    [torch.Tensor, "WeightRecord", "torch.Tensor | None", torch.dtype, "ActivationRecord | None"], torch.Tensor
]
# (family, backend) -> fn(grad_y, weight, compute_dtype) -> grad_x    grad_x = grad_y @ dequant(W), in grad_y's dtype
BackwardKernel = Callable[[torch.Tensor, "WeightRecord", torch.dtype], torch.Tensor]
# (family, backend) -> fn(fmt, weight, scheme) -> the stored tensors, equal to fmt.quantize's (used at load)
Quantizer = Callable[["WeightFormat", torch.Tensor, "QuantScheme"], dict]
_FORWARD: dict[tuple[str, str | None, str], ForwardKernel] = {}
# backend -> fn(x, weight, bias) -> y = F.linear(x, weight, bias): the forward of a layer a quantized model keeps in
# 16-bit (modules.KeptLinear), for inference
_KEPT: dict[str, Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]] = {}
_BACKWARD: dict[tuple[str, str], BackwardKernel] = {}
_QUANTIZE: dict[tuple[str, str], Quantizer] = {}
_PREPARATIONS: dict[str, Callable[[], object]] = {}  # backend -> its first-use work (see prepare)
_loaded_packages: set[str] = set()
_RECORDS: list[list[str]] = []  # one list per active record_dispatch() block


@contextmanager
def record_dispatch() -> Iterator[list[str]]:
    """Collect, in call order, the name of each implementation that serves a quantized matmul inside the block.

    Names are "<backend>.<implementation>", e.g. "torch.reference_forward" or "triton.codebook4bit.decode".
    """
    record: list[str] = []
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)


def served(name: str) -> None:
    """Note that implementation `name` is serving the current call (see record_dispatch)."""
    for record in _RECORDS:
        record.append(name)


def register_kernel(family: str, backend: str, *, activations: str | None = None, backward: bool = False,
                    quantize: bool = False):  # fmt: skip
    """Decorator registering, for every format of weight family `family` on `backend`: a forward kernel for the
    activations mode `activations` (None: 16-bit activations); with backward=True, the input gradient; with
    quantize=True, a quantizer that must give the same stored tensors as the format's own quantize."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def register(fn):
        if quantize:
            _QUANTIZE[(family, backend)] = fn
        elif backward:
            _BACKWARD[(family, backend)] = fn
        else:
            _FORWARD[(family, activations, backend)] = fn
        return fn

    return register


def register_kept_kernel(backend: str):
    """Decorator registering `fn(x, weight, bias) -> y` as the inference forward of kept 16-bit layers
    (modules.KeptLinear) on `backend`: F.linear's function, to within the order of float32 sums."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def register(fn):
        _KEPT[backend] = fn
        return fn

    return register


def register_preparation(backend: str, preparation: Callable[[], object]) -> None:
    """Register the first-use work of a backend's kernels (e.g. building native code), run by `prepare`."""
    _PREPARATIONS[backend] = preparation


def prepare(format_name: str, device: torch.device | str) -> None:
    """Do now the first-use work of the backend that `format_name`'s layers on `device` take: import its kernels and
    run its registered preparation. Called where layers are created or loaded, so that torch.compile's trace of the
    first forward does not meet that work: an import or a build cannot be traced, and each would break the graph
    (fullgraph=True would fail)."""
    device = torch.device(device)
    if device.type not in DEFAULT_BACKENDS:  # meta (offloaded to disk) and other devices run no kernel of ours
        return
    preparation = _PREPARATIONS.get(select_backend(format_name, device))
    if preparation is not None:
        preparation()


def load_kernels(backend: str) -> None:
    """Import `backend`'s kernel package, which registers its kernels (done on first need: the Triton kernels
    import triton, which a CPU-only user may not want loaded). A registration made after it stands."""
    if backend in _KERNEL_PACKAGES and backend not in _loaded_packages:
        _loaded_packages.add(backend)
        try:
            importlib.import_module(_KERNEL_PACKAGES[backend])
        except ImportError:
            pass


def _kernels_interpreted() -> bool:
    # Triton decides at kernel definition (import) time whether kernels compile for a GPU or run interpreted.
    kernels = sys.modules.get("quantizer_plugin.kernels")
    return bool(getattr(kernels, "INTERPRETED", False))


def forced_backend() -> str | None:
    """The backend named by QUANTIZER_PLUGIN_KERNELS, or None when it is unset."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"{KERNELS_ENV}={value!r} is not a backend; expected one of {BACKENDS}")
    return value


def select_backend(format_name: str, device: torch.device, activations: str | None = FORMAT_DEFAULT) -> str:
    """The backend that layers of format `format_name` (in activations mode `activations`, by default the format's
    own) on `device` take."""
    fmt = get_format(format_name)
    mode = fmt.default_activations if activations == FORMAT_DEFAULT else activations
    return _backend_for(fmt.family, mode, device, format_name)


def _backend_for(family: str, mode: str | None, device: torch.device, format_name: str) -> str:
    forced = forced_backend()
    default = DEFAULT_BACKENDS.get(device.type)
    load_kernels(forced or default)
    if forced is not None:
        if (family, mode, forced) not in _FORWARD:
            raise RuntimeError(
                f"{KERNELS_ENV}={forced} but no {forced} kernel is available for format {format_name!r}"
                + (f" with activations={mode!r}" if mode is not None else "")
            )
        if forced == "triton" and device.type != "cuda" and not _kernels_interpreted():
            raise RuntimeError(
                f"{KERNELS_ENV}=triton on a {device.type} tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before quantizer_plugin.kernels is first imported"
            )
        if forced == "cpu" and device.type != "cpu":
            raise RuntimeError(f"{KERNELS_ENV}=cpu on a {device.type} tensor: the cpu backend runs on CPU tensors only")
        return forced
    if default is not None and (family, mode, default) in _FORWARD:
        return default
    return "torch"


def quantize(fmt: WeightFormat, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """`weight`'s stored tensors in `fmt`, by the quantizer of the backend its device takes, where one is registered
    (the same tensors, faster: loading runs this on every weight), or the format's own quantize."""
    backend = select_backend(fmt.name, weight.device, scheme.activations)
    quantizer = _QUANTIZE.get((fmt.family, backend), reference_quantize)
    return quantizer(fmt, weight, scheme)


def reference_quantize(fmt: WeightFormat, weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """The format's own plain-torch quantize (also what a backend's quantizer falls back to)."""
    served("torch.quantize")
    return fmt.quantize(weight, scheme)


def reference_forward(
    x: torch.Tensor,
    weight: WeightRecord,
    bias: torch.Tensor | None,
    compute_dtype: torch.dtype,
    activations: ActivationRecord | None = None,
) -> torch.Tensor:
    """The family's (or the activations mode's) plain-torch forward; also what a kernel falls back to for shapes it
    cannot take."""
    served("torch.reference_forward")
    return reference_linear(x, weight, bias, compute_dtype, activations)


def reference_backward(grad_y: torch.Tensor, weight: WeightRecord, compute_dtype: torch.dtype) -> torch.Tensor:
    """grad_x = grad_y @ dequant(W) in plain torch."""
    served("torch.reference_backward")
    return (grad_y.to(compute_dtype) @ weight.dequantize(compute_dtype)).to(grad_y.dtype)


def _register_references() -> None:
    from .formats.records import weight_families

    for family in weight_families():
        _FORWARD[(family, None, "torch")] = reference_forward
        _BACKWARD[(family, "torch")] = reference_backward
    # Each activations mode's reference takes the families it is defined for (LLM.int8: row-scaled 8-bit weights;
    # q8_0: 4-bit codebooks and integer codes).
    _FORWARD[("rowscaled8", "int8", "torch")] = reference_forward
    _FORWARD[("codebook4bit", "q8_0", "torch")] = reference_forward
    _FORWARD[("affine", "q8_0", "torch")] = reference_forward
    # static activations (W8A8): int8 on row-scaled int8 weights, e4m3 on fp8 weights
    _FORWARD[("rowscaled8", "int8_static", "torch")] = reference_forward
    _FORWARD[("float8", "fp8_static", "torch")] = reference_forward


_register_references()


class _FrozenWeightLinear(torch.autograd.Function):
    """y = x @ dequant(W).T + b with W frozen; gradients flow to x (and to b when it is trainable)."""

    @staticmethod
    def forward(ctx, x, bias, weight, compute_dtype, activations, backend):
        ctx.weight, ctx.compute_dtype, ctx.backend = weight, compute_dtype, backend
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _FORWARD[(weight.family, None if activations is None else activations.mode, backend)](
            x, weight, bias, compute_dtype, activations
        )

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            kernel = _BACKWARD.get((ctx.weight.family, ctx.backend), reference_backward)
            grad_x = kernel(grad_y, ctx.weight, ctx.compute_dtype).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(dim=0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None, None


_LAYERS_OWN = object()  # lowbit_linear's activations: the layer's own mode


def lowbit_linear(x: torch.Tensor, layer: LowBitLinear, activations=_LAYERS_OWN) -> torch.Tensor:
    """The quantized layer's forward: picks the backend and applies the frozen-weight autograd rule. `activations`
    None runs it with 16-bit activations whatever its mode (calibration observes a layer so)."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
    weight = layer.weight_record()
    if activations is _LAYERS_OWN:
        activations = layer.activation_record()
    mode = None if activations is None else activations.mode
    backend = _backend_for(weight.family, mode, x.device, layer.fmt.name)
    if torch.is_grad_enabled() and (x.requires_grad or (layer.bias is not None and layer.bias.requires_grad)):
        return _FrozenWeightLinear.apply(x, layer.bias, weight, layer.compute_dtype, activations, backend)
    return _FORWARD[(weight.family, mode, backend)](x, weight, layer.bias, layer.compute_dtype, activations)


def kept_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kept 16-bit layer's forward (modules.KeptLinear): F.linear when a gradient is needed or no kernel of the
    backend that x's device takes is registered, that kernel otherwise."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return torch.nn.functional.linear(x, weight, bias)
    backend = forced_backend() or DEFAULT_BACKENDS.get(x.device.type)
    if backend is None:
        return torch.nn.functional.linear(x, weight, bias)
    load_kernels(backend)
    kernel = _KEPT.get(backend)
    return torch.nn.functional.linear(x, weight, bias) if kernel is None else kernel(x, weight, bias)
