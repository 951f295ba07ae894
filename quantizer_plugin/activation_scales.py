"""Calibration of static activations (activations="int8_static" or "fp8_static", W8A8), and SmoothQuant.

A layer with static activations rounds its input on one grid whose step, input_scale, is recorded from calibration
data: the absmax of everything the layer was handed, over the grid's largest value (127 for int8, 448 for e4m3), as
optimum-quanto's Calibration records its activation ranges (it smooths them with a momentum; we keep the largest).
Two ways in:
- `calibrate(model, dataset, tokenizer=...)` runs calibration data (calibration.py's, as GPTQ's) through the model;
  from_pretrained does it after loading when the LowBitConfig has a `dataset`;
- `with Calibration(model): model(...)`: the user's own forwards.
While calibrating, each static layer records the absmax of its input per input channel and multiplies with 16-bit
activations. Nothing is written until the block ends without an error; then every layer that was called gets its
scales at once. A layer that was never called keeps its NaN input_scale, and its first forward raises naming it.

SmoothQuant (Xiao et al. 2023; smoothing_alpha, default 0.5): activations of LLMs have a few channels far larger than
the rest, which one int8 grid per tensor cannot hold together. Each input channel j of the layers that read one
tensor is divided by s_j = max|x_j|^alpha / max|w_j|^(1 - alpha) (max|w_j| over the column j of those layers'
weights) and their weights' columns multiplied by it, which leaves the product unchanged and evens out the channels.
The division is folded into the norm that produced the tensor (its weight, and bias if any, divided by s) when the
layers' input is that norm's output and dividing its parameters divides its output (checked on a recorded input:
Gemma's 1 + weight is not); otherwise the layer multiplies its input by 1 / s first (its input_smoothing). The
weights are scaled and rounded again from their dequantized values (a second rounding, far below the activations'),
and since the smoothed input's channel absmax is the recorded one over s, input_scale follows without another pass.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn

from . import ops
from .calibration import calibration_ids
from .formats.activations import INPUT_SCALE, INPUT_SMOOTHING, STATIC_MODES
from .modules import LowBitLinear

SMOOTHING_MIN = 1e-5  # the smallest smoothing factor (SmoothQuant's clamp), so that no channel is scaled to nothing


def static_layers(model: nn.Module) -> dict[str, LowBitLinear]:
    """The model's layers with static activations, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowBitLinear) and m.static_activations}


class Calibration:
    """`with Calibration(model): model(...)`: records the input ranges of every static layer the forwards reach and,
    on leaving, sets their input_scale (and SmoothQuant's factors where the layers' scheme asks for them). Leaving
    with an error, or having seen no data, writes nothing."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = static_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no layer with static activations to calibrate "
                             "(LowBitConfig(activations='int8_static' or 'fp8_static'))")  # fmt: skip
        for name, layer in self.layers.items():
            if any(t.is_meta for t in layer.quantized_tensors().values()):
                raise ValueError(f"{name}: calibration writes the input scales of layers in memory, and this one is "
                                 "offloaded: calibrate on a model that fits, save it, then load it with the device_map")  # fmt: skip
        self.channel_absmax: dict[str, torch.Tensor] = {}
        self._norm_outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # norm -> its last (input, output)
        self.norm_of: dict[str, tuple[str, torch.Tensor]] = {}  # layer -> (the norm whose output it reads, its input)
        self._hooks = []

    def __enter__(self) -> Calibration:
        for name, layer in self.layers.items():
            layer.module_name = layer.module_name or name
            layer.observer = partial(self._observe, name)
        if any(layer.scheme.smoothing_alpha is not None for layer in self.layers.values()):
            for name, module in self.model.named_modules():
                if _is_norm(module):
                    self._hooks.append(module.register_forward_hook(partial(self._norm_output, name)))
        return self

    def _norm_output(self, name: str, module: nn.Module, args, output) -> None:
        if isinstance(output, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            self._norm_outputs[name] = (args[0].detach(), output)  # the last call's only: memory stays one per norm

    def _observe(self, name: str, x: torch.Tensor) -> None:
        # what the grid rounds: the input times the layer's smoothing so far (a model calibrated again keeps its own)
        smoothing = getattr(self.layers[name], INPUT_SMOOTHING, None)
        smoothed = x.detach().reshape(-1, x.shape[-1]).float() * (1 if smoothing is None else smoothing.float())
        absmax = smoothed.abs().amax(dim=0)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError(f"{name}: the calibration activations hold NaN or infinite values; no input_scale is set")
        previous = self.channel_absmax.get(name)
        self.channel_absmax[name] = absmax if previous is None else torch.maximum(previous, absmax)
        if name not in self.norm_of:
            for norm, (norm_input, output) in self._norm_outputs.items():
                if output is x:  # the very tensor the norm returned
                    self.norm_of[name] = (norm, norm_input[:8].clone())  # a few of its rows: the fold's check
                    break

    def __exit__(self, exc_type, exc, traceback) -> bool:
        for layer in self.layers.values():
            layer.observer = None
        for hook in self._hooks:
            hook.remove()
        self._norm_outputs.clear()
        if exc_type is not None:
            return False
        if not self.channel_absmax:
            raise ValueError("calibration saw no data: no layer with static activations was called inside the block")
        self.apply()
        return False

    def apply(self) -> None:
        """Set the scales of every layer that was called (SmoothQuant first where its scheme asks for it)."""
        factors = smoothing_factors(self)  # layer -> s (input channels), before anything is written
        folded = fold_into_norms(self.model, self, factors)
        with torch.no_grad():
            for name, absmax in self.channel_absmax.items():
                layer = self.layers[name]
                if name in factors:
                    absmax = absmax / factors[name]
                    _scale_weight_columns(layer, factors[name])
                    if name not in folded:  # on top of the factors an earlier calibration left
                        smoothing = getattr(layer, INPUT_SMOOTHING)
                        smoothing.copy_(smoothing * input_factors(factors[name]))
                largest = STATIC_MODES[layer.scheme.activations].largest
                step = absmax.max().clamp(min=torch.finfo(torch.float32).tiny) / largest
                getattr(layer, INPUT_SCALE).copy_(step.reshape(1))


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer with a per-channel weight (LayerNorm, RMSNorm and the models' own norms)."""
    weight = getattr(module, "weight", None)
    return ("norm" in type(module).__name__.lower() and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and not isinstance(module, LowBitLinear))  # fmt: skip


