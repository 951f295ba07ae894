"""transformers' bitsandbytes training test, ported: freeze the model, cast every 1-D parameter to float32, wrap the
attention projections in a small hand-written LoRA layer, and take a backward step under CPU autocast to bfloat16.

Since transformers 5.25 the recipe needs the autocast: without it a float32 norm output meets a bfloat16 linear, even
in a model with no quantization at all. Under autocast it must run on every format, as it does with bitsandbytes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitConfig, LowBitLinear

FORMATS = [dict(weights="nf4"), dict(weights="fp4"), dict(weights="int8"), dict(weights="int8", activations=None),
           dict(weights="int4"), dict(weights="int2"), dict(weights="fp8")]  # fmt: skip


class LoRALayer(nn.Module):
    """The adapter transformers' bitsandbytes tests wrap around a frozen projection."""

    def __init__(self, module: nn.Module, rank: int):
        super().__init__()
        self.module = module
        features_in = module.in_features
        features_out = module.out_features
        self.adapter = nn.Sequential(nn.Linear(features_in, rank, bias=False), nn.Linear(rank, features_out, bias=False))
        nn.init.normal_(self.adapter[0].weight, std=1 / rank)
        nn.init.zeros_(self.adapter[1].weight)
        self.adapter.to(module.weight.device)

    def forward(self, x):
        return self.module(x) + self.adapter(x)


def prepare(model: nn.Module) -> list[nn.Parameter]:
    for param in model.parameters():
        param.requires_grad = False
        if param.ndim == 1:
            param.data = param.data.to(torch.float32)
    adapters = []
    for layer in model.model.layers:
        for name in ("q_proj", "v_proj"):
            wrapped = LoRALayer(getattr(layer.self_attn, name), rank=4)
            setattr(layer.self_attn, name, wrapped)
            adapters += list(wrapped.adapter.parameters())
    return adapters


@pytest.mark.parametrize("config", FORMATS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_the_float32_norms_recipe_trains_under_autocast(llama_dir, token_ids, config):
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=LowBitConfig(**config), dtype=torch.bfloat16
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowBitLinear)
    adapters = prepare(model)
    assert model.model.norm.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(token_ids).logits
    logits.float().norm().backward()
    for param in adapters:
        assert param.grad is not None and torch.isfinite(param.grad).all()
    # the adapters' second matrix starts at zero, so only its gradient is non-zero after one step
    assert all(layer.self_attn.q_proj.adapter[1].weight.grad.abs().sum() > 0 for layer in model.model.layers)
