// LLM.int8 on the CPU (formats/activations.py: Int8Activations): each activation row quantized to int8 with its
// absmax, the int8 products summed exactly in int32, and the input features holding an outlier multiplied in float.
//
// The activations are prepared once per call (quantize_activations_int8, the reference's codes and scales exactly),
// as int16 codes padded to a multiple of 16 columns. The weight streams once through register tiles of up to 4
// activation rows by up to 4 weight rows: each 16 weights are sign-extended to int16 once and multiplied by every
// activation row with AVX2's pmaddwd (16 products summed in pairs into 8 int32 lanes, exact: 2 * 127 * 127 fits
// easily), the int32 sums exact for K up to 2^31 / 127^2. The tile's epilogue scales its sums as the reference does (in
// float64, one rounding to float32) and adds the outlier columns' products with the weight dequantized as the
// reference dequantizes it, while the weight rows are still in cache. Without AVX2 the same tiles run in plain C++.

#include <cfloat>
#include <cmath>
#include <limits>
#include <tuple>

#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

namespace {

constexpr int64_t K_STEP = 16;  // int16 lanes of one AVX2 register: the codes' row stride is a multiple of this
constexpr int MAX_TILE_M = 4, MAX_TILE_N = 4;

// The activations' side: codes (M, K_padded) int16, zero past K and in the outlier columns; the float32 row absmax
// (NaN for a row holding a NaN, as torch's amax gives); the outlier columns and their values.
struct Activations {
  at::Tensor codes, absmax;
  std::vector<int64_t> outlier_columns;
  std::vector<float> outlier_values;  // (M, outlier columns), x as given (already in the compute dtype)
  int64_t padded_k;
};

template <typename In>
Activations prepare_activations(const In* x, int64_t M, int64_t K, float threshold) {
  Activations a;
  a.padded_k = (K + K_STEP - 1) / K_STEP * K_STEP;
  a.codes = at::zeros({M, a.padded_k}, at::kShort);
  a.absmax = at::empty({M}, at::kFloat);
  // An entry with |x| >= threshold is an outlier (a NaN is not: it compares false, and reaches the output through its
  // row's absmax); a column holding one is multiplied in float for every row. No outliers with the threshold at 0.
  std::vector<uint8_t> is_outlier(K, 0);
  if (threshold > 0) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t k = 0; k < K; ++k) is_outlier[k] |= std::fabs(static_cast<float>(x[m * K + k])) >= threshold;
    }
    for (int64_t k = 0; k < K; ++k) {
      if (is_outlier[k]) a.outlier_columns.push_back(k);
    }
  }
  const int64_t outliers = static_cast<int64_t>(a.outlier_columns.size());
  a.outlier_values.resize(M * outliers);
  int16_t* codes = a.codes.data_ptr<int16_t>();
  float* absmax = a.absmax.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      const In* row = x + m * K;
      // The row's absmax over its entries below the threshold (the others of an outlier column count, as in
      // bitsandbytes), NaN if the row holds one, as torch's amax gives.
      float largest = 0.0f;
      bool nan = false;
      for (int64_t k = 0; k < K; ++k) {
        const float magnitude = std::fabs(static_cast<float>(row[k]));
        nan |= std::isnan(magnitude);
        if (!(threshold > 0 && magnitude >= threshold)) largest = std::max(largest, magnitude);
      }
      absmax[m] = nan ? NAN : largest;
      // torch computes the reference's 127 / absmax (a number over a tensor) as reciprocal(absmax) * 127
      const float scale = (1.0f / std::max(absmax[m], std::numeric_limits<float>::min())) * 127.0f;
      for (int64_t k = 0; k < K; ++k) {
        // code 0 in an outlier column (multiplied in float), which holds every entry at or above the threshold
        if (is_outlier[k]) continue;
        const float code = std::nearbyint(static_cast<float>(row[k]) * scale);  // the default rounding: half to even
        // a NaN code (a NaN row's) is 0 here; the row's NaN absmax makes its outputs NaN
        codes[m * a.padded_k + k] = std::isnan(code) ? 0 : static_cast<int16_t>(std::min(std::max(code, -127.0f), 127.0f));
      }
      for (int64_t j = 0; j < outliers; ++j) a.outlier_values[m * outliers + j] = static_cast<float>(row[a.outlier_columns[j]]);
    }
  });
  return a;
}

