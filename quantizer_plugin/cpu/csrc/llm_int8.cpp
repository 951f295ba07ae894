// LLM.int8 on the CPU (formats/activations.py: Int8Activations): each activation row quantized to int8 with its
// absmax, the int8 products summed exactly in int32, and the input features holding an outlier multiplied in float.
//
// The activations are prepared once per call (quantize_activations_int8, the reference's codes and scales exactly),
// here as int16 codes padded to a multiple of 16 columns (the VNNI and tile paths below store them as bytes). The
// weight streams once through register tiles of up to 4 activation rows by up to 4 weight rows: each 16 weights are
// sign-extended to int16 once and multiplied by every activation row with AVX2's pmaddwd (16 products summed in pairs
// into 8 int32 lanes, exact: 2 * 127 * 127 fits easily), the int32 sums exact for K up to 2^31 / 127^2. The tile's
// epilogue scales its sums as the reference does (in float64, one rounding to float32) and adds the outlier columns'
// products with the weight dequantized as the reference dequantizes it, while the weight rows are still in cache.
// Without AVX2 the same tiles run in plain C++.
//
// With AVX512-VNNI the same tiles take 64 weights per step with vpdpbusd, which multiplies unsigned bytes by signed
// ones: the activation codes are stored offset by 128 (1 to 255), and each weight row's sum times 128 (one more
// vpdpbusd per weight step, shared by the tile's activation rows) is taken off at the end. The int32 lanes wrap, and
// the true sum fits int32, so the difference is exact. The codes are written plus 128 (as uint8) when they are
// prepared. A row's last K % 64 weights are a masked load (zeros past K).
//
// Past decode, with AMX-INT8 (linear_llm_int8_tiles), the codes of 16 activation rows are one tile, multiplied with
// the stored weight by the int8 tile loop (int8_tiles.h), whose exact int32 tiles get the same epilogue.
//
// Every path gives the same bytes: the int8 sums are exact, and the epilogue is this file's one function.

#include <cfloat>
#include <cmath>
#include <limits>
#include <tuple>

#include "int8_tiles.h"
#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

