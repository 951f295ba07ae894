"""LowBitConfig: validation, round trip through config.json, presets and the bitsandbytes mapping."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BitsAndBytesConfig
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

from quantizer_plugin import FORMAT_VERSION, LowBitConfig, LowBitHfQuantizer, preset_names


def test_import_registers_lowbit_with_transformers():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is LowBitConfig
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is LowBitHfQuantizer


def test_defaults():
    config = LowBitConfig()
    assert (config.weights, config.double_quant, config.block_size, config.compute_dtype) == ("nf4", True, 64, torch.bfloat16)
    int8 = LowBitConfig(weights="int8")
    assert (int8.outlier_threshold, int8.double_quant, int8.block_size) == (6.0, None, None)
    assert int8.activations == "int8" and int8.scheme.activations == "int8"  # LLM.int8 stays the default
    assert config.activations is None and config.scheme.activations is None
    weight_only = LowBitConfig(weights="int8", activations=None)
    assert (weight_only.outlier_threshold, weight_only.scheme.activations) == (None, None)
    for weights in ("int4", "int3", "int2"):
        affine = LowBitConfig(weights=weights)
        assert (affine.block_size, affine.double_quant, affine.outlier_threshold, affine.activations) == (64, None, None, None)
        assert LowBitConfig(weights=weights, block_size=4096).scheme.block_size == 4096


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(weights="nf4", double_quant=False, block_size=128, compute_dtype="float16"),
        dict(weights="fp4", compute_dtype=torch.float32, skip_modules=["lm_head", "mlp.down_proj"]),
        dict(weights="int8", outlier_threshold=0.0),
        dict(weights="int8", activations=None, compute_dtype="bfloat16"),
        dict(weights="int4", block_size=128),
        dict(weights="int2", block_size=16, skip_modules=["lm_head"]),
    ],
)
def test_round_trip_through_json(kwargs):
    config = LowBitConfig(**kwargs)
    restored = AutoQuantizationConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert isinstance(restored, LowBitConfig)
    assert restored == config and restored.to_dict() == config.to_dict()


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16", "bf16"])
def test_compute_dtype_by_name(name):
    assert LowBitConfig(compute_dtype=name).compute_dtype is torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(weights="nf3"), "weights"),
        (dict(block_size=48), "block_size"),
        (dict(block_size=8), "block_size"),
        (dict(block_size=8192), "block_size"),
        (dict(block_size=64.0), "block_size"),
        (dict(weights="int8", double_quant=True), "double_quant"),
        (dict(weights="int8", block_size=64), "block_size"),
        (dict(weights="nf4", outlier_threshold=6.0), "outlier_threshold"),
        (dict(weights="int8", outlier_threshold=-1.0), "outlier_threshold"),
        (dict(compute_dtype=torch.int8), "compute_dtype"),
        (dict(compute_dtype="int32"), "compute_dtype"),
        (dict(compute_dtype="not_a_dtype"), "compute_dtype"),
        (dict(skip_modules="lm_head"), "skip_modules"),
        (dict(weights="int4", double_quant=True), "double_quant"),
        (dict(weights="int2", outlier_threshold=6.0), "outlier_threshold"),
        (dict(weights="int4", block_size=96), "block_size"),
        (dict(weights="int4", activations="int8"), "activations"),
        (dict(weights="int3", activations="q8_0"), "activations"),
        (dict(weights="int3", double_quant=True), "double_quant"),
        (dict(weights="nf4", activations="int8"), "activations"),
        (dict(weights="int8", activations="fp8"), "activations"),
        (dict(weights="int8", activations=None, outlier_threshold=6.0), "outlier_threshold"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        LowBitConfig(**kwargs)


def test_newer_format_version_is_refused():
    newer = LowBitConfig().to_dict() | {"format_version": FORMAT_VERSION + 1, "a_field_from_the_future": 1}
    with pytest.raises(ValueError, match="format_version .* newer"):
        LowBitConfig.from_dict(newer)


def test_unknown_field_is_refused():
    with pytest.raises(ValueError, match="unknown fields"):
        LowBitConfig.from_dict(LowBitConfig().to_dict() | {"blocksize": 64})


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8", "nf4-no-dq"])
def test_presets_load_by_name(name):
    config = LowBitConfig.from_preset(name)
    assert config.weights == name.split("-")[0]
    assert config.double_quant == (None if name == "int8" else name != "nf4-no-dq")


def test_integer_presets():
    assert [LowBitConfig.from_preset(name).weights for name in ("int4", "int3", "int2")] == ["int4", "int3", "int2"]
    weight_only = LowBitConfig.from_preset("int8-weight-only")
    assert (weight_only.weights, weight_only.activations, weight_only.outlier_threshold) == ("int8", None, None)


def test_config_without_activations_keeps_llm_int8():
    # a config.json written before the field existed
    saved = {k: v for k, v in LowBitConfig(weights="int8").to_dict().items() if k != "activations"}
    assert LowBitConfig.from_dict(saved).activations == "int8"


def test_preset_list_and_unknown_preset():
    assert {"nf4", "fp4", "int8"} <= set(preset_names())
    with pytest.raises(ValueError, match="unknown preset 'nf5'"):
        LowBitConfig.from_preset("nf5")


def test_from_bnb_4bit():
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float16, llm_int8_skip_modules=["lm_head"],
    )  # fmt: skip
    config = LowBitConfig.from_bnb(bnb)
    assert config.to_dict() == LowBitConfig(
        weights="fp4", double_quant=True, block_size=64, compute_dtype=torch.float16, skip_modules=["lm_head"]
    ).to_dict()


def test_from_bnb_8bit():
    config = LowBitConfig.from_bnb(BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0))
    assert (config.weights, config.outlier_threshold, config.compute_dtype) == ("int8", 4.0, torch.float16)


def test_from_bnb_refuses_what_it_cannot_map():
    with pytest.raises(ValueError, match="llm_int8_has_fp16_weight"):
        LowBitConfig.from_bnb(BitsAndBytesConfig(load_in_8bit=True, llm_int8_has_fp16_weight=True))
    with pytest.raises(ValueError, match="quant_storage"):
        LowBitConfig.from_bnb(BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16))
