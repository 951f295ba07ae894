"""Static activations (W8A8: activations="int8_static" on int8 weights, "fp8_static" on fp8 weights), their
calibration (quantizer_plugin.calibrate, Calibration, LowBitConfig(dataset=...)) and SmoothQuant.

The oracle is the product written out here from its definition: x's codes on the layer's grid, round(x / step)
clamped to +-127 for int8, x / step rounded to float8 e4m3fn (torch's own conversion) clamped to +-448 for fp8, times
the weight the stored tensors stand for (oracles.weight_of), times the step, summed in float64."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import quantizer_plugin
from quantizer_plugin import Calibration, LowBitConfig, LowBitLinear, UncalibratedLayerError, ops
from quantizer_plugin.formats import QuantScheme
from quantizer_plugin.ops import KERNELS_ENV

import oracles
from conftest import tiny_llama_config
from cpu_caps import llm_int8_kernel
from test_cpu_float8 import expected_kernel

MODES = {"int8_static": ("int8", 127.0), "fp8_static": ("fp8", 448.0)}
# (N, K): K not a multiple of the VNNI step (64), of the tiles' (64), nor of 16
SHAPES = [(37, 100), (48, 128), (29, 75)]


def static_layer(mode: str, n: int, k: int, seed: int = 0, smoothing: bool = False) -> LowBitLinear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    weights, largest = MODES[mode]
    scheme = QuantScheme(weights, activations=mode, smoothing_alpha=0.5 if smoothing else None)
    layer = LowBitLinear.from_float(linear, scheme)
    layer.input_scale.data.fill_(3.0 / largest)  # the grid covers |x| <= 3; larger inputs saturate
    if smoothing:
        layer.input_smoothing.data.copy_(torch.rand(k) + 0.5)
    return layer


def written_out(x: torch.Tensor, layer: LowBitLinear) -> torch.Tensor:
    """The static product from its definition, in float64."""
    step = layer.input_scale.double()
    x = x.double()
    if layer.scheme.smoothing_alpha is not None:
        x = x * layer.input_smoothing.double()
    if layer.scheme.activations == "int8_static":
        grid = torch.clamp(torch.round(x / step), -127, 127)
    else:
        grid = torch.clamp(x / step, -448, 448).float().to(torch.float8_e4m3fn).double()
    y = (grid @ oracles.weight_of(layer).double().T) * step
    return y + layer.bias.double()


BACKEND_ROWS = [(backend, m) for backend in ("torch", "cpu") for m in (1, 5, 16, 40, 130)] + [
    ("triton", m) for m in (1, 40)]  # Triton through its interpreter (conftest.py): a decode and a prefill launch


@pytest.mark.parametrize("backend, m", BACKEND_ROWS)
@pytest.mark.parametrize("mode", MODES)
def test_static_layer_computes_the_written_out_product(monkeypatch, backend, mode, m):
    if backend == "triton":
        pytest.importorskip("quantizer_plugin.kernels.dequant_matmul", reason="triton is not installed")
    monkeypatch.setenv(KERNELS_ENV, backend)
    for index, (n, k) in enumerate(SHAPES):
        layer = static_layer(mode, n, k, seed=index, smoothing=index == 2)
        x = torch.randn(m, k, dtype=torch.bfloat16) * 1.5  # a few entries beyond the grid's 3: they saturate
        with ops.record_dispatch() as served:
            y = layer(x)
        expected = written_out(x, layer)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        error = (y.double() - expected).abs().max().item()
        # bfloat16 output rounding, and (fp8 on the tiles) the weight decoded to bfloat16
        assert error <= 1.6e-2 * expected.abs().max().item(), (mode, m, n, k, error)
        if backend == "cpu":  # the kernel this CPU's flags and the shape choose (cpu_caps, not the entry point)
            if mode == "int8_static":
                kernel = llm_int8_kernel(m, k).replace("llm_int8", "static_int8")
            else:
                kernel = f"cpu.float8.{expected_kernel(m, k, None, torch.bfloat16)}"
            assert served == [kernel], (m, k, served)
        elif backend == "triton":  # the generic kernel on the grid values
            from quantizer_plugin.kernels.dequant_matmul import DECODE_MAX_M

            family = "int8_weight_only" if mode == "int8_static" else "float8"
            assert served == [f"triton.{family}.{'decode' if m <= DECODE_MAX_M else 'prefill'}"], served
        else:
            assert served == ["torch.reference_forward"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("mode", MODES)
def test_a_nan_activation_gives_nan_outputs_not_numbers(monkeypatch, backend, mode):
    monkeypatch.setenv(KERNELS_ENV, backend)
    layer = static_layer(mode, 37, 128)
    for m in (1, 20):
        x = torch.randn(m, 128, dtype=torch.bfloat16)
        x[0, 7] = float("nan")
        y = layer(x).float()
        assert torch.isnan(y[0]).all() and torch.isfinite(y[1:]).all(), (mode, m)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A tiny random Llama (float32) whose second hidden channel is an outlier: its norms' weight there is 30x."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=128, intermediate_size=192))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[1] = 30.0
            layer.post_attention_layernorm.weight[1] = 30.0
    path = tmp_path_factory.mktemp("static") / "model"
    model.save_pretrained(path)
    return path


def calibration_ids():
    return torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(5))


def load(path, **settings):
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=LowBitConfig(**settings))


def test_an_uncalibrated_layer_is_an_error_naming_it_and_calibrate_fixes_it(llama_path):
    model = load(llama_path, weights="int8", activations="int8_static")
    ids = calibration_ids()
    with pytest.raises(UncalibratedLayerError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        model(ids)
    summary = quantizer_plugin.calibrate(model, ids, samples=8, length=32)
    assert summary["layers"] == 14
    loaded = load(llama_path, weights="int8", activations="int8_static", dataset=ids, calibration_samples=8,
                  calibration_length=32)  # fmt: skip
    assert torch.equal(model(ids).logits, loaded(ids).logits)  # the same calibration, the two ways in


def test_calibration_that_sees_no_data_or_nan_writes_nothing(llama_path):
    model = load(llama_path, weights="fp8", activations="fp8_static")
    with pytest.raises(ValueError, match="saw no data"):
        with Calibration(model):
            pass
    q_proj = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: the calibration activations hold NaN"):
        with Calibration(model):
            q_proj(torch.full((2, 128), float("nan")))
    assert all(torch.isnan(m.input_scale).all() for m in model.modules() if isinstance(m, LowBitLinear))
    with pytest.raises(ValueError, match="dataset is None"):
        quantizer_plugin.calibrate(model, None)
    with pytest.raises(ValueError, match="no layer with static activations"):
        Calibration(load(llama_path, weights="int8", activations=None))


def test_static_settings_are_checked_by_name():
    with pytest.raises(ValueError, match=r"LowBitConfig\.activations: weights='nf4'"):
        LowBitConfig(weights="nf4", activations="int8_static")
    with pytest.raises(ValueError, match=r"LowBitConfig\.activations: weights='fp8'"):
        LowBitConfig(weights="fp8", activations="int8_static")
    with pytest.raises(ValueError, match=r"LowBitConfig\.smoothing_alpha must be a number from 0 to 1"):
        LowBitConfig(weights="int8", activations="int8_static", smoothing_alpha=1.5)
    with pytest.raises(ValueError, match=r"LowBitConfig\.smoothing_alpha does not apply"):
        LowBitConfig(weights="int8", activations="int8", smoothing_alpha=0.5)
    with pytest.raises(ValueError, match=r"LowBitConfig\.dataset is given but nothing calibrates"):
        LowBitConfig(weights="int8", activations="int8", dataset="pydoc", tokenizer="gpt2")
    with pytest.raises(ValueError, match=r"LowBitConfig\.tokenizer"):
        LowBitConfig(weights="int8", activations="int8_static", dataset="pydoc")
    with pytest.raises(ValueError, match=r"LowBitConfig\.smoothing_alpha: SmoothQuant rescales"):
        LowBitConfig(weights="int8", activations="int8_static", method="gptq", dataset="pydoc", tokenizer="gpt2")
    assert LowBitConfig(weights="int8", activations="int8_static").smoothing_alpha == 0.5
    assert LowBitConfig(weights="int8", activations="int8_static", smoothing_alpha=None).smoothing_alpha is None
    assert LowBitConfig(weights="fp8", activations="fp8_static").smoothing_alpha is None


@pytest.mark.parametrize("settings", [dict(weights="int8", activations="int8_static"),
                                      dict(weights="fp8", activations="fp8_static", smoothing_alpha=0.5)],
                         ids=["int8", "fp8-smoothed"])  # fmt: skip
def test_input_scales_and_smoothing_save_and_reload(llama_path, tmp_path, settings):
    ids = calibration_ids()
    model = load(llama_path, **settings, dataset=ids, calibration_samples=8, calibration_length=32)
    model.save_pretrained(tmp_path / "saved")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
    layers = {n: m for n, m in reloaded.named_modules() if isinstance(m, LowBitLinear)}
    assert all(bool(torch.isfinite(m.input_scale).all()) for m in layers.values())
    assert reloaded.config.quantization_config.smoothing_alpha == settings.get("smoothing_alpha", 0.5)
    assert torch.equal(model(ids).logits, reloaded(ids).logits.to(torch.float32))
    with pytest.raises(ValueError, match="smoothing_alpha"):
        LlamaForCausalLM.from_pretrained(tmp_path / "saved", quantization_config=LowBitConfig(**settings | {"smoothing_alpha": 0.8}))


def layer_inputs(model, ids) -> dict[str, torch.Tensor]:
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda module, args, name=name: inputs.setdefault(name, args[0]))
             for name, m in model.named_modules() if isinstance(m, LowBitLinear)]  # fmt: skip
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return inputs


def test_smoothquant_moves_the_outlier_channel_into_the_weights_and_keeps_each_product(llama_path):
    """Each smoothed layer's product, in full precision, is the unsmoothed one's on the same input: x / s (folded into
    the norm before q/k/v and gate/up; o and down multiply their input by input_smoothing = 1 / s) times W * s. The
    outlier channel then no longer sets the int8 grid, and the W8A8 model lands closer to the 16-bit one."""
    ids = calibration_ids()
    plain = load(llama_path, weights="int8", activations="int8_static", smoothing_alpha=None, dataset=ids,
                 calibration_samples=8, calibration_length=32)  # fmt: skip
    smooth = load(llama_path, weights="int8", activations="int8_static", dataset=ids, calibration_samples=8,
                  calibration_length=32)  # fmt: skip
    inputs = layer_inputs(smooth, ids)
    for name, layer in ((n, m) for n, m in smooth.named_modules() if isinstance(m, LowBitLinear)):
        block, _, projection = name.rpartition(".")
        x = inputs[name].reshape(-1, layer.in_features)
        if projection in ("o_proj", "down_proj"):  # no norm before them: the factors are the layer's own
            assert not torch.equal(layer.input_smoothing, torch.ones_like(layer.input_smoothing)), name
            x_original, x_smoothed = x, x * layer.input_smoothing
        else:  # the norm's output was divided by s: x times s is what the unsmoothed model's layer is handed
            norm = "input_layernorm" if projection in ("q_proj", "k_proj", "v_proj") else "post_attention_layernorm"
            norm = f"{block.rpartition('.')[0]}.{norm}"
            s = plain.get_submodule(norm).weight.detach() / smooth.get_submodule(norm).weight.detach()
            assert torch.equal(layer.input_smoothing, torch.ones_like(layer.input_smoothing)), name
            assert float(s[1]) > 3, name  # the outlier channel moved into the weights
            x_original, x_smoothed = x * s, x
        y_smoothed = x_smoothed @ oracles.weight_of(layer).T
        y_original = x_original @ oracles.weight_of(plain.get_submodule(name)).T
        assert torch.allclose(y_smoothed, y_original, rtol=0.02, atol=0.02 * float(y_original.abs().max())), name
    q_proj = "model.layers.0.self_attn.q_proj"
    assert float(smooth.get_submodule(q_proj).input_scale) < float(plain.get_submodule(q_proj).input_scale) / 3
    reference = load(llama_path, weights="int8", activations=None)(ids).logits
    error = {name: (m(ids).logits - reference).abs().mean().item() for name, m in (("plain", plain), ("smooth", smooth))}
    assert error["smooth"] < error["plain"] / 2, error


@pytest.mark.parametrize("mode", MODES)
def test_a_static_layer_compiles_whole_to_its_eager_outputs(monkeypatch, mode):
    """torch.compile(fullgraph=True): the input_scale reaches the kernels as a tensor (no graph break, no
    recompilation when a calibration changes it)."""
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    torch._dynamo.reset()
    layer = static_layer(mode, 72, 256, smoothing=True)
    compiled = torch.compile(layer, fullgraph=True)
    for m in (1, 16):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert torch.equal(compiled(x), layer(x)), (mode, m)
    layer.input_scale.data.mul_(2)  # a new calibration: the compiled graph reads the tensor
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    assert torch.equal(compiled(x), layer(x))


def test_gptq_then_static_activations_calibrate_in_one_load(llama_path, tmp_path):
    """method="gptq" rounds the weights with the layers running in 16 bits, then the same data calibrates the
    activations; the checkpoint's metadata records both."""
    import json

    import safetensors

    ids = calibration_ids()
    model = load(llama_path, weights="int8", activations="int8_static", smoothing_alpha=None, method="gptq",
                 dataset=ids, calibration_samples=8, calibration_length=32)  # fmt: skip
    layers = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    assert len(layers) == 14 and all(bool(torch.isfinite(m.input_scale).all()) for m in layers)
    model.save_pretrained(tmp_path / "out")
    with safetensors.safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["quantizer_plugin.calibration"])
    assert (record["method"], record["blocks"], record["activations"], record["activation_layers"]) == (
        "gptq", 2, "int8_static", 14)


def test_calibrating_again_keeps_the_product(llama_path):
    """A second calibration (say on other data) smooths on top of the first: each layer's full-precision product on
    its input stays the unsmoothed model's."""
    ids = calibration_ids()
    once = load(llama_path, weights="int8", activations="int8_static", dataset=ids, calibration_samples=8,
                calibration_length=32)  # fmt: skip
    twice = load(llama_path, weights="int8", activations="int8_static", dataset=ids, calibration_samples=8,
                 calibration_length=32)  # fmt: skip
    quantizer_plugin.calibrate(twice, ids.flip(0), samples=8, length=32)
    name = "model.layers.1.mlp.down_proj"  # no norm before it: its factors accumulate in input_smoothing
    x = torch.randn(5, once.get_submodule(name).in_features)
    products = [(x * m.get_submodule(name).input_smoothing) @ oracles.weight_of(m.get_submodule(name)).T
                for m in (once, twice)]  # fmt: skip
    assert torch.allclose(products[0], products[1], rtol=0.03, atol=0.03 * float(products[0].abs().max()))
