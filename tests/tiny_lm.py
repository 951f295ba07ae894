"""A small trained causal LM for perplexity checks, trained here (no download): a byte-level Llama (vocabulary 256,
hidden 128, 4 layers, MLP 384: 0.9M parameters) on the English text of Python's own documentation topics
(pydoc_data, part of the standard library), in about half a minute on two CPU cores, deterministically (fixed seeds,
fixed batches).

    python tests/tiny_lm.py    # trains it and prints the perplexity table of the README (ours, HQQ, round-to-nearest)

Perplexity is measured on held-out text (the last tenth of the corpus, never trained on), over fixed windows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CONTEXT = 128
TRAIN_STEPS = 600
BATCH = 16
EVAL_WINDOWS = 48


def corpus() -> torch.Tensor:
    """The documentation topics' text as bytes (token ids 0..255), in a fixed order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def split() -> tuple[torch.Tensor, torch.Tensor]:
    data = corpus()
    cut = len(data) * 9 // 10
    return data[:cut], data[cut:]


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT,
                       tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip


def train(path: Path) -> Path:
    """Trains the model and saves it (float32) to `path`; returns `path`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(config())
    train_ids, _ = split()
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=TRAIN_STEPS, pct_start=0.1)
    model.train()
    for _ in range(TRAIN_STEPS):
        starts = torch.randint(0, len(train_ids) - CONTEXT - 1, (BATCH,), generator=generator)
        batch = torch.stack([train_ids[s : s + CONTEXT] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval().save_pretrained(path)
    return path


def perplexity(model) -> float:
    """exp(mean next-byte loss) over EVAL_WINDOWS fixed windows of the held-out text."""
    _, held_out = split()
    stride = (len(held_out) - CONTEXT) // EVAL_WINDOWS
    windows = torch.stack([held_out[i * stride : i * stride + CONTEXT] for i in range(EVAL_WINDOWS)])
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss
    return float(loss.exp())


def main() -> int:
    import tempfile

    from transformers import LlamaForCausalLM

    from quantizer_plugin import LowBitConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_integer_formats import hqq_weight, round_to_nearest

    with tempfile.TemporaryDirectory() as folder:
        path = train(Path(folder) / "tiny-lm")
        full = LlamaForCausalLM.from_pretrained(path)
        print(f"| format | ours | HQQ | round-to-nearest |\n|---|---|---|---|\n| float32 | {perplexity(full):.3f} | | |")
        for weights, bits in (("int4", 4), ("int2", 2), ("nf4", None), ("int8", None)):
            activations = {"activations": None} if weights == "int8" else {}  # weight-only int8
            config = LowBitConfig(weights=weights, compute_dtype="float32", **activations)
            ours = perplexity(LlamaForCausalLM.from_pretrained(path, quantization_config=config))
            peers = ["", ""]
            if bits:
                peers = [f"{perplexity(with_weights(full, lambda w: quantize(w, bits, 64))):.3f}"
                         for quantize in (hqq_weight, round_to_nearest)]  # fmt: skip
            print(f"| {weights} | {ours:.3f} | {peers[0]} | {peers[1]} |")
    return 0


def with_weights(model, transform):
    """A copy of `model` with every decoder linear weight replaced by transform(weight)."""
    import copy

    copied = copy.deepcopy(model)
    for name, module in copied.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = transform(module.weight.data.float())
    return copied


if __name__ == "__main__":
    sys.exit(main())
