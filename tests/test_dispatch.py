"""The dispatch seam: reference path everywhere, the environment override, and the frozen-weight backward."""

from __future__ import annotations

import pytest
import torch

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.formats import QuantScheme
from quantizer_plugin.ops import KERNELS_ENV, select_backend

import oracles

SCHEMES = [QuantScheme("nf4", 64, True), QuantScheme("fp4", 32, False), QuantScheme("int8", outlier_threshold=6.0),
           QuantScheme("int8", activations=None)]  # fmt: skip
SCHEME_IDS = ["nf4", "fp4", "int8", "int8-weight-only"]
TOLERANCES = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative to the output's scale


def test_each_device_takes_its_backend_unless_one_is_forced(monkeypatch):
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    assert {select_backend(name, torch.device("cpu")) for name in ("nf4", "fp4", "int8")} == {"cpu"}
    assert select_backend("nf4", torch.device("meta")) == "torch"
    monkeypatch.setenv(KERNELS_ENV, "torch")
    assert select_backend("nf4", torch.device("cpu")) == "torch"
    assert select_backend("int8", torch.device("cuda")) == "torch"
    monkeypatch.setenv(KERNELS_ENV, "cpu")
    with pytest.raises(RuntimeError, match="the cpu backend runs on CPU tensors only"):
        select_backend("nf4", torch.device("cuda"))


def test_environment_override_is_validated(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "cublas")
    with pytest.raises(ValueError, match=f"{KERNELS_ENV}='cublas' is not a backend"):
        select_backend("nf4", torch.device("cpu"))


def test_forcing_a_backend_without_a_kernel_for_the_format_fails_clearly(monkeypatch):
    from quantizer_plugin import ops

    monkeypatch.setenv(KERNELS_ENV, "triton")
    ops.load_kernels("triton")  # registers whatever kernels exist, so that the removal below sticks
    monkeypatch.delitem(ops._FORWARD, ("rowscaled8", "int8", "triton"), raising=False)
    with pytest.raises(RuntimeError, match="no triton kernel is available for format 'int8'"):
        select_backend("int8", torch.device("cpu"))


# (device, "reference" or the device's own backend) -> the implementation that must serve a forward, as its prefix
SERVED = {
    ("cpu", "reference"): "torch.reference_forward",
    ("cpu", "default"): "cpu.",
    ("cuda", "reference"): "torch.reference_forward",
    ("cuda", "default"): "triton.",
}


def planted_input(m: int, k: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """Gaussian activations with two outlier columns (|x| up to 40), so that LLM.int8 decomposes."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    x[:, [7, k - 2]] *= 10.0
    x[0, 7] = 40.0
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", ["reference", "default"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 33])
def test_forward_matches_an_independent_oracle(device, monkeypatch, backend, scheme, dtype, m):
    if backend == "reference":
        monkeypatch.setenv(KERNELS_ENV, "torch")
    else:
        monkeypatch.delenv(KERNELS_ENV, raising=False)
    linear = torch.nn.Linear(100, 37, bias=True).to(device)  # K, N not multiples of any tile or block
    layer = LowBitLinear.from_float(linear, scheme, compute_dtype=dtype)
    x = planted_input(m, 100, dtype, device, seed=m)
    bias = linear.bias.detach().double().cpu()
    if scheme.weights == "int8" and scheme.activations == "int8":  # LLM.int8 on every backend
        stored = layer.quantized_tensors()
        expected = oracles.llm_int8_linear(x, stored["weight"], stored["weight_scale"], scheme.outlier_threshold)
        expected = expected + bias
    else:
        expected = x.double().cpu() @ oracles.weight_of(layer).double().T + bias
    with ops.record_dispatch() as served:
        y = layer(x)
    assert len(served) == 1 and served[0].startswith(SERVED[device, backend]), served
    assert y.dtype == dtype and y.shape == (m, 37)
    # one rounding of the weight and the output to the compute dtype
    tolerance = TOLERANCES[dtype]
    assert (y.double().cpu() - expected).abs().max() <= tolerance * expected.abs().max() + 1e-6


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_IDS)
def test_backward_reaches_the_input_through_the_frozen_weight(device, monkeypatch, scheme):
    monkeypatch.setenv(KERNELS_ENV, "torch")
    linear = torch.nn.Linear(64, 24).to(device)
    layer = LowBitLinear.from_float(linear, scheme, compute_dtype=torch.float32)
    x = torch.randn(2, 5, 64, device=device, requires_grad=True)
    grad_y = torch.randn(2, 5, 24, device=device)
    with ops.record_dispatch() as served:
        layer(x).backward(grad_y)
    assert served == ["torch.reference_forward", "torch.reference_backward"]
    expected = grad_y.cpu() @ oracles.weight_of(layer)
    torch.testing.assert_close(x.grad.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None for p in layer.parameters())


def test_input_feature_mismatch_is_reported():
    layer = LowBitLinear.from_float(torch.nn.Linear(64, 8), SCHEMES[0])
    with pytest.raises(ValueError, match="input has 63 features, the layer expects 64"):
        layer(torch.randn(2, 63))

