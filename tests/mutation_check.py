"""Break the implementation on purpose, one way at a time, and check that the tests meant to catch it fail.

    python tests/mutation_check.py                # every breakage (about two minutes; CI runs it too)
    python tests/mutation_check.py NAME [NAME..]  # chosen breakages; --list names them all

Each breakage is a monkeypatch, never an edit of a file, and patches a public seam where one serves (a kernel
registered with ops.register_kernel, a registry such as convert.EXPORTERS, the native module native.load returns), so
that a rename inside the package does not break the check. This module is also a pytest plugin: for each breakage
the check runs `pytest -x -p mutation_check TESTS` with QUANTIZER_PLUGIN_MUTATION=NAME, so the plugin
applies the patch when pytest configures itself, before any test runs. Each run is a fresh process forked from one
that has imported torch and transformers (and nothing of ours), which saves their import (about 8 s on a 2-core
EPYC) in every run; where fork is unsafe (the parent has started threads) or missing, a plain subprocess per run.
A breakage is *caught* when pytest reports failing tests (exit code 1); it *survives* when they all pass. Anything else (a collection error, say) is
reported as an error: it proves nothing. The check exits 1 unless every breakage is caught.

To add a breakage for new code (a CPU backend, a format): one `Mutation` below, naming the patch and the tests
that must catch it (tests/test_mutation_check.py then runs it in CI). If the whole check grows too slow for every CI
run, keep a fast subset there and run the rest before resolving an issue that touches those parts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
ENV = "QUANTIZER_PLUGIN_MUTATION"


@dataclass(frozen=True)
class Mutation:
    description: str
    apply: Callable[[], None]
    tests: tuple[str, ...]
    # The CPU feature (cpu_caps) the mutated kernel needs; on a machine without it the kernel never runs, so the
    # breakage cannot be caught there (the kernel's tests skip).
    needs: str | None = None
    # Its tests compile with torch.compile (tens of seconds each): CI's fast subset leaves it out (SUBSET_ENV).
    slow: bool = False


# CI sets this to "fast" to keep the whole suite within its time: the slow breakages then run before resolving an
# issue that touches what they break (`python tests/mutation_check.py` runs every one).
SUBSET_ENV = "QUANTIZER_PLUGIN_MUTATIONS"


def patch(owner, name: str, value) -> None:
    # A breakage that patched a name the code no longer has would break nothing and "survive" for the wrong reason:
    # after a rename it must fail, naming what it could not find.
    if not hasattr(owner, name):
        owner_name = getattr(owner, "__name__", owner)
        raise AttributeError(f"mutation check: {owner_name!r} has no {name!r} to break (renamed?)")
    setattr(owner, name, value)


# --- the breakages --------------------------------------------------------------------------------------------------


def dequantize_4bit_returns_zeros():
    import torch

    from quantizer_plugin.formats.records import CodebookWeight

    def zeros(self, dtype):
        return torch.zeros(self.out_features, self.in_features, dtype=dtype, device=self.packed.device)

    patch(CodebookWeight, "dequantize", zeros)


def kernel_4bit_falls_back_to_the_reference():
    from quantizer_plugin import ops

    ops.load_kernels("triton")
    # through the public registration seam: the 4-bit family's Triton entry points replaced by the references
    ops.register_kernel("codebook4bit", "triton")(ops.reference_forward)
    ops.register_kernel("codebook4bit", "triton", backward=True)(ops.reference_backward)


def kernel_affine_ignores_the_zero_points():
    # the generic Triton kernel handed zero points of 0 for int4/int2
    import torch

    import quantizer_plugin.kernels.dequant_matmul as kernels

    kind, pointers = kernels.FAMILIES["affine"]

    def without_zero_points(weight):
        return dict(pointers(weight), zero_ptr=torch.zeros_like(weight.zero))

    patch(kernels, "FAMILIES", dict(kernels.FAMILIES, affine=(kind, without_zero_points)))


def kernel_int8_entry_points_run_the_reference():
    from quantizer_plugin import ops

    ops.load_kernels("triton")
    # through the public registration seam: what a kernel module's own decorators do
    ops.register_kernel("rowscaled8", "triton", activations="int8")(ops.reference_forward)
    ops.register_kernel("rowscaled8", "triton", backward=True)(ops.reference_backward)


def int8_reference_without_outlier_decomposition():
    from quantizer_plugin.formats.activations import Int8Activations

    original = Int8Activations.reference_linear

    def without(self, x, weight, bias, compute_dtype):
        return original(replace(self, outlier_threshold=0.0), x, weight, bias, compute_dtype)

    patch(Int8Activations, "reference_linear", without)


def cli_fidelity_compares_the_model_with_itself():
    import quantizer_plugin.fidelity as fidelity

    original = fidelity.embedding_cosines
    patch(fidelity, "embedding_cosines", lambda reference, quantized: original(quantized, quantized))


def cli_divergence_compares_the_model_with_itself():
    import quantizer_plugin.fidelity as fidelity

    original = fidelity.kl_divergence
    patch(fidelity, "kl_divergence", lambda reference, quantized: original(quantized, quantized))


def benchmarks_time_nothing():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import harness  # gemm_4bit and gemm_int8 import bench from here when a test first imports them

    patch(harness, "bench", lambda fn, warmup=25, rep=100, cuda_graph=False: (1e-3, 1e-3, 1e-3))


def benchmarks_report_zero_error():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gemm_4bit

    patch(gemm_4bit, "relative_error", lambda y, exact: 0.0)


def serialization_key_without_prefix_fallbacks():
    import quantizer_plugin.serialization as serialization

    patch(serialization, "find_key", lambda headers, key, base_prefix: key if key in headers else None)


def lora_detaches_the_base_layers_input():
    from torch import nn

    from quantizer_plugin.lora import LowBitLoraLinear

    class DetachedInput(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, *args, **kwargs):
            return self.inner(x.detach(), *args, **kwargs)

    original = LowBitLoraLinear.forward

    def forward(self, x, *args, **kwargs):
        base = self._modules["base_layer"]
        self._modules["base_layer"] = DetachedInput(base)
        try:
            return original(self, x, *args, **kwargs)
        finally:
            self._modules["base_layer"] = base

    patch(LowBitLoraLinear, "forward", forward)


def parameter_count_uncorrected():
    import quantizer_plugin.lora as lora
    import quantizer_plugin.parameter_count as parameter_count

    patch(parameter_count, "count_correction", lambda model: 0)
    patch(lora, "count_correction", lambda model: 0)


def old_layout_checkpoints_not_upgraded():
    import quantizer_plugin.quantizer as quantizer

    patch(quantizer, "upgrade_layout", lambda model, config: False)


def stored_layout_back_to_1d():
    from quantizer_plugin.formats.codebook4bit import Codebook4BitFormat

    original = Codebook4BitFormat.tensor_specs
    patch(Codebook4BitFormat, "tensor_specs", lambda self, out_features, in_features, scheme: original(
        self, out_features, in_features, replace(scheme, format_version=1)))  # fmt: skip


def skip_patterns_unchecked():
    import quantizer_plugin.quantizer as quantizer

    patch(quantizer, "check_skip_patterns", lambda model, patterns: None)


def dequantize_ignores_offloaded_layers():
    import quantizer_plugin.replace as replace_module

    patch(replace_module, "dequantize_offloaded_layers", lambda model, dtype: {})


def cli_sizes_assume_float32():
    import quantizer_plugin.cli as cli

    def float32_bytes(src, model):
        layers = [m for m in model.modules() if type(m).__name__ == "LowBitLinear"]
        return sum(4 * m.in_features * m.out_features for m in layers), "float32"

    patch(cli, "source_linear_bytes", float32_bytes)


def shard_names_trusted():
    from quantizer_plugin.checkpoints import source

    patch(source, "plain_file_name", lambda name, source: name)
    patch(source, "inside", lambda folder, path, source: path)


def converter_reads_the_whole_checkpoint_first():
    from quantizer_plugin.checkpoints import source

    original = source.ConversionPlan.write

    def write(self, folder, shards):
        tensors = {key: producer() for key, (_, producer) in self.entries.items()}
        self.entries = {key: (shard, lambda key=key: tensors[key]) for key, (shard, _) in self.entries.items()}
        original(self, folder, shards)

    patch(source.ConversionPlan, "write", write)


def cpu_native_kernels_unavailable():
    import quantizer_plugin.cpu.native as native

    patch(native, "load", lambda: None)


def cpu_fused_kernel_reads_the_wrong_codebook():
    import quantizer_plugin.cpu.codebook4bit as cpu_codebook

    original = cpu_codebook.weight_arguments
    patch(cpu_codebook, "weight_arguments", lambda weight: (*original(weight)[:-1], original(weight)[-1].flip(0)))


def wrap_native_kernel(name: str, wrap) -> None:
    """The CPU backend's native module with kernel `name` replaced by wrap(original)."""
    import quantizer_plugin.cpu.native as native

    kernels = native.load()

    class Wrapped:
        def __getattr__(self, attribute):
            return wrap(getattr(kernels, name)) if attribute == name else getattr(kernels, attribute)

    patch(native, "load", lambda: Wrapped())


