// Kept 16-bit (or float32) linears at decode: the output head a quantized model keeps in bfloat16 by default, the
// largest single weight of a small model (32000 x 2048 in the 0.4B Llama of benchmarks/cpu_decode.py: 131 MB, a
// third of an nf4 decode step's bytes). torch's own bfloat16 matmul does not stream such a weight at the machine's
// bandwidth on a CPU without bfloat16 hardware (AVX2 only); this kernel reads each weight once, prefetched, and
// multiplies in float32: the products of bfloat16, float16 or float32 values are exact there, only the order of the
// float32 sums differs from torch's.

#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {
namespace {

// AVX2_F16C (simd.h): float16 weights convert with vcvtph2ps.
// Eight consecutive weights as float32 (exact), for the AVX2 loop.
AVX2_F16C inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
AVX2_F16C inline __m256 load8(const at::BFloat16* w) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
AVX2_F16C inline __m256 load8(const at::Half* w) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}

// y[m][n] = sum over k of w[n][k] * x[m][k] for weight rows [n_begin, n_end) and MT activation rows, float32 sums in
// two independent chains per activation row (one would wait on each FMA's latency at M = 1; four measured the same).
template <int MT, typename W>
AVX512 void gemv_dense_rows(const W* weight, int64_t K, const float* x, float* y, int64_t N, int64_t n_begin,
                            int64_t n_end) {
  constexpr int U = 2;
  constexpr int64_t STEP = 16 * U;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* row = weight + n * K;
    __m512 acc[MT][U];
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + STEP <= K; k += STEP) {
      for (int64_t b = 0; b < STEP * static_cast<int64_t>(sizeof(W)); b += 64)  // each cache line of the step
        prefetch_ahead(reinterpret_cast<const char*>(row + k) + b);
      for (int u = 0; u < U; ++u) {
        const __m512 w = load_weights(row + k + 16 * u);
        for (int m = 0; m < MT; ++m) acc[m][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k + 16 * u), acc[m][u]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m512 total = acc[m][0];
      for (int u = 1; u < U; ++u) total = _mm512_add_ps(total, acc[m][u]);
      float sum = _mm512_reduce_add_ps(total);
      for (int64_t t = k; t < K; ++t) sum += static_cast<float>(row[t]) * x[m * K + t];
      y[m * N + n] = sum;
    }
  }
}

// gemv_dense_rows for CPUs with AVX2 only: 8 weights per float32 vector, the same products.
template <int MT, typename W>
AVX2_F16C void gemv_dense_rows_avx2(const W* weight, int64_t K, const float* x, float* y, int64_t N, int64_t n_begin,
                                    int64_t n_end) {
  constexpr int U = 2;
  constexpr int64_t STEP = 8 * U;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* row = weight + n * K;
    __m256 acc[MT][U];
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + STEP <= K; k += STEP) {
      for (int64_t b = 0; b < STEP * static_cast<int64_t>(sizeof(W)); b += 64)  // (a step of 32 bytes asks twice)
        prefetch_ahead(reinterpret_cast<const char*>(row + k) + b);
      for (int u = 0; u < U; ++u) {
        const __m256 w = load8(row + k + 8 * u);
        for (int m = 0; m < MT; ++m) acc[m][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k + 8 * u), acc[m][u]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      __m256 total = acc[m][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[m][u]);
      float sum = horizontal_sum(total);
      for (int64_t t = k; t < K; ++t) sum += static_cast<float>(row[t]) * x[m * K + t];
      y[m * N + n] = sum;
    }
  }
}

}  // namespace

at::Tensor gemv_dense(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous matrix (N, K)");
  TORCH_CHECK(weight.size(1) == x.size(1), "x and weight disagree on K");
  TORCH_CHECK(has_avx2(), "gemv_dense needs AVX2");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const bool avx512 = has_avx512();
  with_weight_type(weight, "gemv_dense", [&](const auto* w) {
    for_row_groups(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
      const float* xm = x.data_ptr<float>() + m0 * K;
      float* ym = y.data_ptr<float>() + m0 * N;
      if (avx512) {
        gemv_dense_rows<decltype(rows)::value>(w, K, xm, ym, N, begin, end);
      } else {
        gemv_dense_rows_avx2<decltype(rows)::value>(w, K, xm, ym, N, begin, end);
      }
    });
  });
  return y;
}

}  // namespace quantizer_plugin
