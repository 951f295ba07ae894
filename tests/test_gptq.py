"""GPTQ (quantizer_plugin/gptq.py, calibrated.py, calibration.py): the algorithm against an unblocked float64 GPTQ
written out here from the paper, the layer error it removes, whole models calibrated while they load, and the
settings' errors."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitConfig, LowBitLinear, gptq
from quantizer_plugin.calibration import calibration_ids
from quantizer_plugin.formats import QuantScheme, get_format

import oracles
from helpers import lowbit_modules

AFFINE = {"int4": 4, "int3": 3, "int2": 2}


def correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    """Inputs whose columns are mixed (so their Hessian is far from diagonal), a few with far more energy."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(k, k, generator=generator) / k**0.5
    x = torch.randn(rows, k, generator=generator) @ mixing + 0.1 * torch.randn(rows, k, generator=generator)
    x[:, :5] *= 8
    return x


def paper_gptq(weight, hessian, grid_codes, damp, act_order):
    """GPTQ as the paper's Algorithm 1 states it, one column at a time, no lazy batches, in float64:
    U = chol((H + damp mean(diag H) I)^-1) upper; for each column j (in act-order: decreasing diag(H)),
    q = round onto its grid, e = (w_j - q) / U_jj, W[:, j:] -= e U[j, j:]. `grid_codes(w, column)` gives the codes and
    values of a column on the grid of the original column `column`."""
    w, h = weight.double().clone(), hessian.double().clone()
    k = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros_like(w)
    for j in range(k):
        codes[:, j], q = grid_codes(w[:, j], int(order[j]))
        w[:, j:] -= ((w[:, j] - q) / u[j, j])[:, None] * u[j, j:][None, :]
    unpermuted = torch.empty_like(codes)
    unpermuted[:, order] = codes
    return unpermuted


def minmax_grid(weight, bits, block):
    """GPTQ's static grid as its docstring states it: each group's min and max widened to hold zero (a group of zeros
    takes [-1, 1]), scale (max - min) / (2^bits - 1) in float16, zero point round(-min / scale) in [0, 2^bits - 1]."""
    groups = weight.float().split(block, dim=1)
    low = torch.stack([g.amin(dim=1) for g in groups], dim=1).clamp(max=0)
    high = torch.stack([g.amax(dim=1) for g in groups], dim=1).clamp(min=0)
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -1.0, low), torch.where(flat, 1.0, high)
    scale = ((high - low) / (2**bits - 1)).clamp(min=torch.finfo(torch.float16).tiny).half()
    return {"weight_scale": scale, "weight_zero": (-low / scale.float()).round().clamp(0, 2**bits - 1).half()}


def affine_grid_rule(stored, k, bits, block):
    """A column's codes on the stored grid: round(w / s + z) in [0, 2^bits - 1], value (q - z) s."""
    s = stored["weight_scale"].double().repeat_interleave(block, dim=1)[:, :k]
    z = stored["weight_zero"].double().repeat_interleave(block, dim=1)[:, :k]

    def rule(w, column):
        q = (w / s[:, column] + z[:, column]).round().clamp(0, 2**bits - 1)
        return q, (q - z[:, column]) * s[:, column]

    return rule