def shift_the_columns_of(*names: str) -> None:
    """The native kernels `names` multiply x with its columns rotated by one."""
    for name in names:
        wrap_native_kernel(name, lambda kernel: lambda x, *args: kernel(x.roll(1, -1).contiguous(), *args))


def cpu_tiles_take_the_columns_shifted():
    # the 4-bit tile kernel multiplies x with its columns rotated by one
    shift_the_columns_of("linear_4bit_tiles")


def cpu_bf16_decode_takes_the_columns_shifted():
    # the 4-bit bfloat16 decode kernel (vdpbf16ps, or AVX2's vpshufb lookups) multiplies x with its columns rotated
    shift_the_columns_of("gemv_4bit_bf16")


def cpu_kept_layers_take_the_columns_shifted():
    # the kept 16-bit head's kernel multiplies x with its columns rotated by one
    shift_the_columns_of("gemv_dense")


def cpu_fused_later_row_groups_take_the_columns_shifted():
    # the fused decode kernels' row tiles (csrc/simd.h's for_row_groups) give the activation rows past the first
    # group of 4 the products of their columns rotated by one
    def later_groups_shifted(kernel):
        def run(x, *args):
            y = kernel(x, *args)
            if x.shape[0] > 4:
                y[4:] = kernel(x[4:].roll(1, -1).contiguous(), *args)
            return y

        return run

    for name in ("gemv_4bit", "gemv_4bit_bf16", "gemv_affine", "gemv_affine_bf16", "gemv_int8"):
        wrap_native_kernel(name, later_groups_shifted)


def cpu_q8_kernels_take_the_columns_shifted():
    # the q8_0 integer kernels (4-bit codebooks and int4/int2, each AVX2's loop or AVX512-VNNI's where the shapes
    # let it run) multiply x with its columns rotated by one
    shift_the_columns_of("gemv_4bit_q8", "gemv_affine_q8")


def q8_rounding_ignores_the_span():
    # the native q8_0 rounding writes every span's codes in the 32-column order (the 64- and 128-column kernels'
    # order lost)
    wrap_native_kernel("quantize_q8_0", lambda kernel: lambda x, per_byte, span: kernel(x, per_byte, 32))


def cpu_fp8_kernels_read_the_other_encoding():
    # every native fp8 kernel decodes e4m3fn bytes as e5m2 and e5m2 bytes as e4m3fn
    for name in ("gemv_float8", "linear_float8_tiles", "linear_float8_chunked", "dequantize_float8"):
        wrap_native_kernel(name, lambda kernel: lambda x, weight, scale, block, exponent_bits, *rest: kernel(
            x, weight, scale, block, 9 - exponent_bits, *rest))


