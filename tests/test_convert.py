"""Converting bitsandbytes checkpoints to ours (in a process where bitsandbytes cannot be imported) and ours back to
bitsandbytes: lossless against bitsandbytes' own dequantization, sharding and other files kept, bad input refused
with the file and tensor named and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

from quantizer_plugin import ConversionError, LowBitConfig, LowBitLinear, convert_checkpoint
from quantizer_plugin.cli import main as cli_main

from conftest import tiny_llama_config
from test_push_to_hub import hub  # noqa: F401  (the stand-in Hub fixture)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402

BNB_CONFIGS = {
    "nf4-dq": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16),
    "int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=5.0),
}  # fmt: skip


def plain_llama(path: Path) -> Path:
    """The small random Llama the conversion tests quantize with bitsandbytes, saved at `path`."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=320)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return plain_llama(tmp_path_factory.mktemp("plain") / "llama")


def bnb_checkpoint(source: Path, folder: Path, kind: str, shard: str | None = None) -> tuple[Path, dict]:
    """A bitsandbytes checkpoint of `source`, and bitsandbytes' own dequantized weight of each layer (read before
    any forward: bitsandbytes repacks its CPU 4-bit weights at the first one)."""
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=BNB_CONFIGS[kind], device_map="cpu")
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weights[name] = bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            weights[name] = (module.weight.data.float(), module.weight.SCB.float())
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (folder / "notes").mkdir()
    (folder / "notes" / "README.txt").write_text("kept")
    return folder, weights


def convert_without_bitsandbytes(src: Path, out: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None  # any import of it now fails
        try:
            import bitsandbytes
        except ImportError:
            pass
        else:
            raise SystemExit("bitsandbytes could still be imported")
        from quantizer_plugin import convert_checkpoint
        convert_checkpoint({str(src)!r}, {str(out)!r})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def lowbit_layers(model) -> dict[str, LowBitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowBitLinear)}


@pytest.mark.parametrize("kind", BNB_CONFIGS)
def test_bnb_checkpoint_converts_losslessly_without_bitsandbytes(source, tmp_path, kind):
    src, reference = bnb_checkpoint(source, tmp_path / "bnb", kind, shard="100KB" if kind == "nf4-dq" else None)
    out = tmp_path / "ours"
    result = convert_without_bitsandbytes(src, out)
    assert result.returncode == 0, result.stderr[-3000:]

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "lowbit" and config["skip_modules"] == ["lm_head"]
    expected = {"nf4-dq": ("nf4", True, "bfloat16"), "fp4": ("fp4", False, "float16"), "int8": ("int8", None, "float16")}
    weights, double_quant, compute = expected[kind]
    assert (config["weights"], config["double_quant"], config["compute_dtype"]) == (weights, double_quant, compute)
    if kind == "int8":
        assert config["outlier_threshold"] == 5.0 and config["activations"] == "int8"
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}'
    assert (out / "notes" / "README.txt").read_text() == "kept"
    source_shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == source_shards
    assert (out / "model.safetensors.index.json").is_file() == (len(source_shards) > 1)
    if kind == "nf4-dq":
        assert len(source_shards) > 1  # the sharded case is exercised

    model = AutoModelForCausalLM.from_pretrained(out)  # no quantization_config: the checkpoint's own
    layers = lowbit_layers(model)
    assert set(layers) == set(reference)
    for name, layer in layers.items():
        ours = layer.dequantize_weight(torch.float32)
        if kind == "int8":
            values, scale = reference[name]
            assert torch.equal(layer.weight.float(), values)  # the int8 values themselves, byte for byte
            assert torch.allclose(ours, values * scale[:, None] / 127, rtol=2**-22, atol=0), name  # one rounding apart
        else:
            assert torch.equal(ours, reference[name]), name
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging folder left


@pytest.mark.parametrize("kind", ["nf4-dq", "fp4", "int8"])
def test_our_checkpoint_exports_to_one_bitsandbytes_loads(source, tmp_path, kind):
    weights = {"nf4-dq": dict(weights="nf4"), "fp4": dict(weights="fp4", double_quant=False), "int8": dict(weights="int8")}
    ours = AutoModelForCausalLM.from_pretrained(source, quantization_config=LowBitConfig(**weights[kind]))
    ours.save_pretrained(tmp_path / "ours")
    layers = lowbit_layers(ours)
    expected = {name: layer.dequantize_weight(torch.float32) for name, layer in layers.items()}
    out = convert_checkpoint(tmp_path / "ours", tmp_path / "bnb", to="bitsandbytes")
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    seen = 0
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            assert torch.equal(bnb_functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float(),
                               expected[name]), name  # fmt: skip
            seen += 1
        elif isinstance(module, bnb.nn.Linear8bitLt):  # the same int8 values and row scales, exactly
            assert torch.equal(module.weight.data, layers[name].weight) and torch.equal(module.weight.SCB, layers[name].weight_scale)
            seen += 1
    assert seen == len(expected)


@pytest.mark.parametrize("weights", [dict(weights="int4"), dict(weights="int8", activations=None)])
def test_formats_bitsandbytes_lacks_are_refused_by_name(source, tmp_path, weights):
    AutoModelForCausalLM.from_pretrained(source, quantization_config=LowBitConfig(**weights)).save_pretrained(tmp_path / "ours")
    name = "int4" if weights["weights"] == "int4" else "weight-only int8"
    with pytest.raises(ConversionError, match=f"format '{name}' has no bitsandbytes equivalent"):
        convert_checkpoint(tmp_path / "ours", tmp_path / "bnb", to="bitsandbytes")
    assert not (tmp_path / "bnb").exists()