@pytest.mark.parametrize("weights", [*AFFINE, "int8"])
@pytest.mark.parametrize("act_order", [True, False])
def test_codes_are_the_papers_gptq_on_the_same_grid(weights, act_order):
    n, k, block = 48, 200, 32  # a short last group; blocks of 16 columns cross the lazy updates' boundaries
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.02
    x = correlated_inputs(512, k, seed=2)
    hessian = gptq.Hessian(k)
    hessian.add(x)
    fmt = get_format(weights)
    scheme = QuantScheme(weights, block_size=block) if weights in AFFINE else QuantScheme("int8")
    stored = gptq.quantize(fmt, weight, hessian.matrix, scheme, gptq.GPTQSettings(block_columns=16, act_order=act_order))
    assert {name: (tuple(t.shape), t.dtype) for name, t in stored.items()} == {
        name: (spec.shape, spec.dtype) for name, spec in fmt.tensor_specs(n, k, scheme).items()}
    if weights in AFFINE:
        bits = AFFINE[weights]
        codes = fmt.unpack(stored["weight"], k).double()
        grid = minmax_grid(weight, bits, block)  # the grid the columns are rounded on; the scales are re-fitted after
        assert torch.equal(stored["weight_zero"], grid["weight_zero"])  # integer zero points, kept
        rule = affine_grid_rule(grid, k, bits, block)
    else:
        codes = stored["weight"].double()
        assert torch.equal(stored["weight_scale"], weight.abs().amax(dim=1))  # int8's own row absmax
        step = stored["weight_scale"].double() / 127

        def rule(w, column):
            q = (w / step).round().clamp(-127, 127)
            return q, q * step

    expected = paper_gptq(weight, hessian.matrix, rule, 0.01, act_order)
    assert (codes != expected).float().mean() < 0.002  # float32 against float64: an exact tie may round the other way


@pytest.mark.parametrize("weights", AFFINE)
def test_gptq_removes_most_of_the_layer_error_that_rounding_to_nearest_leaves(weights):
    n, k, block = 64, 256, 64
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.02
    x = correlated_inputs(1024, k, seed=4)
    hessian = gptq.Hessian(k)
    for chunk in x.split(300):  # in batches, as the calibration runs
        hessian.add(chunk)
    assert torch.allclose(hessian.matrix, 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-4)
    fmt, scheme = get_format(weights), QuantScheme(weights, block_size=block)
    stored = gptq.quantize(fmt, weight, hessian.matrix, scheme)
    ours = oracles.dequantize_affine(stored, k, AFFINE[weights], block)
    rule = affine_grid_rule(minmax_grid(weight, AFFINE[weights], block), k, AFFINE[weights], block)
    nearest = torch.stack([rule(weight[:, c].double(), c)[1] for c in range(k)], dim=1).float()

    def output_error(w):
        return ((x @ (weight - w).T) ** 2).sum()

    assert output_error(ours) < 0.6 * output_error(nearest), (output_error(ours), output_error(nearest))


@pytest.mark.parametrize("weights", AFFINE)
def test_refitted_scales_lower_each_rows_output_error_and_keep_codes_and_zero_points(weights):
    n, k, block, bits = 96, 256, 64, AFFINE[weights]
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.02
    x = correlated_inputs(1024, k, seed=7)
    hessian = gptq.Hessian(k)
    hessian.add(x)
    fmt, scheme = get_format(weights), QuantScheme(weights, block_size=block)
    stored = gptq.quantize(fmt, weight, hessian.matrix, scheme)
    grid = minmax_grid(weight, bits, block)
    assert torch.equal(stored["weight_zero"], grid["weight_zero"])
    before = {"weight": stored["weight"]} | grid  # the same codes on the min/max grid's scales

    def row_errors(tensors):  # each row's squared output error over the calibration inputs
        return ((x.double() @ (weight.double() - oracles.dequantize_affine(tensors, k, bits, block).double()).T) ** 2).sum(0)

    refitted, minmax = row_errors(stored), row_errors(before)
    assert bool((refitted <= minmax * 1.01).all())  # the fit lowers the damped error; no row is worse undamped
    assert refitted.sum() < 0.99 * minmax.sum(), (refitted.sum(), minmax.sum())
    assert (stored["weight_scale"] != grid["weight_scale"]).float().mean() > 0.5


def test_an_identity_hessian_rounds_to_nearest():
    # with uncorrelated inputs of equal energy GPTQ has no error to move: every code is the nearest on its grid
    n, k, block = 16, 128, 64
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(5))
    stored = gptq.quantize(get_format("int4"), weight, torch.eye(k), QuantScheme("int4", block_size=block))
    rule = affine_grid_rule(minmax_grid(weight, 4, block), k, 4, block)
    nearest = torch.stack([rule(weight[:, c].double(), c)[0] for c in range(k)], dim=1)
    assert torch.equal(get_format("int4").unpack(stored["weight"], k).double(), nearest)


