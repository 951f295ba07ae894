"""torch.compile on the CPU backend: the native kernels are custom ops (quantizer_plugin/cpu/library.py), so a quantized
layer or model traces whole, with no graph break, and compiled results equal eager ones.

The plain-torch reference traces whole too (LLM.int8's outlier columns are a mask, not a data-dependent set of
indices). This is the CPU part of the torch.compile issue; the Triton ops, static-cache generation and compiled LoRA
training are not covered yet.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.cpu import library, native
from quantizer_plugin.formats import QuantScheme

from helpers import load_quantized
from test_cpu_backend import amx_int8_here

SCHEMES = {
    "nf4": QuantScheme("nf4"),
    "fp4": QuantScheme("fp4", double_quant=False),
    "int8": QuantScheme("int8"),
    "int8-weight-only": QuantScheme("int8", activations=None),
    "int4": QuantScheme("int4"),
    "int2": QuantScheme("int2", block_size=32),
}
# decode, AMX-INT8 and tile sizes, and more rows than the int8 tiles take
M_VALUES = [1, 16, 40, 130]


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    torch._dynamo.reset()


def make_layer(name: str, dtype: torch.dtype, k: int = 256) -> LowBitLinear:
    torch.manual_seed(0)
    return LowBitLinear.from_float(torch.nn.Linear(k, 72), SCHEMES[name], compute_dtype=dtype)


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_quantized_layer_traces_without_a_graph_break(name, dtype):
    layer = make_layer(name, dtype)
    for m in M_VALUES:
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(layer)(torch.randn(m, 256, dtype=dtype))
        assert explanation.graph_break_count == 0, (m, [str(b.reason)[:300] for b in explanation.break_reasons])


@pytest.mark.parametrize("name", SCHEMES)
def test_the_reference_traces_without_a_graph_break_and_compiles_to_the_same_result(name, monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    layer = make_layer(name, torch.bfloat16)
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    x[:, 3] *= 40.0  # an outlier column for LLM.int8
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    torch._dynamo.reset()
    with torch.no_grad(), ops.record_dispatch() as served:
        eager = layer(x)
    assert served == ["torch.reference_forward"]
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), eager)


@pytest.mark.parametrize("name", ["nf4", "int8", "int4"])
def test_compiled_layers_equal_eager_ones(name):
    layer = make_layer(name, torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True)  # inductor
    for m in (1, 16):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(compiled(x), layer(x)), m


def test_every_native_forward_kernel_passes_opcheck(monkeypatch):
    """torch.library.opcheck (schema, fake tensors against the real kernel, AOT dispatch) on the arguments the entry
    points really pass, collected from eager forwards that reach every kernel this CPU runs."""
    calls = {}
    original = library.call

    def recording(kernels, name, *args):
        calls.setdefault(name, args)
        return original(kernels, name, *args)

    monkeypatch.setattr(library, "call", recording)
    for name, dtype, m in itertools.product(SCHEMES, [torch.bfloat16, torch.float16, torch.float32], M_VALUES):
        make_layer(name, dtype)(torch.randn(m, 256, dtype=dtype))
    make_layer("nf4", torch.float32, k=100)(torch.randn(3, 100))  # blocks that straddle rows: the chunks
    kernels = native.load()
    expected = {name for name in library.FORWARD_OPS if "amx" not in name or amx_int8_here()}
    if not kernels.uses_amx_bf16():
        expected -= {"linear_4bit_tiles", "linear_int8_tiles", "linear_affine_tiles"}
    assert set(calls) == expected
    for name, args in calls.items():
        torch.library.opcheck(getattr(torch.ops.quantizer_plugin, name).default, args)


@pytest.mark.parametrize("weights", ["nf4", "int4"])
def test_a_quantized_llama_compiles_whole_and_matches_eager(llama_dir, token_ids, weights):
    model = load_quantized(llama_dir, weights=weights)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(token_ids)
        assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(token_ids).logits, model(token_ids).logits)


def test_static_cache_generation_compiles_once_and_matches_eager(llama_dir, token_ids):
    from transformers.generation.configuration_utils import CompileConfig

    model = load_quantized(llama_dir, weights="nf4")
    assert model.hf_quantizer.is_compileable  # its layers are on the CPU, whose kernels compile whole
    prompt = token_ids[:1]
    settings = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    eager = model.generate(prompt, **settings, disable_compile=True)
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles generate's forward on CUDA-like devices only
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(prompt, **settings, compile_config=compile_config)
    again = model.generate(prompt, **settings, compile_config=compile_config)
    assert torch.equal(compiled, eager) and torch.equal(again, eager)
    # one graph for all the decode steps of both calls: no recompilation per step
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
