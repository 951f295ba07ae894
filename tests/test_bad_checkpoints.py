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
