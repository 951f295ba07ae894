// The CPU kernels the Python module exposes (module.cpp binds them; codebook4bit.cpp and int8.cpp define them).

#pragma once

#include <ATen/ATen.h>

namespace quantizer_plugin {

// NF4/FP4: `absmax` (float32 per block), or with double quantization its `codes`, `scales`, `offset` and the 8-bit
// dynamic code `code8` (`absmax` then empty); `lut` is the format's 16-value codebook.
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& codes,
                     const at::Tensor& scales, const at::Tensor& offset, const at::Tensor& code8, const at::Tensor& lut,
                     int64_t N, int64_t block);
at::Tensor gemv_4bit_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offset,
                          const at::Tensor& code8, const at::Tensor& lut, int64_t N, int64_t block);
void dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& codes,
                     const at::Tensor& scales, const at::Tensor& offset, const at::Tensor& code8, const at::Tensor& lut,
                     int64_t block, int64_t begin, int64_t end, at::Tensor& out, bool grouped);
at::Tensor linear_4bit_chunked(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offset,
                               const at::Tensor& code8, const at::Tensor& lut, int64_t N, int64_t block, bool grouped,
                               int64_t rows_per_chunk);

// int8: `weight` int8 (N, K), `scale` float32 (N,) row absmax; the weight stands for weight * scale / 127.
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale);
void dequantize_int8(const at::Tensor& weight, const at::Tensor& scale, int64_t first, int64_t last, at::Tensor& out);
at::Tensor linear_int8_chunked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               int64_t rows_per_chunk);

bool has_avx512();
bool has_avx512_bf16();

}  // namespace quantizer_plugin