def triton_fp8_drops_the_sign():
    # the generic Triton kernel's fp8 tiles decode every byte as its magnitude (the sign bit ignored)
    import triton
    import triton.language as tl

    import quantizer_plugin.kernels.dequant_matmul as kernels

    original = kernels._float8_tile

    @triton.jit
    def magnitudes(packed_ptr, scale_ptr, rows, k0, N, K, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                   EXPONENT_BITS: tl.constexpr):  # fmt: skip
        return tl.abs(original(packed_ptr, scale_ptr, rows, k0, N, K, BLOCK_K, GROUP, EXPONENT_BITS))

    patch(kernels, "_float8_tile", magnitudes)


def huge_pages_never_advised():
    # the weights copied into their own mapping, but the kernel never asked for huge pages (no madvise)
    import mmap
    import types

    from quantizer_plugin import huge_pages

    class WithoutAdvice(mmap.mmap):
        def madvise(self, *args):
            pass

    names = ("MAP_PRIVATE", "MAP_ANONYMOUS", "MADV_HUGEPAGE")
    patch(huge_pages, "mmap", types.SimpleNamespace(mmap=WithoutAdvice, **{n: getattr(mmap, n) for n in names}))


def head_quantized_as_the_other_layers():
    # LowBitConfig.head's format ignored: the head quantized in the other layers' scheme
    from quantizer_plugin import LowBitConfig

    patch(LowBitConfig, "head_scheme", property(lambda self: None if self.head is None else self.scheme))


def q8_reference_keeps_the_exact_codebook():
    # the q8_0 mode's reference multiplies the codebook as stored, not rounded to int8 steps as the kernels do
    import torch

    from quantizer_plugin.formats.activations import Q8Activations
    from quantizer_plugin.formats.records import CodebookWeight

    multiplied = Q8Activations.multiplied_weight
    patch(Q8Activations, "multiplied_weight", lambda self, weight: weight.dequantize(torch.float32)
          if isinstance(weight, CodebookWeight) else multiplied(self, weight))  # fmt: skip


def head_left_to_torch():
    # loading leaves the 16-bit head a plain nn.Linear (torch's matmul), not a KeptLinear on our kernels
    from quantizer_plugin.modules import KeptLinear

    patch(KeptLinear, "keep", staticmethod(lambda module: False))


def cpu_kernels_called_directly_under_compile():
    # the CPU backend calls its pybind11 kernels even while torch.compile traces (each call breaks the graph)
    from quantizer_plugin.cpu import library

    patch(library, "call", lambda kernels, name, *args: getattr(kernels, name)(*args))


def cpu_input_gradients_not_ops_under_compile():
    # the CPU backend's input gradients run their Python chunk loop (a native call per chunk) while torch.compile traces
    from quantizer_plugin.cpu import affine, codebook4bit, int8

    for module in (affine, codebook4bit, int8):
        patch(module, "grad_input", module.grad_input.__wrapped__)


def triton_launchers_not_ops_under_compile():
    # the Triton entry points call the launchers' Python while torch.compile traces, not the custom ops wrapping them
    from quantizer_plugin.formats.records import from_op_arguments
    from quantizer_plugin.kernels import dequant_matmul, int8_backward, int8_matmul, library

    def record(family, tensors, settings):
        return from_op_arguments(family, tensors, settings)

    patch(library, "dequant_matmul_op", lambda x, family, tensors, settings, bias: dequant_matmul.dequant_matmul(
        x, record(family, tensors, settings), bias, check_weight=False))  # fmt: skip
    patch(library, "dequant_matmul_grad_input_op", lambda grad_y, family, tensors, settings: (
        dequant_matmul.dequant_matmul_grad_input(grad_y, record(family, tensors, settings), check_weight=False)))
    patch(library, "int8_linear_op", lambda x, weight, scale, bias, threshold: int8_matmul.int8_linear(
        x, weight, scale, bias, threshold, check_operands=False))  # fmt: skip
    patch(library, "int8_grad_input_op", int8_backward.int8_grad_input)


def kernels_not_prepared_when_layers_load():
    # loading a model leaves the CPU backend's first-use work (the native build) to the first forward
    from quantizer_plugin import ops

    patch(ops, "prepare", lambda format_name, device: None)


def convert_export_drops_the_nested_offset():
    # the export to bitsandbytes writes each layer's double-quant offset as 0
    import json

    import torch

    from quantizer_plugin.checkpoints import bitsandbytes, convert

    original = convert.EXPORTERS["bitsandbytes"]

    def without_offset(plan, quantization, shapes):
        exported = original(plan, quantization, shapes)
        for key in [key for key in plan.keys() if bitsandbytes.QUANT_STATE in key]:
            shard, produce = plan.entries[key]
            state = json.loads(bytes(produce().tolist()).decode())
            if "nested_offset" in state:
                state["nested_offset"] = 0.0
                tensor = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
                plan.put(key, shard, lambda tensor=tensor: tensor)
        return exported

    patch(convert, "EXPORTERS", dict(convert.EXPORTERS, bitsandbytes=without_offset))  # the exporters by library


def fp8_import_tiles_the_block_scales():
    # the FP8 importer spreads the blocks' scales over the rows in the wrong order: the grid tiled (block row 0, 1, 0,
    # 1, ...) where each block row's scale belongs on its block_m consecutive rows
    from quantizer_plugin.checkpoints import convert

    original = convert.IMPORTERS["fp8"]

    def tiled(plan, quantization, shapes):
        imported = original(plan, quantization, shapes)
        for key in [key for key in plan.keys() if key.endswith(".weight_scale")]:
            shard, produce = plan.entries[key]
            rows = plan.source.headers[key.removesuffix("_scale") + "_scale_inv"].shape
            block_rows = produce().shape[0] // rows[0] if len(rows) == 2 else 1

            def reordered(produce=produce, rows=rows, block_rows=block_rows):
                scales = produce()
                grid = scales[::block_rows] if block_rows > 1 else scales
                return grid.repeat(block_rows, 1)

            plan.put(key, shard, reordered)
        return imported

    patch(convert, "IMPORTERS", dict(convert.IMPORTERS, fp8=tiled))  # the importers by quant_method


