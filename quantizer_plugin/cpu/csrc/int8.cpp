// int8 (weight-only on the CPU): a fused multiply for few activation rows, a dequantize of row ranges as the
// reference dequantizes them, and the per-thread dequantize-then-GEMM for larger batches.

#include <atomic>
#include <cmath>
#include <limits>
#include <tuple>

#include "amx.h"
#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

namespace {

// Rows [first, last) of an int8 weight times their row scale / 127, as the reference dequantizes them (a float32
// division, then one float32 product per element, rounded once to the output dtype).
template <typename Out, typename Store>
AVX512 void dequantize_int8_avx512(const int8_t* weight, const float* scale, int64_t K, int64_t first, int64_t last,
                                   Out* out) {
  for (int64_t n = first; n < last; ++n) {
    const float s = scale[n] / 127.0f;
    const __m512 vs = _mm512_set1_ps(s);
    const int8_t* row = weight + n * K;
    Out* o = out + (n - first) * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      prefetch_ahead_per_line(row + k, 32);
      __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
      __m512 b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16))));
      Store::store(o + k, _mm512_mul_ps(a, vs), _mm512_mul_ps(b, vs));
    }
    for (; k < K; ++k) store_scalar(o, k, static_cast<float>(row[k]) * s);
  }
}

// The same into float32, 8 at a time, for CPUs with AVX2 only (the chunks of a float32 compute dtype).
AVX2 void dequantize_int8_avx2(const int8_t* weight, const float* scale, int64_t K, int64_t first, int64_t last,
                               float* out) {
  for (int64_t n = first; n < last; ++n) {
    const float s = scale[n] / 127.0f;
    const __m256 vs = _mm256_set1_ps(s);
    const int8_t* row = weight + n * K;
    float* o = out + (n - first) * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      if (k % 64 == 0) prefetch_ahead(row + k);
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
      _mm256_storeu_ps(o + k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), vs));
    }
    for (; k < K; ++k) o[k] = static_cast<float>(row[k]) * s;
  }
}

template <typename Out>
void dequantize_int8_scalar(const int8_t* weight, const float* scale, int64_t K, int64_t first, int64_t last,
                            Out* out) {
  for (int64_t n = first; n < last; ++n) {
    const float s = scale[n] / 127.0f;
    for (int64_t k = 0; k < K; ++k) store_scalar(out, (n - first) * K + k, static_cast<float>(weight[n * K + k]) * s);
  }
}

// y[m][n] = (sum over k of w[n][k] * x[m][k]) * scale[n] / 127 for rows n in [n_begin, n_end), float32 products
// and sums, the weight streamed once (prefetched) for up to MT activation rows.
template <int MT>
AVX512 void gemv_int8_rows(const int8_t* weight, const float* scale, int64_t K, const float* x, float* y, int64_t N,
                           int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = weight + n * K;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {  // one cache line of weights per step, one prefetch
      prefetch_ahead(row + k);
      for (int q = 0; q < 64; q += 16) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + q));
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k + q), acc[m]);
      }
    }
    for (; k + 16 <= K; k += 16) {
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    const float s = scale[n] / 127.0f;
    for (int m = 0; m < MT; ++m) {
      float sum = _mm512_reduce_add_ps(acc[m]);
      for (int64_t t = k; t < K; ++t) sum += static_cast<float>(row[t]) * x[m * K + t];
      y[m * N + n] = sum * s;
    }
  }
}

// gemv_int8_rows for CPUs with AVX2 only: 8 weights per float32 vector, the same float32 products.
template <int MT>
AVX2 void gemv_int8_rows_avx2(const int8_t* weight, const float* scale, int64_t K, const float* x, float* y,
                              int64_t N, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* row = weight + n * K;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      if (k % 64 == 0) prefetch_ahead(row + k);
      for (int q = 0; q < 32; q += 8) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k + q));
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k + q), acc[m]);
      }
    }
    const float s = scale[n] / 127.0f;
    for (int m = 0; m < MT; ++m) {
      float sum = horizontal_sum(acc[m]);
      for (int64_t t = k; t < K; ++t) sum += static_cast<float>(row[t]) * x[m * K + t];
      y[m * N + n] = sum * s;
    }
  }
}

