"""The CPU backend behind the dispatch seam (quantizer_plugin.ops): fast paths for every format on CPU tensors.

- NF4/FP4 (codebook4bit.py), int4/int2 (affine.py) and weight-only int8 (int8.py): native C++ kernels (csrc/,
  built on first use by native.py): a fused dequantize-and-multiply for decode-sized batches, AMX tiles where the
  CPU has them, and for other batches a dequantize of L2-sized row chunks into the compute dtype, each multiplied
  by torch's own GEMM (oneDNN) on the thread that dequantized it (chunks.py).
- LLM.int8 (int8.py): int8 activations times the int8 weight in exact int32 sums, outlier columns in float, at
  every batch size (csrc/llm_int8.cpp).
- fp8 (float8.py): the same paths as weight-only int8, each byte turned into a float16 by moving its bits.
- Kept 16-bit layers (dense.py): the output head a quantized model keeps in 16-bit, streamed once per decode step
  (csrc/dense.cpp).

ops.py imports this package on the first call with a CPU tensor; importing it registers the kernels and builds
nothing. The native build happens when quantized layers are made or loaded on the CPU (ops.prepare), or else on
first use.
"""

from ..ops import register_preparation
from . import affine, codebook4bit, dense, float8, int8, native  # noqa: F401  (registration side effect)

register_preparation("cpu", native.load)
