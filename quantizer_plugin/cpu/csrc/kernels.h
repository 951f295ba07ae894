// The CPU kernels the Python module exposes (module.cpp binds them; codebook4bit.cpp and int8.cpp define them).

#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace quantizer_plugin {

// An argument Python may pass as None: the fields of a typed weight record that its format does not store.
using OptionalTensor = std::optional<at::Tensor>;

// 4-bit codebooks (formats/records.py CodebookWeight): `absmax` (float32 per block), or with double quantization its
// `codes`, `scales`, `offset` and the 8-bit dynamic code `code8` (`absmax` then None, and without it these are None);
// `lut` is the format's 16-value codebook.
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed,
                     const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                     const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                     int64_t N, int64_t block);
at::Tensor gemv_4bit_bf16(const at::Tensor& x, const at::Tensor& packed,
                          const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                          const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                          int64_t N, int64_t block);
void dequantize_4bit(const at::Tensor& packed,
                     const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                     const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                     int64_t block, int64_t begin, int64_t end, at::Tensor& out, bool grouped);
at::Tensor linear_4bit_chunked(const at::Tensor& x, const at::Tensor& packed,
                               const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                               const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                               int64_t N, int64_t block, bool grouped, int64_t rows_per_chunk);
// y (M, N) float32 = x (M, K) @ dequant(W).T for bfloat16 x on the AMX tiles (amx.h), K a multiple of the block and
// the block of 64; x's columns permuted within each 64 as write_codes_4bit reads the codes.
at::Tensor linear_4bit_tiles(const at::Tensor& x, const at::Tensor& packed,
                             const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                             const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                             int64_t N, int64_t block);
// The reference's 4-bit quantization of a flat weight (formats/codebook4bit.py), codes identical: packed codes, the
// float32 absmax per block, and false (with the outputs unfinished) if the weight holds a NaN or an infinity.
// `midpoints`: the 15 midpoints of the sorted codebook; `order`: sorted position -> code.
std::tuple<at::Tensor, at::Tensor, bool> quantize_4bit(const at::Tensor& weight, int64_t block,
                                                       const at::Tensor& midpoints, const at::Tensor& order);

// int8: `weight` int8 (N, K), `scale` float32 (N,) row absmax; the weight stands for weight * scale / 127.
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale);
void dequantize_int8(const at::Tensor& weight, const at::Tensor& scale, int64_t first, int64_t last, at::Tensor& out);
at::Tensor linear_int8_chunked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               int64_t rows_per_chunk);
// The reference's int8 quantization of a weight (N, K) (formats/int8.py quantize_rows), values identical: int8
// values, the float32 row absmax, and false (outputs unfinished) if the weight holds a NaN or an infinity.
std::tuple<at::Tensor, at::Tensor, bool> quantize_int8(const at::Tensor& weight);
// y (M, N) float32 = x (M, K) @ dequant(W).T for bfloat16 x on the AMX tiles, K a multiple of 32.
at::Tensor linear_int8_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale);

// y (M, N) float32 = x (M, K) @ dequant(W).T on the AMX-INT8 tiles, the weight read as stored and each activation
// row split into two int8 pieces (int8_amx.cpp), K a multiple of 64.
at::Tensor linear_int8_amx(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale);

// fp8 (float8.cpp; formats/fp8.py): `weight` uint8 (N, K) fp8 bit patterns (exponent_bits 4: e4m3fn, 5: e5m2),
// `scale` float32 (N, ceil(K / block)) (block = K: one scale per row). The fused kernel returns y (M, N) float32
// for float32 x; the tile kernel takes bfloat16 x with K a multiple of 32 and the block a multiple of 16.
at::Tensor gemv_float8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block,
                       int64_t exponent_bits);
void dequantize_float8(const at::Tensor& weight, const at::Tensor& scale, int64_t block, int64_t exponent_bits,
                       int64_t first, int64_t last, at::Tensor& out);
at::Tensor linear_float8_chunked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block,
                                 int64_t exponent_bits, int64_t rows_per_chunk);
at::Tensor linear_float8_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block,
                               int64_t exponent_bits);

// int4/int2 (formats/affine.py): `packed` uint8 (N, ceil(K * bits / 8)), `scale` and `zero` float16 (N, groups);
// the fused kernels need K a multiple of the block and the block of 64, and return y (M, N) float32.
at::Tensor gemv_affine(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t bits, int64_t block);
at::Tensor gemv_affine_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const at::Tensor& zero, int64_t bits, int64_t block);
// y (M, N) float32 = x (M, K) @ dequant(W).T for bfloat16 x on the AMX tiles, K a multiple of the block and of 128,
// the block of 64.
at::Tensor linear_affine_tiles(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t block);
// out (last - first, K) = rows [first, last) of the weight, dequantized as the reference does, in out's dtype.
void dequantize_affine(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                       int64_t block, int64_t first, int64_t last, at::Tensor& out);
at::Tensor linear_affine_chunked(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                 const at::Tensor& zero, int64_t bits, int64_t block, int64_t rows_per_chunk);

// Kept 16-bit layers (dense.cpp): y (M, N) float32 = x (M, K) float32 @ weight.T for a bfloat16, float16 or float32
// weight (N, K), each weight row read once per 4 activation rows.
at::Tensor gemv_dense(const at::Tensor& x, const at::Tensor& weight);

// LLM.int8 (llm_int8.cpp): y (M, N) float32 = the int8 part plus the outlier columns' (rounded to x's dtype), for x
// (M, K) float32, bfloat16 or float16 in the compute dtype; and the activations' side alone, as the reference's
// quantize_activations: (int8 codes (M, K), float32 row absmax, bool outlier column mask (K,)). With input_scale
// (static int8 activations: one float32 step), every row's codes are round(x / step), and threshold is 0.
at::Tensor linear_llm_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, double threshold,
                           const c10::optional<at::Tensor>& input_scale);
// The same on the AMX-INT8 tiles (past decode), K a multiple of 64; the same bytes.
at::Tensor linear_llm_int8_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                 double threshold, const c10::optional<at::Tensor>& input_scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations_int8(const at::Tensor& x, double threshold);

// Activations mode "q8_0" (q8_0.cpp): each row of x (M, K) float32 in blocks of Q8_BLOCK, int8 codes and a float32
// scale (absmax / 127) per block, the codes of each `span` of columns (a multiple of Q8_BLOCK) in the order the
// kernels read a weight with `per_byte` codes per byte (the transpose of (span / per_byte, per_byte)); and the 4-bit
// and 2-bit kernels of the mode, with each block's sum of the rounded activations (M, K / Q8_BLOCK) float32;
// y (M, N) float32, on CPUs with AVX2 (their AVX512-VNNI loops where the CPU has it and the shapes fit), K a
// multiple of the block (or group) and it of Q8_BLOCK.
inline constexpr int64_t Q8_BLOCK = 32;
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q8_0(const at::Tensor& x, int64_t per_byte, int64_t span);
at::Tensor gemv_4bit_q8(const at::Tensor& x, const at::Tensor& packed,
                        const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                        const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                        int64_t N, int64_t block);
at::Tensor gemv_affine_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const at::Tensor& zero, int64_t bits, int64_t block);

bool has_avx2();
bool has_avx512();
bool has_avx512_vnni();
bool has_avx512_bf16();
bool has_amx_bf16();
bool has_amx_int8();

}  // namespace quantizer_plugin
