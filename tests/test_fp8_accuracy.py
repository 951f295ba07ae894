"""fp8's accuracy on the small LM trained here (tests/tiny_lm.py) against optimum-quanto's qfloat8, the peer that
offers fp8 weights on a CPU, through quanto's own quantize and freeze (transformers' QuantoConfig cannot save a
model, so the peer runs in this process)."""

from __future__ import annotations

import copy

import optimum.quanto as quanto
import pytest
import torch

from quantizer_plugin import LowBitConfig, LowBitLinear


@pytest.fixture(scope="module")
def tiny_lm_path():
    import background

    return background.result("tiny-lm") / "out"  # trained beside the suite since collection (tests/background.py)


@pytest.mark.parametrize("weights, peer", [("fp8", "qfloat8"), ("fp8_e5m2", "qfloat8_e5m2")])
def test_fp8_moves_the_small_lm_no_more_than_quantos_qfloat8(tiny_lm_path, weights, peer):
    """The KL divergence from the float32 model's next-byte distribution over the whole held-out text, with the
    decoder's linears in fp8 (a scale per row, float32 compute) and in quanto's qfloat8 (its default: a scale per
    output row, the same granularity): ours at most quanto's."""
    import tiny_lm
    from transformers import LlamaForCausalLM

    full = LlamaForCausalLM.from_pretrained(tiny_lm_path)
    reference = tiny_lm.log_probabilities(full)

    def divergence(model) -> float:
        return tiny_lm.kl_divergence(tiny_lm.log_probabilities(model), reference)

    ours = LlamaForCausalLM.from_pretrained(tiny_lm_path, quantization_config=LowBitConfig(weights=weights,
                                                                                           compute_dtype="float32"))
    assert {type(m) for m in ours.model.layers.modules() if isinstance(m, (torch.nn.Linear, LowBitLinear))} == {LowBitLinear}
    theirs = copy.deepcopy(full)
    quanto.quantize(theirs.model.layers, weights=getattr(quanto, peer))
    quanto.freeze(theirs.model.layers)
    ours_kl, quanto_kl = divergence(ours), divergence(theirs)
    assert 0 < ours_kl <= quanto_kl, (weights, ours_kl, quanto_kl)
