"""How close a quantized model stays to its full-precision source: cosine of mean-pooled sentence embeddings."""

from __future__ import annotations

from pathlib import Path

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores each weight in four bits and a shared scale per block.",
    "A cup of coffee in the morning helps many people start the day.",
    "The stock market closed higher after the central bank held interest rates.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She tuned her guitar before walking on stage.",
    "Large language models predict the next token from the previous ones.",
    "Heavy rain is expected across the north of the country tomorrow.",
]


def model_inputs(model_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenized SENTENCES when the folder has a tokenizer, else fixed pseudo-random token ids."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}
    except (OSError, ValueError, TypeError):
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 100, (len(SENTENCES), 24), generator=generator)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


@torch.no_grad()
def sentence_embeddings(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (all-MiniLM-L6-v2's own pooling), float32."""
    outputs = model(**inputs, output_hidden_states=True)
    hidden = outputs.hidden_states[-1].float()
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def embedding_cosines(reference: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Per-sentence cosine similarity of two batches of embeddings."""
    return torch.nn.functional.cosine_similarity(reference, quantized, dim=-1)
