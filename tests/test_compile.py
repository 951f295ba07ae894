"""torch.compile on the CPU backend: the native kernels and the input gradients are custom ops
(quantizer_plugin/cpu/library.py), so a quantized layer or model traces whole, with no graph break, for inference and
for a LoRA training step, and compiled results equal eager ones.

The plain-torch reference traces whole too (LLM.int8's outlier columns are a mask, not a data-dependent set of
indices). Inductor may skip the rounding of an intermediate cast to 16 bits (a float32 value cast to bfloat16 and
back is kept in float32); its `emulate_precision_casts` keeps every rounding eager does, which the equality tests
below set, so that any difference left would be ours.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch._inductor.config
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.cpu import affine, codebook4bit, float8, int8, library, native
from quantizer_plugin.formats import QuantScheme

from helpers import load_quantized
from cpu_caps import amx_int8_here, avx2_here, avx512_bf16_here, bf16_lookups_here

SCHEMES = {
    "nf4": QuantScheme("nf4"),
    "fp4": QuantScheme("fp4", double_quant=False),
    "int8": QuantScheme("int8"),
    "int8-weight-only": QuantScheme("int8", activations=None),
    "int4": QuantScheme("int4"),
    "int2": QuantScheme("int2", block_size=32),
    "fp8": QuantScheme("fp8"),
}
# activations="q8_0": its kernels pass opcheck, and a layer compiles whole to eager's outputs
Q8_SCHEMES = {"nf4-q8_0": QuantScheme("nf4", activations="q8_0"),
              "int2-q8_0": QuantScheme("int2", block_size=32, activations="q8_0")}  # fmt: skip
# decode, AMX-INT8 and tile sizes, and more rows than the int8 tiles take
M_VALUES = [1, 16, 40, 130]


@pytest.fixture(autouse=True)
def cpu_backend(monkeypatch):
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)
    torch._dynamo.reset()


def make_layer(name: str, dtype: torch.dtype, k: int = 256) -> LowBitLinear:
    torch.manual_seed(0)
    return LowBitLinear.from_float(torch.nn.Linear(k, 72), {**SCHEMES, **Q8_SCHEMES}[name], compute_dtype=dtype)


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


def bf16_ulps(a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor) -> float:
    """The largest |a - b| in units of the last place of bfloat16 at `magnitude`."""
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(magnitude.float().abs().clamp(min=1e-30))))
    return ((a.float() - b.float()).abs() / ulp).max().item()


@pytest.mark.parametrize("name", ["nf4", "int8", "int4", "nf4-q8_0"])
def test_compiled_layers_equal_eager_ones(name):
    # M = 1 takes the fused decode kernels; 7, 16 and 40 the AMX tiles where the CPU has AMX, the chunks elsewhere
    layer = make_layer(name, torch.bfloat16)
    inputs = {m: torch.randn(m, 256, dtype=torch.bfloat16) for m in (1, 7, 16, 40)}
    with torch.no_grad():
        eager = {m: layer(x) for m, x in inputs.items()}
    # Inductor's defaults may skip one rounding eager makes: on the chunks, the product is rounded to bfloat16
    # before the bias is added. The compiled output is then within one ulp of the product plus one of the output.
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for m, x in inputs.items():
            product = eager[m].float() - layer.bias.float()
            magnitude = torch.maximum(eager[m].float().abs(), product.abs())
            assert bf16_ulps(compiled(x), eager[m], magnitude) <= 2, m
    # With every eager rounding kept, equal.
    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=True), torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)
        for m, x in inputs.items():
            assert torch.equal(compiled(x), eager[m]), m


def test_every_native_kernel_and_input_gradient_passes_opcheck(monkeypatch):
    """torch.library.opcheck (schema, fake tensors against the real kernel, AOT dispatch) on the arguments the entry
    points really pass, collected from eager forwards that reach every kernel this CPU runs."""
    calls = {}
    original = library.call

    def record(name, args):  # detached: opcheck's autograd check is for ops that take inputs requiring grad
        calls.setdefault(name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))

    def recording(kernels, name, *args):
        record(name, args)
        return original(kernels, name, *args)

    def recording_grad_input(name):
        def grad_input(*args):
            record(name, args)
            return library.GRAD_INPUT_OPS[name](*args)

        return grad_input

    monkeypatch.setattr(library, "call", recording)
    for module, name in [(codebook4bit, "grad_input_4bit"), (int8, "grad_input_int8"), (affine, "grad_input_affine"),
                         (float8, "grad_input_float8")]:  # fmt: skip
        monkeypatch.setattr(module, "grad_input", recording_grad_input(name))
    for name, dtype, m in itertools.product(SCHEMES, [torch.bfloat16, torch.float16, torch.float32], M_VALUES):
        x = torch.randn(m, 256, dtype=dtype, requires_grad=True)
        make_layer(name, dtype)(x).sum().backward()
    make_layer("nf4", torch.float32, k=100)(torch.randn(3, 100))  # blocks that straddle rows: the chunks
    with torch.no_grad():  # the q8_0 integer kernels
        for name, m in itertools.product(Q8_SCHEMES, [1, 16]):
            make_layer(name, torch.bfloat16)(torch.randn(m, 256, dtype=torch.bfloat16))
    with torch.no_grad():  # a kept 16-bit head at decode
        ops.kept_linear(torch.randn(2, 100, dtype=torch.bfloat16), torch.randn(7, 100, dtype=torch.bfloat16), None)
    kernels = native.load()
    expected = {name for name in library.FORWARD_OPS if "amx" not in name or amx_int8_here()} | set(library.GRAD_INPUT_OPS)
    if not kernels.uses_amx_bf16():
        expected -= {"linear_4bit_tiles", "linear_int8_tiles", "linear_affine_tiles", "linear_float8_tiles"}
    if not avx2_here():  # int8, int4/int2 and fp8 decode take the chunks, the kept head F.linear, q8_0 its reference
        expected -= {"gemv_int8", "gemv_affine", "gemv_affine_bf16", "gemv_dense", "gemv_4bit_q8", "gemv_affine_q8",
                     "gemv_float8"}
    if not avx512_bf16_here():
        expected -= {"gemv_affine_bf16"}
    if not bf16_lookups_here():
        expected -= {"gemv_4bit_bf16"}
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


@pytest.mark.parametrize("weights", ["nf4", "int4"])
def test_a_prequantized_checkpoint_compiles_whole_on_its_first_forward(llama_dir, token_ids, weights, tmp_path, monkeypatch):
    """Reloading a saved model quantizes nothing, so nothing has built the native kernels yet: loading must (their build
    takes a lock and calls a compiler, which torch.compile cannot trace)."""
    load_quantized(llama_dir, weights=weights).save_pretrained(tmp_path)
    monkeypatch.setattr(native, "_loaded", {})  # as in a fresh process: the kernels not built or loaded yet
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(token_ids)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]


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


@pytest.mark.parametrize("weights", ["nf4", "int8", "int4"])
def test_a_compiled_lora_training_step_has_no_graph_break_and_eager_gradients(llama_dir, token_ids, weights):
    """QLoRA under torch.compile: forward and backward (the frozen-weight rule, with the input gradients as ops) trace
    whole, and the adapters' and the embeddings' gradients equal eager ones."""
    model = load_quantized(llama_dir, weights=weights)
    model.get_input_embeddings().weight.requires_grad_(True)  # a gradient that crosses every quantized layer
    config = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(0)  # the adapters' random init: the same whatever ran before (the bound below was measured on it)
    model = get_peft_model(model, config)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def loss(ids):
        return model(ids, labels=ids).loss

    def gradients(step) -> dict[str, torch.Tensor]:
        model.zero_grad()
        with ops.record_dispatch() as served:
            step(token_ids).backward()
        assert any(name.endswith(".grad_input") for name in served), served  # a backward kernel of ours, not the reference's
        return {name: p.grad.clone() for name, p in trainable.items()}

    explanation = torch._dynamo.explain(loss)(token_ids)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    torch._dynamo.reset()
    eager = gradients(loss)
    assert len(eager) > 2 and all(g.abs().sum() > 0 for g in eager.values())
    # AOTAutograd's forward and backward graphs run eagerly: the same ops in the same order, so the same bits
    traced = gradients(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    for name in eager:
        assert torch.equal(traced[name], eager[name]), name
    # inductor: attention, norms and the loss fused into other kernels sum in other orders and keep some values in
    # float32 that eager rounds to the bfloat16 compute dtype (one bfloat16 step is 4e-3), so the gradients move by
    # 1e-5 to 1.4e-3 of their norm depending on the adapters' init (measured); our ops are the same, and a wrong op
    # moves them by their whole size
    if weights == "nf4":
        with torch._inductor.config.patch(emulate_precision_casts=True):
            compiled = gradients(torch.compile(loss, fullgraph=True))
        for name in eager:
            assert (compiled[name] - eager[name]).norm() <= 1e-2 * eager[name].norm(), name