// sums (TM, TN) int32 = codes rows [0, TM) (stride padded_k) . weight rows [0, TN) (stride K), over K.
template <int TM, int TN>
AVX2 void dot_tile_avx2(const int16_t* codes, int64_t padded_k, const int8_t* weight, int64_t K, int32_t* sums) {
  __m256i acc[TM][TN];
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) acc[i][j] = _mm256_setzero_si256();
  }
  const int64_t whole = K / K_STEP * K_STEP;
  for (int64_t k = 0; k < whole; k += K_STEP) {
    if (k % 64 == 0) {  // one cache line of each weight row per four steps, asked for well ahead (decode streams)
      for (int j = 0; j < TN; ++j) _mm_prefetch(reinterpret_cast<const char*>(weight + j * K + k + PREFETCH_BYTES), _MM_HINT_T0);
    }
    __m256i w[TN];
    for (int j = 0; j < TN; ++j) w[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + j * K + k)));
    for (int i = 0; i < TM; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i * padded_k + k));
      for (int j = 0; j < TN; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(x, w[j]));
    }
  }
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      const __m128i halves = _mm_add_epi32(_mm256_castsi256_si128(acc[i][j]), _mm256_extracti128_si256(acc[i][j], 1));
      const __m128i pairs = _mm_add_epi32(halves, _mm_shuffle_epi32(halves, 0x4E));
      int32_t sum = _mm_cvtsi128_si32(_mm_add_epi32(pairs, _mm_shuffle_epi32(pairs, 0xB1)));
      for (int64_t k = whole; k < K; ++k) sum += int32_t{codes[i * padded_k + k]} * weight[j * K + k];
      sums[i * TN + j] = sum;
    }
  }
}

template <int TM, int TN>
void dot_tile_scalar(const int16_t* codes, int64_t padded_k, const int8_t* weight, int64_t K, int32_t* sums) {
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) {
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += int32_t{codes[i * padded_k + k]} * weight[j * K + k];
      sums[i * TN + j] = sum;
    }
  }
}

template <int TM, int TN>
void dot_tile(bool avx2, const int16_t* codes, int64_t padded_k, const int8_t* weight, int64_t K, int32_t* sums) {
  if (avx2) return dot_tile_avx2<TM, TN>(codes, padded_k, weight, K, sums);
  dot_tile_scalar<TM, TN>(codes, padded_k, weight, K, sums);
}

// The tile's sums for `tm` activation rows by `tn` weight rows, template arguments chosen at run time.
template <int TN>
void dot_tile_rows(int64_t tm, bool avx2, const int16_t* codes, int64_t padded_k, const int8_t* weight, int64_t K,
                   int32_t* sums) {
  switch (tm) {
    case 4: return dot_tile<4, TN>(avx2, codes, padded_k, weight, K, sums);
    case 3: return dot_tile<3, TN>(avx2, codes, padded_k, weight, K, sums);
    case 2: return dot_tile<2, TN>(avx2, codes, padded_k, weight, K, sums);
    default: return dot_tile<1, TN>(avx2, codes, padded_k, weight, K, sums);
  }
}

template <typename In>
float round_to(float value) {
  return static_cast<float>(In(value));
}

