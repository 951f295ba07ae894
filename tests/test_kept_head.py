"""The output head a quantized model keeps in 16-bit: an nn.Linear in every respect, whose decode on the CPU runs on
our kernel that streams the weight once (quantizer_plugin/cpu/dense.py), and torch's F.linear wherever a gradient is
needed, the kernel does not apply, or the native build is missing."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from cpu_caps import avx2_here
from helpers import load_quantized, read_safetensors
from quantizer_plugin import ops
from quantizer_plugin.cpu import dense, native
from quantizer_plugin.modules import KeptLinear

needs_the_kernel = pytest.mark.skipif(not avx2_here(), reason="the kept layers' kernel needs AVX2: F.linear runs")
# max |error| / max |exact output| of float32 sums of exact products, in the output dtype
TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def weight_and_input(n: int, k: int, m: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    return weight, torch.randn(m, k, generator=generator).to(dtype)


@needs_the_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_the_kernel_is_linear_to_within_its_sums_on_awkward_shapes(dtype):
    # N not a multiple of the threads' 16 rows, K not of a vector (8 or 16) or of the 32-element step, M 1 to 4
    for (n, k), m in itertools.product([(37, 100), (5, 8), (130, 333), (64, 2048)], [1, 2, 3, 4]):
        weight, x = weight_and_input(n, k, m, dtype, seed=n * k + m)
        bias = torch.randn(n).to(dtype)
        with ops.record_dispatch() as served:
            y = ops.kept_linear(x, weight, bias)
        assert served == ["cpu.kept16.gemv"], (n, k, m)
        exact = x.double() @ weight.double().T + bias.double()
        assert y.dtype == dtype and y.shape == (m, n)
        assert (y.double() - exact).abs().max() <= TOLERANCES[dtype] * exact.abs().max(), (n, k, m)


@needs_the_kernel
def test_the_kernel_reads_every_weight_in_its_place():
    """Rows of the identity as activations: each output is one weight times 1.0 plus zeros, exact in float32, so y is
    the weight transposed, bit for bit (every row and column in its place, a tail past the last full step too)."""
    n, k = 45, 150
    weight, _ = weight_and_input(n, k, 1, torch.bfloat16, seed=7)
    identity = torch.eye(k, dtype=torch.bfloat16)
    for first in range(0, k, 4):
        columns = list(range(first, min(k, first + 1 + first % 4)))  # 1 to 4 rows at a time
        assert torch.equal(ops.kept_linear(identity[columns], weight, None), weight[:, columns].T), columns


def test_without_the_native_build_or_past_decode_it_is_f_linear(monkeypatch):
    weight, x = weight_and_input(40, 64, 1, torch.bfloat16, seed=3)
    _, batch = weight_and_input(40, 64, dense.GEMV_MAX_M + 1, torch.bfloat16, seed=4)
    with ops.record_dispatch() as served:
        assert torch.equal(ops.kept_linear(batch, weight, None), F.linear(batch, weight))
    monkeypatch.setattr(native, "load", lambda: None)
    with ops.record_dispatch() as missing:
        assert torch.equal(ops.kept_linear(x, weight, None), F.linear(x, weight))
    assert served == missing == []


def test_a_call_that_needs_gradients_is_f_linear_and_gets_them():
    weight, x = weight_and_input(40, 64, 2, torch.float32, seed=5)
    x.requires_grad_(True)
    with ops.record_dispatch() as served:
        ops.kept_linear(x, weight, None).sum().backward()
    assert served == []
    assert torch.allclose(x.grad, weight.sum(dim=0).expand(2, -1))


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-embeddings"])
def test_a_quantized_models_head_decodes_on_the_kernel_and_stays_an_ordinary_linear(tmp_path, tied):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    source = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).to(torch.bfloat16)
    source.save_pretrained(tmp_path / "source")
    model = load_quantized(tmp_path / "source", weights="nf4")
    head = model.get_output_embeddings()
    assert type(head) is KeptLinear and isinstance(head, nn.Linear)
    assert (head.weight is model.get_input_embeddings().weight) == tied
    ids = torch.tensor([[5, 17, 33, 2]])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        with ops.record_dispatch() as served:
            logits = model(ids).logits
    expected = F.linear(hidden, head.weight).float()
    assert served.count("cpu.kept16.gemv") == (1 if avx2_here() else 0)  # 4 positions: one decode-sized call
    assert torch.allclose(logits.float(), expected, rtol=1e-2, atol=1e-2)
    # saved and reloaded as any model with a 16-bit head: the same tensors, the head kept again
    model.save_pretrained(tmp_path / "quantized")
    saved = read_safetensors(tmp_path / "quantized")
    assert ("lm_head.weight" in saved) == (not tied) and saved["model.embed_tokens.weight"].dtype == torch.bfloat16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")
    assert type(reloaded.get_output_embeddings()) is KeptLinear
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    # dequantize() gives back an ordinary model: the head a plain nn.Linear again
    model.dequantize()
    assert type(model.get_output_embeddings()) is nn.Linear
