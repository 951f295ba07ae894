"""The native forward kernels as torch custom ops, so that torch.compile keeps each call as one node of its graph.

torch.compile cannot trace into a pybind11 function: each native call would break the graph. Under compile the CPU
backend's entry points call the kernels through the ops registered here (`torch.ops.quantizer_plugin.<name>`), each
with a fake implementation that gives the output's shape, dtype and strides without running anything. Eager calls go to the
native module directly (`call` below), which skips the dispatcher's few microseconds per call.

Every forward kernel returns y (M, N): float32 and contiguous for the fused, tile and AMX-INT8 kernels; for the
chunked ones in x's dtype, as the transpose of the (N, M) buffer their threads write by rows of the weight. N is the
weight's first dimension, or the `N` argument of the 4-bit codebook kernels (their weight is flat).
"""

from __future__ import annotations

import torch

from . import native


# What the fake implementations need: the number of output columns, from the arguments (x first).
def _weight_rows(args) -> int:
    return args[1].shape[0]


def _n_argument(args) -> int:  # the 4-bit codebook kernels' weight is flat: N is an argument
    return args[8]


_CODEBOOK = ("Tensor x, Tensor packed, Tensor absmax, Tensor codes, Tensor scales, Tensor offset, Tensor code8, "
             "Tensor lut, int N, int block")  # fmt: skip
_AFFINE = "Tensor x, Tensor packed, Tensor scale, Tensor zero, int bits, int block"
_INT8 = "Tensor x, Tensor weight, Tensor scale"
FLOAT32, CHUNKED = "float32", "chunked"
# name -> (arguments, output columns, output layout)
FORWARD_OPS = {
    "gemv_4bit": (_CODEBOOK, _n_argument, FLOAT32),
    "gemv_4bit_bf16": (_CODEBOOK, _n_argument, FLOAT32),
    "linear_4bit_tiles": (_CODEBOOK, _n_argument, FLOAT32),
    "linear_4bit_chunked": (_CODEBOOK + ", bool grouped, int rows_per_chunk", _n_argument, CHUNKED),
    "gemv_int8": (_INT8, _weight_rows, FLOAT32),
    "linear_int8_amx": (_INT8, _weight_rows, FLOAT32),
    "linear_int8_tiles": (_INT8, _weight_rows, FLOAT32),
    "linear_int8_chunked": (_INT8 + ", int rows_per_chunk", _weight_rows, CHUNKED),
    "gemv_affine": (_AFFINE, _weight_rows, FLOAT32),
    "gemv_affine_bf16": (_AFFINE, _weight_rows, FLOAT32),
    "linear_affine_tiles": (_AFFINE, _weight_rows, FLOAT32),
    "linear_affine_chunked": (_AFFINE + ", int rows_per_chunk", _weight_rows, CHUNKED),
}
_library = torch.library.Library("quantizer_plugin", "DEF")


def _register(name: str, arguments: str, columns, output: str) -> None:
    _library.define(f"{name}({arguments}) -> Tensor")

    def kernel(*args):
        return getattr(native.load(), name)(*args)

    def fake(*args):
        x = args[0]
        if output == FLOAT32:
            return x.new_empty((x.shape[0], columns(args)), dtype=torch.float32)
        return x.new_empty((columns(args), x.shape[0])).t()

    torch.library.impl(f"quantizer_plugin::{name}", "CPU", lib=_library)(kernel)
    torch.library.register_fake(f"quantizer_plugin::{name}", lib=_library)(fake)


for _name, _spec in FORWARD_OPS.items():
    _register(_name, *_spec)


def call(kernels, name: str, *args) -> torch.Tensor:
    """Forward kernel `name` of the native module `kernels`: through its custom op while torch.compile traces, directly
    otherwise."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.quantizer_plugin, name)(*args)
    return getattr(kernels, name)(*args)
