"""The native forward kernels and the input gradients as torch custom ops, so that torch.compile keeps each call as one
node of its graph.

torch.compile cannot trace into a pybind11 function: each native call would break the graph. Under compile the CPU
backend's entry points call the kernels through the ops defined here (`torch.ops.quantizer_plugin.<name>`), each
with a fake implementation that gives the output's shape, dtype and strides without running anything; the native
module registers each op's CPU implementation in C++ when it loads (csrc/module.cpp). Eager calls go to the
native module directly (`call` below), which skips the dispatcher's few microseconds per call.

The input gradients (LoRA's backward) are Python loops over weight chunks, each dequantized by a native call
(chunks.py). `grad_input_op` makes each such function an op of its own, so that a compiled training step's backward
graph holds one node per layer rather than breaking at every chunk.

Every forward kernel returns a contiguous y (M, N): float32 for the fused, tile and AMX-INT8 kernels; in x's dtype
for the chunked ones, whose threads write it a chunk of columns at a time. N is the weight's first dimension, or the
`N` argument of the 4-bit codebook kernels (their weight is flat).
"""

from __future__ import annotations

import functools

import torch


# The weight's arguments of each family, after the activations: the fields of its record (formats/records.py), None
# where the format does not store one; and the output's number of columns, from the arguments by name.
CODEBOOK_WEIGHT = ("Tensor packed, Tensor? absmax, Tensor? absmax_code, Tensor? absmax_scale, Tensor? absmax_offset, "
                   "Tensor? dynamic_code, Tensor code")  # fmt: skip
AFFINE_WEIGHT = "Tensor packed, Tensor scale, Tensor zero, int bits, int block"
INT8_WEIGHT = "Tensor weight, Tensor scale"
FLOAT8_WEIGHT = "Tensor weight, Tensor scale, int block, int exponent_bits"
_CODEBOOK = f"Tensor x, {CODEBOOK_WEIGHT}, int N, int block"
_AFFINE = f"Tensor x, {AFFINE_WEIGHT}"
_INT8 = f"Tensor x, {INT8_WEIGHT}"
_FLOAT8 = f"Tensor x, {FLOAT8_WEIGHT}"


def _n_argument(arguments: dict) -> int:  # the 4-bit codebook kernels' weight is flat: N is an argument
    return arguments["N"]


def _weight_rows(arguments: dict) -> int:
    return (arguments["packed"] if "packed" in arguments else arguments["weight"]).shape[0]


FLOAT32, CHUNKED = "float32", "chunked"
# name -> (arguments, output columns, output layout)
FORWARD_OPS = {
    "gemv_4bit": (_CODEBOOK, _n_argument, FLOAT32),
    "gemv_4bit_bf16": (_CODEBOOK, _n_argument, FLOAT32),
    "gemv_4bit_q8": (_CODEBOOK, _n_argument, FLOAT32),  # activations="q8_0"
    "linear_4bit_tiles": (_CODEBOOK, _n_argument, FLOAT32),
    "linear_4bit_chunked": (_CODEBOOK + ", bool grouped, int rows_per_chunk", _n_argument, CHUNKED),
    "gemv_int8": (_INT8, _weight_rows, FLOAT32),
    "linear_int8_amx": (_INT8, _weight_rows, FLOAT32),
    "linear_int8_tiles": (_INT8, _weight_rows, FLOAT32),
    "linear_int8_chunked": (_INT8 + ", int rows_per_chunk", _weight_rows, CHUNKED),
    # LLM.int8 (activations="int8"), or static int8 activations with their input_scale (activations="int8_static")
    "linear_llm_int8": (_INT8 + ", float threshold, Tensor? input_scale", _weight_rows, FLOAT32),
    "linear_llm_int8_tiles": (_INT8 + ", float threshold, Tensor? input_scale", _weight_rows, FLOAT32),
    "gemv_affine": (_AFFINE, _weight_rows, FLOAT32),
    "gemv_affine_bf16": (_AFFINE, _weight_rows, FLOAT32),
    "gemv_affine_q8": (_AFFINE, _weight_rows, FLOAT32),  # activations="q8_0"
    "linear_affine_tiles": (_AFFINE, _weight_rows, FLOAT32),
    "linear_affine_chunked": (_AFFINE + ", int rows_per_chunk", _weight_rows, CHUNKED),
    "gemv_float8": (_FLOAT8, _weight_rows, FLOAT32),
    "linear_float8_tiles": (_FLOAT8, _weight_rows, FLOAT32),
    "linear_float8_chunked": (_FLOAT8 + ", int rows_per_chunk", _weight_rows, CHUNKED),
    "gemv_dense": ("Tensor x, Tensor weight", _weight_rows, FLOAT32),  # a kept 16-bit layer (dense.py)
}
_library = torch.library.Library("quantizer_plugin", "DEF")


def _register(name: str, arguments: str, columns, output: str) -> None:
    _library.define(f"{name}({arguments}) -> Tensor")
    names = [argument.split()[-1] for argument in arguments.split(", ")]

    def fake(*args):
        x, n = args[0], columns(dict(zip(names, args)))
        return x.new_empty((x.shape[0], n), dtype=torch.float32 if output == FLOAT32 else x.dtype)

    # The CPU implementation is the native function itself, registered by the native module when it loads
    # (csrc/module.cpp), which every caller has loaded before it calls an op.
    torch.library.register_fake(f"quantizer_plugin::{name}", lib=_library)(fake)


for _name, _spec in FORWARD_OPS.items():
    _register(_name, *_spec)


def call(kernels, name: str, *args) -> torch.Tensor:
    """Forward kernel `name` of the native module `kernels`: through its custom op while torch.compile traces, directly
    otherwise."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.quantizer_plugin, name)(*args)
    return getattr(kernels, name)(*args)


GRAD_INPUT_OPS: dict[str, object] = {}  # name -> the entry point grad_input_op returned


def grad_input_op(name: str, weight_arguments: str):
    """Decorator making `fn(g, *weight arguments, K) -> grad_x` ((M, K) float32, a new tensor) the op
    quantizer_plugin::<name>. The function it returns calls the op while torch.compile traces, `fn` otherwise."""

    def register(fn):
        _library.define(f"{name}(Tensor g, {weight_arguments}, int K) -> Tensor")
        torch.library.impl(f"quantizer_plugin::{name}", "CPU", lib=_library)(fn)

        def fake(g, *args):
            return g.new_empty((g.shape[0], args[-1]), dtype=torch.float32)

        torch.library.register_fake(f"quantizer_plugin::{name}", lib=_library)(fake)

        @functools.wraps(fn)
        def entry(*args):
            if torch.compiler.is_compiling():
                return getattr(torch.ops.quantizer_plugin, name)(*args)
            return fn(*args)

        GRAD_INPUT_OPS[name] = entry
        return entry

    return register