// Rows [n0, n0 + rows) of an int8 weight as bfloat16 integers (exact: |w| <= 127), unscaled, at amx.h's tile_offset.
AVX512_BF16 void write_codes_int8(const int8_t* weight, int64_t K, int64_t n0, int64_t rows, int64_t k_begin,
                                  int64_t k_end, uint16_t* a) {
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* bytes = weight + (n0 + r) * K + k_begin;
    uint16_t* out = a + tile_offset(r, 0);  // 32 columns = one tile on: a pointer step, no division per step
    for (int64_t k0 = k_begin; k0 < k_end; k0 += 32, bytes += 32, out += TILE_ELEMENTS) {
      if (k0 % 64 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(bytes + TILE_PREFETCH_ROWS * K), _MM_HINT_T1);
        // and this row's next chunk into L1: int8 rows are twice the 4-bit bytes, and the writer waited on their L2
        // reads (a few % at M = 16, measured here; a prefetch is no fault past the weight's end)
        _mm_prefetch(reinterpret_cast<const char*>(bytes + CHUNK_COLUMNS), _MM_HINT_T0);
      }
      const auto* sixteen = reinterpret_cast<const __m128i*>(bytes);
      const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sixteen)));
      const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(sixteen + 1)));
      _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
  }
}

// Row n of the weight as the reference quantizes it (formats/int8.py quantize_rows): absmax, then each element times
// 127 / absmax (float32, as torch computes it), rounded half to even, clamped to +-127. In a row of absmax below 127 / FLT_MAX that
// scale is infinite and its zeros give NaN, which the reference's conversion to int8 makes 0: so do we. False,
// writing nothing, for a NaN or an infinity in the weight.
template <typename In>
AVX512 bool quantize_row_avx512(const In* w, int64_t K, int8_t* out, float* absmax) {
  __m512 largest = _mm512_setzero_ps();
  __mmask16 not_finite = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 magnitude = _mm512_abs_ps(load_weights(w + k));
    not_finite |= _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or NaN
    largest = _mm512_max_ps(largest, magnitude);
  }
  float a = _mm512_reduce_max_ps(largest);
  for (int64_t t = k; t < K; ++t) {
    const float magnitude = std::fabs(static_cast<float>(w[t]));
    if (!std::isfinite(magnitude)) return false;
    a = std::max(a, magnitude);
  }
  if (not_finite) return false;
  *absmax = a;
  // torch computes the reference's 127 / absmax (a number over a tensor) as reciprocal(absmax) * 127: two roundings
  const float scale = (1.0f / std::max(a, std::numeric_limits<float>::min())) * 127.0f;
  const __m512 vscale = _mm512_set1_ps(scale), limit = _mm512_set1_ps(127.0f), minus_limit = _mm512_set1_ps(-127.0f);
  for (k = 0; k + 16 <= K; k += 16) {
    __m512 v = _mm512_roundscale_ps(_mm512_mul_ps(load_weights(w + k), vscale), _MM_FROUND_TO_NEAREST_INT);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // 0 x inf: the reference's NaN becomes 0
    v = _mm512_min_ps(_mm512_max_ps(v, minus_limit), limit);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  for (; k < K; ++k) {
    float v = std::nearbyint(static_cast<float>(w[k]) * scale);  // the default rounding: half to even
    if (std::isnan(v)) v = 0.0f;
    out[k] = static_cast<int8_t>(std::min(std::max(v, -127.0f), 127.0f));
  }
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, bool> quantize_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "the weight must be a contiguous matrix");
  TORCH_CHECK(has_avx512(), "quantize_int8 needs AVX-512");
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor values = at::empty({N, K}, weight.options().dtype(at::kChar));
  at::Tensor absmax = at::empty({N}, weight.options().dtype(at::kFloat));
  int8_t* out = values.data_ptr<int8_t>();
  float* scales = absmax.data_ptr<float>();
  std::atomic<bool> finite{true};
  with_weight_type(weight, "quantize_int8", [&](const auto* w) {
    at::parallel_for(0, N, 16, [&](int64_t first, int64_t last) {
      for (int64_t n = first; n < last && finite.load(std::memory_order_relaxed); ++n) {
        if (!quantize_row_avx512(w + n * K, K, out + n * K, scales + n)) finite.store(false, std::memory_order_relaxed);
      }
    });
  });
  return {values, absmax, finite.load()};
}

