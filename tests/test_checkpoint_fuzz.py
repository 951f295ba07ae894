"""Malformed checkpoints, generated: each is an error naming the file (never a crash in native code, a hang or a
partial output). The oracle is the safetensors format's own rules (https://github.com/huggingface/safetensors,
"Format"), written out here from the specification, not taken from the safetensors library."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM

from quantizer_plugin import ConversionError, convert_checkpoint

from conftest import tiny_llama_config
from test_convert import bnb_checkpoint, plain_llama

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}  # fmt: skip


def valid_by_the_format(data: bytes) -> bool:
    """The safetensors rules: an 8-byte little-endian header size N, N bytes of a UTF-8 JSON object, then the byte
    buffer. Each tensor: a known dtype, a shape of non-negative integers, data_offsets [begin, end] into the buffer
    with end - begin = its element count times the dtype's size; the tensors cover the buffer exactly, without holes
    or overlaps."""
    if len(data) < 8:
        return False
    (size,) = struct.unpack("<Q", data[:8])
    if 8 + size > len(data):
        return False
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    if not isinstance(header, dict) or not data[8:9] == b"{":
        return False
    buffer = len(data) - 8 - size
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                return False
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            return False
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return False
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            return False
        begin, end = offsets
        if not 0 <= begin <= end <= buffer or end - begin != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
            return False
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            return False
        position = end
    return position == buffer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small one-file bitsandbytes 8-bit checkpoint, written by bitsandbytes."""
    source = tmp_path_factory.mktemp("plain") / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=96, num_hidden_layers=1)).save_pretrained(source)
    folder, _ = bnb_checkpoint(source, tmp_path_factory.mktemp("bnb") / "model", "int8")
    assert valid_by_the_format((folder / "model.safetensors").read_bytes())
    return folder


def split(data: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: dict, buffer: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + buffer


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("header size"), st.one_of(st.integers(0, 2**64 - 1), st.integers(0, 4096))),
    st.tuples(st.just("header bytes"), st.binary(max_size=64)),
    st.tuples(st.just("offsets"), st.integers(0, 200), st.lists(st.integers(-4, 80_000), min_size=0, max_size=3)),
    st.tuples(st.just("dtype"), st.integers(0, 200), st.sampled_from([*DTYPE_BYTES, "XX", "", "f32"])),
    st.tuples(st.just("shape"), st.integers(0, 200), st.lists(st.integers(-3, 300), max_size=3)),
    st.tuples(st.just("swap offsets"), st.integers(0, 200), st.integers(0, 200)),
)


def mutate(data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "truncate":
        return data[: int(len(data) * mutation[1])]
    if kind == "header size":
        return struct.pack("<Q", mutation[1]) + data[8:]
    if kind == "header bytes":
        return struct.pack("<Q", len(mutation[1])) + mutation[1] + split(data)[1]
    header, buffer = split(data)
    names = sorted(name for name in header if name != "__metadata__")
    entry = header[names[mutation[1] % len(names)]]
    if kind == "offsets":
        entry["data_offsets"] = mutation[2]
    elif kind == "dtype":
        entry["dtype"] = mutation[2]
    elif kind == "shape":
        entry["shape"] = mutation[2]
    else:  # two tensors' data overlapping or out of order
        other = header[names[mutation[2] % len(names)]]
        entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    return join(header, buffer)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=MUTATIONS)
def test_a_malformed_shard_is_an_error_naming_the_file_and_writes_nothing(checkpoint, tmp_path_factory, mutation):
    work = tmp_path_factory.mktemp("fuzz")
    src = work / "model"
    shutil.copytree(checkpoint, src)
    data = mutate((src / "model.safetensors").read_bytes(), mutation)
    (src / "model.safetensors").write_bytes(data)
    out_parent = work / "out"
    out_parent.mkdir()
    try:
        convert_checkpoint(src, out_parent / "converted")
    except ConversionError as error:
        assert "model.safetensors" in str(error), (mutation, str(error))
        assert list(out_parent.iterdir()) == [], mutation  # no partial output, no staging folder left
        return
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # It converted: then the file kept the format's rules (a changed shape or dtype of the same size may pass).
    assert valid_by_the_format(data), mutation


def index_cases(folder: Path) -> dict:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    held = {shard: [key for key, where in weight_map.items() if where == shard] for shard in set(weight_map.values())}
    first = next(shard for shard in sorted(held) if len(held[shard]) > 1)  # still read when one tensor moves away
    second = next(shard for shard in sorted(held) if shard != first)
    moved = held[first][0]
    return {
        "not JSON": ("{ weight_map: ", "not a JSON object"),
        "a list": ("[1, 2]", "not a JSON object"),
        "no weight_map": (json.dumps({"metadata": {}}), "weight_map must be"),
        "missing shard": (json.dumps({"weight_map": {**weight_map, moved: "model-09-of-09.safetensors"}}),
                          "is not a file"),
        "wrong shard": (json.dumps({"weight_map": {**weight_map, moved: second}}), f"puts tensor {moved!r} in {second}"),
        "unlisted tensor": (json.dumps({"weight_map": {k: v for k, v in weight_map.items() if k != moved}}),
                            "does not list tensor"),
        "a shard name that is not a string": (json.dumps({"weight_map": {**weight_map, moved: 7}}), "is not a file name"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    source = plain_llama(tmp_path_factory.mktemp("plain") / "llama")
    folder, _ = bnb_checkpoint(source, tmp_path_factory.mktemp("bnb") / "model", "int8", shard="100KB")
    return folder


@pytest.mark.parametrize("case", ["not JSON", "a list", "no weight_map", "missing shard", "wrong shard",
                                  "unlisted tensor", "a shard name that is not a string"])  # fmt: skip
def test_a_malformed_index_is_an_error_naming_it(sharded, tmp_path, case):
    src = tmp_path / "model"
    shutil.copytree(sharded, src)
    text, expected = index_cases(src)[case]
    (src / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ConversionError, match="model.safetensors.index.json") as error:
        convert_checkpoint(src, tmp_path / "out")
    assert expected in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_same_tensor_in_two_shards_is_an_error_naming_both(sharded, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "model"
    shutil.copytree(sharded, src)
    first, second = sorted(src.glob("model-*.safetensors"))[:2]
    a, b = load_file(first), load_file(second)
    duplicate = sorted(a)[0]
    save_file({**b, duplicate: a[duplicate]}, second, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=f"tensor '{duplicate}' is also in {first.name}"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
