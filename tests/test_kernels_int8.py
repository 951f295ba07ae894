"""LLM.int8 Triton kernels against the plain-torch reference (quantizer_plugin.formats.int8), on fresh random inputs.

On CPU the kernels run on Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before anything imports
them) at small odd shapes that still span several tiles; on CUDA the same tests run at larger shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.formats import QuantScheme
from quantizer_plugin.formats.int8 import INT8, quantize_rows
from quantizer_plugin.formats.int8 import quantize_activations as reference_activations
from quantizer_plugin.kernels.int8_activation import quantize_activations
from quantizer_plugin.kernels.int8_backward import int8_grad_input
from quantizer_plugin.kernels.interpreter import INTERPRETED
from quantizer_plugin.kernels.int8_matmul import STREAMING_LIMIT_M, int8_linear

import oracles

if not torch.cuda.is_available() and not INTERPRETED:
    raise RuntimeError("no GPU and the Triton kernels were not built for the interpreter: TRITON_INTERPRET=1 must be "
                       "set before quantizer_plugin.kernels is first imported (tests/conftest.py does it)")  # fmt: skip

# (N, K) = (out_features, in_features): odd, and not multiples of any tile (interpreter tiles are 16 x 16 x 32).
SHAPES = {"cpu": (37, 75), "cuda": (1031, 2053)}
ROWS = {"cpu": [1, 3, 16, 33], "cuda": [1, 3, 16, 33, 257, 1029]}
# Max error allowed relative to the output's scale (max |reference|): a couple of roundings in the compute dtype.
# The int8 x int8 part is exact on both sides, so float32 pins the activation codes too.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
THRESHOLD = 6.0
# (threshold, planted outlier columns): none, a few (including the first and last column), many.
CASES = {"off": (0.0, "few"), "none": (THRESHOLD, "none"), "few": (THRESHOLD, "few"), "many": (THRESHOLD, "many")}


def planted_input(m: int, k: int, outliers: str, dtype: torch.dtype, device: str, seed: int):
    """x (m, k) with |x| < 4 except in the planted columns, each holding at least one |x| >= THRESHOLD."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).clamp(-4.0, 4.0)
    if outliers == "none":
        columns = torch.empty(0, dtype=torch.long)
    elif outliers == "few":
        columns = torch.tensor([0, k - 1, int(torch.randint(1, k - 1, (1,), generator=generator))])
    else:
        columns = torch.randperm(k, generator=generator)[: k // 4]
    rows = torch.randint(0, m, (len(columns),), generator=generator)
    x[:, columns] *= 3.0
    magnitudes = THRESHOLD + 30.0 * torch.rand(len(columns), generator=generator)
    if len(columns):
        magnitudes[0] = THRESHOLD  # exactly at the threshold: an outlier (the test is |x| >= threshold)
    x[rows, columns] = magnitudes * torch.where(torch.rand(len(columns), generator=generator) < 0.5, -1.0, 1.0)
    return x.to(device=device, dtype=dtype), columns.sort().values


def quantized_weight(n: int, k: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) / k**0.5
    return {name: t.to(device) for name, t in INT8.quantize(weight, QuantScheme("int8")).items()}


def reference(x, tensors, bias, threshold, dtype):
    n, k = tensors["weight"].shape
    scheme = QuantScheme("int8", outlier_threshold=threshold)
    return INT8.reference_linear(x, tensors, bias, n, k, scheme, dtype)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    scale = expected.float().abs().max().clamp(min=1e-6)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= TOLERANCE[dtype], f"{what}: max error {error:.3g} of the output scale, allowed {TOLERANCE[dtype]}"


@pytest.mark.parametrize("case", ["off", "none", "few", "many"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 3, 33])
def test_activation_codes_equal_the_reference(device, m, dtype, case):
    threshold, outliers = CASES[case]
    k = SHAPES[device][1]
    x, planted = planted_input(m, k, outliers, dtype, device, seed=m + k)
    codes, absmax, flags = quantize_activations(x, threshold)

    expected_codes, expected_absmax, expected_outliers = reference_activations(x, threshold)
    expected_columns = torch.nonzero(expected_outliers).flatten()
    if threshold > 0:
        assert torch.equal(expected_columns.cpu(), planted)  # the planting did what it says
        assert torch.equal(torch.nonzero(flags).flatten(), expected_columns)
    else:
        assert flags is None
    assert torch.equal(absmax, expected_absmax)
    # In the flagged columns the one-pass kernel leaves the codes of the entries below the threshold (the matmul
    # cancels them); zeroed, they are the reference's codes, and everywhere else they are equal as they are.
    assert torch.equal(codes.index_fill(1, expected_columns, 0), expected_codes)
    below = x.float().masked_fill(x.float().abs() >= threshold, 0.0) if threshold > 0 else x.float()
    assert torch.equal(codes, quantize_rows(below)[0])


def tie_input(m: int, k: int, device: str) -> torch.Tensor:
    """Rows whose absmax 127/32 makes the int8 scale exactly 32, and whose other entries are odd multiples of
    1/64 (of both signs): every one of them scales to an exact .5, where the rounding mode decides."""
    odd = 2 * (torch.arange(m * k).reshape(m, k) % 120) + 1
    x = odd / 64.0 * torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
    x[:, 0] = 127 / 32
    return x.to(device)


def test_ties_round_half_to_even_like_torch(device):
    x = tie_input(3, SHAPES[device][1], device)
    codes, _, _ = quantize_activations(x, THRESHOLD)
    assert torch.equal(codes[:, 1:] % 2, torch.zeros_like(codes[:, 1:]))
    assert torch.equal(codes, quantize_rows(x)[0])


@pytest.mark.parametrize("path", ["streaming", "tiled"])
def test_ties_round_half_to_even_inside_the_matmul(device, path):
    """With W = I the float32 output is each code times its row's scale, so a code off by one shows."""
    k = SHAPES[device][1]
    tensors = {name: t.to(device) for name, t in INT8.quantize(torch.eye(k), QuantScheme("int8")).items()}
    x = tie_input(3, k, device)
    y = int8_linear(x, tensors["weight"], tensors["weight_scale"], None, THRESHOLD, path=path)
    assert_close_to_scale(y, reference(x, tensors, None, THRESHOLD, torch.float32), torch.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("case", ["off", "none", "few", "many"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", ["streaming", "tiled"])
def test_forward_matches_the_reference(device, path, dtype, case, bias):
    threshold, outliers = CASES[case]
    n, k = SHAPES[device]
    tensors = quantized_weight(n, k, device, seed=n)
    bias_tensor = torch.randn(n, generator=torch.Generator().manual_seed(k)).to(device) if bias else None
    for m in ROWS[device]:
        if path == "streaming" and m > STREAMING_LIMIT_M:
            continue
        x, _ = planted_input(m, k, outliers, dtype, device, seed=m)
        y = int8_linear(x, tensors["weight"], tensors["weight_scale"], bias_tensor, threshold, path=path)
        assert_close_to_scale(y, reference(x, tensors, bias_tensor, threshold, dtype), dtype, f"M={m}")


def test_streaming_split_k_is_deterministic_and_resets_its_counters(device):
    """The streaming kernel splits K (in two under the interpreter): the last split to arrive sums the partials in
    split order, so two launches agree bit for bit, and it leaves the arrival counters at zero for the next."""
    from quantizer_plugin.kernels.int8_matmul import _streaming_kernel
    from quantizer_plugin.kernels.split_k import counters

    assert any(config.kwargs["SPLIT_K"] > 1 for config in _streaming_kernel.configs)
    n, k = SHAPES[device]
    tensors = quantized_weight(n, k, device, seed=9)
    x, _ = planted_input(5, k, "few", torch.bfloat16, device, seed=9)
    first, again = (int8_linear(x, tensors["weight"], tensors["weight_scale"], None, THRESHOLD) for _ in range(2))
    assert torch.equal(first, again)
    assert_close_to_scale(first, reference(x, tensors, None, THRESHOLD, torch.bfloat16), torch.bfloat16)
    assert not counters(1, torch.device(device)).any()


@pytest.mark.parametrize("case", ["off", "many"])
@pytest.mark.parametrize("path", ["streaming", "tiled"])
def test_float32_compute_is_exact_up_to_the_epilogue(device, path, case):
    """In float32 only the int8 codes and the scales decide the result: a code off by one would show."""
    threshold, outliers = CASES[case]
    n, k = SHAPES[device]
    tensors = quantized_weight(n, k, device, seed=3)
    x, _ = planted_input(16, k, outliers, torch.float32, device, seed=5)
    y = int8_linear(x, tensors["weight"], tensors["weight_scale"], None, threshold, path=path)
    assert_close_to_scale(y, reference(x, tensors, None, threshold, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_grad_input_kernel_matches_the_reference(device, dtype):
    n, k = SHAPES[device]
    tensors = quantized_weight(n, k, device, seed=7)
    weight = oracles.dequantize_int8({name: t.cpu() for name, t in tensors.items()}).to(device=device, dtype=dtype)
    for m in ROWS[device]:
        grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(m)).to(device=device, dtype=dtype)
        grad_x = int8_grad_input(grad_y, tensors["weight"], tensors["weight_scale"])
        assert_close_to_scale(grad_x, grad_y @ weight, dtype, f"M={m}")


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_layer_forward_and_backward_use_the_kernels(device, monkeypatch, dtype, threshold):
    """Through LowBitLinear and autograd: 3-D input in float32, compute in 16 bits, gradient to x only."""
    n, k = SHAPES[device]
    torch.manual_seed(11)
    linear = torch.nn.Linear(k, n).to(device)
    layer = LowBitLinear.from_float(linear, QuantScheme("int8", outlier_threshold=threshold), compute_dtype=dtype)
    x16, _ = planted_input(2 * 5, k, "few", dtype, device, seed=13)
    grad_y = torch.randn(2, 5, n, generator=torch.Generator().manual_seed(17)).to(device)

    results, kernels = {}, {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv(ops.KERNELS_ENV, backend)
        assert ops.select_backend("int8", torch.device(device)) == backend
        x = x16.float().reshape(2, 5, k).requires_grad_()
        with ops.record_dispatch() as served:
            y = layer(x)
            y.backward(grad_y)
        results[backend], kernels[backend] = (y, x.grad), served
    assert kernels == {"torch": ["torch.reference_forward", "torch.reference_backward"],
                       "triton": ["triton.int8.streaming", "triton.int8.grad_input"]}  # fmt: skip
    (y_ref, grad_ref), (y, grad) = results["torch"], results["triton"]
    assert y.dtype == torch.float32 and grad.dtype == torch.float32
    # Both backends round to the compute dtype before returning float32, so compare at its tolerance.
    assert_close_to_scale(y, y_ref, dtype)
    assert_close_to_scale(grad, grad_ref, dtype)
    assert all(p.grad is None for p in layer.parameters())


def test_benchmark_runs_unattended(monkeypatch, tmp_path):
    """benchmarks/gemm_int8.py --smoke: tiny shapes through every provider, rows and report written."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")  # main() would set it only where unset; restored after the test
    import gemm_int8

    assert gemm_int8.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gemm_int8-float16-smoke.jsonl").read_text().splitlines()]
    points = {(n, k, m, rate) for n, k in gemm_int8.SMOKE_SHAPES for m in gemm_int8.SMOKE_BATCH_SIZES
              for rate in gemm_int8.OUTLIER_RATES}  # fmt: skip
    assert len(rows) == 3 * len(points)
    assert {row["provider"] for row in rows} == {gemm_int8.OURS, gemm_int8.BASELINE, gemm_int8.PEER}
    assert all(row["median_ms"] > 0 for row in rows)
    # errors against the float32 product with the 16-bit weight: 16-bit rounds once; ours and bitsandbytes' LLM.int8
    # both carry the activation and weight quantization error, of the same size
    errors = {(row["shape"], row["m"], row["provider"]): row["extra"]["max_rel_error"] for row in rows}
    for (shape, m, provider), error in errors.items():
        if provider == gemm_int8.BASELINE:
            assert error < 2e-3
        elif provider == gemm_int8.OURS:
            peer = errors[(shape, m, gemm_int8.PEER)]
            assert 1e-3 < error < 3e-2 and 0.5 * peer <= error <= 2 * peer, (shape, m, error, peer)
    report = (tmp_path / "gemm_int8-float16-smoke.md").read_text()
    assert "lowbit-int8 speedup vs torch-16bit" in report and "Targets:" in report and rows[0]["torch"] in report


def test_bad_operands_are_named(device):
    n, k = SHAPES[device]
    tensors = quantized_weight(n, k, device, seed=1)
    x = torch.randn(3, k, device=device, dtype=torch.float16)
    with pytest.raises(ValueError, match="weight must be int8"):
        int8_linear(x, tensors["weight"].float(), tensors["weight_scale"], None, THRESHOLD)
    with pytest.raises(ValueError, match=f"weight must be int8 \\(out_features, {k - 1}\\)"):
        int8_linear(x[:, 1:].contiguous(), tensors["weight"], tensors["weight_scale"], None, THRESHOLD)
    with pytest.raises(ValueError, match="weight_scale must be float32"):
        int8_linear(x, tensors["weight"], tensors["weight_scale"][1:], None, THRESHOLD)
    with pytest.raises(ValueError, match="bias must be"):
        int8_linear(x, tensors["weight"], tensors["weight_scale"], torch.zeros(n + 1, device=device), THRESHOLD)
    with pytest.raises(TypeError, match="x must be float16, bfloat16 or float32"):
        int8_linear(x.double(), tensors["weight"], tensors["weight_scale"], None, THRESHOLD)
    with pytest.raises(ValueError, match=f"the streaming path holds at most {STREAMING_LIMIT_M} rows"):
        int8_linear(x.new_zeros(STREAMING_LIMIT_M + 1, k), tensors["weight"], tensors["weight_scale"], None,
                    THRESHOLD, path="streaming")  # fmt: skip
    huge = x[:1].expand(2**31 // k + 1, k)  # a view: no memory behind it
    with pytest.raises(ValueError, match="x would hold [0-9]+ elements; the int8 kernels index with 32-bit offsets"):
        int8_linear(huge, tensors["weight"], tensors["weight_scale"], None, THRESHOLD)
    with pytest.raises(ValueError, match="grad_y must be 2-D"):
        int8_grad_input(x.t(), tensors["weight"], tensors["weight_scale"])
