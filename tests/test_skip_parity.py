"""The default skip list keeps in 16-bit exactly the linears that bitsandbytes keeps, on the models transformers' own
bitsandbytes tests use (tiny random versions built from their configs). bitsandbytes itself is the oracle: each model
is loaded with BitsAndBytesConfig(load_in_8bit=True) on the CPU and its Linear8bitLt modules listed."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import BitsAndBytesConfig

from quantizer_plugin import LowBitConfig, LowBitLinear
from quantizer_plugin.modules import KeptLinear

bnb = pytest.importorskip("bitsandbytes")

TEXT = dict(vocab_size=128, num_hidden_layers=1, num_attention_heads=4)
T5 = dict(vocab_size=128, d_model=64, d_ff=96, d_kv=16, num_layers=1, num_heads=4)
BLIP2_PARTS = dict(
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=30,
                       patch_size=10),
    qformer_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, encoder_hidden_size=32),
    text_config=dict(model_type="opt", vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     ffn_dim=37, word_embed_proj_dim=32),
    num_query_tokens=4,
)  # fmt: skip

# model class, config class, config settings
MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(TEXT, hidden_size=64, intermediate_size=96, num_key_value_heads=2)),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(TEXT, hidden_size=64, ffn_dim=96, word_embed_proj_dim=64)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=1, n_head=4)),
    "bloom": ("BloomForCausalLM", "BloomConfig", dict(vocab_size=128, hidden_size=64, n_layer=1, n_head=4)),
    "t5": ("T5ForConditionalGeneration", "T5Config", T5),
    "flan-t5": ("T5ForConditionalGeneration", "T5Config", dict(T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "mpt": ("MptForCausalLM", "MptConfig", dict(vocab_size=128, d_model=64, n_layers=1, n_heads=4)),
    "roberta-mlm": ("RobertaForMaskedLM", "RobertaConfig", dict(TEXT, hidden_size=64, intermediate_size=96)),
    "roberta-classifier": ("RobertaForSequenceClassification", "RobertaConfig", dict(TEXT, hidden_size=64, intermediate_size=96)),
    "bert": ("BertModel", "BertConfig", dict(TEXT, hidden_size=64, intermediate_size=96)),
    "blip2": ("Blip2ForConditionalGeneration", "Blip2Config", BLIP2_PARTS),
}  # fmt: skip


@pytest.fixture(params=sorted(MODELS))
def saved_model(request, tmp_path_factory):
    model_class, config_class, settings = MODELS[request.param]
    model_class = getattr(transformers, model_class)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    model_class(getattr(transformers, config_class)(**settings)).save_pretrained(path)
    return request.param, model_class, path


def test_the_default_skip_list_is_bitsandbytes_own(saved_model):
    name, model_class, path = saved_model
    reference = model_class.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    )
    bnb_quantized = {n for n, module in reference.named_modules() if isinstance(module, bnb.nn.Linear8bitLt)}
    ours = model_class.from_pretrained(path, quantization_config=LowBitConfig(weights="int8"))
    quantized = {n for n, module in ours.named_modules() if isinstance(module, LowBitLinear)}
    assert quantized == bnb_quantized, name
    assert quantized, name


def test_what_the_last_parameter_names_decides_the_last_module(tmp_path):
    # BERT's last parameter is pooler.dense.bias: transformers' default list strips only ".weight", so, as with
    # bitsandbytes, the pooler is quantized; RoBERTa's masked-LM head keeps only its decoder (the output embedding).
    model_class = transformers.RobertaForMaskedLM
    model_class(transformers.RobertaConfig(**MODELS["roberta-mlm"][2])).save_pretrained(tmp_path)
    model = model_class.from_pretrained(tmp_path, quantization_config=LowBitConfig(weights="nf4"))
    assert isinstance(model.lm_head.dense, LowBitLinear)
    assert type(model.lm_head.decoder) is KeptLinear  # kept in 16-bit
    assert "lm_head.decoder" in model.config.quantization_config.skip_modules