def smoothing_factors(calibration: Calibration) -> dict[str, torch.Tensor]:
    """SmoothQuant's s for every calibrated layer whose scheme has a smoothing_alpha: one vector per group of layers
    reading one tensor (those that read the same norm's output share theirs; any other layer has its own)."""
    groups: dict[str, list[str]] = {}
    for name, layer in calibration.layers.items():
        if name in calibration.channel_absmax and layer.scheme.smoothing_alpha is not None:
            norm = calibration.norm_of.get(name)
            groups.setdefault(f"norm:{norm[0]}" if norm else f"layer:{name}", []).append(name)
    factors = {}
    for members in groups.values():
        alpha = calibration.layers[members[0]].scheme.smoothing_alpha
        x_absmax = torch.stack([calibration.channel_absmax[name] for name in members]).amax(dim=0)
        w_absmax = torch.stack([calibration.layers[name].dequantize_weight(torch.float32).abs().amax(dim=0)
                                for name in members]).amax(dim=0)  # fmt: skip
        s = x_absmax.pow(alpha) / w_absmax.clamp(min=SMOOTHING_MIN).pow(1 - alpha)
        # a channel never active (or with no weight) keeps its scale: there is nothing to move
        s = torch.where((x_absmax > 0) & (w_absmax > 0), s.clamp(min=SMOOTHING_MIN), torch.ones_like(s))
        for name in members:
            factors[name] = s
    return factors


def input_factors(s: torch.Tensor) -> torch.Tensor:
    """What the layers' inputs are multiplied by, as their weights' columns are multiplied by s: 1 / s."""
    return torch.reciprocal(s)


def fold_into_norms(model: nn.Module, calibration: Calibration, factors: dict[str, torch.Tensor]) -> set[str]:
    """Divide each norm's parameters by the factors of the layers reading its output, where that divides its output
    (checked on its recorded input); returns the layers whose smoothing is now in their norm."""
    folded: set[str] = set()
    by_norm: dict[str, list[str]] = {}
    for name in factors:
        if name in calibration.norm_of:
            by_norm.setdefault(calibration.norm_of[name][0], []).append(name)
    with torch.no_grad():
        for norm_name, members in by_norm.items():
            norm, s = model.get_submodule(norm_name), factors[members[0]]
            sample = calibration.norm_of[members[0]][1]
            before = norm(sample).float()
            saved = {key: p.detach().clone() for key, p in norm.named_parameters(recurse=False)}
            for key, p in norm.named_parameters(recurse=False):
                if p.dim() == 1 and p.shape[0] == s.shape[0]:
                    p.copy_((p.float() * input_factors(s)).to(p.dtype))
            after = norm(sample).float() * s
            if torch.allclose(after, before, rtol=2e-2, atol=1e-3 * float(before.abs().max())):
                folded.update(members)
            else:  # not a scale of its output (Gemma's 1 + weight): the layers smooth their input themselves
                for key, p in norm.named_parameters(recurse=False):
                    p.copy_(saved[key])
    return folded


def _scale_weight_columns(layer: LowBitLinear, s: torch.Tensor) -> None:
    """W' = W * s per input column, rounded again in the layer's format."""
    weight = layer.dequantize_weight(torch.float32) * s[None, :]
    stored = ops.quantize(layer.fmt, weight, layer.scheme)
    for name, tensor in stored.items():
        getattr(layer, name).copy_(tensor)


def calibrate(model: nn.Module, dataset, tokenizer=None, samples: int = 128, length: int = 512,
              batch: int = 8) -> dict:  # fmt: skip
    """Record the static layers' input scales (and SmoothQuant's factors, as their schemes ask) from `dataset`, given
    as LowBitConfig.dataset is (texts with a tokenizer, token ids, or "pydoc"): `samples` sequences of `length`
    tokens, `batch` at a time. Returns a summary (layers, samples, length)."""
    if dataset is None:
        raise ValueError("calibrate: dataset is None; calibration needs data (texts, token ids or 'pydoc')")
    ids = calibration_ids(dataset, tokenizer, samples, length)
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    # no key-value cache to fill (decoders), where the forward takes the argument (encoders do not)
    settings = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad(), Calibration(model) as calibration:
        for first in range(0, len(ids), batch):
            model(input_ids=ids[first : first + batch].to(device), **settings)
    return {"layers": len(calibration.channel_absmax), "samples": len(ids), "length": ids.shape[1]}