namespace {

constexpr int64_t K_STEP = 16;  // int16 lanes of one AVX2 register: the codes' row stride is a multiple of this
constexpr int64_t VNNI_K_STEP = 64;  // bytes of one AVX-512 register: the offset codes' row stride is a multiple of this
constexpr int MAX_TILE_M = 4, MAX_TILE_N = 4;

// The activations' side: codes (M, padded_k), each plus an offset and stored as the kernel reading them takes them
// (int16 for pmaddwd and plain C++, uint8 plus 128 for vpdpbusd, int8 for the tiles), the offset alone past K and in
// the outlier columns; the float32 row absmax (NaN for a row holding a NaN, as torch's amax gives); the outlier
// columns and their values.
struct Activations {
  at::Tensor codes, absmax;
  std::vector<int64_t> outlier_columns;
  std::vector<float> outlier_values;  // (M, outlier columns), x as given (already in the compute dtype)
  int64_t padded_k;
};

enum class DotPath { PLAIN, PMADDWD, VPDPBUSD };

DotPath dot_path() {
  if (has_avx512_vnni()) return DotPath::VPDPBUSD;
  return has_avx2() ? DotPath::PMADDWD : DotPath::PLAIN;
}

// Code: the codes' C++ type; k_step: their row stride's multiple; offset: added to every code (vpdpbusd's 128).
template <typename In, typename Code = int16_t>
Activations prepare_activations(const In* x, int64_t M, int64_t K, float threshold, float step = 0.0f,
                                int64_t k_step = K_STEP, int offset = 0) {
  Activations a;
  a.padded_k = (K + k_step - 1) / k_step * k_step;
  a.codes = at::full({M, a.padded_k}, offset, at::TensorOptions(c10::CppTypeToScalarType<Code>::value));
  a.absmax = at::empty({M}, at::kFloat);
  // An entry with |x| >= threshold is an outlier (a NaN is not: it compares false, and reaches the output through its
  // row's absmax); a column holding one is multiplied in float for every row. No outliers with the threshold at 0.
  std::vector<uint8_t> is_outlier(K, 0);
  if (threshold > 0) {
    // by ranges of columns, one per task (for a batch, the scan is a good share of the call)
    at::parallel_for(0, K, 1024, [&](int64_t first, int64_t last) {
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = first; k < last; ++k) is_outlier[k] |= std::fabs(static_cast<float>(x[m * K + k])) >= threshold;
      }
    });
    for (int64_t k = 0; k < K; ++k) {
      if (is_outlier[k]) a.outlier_columns.push_back(k);
    }
  }
  const int64_t outliers = static_cast<int64_t>(a.outlier_columns.size());
  a.outlier_values.resize(M * outliers);
  Code* codes = a.codes.data_ptr<Code>();
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
      // Static activations (step > 0, formats/activations.py: StaticInt8Activations): every row's codes are
      // round(x / step) as the reference computes them (x times the float32 reciprocal of the step), and its
      // "absmax" is 127 steps, so that the epilogue below scales the sums as it scales LLM.int8's.
      absmax[m] = nan ? NAN : step > 0.0f ? step * 127.0f : largest;
      // torch computes the reference's 127 / absmax (a number over a tensor) as reciprocal(absmax) * 127
      const float scale = step > 0.0f ? 1.0f / step
                                      : (1.0f / std::max(absmax[m], std::numeric_limits<float>::min())) * 127.0f;
      for (int64_t k = 0; k < K; ++k) {
        // code 0 in an outlier column (multiplied in float), which holds every entry at or above the threshold
        if (is_outlier[k]) continue;
        const float code = std::nearbyint(static_cast<float>(row[k]) * scale);  // the default rounding: half to even
        // a NaN code (a NaN row's) is 0 here; the row's NaN absmax makes its outputs NaN
        const int clamped = std::isnan(code) ? 0 : static_cast<int>(std::min(std::max(code, -127.0f), 127.0f));
        codes[m * a.padded_k + k] = static_cast<Code>(clamped + offset);
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
      for (int j = 0; j < TN; ++j) prefetch_ahead(weight + j * K + k);
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

// As dot_tile_avx2, from the codes plus 128 (stride padded_k, a multiple of 64): 64 products a step, (code + 128) * w,
// and 128 * the weight row's sum taken off at the end.
template <int TM, int TN>
AVX512_VNNI void dot_tile_vnni(const uint8_t* offset_codes, int64_t padded_k, const int8_t* weight, int64_t K,
                               int32_t* sums) {
  __m512i acc[TM][TN], offset[TN];
  for (int j = 0; j < TN; ++j) {
    offset[j] = _mm512_setzero_si512();
    for (int i = 0; i < TM; ++i) acc[i][j] = _mm512_setzero_si512();
  }
  const __m512i one_twenty_eight = _mm512_set1_epi8(static_cast<char>(128));
  for (int64_t k = 0; k < K; k += VNNI_K_STEP) {
    const int64_t left = K - k;
    const __mmask64 mask = left >= VNNI_K_STEP ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    __m512i w[TN];
    for (int j = 0; j < TN; ++j) {
      prefetch_ahead(weight + j * K + k);
      w[j] = _mm512_maskz_loadu_epi8(mask, weight + j * K + k);
      offset[j] = _mm512_dpbusd_epi32(offset[j], one_twenty_eight, w[j]);
    }
    for (int i = 0; i < TM; ++i) {
      const __m512i x = _mm512_loadu_si512(offset_codes + i * padded_k + k);
      for (int j = 0; j < TN; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], x, w[j]);
    }
  }
  for (int i = 0; i < TM; ++i) {
    for (int j = 0; j < TN; ++j) sums[i * TN + j] = _mm512_reduce_add_epi32(_mm512_sub_epi32(acc[i][j], offset[j]));
  }
}

// sums (TM, TN) for the activation rows from m0 and the weight rows from `weight`, on the path chosen.
template <int TM, int TN>
void dot_tile(DotPath path, const Activations& a, int64_t m0, const int8_t* weight, int64_t K, int32_t* sums) {
  switch (path) {
    case DotPath::VPDPBUSD:
      return dot_tile_vnni<TM, TN>(a.codes.data_ptr<uint8_t>() + m0 * a.padded_k, a.padded_k, weight, K, sums);
    case DotPath::PMADDWD:
      return dot_tile_avx2<TM, TN>(a.codes.data_ptr<int16_t>() + m0 * a.padded_k, a.padded_k, weight, K, sums);
    default: return dot_tile_scalar<TM, TN>(a.codes.data_ptr<int16_t>() + m0 * a.padded_k, a.padded_k, weight, K, sums);
  }
}

// The tile's sums for `tm` activation rows by `tn` weight rows, template arguments chosen at run time.
template <int TN>
void dot_tile_rows(int64_t tm, DotPath path, const Activations& a, int64_t m0, const int8_t* weight, int64_t K,
                   int32_t* sums) {
  switch (tm) {
    case 4: return dot_tile<4, TN>(path, a, m0, weight, K, sums);
    case 3: return dot_tile<3, TN>(path, a, m0, weight, K, sums);
    case 2: return dot_tile<2, TN>(path, a, m0, weight, K, sums);
    default: return dot_tile<1, TN>(path, a, m0, weight, K, sums);
  }
}