def cpu_int8_tiles_take_the_columns_shifted():
    shift_the_columns_of("linear_int8_amx")


def cpu_llm_int8_takes_the_columns_shifted():
    # LLM.int8's register tiles (VNNI, AVX2 or plain C++) multiply x with its columns rotated by one
    shift_the_columns_of("linear_llm_int8")


def cpu_llm_int8_tiles_take_the_columns_shifted():
    shift_the_columns_of("linear_llm_int8_tiles")


def cpu_affine_fused_drops_the_zero_points():
    # the int4/int2 fused kernel handed zero points of 0 (as if the format were symmetric)
    import torch

    def without_zero_points(kernel):
        return lambda x, packed, scale, zero, *rest: kernel(x, packed, scale, torch.zeros_like(zero), *rest)

    wrap_native_kernel("gemv_affine", without_zero_points)


def cpu_affine_tiles_take_the_columns_shifted():
    shift_the_columns_of("linear_affine_tiles")


def cpu_quantizer_shifts_the_absmax():
    # the native 4-bit quantizer pairs each block with its neighbour's absmax
    def shifted(kernel):
        def quantize(*args):
            codes, absmax, finite = kernel(*args)
            return codes, absmax.roll(1), finite

        return quantize

    wrap_native_kernel("quantize_4bit", shifted)


def cpu_int8_runs_the_reference():
    from quantizer_plugin import ops

    ops.load_kernels("cpu")
    for mode in (None, "int8"):
        ops.register_kernel("rowscaled8", "cpu", activations=mode)(ops.reference_forward)


def cpu_llm_int8_runs_weight_only():
    from quantizer_plugin import ops
    from quantizer_plugin.cpu import int8 as cpu_int8

    ops.load_kernels("cpu")
    ops.register_kernel("rowscaled8", "cpu", activations="int8")(cpu_int8.linear_forward)


def cpu_llm_int8_drops_the_outliers():
    from quantizer_plugin.cpu import library

    original = library.call

    def call(kernels, name, *args):
        if name in ("linear_llm_int8", "linear_llm_int8_tiles"):
            args = (*args[:-2], 0.0, args[-1])  # the threshold: no column is an outlier
        return original(kernels, name, *args)

    patch(library, "call", call)


def affine_fit_is_round_to_nearest():
    from quantizer_plugin.formats import affine

    patch(affine, "HQQ_STEPS", 0)
    patch(affine, "LEAST_SQUARES_STEPS", 0)


def codebook_record_always_nf4():
    from quantizer_plugin.formats.codebook4bit import Codebook4BitFormat
    from quantizer_plugin.formats.nf4 import NF4_CODE

    original = Codebook4BitFormat.record
    patch(Codebook4BitFormat, "record", lambda self, *args: replace(original(self, *args), code=NF4_CODE))


