"""activations="q8_0": the activations rounded to int8 in blocks of 32 as llama.cpp rounds them, multiplied by the
4-bit and 2-bit weights' codes in integers on the CPU.

What a user relies on: the rounding is llama.cpp's q8_0 (checked against its formula, written out here); the CPU's
integer kernels compute the mode's reference (and the reference the oracle's weights with that rounding), every weight
in its place; the mode costs little next to the 4-bit weight's own error; it loads, saves and reloads as a setting;
a NaN activation gives NaN, never a number."""

from __future__ import annotations

import pytest
import torch

from quantizer_plugin import LowBitConfig, LowBitLinear, ops
from quantizer_plugin.cpu import native
from quantizer_plugin.formats import QuantScheme
from quantizer_plugin.formats.activations import Q8Activations, quantize_blocks

import oracles
from cpu_caps import avx2_here, avx512_vnni_here
from helpers import identity_row_groups

FORMATS = ["nf4", "fp4", "int4", "int2"]
FAMILY = {"nf4": "codebook4bit", "fp4": "codebook4bit", "int4": "affine", "int2": "affine"}


def served_name(weights: str, block: int, k: int) -> str:
    """The kernel the mode's layer runs here: AVX512-VNNI's loop takes 64 bytes of a row a step (128 columns of 4
    bits, 256 of int2), where K holds whole steps and a step lies in one block or holds at most 4 whole ones (the
    codebooks' absmax blocks of 64 or more; int4's groups of 32 or more, int2's of 64 or more); AVX2's otherwise."""
    step = 256 if weights == "int2" else 128
    fits = block % step == 0 or (step % block == 0 and step // block <= (2 if FAMILY[weights] == "codebook4bit" else 4))
    vnni = avx512_vnni_here() and k % step == 0 and fits
    return f"cpu.{FAMILY[weights]}.q8_0" + ("_vnni" if vnni else "")


needs_avx2 = pytest.mark.skipif(not avx2_here(), reason="the q8_0 kernels need AVX2 (elsewhere the reference runs)")


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)


def make_layer(weights: str, n: int, k: int, block: int, dtype: torch.dtype, seed: int, double_quant: bool = True,
               bias: bool = True) -> LowBitLinear:  # fmt: skip
    torch.manual_seed(seed)
    settings = {"double_quant": double_quant} if weights in ("nf4", "fp4") else {}
    scheme = QuantScheme(weights, block, activations="q8_0", **settings)
    return LowBitLinear.from_float(torch.nn.Linear(k, n, bias=bias), scheme, compute_dtype=dtype)


def oracle_weight(layer: LowBitLinear) -> torch.Tensor:
    """The float32 weight the mode multiplies, from the oracles: a codebook's entries in int8 steps, round(127 c) / 127
    (llama.cpp's IQ4_NL keeps its codebook as such int8 values); integer codes as stored."""
    weights = layer.scheme.weights
    if weights not in ("nf4", "fp4"):
        return oracles.weight_of(layer)
    stored = {name: tensor.detach() for name, tensor in layer.quantized_tensors().items()}
    return oracles.dequantize_4bit(stored, layer.out_features, layer.in_features, weights, layer.scheme.block_size,
                                   int8_steps=True)  # fmt: skip


