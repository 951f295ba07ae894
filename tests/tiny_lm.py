"""A small trained causal LM for accuracy checks, trained here (no download): a byte-level Llama (vocabulary 256,
hidden 128, 4 layers, MLP 384: 0.9M parameters) on the English text of Python's own documentation topics
(pydoc_data, part of the standard library), in about half a minute on two CPU cores, deterministically (fixed seeds,
fixed batches).

    python tests/tiny_lm.py [--seed N]   # trains it and prints the accuracy table of benchmarks/RESULTS.md
    python tests/tiny_lm.py --save PATH  # only trains it and saves it (the tests, beside the suite: background.py)
    python tests/tiny_lm.py --save PATH --also-seed 1  # then the second seed's, into PATH-seed1

Both measures use the whole held-out text (the last tenth of the corpus, never trained on: 364 windows of 128
bytes, 46k predictions):
- perplexity, exp(mean next-byte loss);
- the KL divergence from the full-precision model's next-byte distribution to the quantized model's, averaged over
  every prediction: how far quantizing moved what the model predicts. It compares two models on the same inputs
  position by position, so it separates fits whose perplexities differ by less than their noise (at 4 bits the
  perplexities of ours, HQQ and round-to-nearest change order with the group size and the training seed, while
  their divergences keep theirs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CONTEXT = 128
TRAIN_STEPS = 600
BATCH = 16
EVAL_BATCH = 64  # windows per forward when evaluating


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


def train(path: Path, seed: int = 0) -> Path:
    """Trains the model (initial weights and batches drawn from `seed`) and saves it (float32) to `path`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config())
    train_ids, _ = split()
    generator = torch.Generator().manual_seed(seed)
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


def held_out_windows() -> torch.Tensor:
    """The held-out text cut into consecutive windows of CONTEXT bytes (the remainder dropped)."""
    _, held_out = split()
    count = len(held_out) // CONTEXT
    return held_out[: count * CONTEXT].view(count, CONTEXT)


def log_probabilities(model) -> torch.Tensor:
    """float32 log-probabilities of the next byte at every position of the held-out windows (windows, CONTEXT, 256)."""
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(input_ids=batch).logits.float(), dim=-1)
                          for batch in held_out_windows().split(EVAL_BATCH)])  # fmt: skip


def perplexity(log_probs: torch.Tensor) -> float:
    """exp(mean next-byte loss) over the held-out windows, from a `log_probabilities` result."""
    predicted = log_probs[:, :-1].gather(-1, held_out_windows()[:, 1:, None])
    return float((-predicted.mean()).exp())


