"""bitsandbytes checkpoints to ours and back, losslessly, without bitsandbytes: the first importer and exporter.

Our NF4/FP4 codes, block absmax and double quantization are bitsandbytes' own, and our int8 is LLM.int8's, so a
conversion only renames and reshapes stored tensors (the packed codes are copied byte for byte):

| bitsandbytes (transformers' save of Linear4bit / Linear8bitLt) | ours (LowBitLinear) |
|---|---|
| `weight` uint8 (n / 2, 1) | `weight` |
| `weight.absmax` float32 (blocks,), no double quant | `weight_absmax` |
| `weight.absmax` uint8 (blocks,), double quant | `weight_absmax_code` (blocks, 1) |
| `weight.nested_absmax` float32 (blocks / 256,) | `weight_absmax_scale` |
| `nested_offset` in `weight.quant_state.bitsandbytes__<nf4/fp4>` (JSON) | `weight_absmax_offset` (1,) |
| `weight.quant_map`, `weight.nested_quant_map` (the codebooks) | checked equal to ours, not stored |
| 8-bit: `weight` int8 (out, in), `SCB` float32 (out,) | `weight`, `weight_scale` |

Every check reads headers only, except the small tensors it compares (codebooks, quant states); the layers' data is
read when the output shard that holds it is written.
"""

from __future__ import annotations

import json

import torch

from ..config import LowBitConfig
from ..formats import QuantScheme, get_format
from ..formats.dynamic8bit import DOUBLE_QUANT_BLOCK, dynamic_code
from .source import ConversionError, ConversionPlan

QUANT_STATE = ".weight.quant_state.bitsandbytes__"


