// Activations rounded as llama.cpp's q8_0 (the activations mode "q8_0", formats/activations.py): each activation row
// in blocks of 32 columns, each block int8 with one float32 scale, its absmax / 127. The 4-bit and 2-bit kernels of
// that mode (codebook4bit.cpp, affine.cpp) multiply these bytes by the weight's codes in integers (AVX2's vpmaddubsw
// 32 at a time, AVX512-VNNI's vpdpbusd 64), and scale each block's integer sum once. The codes are written in the
// order the kernels read a weight's bytes: within each `span` of columns (32, or the columns of 32 or 64 weight
// bytes), the first code of every byte, then the second, and so on. Also each block's sum of the rounded activations
// (its integer sum times its scale), which the affine kernels' zero points take off.
//
// The rounding is the reference's, operation for operation: x * (127 / absmax) in float32, rounded half to even,
// so the codes are the reference's exactly. A block holding a NaN or an infinity gets codes 0 and a NaN scale, so
// that every output it reaches is NaN, never a silent number.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

namespace {

// One block's codes (in natural order) and its scale: the reference's arithmetic, shared by both loops below.
struct BlockCodes {
  int8_t codes[Q8_BLOCK];
  float scale;
  int32_t code_sum;
};

inline void round_block_plain(const float* v, BlockCodes& out) {
  float absmax = 0.0f;
  bool finite = true;
  for (int i = 0; i < Q8_BLOCK; ++i) {
    absmax = std::max(absmax, std::fabs(v[i]));
    finite = finite && std::isfinite(v[i]);
  }
  const float inverse = 127.0f / std::max(absmax, std::numeric_limits<float>::min());
  out.scale = finite ? absmax / 127.0f : std::numeric_limits<float>::quiet_NaN();
  out.code_sum = 0;
  for (int i = 0; i < Q8_BLOCK; ++i) {
    const float rounded = finite ? std::nearbyint(std::min(std::max(v[i] * inverse, -127.0f), 127.0f)) : 0.0f;
    out.codes[i] = static_cast<int8_t>(rounded);
    out.code_sum += static_cast<int32_t>(rounded);
  }
}

// The same 8 lanes at a time: vcvtps2dq rounds half to even (the default rounding mode), as nearbyint does. The plain
// loop cost 25 us per 4096 activations (a libm call per rounding), about 1 ms of a decode step's 43 calls.
AVX2 void round_block_avx2(const float* v, BlockCodes& out) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 values[4], absmax = _mm256_setzero_ps(), check = _mm256_setzero_ps();
  for (int q = 0; q < 4; ++q) {
    values[q] = _mm256_loadu_ps(v + 8 * q);
    absmax = _mm256_max_ps(absmax, _mm256_andnot_ps(sign, values[q]));
    check = _mm256_add_ps(check, _mm256_sub_ps(values[q], values[q]));  // NaN where any value is NaN or infinite
  }
  float lanes[8], checks[8];
  _mm256_storeu_ps(lanes, absmax);
  _mm256_storeu_ps(checks, check);
  float block_max = 0.0f;
  bool finite = true;
  for (int i = 0; i < 8; ++i) {
    block_max = std::max(block_max, lanes[i]);
    finite = finite && checks[i] == 0.0f;
  }
  out.scale = finite ? block_max / 127.0f : std::numeric_limits<float>::quiet_NaN();
  if (!finite) {
    std::memset(out.codes, 0, Q8_BLOCK);
    out.code_sum = 0;
    return;
  }
  const __m256 inverse = _mm256_set1_ps(127.0f / std::max(block_max, std::numeric_limits<float>::min()));
  const __m256 low = _mm256_set1_ps(-127.0f), high = _mm256_set1_ps(127.0f);
  __m256i sum = _mm256_setzero_si256();
  int32_t rounded[Q8_BLOCK];
  for (int q = 0; q < 4; ++q) {
    const __m256i codes =
        _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(values[q], inverse), low), high));
    sum = _mm256_add_epi32(sum, codes);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + 8 * q), codes);
  }
  int32_t sums[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums), sum);
  out.code_sum = 0;
  for (int i = 0; i < 8; ++i) out.code_sum += sums[i];
  for (int i = 0; i < Q8_BLOCK; ++i) out.codes[i] = static_cast<int8_t>(rounded[i]);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q8_0(const at::Tensor& x, int64_t per_byte, int64_t span) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(per_byte == 1 || per_byte == 2 || per_byte == 4, "per_byte must be 1, 2 or 4, not ", per_byte);
  TORCH_CHECK(span > 0 && span % Q8_BLOCK == 0, "the span must be a multiple of ", Q8_BLOCK, ", not ", span);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % span == 0, "q8_0 activations need K a multiple of the span ", span, ", not ", K);
  at::Tensor codes = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({M, K / Q8_BLOCK}, x.options());
  at::Tensor sums = at::empty({M, K / Q8_BLOCK}, x.options());
  const float* in = x.data_ptr<float>();
  int8_t* out = codes.data_ptr<int8_t>();
  float* d = scales.data_ptr<float>();
  float* total = sums.data_ptr<float>();
  const int64_t planes = span / per_byte;  // a span's codes in the kernels' order: transpose (planes, per_byte)
  const int shift = per_byte == 1 ? 0 : (per_byte == 2 ? 1 : 2);
  const bool avx2 = has_avx2();
  at::parallel_for(0, M * (K / Q8_BLOCK), 256, [&](int64_t first, int64_t last) {
    BlockCodes block;
    for (int64_t b = first; b < last; ++b) {
      if (avx2) round_block_avx2(in + b * Q8_BLOCK, block);
      else round_block_plain(in + b * Q8_BLOCK, block);
      d[b] = block.scale;
      total[b] = static_cast<float>(block.code_sum) * block.scale;
      // rows are whole spans (K % span == 0): the block's span starts at flat - j0, its first column is j0 in it
      const int64_t flat = b * Q8_BLOCK, j0 = flat % span;
      int8_t* span_codes = out + flat - j0;
      for (int i = 0; i < Q8_BLOCK; ++i) {
        const int64_t j = j0 + i;
        span_codes[(j & (per_byte - 1)) * planes + (j >> shift)] = block.codes[i];
      }
    }
  });
  return {codes, scales, sums};
}

}  // namespace quantizer_plugin
