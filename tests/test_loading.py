"""from_pretrained quantizes while loading; save_pretrained/from_pretrained round-trips bit for bit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from quantizer_plugin import LowBitConfig, LowBitLinear
from quantizer_plugin.modules import KeptLinear

import oracles
from helpers import cosine, load_quantized, lowbit_modules, read_safetensors

FORMATS = [
    dict(weights="nf4"), dict(weights="nf4", double_quant=False), dict(weights="fp4"), dict(weights="int8"),
    dict(weights="int8", activations=None), dict(weights="int4"), dict(weights="int3"), dict(weights="int2", block_size=32),
    dict(weights="fp8"), dict(weights="fp8_e5m2", block_size=32),
]  # fmt: skip
FORMAT_IDS = ["nf4", "nf4-no-dq", "fp4", "int8", "int8-weight-only", "int4", "int3", "int2", "fp8", "fp8_e5m2"]
# logits cosine to full precision on the random tiny Llama, and weight cosine of every layer
LOGITS_FLOOR = {"int8": 0.999, "int4": 0.97, "nf4": 0.97, "fp4": 0.97, "int3": 0.9, "int2": 0.6, "fp8": 0.999,
                "fp8_e5m2": 0.995}  # fmt: skip
WEIGHT_FLOOR = {"int8": 0.9999, "int4": 0.99, "nf4": 0.99, "fp4": 0.99, "int3": 0.96, "int2": 0.85, "fp8": 0.999,
                "fp8_e5m2": 0.997}  # fmt: skip


@pytest.fixture(scope="module")
def reference_logits(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    return model


@pytest.mark.parametrize("config", FORMATS, ids=FORMAT_IDS)
def test_quantizes_every_linear_but_the_head(llama_dir, reference_logits, token_ids, config):
    model = load_quantized(llama_dir, **config)
    quantized = lowbit_modules(model)
    full_precision = {n for n, m in reference_logits.named_modules() if type(m) is nn.Linear}
    assert set(quantized) == full_precision - {"lm_head"}
    # kept in 16-bit: an nn.Linear whose decode runs on our kernel (modules.KeptLinear)
    assert type(model.lm_head) is KeptLinear and model.lm_head.weight.dtype == torch.bfloat16
    assert all(layer.fmt.name == config["weights"] for layer in quantized.values())
    with torch.no_grad():
        similarity = cosine(model(token_ids).logits, reference_logits(token_ids).logits)
    assert similarity > LOGITS_FLOOR[config["weights"]]


@pytest.mark.parametrize("config", FORMATS, ids=FORMAT_IDS)
def test_weights_equal_the_format_applied_to_the_checkpoint(llama_dir, reference_logits, config):
    model = load_quantized(llama_dir, **config)
    layer = model.model.layers[1].mlp.down_proj  # 96 x 150: blocks span rows
    expected = layer.fmt.quantize(reference_logits.model.layers[1].mlp.down_proj.weight.detach(), layer.scheme)
    for name, tensor in expected.items():
        assert torch.equal(getattr(layer, name), tensor), name
        assert not getattr(layer, name).requires_grad


@pytest.mark.parametrize("config", FORMATS, ids=FORMAT_IDS)
def test_save_and_reload_without_config_is_bit_exact(llama_dir, reference_logits, tmp_path, token_ids, config):
    model = load_quantized(llama_dir, **config)
    for name, layer in lowbit_modules(model).items():  # what is saved stands for the checkpoint's weights
        source = reference_logits.get_submodule(name).weight.detach().float()
        assert cosine(oracles.weight_of(layer), source) > WEIGHT_FLOOR[config["weights"]], name
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # no quantization_config: it comes from config.json
    assert again.config.quantization_config.to_dict() == model.config.quantization_config.to_dict()
    assert set(lowbit_modules(again)) == set(lowbit_modules(model))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        logits = again(token_ids).logits
        assert torch.equal(logits, model(token_ids).logits)
        assert cosine(logits, reference_logits(token_ids).logits) > LOGITS_FLOOR[config["weights"]]


def test_sharded_checkpoint_round_trips(llama_dir, tmp_path, token_ids):
    model = load_quantized(llama_dir, weights="nf4")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(token_ids).logits, model(token_ids).logits)


@pytest.mark.parametrize(
    "config, low, high",
    [(FORMATS[FORMAT_IDS.index(name)], low, high) for name, low, high in
     [("nf4", 0.25, 0.27), ("nf4-no-dq", 0.25, 0.29), ("int8", 0.5, 0.52), ("int4", 0.28, 0.30), ("int3", 0.22, 0.235),
      ("int2", 0.18, 0.19), ("fp8", 0.5, 0.53), ("fp8_e5m2", 0.55, 0.58)]],
    ids=["nf4", "nf4-no-dq", "int8", "int4", "int3", "int2-group-32", "fp8", "fp8_e5m2-group-32"],
)
def test_saved_linear_bytes_are_the_formats_share_of_bf16(llama_dir, tmp_path, config, low, high):
    model = load_quantized(llama_dir, **config)
    model.save_pretrained(tmp_path)
    saved, source = read_safetensors(tmp_path), read_safetensors(llama_dir)
    quantized_bytes = bf16_bytes = 0
    for name, layer in lowbit_modules(model).items():
        quantized_bytes += sum(saved[f"{name}.{t}"].nbytes for t in layer.tensor_specs())
        bf16_bytes += source[f"{name}.weight"].nbytes
    assert low <= quantized_bytes / bf16_bytes <= high, quantized_bytes / bf16_bytes


def test_gpt2_conv1d_is_quantized_in_linear_orientation(gpt2_dir, token_ids):
    reference = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    model = load_quantized(gpt2_dir, weights="nf4", compute_dtype="float32")
    attention = model.transformer.h[0].attn.c_attn
    assert isinstance(attention, LowBitLinear) and attention.source_is_conv1d
    conv_weight = reference.transformer.h[0].attn.c_attn.weight.detach()  # (in, out)
    assert (attention.in_features, attention.out_features) == tuple(conv_weight.shape)
    expected = attention.fmt.quantize(conv_weight.T, attention.scheme)
    assert torch.equal(attention.weight, expected["weight"])
    with torch.no_grad():
        assert cosine(model(token_ids).logits, reference(token_ids).logits) > 0.97


def test_skip_modules_keeps_named_modules_in_full_precision(llama_dir, tmp_path):
    model = load_quantized(llama_dir, weights="nf4", skip_modules=["mlp", "lm_head"])
    for layer in model.model.layers:
        assert all(type(m) is nn.Linear for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
        assert isinstance(layer.self_attn.q_proj, LowBitLinear)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(again.model.layers[0].mlp.up_proj) is nn.Linear


def test_default_skips_tied_output_embedding(tmp_path):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    model = load_quantized(tmp_path, weights="int8")
    assert type(model.lm_head) is KeptLinear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head" in model.config.quantization_config.skip_modules


def test_a_skip_pattern_that_is_not_a_regex_is_refused_naming_it(llama_dir):
    with pytest.raises(ValueError, match=r"skip_modules: 'layers\[' is not a valid pattern"):
        load_quantized(llama_dir, weights="nf4", skip_modules=["layers["])


@pytest.mark.parametrize("skip", [["mlp.gate"], ["lm_head", "layers.9"], ["self_attention"]])
def test_a_skip_name_that_matches_no_module_is_refused_naming_it(llama_dir, skip):
    with pytest.raises(ValueError) as error:
        load_quantized(llama_dir, weights="nf4", skip_modules=skip)
    assert f"skip_modules: {skip[-1:]} match no module of LlamaForCausalLM" in str(error.value)


@pytest.mark.parametrize("asked", [None, torch.float32])
def test_dequantize_returns_an_ordinary_model_in_the_source_dtype_unless_asked(llama_dir, token_ids, asked):
    # The source checkpoint is bfloat16 and the layers compute in float32: an ordinary model comes back in the
    # source's dtype (as transformers' dequantize does for every quantizer), or in the dtype asked for.
    model = load_quantized(llama_dir, weights="nf4", compute_dtype="float32")
    with torch.no_grad():
        quantized_logits = model(token_ids).logits
    expected = {name: oracles.weight_of(layer) for name, layer in lowbit_modules(model).items()}
    plain = model.dequantize() if asked is None else model.dequantize(dtype=asked)
    dtype = asked or torch.bfloat16
    assert not lowbit_modules(plain)
    assert {p.dtype for p in plain.parameters()} == {dtype}
    o_proj = plain.model.layers[0].self_attn.o_proj
    assert type(o_proj) is nn.Linear
    for name, weight in expected.items():
        assert torch.equal(plain.get_submodule(name).weight, weight.to(dtype)), name
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        assert cosine(plain(token_ids).logits, quantized_logits) > (0.9999 if asked else 0.999)


def test_a_preset_quantized_model_dequantizes_to_its_source_dtype(llama_dir):
    # The int8 preset once computed in float16, and a bf16 model came back float16 from dequantize().
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig.from_preset("int8"))
    assert model.hf_quantizer.quantization_config.compute_dtype == torch.bfloat16
    assert {p.dtype for p in model.dequantize().parameters()} == {torch.bfloat16}


def test_model_dtype_cast_moves_but_never_casts_stored_tensors(llama_dir):
    model = load_quantized(llama_dir, weights="nf4", double_quant=False)
    layer = model.model.layers[0].self_attn.q_proj
    absmax = layer.weight_absmax.clone()
    model.model.layers[0].half()  # transformers refuses .half() on the quantized model itself; a block does not
    assert layer.bias is None and model.model.layers[0].input_layernorm.weight.dtype == torch.float16
    assert layer.weight_absmax.dtype == torch.float32 and torch.equal(layer.weight_absmax, absmax)
    assert layer.weight.dtype == torch.uint8


def test_reload_does_not_need_bitsandbytes(llama_dir, tmp_path):
    load_quantized(llama_dir, weights="nf4").save_pretrained(tmp_path)
    script = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'bitsandbytes': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, quantizer_plugin\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(model.model.layers[0].mlp.up_proj).__name__, model(torch.tensor([[1, 2, 3]])).logits.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LowBitLinear torch.Size([1, 3, 320])" in result.stdout


def test_the_users_config_object_is_not_modified(llama_dir):
    config = LowBitConfig(weights="nf4")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=config)
    assert config.skip_modules is None  # reusable for another model
    assert "lm_head" in model.config.quantization_config.skip_modules  # the model records what it kept


@pytest.mark.parametrize("weights", ["nf4", "int8"])
@pytest.mark.parametrize("kernels", ["torch", "cpu"])
def test_a_weight_holding_nan_is_refused_naming_it(tmp_path, weights, kernels, monkeypatch, caplog, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.setenv("QUANTIZER_PLUGIN_KERNELS", kernels)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))  # fmt: skip
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    # transformers collects the errors of conversion ops into its load report and then raises
    with pytest.raises((ValueError, RuntimeError)) as error:
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LowBitConfig(weights=weights))
    report = str(error.value) + caplog.text + "".join(capsys.readouterr())
    assert "model.layers.0.mlp.up_proj.weight: the weight holds NaN or infinite values" in report
