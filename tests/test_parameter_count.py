"""Parameter counts of a quantized model are the number of weights, as for the same model unquantized."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitConfig

FORMATS = {"nf4": dict(weights="nf4"), "nf4-no-dq": dict(weights="nf4", double_quant=False),
           "fp4": dict(weights="fp4"), "int8": dict(weights="int8"), "fp8": dict(weights="fp8")}  # fmt: skip


@pytest.fixture(scope="module")
def plain(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir)


@pytest.mark.parametrize("fmt", FORMATS)
def test_num_parameters_counts_weights_not_packed_bytes(llama_dir, plain, fmt):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(**FORMATS[fmt]))
    # the tiny Llama's 2-layer skeleton: 2 x (4 attention + 3 MLP projections) + embeddings, head and norms
    expected = sum(p.numel() for p in plain.parameters())
    assert plain.num_parameters() == expected
    assert model.num_parameters() == expected
    assert model.num_parameters(exclude_embeddings=True) == plain.num_parameters(exclude_embeddings=True)
    assert model.num_parameters(only_trainable=True) == plain.num_parameters(only_trainable=True) - sum(
        p.numel() for name, p in plain.named_parameters() if "proj" in name
    )  # the stored tensors are frozen; every other parameter stays trainable
    assert copy.deepcopy(model).num_parameters() == expected
    assert model.dequantize().num_parameters() == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_peft_print_trainable_parameters_counts_weights(llama_dir, plain, fmt, capsys):
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    quantized = get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(**FORMATS[fmt])), lora
    )
    reference = get_peft_model(copy.deepcopy(plain), copy.deepcopy(lora))
    assert quantized.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    quantized.print_trainable_parameters()
    reference.print_trainable_parameters()
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second
    assert quantized.num_parameters() == reference.num_parameters()
