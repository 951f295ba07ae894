"""A LowBitConfig passed to from_pretrained for a checkpoint we already quantized (quantizer_plugin/prequantized_config.py).

transformers alone keeps the checkpoint's config and only warns, so asking for int8 on an nf4 checkpoint loaded nf4.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from quantizer_plugin import LowBitConfig

from helpers import load_quantized, lowbit_modules


@pytest.fixture(scope="module")
def saved_nf4(llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("prequantized") / "nf4"
    load_quantized(llama_dir, weights="nf4", block_size=64).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "asked, field, saved_value, asked_value",
    [
        (LowBitConfig(weights="int8"), "weights", "'nf4'", "'int8'"),
        (LowBitConfig(weights="int4"), "weights", "'nf4'", "'int4'"),
        (LowBitConfig(weights="nf4", block_size=128), "block_size", "64", "128"),
        (LowBitConfig(weights="nf4", double_quant=False), "double_quant", "True", "False"),
    ],
    ids=["int8", "int4", "block", "double-quant"],
)
def test_a_config_that_disagrees_with_the_checkpoint_is_an_error_naming_both(saved_nf4, asked, field, saved_value, asked_value):
    with pytest.raises(ValueError) as error:
        AutoModelForCausalLM.from_pretrained(saved_nf4, quantization_config=asked)
    message = str(error.value)
    assert f"{field}: the checkpoint has {saved_value}, the config passed has {asked_value}" in message


def test_a_matching_config_loads_the_checkpoint_without_a_warning(saved_nf4, token_ids):
    plain = AutoModelForCausalLM.from_pretrained(saved_nf4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' "the quantization_config from the model will be used"
        again = AutoModelForCausalLM.from_pretrained(saved_nf4, quantization_config=LowBitConfig(weights="nf4"))
    assert again.hf_quantizer.quantization_config == plain.hf_quantizer.quantization_config
    with torch.no_grad():
        assert torch.equal(again(token_ids).logits, plain(token_ids).logits)


def test_the_compute_dtype_passed_is_the_one_the_layers_run_in(saved_nf4, token_ids):
    model = AutoModelForCausalLM.from_pretrained(saved_nf4, quantization_config=LowBitConfig(compute_dtype="float32"))
    layers = lowbit_modules(model)
    assert layers and {layer.compute_dtype for layer in layers.values()} == {torch.float32}
    assert {layer.fmt.name for layer in layers.values()} == {"nf4"}
    assert model.hf_quantizer.quantization_config.compute_dtype == torch.float32


def test_another_quantizers_config_still_gets_transformers_error(saved_nf4):
    with pytest.raises(ValueError, match="quantized with LowBitConfig but you are passing a BitsAndBytesConfig"):
        AutoModelForCausalLM.from_pretrained(saved_nf4, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