def test_bad_hessians_and_formats_are_refused():
    weight = torch.randn(8, 64)
    scheme = QuantScheme("int4")
    with pytest.raises(ValueError, match="Hessian is \\(32, 32\\)"):
        gptq.quantize(get_format("int4"), weight, torch.eye(32), scheme)
    with pytest.raises(ValueError, match="NaN or infinite"):
        gptq.quantize(get_format("int4"), weight, torch.full((64, 64), float("nan")), scheme)
    with pytest.raises(ValueError, match="not weights='nf4'"):
        gptq.quantize(get_format("nf4"), weight, torch.eye(64), QuantScheme("nf4"))


# --- calibrated while loading --------------------------------------------------------------------------------------


def gptq_config(**overrides) -> LowBitConfig:
    settings = dict(weights="int4", method="gptq", dataset=torch.arange(4000) % 320, calibration_samples=8,
                    calibration_length=32, compute_dtype="float32")  # fmt: skip
    return LowBitConfig(**(settings | overrides))


def stash_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("lowbit-gptq-*"))


def test_a_model_is_calibrated_while_it_loads_saves_plain_and_reloads(llama_dir, tmp_path, token_ids):
    before = stash_folders()
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=gptq_config(weights="int3"))
    assert stash_folders() == before  # the 16-bit weights' stash is gone
    layers = lowbit_modules(model)
    assert len(layers) == 14 and all(layer.scheme.block_size == 128 for layer in layers.values())  # GPTQModel's group
    # every layer holds GPTQ's tensors (integer zero points), none the placeholders it had while loading
    assert all(torch.equal(layer.weight_zero, layer.weight_zero.round()) and layer.weight_scale.abs().min() > 0
               for layer in layers.values())  # fmt: skip
    model.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved == LowBitConfig(weights="int3", block_size=128, compute_dtype="float32", skip_modules=["lm_head"]).to_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["quantizer_plugin.calibration"])
    assert record | {"seconds": 0} == {"method": "gptq", "dataset": "Tensor", "samples": 8, "length": 32, "damp": 0.01,
                                       "act_order": True, "blocks": 2, "layers": 14, "seconds": 0}  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids).logits, model(token_ids).logits)


def test_the_blocks_are_fitted_to_their_inputs_from_the_quantized_blocks_before_them(llama_dir, token_ids):
    """GPTQ on the calibration data: each layer's output error on those inputs below the data-free fit's."""
    data = torch.arange(4000) % 320
    calibrated = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=gptq_config(dataset=data))
    free = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=LowBitConfig(weights="int4", block_size=128,
                                                                                           compute_dtype="float32"))  # fmt: skip
    full = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    ids = calibration_ids(data, samples=8, length=32)
    with torch.no_grad():
        reference = full(ids).logits.log_softmax(-1)
        divergence = {name: torch.nn.functional.kl_div(model(ids).logits.log_softmax(-1), reference, log_target=True,
                                                       reduction="batchmean").item()
                      for name, model in (("gptq", calibrated), ("free", free))}  # fmt: skip
    assert divergence["gptq"] < divergence["free"], divergence


@pytest.mark.parametrize(
    "settings, field",
    [
        (dict(dataset=None), "dataset"),
        (dict(dataset=[]), "dataset"),
        (dict(dataset=["some text"], tokenizer=None), "tokenizer"),
        (dict(dataset="pydoc"), "tokenizer"),
        (dict(weights="nf4"), "method"),
        (dict(method="awq"), "method"),
        (dict(calibration_samples=0), "calibration_samples"),
        (dict(damp=0.0), "damp"),
        (dict(act_order="yes"), "act_order"),
    ],
)
def test_bad_calibration_settings_name_the_field(settings, field):
    with pytest.raises((ValueError, TypeError), match=field):
        gptq_config(**settings)


