"""Helpers shared by the loading and serialization tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitConfig, LowBitLinear


def load_quantized(path, **config) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(**config))


def lowbit_modules(model) -> dict[str, LowBitLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LowBitLinear)}


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()
