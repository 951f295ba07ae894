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


def outputs_on_one_and_two_threads(layer: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """layer(x) with torch.set_num_threads(1), then (2), the thread count restored after."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(layer(x))
    finally:
        torch.set_num_threads(threads)
    return results


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def identity_row_groups(k: int):
    """Column lists [0], [1, 2], [3, 4, 5], [6, 7, 8, 9], [10], ... up to k: rows of the k x k identity to feed a layer
    1 to 4 at a time, so that a decode kernel's every activation-row count reads each weight alone."""
    first, rows = 0, 1
    while first < k:
        yield list(range(first, min(k, first + rows)))
        first, rows = first + rows, rows % 4 + 1