def test_a_dataset_without_a_method_names_both():
    with pytest.raises(ValueError, match="dataset is given but nothing calibrates: pass method=.gptq., or static"):
        LowBitConfig(weights="int4", dataset="pydoc")


def test_short_or_empty_calibration_data_names_the_dataset():
    with pytest.raises(ValueError, match="fewer than one sequence of calibration_length=512"):
        calibration_ids(torch.arange(100))
    with pytest.raises(ValueError, match="sequences have 16 tokens, fewer than calibration_length=32"):
        calibration_ids(torch.zeros(4, 16, dtype=torch.long), length=32)
    with pytest.raises(ValueError, match="empty"):
        calibration_ids(torch.zeros(0, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        calibration_ids(torch.rand(100))


def test_the_builtin_text_is_pythons_documentation():
    class Bytes:  # a byte-level tokenizer
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(text.encode("utf-8"))}

    ids = calibration_ids("pydoc", Bytes(), samples=4, length=64)
    assert ids.shape == (4, 64)
    text = bytes(ids[0].tolist()).decode("utf-8", errors="replace")
    from pydoc_data.topics import topics

    assert any(text[:40] in topic for topic in topics.values())
    assert torch.equal(ids, calibration_ids("pydoc", Bytes(), samples=4, length=64))  # the same data every time


def test_a_failure_while_calibrating_leaves_no_stash_and_no_model(llama_dir):
    before = stash_folders()
    with pytest.raises(IndexError):  # token ids past the vocabulary: the embedding refuses them mid-calibration
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=gptq_config(dataset=torch.arange(4000) + 10**6))
    assert stash_folders() == before


def test_gptq_cannot_offload_to_disk(llama_dir, tmp_path):
    with pytest.raises(ValueError, match="offloading to disk"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=gptq_config(), offload_folder=str(tmp_path),
                                             device_map={"model.embed_tokens": "cpu", "model.layers": "disk",
                                                         "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"})  # fmt: skip


# --- accuracy on the small trained LM ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def tiny_lm_path(request):
    import background

    return background.result("tiny-lm") / ("out" if request.param == 0 else "out-seed1")


def test_gptq_moves_the_small_lm_less_than_the_data_free_fit(tiny_lm_path):
    """The small LM of tests/tiny_lm.py, calibrated on its training text, measured on its held-out text: GPTQ's KL
    divergence from the float32 model below the data-free fit's at int4, int3 and int2, groups 64 and 128."""
    import tiny_lm
    from transformers import LlamaForCausalLM

    full = LlamaForCausalLM.from_pretrained(tiny_lm_path)
    reference = tiny_lm.log_probabilities(full)
    train_ids, _ = tiny_lm.split()

    def divergence(config):
        model = LlamaForCausalLM.from_pretrained(tiny_lm_path, quantization_config=config)
        return tiny_lm.kl_divergence(tiny_lm.log_probabilities(model), reference)

    for weights in AFFINE:
        for group in (64, 128):
            common = dict(weights=weights, block_size=group, compute_dtype="float32")
            free = divergence(LowBitConfig(**common))
            calibrated = divergence(LowBitConfig(**common, method="gptq", dataset=train_ids, calibration_samples=32,
                                                 calibration_length=tiny_lm.CONTEXT))  # fmt: skip
            assert calibrated < free, (weights, group, calibrated, free)
            if weights != "int4":  # at 3 and 2 bits, far below
                assert calibrated < 0.6 * free, (weights, group, calibrated, free)


def test_a_blocks_layers_go_in_stages_of_the_same_input_in_forward_order():
    """GPTQ's true-sequential stages of a Llama block: q/k/v share the normalised input, then o, gate/up, down."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from quantizer_plugin import calibrated

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    block = model.model.layers[0]
    plain = {name: m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    x = torch.randn(1, 8, 96)
    kwargs = {"position_embeddings": model.model.rotary_emb(x, torch.arange(8)[None]), "attention_mask": None}
    assert calibrated._stages(block, plain, (x, kwargs)) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]  # fmt: skip
