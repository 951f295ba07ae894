"""A pre-quantized checkpoint that does not match its config fails before loading, naming the module at fault."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from quantizer_plugin import CheckpointFormatError

from helpers import load_quantized, read_safetensors

MODULE = "model.layers.1.self_attn.k_proj"


@pytest.fixture(scope="module")
def saved_nf4(llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("nf4") / "model"
    load_quantized(llama_dir, weights="nf4").save_pretrained(path)
    return path


def tampered_copy(source, destination, edit):
    shutil.copytree(source, destination)
    tensors = read_safetensors(source)
    edit(tensors)
    (destination / "model.safetensors").unlink()
    save_file(tensors, str(destination / "model.safetensors"), metadata={"format": "pt"})
    return destination


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.pop(f"{MODULE}.weight_absmax_code"), "tensor 'weight_absmax_code' is missing"),
        (lambda t: t.pop(f"{MODULE}.weight"), "tensor 'weight' is missing"),
        (lambda t: t.update({f"{MODULE}.weight": t[f"{MODULE}.weight"][:-2]}), "tensor 'weight' has shape"),
        (lambda t: t.update({f"{MODULE}.weight_absmax_scale": t[f"{MODULE}.weight_absmax_scale"].half()}), "has dtype F16"),
        (lambda t: t.update({f"{MODULE}.weight": t[f"{MODULE}.weight"].to(torch.int8)}), "has dtype I8"),
    ],
    ids=["missing-statistic", "missing-packed", "wrong-shape", "wrong-dtype-statistic", "wrong-dtype-packed"],
)
def test_error_names_the_module(saved_nf4, tmp_path, edit, message):
    broken = tampered_copy(saved_nf4, tmp_path / "broken", edit)
    with pytest.raises(CheckpointFormatError, match=f"'{MODULE}'.*{message}"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_checkpoint_saved_with_other_settings_is_refused(saved_nf4, tmp_path):
    # config says no double quant, the tensors were written with it: the absmax is missing for every module
    broken = tmp_path / "mismatch"
    shutil.copytree(saved_nf4, broken)
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["double_quant"] = False
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="tensor 'weight_absmax' is missing"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_newer_format_version_is_refused_at_load(saved_nf4, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(saved_nf4, newer)
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version is 99, newer"):
        AutoModelForCausalLM.from_pretrained(newer)


def test_quantize_op_rejects_a_weight_of_the_wrong_shape(tmp_path):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from quantizer_plugin.loading import LowBitQuantize

    model = LlamaForCausalLM(tiny_llama_config())
    with torch.device("meta"):
        load_target = LlamaForCausalLM(tiny_llama_config())
    from quantizer_plugin.replace import replace_linear_modules
    from quantizer_plugin import LowBitConfig

    replace_linear_modules(load_target, LowBitConfig().scheme, torch.bfloat16, ["lm_head"])
    key = "model.layers.0.mlp.up_proj.weight"
    wrong = model.get_parameter(key).detach()[:, :-1]
    with pytest.raises(ValueError, match=f"{key}: checkpoint weight has shape"):
        LowBitQuantize(None).convert({key: [wrong]}, model=load_target)


def test_a_checkpoint_saved_from_the_model_with_a_head_loads_into_the_bare_model_and_back(llama_dir, tmp_path):
    """Keys are checked with and without the base model prefix (`model.`), as transformers loads them."""
    from transformers import AutoModel, LlamaForCausalLM, LlamaModel

    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with_head = load_quantized(llama_dir, weights="nf4")
    with_head.save_pretrained(tmp_path / "with-head")
    bare = AutoModel.from_pretrained(tmp_path / "with-head")  # "model.layers.0..." into "layers.0..."
    assert type(bare) is LlamaModel and type(bare.layers[0].mlp.up_proj).__name__ == "LowBitLinear"
    with torch.no_grad():
        expected = with_head.model(ids).last_hidden_state
        assert torch.equal(bare(ids).last_hidden_state, expected)
        bare.save_pretrained(tmp_path / "bare")
        headed = LlamaForCausalLM.from_pretrained(tmp_path / "bare")  # "layers.0..." into "model.layers.0..."
        assert torch.equal(headed.model(ids).last_hidden_state, expected)


def test_a_pickled_checkpoint_is_refused_naming_the_file(saved_nf4, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(saved_nf4 / "config.json", pickled / "config.json")
    torch.save(read_safetensors(saved_nf4), pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match="pytorch_model.bin: pre-quantized lowbit checkpoints are read from "
                                                    "safetensors files only"):  # fmt: skip
        AutoModelForCausalLM.from_pretrained(pickled)


def test_a_truncated_prequantized_file_is_an_error_naming_it(saved_nf4, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(saved_nf4, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointFormatError, match=f"{broken / 'model.safetensors'}: not a readable safetensors file"):
        AutoModelForCausalLM.from_pretrained(broken)