template <typename In>
float round_to(float value) {
  return static_cast<float>(In(value));
}

// Rows [n0, n1) of the weight in the outlier columns, as the reference dequantizes them: out (n1 - n0, outliers).
template <typename In>
void dequantize_outliers(const Activations& a, const int8_t* weight, const float* weight_absmax, int64_t K, int64_t n0,
                         int64_t n1, float* out) {
  const int64_t outliers = static_cast<int64_t>(a.outlier_columns.size());
  for (int64_t n = n0; n < n1; ++n) {
    const float step = weight_absmax[n] / 127.0f;
    for (int64_t j = 0; j < outliers; ++j) {
      out[(n - n0) * outliers + j] = round_to<In>(static_cast<float>(weight[n * K + a.outlier_columns[j]]) * step);
    }
  }
}

// y[m0 + i, n0 + j] (i < tm, j < tn) from the exact sums of their int8 parts, sums[i * m_stride + j * n_stride], as
// the reference computes it: the scales' product in float64 over 127^2, times the sum, rounded once; plus the outlier
// columns' products with `dequantized` (row j: weight row n0 + j's outlier columns), rounded to the compute dtype as
// the reference's matmul. Every path ends here.
template <typename In>
void store_outputs(const Activations& a, const int32_t* sums, int64_t m_stride, int64_t n_stride, int64_t tm,
                   int64_t tn, int64_t m0, int64_t n0, const float* weight_absmax, const float* dequantized, float* y,
                   int64_t N) {
  const float* x_absmax = a.absmax.data_ptr<float>() + m0;
  const int64_t outliers = static_cast<int64_t>(a.outlier_columns.size());
  for (int64_t j = 0; j < tn; ++j) {
    const double w_absmax = static_cast<double>(weight_absmax[n0 + j]);
    const float* w = dequantized + j * outliers;
    for (int64_t i = 0; i < tm; ++i) {
      const double scale = static_cast<double>(x_absmax[i]) * w_absmax / 16129.0;
      float value = static_cast<float>(static_cast<double>(sums[i * m_stride + j * n_stride]) * scale);
      if (outliers) {
        const float* x = a.outlier_values.data() + (m0 + i) * outliers;
        float product = 0.0f;
        for (int64_t c = 0; c < outliers; ++c) product += x[c] * w[c];
        value += round_to<In>(product);
      }
      y[(m0 + i) * N + n0 + j] = value;
    }
  }
}

// Weight rows [n_begin, n_end) of y on the register tiles (VNNI, AVX2 or plain C++).
template <typename In>
void llm_int8_rows(const Activations& a, const int8_t* weight, const float* weight_absmax, int64_t M, int64_t N,
                   int64_t K, DotPath path, float* y, int64_t n_begin, int64_t n_end) {
  const int64_t outliers = static_cast<int64_t>(a.outlier_columns.size());
  // Decode keeps four weight rows in flight; a batch two, by four activation rows (eight accumulators).
  const int64_t tile_n = M == 1 ? 4 : 2;
  // Rows of the weight per pass over the activations: their bytes stay in L2 while every activation row meets them.
  const int64_t block = M <= MAX_TILE_M ? n_end - n_begin : 32;
  std::vector<float> dequantized(block * outliers);  // the block's outlier columns as the reference dequantizes them
  int32_t sums[MAX_TILE_M * MAX_TILE_N];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
    const int64_t n1 = std::min(n_end, n0 + block);
    dequantize_outliers<In>(a, weight, weight_absmax, K, n0, n1, dequantized.data());
    for (int64_t m0 = 0; m0 < M; m0 += MAX_TILE_M) {
      const int64_t tm = std::min<int64_t>(MAX_TILE_M, M - m0);
      for (int64_t n = n0, tn = 0; n < n1; n += tn) {
        const int64_t left = n1 - n;
        tn = tile_n == 4 && left >= 4 ? 4 : left >= 2 ? 2 : 1;  // the tile widths built
        const int8_t* rows = weight + n * K;
        if (tn == 4) dot_tile_rows<4>(tm, path, a, m0, rows, K, sums);
        else if (tn == 2) dot_tile_rows<2>(tm, path, a, m0, rows, K, sums);
        else dot_tile_rows<1>(tm, path, a, m0, rows, K, sums);
        store_outputs<In>(a, sums, tn, 1, tm, tn, m0, n, weight_absmax, dequantized.data() + (n - n0) * outliers, y, N);
      }
    }
  }
}

