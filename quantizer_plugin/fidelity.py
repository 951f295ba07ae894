"""How close a quantized model stays to its full-precision source: the CLI's fidelity line.

Two probes, each measuring one model at a time (so that the CLI never holds both models) and then comparing:
- causal LMs: on an embedded text, Python's own documentation topics (pydoc_data ships with every Python), the
  perplexity of both models and the KL divergence from the source model's next-token distribution to the quantized
  one's, averaged over every prediction: the measures of the accuracy tables in benchmarks/RESULTS.md. Without a
  tokenizer in the model folder there is no text to read: the divergence is then measured on fixed random token
  ids, and the line says so.
- other models (encoders such as the embedded all-MiniLM-L6-v2): the cosine of mean-pooled sentence embeddings.
"""

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
WINDOWS = 4  # windows of text a causal LM reads: 4 x 128 tokens, whose log-probabilities the CLI keeps in float32
WINDOW_TOKENS = 128
TEXT_CHARACTERS = 20_000  # of the documentation topics: enough text for the windows with any tokenizer
RANDOM_IDS = 100  # random token ids are drawn below this, which every vocabulary has


def load_tokenizer(model_dir: Path):
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def is_causal_lm(model_class: type) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_class.__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def documentation_text() -> str:
    """The start of Python's documentation topics, in a fixed order (the text tests/tiny_lm.py trains on)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))[:TEXT_CHARACTERS]


def text_windows(tokenizer, length: int) -> torch.Tensor:
    """Consecutive windows of `length` token ids of the documentation text, (WINDOWS, length) at most."""
    # verbose=False: no "longer than the maximum sequence length" warning for a text that is cut into windows anyway
    ids = tokenizer(documentation_text(), add_special_tokens=False, verbose=False)["input_ids"]
    count = min(WINDOWS, len(ids) // length)
    if count == 0:
        raise ValueError(f"the documentation text gives only {len(ids)} tokens, fewer than one window of {length}")
    return torch.tensor(ids[: count * length]).view(count, length)


def random_ids(rows: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, RANDOM_IDS, (rows, length), generator=generator)


class NextTokenProbe:
    """Perplexity and KL divergence of a causal LM's next-token predictions."""

    def __init__(self, model_dir: Path, config, device: torch.device):
        tokenizer = load_tokenizer(model_dir)
        length = min(WINDOW_TOKENS, getattr(config, "max_position_embeddings", None) or WINDOW_TOKENS)
        self.on_text = tokenizer is not None
        self.windows = (text_windows(tokenizer, length) if self.on_text else random_ids(WINDOWS, length)).to(device)
        where = "Python's documentation topics" if self.on_text else "random token ids (no tokenizer in the model folder)"
        self.description = f"next-token predictions against full precision on {where}"

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> torch.Tensor:
        """float32 log-probabilities of every next token, (windows, length, vocab); one window per forward."""
        return torch.stack([torch.log_softmax(model(window[None]).logits[0].float(), dim=-1) for window in self.windows])

    def report(self, reference: torch.Tensor, quantized: torch.Tensor) -> str:
        predictions = reference[:, :-1].numel() // reference.shape[-1]
        divergence = kl_divergence(reference, quantized)
        if not self.on_text:  # the perplexity of random ids says nothing about the model
            return (f"KL divergence from full precision: {divergence:.4g} nats per token over {predictions} "
                    "predictions on random token ids (no tokenizer in the model folder: no perplexity on text)")  # fmt: skip
        targets = self.windows[:, 1:].cpu()
        return (f"perplexity {perplexity(quantized, targets):.4f} (full precision {perplexity(reference, targets):.4f}); "
                f"KL divergence from full precision {divergence:.4g} nats per token; {predictions} predictions on "
                "Python's documentation topics")  # fmt: skip


def perplexity(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp of the mean loss of predicting targets[:, i] from position i (log_probs' last position predicts nothing)."""
    picked = log_probs[:, :-1].gather(-1, targets.to(log_probs.device)[..., None])
    return torch.exp(-picked.double().mean()).item()


def kl_divergence(reference: torch.Tensor, quantized: torch.Tensor) -> float:
    """KL(reference || quantized) of the next-token distributions, averaged over the positions that predict a token."""
    reference, quantized = reference[:, :-1].double(), quantized[:, :-1].double()
    return (reference.exp() * (reference - quantized)).sum(-1).mean().item()


def model_inputs(model_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The fidelity SENTENCES tokenized by the folder's tokenizer, or fixed random token ids when it has none."""
    return sentence_inputs(load_tokenizer(model_dir), device)


def sentence_inputs(tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    """The fidelity SENTENCES tokenized by `tokenizer`, or fixed random token ids when it is None."""
    if tokenizer is None:
        ids = random_ids(len(SENTENCES), 24)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {key: value.to(device) for key, value in batch.items() if key in ("input_ids", "attention_mask")}


class EmbeddingProbe:
    """Cosine of mean-pooled, L2-normalised last hidden states (all-MiniLM-L6-v2's own pooling)."""

    def __init__(self, model_dir: Path, config, device: torch.device):
        tokenizer = load_tokenizer(model_dir)
        self.on_text = tokenizer is not None
        self.inputs = sentence_inputs(tokenizer, device)
        where = f"{len(SENTENCES)} sentences" if self.on_text else "random token ids (no tokenizer in the model folder)"
        self.description = f"sentence embeddings against full precision on {where}"

    @torch.no_grad()
    def measure(self, model: torch.nn.Module) -> torch.Tensor:
        return sentence_embeddings(model, self.inputs)

    def report(self, reference: torch.Tensor, quantized: torch.Tensor) -> str:
        cosines = embedding_cosines(reference, quantized)
        what = f"{len(cosines)} sentences" if self.on_text else f"{len(cosines)} rows of random token ids (no tokenizer)"
        return f"embedding cosine vs full precision: mean {cosines.mean():.4f}, min {cosines.min():.4f} over {what}"


def probe_for(model_class: type, model_dir: Path, config, device: torch.device):
    return (NextTokenProbe if is_causal_lm(model_class) else EmbeddingProbe)(model_dir, config, device)


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
