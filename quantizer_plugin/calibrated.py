"""Calibrated quantization while loading (method="gptq"): the decoder blocks quantized one at a time on the
activations of calibration data, never holding the whole 16-bit model.

While transformers loads the checkpoint, each 16-bit weight of a linear layer inside the decoder blocks goes to a
stash on disk (WeightStash) and the layer gets placeholder tensors. Once everything is loaded, `quantize_blocks`
runs the calibration sequences up to the first block, then for each block in turn:
1. its 16-bit weights come back from the stash into ordinary linear layers;
2. stage by stage (the layers handed one input tensor, in forward order: _stages), the calibration activations run
   through it up to the stage (_stage_hessian), the stage's layers share the Hessian of their input, and GPTQ
   quantizes them into the format's stored tensors, which are put back before the next stage's pass;
3. the activations run through the quantized block, which gives the next block its inputs (the errors of the
   blocks already quantized are what the next one is fitted against).
Peak memory: the quantized model, one block in 16 bits, the stash's one weight at a time, and the calibration
activations (two copies: a block's inputs and its outputs).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import inspect
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import gptq
from .modules import LowBitLinear


def _libc_malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system. A stage's passes and GPTQ's temporaries free hundreds of MB in
    pieces of a few MB, which glibc keeps (its dynamic mmap threshold puts such pieces on the heap, and only the top
    of a heap is returned): without this, on the 374M Llama of benchmarks/load_memory.py, the process held 150 to
    500 MB more after each block than the quantized model, and the peak grew block after block."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class WeightStash:
    """16-bit weights kept on disk, one file each, until their block is quantized."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="lowbit-gptq-")
        self._files: dict[str, Path] = {}

    def put(self, name: str, weight: torch.Tensor) -> None:
        path = Path(self._folder.name) / f"{len(self._files)}.safetensors"
        save_file({"weight": weight.detach().contiguous().cpu()}, str(path))
        self._files[name] = path

    def take(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise KeyError(f"method='gptq': no 16-bit weight was loaded for {name}")
        path = self._files.pop(name)
        weight = load_file(str(path))["weight"]
        path.unlink()
        return weight

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def close(self) -> None:
        self._folder.cleanup()


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder blocks: the ModuleList holding the most quantized linear layers (`model.layers` of a
    Llama, `transformer.h` of a GPT-2)."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(isinstance(m, LowBitLinear) for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ValueError(f"method='gptq': {type(model).__name__} has no list of blocks holding quantized layers")
    return best


class _StopForward(Exception):
    """Raised by a hook once it has what it came for: the rest of the forward is not run."""


def _first_block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor, batch: int) -> list[tuple]:
    """Each calibration batch's (hidden states, keyword arguments) as the first block receives them."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), dict(kwargs)))
        raise _StopForward

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    # no key-value cache to fill (decoders), where the forward takes the argument (encoders do not)
    settings = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        for first in range(0, len(ids), batch):
            try:
                model(input_ids=ids[first : first + batch].to(device), **settings)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run(block: nn.Module, inputs: list[tuple]) -> list[tuple]:
    outputs = []
    for hidden, kwargs in inputs:
        out = block(hidden, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outputs


def _plain_linear(layer: LowBitLinear, weight: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
    return linear


def _stages(block: nn.Module, plain: dict[str, nn.Linear], first_input: tuple) -> list[list[str]]:
    """The block's layers in the order its forward calls them, those handed the very same input tensor together
    (a Llama block: q/k/v, o, gate/up, down): the stages GPTQ quantizes one after the other. The inputs are held
    until the pass ends, so that no tensor's memory is reused by a later one."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [layer.register_forward_pre_hook(lambda module, args, name=name: calls.append((name, args[0])))
             for name, layer in plain.items()]  # fmt: skip
    try:
        _run(block, [first_input])
    finally:
        for hook in hooks:
            hook.remove()
    stages: list[list[str]] = []
    previous = None
    for name, tensor in calls:
        if any(name in stage for stage in stages):
            continue
        if stages and tensor is previous:
            stages[-1].append(name)
        else:
            stages.append([name])
        previous = tensor
    return stages + [[name] for name in plain if not any(name in stage for stage in stages)]  # never called


def _stage_hessian(block: nn.Module, first_layer: nn.Linear, inputs: list[tuple]) -> gptq.Hessian:
    """The Hessian of the input `first_layer` receives over the calibration batches. Each batch's forward through
    the block stops there: what comes after the stage does not change its input (the q/k/v stage needs only the
    block's first norm, so the block's passes cost about two and a half forwards, not five)."""
    hessian = gptq.Hessian(first_layer.in_features)

    def collect(module, args):
        hessian.add(args[0])
        raise _StopForward

    hook = first_layer.register_forward_pre_hook(collect)
    try:
        for hidden, kwargs in inputs:
            try:
                block(hidden, **kwargs)
            except _StopForward:
                pass
    finally:
        hook.remove()
    return hessian


def quantize_blocks(model: nn.Module, stash: WeightStash, ids: torch.Tensor, settings: gptq.GPTQSettings,
                    batch: int = 8, progress=None) -> dict:  # fmt: skip
    """Quantize every stashed layer of the decoder blocks by GPTQ (see the module docstring); returns a summary
    (blocks, layers, seconds) for the checkpoint's metadata. `progress(done, total)` is called before the first block
    and after each.

    Within a block the layers go in stages, in the order the forward reaches them (_stages): each stage's Hessians
    come from a pass in which the stages before it are already quantized, so that a layer is fitted to the inputs
    the quantized layers before it give it (GPTQModel's "true sequential")."""
    started = time.perf_counter()
    _, blocks = decoder_blocks(model)
    names = {module: name for name, module in model.named_modules()}
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.no_grad():
        inputs = _first_block_inputs(model, blocks[0], ids, batch)
        if progress is not None:
            progress(0, len(blocks))
        quantized = 0
        for index, block in enumerate(blocks):
            layers = {name: m for name, m in block.named_modules() if isinstance(m, LowBitLinear) and f"{names[m]}.weight" in stash}
            plain = {name: _plain_linear(layer, stash.take(f"{names[layer]}.weight"), dtype) for name, layer in layers.items()}
            for name, layer in plain.items():
                block.set_submodule(name, layer)
            for stage in _stages(block, plain, inputs[0]):
                # the stage's layers read one input tensor: one Hessian serves them all
                hessian = _stage_hessian(block, plain[stage[0]], inputs)
                release_freed_memory()
                for name in stage:
                    layer = layers[name]
                    try:
                        stored = gptq.quantize(layer.fmt, plain[name].weight, hessian.matrix, layer.scheme, settings)
                    except ValueError as error:
                        raise ValueError(f"{names[layer]}: {error}") from None
                    layer.load_quantized(stored)
                    release_freed_memory()
                    block.set_submodule(name, layer)
                    del plain[name]
            quantized += len(layers)
            inputs = _run(block, inputs)
            release_freed_memory()
            if progress is not None:
                progress(index + 1, len(blocks))
    return {"blocks": len(blocks), "layers": quantized, "seconds": round(time.perf_counter() - started, 1)}