template <typename In>
at::Tensor llm_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_absmax, float threshold,
                    float step) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const DotPath path = dot_path();
  const Activations a = path == DotPath::VPDPBUSD
                            ? prepare_activations<In, uint8_t>(x.data_ptr<In>(), M, K, threshold, step, VNNI_K_STEP, 128)
                            : prepare_activations<In>(x.data_ptr<In>(), M, K, threshold, step);
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* absmax = weight_absmax.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    llm_int8_rows<In>(a, w, absmax, M, N, K, path, out, begin, end);
  });
  return y;
}

// The same on the AMX-INT8 tiles: the codes of each 16 activation rows one tile, the weight as stored.
template <typename In>
at::Tensor llm_int8_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_absmax,
                          float threshold, float step) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), groups = (M + TILE_ROWS - 1) / TILE_ROWS;
  // (K is a multiple of the tiles' 64 bytes: the codes come unpadded)
  const Activations a = prepare_activations<In, int8_t>(x.data_ptr<In>(), M, K, threshold, step, INT8_TILE_K);
  const at::Tensor packed =
      pack_int8_tile_rows(at::constant_pad_nd(a.codes, {0, 0, 0, groups * TILE_ROWS - M}));
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* w = weight.data_ptr<int8_t>();
  const float* absmax = weight_absmax.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const int64_t outliers = static_cast<int64_t>(a.outlier_columns.size());
  at::parallel_for(0, (N + TILE_ROWS - 1) / TILE_ROWS, 1, [&](int64_t first_block, int64_t last_block) {
    std::vector<float> dequantized(TILE_ROWS * outliers);
    const Int8TileFinish finish = [&](const int32_t* tile, int64_t first_n, int64_t rows, int64_t group) {
      dequantize_outliers<In>(a, w, absmax, K, first_n, first_n + rows, dequantized.data());
      // the tile holds weight row first_n + r . activation row group * 16 + c at r * 16 + c
      const int64_t m0 = group * TILE_ROWS;
      store_outputs<In>(a, tile, 1, TILE_ROWS, std::min(TILE_ROWS, M - m0), rows, m0, first_n, absmax,
                        dequantized.data(), out, N);
    };
    int8_tile_products(w, K, packed.data_ptr<int8_t>(), groups, first_block * TILE_ROWS,
                       std::min(N, last_block * TILE_ROWS), finish);
  });
  return y;
}

void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x must be float32, bfloat16 or float16, not ", x.scalar_type());
}

// The static activations' step (StaticInt8Activations.input_scale: one positive float32), or 0 for LLM.int8's
// per-row absmax.
float static_step(const c10::optional<at::Tensor>& input_scale) {
  if (!input_scale.has_value()) return 0.0f;
  TORCH_CHECK(input_scale->scalar_type() == at::kFloat && input_scale->numel() == 1, "input_scale must be one float32");
  const float step = input_scale->item<float>();
  TORCH_CHECK(step > 0.0f && std::isfinite(step), "input_scale must be positive and finite, not ", step);
  return step;
}

void check_llm_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  check_activations(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be a contiguous int8 matrix");
  TORCH_CHECK(weight.size(1) == x.size(1), "x and weight disagree on K");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "scale must be contiguous float32, one per row");
  TORCH_CHECK(x.size(1) <= std::numeric_limits<int32_t>::max() / (127 * 127), "K = ", x.size(1),
              " could overflow the int32 sums");
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

at::Tensor linear_llm_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, double threshold,
                           const c10::optional<at::Tensor>& input_scale) {
  check_llm_int8(x, weight, scale);
  const float cut = static_cast<float>(threshold), step = static_step(input_scale);
  switch (x.scalar_type()) {
    case at::kBFloat16: return llm_int8<at::BFloat16>(x, weight, scale, cut, step);
    case at::kHalf: return llm_int8<at::Half>(x, weight, scale, cut, step);
    default: return llm_int8<float>(x, weight, scale, cut, step);
  }
}

at::Tensor linear_llm_int8_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                                 double threshold, const c10::optional<at::Tensor>& input_scale) {
  TORCH_CHECK(has_amx_int8(), "linear_llm_int8_tiles needs a CPU with AMX-INT8 and the tile state granted");
  check_llm_int8(x, weight, scale);
  TORCH_CHECK(x.size(1) % INT8_TILE_K == 0, "linear_llm_int8_tiles needs K a multiple of ", INT8_TILE_K, ", not ",
              x.size(1));
  const float cut = static_cast<float>(threshold), step = static_step(input_scale);
  switch (x.scalar_type()) {
    case at::kBFloat16: return llm_int8_tiles<at::BFloat16>(x, weight, scale, cut, step);
    case at::kHalf: return llm_int8_tiles<at::Half>(x, weight, scale, cut, step);
    default: return llm_int8_tiles<float>(x, weight, scale, cut, step);
  }
}

}  // namespace quantizer_plugin