def llama_cpp_q8_0(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's quantize_row_q8_0_ref, written out: per 32, d = amax / 127, id = 1 / d (0 when d is 0),
    q = round(x * id). Returns (q (M, blocks, 32) float64, d (M, blocks) float64)."""
    blocks = x.double().unflatten(-1, (-1, 32))
    d = blocks.abs().amax(-1) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(blocks * inverse[..., None]), d


def test_the_rounding_is_llama_cpps_q8_0():
    torch.manual_seed(0)
    x = torch.randn(7, 320) * torch.logspace(-3, 3, 320)  # blocks of every magnitude
    x[2, 32:64] = 0  # an all-zero block: scale 0, codes 0
    x[3, 5] = 1e4  # one large entry dominates its block
    codes, scales = quantize_blocks(x, 32)
    q, d = llama_cpp_q8_0(x)
    assert torch.allclose(scales.double(), d, rtol=1e-6, atol=0)
    # llama.cpp multiplies by 1 / d, we by 127 / absmax: the same code but where a value falls within float32
    # rounding of a half step
    assert (codes.double() - q).abs().max() <= 1 and (codes.double() != q).float().mean() < 1e-3
    assert codes.abs().amax(-1)[d > 0].eq(127).all() and codes[2, 1].eq(0).all()
    assert ((codes.double() * scales.double()[..., None] - x.double().unflatten(-1, (-1, 32))).abs()
            <= scales.double()[..., None] * (0.5 + 1e-5)).all()  # fmt: skip


@needs_avx2
@pytest.mark.parametrize("per_byte, span", [(1, 32), (2, 32), (4, 32), (2, 64), (4, 128)])
def test_the_native_rounding_is_the_references_in_the_kernels_order(per_byte, span):
    torch.manual_seed(per_byte + span)
    x = torch.randn(5, 256) * 3
    x[1, 40] = float("nan")
    x[4, 200] = float("inf")
    codes, scales, sums = native.load().quantize_q8_0(x.contiguous(), per_byte, span)
    expected_codes, expected_scales = quantize_blocks(x, 32)
    # within each span: the codes the kernels read together (every byte's first code, then their second, ...)
    order = expected_codes.flatten(-2).unflatten(-1, (-1, span // per_byte, per_byte)).transpose(-1, -2).flatten(-3)
    assert torch.equal(codes, order)
    assert torch.equal(scales.nan_to_num(-1.0), expected_scales.nan_to_num(-1.0))
    assert torch.equal(scales.isnan(), expected_scales.isnan()) and scales.isnan().sum() == 2
    # each block's sum of the rounded activations (the affine kernels' zero points take it off)
    expected_sums = expected_codes.double().sum(-1) * expected_scales.double()
    assert torch.allclose(sums.double().nan_to_num(-1.0), expected_sums.nan_to_num(-1.0), rtol=1e-6)
    assert expected_codes[1, 1].eq(0).all() and expected_codes[4, 6].eq(0).all()  # the NaN blocks' codes, equal above


@pytest.mark.parametrize("weights", FORMATS)
def test_the_reference_is_the_oracles_weights_times_the_rounded_activations(weights):
    layer = make_layer(weights, 24, 192, 64, torch.float32, seed=1)
    torch.manual_seed(2)
    x = torch.randn(3, 192)
    q, d = llama_cpp_q8_0(x)
    rounded = (q * d[..., None]).flatten(1)
    expected = rounded @ oracle_weight(layer).double().T + layer.bias.double()
    with pytest.MonkeyPatch.context() as env, ops.record_dispatch() as served:
        env.setenv(ops.KERNELS_ENV, "torch")
        y = layer(x)
    assert served == ["torch.reference_forward"]
    assert ((y.double() - expected).abs().max() / expected.abs().max()) < 1e-5


@needs_avx2
@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("block", [32, 64, 128])
def test_the_q8_0_kernels_read_every_weight_in_its_place(weights, block):
    """Rows of the identity, 1 to 4 at a time: each block of 32 holding the one is (127, scale 1/127), the others
    zero, so each output is one weight as the mode multiplies it: the oracle's weight, transposed, every column in its
    place, every scale applied once (to float32 rounding)."""
    n, k = 40, 4 * block
    layer = make_layer(weights, n, k, block, torch.float32, seed=block, bias=False)
    expected = oracle_weight(layer)
    identity = torch.eye(k)
    for columns in identity_row_groups(k):
        with ops.record_dispatch() as served:
            y = layer(identity[columns])
        assert served == [served_name(weights, block, k)]
        assert torch.allclose(y, expected[:, columns].T, rtol=1e-5, atol=1e-6 * expected.abs().max()), columns


@needs_avx2
@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_q8_0_kernels_compute_the_reference(weights, dtype):
    shapes = [(33, 64, 32), (17, 256, 64), (96, 384, 128), (5, 1024, 256), (19, 192, 64)]  # 192: K % 128 != 0
    for (n, k, block), m, double_quant in zip(shapes, [1, 3, 4, 9, 6], [True, False, True, False, True]):
        layer = make_layer(weights, n, k, block, dtype, seed=n + m, double_quant=double_quant)
        x = (torch.randn(m, k) * 2).to(dtype)
        with ops.record_dispatch() as served:
            y = layer(x)
        assert served == [served_name(weights, block, k)]
        reference = Q8Activations().reference_linear(x, layer.weight_record(), layer.bias, dtype)
        assert y.dtype == reference.dtype == dtype
        scale = reference.double().abs().max()
        if dtype == torch.float32:
            assert (y.double() - reference.double()).abs().max() <= 1e-5 * scale, (n, k, m)
        else:  # both rounded to bfloat16 from float32 sums that differ by float32 rounding: one bfloat16 step at most
            assert ((y.double() - reference.double()).abs() <= reference.double().abs() * 2**-7 + 1e-5 * scale).all()


@needs_avx2
@pytest.mark.parametrize("weights", FORMATS)
def test_the_mode_costs_little_next_to_the_weights_own_rounding(weights):
    """On Gaussian activations and weights, q8_0's departure from the 16-bit-activation product is at most a fifth
    of the 4-bit (or 2-bit) weight's own departure from the float product."""
    torch.manual_seed(3)
    linear = torch.nn.Linear(1024, 256, bias=False)
    x = torch.randn(8, 1024)
    exact = x.double() @ linear.weight.double().T
    settings = {"double_quant": True} if weights in ("nf4", "fp4") else {}
    sixteen = LowBitLinear.from_float(linear, QuantScheme(weights, 64, activations=None, **settings), torch.float32)
    q8 = LowBitLinear.from_float(linear, QuantScheme(weights, 64, activations="q8_0", **settings), torch.float32)
    weight_error = (sixteen(x).double() - exact).norm()
    mode_error = (q8(x).double() - sixteen(x).double()).norm()
    assert mode_error < 0.2 * weight_error, (float(mode_error), float(weight_error))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_nan_activation_gives_nan_not_a_number(backend, monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, backend)
    layer = make_layer("nf4", 16, 128, 64, torch.float32, seed=4)
    x = torch.randn(2, 128)
    x[1, 70] = float("nan")
    y = layer(x)
    assert y[0].isfinite().all() and y[1].isnan().all()


def test_the_mode_is_a_setting_of_the_4_bit_and_2_bit_formats_only():
    for weights in FORMATS:
        config = LowBitConfig(weights=weights, activations="q8_0")
        assert config.to_dict()["activations"] == "q8_0" and config.scheme.activations == "q8_0"
    with pytest.raises(ValueError, match="activations"):
        LowBitConfig(weights="int8", activations="q8_0")


def test_a_model_loads_saves_and_reloads_with_q8_0_activations(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "float")
    ids = torch.randint(0, 128, (1, 12))
    models = {mode: AutoModelForCausalLM.from_pretrained(tmp_path / "float", dtype=torch.float32,
                                                         quantization_config=LowBitConfig(weights="nf4", activations=mode,
                                                                                          compute_dtype="float32"))
              for mode in (None, "q8_0")}  # fmt: skip
    layer = models["q8_0"].model.layers[0].mlp.down_proj
    assert isinstance(layer, LowBitLinear) and isinstance(layer.activations, Q8Activations)
    with torch.no_grad():
        logits = {mode: model(ids).logits for mode, model in models.items()}
    assert not torch.equal(logits["q8_0"], logits[None])  # the activations were rounded
    assert torch.allclose(logits["q8_0"], logits[None], atol=0.05 * logits[None].abs().max())
    models["q8_0"].save_pretrained(tmp_path / "q8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q8", dtype=torch.float32)
    assert reloaded.config.quantization_config.activations == "q8_0"
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits["q8_0"])