def kl_divergence(log_probs: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean KL(reference || model) in nats over every prediction, from two `log_probabilities` results."""
    return float((reference.exp() * (reference - log_probs)).sum(-1).mean())


def main() -> int:
    import argparse
    import itertools
    import tempfile

    from transformers import LlamaForCausalLM

    from quantizer_plugin import LowBitConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_integer_formats import hqq_weight, round_to_nearest

    parser = argparse.ArgumentParser(description="Train the small LM and print the accuracy table of benchmarks/RESULTS.md.")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the tests use 0)")
    parser.add_argument("--save", type=Path, default=None, help="only train, and save the model there (the tests)")
    parser.add_argument("--also-seed", type=int, default=None,
                        help="with --save: then train from this seed too, into PATH-seed<N> (one after the other: "
                             "two trainings side by side would each take the same two cores)")  # fmt: skip
    parser.add_argument("--tables", nargs="+", choices=["formats", "head", "gptq", "fp8"],
                        default=["formats", "head", "gptq", "fp8"],
                        help="the formats table, the output head quantized too (LowBitConfig.head), GPTQ "
                             "calibrated on the training text against the data-free fit, and fp8 against "
                             "optimum-quanto's qfloat8")  # fmt: skip
    arguments = parser.parse_args()
    seed = arguments.seed
    if arguments.save is not None:
        train(arguments.save, seed)
        if arguments.also_seed is not None:
            train(arguments.save.with_name(f"{arguments.save.name}-seed{arguments.also_seed}"), arguments.also_seed)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        path = train(Path(folder) / "tiny-lm", seed)
        full = LlamaForCausalLM.from_pretrained(path)
        reference = log_probabilities(full)

        def measured(model) -> str:  # perplexity, and the divergence from full precision in thousandths of a nat
            log_probs = log_probabilities(model)
            return f"{perplexity(log_probs):.4f} / {1000 * kl_divergence(log_probs, reference):.2f}"

        print("perplexity / KL divergence from float32 (1e-3 nats)\n")
        if "head" in arguments.tables:  # the decoder linears in nf4, the head in 16-bit (the default) or quantized
            print("| decoder linears | head | ours |\n|---|---|---|")
            for head in (None, "int8", "nf4", "int4"):
                config = LowBitConfig(weights="nf4", compute_dtype="float32", head=head)
                model = LlamaForCausalLM.from_pretrained(path, quantization_config=config)
                print(f"| nf4 | {head or 'float32 (kept)'} | {measured(model)} |")
            print()
        if "gptq" in arguments.tables:  # calibrated on 128 windows of the training text
            train_ids, _ = split()
            print("| format | group | data-free fit | GPTQ |\n|---|---|---|---|")
            for weights, group in itertools.product(("int4", "int3", "int2"), (64, 128)):
                common = dict(weights=weights, block_size=group, compute_dtype="float32")
                free = measured(LlamaForCausalLM.from_pretrained(path, quantization_config=LowBitConfig(**common)))
                config = LowBitConfig(**common, method="gptq", dataset=train_ids, calibration_length=CONTEXT)
                print(f"| {weights} | {group} | {free} | {measured(LlamaForCausalLM.from_pretrained(path, quantization_config=config))} |")
            print()
        if "fp8" in arguments.tables:  # optimum-quanto's qfloat8 (a scale per row) through its quantize and freeze
            import copy

            import optimum.quanto as quanto

            print("| format | scale | ours | optimum-quanto |\n|---|---|---|---|")
            for weights, peer in (("fp8", "qfloat8"), ("fp8_e5m2", "qfloat8_e5m2")):
                theirs = copy.deepcopy(full)
                quanto.quantize(theirs.model.layers, weights=getattr(quanto, peer))
                quanto.freeze(theirs.model.layers)
                for block in (None, 128):
                    config = LowBitConfig(weights=weights, block_size=block, compute_dtype="float32")
                    ours = measured(LlamaForCausalLM.from_pretrained(path, quantization_config=config))
                    print(f"| {weights} | {'per row' if block is None else f'per {block} columns'} | {ours} | "
                          f"{measured(theirs) if block is None else ''} |")  # fmt: skip
            print()
        if "formats" not in arguments.tables:
            return 0
        print(f"| format | group | ours | HQQ | round-to-nearest |\n|---|---|---|---|---|\n| float32 | | {measured(full)} | | |")
        for weights in ("int8", "nf4"):
            activations = {"activations": None} if weights == "int8" else {}  # weight-only int8
            config = LowBitConfig(weights=weights, compute_dtype="float32", **activations)
            print(f"| {weights} | | {measured(LlamaForCausalLM.from_pretrained(path, quantization_config=config))} | | |")
        for (weights, bits), group in itertools.product((("int4", 4), ("int3", 3), ("int2", 2)), (32, 64, 128)):
            config = LowBitConfig(weights=weights, compute_dtype="float32", block_size=group)
            ours = measured(LlamaForCausalLM.from_pretrained(path, quantization_config=config))
            peers = [measured(with_weights(full, lambda w: quantize(w, bits, group))) for quantize in (hqq_weight, round_to_nearest)]
            print(f"| {weights} | {group} | {ours} | {peers[0]} | {peers[1]} |")
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