def affine_codes_packed_low_bits_first():
    import torch

    from quantizer_plugin.formats import affine, records
    from quantizer_plugin.formats.affine import IntAffineFormat

    original_pack, original_unpack = IntAffineFormat.pack, records.unpack_codes

    def pack(self, codes):
        if self.bits == 3:  # int3's bit planes have their own breakage
            return original_pack(self, codes)
        n, k = codes.shape
        per = 8 // self.bits
        codes = torch.nn.functional.pad(codes.to(torch.uint8), (0, -(-k // per) * per - k)).reshape(n, -1, per)
        packed = torch.zeros(codes.shape[:2], dtype=torch.uint8)
        for j in range(per):
            packed |= codes[..., j] << (self.bits * j)
        return packed

    def unpack_codes(packed, bits, in_features):
        if bits == 3:
            return original_unpack(packed, bits, in_features)
        codes = torch.stack([(packed >> (bits * j)) & (2**bits - 1) for j in range(8 // bits)], dim=-1)
        return codes.reshape(packed.shape[0], -1)[:, :in_features]

    patch(IntAffineFormat, "pack", pack)
    patch(records, "unpack_codes", unpack_codes)  # the records' dequantize and the format's unpack read it
    patch(affine, "unpack_codes", unpack_codes)


def int3_planes_in_reverse():
    # int3's bit planes written and read highest bit first (the format's pack and unpack agree with each other, but
    # not with the documented layout the kernels and the oracle read)
    import torch

    from quantizer_plugin.formats import affine, records
    from quantizer_plugin.formats.affine import IntAffineFormat

    original_pack, original_unpack = IntAffineFormat.pack, records.unpack_codes
    reverse = torch.tensor([0, 4, 2, 6, 1, 5, 3, 7], dtype=torch.uint8)  # the 3-bit code with its bits reversed

    def pack(self, codes):
        return original_pack(self, reverse[codes.long()] if self.bits == 3 else codes)

    def unpack_codes(packed, bits, in_features):
        codes = original_unpack(packed, bits, in_features)
        return reverse[codes.long()] if bits == 3 else codes

    patch(IntAffineFormat, "pack", pack)
    patch(records, "unpack_codes", unpack_codes)
    patch(affine, "unpack_codes", unpack_codes)


def cpu_int3_kernels_take_the_columns_shifted():
    # the native affine kernels multiply int3 layers' x with its columns rotated by one (int4/int2 untouched)
    for name in ("gemv_affine_bf16", "gemv_affine", "linear_affine_tiles"):
        wrap_native_kernel(name, lambda kernel: lambda x, packed, scale, zero, bits, block: kernel(
            x.roll(1, -1).contiguous() if bits == 3 else x, packed, scale, zero, bits, block))


def gptq_hessian_is_the_identity():
    # GPTQ handed the identity instead of each layer's Hessian: no error moves, every code rounds to nearest
    import torch

    from quantizer_plugin import gptq

    original = gptq.gptq_codes
    patch(gptq, "gptq_codes", lambda weight, hessian, *args, **kwargs: original(
        weight, torch.eye(hessian.shape[0]), *args, **kwargs))


def gptq_act_order_not_undone():
    # GPTQ's codes left in act-order's column order instead of put back in the weight's own
    import torch

    from quantizer_plugin import gptq

    def permuted(weight, hessian, grid, settings=gptq.GPTQSettings()):
        codes = original(weight, hessian, grid, settings)
        if not settings.act_order:
            return codes
        order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
        return codes[:, order]

    original = gptq.gptq_codes
    patch(gptq, "gptq_codes", permuted)


def gptq_refit_ignores_the_hessian():
    # GPTQ's scales re-fitted to each row's weight error (the identity) instead of its output error (the Hessian)
    import torch

    from quantizer_plugin import gptq

    original = gptq.AffineGrid.refit_scales
    patch(gptq.AffineGrid, "refit_scales", lambda self, weight, codes, hessian, damp: original(
        self, weight, codes, torch.eye(hessian.shape[0]), damp))


def static_activations_ignore_the_input_scale():
    import torch
    from quantizer_plugin.formats import base

    activations = base.WeightFormat.activations

    def unit_scale(self, scheme, tensors=None):
        record = activations(self, scheme, tensors)
        if tensors and getattr(record, "input_scale", None) is not None:
            return replace(record, input_scale=torch.ones_like(record.input_scale))
        return record

    patch(base.WeightFormat, "activations", unit_scale)


def smoothquant_factor_on_the_wrong_side():
    from quantizer_plugin import activation_scales

    patch(activation_scales, "input_factors", lambda s: s)  # inputs multiplied by s, as the weights are


MUTATIONS: dict[str, Mutation] = {
    "4bit-dequantize-returns-zeros": Mutation(
        "4-bit dequantize returns zeros", dequantize_4bit_returns_zeros,
        ("tests/test_dispatch.py", "tests/test_loading.py::test_dequantize_returns_an_ordinary_model_in_the_source_dtype_unless_asked",
         "tests/test_loading.py::test_save_and_reload_without_config_is_bit_exact")),
    "4bit-kernel-falls-back": Mutation(
        "the 4-bit Triton entry points silently replaced by the torch reference",
        kernel_4bit_falls_back_to_the_reference,
        ("tests/test_kernels_4bit.py::test_quantized_llama_runs_on_the_kernels",)),
    "int8-kernel-runs-the-reference": Mutation(
        "the int8 Triton forward and backward call the reference", kernel_int8_entry_points_run_the_reference,
        ("tests/test_kernels_int8.py::test_layer_forward_and_backward_use_the_kernels",)),
    "int8-no-outlier-decomposition": Mutation(
        "LLM.int8 reference without the outlier decomposition (threshold 0)",
        int8_reference_without_outlier_decomposition, ("tests/test_dispatch.py",)),
    "cli-fidelity-self-comparison": Mutation(
        "the CLI's embedding cosine compares the quantized model with itself",
        cli_fidelity_compares_the_model_with_itself,
        ("tests/test_cli.py::test_an_encoders_fidelity_is_the_independently_computed_embedding_cosine",)),
    "cli-divergence-self-comparison": Mutation(
        "the CLI's KL divergence for causal LMs compares the quantized model with itself",
        cli_divergence_compares_the_model_with_itself,
        ("tests/test_cli.py::test_a_causal_lms_fidelity_is_perplexity_and_divergence_on_text",)),
    "benchmarks-time-nothing": Mutation(
        "the benchmarks time nothing", benchmarks_time_nothing,
        ("tests/test_benchmarks.py::test_a_provider_slowed_on_purpose_is_timed_slower",)),
    "benchmarks-zero-error": Mutation(
        "the benchmarks report zero error", benchmarks_report_zero_error,
        ("tests/test_benchmarks.py::test_gemm_4bit_smoke_run_writes_rows_and_report_and_results_collects_it",)),
    "find-key-without-fallbacks": Mutation(
        "serialization.find_key without its base_model_prefix fallbacks", serialization_key_without_prefix_fallbacks,
        ("tests/test_bad_checkpoints.py",)),
    "lora-detaches-base-input": Mutation(
        "the LoRA wrapper detaches the base layer's input", lora_detaches_the_base_layers_input,
        ("tests/test_peft.py::test_lora_layer_gradients_match_an_independent_oracle",)),
    "parameter-count-uncorrected": Mutation(
        "num_parameters and PEFT count stored elements", parameter_count_uncorrected,
        ("tests/test_parameter_count.py",)),
    "old-layout-not-upgraded": Mutation(
        "a version-1 checkpoint stays version 1 in memory", old_layout_checkpoints_not_upgraded,
        ("tests/test_layout.py",)),
    "layout-back-to-1d": Mutation(
        "the 4-bit layout stores 1-D packed codes and a 0-d offset again", stored_layout_back_to_1d,
        ("tests/test_layout.py", "tests/test_fsdp.py::test_no_stored_tensor_is_a_scalar")),
    "skip-patterns-unchecked": Mutation(
        "a skip pattern matching no module is accepted", skip_patterns_unchecked,
        ("tests/test_loading.py::test_a_skip_name_that_matches_no_module_is_refused_naming_it",)),
    "dequantize-ignores-offload": Mutation(
        "dequantize() leaves offloaded layers on meta", dequantize_ignores_offloaded_layers,
        ("tests/test_offload.py::test_dequantize_keeps_offloaded_layers_offloaded_and_equal",)),
    "cli-sizes-assume-float32": Mutation(
        "the CLI reports source sizes in float32", cli_sizes_assume_float32,
        ("tests/test_cli.py::test_size_report_uses_the_source_checkpoints_dtype",)),
    "convert-trusts-shard-names": Mutation(
        "the converter opens and writes the shard names an index gives, unchecked", shard_names_trusted,
        ("tests/test_untrusted_checkpoints.py::test_a_shard_name_leading_outside_the_folder_is_refused_before_anything_is_written",
         "tests/test_untrusted_checkpoints.py::test_a_shard_that_is_a_symbolic_link_out_of_the_folder_is_refused")),
    "convert-reads-everything-first": Mutation(
        "the converter reads every tensor of the checkpoint before writing the first shard",
        converter_reads_the_whole_checkpoint_first,
        ("tests/test_convert.py::test_a_sharded_checkpoint_is_converted_one_shard_in_memory_at_a_time",)),
    "cpu-native-unavailable": Mutation(
        "the CPU backend's native kernels silently missing (the reference runs)", cpu_native_kernels_unavailable,
        ("tests/test_cpu_backend.py::test_4bit_forward_matches_the_oracle_and_runs_the_native_kernels",)),
    "cpu-wrong-codebook": Mutation(
        "the CPU kernels handed the codebook in reverse", cpu_fused_kernel_reads_the_wrong_codebook,
        ("tests/test_cpu_backend.py::test_4bit_forward_matches_the_oracle_and_runs_the_native_kernels",)),
    "cpu-tiles-shifted-columns": Mutation(
        "the AMX tile kernel's activation columns off by one", cpu_tiles_take_the_columns_shifted,
        ("tests/test_cpu_backend.py::test_the_tile_kernels_multiply_exactly_the_references_weights",), needs="amx"),
    "cpu-bf16-decode-shifted-columns": Mutation(
        "the 4-bit bfloat16 decode kernel's activation columns off by one", cpu_bf16_decode_takes_the_columns_shifted,
        ("tests/test_cpu_backend.py::test_the_bf16_decode_reads_every_weight_in_its_place",), needs="bf16_lookups"),
    "cpu-kept-head-shifted-columns": Mutation(
        "the kept 16-bit head's kernel reads the activations' columns off by one", cpu_kept_layers_take_the_columns_shifted,
        ("tests/test_kept_head.py::test_the_kernel_reads_every_weight_in_its_place",), needs="avx2"),
    "cpu-fused-later-row-groups-shifted": Mutation(
        "the fused decode kernels' activation rows past the first group of 4 read off by one column",
        cpu_fused_later_row_groups_take_the_columns_shifted,
        ("tests/test_cpu_backend.py::test_4bit_forward_matches_the_oracle_and_runs_the_native_kernels",
         "tests/test_cpu_backend.py::test_weight_only_int8_matches_the_oracle",
         "tests/test_cpu_affine.py"), needs="avx2"),
    "cpu-q8-shifted-columns": Mutation(
        "the q8_0 integer kernels (AVX2's and AVX512-VNNI's loops) read the activations' columns off by one",
        cpu_q8_kernels_take_the_columns_shifted,
        ("tests/test_q8_activations.py::test_the_q8_0_kernels_read_every_weight_in_its_place",), needs="avx2"),
    "q8-rounding-ignores-the-span": Mutation(
        "the native q8_0 rounding writes the codes of 64 and 128 columns in the order of 32", q8_rounding_ignores_the_span,
        ("tests/test_q8_activations.py::test_the_native_rounding_is_the_references_in_the_kernels_order",),
        needs="avx2"),
    "cpu-fp8-other-encoding": Mutation(
        "the native fp8 kernels decode e4m3fn bytes as e5m2 and e5m2 bytes as e4m3fn", cpu_fp8_kernels_read_the_other_encoding,
        ("tests/test_cpu_float8.py::test_fp8_forward_matches_the_oracle_and_runs_the_native_kernels",
         "tests/test_cpu_float8.py::test_native_dequantize_decodes_every_finite_bit_pattern_exactly")),
    "triton-fp8-drops-the-sign": Mutation(
        "the generic Triton kernel's fp8 tiles decode every byte as its magnitude", triton_fp8_drops_the_sign,
        ("tests/test_kernels_weight_only.py::test_every_tile_layout_dequantizes_exactly",)),
    "fp8-import-tiles-the-block-scales": Mutation(
        "the FP8 checkpoint importer puts the scales of a block row on the wrong rows", fp8_import_tiles_the_block_scales,
        ("tests/test_convert_fp8.py::test_an_fp8_checkpoint_converts_losslessly_and_runs_on_our_kernels",)),
    "static-input-scale-ignored": Mutation(
        "static activations run on a step of 1, not the calibrated input_scale", static_activations_ignore_the_input_scale,
        ("tests/test_static_activations.py::test_static_layer_computes_the_written_out_product",)),
    "smoothquant-factor-wrong-side": Mutation(
        "SmoothQuant multiplies the inputs by its factors, as the weights, instead of dividing them",
        smoothquant_factor_on_the_wrong_side,
        ("tests/test_static_activations.py::test_smoothquant_moves_the_outlier_channel_into_the_weights_and_keeps_each_product",)),
    "head-in-the-layers-format": Mutation(
        "LowBitConfig.head's format ignored: the head quantized as the other layers", head_quantized_as_the_other_layers,
        ("tests/test_quantized_head.py::test_the_head_holds_its_formats_rounding_and_the_logits_come_from_it",)),
    "q8-reference-exact-codebook": Mutation(
        "the q8_0 reference multiplies the codebook unrounded (the kernels round it to int8 steps)",
        q8_reference_keeps_the_exact_codebook,
        ("tests/test_q8_activations.py::test_the_reference_is_the_oracles_weights_times_the_rounded_activations",)),
    "head-left-to-torch": Mutation(
        "a quantized model's 16-bit head left to torch's matmul", head_left_to_torch,
        ("tests/test_kept_head.py::test_a_quantized_models_head_decodes_on_the_kernel_and_stays_an_ordinary_linear",)),
    "cpu-quantizer-shifted-absmax": Mutation(
        "the native 4-bit quantizer's absmax one block off", cpu_quantizer_shifts_the_absmax,
        ("tests/test_cpu_backend.py::test_the_native_quantizer_gives_the_formats_own_tensors",)),
    "cpu-int8-runs-the-reference": Mutation(
        "the CPU backend's int8 entry point runs LLM.int8's reference", cpu_int8_runs_the_reference,
        ("tests/test_cpu_backend.py::test_weight_only_int8_matches_the_oracle",
         "tests/test_cpu_backend.py::test_llm_int8_is_the_references_and_the_oracles")),
    "cpu-llm-int8-runs-weight-only": Mutation(
        "the CPU backend runs LLM.int8 layers weight-only (16-bit activations)", cpu_llm_int8_runs_weight_only,
        ("tests/test_cpu_backend.py::test_llm_int8_is_the_references_and_the_oracles",)),
    "cpu-llm-int8-drops-outliers": Mutation(
        "the CPU's LLM.int8 kernel treats no column as an outlier", cpu_llm_int8_drops_the_outliers,
        ("tests/test_cpu_backend.py::test_llm_int8_is_the_references_and_the_oracles",
         "tests/test_int8.py::test_outlier_decomposition_helps")),
    "cpu-kernels-not-custom-ops-under-compile": Mutation(
        "the CPU kernels called as pybind11 functions while torch.compile traces",
        cpu_kernels_called_directly_under_compile,
        ("tests/test_compile.py::test_a_quantized_layer_traces_without_a_graph_break",)),
    "cpu-input-gradients-not-ops-under-compile": Mutation(
        "the CPU input gradients traced as Python loops of pybind11 calls", cpu_input_gradients_not_ops_under_compile,
        ("tests/test_compile.py::test_a_compiled_lora_training_step_has_no_graph_break_and_eager_gradients[int8]",),
        slow=True),
    "triton-launchers-not-ops-under-compile": Mutation(
        "the Triton launchers traced as Python under torch.compile", triton_launchers_not_ops_under_compile,
        ("tests/test_compile_triton.py::test_a_layer_on_the_triton_kernels_traces_whole_and_compiles_to_eager",
         "tests/test_compile_triton.py::test_a_compiled_lora_training_step_on_the_triton_kernels_gives_eager_gradients"),
        slow=True),
    "kernels-not-prepared-on-load": Mutation(
        "the native build left to the first forward after loading", kernels_not_prepared_when_layers_load,
        ("tests/test_compile.py::test_a_prequantized_checkpoint_compiles_whole_on_its_first_forward",), slow=True),
    "convert-export-drops-nested-offset": Mutation(
        "the bitsandbytes export writes double quant's offset as 0", convert_export_drops_the_nested_offset,
        ("tests/test_convert.py::test_our_checkpoint_exports_to_one_bitsandbytes_loads",)),
    "cpu-int8-tiles-shifted-columns": Mutation(
        "the AMX-INT8 kernel's activation columns off by one", cpu_int8_tiles_take_the_columns_shifted,
        ("tests/test_cpu_backend.py::test_the_int8_tile_kernel_is_within_its_activation_split_of_the_exact_product",), needs="amx_int8"),
    "cpu-llm-int8-shifted-columns": Mutation(
        "LLM.int8's register-tile kernel takes the activation columns off by one", cpu_llm_int8_takes_the_columns_shifted,
        ("tests/test_cpu_backend.py::test_llm_int8_is_the_references_and_the_oracles",)),
    "cpu-llm-int8-tiles-shifted-columns": Mutation(
        "LLM.int8's AMX-INT8 tile kernel takes the activation columns off by one",
        cpu_llm_int8_tiles_take_the_columns_shifted,
        ("tests/test_cpu_backend.py::test_llm_int8_on_the_int8_tiles_is_the_register_tiles_bit_for_bit",), needs="amx_int8"),
    "kernel-affine-ignores-zero-points": Mutation(
        "the Triton kernel reads int4/int2 with zero points of 0", kernel_affine_ignores_the_zero_points,
        ("tests/test_kernels_weight_only.py::test_every_tile_layout_dequantizes_exactly",)),
    "cpu-affine-fused-drops-zero-points": Mutation(
        "the int4/int2 fused kernel ignores the zero points", cpu_affine_fused_drops_the_zero_points,
        ("tests/test_cpu_affine.py::test_the_fused_kernel_needs_its_zero_points",), needs="avx2"),
    "huge-pages-never-advised": Mutation(
        "the streamed weights moved into their own mapping without asking for huge pages", huge_pages_never_advised,
        ("tests/test_huge_pages.py::test_the_streamed_weights_sit_in_one_mapping_advised_huge_and_compute_the_same",
         "tests/test_huge_pages.py::test_a_model_larger_than_a_huge_page_gets_huge_pages")),
    "gptq-identity-hessian": Mutation(
        "GPTQ rounds every layer against the identity instead of its Hessian", gptq_hessian_is_the_identity,
        ("tests/test_gptq.py::test_codes_are_the_papers_gptq_on_the_same_grid",
         "tests/test_gptq.py::test_gptq_removes_most_of_the_layer_error_that_rounding_to_nearest_leaves")),
    "gptq-act-order-not-undone": Mutation(
        "GPTQ's codes left in act-order's column order", gptq_act_order_not_undone,
        ("tests/test_gptq.py::test_codes_are_the_papers_gptq_on_the_same_grid",)),
    "gptq-refit-ignores-hessian": Mutation(
        "GPTQ's scales re-fitted to the weight error instead of the layer's output error", gptq_refit_ignores_the_hessian,
        ("tests/test_gptq.py::test_refitted_scales_lower_each_rows_output_error_and_keep_codes_and_zero_points",)),
    "int3-planes-in-reverse": Mutation(
        "int3's bit planes packed highest bit first", int3_planes_in_reverse,
        ("tests/test_integer_formats.py::test_stored_tensors_follow_the_documented_layout",)),
    "cpu-int3-shifted-columns": Mutation(
        "the native affine kernels read int3 layers' activation columns off by one", cpu_int3_kernels_take_the_columns_shifted,
        ("tests/test_cpu_affine.py::test_affine_forward_matches_the_oracle_and_runs_the_native_kernels",), needs="avx2"),
    "cpu-affine-tiles-shifted-columns": Mutation(
        "the int4/int2 AMX tile kernel's activation columns off by one", cpu_affine_tiles_take_the_columns_shifted,
        ("tests/test_cpu_affine.py::test_the_affine_tile_kernel_multiplies_exactly_the_references_weights",), needs="amx"),
    "affine-fit-is-round-to-nearest": Mutation(
        "int4/int2 fitted by plain round-to-nearest on min/max", affine_fit_is_round_to_nearest,
        ("tests/test_integer_formats.py::test_fit_beats_round_to_nearest_in_every_group_and_hqq_overall",)),
    "affine-codes-low-bits-first": Mutation(
        "int4/int2 codes packed from the low bits (pack and unpack agree, the documented layout does not)",
        affine_codes_packed_low_bits_first,
        ("tests/test_integer_formats.py::test_stored_tensors_follow_the_documented_layout",)),
    "codebook-record-always-nf4": Mutation(
        "a 4-bit codebook's record carries NF4's levels whatever the format (a kernel written for NF4 only)",
        codebook_record_always_nf4, ("tests/test_new_format.py",)),
}  # fmt: skip

# The runner's own control: nothing is broken, so the same machinery must report it as surviving.
CONTROL = Mutation("nothing is broken (the runner's control: must survive)", lambda: None,
                   ("tests/test_parameter_count.py",))  # fmt: skip



# --- the pytest plugin ----------------------------------------------------------------------------------------------


def pytest_configure(config):
    name = os.environ.get(ENV)
    if name:
        mutation(name).apply()


def mutation(name: str) -> Mutation:
    return CONTROL if name == "control" else MUTATIONS[name]


# --- the runner -----------------------------------------------------------------------------------------------------


OUTCOMES = {0: "SURVIVED", 1: "caught"}  # pytest's exit codes: all passed, some failed; anything else proves nothing
# What every run imports before any code of ours: the fork server imports these once. Third-party modules only, so
# that each run imports quantizer_plugin afresh (after TRITON_INTERPRET is set, and before its patch), as before.
PRELOAD = ("torch", "transformers", "transformers.models.llama.modeling_llama", "transformers.models.gpt2.modeling_gpt2",
           "safetensors.torch", "pytest", "hypothesis")  # fmt: skip


def outcome_of(exit_code: int) -> str:
    return OUTCOMES.get(exit_code, f"error (exit {exit_code})")


def arguments_for(name: str) -> list[str]:
    return ["-q", "-x", "-p", "no:cacheprovider", "-p", "mutation_check", *mutation(name).tests]


def run(name: str, threads: int | None = None) -> tuple[str, float]:
    """'caught', 'SURVIVED' or 'error (exit N)', and the seconds it took, in a fresh subprocess; `threads` caps
    torch's threads in the run (for runs side by side)."""
    env = dict(os.environ, **{ENV: name})
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("QUANTIZER_PLUGIN_KERNELS", None)
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", *arguments_for(name)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    return outcome_of(result.returncode), time.perf_counter() - started


def run_all(names: list[str], side_by_side: int = 1) -> dict[str, tuple[str, float]]:
    """Every breakage's outcome and seconds, `side_by_side` runs at a time (each with one torch thread when more
    than one), each forked from one server process (`--serve`) that has imported PRELOAD."""
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(side_by_side), *names]
    env = {key: value for key, value in os.environ.items() if key not in (ENV, "QUANTIZER_PLUGIN_KERNELS")}
    env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's OpenBLAS would start a thread pool on import: fork needs one thread
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or len(reports) != len(names):
        raise RuntimeError(f"the mutation server failed (exit {result.returncode}): {result.stderr[-3000:]}")
    return {report["name"]: (report["outcome"], report["seconds"]) for report in reports}


def _forking_is_safe() -> bool:
    """fork copies only the calling thread: with others alive (an OpenMP pool, say) the child may deadlock."""
    tasks = Path("/proc/self/task")
    return hasattr(os, "fork") and tasks.is_dir() and len(list(tasks.iterdir())) == 1


def _child(name: str, threads: int | None) -> None:
    """In the forked child: the breakage's tests, as `python -m pytest` in ROOT would run them; never returns."""
    code = 3
    try:
        os.environ[ENV] = name
        if threads:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            import torch

            torch.set_num_threads(threads)
        os.chdir(ROOT)
        sys.path[:0] = [str(ROOT), str(TESTS)]  # as `python -m pytest` puts the working directory first
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        code = int(pytest.main(arguments_for(name)))
    finally:
        os._exit(code)


def serve(names: list[str], side_by_side: int) -> int:
    """Runs each breakage in a child of this process, `side_by_side` at a time; prints one JSON line per run."""
    for module in PRELOAD:
        importlib.import_module(module)
    threads = 1 if side_by_side > 1 else None
    if not _forking_is_safe():  # a subprocess per run, still side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(side_by_side) as pool:
            for name, (outcome, seconds) in zip(names, pool.map(lambda name: run(name, threads), names)):
                print(json.dumps({"name": name, "outcome": outcome, "seconds": seconds}), flush=True)
        return 0
    waiting, running = list(names), {}
    while waiting or running:
        while waiting and len(running) < side_by_side:
            name = waiting.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(name, threads)
            running[pid] = (name, time.perf_counter())
        if running:
            pid, status = os.wait()
            name, started = running.pop(pid)
            outcome = outcome_of(os.waitstatus_to_exitcode(status))
            print(json.dumps({"name": name, "outcome": outcome, "seconds": time.perf_counter() - started}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--serve"]:  # run_all's server: --serve SIDE_BY_SIDE NAME...
        return serve(sys.argv[3:], int(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="breakages to apply (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breakages and exit")
    parser.add_argument("--side-by-side", type=int, default=1, help="runs at a time (default 1)")
    args = parser.parse_args(argv)
    if args.list:
        for name, entry in MUTATIONS.items():
            print(f"{name}: {entry.description}")
        return 0
    unknown = [name for name in args.names if name not in MUTATIONS]
    if unknown:
        parser.error(f"unknown breakages {unknown}; --list names them")
    names = args.names or list(MUTATIONS)
    results = run_all(names, args.side_by_side)
    failed = 0
    for name in names:
        outcome, seconds = results[name]
        failed += outcome != "caught"
        print(f"{outcome:>16}  {seconds:5.1f} s  {name}: {MUTATIONS[name].description}", flush=True)
    print(f"{len(names) - failed} of {len(names)} breakages caught")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
