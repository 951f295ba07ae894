"""Convert bitsandbytes checkpoints to ours and back, losslessly, without bitsandbytes.

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

The folder's other tensors and files are copied as they are; config.json gets the other library's quantization
config; a sharded checkpoint stays sharded (each layer's tensors go to the shard that held its weight). Output is
written next to OUT and moved into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint_paths import CheckpointPathError, check_tree, inside, plain_file_name, relative_path
from .config import LowBitConfig
from .formats import QuantScheme, get_format
from .formats.dynamic8bit import DOUBLE_QUANT_BLOCK, dynamic_code
from .staging import staged_folder

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TARGETS = ("lowbit", "bitsandbytes")
QUANT_STATE = ".weight.quant_state.bitsandbytes__"
BNB_4BIT_SUFFIXES = (".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor at fault."""


def _copied_entries(folder: Path, shards: list[str]) -> list[Path]:
    """The folder's other files and folders, which the output keeps; each checked to stay inside the folder."""
    entries = []
    for entry in sorted(folder.iterdir()):
        if entry.name in (*shards, INDEX, "config.json") or entry.name.startswith("."):
            continue
        try:
            check_tree(folder, entry, f"{folder}: entry {entry.name!r}")
        except CheckpointPathError as error:
            raise ConversionError(str(error)) from None
        entries.append(entry)
    return entries


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, to: str = "lowbit",
                       progress: Callable[[str], None] | None = None) -> Path:  # fmt: skip
    """Convert the bitsandbytes checkpoint `src` (a folder, or a Hub repo id fetched with snapshot_download) into
    ours at `out` (to="lowbit"), or our checkpoint into one bitsandbytes loads (to="bitsandbytes"). Returns `out`."""
    if to not in TARGETS:
        raise ValueError(f"convert_checkpoint: to must be one of {TARGETS}, got {to!r}")
    folder = _local_folder(src)
    out = Path(out)
    report = progress or (lambda message: None)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: not a model folder (no config.json)")
    model_config = json.loads(config_path.read_text())
    quantization = model_config.get("quantization_config")
    if quantization is None:
        raise ConversionError(f"{config_path}: the model is not quantized (no quantization_config)")
    method = quantization.get("quant_method")
    expected = "bitsandbytes" if to == "lowbit" else "lowbit"
    if method != expected:
        raise ConversionError(f"{config_path}: quant_method is {method!r}; converting to {to!r} reads {expected!r} checkpoints")
    shards = _shards(folder)
    copied = _copied_entries(folder, shards)  # every name checked before anything is read or written
    report(f"reading {len(shards)} safetensors file(s) from {folder}")
    tensors, home = _read(folder, shards)
    convert = _from_bnb if to == "lowbit" else _to_bnb
    converted, new_quantization = convert(tensors, home, quantization, model_config, folder)
    with staged_folder(out) as staging:
        report(f"writing {out}")
        _write(staging, converted, home, shards)
        for entry in copied:
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, staging / entry.name)
        model_config["quantization_config"] = new_quantization
        (staging / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    return out


# --- reading and writing --------------------------------------------------------------------------------------------


def _local_folder(src) -> Path:
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or str(src).count("/") != 1:
        raise ConversionError(f"{src}: neither a model folder nor a Hub repo id (owner/name)")
    from huggingface_hub import HfApi, snapshot_download

    for name in HfApi().list_repo_files(str(src)):  # checked before any file is downloaded
        try:
            relative_path(name, f"Hub repository {src}: file list")
        except CheckpointPathError as error:
            raise ConversionError(str(error)) from None
    return Path(snapshot_download(str(src)))


def _shards(folder: Path) -> list[str]:
    """The checkpoint's safetensors files, each a plain file name whose file lies inside `folder`."""
    if (folder / INDEX).is_file():
        weight_map = _weight_map(folder / INDEX)
        for key, shard in weight_map.items():
            _checked_shard(folder, shard, f"{folder / INDEX}: weight_map[{key!r}]")
        return sorted(set(weight_map.values()))
    if (folder / SINGLE).is_file():
        return [_checked_shard(folder, SINGLE, str(folder / SINGLE))]
    raise ConversionError(f"{folder}: no safetensors checkpoint ({SINGLE} or {INDEX}); .bin checkpoints are not read")


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{index}: not a JSON object with a weight_map ({error})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
    return weight_map


def _checked_shard(folder: Path, shard, source: str) -> str:
    try:
        inside(folder, folder / plain_file_name(shard, source), source)
    except CheckpointPathError as error:
        raise ConversionError(str(error)) from None
    if not (folder / shard).is_file():
        raise ConversionError(f"{source}: shard {shard!r} is not a file in {folder}")
    return shard


def _read(folder: Path, shards: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the checkpoint, and the shard each came from."""
    tensors, home = {}, {}
    for shard in shards:
        try:
            with safe_open(str(folder / shard), "pt") as f:
                for key in f.keys():
                    if key in home:
                        raise ConversionError(f"{folder / shard}: tensor {key!r} is also in {home[key]}")
                    tensors[key] = f.get_tensor(key)
                    home[key] = shard
        except ConversionError:
            raise
        except Exception as error:  # a truncated or corrupt file
            raise ConversionError(f"{folder / shard}: cannot be read as safetensors ({error})") from error
    if (folder / INDEX).is_file():
        _check_index(folder / INDEX, home)
    return tensors, home


def _check_index(index: Path, home: dict[str, str]) -> None:
    """The index names each tensor's shard as the shards themselves hold them."""
    weight_map = _weight_map(index)
    for key, shard in weight_map.items():
        if home.get(key) != shard:
            where = f"it is in {home[key]}" if key in home else "no shard holds it"
            raise ConversionError(f"{index}: weight_map puts tensor {key!r} in {shard}, but {where}")
    unlisted = sorted(set(home) - set(weight_map))
    if unlisted:
        raise ConversionError(f"{index}: weight_map does not list tensor {unlisted[0]!r} of {home[unlisted[0]]}")


def _write(staging: Path, tensors: dict[str, torch.Tensor], home: dict[str, str], shards: list[str]) -> None:
    by_shard: dict[str, dict[str, torch.Tensor]] = {shard: {} for shard in shards}
    for key, tensor in tensors.items():
        by_shard[home[key]][key] = tensor.contiguous()
    for shard, content in by_shard.items():
        save_file(content, str(staging / shard), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {key: home[key] for key in sorted(tensors)}}
        (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")


# --- bitsandbytes -> ours -------------------------------------------------------------------------------------------


def _linear_shapes(model_config: dict, folder: Path) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each of the model's nn.Linear modules (and GPT-2's Conv1D), by name: the model
    built from its config on the meta device (no weights read, no quantization applied)."""
    import transformers
    from transformers import AutoConfig, AutoModel
    from transformers.pytorch_utils import Conv1D

    plain = {key: value for key, value in model_config.items() if key != "quantization_config"}
    config = AutoConfig.for_model(**plain)
    classes = [getattr(transformers, name, None) for name in model_config.get("architectures") or []]
    cls = next((c for c in classes if c is not None), AutoModel)
    with torch.device("meta"):
        model = cls._from_config(config)
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes[name] = (m.out_features, m.in_features)
        elif isinstance(m, Conv1D):
            shapes[name] = (m.nf, m.weight.shape[0])
    return shapes


def _quant_state(tensors: dict, home: dict, module: str) -> dict:
    key = next(k for k in tensors if k.startswith(module + QUANT_STATE))
    try:
        return json.loads(bytes(tensors[key].tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ConversionError(f"{home[key]}: tensor {key!r} is not a readable quant state ({error})") from error


def _file_of(home: dict, module: str) -> str:
    """The file that holds a layer's tensors (its weight's, or else any of them)."""
    return home.get(f"{module}.weight") or next(shard for key, shard in home.items() if key.startswith(module + "."))


def _tensor(tensors: dict, home: dict, module: str, name: str, what: str, shape: tuple | None = None,
            dtype=None) -> torch.Tensor:  # fmt: skip
    key = f"{module}.{name}"
    if key not in tensors:
        raise ConversionError(f"{_file_of(home, module)}: {what} tensor {key!r} is missing")
    tensor = tensors[key]
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ConversionError(f"{home[key]}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise ConversionError(f"{home[key]}: tensor {key!r} is {tensor.dtype}, expected {dtype}")
    return tensor


def _from_bnb(tensors: dict, home: dict, quantization: dict, model_config: dict, folder: Path):
    eight_bit = bool(quantization.get("load_in_8bit") or quantization.get("_load_in_8bit"))
    four_bit = bool(quantization.get("load_in_4bit") or quantization.get("_load_in_4bit"))
    if eight_bit == four_bit:
        raise ConversionError(f"{folder / 'config.json'}: the bitsandbytes config loads neither 4-bit nor 8-bit")
    marker = QUANT_STATE if four_bit else ".SCB"
    quantized = sorted({key.split(marker)[0] for key in tensors if marker in key})
    if not quantized:
        raise ConversionError(f"{folder}: no {'4-bit quant state' if four_bit else 'SCB'} tensors: nothing is quantized")
    shapes = _linear_shapes(model_config, folder)
    converted = dict(tensors)
    settings = set()
    for module in quantized:
        if module not in shapes:
            raise ConversionError(f"{_file_of(home, module)}: {module!r} is quantized but the model has no such linear layer")
        if four_bit:
            settings.add(_module_from_bnb_4bit(converted, home, module, shapes[module]))
        else:
            _module_from_bnb_8bit(converted, home, module, shapes[module])
    if len(settings) > 1:
        raise ConversionError(f"{folder}: its layers mix 4-bit settings {sorted(settings)}; one config cannot hold them")
    skip = [name for name in shapes if name not in quantized]
    if four_bit:
        weights, block_size, double_quant = settings.pop()
        compute = quantization.get("bnb_4bit_compute_dtype") or "float32"
        config = LowBitConfig(weights=weights, block_size=block_size, double_quant=double_quant,
                              compute_dtype=compute, skip_modules=skip)  # fmt: skip
    else:
        config = LowBitConfig(weights="int8", outlier_threshold=quantization.get("llm_int8_threshold", 6.0),
                              compute_dtype="float16", skip_modules=skip)  # fmt: skip
    return converted, config.to_dict()


def _module_from_bnb_4bit(tensors: dict, home: dict, module: str, shape: tuple[int, int]) -> tuple[str, int, bool]:
    state = _quant_state(tensors, home, module)
    kind, block = state.get("quant_type"), state.get("blocksize")
    if kind not in ("nf4", "fp4"):
        raise ConversionError(f"{_file_of(home, module)}: {module!r} has quant_type {kind!r}, not nf4 or fp4")
    if tuple(state.get("shape", ())) != shape:
        raise ConversionError(f"{_file_of(home, module)}: {module!r} has shape {state.get('shape')} in its quant state, "
                              f"the model's config makes it {list(shape)}")  # fmt: skip
    out_features, in_features = shape
    double_quant = "nested_offset" in state
    scheme = QuantScheme(kind, block, double_quant)
    specs = get_format(kind).tensor_specs(out_features, in_features, scheme)
    weight = _tensor(tensors, home, module, "weight", "packed weight", specs["weight"].shape, torch.uint8)
    codebook = _tensor(tensors, home, module, "weight.quant_map", "codebook", (16,), torch.float32)
    if not torch.equal(codebook, get_format(kind).code()):
        raise ConversionError(f"{_file_of(home, module)}: {module}.weight.quant_map is not the {kind} codebook")
    new = {"weight": weight}
    blocks = specs["weight_absmax_code" if double_quant else "weight_absmax"].shape[0]
    if double_quant:
        if state.get("nested_blocksize") != DOUBLE_QUANT_BLOCK:
            raise ConversionError(f"{_file_of(home, module)}: {module} nested_blocksize {state.get('nested_blocksize')}")
        codes = _tensor(tensors, home, module, "weight.absmax", "absmax code", (blocks,), torch.uint8)
        scale = _tensor(tensors, home, module, "weight.nested_absmax", "nested absmax",
                        specs["weight_absmax_scale"].shape, torch.float32)  # fmt: skip
        code8 = _tensor(tensors, home, module, "weight.nested_quant_map", "dynamic code", (256,), torch.float32)
        if not torch.equal(code8, dynamic_code()):
            raise ConversionError(f"{_file_of(home, module)}: {module}.weight.nested_quant_map is not the dynamic code")
        new["weight_absmax_code"] = codes.reshape(specs["weight_absmax_code"].shape)
        new["weight_absmax_scale"] = scale
        new["weight_absmax_offset"] = torch.tensor([state["nested_offset"]], dtype=torch.float32).reshape(
            specs["weight_absmax_offset"].shape)  # fmt: skip
    else:
        new["weight_absmax"] = _tensor(tensors, home, module, "weight.absmax", "absmax", (blocks,), torch.float32)
    shard = home[f"{module}.weight"]
    for key in [k for k in tensors if k.startswith(module + ".weight.")]:
        del tensors[key]
        del home[key]
    for name, tensor in new.items():
        tensors[f"{module}.{name}"] = tensor
        home[f"{module}.{name}"] = shard
    return kind, block, double_quant


def _module_from_bnb_8bit(tensors: dict, home: dict, module: str, shape: tuple[int, int]) -> None:
    weight = _tensor(tensors, home, module, "weight", "int8 weight", shape, torch.int8)
    scale = _tensor(tensors, home, module, "SCB", "row scale", (weight.shape[0],), torch.float32)
    shard = home[f"{module}.weight"]
    for key in (f"{module}.SCB", f"{module}.weight_format"):
        tensors.pop(key, None)
        home.pop(key, None)
    tensors[f"{module}.weight"], tensors[f"{module}.weight_scale"] = weight, scale
    home[f"{module}.weight_scale"] = shard


# --- ours -> bitsandbytes -------------------------------------------------------------------------------------------


def _to_bnb(tensors: dict, home: dict, quantization: dict, model_config: dict, folder: Path):
    config = LowBitConfig.from_dict(quantization)
    if config.weights not in ("nf4", "fp4", "int8") or (config.weights == "int8" and config.activations is None):
        what = "weight-only int8" if config.weights == "int8" else config.weights
        raise ConversionError(f"{folder / 'config.json'}: format {what!r} has no bitsandbytes equivalent "
                              "(bitsandbytes stores nf4, fp4 and LLM.int8)")  # fmt: skip
    marker = ".weight_absmax" if config.weights != "int8" else ".weight_scale"
    quantized = sorted({key.split(marker)[0] for key in tensors if marker in key})
    shapes = _linear_shapes(model_config, folder)
    converted = dict(tensors)
    for module in quantized:
        if config.weights == "int8":
            _module_to_bnb_8bit(converted, home, module)
        else:
            _module_to_bnb_4bit(converted, home, module, shapes[module], config)
    # the layers left unquantized, by name: bitsandbytes' own default skip list may differ from ours
    bnb = {"quant_method": "bitsandbytes", "llm_int8_skip_modules": [name for name in shapes if name not in quantized]}
    if config.weights == "int8":
        bnb.update(load_in_8bit=True, load_in_4bit=False, llm_int8_threshold=config.outlier_threshold)
    else:
        bnb.update(load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type=config.weights,
                   bnb_4bit_use_double_quant=config.double_quant, bnb_4bit_quant_storage="uint8",
                   bnb_4bit_compute_dtype=str(config.compute_dtype).removeprefix("torch."))  # fmt: skip
    return converted, bnb


def _module_to_bnb_4bit(tensors: dict, home: dict, module: str, shape: tuple[int, int], config: LowBitConfig) -> None:
    fmt, scheme = get_format(config.weights), config.scheme
    shard = home[f"{module}.weight"]
    weight = tensors[f"{module}.weight"]
    # "dtype" is what bitsandbytes dequantizes to: float32 holds our weights exactly (it casts to its compute dtype)
    state = {"quant_type": config.weights, "blocksize": scheme.block_size, "dtype": "float32", "shape": list(shape)}
    new = {"weight": weight.reshape(-1, 1), "weight.quant_map": fmt.code().clone()}  # one tensor per entry
    if scheme.double_quant:
        offset = tensors.pop(f"{module}.weight_absmax_offset")
        state.update(nested_blocksize=DOUBLE_QUANT_BLOCK, nested_dtype="float32", nested_offset=float(offset.reshape(-1)[0]))
        new["weight.absmax"] = tensors.pop(f"{module}.weight_absmax_code").reshape(-1)
        new["weight.nested_absmax"] = tensors.pop(f"{module}.weight_absmax_scale")
        new["weight.nested_quant_map"] = dynamic_code().clone()
        for key in ("weight_absmax_offset", "weight_absmax_code", "weight_absmax_scale"):
            home.pop(f"{module}.{key}", None)
    else:
        new["weight.absmax"] = tensors.pop(f"{module}.weight_absmax")
        home.pop(f"{module}.weight_absmax", None)
    new[f"weight.quant_state.bitsandbytes__{config.weights}"] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    for name, tensor in new.items():
        tensors[f"{module}.{name}"] = tensor
        home[f"{module}.{name}"] = shard


def _module_to_bnb_8bit(tensors: dict, home: dict, module: str) -> None:
    shard = home[f"{module}.weight"]
    tensors[f"{module}.SCB"] = tensors.pop(f"{module}.weight_scale")
    home.pop(f"{module}.weight_scale", None)
    tensors[f"{module}.weight_format"] = torch.tensor(0, dtype=torch.uint8)  # "row": the only layout it saves
    home[f"{module}.SCB"] = home[f"{module}.weight_format"] = shard