@pytest.fixture(scope="module")
def nf4_source(source, tmp_path_factory) -> Path:
    return bnb_checkpoint(source, tmp_path_factory.mktemp("bnb") / "nf4", "nf4-dq")[0]


def broken_copy(nf4_source: Path, folder: Path, edit) -> Path:
    import shutil

    shutil.copytree(nf4_source, folder)
    edit(folder)
    return folder


def drop_tensor(key: str):
    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        del tensors[key]
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return edit


def replace_tensor(key: str, change):
    def edit(folder: Path) -> None:
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[key] = change(tensors[key]).clone()
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return edit


def edit_config(change):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    return edit


def truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


Q = "model.layers.0.self_attn.q_proj.weight"
BAD_INPUTS = {
    "not quantized": (edit_config(lambda c: c.pop("quantization_config")), r"config.json: the model is not quantized"),
    "unknown method": (edit_config(lambda c: c["quantization_config"].update(quant_method="gptq")),
                       r"config.json: quant_method is 'gptq'"),
    "missing quant state": (drop_tensor(f"{Q}.nested_absmax"),
                            rf"model.safetensors: nested absmax tensor '{Q}.nested_absmax' is missing"),
    "missing codebook": (drop_tensor(f"{Q}.quant_map"), rf"model.safetensors: codebook tensor '{Q}.quant_map' is missing"),
    "truncated file": (truncate, r"model.safetensors: not a readable safetensors file"),
    "truncated quant state": (replace_tensor(f"{Q}.quant_state.bitsandbytes__nf4", lambda t: t[:40]),
                              rf"model.safetensors: tensor '{Q}.quant_state.bitsandbytes__nf4' is not a readable quant state"),
    "shape against the config": (edit_config(lambda c: c.update(intermediate_size=256)),
                                 r"model.safetensors: 'model.layers.0.mlp.down_proj' has shape \[128, 320\] in its quant state, the model's config makes it \[128, 256\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_names_the_file_and_tensor_and_writes_nothing(nf4_source, tmp_path, case):
    edit, message = BAD_INPUTS[case]
    src = broken_copy(nf4_source, tmp_path / "src", edit)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no staging folder


def test_cli_convert_shows_progress_and_refuses_bad_input(nf4_source, tmp_path, capsys):
    assert cli_main(["convert", str(nf4_source), str(tmp_path / "ours")]) == 0
    printed = capsys.readouterr().out
    assert "[1/2] reading 1 safetensors file(s)" in printed and "[2/2] writing" in printed and "done:" in printed
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path / "ours").model.layers[0].mlp.up_proj, LowBitLinear)
    with pytest.raises(SystemExit, match="config.json: quant_method is 'lowbit'"):
        cli_main(["convert", str(tmp_path / "ours"), str(tmp_path / "again")])  # ours is not a bitsandbytes checkpoint
    assert not (tmp_path / "again").exists()


def test_a_hub_repo_id_is_fetched_and_converted(hub, nf4_source, tmp_path):
    """Through huggingface_hub's snapshot_download, against the tests' stand-in Hub server (tests/fake_hub.py)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tester/tiny-bnb-nf4")
    api.upload_folder(repo_id="tester/tiny-bnb-nf4", folder_path=str(nf4_source))
    out = convert_checkpoint("tester/tiny-bnb-nf4", tmp_path / "ours")
    expected = {name: m for name, m in lowbit_layers(AutoModelForCausalLM.from_pretrained(convert_checkpoint(
        nf4_source, tmp_path / "local"))).items()}  # fmt: skip
    converted = lowbit_layers(AutoModelForCausalLM.from_pretrained(out))
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[n].dequantize_weight(torch.float32), expected[n].dequantize_weight(torch.float32))
               for n in expected)  # fmt: skip


def test_transformers_refuses_our_config_for_a_bnb_checkpoint(nf4_source):
    """Why the README offers conversion rather than direct loading: transformers keeps the checkpoint's own config."""
    with pytest.raises(ValueError, match="quantized with BitsAndBytesConfig but you are passing a LowBitConfig"):
        AutoModelForCausalLM.from_pretrained(nf4_source, quantization_config=LowBitConfig())


def test_a_sharded_checkpoint_is_converted_one_shard_in_memory_at_a_time(source, tmp_path, monkeypatch):
    """Converting a model larger than memory must not read it whole: each tensor's data is read only while the output
    shard that holds it is being made (the checks read headers, and small tensors: quant states, codebooks)."""
    from quantizer_plugin.checkpoints import source as checkpoint_source

    src, _ = bnb_checkpoint(source, tmp_path / "bnb", "nf4-dq", shard="100KB")
    events = []
    load, save = checkpoint_source.SourceCheckpoint.load, checkpoint_source.save_file

    def recording_load(self, key):
        tensor = load(self, key)
        events.append(("read", self.shard_of(key), key, tensor.numel() * tensor.element_size()))
        return tensor

    def recording_save(content, path, metadata=None):
        events.append(("wrote", Path(path).name, None, 0))
        return save(content, path, metadata=metadata)

    monkeypatch.setattr(checkpoint_source.SourceCheckpoint, "load", recording_load)
    monkeypatch.setattr(checkpoint_source, "save_file", recording_save)
    convert_checkpoint(src, tmp_path / "ours")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) >= 3 and [shard for kind, shard, _, _ in events if kind == "wrote"] == shards
    written = []
    for kind, shard, key, size in events:
        if kind == "wrote":
            written.append(shard)
        elif size > 4096:  # a layer's data (not a quant state or codebook): read for the shard being written only
            assert shard == shards[len(written)], (key, shard, written)
    assert {key for kind, _, key, _ in events if kind == "read" and key.endswith(".weight")}  # the data was read