def _quant_state(plan: ConversionPlan, module: str) -> dict:
    key = next(k for k in plan.keys() if k.startswith(module + QUANT_STATE))
    try:
        return json.loads(bytes(plan.source.load(key).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        where = plan.header(key).file
        raise ConversionError(f"{where}: tensor {key!r} is not a readable quant state ({error})") from error


def import_checkpoint(plan: ConversionPlan, quantization: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """Rewrite `plan` (a bitsandbytes checkpoint) into our layout; returns our quantization config."""
    folder = plan.source.folder
    eight_bit = bool(quantization.get("load_in_8bit") or quantization.get("_load_in_8bit"))
    four_bit = bool(quantization.get("load_in_4bit") or quantization.get("_load_in_4bit"))
    if eight_bit == four_bit:
        raise ConversionError(f"{folder / 'config.json'}: the bitsandbytes config loads neither 4-bit nor 8-bit")
    marker = QUANT_STATE if four_bit else ".SCB"
    quantized = sorted({key.split(marker)[0] for key in plan.keys() if marker in key})
    if not quantized:
        what = "4-bit quant state" if four_bit else "SCB"
        raise ConversionError(f"{folder}: no {what} tensors: nothing is quantized")
    settings = set()
    for module in quantized:
        if module not in shapes:
            raise ConversionError(
                f"{plan.file_of(module)}: {module!r} is quantized but the model has no such linear layer"
            )
        if four_bit:
            settings.add(_module_from_4bit(plan, module, shapes[module]))
        else:
            _module_from_8bit(plan, module, shapes[module])
    if len(settings) > 1:
        raise ConversionError(
            f"{folder}: its layers mix 4-bit settings {sorted(settings)}; one config cannot hold them"
        )
    skip = [name for name in shapes if name not in quantized]
    if four_bit:
        weights, block_size, double_quant = settings.pop()
        compute = quantization.get("bnb_4bit_compute_dtype") or "float32"
        config = LowBitConfig(weights=weights, block_size=block_size, double_quant=double_quant,
                              compute_dtype=compute, skip_modules=skip)  # fmt: skip
    else:
        config = LowBitConfig(weights="int8", outlier_threshold=quantization.get("llm_int8_threshold", 6.0),
                              compute_dtype="float16", skip_modules=skip)  # fmt: skip
    return config.to_dict()


def _module_from_4bit(plan: ConversionPlan, module: str, shape: tuple[int, int]) -> tuple[str, int, bool]:
    state = _quant_state(plan, module)
    kind, block = state.get("quant_type"), state.get("blocksize")
    if kind not in ("nf4", "fp4"):
        raise ConversionError(f"{plan.file_of(module)}: {module!r} has quant_type {kind!r}, not nf4 or fp4")
    if tuple(state.get("shape", ())) != shape:
        raise ConversionError(f"{plan.file_of(module)}: {module!r} has shape {state.get('shape')} in its quant state, "
                              f"the model's config makes it {list(shape)}")  # fmt: skip
    out_features, in_features = shape
    double_quant = "nested_offset" in state
    scheme = QuantScheme(kind, block, double_quant)
    specs = get_format(kind).tensor_specs(out_features, in_features, scheme)
    plan.checked(module, "weight", "packed weight", specs["weight"].shape, torch.uint8)
    plan.checked(module, "weight.quant_map", "codebook", (16,), torch.float32)
    if not torch.equal(plan.source.load(f"{module}.weight.quant_map"), get_format(kind).code()):
        raise ConversionError(f"{plan.file_of(module)}: {module}.weight.quant_map is not the {kind} codebook")
    shard = plan.source.shard_of(f"{module}.weight")
    blocks = specs["weight_absmax_code" if double_quant else "weight_absmax"].shape[0]
    if double_quant:
        if state.get("nested_blocksize") != DOUBLE_QUANT_BLOCK:
            raise ConversionError(f"{plan.file_of(module)}: {module} nested_blocksize {state.get('nested_blocksize')}")
        plan.checked(module, "weight.absmax", "absmax code", (blocks,), torch.uint8)
        plan.checked(module, "weight.nested_absmax", "nested absmax", specs["weight_absmax_scale"].shape, torch.float32)
        plan.checked(module, "weight.nested_quant_map", "dynamic code", (256,), torch.float32)
        if not torch.equal(plan.source.load(f"{module}.weight.nested_quant_map"), dynamic_code()):
            raise ConversionError(f"{plan.file_of(module)}: {module}.weight.nested_quant_map is not the dynamic code")
        offset_shape = specs["weight_absmax_offset"].shape
        offset = torch.tensor([state["nested_offset"]], dtype=torch.float32).reshape(offset_shape)
        new = {"weight_absmax_code": (f"{module}.weight.absmax", specs["weight_absmax_code"].shape),
               "weight_absmax_scale": (f"{module}.weight.nested_absmax", None)}  # fmt: skip
    else:
        plan.checked(module, "weight.absmax", "absmax", (blocks,), torch.float32)
        offset, new = None, {"weight_absmax": (f"{module}.weight.absmax", None)}
    for key in [k for k in plan.keys() if k.startswith(module + ".weight.")]:
        plan.drop(key)
    for name, (source_key, reshaped) in new.items():
        plan.put_source(f"{module}.{name}", shard, source_key, reshaped)
    if offset is not None:
        plan.put(f"{module}.weight_absmax_offset", shard, lambda: offset)
    return kind, block, double_quant


def _module_from_8bit(plan: ConversionPlan, module: str, shape: tuple[int, int]) -> None:
    plan.checked(module, "weight", "int8 weight", shape, torch.int8)
    plan.checked(module, "SCB", "row scale", (shape[0],), torch.float32)
    shard = plan.source.shard_of(f"{module}.weight")
    for key in (f"{module}.SCB", f"{module}.weight_format"):
        plan.drop(key)
    plan.put_source(f"{module}.weight_scale", shard, f"{module}.SCB")


def export_checkpoint(plan: ConversionPlan, quantization: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """Rewrite `plan` (our checkpoint) into bitsandbytes' layout; returns bitsandbytes' quantization config."""
    folder = plan.source.folder
    config = LowBitConfig.from_dict(quantization)
    if config.weights not in ("nf4", "fp4", "int8") or (config.weights == "int8" and config.activations is None):
        what = "weight-only int8" if config.weights == "int8" else config.weights
        raise ConversionError(f"{folder / 'config.json'}: format {what!r} has no bitsandbytes equivalent "
                              "(bitsandbytes stores nf4, fp4 and LLM.int8)")  # fmt: skip
    marker = ".weight_absmax" if config.weights != "int8" else ".weight_scale"
    quantized = sorted({key.split(marker)[0] for key in plan.keys() if marker in key})
    for module in quantized:
        if config.weights == "int8":
            _module_to_8bit(plan, module)
        else:
            _module_to_4bit(plan, module, shapes[module], config)
    # the layers left unquantized, by name: bitsandbytes' own default skip list may differ from ours
    bnb = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": [name for name in shapes if name not in quantized]}
    if config.weights == "int8":
        bnb.update(load_in_8bit=True, load_in_4bit=False, llm_int8_threshold=config.outlier_threshold)
    else:
        bnb.update(load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type=config.weights,
                   bnb_4bit_use_double_quant=config.double_quant, bnb_4bit_quant_storage="uint8",
                   bnb_4bit_compute_dtype=str(config.compute_dtype).removeprefix("torch."))  # fmt: skip
    return bnb


def _module_to_4bit(plan: ConversionPlan, module: str, shape: tuple[int, int], config: LowBitConfig) -> None:
    fmt, scheme = get_format(config.weights), config.scheme
    shard = plan.source.shard_of(f"{module}.weight")
    # "dtype" is what bitsandbytes dequantizes to: float32 holds our weights exactly (it casts to its compute dtype)
    state = {"quant_type": config.weights, "blocksize": scheme.block_size, "dtype": "float32", "shape": list(shape)}
    plan.put_source(f"{module}.weight", shard, f"{module}.weight", (-1, 1))
    small = {"weight.quant_map": fmt.code().clone()}  # one tensor per entry
    if scheme.double_quant:
        offset = plan.source.load(f"{module}.weight_absmax_offset")
        state.update(nested_blocksize=DOUBLE_QUANT_BLOCK, nested_dtype="float32",
                     nested_offset=float(offset.reshape(-1)[0]))  # fmt: skip
        plan.put_source(f"{module}.weight.absmax", shard, f"{module}.weight_absmax_code", (-1,))
        plan.put_source(f"{module}.weight.nested_absmax", shard, f"{module}.weight_absmax_scale")
        small["weight.nested_quant_map"] = dynamic_code().clone()
        dropped = ("weight_absmax_offset", "weight_absmax_code", "weight_absmax_scale")
    else:
        plan.put_source(f"{module}.weight.absmax", shard, f"{module}.weight_absmax")
        dropped = ("weight_absmax",)
    for name in dropped:
        plan.drop(f"{module}.{name}")
    small[f"weight.quant_state.bitsandbytes__{config.weights}"] = torch.tensor(list(json.dumps(state).encode()),
                                                                              dtype=torch.uint8)  # fmt: skip
    for name, tensor in small.items():
        plan.put(f"{module}.{name}", shard, lambda tensor=tensor: tensor)


def _module_to_8bit(plan: ConversionPlan, module: str) -> None:
    shard = plan.source.shard_of(f"{module}.weight")
    plan.drop(f"{module}.weight_scale")
    plan.put_source(f"{module}.SCB", shard, f"{module}.weight_scale")
    # "row": the only layout bitsandbytes saves
    plan.put(f"{module}.weight_format", shard, lambda: torch.tensor(0, dtype=torch.uint8))
