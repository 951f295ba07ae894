"""Static activations (W8A8) on the small LM trained here (tests/tiny_lm.py), against the float model and against
optimum-quanto's W8A8 (its qint8 / qfloat8 weights and activations, calibrated by its own Calibration on the same
sequences, then frozen), the peer that offers static activations on a CPU."""

from __future__ import annotations

import copy

import optimum.quanto as quanto
import pytest
import torch

from quantizer_plugin import LowBitConfig
from quantizer_plugin.calibration import calibration_ids

SAMPLES, LENGTH = 32, 128  # calibration: 32 windows of 128 bytes of the training text


@pytest.fixture(scope="module")
def small_lm():
    """(path, float model, its log-probabilities, calibration ids, a function giving a model's KL and perplexity)."""
    import background
    import tiny_lm
    from transformers import LlamaForCausalLM

    path = background.result("tiny-lm") / "out"  # trained beside the suite since collection (tests/background.py)
    full = LlamaForCausalLM.from_pretrained(path)
    reference = tiny_lm.log_probabilities(full)
    ids = calibration_ids(tiny_lm.split()[0], samples=SAMPLES, length=LENGTH)

    def measure(model) -> tuple[float, float]:
        log_probs = tiny_lm.log_probabilities(model)
        return tiny_lm.kl_divergence(log_probs, reference), tiny_lm.perplexity(log_probs)

    return path, full, measure(full)[1], ids, measure


def ours(path, ids, **settings):
    from transformers import LlamaForCausalLM

    config = LowBitConfig(compute_dtype="float32", dataset=ids, calibration_samples=SAMPLES, calibration_length=LENGTH,
                          **settings)  # fmt: skip
    return LlamaForCausalLM.from_pretrained(path, quantization_config=config)


def quantos(full, ids, qtype: str):
    model = copy.deepcopy(full)
    quanto.quantize(model.model.layers, weights=getattr(quanto, qtype), activations=getattr(quanto, qtype))
    with torch.no_grad(), quanto.Calibration():
        for batch in ids.split(8):
            model(batch)
    quanto.freeze(model.model.layers)
    return model


def test_int8_w8a8_with_smoothquant_stays_within_one_percent_of_the_float_perplexity(small_lm):
    """SmoothQuant (smoothing_alpha 0.5, the default) against no smoothing and against quanto's W8A8 int8: the KL
    divergence from the float model over the whole held-out text, and the perplexity."""
    path, full, float_perplexity, ids, measure = small_lm
    smoothed_kl, smoothed_perplexity = measure(ours(path, ids, weights="int8", activations="int8_static"))
    plain_kl, _ = measure(ours(path, ids, weights="int8", activations="int8_static", smoothing_alpha=None))
    quanto_kl, _ = measure(quantos(full, ids, "qint8"))
    assert smoothed_perplexity <= 1.01 * float_perplexity, (smoothed_perplexity, float_perplexity)
    assert 0 < smoothed_kl < plain_kl, (smoothed_kl, plain_kl)
    assert smoothed_kl <= quanto_kl, (smoothed_kl, quanto_kl)


def test_fp8_w8a8_moves_the_small_lm_as_little_as_quantos(small_lm):
    """e4m3 weights (a scale per row) and static e4m3 activations (one scale per layer), against quanto's qfloat8 W8A8
    (the same granularity): within 2% of its KL divergence (the same rounding; our scale is the calibration's
    absmax, quanto's a moving average of it)."""
    path, full, float_perplexity, ids, measure = small_lm
    fp8_kl, fp8_perplexity = measure(ours(path, ids, weights="fp8", activations="fp8_static"))
    quanto_kl, _ = measure(quantos(full, ids, "qfloat8"))
    assert fp8_perplexity <= 1.01 * float_perplexity
    assert 0 < fp8_kl <= 1.02 * quanto_kl, (fp8_kl, quanto_kl)
