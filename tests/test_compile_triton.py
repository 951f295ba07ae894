"""torch.compile on the Triton backend: each launcher is a torch custom op (kernels/library.py), so a quantized layer
traces whole for inference and for a LoRA training step, and compiled results equal eager ones.

Without a GPU the ops run through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set in conftest.py), at
small shapes; on a GPU the same tests run on CUDA tensors.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from quantizer_plugin import LowBitLinear, ops
from quantizer_plugin.formats import QuantScheme

from helpers import load_quantized

pytest.importorskip("quantizer_plugin.kernels", reason="triton is not installed")
from quantizer_plugin.kernels import layers, library  # noqa: E402

SCHEMES = {
    "nf4": QuantScheme("nf4"),
    "fp4": QuantScheme("fp4", double_quant=False),
    "int8": QuantScheme("int8"),  # LLM.int8
    "int8-weight-only": QuantScheme("int8", activations=None),
    "int4": QuantScheme("int4"),
    "int2": QuantScheme("int2", block_size=32),
    "fp8": QuantScheme("fp8"),
}
M_VALUES = [1, 33]  # the decode and the prefill kernels
# library.py's op functions and the ops they define
OPS = {"dequant_matmul_op": "triton_dequant_matmul", "dequant_matmul_grad_input_op": "triton_dequant_matmul_grad_input",
       "int8_linear_op": "triton_int8_linear", "int8_grad_input_op": "triton_int8_grad_input"}  # fmt: skip


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    torch._dynamo.reset()


def make_layer(name: str, device, n: int = 40, k: int = 96) -> LowBitLinear:
    torch.manual_seed(0)
    return LowBitLinear.from_float(torch.nn.Linear(k, n, device=device), SCHEMES[name], compute_dtype=torch.float16)


def inputs(m: int, k: int, device) -> torch.Tensor:
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    x[:, 5] *= 30.0  # an outlier column for LLM.int8
    return x


@pytest.mark.parametrize("name", SCHEMES)
def test_a_layer_on_the_triton_kernels_traces_whole_and_compiles_to_eager(device, name):
    layer = make_layer(name, device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for m in M_VALUES:
        x = inputs(m, 96, device)
        explanation = torch._dynamo.explain(layer)(x)
        assert explanation.graph_break_count == 0, (m, [str(b.reason)[:300] for b in explanation.break_reasons])
        with torch.no_grad():
            eager = layer(x)
            with ops.record_dispatch() as served:
                result = compiled(x)
        assert served and all(s.startswith("triton.") for s in served), served  # the op launched a kernel of ours
        assert torch.equal(result, eager), m


def test_inductor_keeps_the_op_and_equals_eager(device):
    layer = make_layer("nf4", device)
    compiled = torch.compile(layer, fullgraph=True)
    x = inputs(3, 96, device)
    with torch.no_grad():
        assert torch.equal(compiled(x), layer(x))


def test_every_triton_op_passes_opcheck(device, monkeypatch):
    """torch.library.opcheck on the arguments the layer entry points pass, forward and backward, for every family:
    eager calls take the path they take under compile (is_compiling patched), where a wrapper records them."""
    calls = {}

    def recording(name):
        op = getattr(library, name)

        def call(*args):
            calls.setdefault(OPS[name], tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
            return op(*args)

        return call

    for name in OPS:
        monkeypatch.setattr(library, name, recording(name))
    with monkeypatch.context() as tracing:
        tracing.setattr(torch.compiler, "is_compiling", lambda: True)
        for name in SCHEMES:
            layer = make_layer(name, device)
            for m in M_VALUES:
                layer(inputs(m, 96, device).requires_grad_(True)).sum().backward()
    assert set(calls) == set(OPS.values())
    for name, args in calls.items():
        torch.library.opcheck(getattr(torch.ops.quantizer_plugin, name).default, args)


def test_a_quantized_llama_on_the_triton_kernels_compiles_whole_and_matches_eager(llama_dir, token_ids):
    model = load_quantized(llama_dir, weights="nf4")
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(token_ids)
        assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
        torch._dynamo.reset()
        eager = model(token_ids).logits
        with ops.record_dispatch() as served:
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(token_ids).logits
    assert len(served) == 14 and all(s.startswith("triton.codebook4bit.") for s in served)  # 2 layers x 7 projections
    assert torch.equal(compiled, eager)


class TwoLayers(torch.nn.Module):
    def __init__(self, name: str, device):
        super().__init__()
        self.up, self.down = make_layer(name, device, 64, 96), make_layer(name, device, 40, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("name", ["nf4", "int8", "int4"])
def test_a_compiled_lora_training_step_on_the_triton_kernels_gives_eager_gradients(device, name):
    torch.manual_seed(1)
    model = get_peft_model(TwoLayers(name, device), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    x = inputs(7, 96, device).float().requires_grad_(True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(x):
        return model(x).float().pow(2).mean()

    def gradients(step):
        model.zero_grad()
        x.grad = None
        with ops.record_dispatch() as served:
            step(x).backward()
        assert any(s.startswith("triton.") and s.endswith(".grad_input") for s in served), served
        return {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in trainable.items()}}

    explanation = torch._dynamo.explain(loss)(x)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    torch._dynamo.reset()
    eager = gradients(loss)
    compiled = gradients(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    assert all(g.abs().sum() > 0 for g in eager.values())
    for n in eager:
        assert torch.equal(compiled[n], eager[n]), n


def test_the_entry_points_call_the_launchers_directly_in_eager(device, monkeypatch):
    """Eager calls skip the dispatcher (microseconds per decode step on a GPU): the ops are for tracing only."""
    for name in ("dequant_matmul_op", "int8_linear_op"):
        monkeypatch.setattr(library, name, lambda *args: pytest.fail("an eager call went through the custom op"))
    for name in ("nf4", "int8"):
        layer = make_layer(name, device)
        with ops.record_dispatch() as served:
            layer(inputs(2, 96, device))
        assert len(served) == 1 and served[0].startswith("triton."), served
    assert ops._FORWARD[("codebook4bit", None, "triton")] is layers.linear_forward  # the entry point whose eager path ran
