// The Python module of the CPU kernels (built by quantizer_plugin/cpu/native.py).

#include <torch/extension.h>
#include <torch/library.h>

#include "kernels.h"

using namespace quantizer_plugin;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_4bit", &gemv_4bit, "y = x @ dequant(W).T for a few float32 activation rows");
  m.def("dequantize_4bit", &dequantize_4bit,
        "dequantize elements [begin, end) of a packed 4-bit weight into out (grouped: each 32 as evens, then odds)");
  m.def("gemv_int8", &gemv_int8, "y = x @ dequant(W).T for a few float32 activation rows, int8 weight");
  m.def("dequantize_int8", &dequantize_int8, "dequantize rows [first, last) of an int8 weight into out");
  m.def("linear_4bit_chunked", &linear_4bit_chunked, "x @ W.T, W dequantized in row chunks per thread");
  m.def("linear_int8_chunked", &linear_int8_chunked, "x @ W.T, W dequantized in row chunks per thread");
  m.def("gemv_4bit_bf16", &gemv_4bit_bf16, "y = x @ dequant(W).T for a few bfloat16 activation rows");
  m.def("linear_4bit_tiles", &linear_4bit_tiles, "x @ W.T for bfloat16 x on the AMX tiles (x permuted as the codes are read)");
  m.def("linear_int8_tiles", &linear_int8_tiles, "x @ W.T for bfloat16 x on the AMX tiles");
  m.def("quantize_4bit", &quantize_4bit, "the reference's nf4/fp4 quantization of a flat weight (codes identical)");
  m.def("quantize_int8", &quantize_int8, "the reference's int8 row quantization of a weight (values identical)");
  m.def("linear_int8_amx", &linear_int8_amx, "x @ W.T on the AMX-INT8 tiles (int8 weight, x split into int8 pieces)");
  m.def("uses_amx_int8", &has_amx_int8, "whether the AMX-INT8 kernel runs here (AMX-INT8 and the tile state granted)");
  m.def("gemv_affine", &gemv_affine, "y = x @ dequant(W).T for a few float32 activation rows, int4/int2 weight");
  m.def("gemv_affine_bf16", &gemv_affine_bf16, "y = x @ dequant(W).T for a few bfloat16 activation rows, int4/int2");
  m.def("linear_affine_tiles", &linear_affine_tiles, "x @ W.T for bfloat16 x on the AMX tiles, int4/int2 weight");
  m.def("dequantize_affine", &dequantize_affine, "dequantize rows [first, last) of an int4/int2 weight into out");
  m.def("linear_affine_chunked", &linear_affine_chunked, "x @ W.T, W (int4/int2) dequantized in row chunks per thread");
  m.def("uses_amx_bf16", &has_amx_bf16, "whether the AMX kernels run here (AMX-BF16 and the tile state granted)");
  m.def("uses_avx512_bf16", &has_avx512_bf16, "whether the AVX512-BF16 kernels run on this CPU");
  m.def("linear_llm_int8", &linear_llm_int8, "LLM.int8 x @ W.T: int8 activations, outlier columns in float");
  m.def("linear_llm_int8_tiles", &linear_llm_int8_tiles, "LLM.int8 x @ W.T on the AMX-INT8 tiles (past decode)");
  m.def("quantize_activations_int8", &quantize_activations_int8, "LLM.int8's activation codes, row absmax, outliers");
  m.def("gemv_dense", &gemv_dense, "y = x @ W.T for a few float32 activation rows, a 16-bit or float32 weight");
  m.def("quantize_q8_0", &quantize_q8_0, "activations q8_0: int8 codes per 32 (in the kernels' order per span), float32 scales");
  m.def("gemv_4bit_q8", &gemv_4bit_q8, "y = q8_0(x) @ dequant(W).T, the codebook in int8 steps (AVX2, AVX512-VNNI)");
  m.def("gemv_affine_q8", &gemv_affine_q8, "y = q8_0(x) @ dequant(W).T for an int4/int2 weight (AVX2, AVX512-VNNI)");
  m.def("gemv_float8", &gemv_float8, "y = x @ dequant(W).T for a few float32 activation rows, fp8 weight");
  m.def("dequantize_float8", &dequantize_float8, "dequantize rows [first, last) of an fp8 weight into out");
  m.def("linear_float8_chunked", &linear_float8_chunked, "x @ W.T, W (fp8) dequantized in row chunks per thread");
  m.def("linear_float8_tiles", &linear_float8_tiles, "x @ W.T for bfloat16 x on the AMX tiles, fp8 weight");
  m.def("uses_avx2", &has_avx2, "whether the AVX2 kernels run on this CPU");
  m.def("uses_avx512_vnni", &has_avx512_vnni, "whether the AVX512-VNNI kernels run on this CPU");
  m.def("uses_avx512", &has_avx512, "whether the AVX-512 kernels run on this CPU");
}

// The forward kernels as the CPU implementations of the custom ops that quantizer_plugin/cpu/library.py defines (the
// schemas and the fake implementations live there, and registering an implementation before its schema is allowed).
// A compiled graph then calls each one through the dispatcher straight into C++. A Python implementation cost a
// trampoline into the interpreter and back on each of a decode step's 43 calls: measured on the Xeon with AMX, a call
// took 16.4 us with warm caches and 35 us with cold ones (as the weights streamed in between leave them), and takes
// 10.7 and 22 us now.
TORCH_LIBRARY_IMPL(quantizer_plugin, CPU, m) {
  m.impl("gemv_4bit", TORCH_FN(gemv_4bit));
  m.impl("gemv_4bit_bf16", TORCH_FN(gemv_4bit_bf16));
  m.impl("gemv_4bit_q8", TORCH_FN(gemv_4bit_q8));
  m.impl("linear_4bit_tiles", TORCH_FN(linear_4bit_tiles));
  m.impl("linear_4bit_chunked", TORCH_FN(linear_4bit_chunked));
  m.impl("gemv_int8", TORCH_FN(gemv_int8));
  m.impl("linear_int8_amx", TORCH_FN(linear_int8_amx));
  m.impl("linear_int8_tiles", TORCH_FN(linear_int8_tiles));
  m.impl("linear_int8_chunked", TORCH_FN(linear_int8_chunked));
  m.impl("linear_llm_int8", TORCH_FN(linear_llm_int8));
  m.impl("linear_llm_int8_tiles", TORCH_FN(linear_llm_int8_tiles));
  m.impl("gemv_affine", TORCH_FN(gemv_affine));
  m.impl("gemv_affine_bf16", TORCH_FN(gemv_affine_bf16));
  m.impl("gemv_affine_q8", TORCH_FN(gemv_affine_q8));
  m.impl("linear_affine_tiles", TORCH_FN(linear_affine_tiles));
  m.impl("linear_affine_chunked", TORCH_FN(linear_affine_chunked));
  m.impl("gemv_float8", TORCH_FN(gemv_float8));
  m.impl("linear_float8_tiles", TORCH_FN(linear_float8_tiles));
  m.impl("linear_float8_chunked", TORCH_FN(linear_float8_chunked));
  m.impl("gemv_dense", TORCH_FN(gemv_dense));
}