// Weight rows [n_begin, n_end) of y: the int8 part, then the outlier columns'.
template <typename In>
void llm_int8_rows(const Activations& a, const int8_t* weight, const float* weight_absmax, int64_t M, int64_t N,
                   int64_t K, bool avx2, float* y, int64_t n_begin, int64_t n_end) {
  const int16_t* codes = a.codes.data_ptr<int16_t>();
  const float* x_absmax = a.absmax.data_ptr<float>();
  const int64_t outliers = static_cast<int64_t>(a.outlier_columns.size());
  // Decode keeps four weight rows in flight; a batch two, by four activation rows (eight accumulators).
  const int64_t tile_n = M == 1 ? 4 : 2;
  // Rows of the weight per pass over the activations: their bytes stay in L2 while every activation row meets them.
  const int64_t block = M <= MAX_TILE_M ? n_end - n_begin : 32;
  std::vector<float> dequantized(block * outliers);  // the block's outlier columns as the reference dequantizes them
  int32_t sums[MAX_TILE_M * MAX_TILE_N];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
    const int64_t n1 = std::min(n_end, n0 + block);
    for (int64_t n = n0; n < n1; ++n) {
      const float step = weight_absmax[n] / 127.0f;
      for (int64_t j = 0; j < outliers; ++j) {
        dequantized[(n - n0) * outliers + j] = round_to<In>(static_cast<float>(weight[n * K + a.outlier_columns[j]]) * step);
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += MAX_TILE_M) {
      const int64_t tm = std::min<int64_t>(MAX_TILE_M, M - m0);
      for (int64_t n = n0, tn = 0; n < n1; n += tn) {
        const int64_t left = n1 - n;
        tn = tile_n == 4 && left >= 4 ? 4 : left >= 2 ? 2 : 1;  // the tile widths built
        const int16_t* tile_codes = codes + m0 * a.padded_k;
        const int8_t* rows = weight + n * K;
        if (tn == 4) dot_tile_rows<4>(tm, avx2, tile_codes, a.padded_k, rows, K, sums);
        else if (tn == 2) dot_tile_rows<2>(tm, avx2, tile_codes, a.padded_k, rows, K, sums);
        else dot_tile_rows<1>(tm, avx2, tile_codes, a.padded_k, rows, K, sums);
        for (int64_t i = 0; i < tm; ++i) {
          const int64_t m = m0 + i;
          for (int64_t j = 0; j < tn; ++j) {
            // as the reference: the scales' product in float64 over 127^2, times the exact sum, rounded once
            const double scale = static_cast<double>(x_absmax[m]) * static_cast<double>(weight_absmax[n + j]) / 16129.0;
            float value = static_cast<float>(static_cast<double>(sums[i * tn + j]) * scale);
            if (outliers) {  // the outlier columns' products, rounded to the compute dtype as the reference's matmul
              const float* w = dequantized.data() + (n + j - n0) * outliers;
              const float* x = a.outlier_values.data() + m * outliers;
              float product = 0.0f;
              for (int64_t c = 0; c < outliers; ++c) product += x[c] * w[c];
              value += round_to<In>(product);
            }
            y[m * N + n + j] = value;
          }
        }
      }
    }
  }
}

template <typename In>
at::Tensor llm_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_absmax, float threshold) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const Activations a = prepare_activations(x.data_ptr<In>(), M, K, threshold);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const bool avx2 = has_avx2();
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* absmax = weight_absmax.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    llm_int8_rows<In>(a, w, absmax, M, N, K, avx2, out, begin, end);
  });
  return y;
}

void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, not ", x.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations_int8(const at::Tensor& x, double threshold) {
  check_activations(x);
  const int64_t M = x.size(0), K = x.size(1);
  Activations a;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_activations_int8", [&] {
    a = prepare_activations(x.data_ptr<scalar_t>(), M, K, static_cast<float>(threshold));
  });
  at::Tensor outliers = at::zeros({K}, x.options().dtype(at::kBool));
  for (const int64_t k : a.outlier_columns) outliers.data_ptr<bool>()[k] = true;
  return {a.codes.narrow(1, 0, K).to(at::kChar), a.absmax, outliers};
}

at::Tensor linear_llm_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, double threshold) {
  check_activations(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be a contiguous int8 matrix");
  TORCH_CHECK(weight.size(1) == x.size(1), "x and weight disagree on K");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "scale must be contiguous float32, one per row");
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max() / (127 * 127), "K = ", x.size(1),
              " could overflow the int32 sums");
  const float cut = static_cast<float>(threshold);
  switch (x.scalar_type()) {
    case at::kBFloat16: return llm_int8<at::BFloat16>(x, weight, scale, cut);
    case at::kHalf: return llm_int8<at::Half>(x, weight, scale, cut);
    default: return llm_int8<float>(x, weight, scale, cut);
  }
}

}  // namespace quantizer_plugin
