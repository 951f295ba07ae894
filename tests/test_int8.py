"""LLM.int8: agreement with bitsandbytes' Linear8bitLt on inputs with planted outlier columns, for the reference
and for the CPU backend's native kernel (every backend computes LLM.int8; the Triton kernels are checked against
the reference in tests/test_kernels_int8.py).
"""

from __future__ import annotations

import pytest
import torch

from quantizer_plugin import LowBitLinear
from quantizer_plugin.cpu import native
from quantizer_plugin.formats import QuantScheme
from quantizer_plugin.formats.int8 import quantize_activations
from quantizer_plugin.ops import KERNELS_ENV

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True, params=["torch", "cpu"])
def backend(request, monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, request.param)
    return request.param

SHAPES = [(16, 256, 128), (1, 96, 33), (33, 200, 72)]  # (M, K, N)


def planted_outlier_inputs(m: int, k: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    columns = torch.randperm(k, generator=generator)[:3].tolist()
    x[:, columns] *= 25.0  # |x| well above the threshold of 6 in those columns
    return x.half(), columns


def float32_reference(x, linear):
    return torch.nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())


def ours(linear, threshold):
    scheme = QuantScheme("int8", outlier_threshold=threshold)
    return LowBitLinear.from_float(linear, scheme, compute_dtype=torch.float16)


def bitsandbytes_layer(linear, threshold):
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=True, has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu").eval()


def mean_abs_error(y, reference):
    return (y.float() - reference).abs().mean().item()


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_error_no_worse_than_bitsandbytes(m, k, n):
    torch.manual_seed(k)
    linear = torch.nn.Linear(k, n).half()
    x, _ = planted_outlier_inputs(m, k, seed=m + k)
    reference = float32_reference(x, linear)
    with torch.no_grad():
        ours_error = mean_abs_error(ours(linear, 6.0)(x), reference)
        bnb_error = mean_abs_error(bitsandbytes_layer(linear, 6.0)(x), reference)
    assert ours_error <= bnb_error * 1.02 + 1e-6, (ours_error, bnb_error)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_agrees_with_bitsandbytes(m, k, n):
    torch.manual_seed(k)
    linear = torch.nn.Linear(k, n).half()
    x, _ = planted_outlier_inputs(m, k, seed=2 * m + k)
    with torch.no_grad():
        y_ours = ours(linear, 6.0)(x).float()
        y_bnb = bitsandbytes_layer(linear, 6.0)(x).float()
    scale = float32_reference(x, linear).abs().mean()
    assert (y_ours - y_bnb).abs().mean() < 0.01 * scale


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_activation_codes_and_scales_equal_bitsandbytes(backend, m, k, n):
    x, planted = planted_outlier_inputs(m, k, seed=3 * m + k)
    quantize = native.load().quantize_activations_int8 if backend == "cpu" else quantize_activations
    codes, absmax, outliers = quantize(x, 6.0)
    columns = torch.nonzero(outliers).flatten()
    bnb_codes, bnb_absmax, bnb_columns = bnb.functional.int8_vectorwise_quant(x.clone(), threshold=6.0)
    assert sorted(columns.tolist()) == sorted(planted)
    assert torch.equal(columns, bnb_columns)
    assert torch.equal(absmax, bnb_absmax)
    assert torch.equal(codes, bnb_codes)
    if m > 1:
        # The entries below the threshold in an outlier column count towards the row absmax, as in bitsandbytes:
        # here some of them are the largest in their row, so leaving out whole columns would give other scales.
        columns_out = x.float().index_fill(1, columns, 0.0).abs().amax(dim=1)
        assert not torch.equal(columns_out, absmax)


def test_outlier_decomposition_helps():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).half()
    x, _ = planted_outlier_inputs(16, 256, seed=7)
    reference = float32_reference(x, linear)
    with torch.no_grad():
        with_decomposition = mean_abs_error(ours(linear, 6.0)(x), reference)
        without = mean_abs_error(ours(linear, 0.0)(x), reference)
    assert with_decomposition < 0.5 * without, (with_decomposition, without)


def test_int8_weights_are_rowwise_absmax():
    linear = torch.nn.Linear(64, 8)
    layer = ours(linear, 6.0)
    assert layer.weight.dtype == torch.int8
    assert torch.equal(layer.weight_scale, linear.weight.detach().abs().amax(dim=1))
    assert layer.weight.abs().amax(dim=1).eq(127).all()  # every row's absmax maps to 127
