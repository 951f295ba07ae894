"""The generic dequantize-in-registers Triton kernel (kernels/dequant_matmul.py) on the integer weight-only formats
(int4, int3, int2: affine groups; int8 with 16-bit activations) and fp8 (e4m3fn with a scale per row, e5m2 with one
per group), against the reference and the tests' own oracle.

On CPU they run through Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py) at small shapes; on a GPU the
same tests also run at real shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.formats import QuantScheme
from quantizer_plugin.ops import KERNELS_ENV

import oracles

kernels = pytest.importorskip("quantizer_plugin.kernels.dequant_matmul", reason="triton is not installed")

TOLERANCES = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
# (N, K, group): neither N nor K a multiple of the tiles; K = 100 and K = 75 not a multiple of the group (a short
# last group per row; K = 75 leaves a row's last byte partly unused), K = 192 one.
SHAPES = {"cpu": [(37, 100, 64), (45, 192, 64), (29, 75, 16)],
          "cuda": [(37, 100, 64), (45, 192, 64), (29, 75, 16), (1000, 1030, 128), (4096, 4096, 64)]}  # fmt: skip
SCHEMES = {
    "int4": lambda group: QuantScheme("int4", block_size=group),
    "int3": lambda group: QuantScheme("int3", block_size=group),
    "int2": lambda group: QuantScheme("int2", block_size=group),
    "int8-weight-only": lambda group: QuantScheme("int8", activations=None),
    "fp8": lambda group: QuantScheme("fp8"),
    "fp8_e5m2": lambda group: QuantScheme("fp8_e5m2", block_size=group),
}
FAMILY = {"int4": "affine", "int3": "affine", "int2": "affine", "int8-weight-only": "int8_weight_only",
          "fp8": "float8", "fp8_e5m2": "float8"}  # fmt: skip


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv(KERNELS_ENV, "triton")


def make_layer(name, n, k, group, dtype, device, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(k, n, bias=bias, device=device)
    return LowBitLinear.from_float(linear, SCHEMES[name](group), compute_dtype=dtype)


def exact_linear(x, layer):
    y = x.double() @ oracles.weight_of(layer).double().to(x.device).T
    return y if layer.bias is None else y + layer.bias.double()


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 33])
def test_forward_matches_the_reference(device, name, dtype, m):
    for n, k, group in SHAPES[device]:
        layer = make_layer(name, n, k, group, dtype, device, seed=m)
        x = torch.randn(m, k, device=device, dtype=dtype)
        with ops.record_dispatch() as served:
            y = layer(x)
        regime = "decode" if m <= kernels.DECODE_MAX_M else "prefill"
        assert served == [f"triton.{FAMILY[name]}.{regime}"]
        reference = layer.fmt.reference_linear(
            x, layer.quantized_tensors(), layer.bias, n, k, layer.scheme, layer.compute_dtype
        )
        exact = exact_linear(x, layer)
        scale = exact.abs().max().item()
        kernel_error = (y.double() - exact).abs().max().item()
        reference_error = (reference.double() - exact).abs().max().item()
        assert y.dtype == dtype and y.shape == (m, n)
        assert kernel_error <= TOLERANCES[dtype] * scale, (n, k, kernel_error, scale)
        assert kernel_error <= 2 * reference_error + TOLERANCES[dtype] * scale / 4, (n, k, kernel_error, reference_error)


@pytest.mark.parametrize("name", ["int4", "int3", "int2", "fp8", "fp8_e5m2"])
def test_backward_through_the_frozen_weight_matches_the_oracle(device, name):
    n, k, group = SHAPES[device][0]
    layer = make_layer(name, n, k, group, torch.bfloat16, device)
    x = torch.randn(2, 5, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(2, 5, n, device=device, dtype=torch.bfloat16)
    with ops.record_dispatch() as served:
        layer(x).backward(grad_y)
    assert served == [f"triton.{FAMILY[name]}.decode", f"triton.{FAMILY[name]}.grad_input"]
    exact = grad_y.double() @ oracles.weight_of(layer).double().to(device)
    assert (x.grad.double() - exact).abs().max().item() <= TOLERANCES[torch.bfloat16] * exact.abs().max().item()


# (group, K, BLOCK_K): whole groups (whole-byte loads): several per K tile, a K tile inside one group, K not a
# multiple of the tile; short last groups and odd K (per-element loads).
LAYOUTS = [(16, 96, 64), (128, 256, 32), (16, 80, 64), (64, 100, 32), (32, 75, 16), (64, 200, 64)]


@pytest.mark.parametrize("group, k, block_k", LAYOUTS, ids=[f"group{g}-K{k}-tileK{t}" for g, k, t in LAYOUTS])
@pytest.mark.parametrize("name", SCHEMES)
def test_every_tile_layout_dequantizes_exactly(name, group, k, block_k):
    # With x = I in float32, y = I @ W.T reads back each dequantized weight through one exact product.
    n = 19
    layer = make_layer(name, n, k, group, torch.float32, "cpu", bias=False)
    expected = oracles.weight_of(layer)
    config = dict(BLOCK_M=64, BLOCK_N=16, BLOCK_K=block_k, GROUP_M=4)
    y = kernels.dequant_matmul(torch.eye(k), layer.weight_record(), config=config)
    assert torch.equal(y.T, expected)
    grad_x = kernels.dequant_matmul_grad_input(torch.eye(n), layer.weight_record(), config=config)
    assert torch.equal(grad_x, expected)


def test_the_launcher_names_a_stored_tensor_of_the_wrong_dtype():
    layer = make_layer("int4", 8, 64, 64, torch.float16, "cpu")
    weight = dataclasses.replace(layer.weight_record(), zero=layer.weight_zero.float())
    with pytest.raises(ValueError, match="'zero' is .* torch.float32"):
        kernels.dequant_matmul(torch.randn(2, 64, dtype=torch.float16), weight)