// y (M, N) float32 = x (M, K) float32 @ (weight * scale / 127).T for a few activation rows (decode).
at::Tensor gemv_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be a contiguous int8 matrix");
  TORCH_CHECK(weight.size(1) == x.size(1), "x and weight disagree on K");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "scale must be contiguous float32, one per row");
  TORCH_CHECK(has_avx2(), "gemv_int8 needs AVX2");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const bool avx512 = has_avx512();
  for_row_groups(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
    const float* xm = x.data_ptr<float>() + m0 * K;
    float* ym = y.data_ptr<float>() + m0 * N;
    if (avx512) {
      gemv_int8_rows<decltype(rows)::value>(w, s, K, xm, ym, N, begin, end);
    } else {
      gemv_int8_rows_avx2<decltype(rows)::value>(w, s, K, xm, ym, N, begin, end);
    }
  });
  return y;
}

// out (last - first, K) = rows [first, last) of an int8 weight dequantized with its float32 row absmax.
void dequantize_int8(const at::Tensor& weight, const at::Tensor& scale, int64_t first, int64_t last, at::Tensor& out) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be a contiguous int8 matrix");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "scale must be contiguous float32, one per row");
  const int64_t K = weight.size(1);
  TORCH_CHECK(0 <= first && first <= last && last <= weight.size(0), "row range outside the weight");
  TORCH_CHECK(out.is_contiguous() && out.numel() == (last - first) * K, "out must be contiguous, (last - first) x K");
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const bool vector = has_avx512();
  auto run = [&](auto* o, auto&& rows) {
    at::parallel_for(first, last, 8, [&](int64_t a, int64_t b) { rows(o + (a - first) * K, a, b); });
  };
  switch (out.scalar_type()) {
    case at::kFloat:
      run(out.data_ptr<float>(), [&](float* o, int64_t a, int64_t b) {
        if (vector) return dequantize_int8_avx512<float, StoreFloat>(w, s, K, a, b, o);
        has_avx2() ? dequantize_int8_avx2(w, s, K, a, b, o) : dequantize_int8_scalar(w, s, K, a, b, o);
      });
      break;
    case at::kHalf:
      run(out.data_ptr<at::Half>(), [&](at::Half* o, int64_t a, int64_t b) {
        vector ? dequantize_int8_avx512<at::Half, StoreHalf>(w, s, K, a, b, o)
               : dequantize_int8_scalar(w, s, K, a, b, o);
      });
      break;
    case at::kBFloat16:
      run(out.data_ptr<at::BFloat16>(), [&](at::BFloat16* o, int64_t a, int64_t b) {
        vector ? dequantize_int8_avx512<at::BFloat16, StoreBFloat16>(w, s, K, a, b, o)
               : dequantize_int8_scalar(w, s, K, a, b, o);
      });
      break;
    default:
      TORCH_CHECK(false, "dequantize_int8 writes float32, bfloat16 or float16, not ", out.scalar_type());
  }
}

at::Tensor linear_int8_chunked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                               int64_t rows_per_chunk) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix");
  return chunked_linear(x, weight.size(0), rows_per_chunk, [&](int64_t first, int64_t last, at::Tensor& out) {
    dequantize_int8(weight, scale, first, last, out);
  });
}

at::Tensor linear_int8_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be a contiguous int8 matrix");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "scale must be contiguous float32, one per row");
  TORCH_CHECK(weight.size(1) == x.size(1), "x and weight disagree on K");
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t K = weight.size(1);
  return tile_linear(
      pack_activations(x), x.size(0), weight.size(0), TILE_K,
      [&](int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
        write_codes_int8(w, K, n0, rows, k_begin, k_end, out);
      },
      [&](int64_t n) { return s[n] / 127.0f; });
}

}  // namespace quantizer_plugin
