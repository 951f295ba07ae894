"""Calibration data: the token sequences a calibrated method (GPTQ) runs through the model to see its activations.

A dataset is given as
- a list of strings, with a tokenizer: the texts are joined (each ends with the tokenizer's end-of-sequence token
  where it has one) and cut into windows;
- a tensor of token ids: (sequences, length) as it is, or a 1-D stream cut into windows;
- the name of a built-in text: "pydoc", Python's own documentation topics (`pydoc_data.topics`), which every Python
  ships, so that a quantization needs no download.
Windows are `length` tokens long, taken at offsets drawn from a seeded generator (GPTQ's own sampling of its
calibration text), so the same settings give the same data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BUILTIN_TEXTS = ("pydoc",)
SAMPLES = 128  # GPTQModel's default number of calibration sequences
LENGTH = 512  # tokens per sequence: a 2-core CPU runs 128 of them through a 0.4B model in minutes
SEED = 0
# the safetensors metadata key under which a calibrated checkpoint records its method and calibration (JSON)
METADATA_KEY = "quantizer_plugin.calibration"


def builtin_text(name: str) -> list[str]:
    """The documents of a built-in text, in a fixed order."""
    if name != "pydoc":
        raise ValueError(f"LowBitConfig.dataset: unknown built-in text {name!r}; expected one of {list(BUILTIN_TEXTS)}")
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _load_tokenizer(tokenizer):
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    return tokenizer


def _token_stream(texts: Sequence[str], tokenizer) -> torch.Tensor:
    if tokenizer is None:
        raise ValueError("LowBitConfig.tokenizer: a dataset of text needs a tokenizer (an object or its name/path)")
    tokenizer = _load_tokenizer(tokenizer)
    end = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for text in texts:
        ids += list(tokenizer(text, add_special_tokens=False)["input_ids"]) + ([end] if end is not None else [])
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, samples: int, length: int) -> torch.Tensor:
    if stream.numel() < length:
        raise ValueError(f"LowBitConfig.dataset holds {stream.numel()} tokens, fewer than one sequence of "
                         f"calibration_length={length}")  # fmt: skip
    generator = torch.Generator().manual_seed(SEED)
    starts = torch.randint(0, stream.numel() - length + 1, (samples,), generator=generator)
    return torch.stack([stream[start : start + length] for start in starts.tolist()])


def calibration_ids(dataset, tokenizer=None, samples: int = SAMPLES, length: int = LENGTH) -> torch.Tensor:
    """(samples, length) token ids from `dataset` (see the module docstring)."""
    if isinstance(dataset, torch.Tensor):
        if dataset.is_floating_point() or dataset.is_complex() or dataset.dtype == torch.bool:
            raise TypeError(f"LowBitConfig.dataset: a tensor of token ids must hold integers, not {dataset.dtype}")
        if dataset.numel() == 0:
            raise ValueError("LowBitConfig.dataset is an empty tensor")
        if dataset.dim() == 2:
            if dataset.shape[1] < length:
                raise ValueError(f"LowBitConfig.dataset: its sequences have {dataset.shape[1]} tokens, fewer than "
                                 f"calibration_length={length}")  # fmt: skip
            return dataset[:samples, :length].long()
        if dataset.dim() != 1:
            raise ValueError(f"LowBitConfig.dataset: a tensor of token ids is 1-D or (sequences, length), not {tuple(dataset.shape)}")
        return _windows(dataset.long(), samples, length)
    if isinstance(dataset, str):
        return _windows(_token_stream(builtin_text(dataset), tokenizer), samples, length)
    if isinstance(dataset, Sequence) and all(isinstance(text, str) for text in dataset):
        if not dataset or not any(text.strip() for text in dataset):
            raise ValueError("LowBitConfig.dataset is empty: give texts, token ids or the name of a built-in text")
        return _windows(_token_stream(dataset, tokenizer), samples, length)
    raise TypeError("LowBitConfig.dataset must be a list of strings, a tensor of token ids or the name of a built-in "
                    f"text {list(BUILTIN_TEXTS)}, not {type(dataset).__name__}")  # fmt: skip
