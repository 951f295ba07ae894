"""LowBitConfig.head: the output head quantized in a format of its own (by default it stays in 16-bit, as bitsandbytes
keeps it). What a user relies on: the head holds the format's rounding of the checkpoint's head and the logits come
from it, on the format's kernel; it saves and reloads as itself; everything else is quantized as without it; and a
head that cannot be quantized (tied to the input embeddings, or kept by skip_modules) is refused, naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from conftest import tiny_llama_config
from cpu_caps import avx2_here, avx512_bf16_here
from helpers import load_quantized, lowbit_modules, read_safetensors
from oracles import weight_of
from quantizer_plugin import LowBitConfig, LowBitLinear, ops

HEADS = ["int8", "int4", "nf4"]
# the kernel each head format's decode runs on this CPU when no other layer of the model has that format
# bfloat16 decode: int4's codes in bf16 pairs where the CPU has AVX512-BF16
HEAD_KERNELS = {"int8": "cpu.int8.fused", "int4": "cpu.affine.fused_bf16" if avx512_bf16_here() else "cpu.affine.fused"}


def checkpoint_head(llama_dir) -> torch.Tensor:
    return read_safetensors(llama_dir)["lm_head.weight"].float()


@pytest.mark.parametrize("head", HEADS)
def test_the_head_holds_its_formats_rounding_and_the_logits_come_from_it(llama_dir, head):
    model = load_quantized(llama_dir, weights="nf4", head=head)
    layers = lowbit_modules(model)
    assert isinstance(model.lm_head, LowBitLinear) and model.lm_head.scheme.weights == head
    assert model.lm_head.scheme.activations is None  # weight-only, LLM.int8's decomposition not on the head
    assert {layer.scheme.weights for name, layer in layers.items() if name != "lm_head"} == {"nf4"}
    assert len(layers) == 2 * 7 + 1  # every decoder linear and the head
    # the head's stored tensors, read by the independent oracle, round the checkpoint's head row by row / block
    source, stored = checkpoint_head(llama_dir), weight_of(model.lm_head)
    # at most half the format's widest step, relative to the largest |weight| (nf4's blocks of 64 span rows here)
    half_step = {"int8": 1 / 254, "int4": 1 / 15, "nf4": 0.139}[head]
    assert (stored - source).abs().max() <= half_step * 1.01 * source.abs().max()
    assert (stored - source).abs().max() > 0  # quantized, not kept
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    expected = out.hidden_states[-1].float() @ stored.T
    assert (out.logits.float() - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.fixture(scope="module")
def llama_128_dir(tmp_path_factory):
    """A tiny Llama whose hidden size is a multiple of the fused kernels' 64 columns."""
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("llama128") / "model"
    LlamaForCausalLM(tiny_llama_config(hidden_size=128)).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.skipif(not avx2_here(), reason="the CPU kernels need AVX2")
@pytest.mark.parametrize("head", sorted(HEAD_KERNELS))
def test_the_heads_decode_runs_on_its_formats_kernel(llama_128_dir, head):
    model = load_quantized(llama_128_dir, weights="nf4", head=head)
    hidden = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    with torch.no_grad(), ops.record_dispatch() as served:
        model.lm_head(hidden)
    assert served == [HEAD_KERNELS[head]]


def test_q8_0_activations_reach_a_head_whose_format_has_them(llama_dir):
    model = load_quantized(llama_dir, weights="nf4", activations="q8_0", head="int4")
    assert model.lm_head.scheme.activations == "q8_0"
    model = load_quantized(llama_dir, weights="nf4", activations="q8_0", head="int8")
    assert model.lm_head.scheme.activations is None  # int8 has no q8_0 mode: weight-only


@pytest.mark.parametrize("head", ["int8", "int4"])
def test_it_saves_and_reloads_as_itself(llama_dir, tmp_path, head):
    model = load_quantized(llama_dir, weights="nf4", head=head)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["head"] == head and "lm_head" not in saved["skip_modules"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded.lm_head, LowBitLinear) and reloaded.lm_head.scheme == model.lm_head.scheme
    for name, tensor in model.lm_head.quantized_tensors().items():
        assert torch.equal(reloaded.lm_head.quantized_tensors()[name], tensor), name
    ids = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    # the checkpoint stores a head: a config passed on reload must agree on it
    with pytest.raises(ValueError, match="head"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=LowBitConfig(weights="nf4"))


def test_dequantize_gives_back_an_ordinary_head(llama_dir):
    model = load_quantized(llama_dir, weights="nf4", head="int8")
    stored = weight_of(model.lm_head)
    model.dequantize()
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.allclose(model.lm_head.weight.float(), stored, rtol=1e-2, atol=1e-3)


def test_without_head_the_config_is_what_older_versions_read(llama_dir):
    assert "head" not in LowBitConfig(weights="nf4").to_dict()
    assert LowBitConfig.from_dict(LowBitConfig(weights="nf4", head="int4").to_dict()).head == "int4"


def test_bad_heads_are_refused_naming_the_field(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="LowBitConfig.head: unknown format 'int9'"):
        LowBitConfig(weights="nf4", head="int9")
    with pytest.raises(ValueError, match="LowBitConfig.head quantizes the output head 'lm_head'.*skip_modules"):
        load_quantized(llama_dir, weights="nf4", head="int8", skip_modules=["lm_head"])
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LowBitConfig.head: LlamaForCausalLM's head 'lm_head' is tied"):
        load_quantized(tmp_path, weights="nf4", head="int8")
