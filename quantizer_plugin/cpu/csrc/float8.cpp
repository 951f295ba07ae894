// fp8 weights (formats/fp8.py): each byte an e4m3fn or an e5m2 bit pattern, one float32 scale per `block` columns of
// a row (block = K: one per row). A fused multiply for few activation rows, a dequantize of row ranges as the
// reference dequantizes them, the per-thread dequantize-then-GEMM, and the AMX tiles for bfloat16 batches.
//
// No fp8 hardware is needed: the byte's sign and its seven other bits move into a float16's bits, which F16C's
// vcvtph2ps widens to float32 exactly (8 or 16 weights per instruction).
// - e5m2 has float16's exponent bias (15) and is its top byte: the float16 bits are byte << 8, the same value.
// - e4m3fn: the sign to bit 15, exponent and mantissa to bits 13..7. That float16 has a 5-bit exponent field holding
//   the 4-bit exponent, with bias 15 rather than 7, so it is the fp8 value / 2^8, subnormals included (both
//   formats' subnormals sit at their smallest exponent). The 2^8 is folded into the scale (an exact product).
// The bytes are sign-extended to 16 bits first, so that after the shift by 7 the sign sits in bits 15 and 14; the
// mask keeps bit 15 and clears bit 14.
// e4m3fn has no infinities, and its NaN (S.1111.111) would decode to 480: quantize never writes it, and a checkpoint
// that holds one is refused where it is read (checkpoints/), never multiplied here.

#include <array>
#include <cmath>
#include <cstring>

#include "amx.h"
#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

namespace {

// The factor between the float16 a byte becomes and the fp8 value it holds: 2^(15 - bias).
inline float decode_factor(int64_t exponent_bits) { return exponent_bits == 4 ? 256.0f : 1.0f; }

// Sixteen fp8 bytes as float32, each the fp8 value / decode_factor.
template <int EXP>
AVX512 inline __m512 decode16(const uint8_t* bytes) {
  const __m256i words = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i half = EXP == 4 ? _mm256_and_si256(_mm256_slli_epi16(words, 7), _mm256_set1_epi16(int16_t(0xBF80)))
                                : _mm256_slli_epi16(words, 8);
  return _mm512_cvtph_ps(half);
}

// Eight of them, for CPUs with AVX2 only.
template <int EXP>
AVX2_F16C inline __m256 decode8(const uint8_t* bytes) {
  const __m128i words = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes)));
  const __m128i half = EXP == 4 ? _mm_and_si128(_mm_slli_epi16(words, 7), _mm_set1_epi16(int16_t(0xBF80)))
                                : _mm_slli_epi16(words, 8);
  return _mm256_cvtph_ps(half);
}

// One byte, the same way (the tails of rows and groups, and CPUs without AVX2).
inline float decode1(uint8_t byte, int64_t exponent_bits) {
  const uint16_t sign = static_cast<uint16_t>((byte & 0x80) << 8);
  const uint16_t bits = exponent_bits == 4 ? static_cast<uint16_t>(sign | ((byte & 0x7F) << 7))
                                           : static_cast<uint16_t>(byte << 8);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Calls fn(std::integral_constant<int, EXP>) for exponent_bits 4 or 5.
template <typename Fn>
inline void with_exponent_bits(int64_t exponent_bits, const Fn& fn) {
  if (exponent_bits == 4) return fn(std::integral_constant<int, 4>{});
  return fn(std::integral_constant<int, 5>{});
}

// y[m][n] = sum over the blocks g of row n of (sum over its columns of w * x[m]) * scale[n][g] * decode_factor, for
// rows n in [n_begin, n_end): float32 products and sums, the weight streamed once (prefetched) for MT activation rows.
// A block's scale is applied one of two ways, the same sum to within float32 rounding: SCALED multiplies the decoded
// weights by it, once for all MT rows; otherwise each row's sum over the block is multiplied by it, one FMA per row
// and block, which costs less for 1 or 2 rows and for one block per row.
template <int MT, int EXP, bool SCALED>
AVX512 void gemv_float8_rows_scaled_as(const uint8_t* weight, const float* scale, int64_t K, int64_t block,
                                       const float* x, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t groups = (K + block - 1) / block;
  const float factor = decode_factor(EXP);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = weight + n * K;
    // up to 4 rows, a second sum per row for the high 16 of each 32: two FMA chains, not one waiting on the other.
    // SCALED sums every block into them; otherwise they hold one block's sums, which `total` takes in scaled.
    __m512 acc[MT], odd[MT], total[MT];
    float tail[MT];
    for (int m = 0; m < MT; ++m) acc[m] = odd[m] = total[m] = _mm512_setzero_ps(), tail[m] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {  // a loop per block: no division per step
      const int64_t first = g * block, last = std::min(K, first + block);
      const float s = scale[n * groups + g] * factor;
      const __m512 vs = _mm512_set1_ps(s);
      int64_t k = first;
      for (; k + 32 <= last; k += 32) {
        prefetch_ahead_per_line(row + k, 32);
        __m512 low = decode16<EXP>(row + k), high = decode16<EXP>(row + k + 16);
        if constexpr (SCALED) low = _mm512_mul_ps(low, vs), high = _mm512_mul_ps(high, vs);
        for (int m = 0; m < MT; ++m) {
          acc[m] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x + m * K + k), acc[m]);
          if constexpr (MT <= 4) {
            odd[m] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + m * K + k + 16), odd[m]);
          } else {
            acc[m] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + m * K + k + 16), acc[m]);
          }
        }
      }
      for (; k + 16 <= last; k += 16) {
        __m512 w = decode16<EXP>(row + k);
        if constexpr (SCALED) w = _mm512_mul_ps(w, vs);
        for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m]);
      }
      if constexpr (!SCALED) {
        for (int m = 0; m < MT; ++m) {
          total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc[m], odd[m]), vs, total[m]);
          acc[m] = odd[m] = _mm512_setzero_ps();
        }
      }
      for (int m = 0; k < last && m < MT; ++m) {  // the block's columns past its 16s (only a row's last block)
        float rest = 0.0f;
        for (int64_t t = k; t < last; ++t) rest += decode1(row[t], EXP) * x[m * K + t];
        tail[m] += rest * s;
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m512 sum = SCALED ? _mm512_add_ps(acc[m], odd[m]) : total[m];
      y[m * N + n] = _mm512_reduce_add_ps(sum) + tail[m];
    }
  }
}

template <int MT, int EXP>
AVX512 void gemv_float8_rows(const uint8_t* weight, const float* scale, int64_t K, int64_t block, const float* x,
                             float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  if (MT > 2 && block < K) {  // several blocks a row and 3 rows or more: the scaled weights serve every row
    return gemv_float8_rows_scaled_as<MT, EXP, true>(weight, scale, K, block, x, y, N, n_begin, n_end);
  }
  gemv_float8_rows_scaled_as<MT, EXP, false>(weight, scale, K, block, x, y, N, n_begin, n_end);
}

// gemv_float8_rows for CPUs with AVX2 only: 8 weights per float32 vector, the same float32 products.
template <int MT, int EXP>
AVX2_F16C void gemv_float8_rows_avx2(const uint8_t* weight, const float* scale, int64_t K, int64_t block,
                                     const float* x, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t groups = (K + block - 1) / block;
  const float factor = decode_factor(EXP);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = weight + n * K;
    __m256 total[MT];
    float tail[MT];
    for (int m = 0; m < MT; ++m) total[m] = _mm256_setzero_ps(), tail[m] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * block, last = std::min(K, first + block);
      __m256 acc[MT];
      for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
      int64_t k = first;
      for (; k + 8 <= last; k += 8) {
        if (k % 64 == 0) prefetch_ahead(row + k);
        const __m256 w = decode8<EXP>(row + k);
        for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), acc[m]);
      }
      const float s = scale[n * groups + g] * factor;
      for (int m = 0; m < MT; ++m) {
        total[m] = _mm256_fmadd_ps(acc[m], _mm256_set1_ps(s), total[m]);
        float rest = 0.0f;
        for (int64_t t = k; t < last; ++t) rest += decode1(row[t], EXP) * x[m * K + t];
        tail[m] += rest * s;
      }
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = horizontal_sum(total[m]) + tail[m];
  }
}

// Rows [first, last) of the weight as the reference dequantizes them: each fp8 value times its group's float32 scale,
// one float32 product ((value / factor) * (scale * factor) is that product: both factors are powers of two), rounded
// once to the output dtype.
template <int EXP, typename Out, typename Store>
AVX512 void dequantize_float8_avx512(const uint8_t* weight, const float* scale, int64_t K, int64_t block,
                                     int64_t first, int64_t last, Out* out) {
  const int64_t groups = (K + block - 1) / block;
  const float factor = decode_factor(EXP);
  for (int64_t n = first; n < last; ++n) {
    const uint8_t* row = weight + n * K;
    Out* o = out + (n - first) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t begin = g * block, end = std::min(K, begin + block);
      const float s = scale[n * groups + g] * factor;
      const __m512 vs = _mm512_set1_ps(s);
      int64_t k = begin;
      for (; k + 32 <= end; k += 32) {
        prefetch_ahead_per_line(row + k, 32);
        Store::store(o + k, _mm512_mul_ps(decode16<EXP>(row + k), vs), _mm512_mul_ps(decode16<EXP>(row + k + 16), vs));
      }
      for (; k < end; ++k) store_scalar(o, k, decode1(row[k], EXP) * s);
    }
  }
}

template <typename Out>
void dequantize_float8_scalar(const uint8_t* weight, const float* scale, int64_t K, int64_t block,
                              int64_t exponent_bits, int64_t first, int64_t last, Out* out) {
  const int64_t groups = (K + block - 1) / block;
  const float factor = decode_factor(exponent_bits);
  for (int64_t n = first; n < last; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      const float s = scale[n * groups + k / block] * factor;
      store_scalar(out, (n - first) * K + k, decode1(weight[n * K + k], exponent_bits) * s);
    }
  }
}

// Rows [n0, n0 + rows), columns [k_begin, k_end) of the weight in bfloat16 at amx.h's tile_offset, bit for bit the
// reference's dequantized weight (each value times its group's scale, rounded once to bfloat16), 16 columns at a
// time: a block holds 16 columns or more, so 16 aligned columns share one scale.
template <int EXP>
AVX512_BF16 void write_codes_float8(const uint8_t* weight, const float* scale, int64_t K, int64_t block, int64_t n0,
                                    int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* a) {
  const int64_t groups = (K + block - 1) / block;
  const float factor = decode_factor(EXP);
  // the block of column k: a shift for the power-of-two blocks LowBitConfig allows (a division costs tens of cycles)
  const bool power_of_two = (block & (block - 1)) == 0;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(block));
  auto block_of = [&](int64_t k) { return power_of_two ? k >> shift : k / block; };
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = weight + (n0 + r) * K;
    const float* scales = scale + (n0 + r) * groups;
    uint16_t* out = a + tile_offset(r, 0);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += 32, out += TILE_ELEMENTS) {
      if (k0 % 64 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(bytes + k0 + TILE_PREFETCH_ROWS * K), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(bytes + k0 + CHUNK_COLUMNS), _MM_HINT_T0);
      }
      const __m512 low = _mm512_mul_ps(decode16<EXP>(bytes + k0), _mm512_set1_ps(scales[block_of(k0)] * factor));
      const __m512 high =
          _mm512_mul_ps(decode16<EXP>(bytes + k0 + 16), _mm512_set1_ps(scales[block_of(k0 + 16)] * factor));
      _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(high, low));
    }
  }
}

// 32 fp8 bytes as the bfloat16 bits of their values, unscaled (exact: bfloat16 holds every e4m3fn and e5m2 value),
// for the tiles of a weight with one scale per row. A normal byte is its exponent and mantissa moved into place with
// the exponent rebased (+ 127 - bias); a subnormal one (exponent field 0) is looked up, its mantissa indexing a table
// of m * 2^(1 - bias - M); the sign is moved to bit 15.
template <int EXP>
AVX512 inline __m512i decode32_bf16(const uint8_t* bytes) {
  constexpr int M = 7 - EXP, BIAS = (1 << (EXP - 1)) - 1;
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i normal = _mm512_add_epi16(_mm512_and_si512(_mm512_slli_epi16(w, 7 - M), _mm512_set1_epi16(0x7F << (7 - M))),
                                          _mm512_set1_epi16(static_cast<int16_t>((127 - BIAS) << 7)));
  alignas(64) static const auto table = [] {
    std::array<uint16_t, 32> t{};
    for (int m = 0; m < (1 << M); ++m) {
      const float value = std::ldexp(static_cast<float>(m), 1 - BIAS - M);
      uint32_t bits;
      std::memcpy(&bits, &value, 4);
      t[m] = static_cast<uint16_t>(bits >> 16);  // exact: m has at most 3 bits
    }
    return t;
  }();
  const __m512i subnormal = _mm512_permutexvar_epi16(w, _mm512_load_si512(table.data()));
  const __mmask32 exponent_zero = _mm512_testn_epi16_mask(w, _mm512_set1_epi16(static_cast<int16_t>(0x7F & ~((1 << M) - 1))));
  const __m512i magnitude = _mm512_mask_blend_epi16(exponent_zero, normal, subnormal);
  return _mm512_ternarylogic_epi32(magnitude, _mm512_slli_epi16(w, 8), _mm512_set1_epi16(int16_t(0x8000)), 0xF8);
}

// write_codes_float8 for a weight with one scale per row: the values unscaled, the row's scale applied to the
// products (tile_linear's row_scale), as the int8 tiles apply theirs.
template <int EXP>
AVX512_BF16 void write_values_float8(const uint8_t* weight, int64_t K, int64_t n0, int64_t rows, int64_t k_begin,
                                     int64_t k_end, uint16_t* a) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = weight + (n0 + r) * K;
    uint16_t* out = a + tile_offset(r, 0);
    for (int64_t k0 = k_begin; k0 < k_end; k0 += 32, out += TILE_ELEMENTS) {
      if (k0 % 64 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(bytes + k0 + TILE_PREFETCH_ROWS * K), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(bytes + k0 + CHUNK_COLUMNS), _MM_HINT_T0);
      }
      _mm512_storeu_si512(out, decode32_bf16<EXP>(bytes + k0));
    }
  }
}

void check_float8(const at::Tensor& weight, const at::Tensor& scale, int64_t block, int64_t exponent_bits) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous(),
              "weight must be a contiguous uint8 matrix of fp8 bit patterns");
  TORCH_CHECK(exponent_bits == 4 || exponent_bits == 5, "exponent_bits must be 4 (e4m3fn) or 5 (e5m2), not ",
              exponent_bits);
  TORCH_CHECK(block >= 1, "the scale block must hold a column or more, not ", block);
  const int64_t groups = (weight.size(1) + block - 1) / block;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0) * groups,
              "scale must be contiguous float32, one per block of each row");
}

}  // namespace

// y (M, N) float32 = x (M, K) float32 @ dequant(W).T for a few activation rows (decode).
at::Tensor gemv_float8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block,
                       int64_t exponent_bits) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  check_float8(weight, scale, block, exponent_bits);
  TORCH_CHECK(weight.size(1) == x.size(1), "x and weight disagree on K");
  TORCH_CHECK(has_avx2(), "gemv_float8 needs AVX2");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const bool avx512 = has_avx512();
  with_exponent_bits(exponent_bits, [&](auto exp) {
    constexpr int EXP = decltype(exp)::value;
    if (avx512) {
      // 8 activation rows per pass (16 accumulators of 32 registers): each weight decoded once per 8 rows, not 4
      for_row_groups<8>(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
        gemv_float8_rows<decltype(rows)::value, EXP>(w, s, K, block, x.data_ptr<float>() + m0 * K,
                                                      y.data_ptr<float>() + m0 * N, N, begin, end);
      });
    } else {
      for_row_groups(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
        gemv_float8_rows_avx2<decltype(rows)::value, EXP>(w, s, K, block, x.data_ptr<float>() + m0 * K,
                                                           y.data_ptr<float>() + m0 * N, N, begin, end);
      });
    }
  });
  return y;
}

// out (last - first, K) = rows [first, last) of the weight, dequantized as the reference does, in out's dtype.
void dequantize_float8(const at::Tensor& weight, const at::Tensor& scale, int64_t block, int64_t exponent_bits,
                       int64_t first, int64_t last, at::Tensor& out) {
  check_float8(weight, scale, block, exponent_bits);
  const int64_t K = weight.size(1);
  TORCH_CHECK(0 <= first && first <= last && last <= weight.size(0), "row range outside the weight");
  TORCH_CHECK(out.is_contiguous() && out.numel() == (last - first) * K, "out must be contiguous, (last - first) x K");
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const bool vector = has_avx512();
  auto run = [&](auto* o, auto&& rows) {
    at::parallel_for(first, last, 8, [&](int64_t a, int64_t b) { rows(o + (a - first) * K, a, b); });
  };
  with_exponent_bits(exponent_bits, [&](auto exp) {
    constexpr int EXP = decltype(exp)::value;
    switch (out.scalar_type()) {
      case at::kFloat:
        run(out.data_ptr<float>(), [&](float* o, int64_t a, int64_t b) {
          vector ? dequantize_float8_avx512<EXP, float, StoreFloat>(w, s, K, block, a, b, o)
                 : dequantize_float8_scalar(w, s, K, block, EXP, a, b, o);
        });
        break;
      case at::kHalf:
        run(out.data_ptr<at::Half>(), [&](at::Half* o, int64_t a, int64_t b) {
          vector ? dequantize_float8_avx512<EXP, at::Half, StoreHalf>(w, s, K, block, a, b, o)
                 : dequantize_float8_scalar(w, s, K, block, EXP, a, b, o);
        });
        break;
      case at::kBFloat16:
        run(out.data_ptr<at::BFloat16>(), [&](at::BFloat16* o, int64_t a, int64_t b) {
          vector ? dequantize_float8_avx512<EXP, at::BFloat16, StoreBFloat16>(w, s, K, block, a, b, o)
                 : dequantize_float8_scalar(w, s, K, block, EXP, a, b, o);
        });
        break;
      default:
        TORCH_CHECK(false, "dequantize_float8 writes float32, bfloat16 or float16, not ", out.scalar_type());
    }
  });
}

at::Tensor linear_float8_chunked(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block,
                                 int64_t exponent_bits, int64_t rows_per_chunk) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix");
  return chunked_linear(x, weight.size(0), rows_per_chunk, [&](int64_t first, int64_t last, at::Tensor& out) {
    dequantize_float8(weight, scale, block, exponent_bits, first, last, out);
  });
}

at::Tensor linear_float8_tiles(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block,
                               int64_t exponent_bits) {
  check_float8(weight, scale, block, exponent_bits);
  TORCH_CHECK(weight.size(1) == x.size(1), "x and weight disagree on K");
  TORCH_CHECK(block % 16 == 0, "the tile kernel needs a scale block of a multiple of 16 columns, not ", block);
  const uint8_t* w = weight.data_ptr<uint8_t>();
  const float* s = scale.data_ptr<float>();
  const int64_t K = weight.size(1);
  at::Tensor y;
  with_exponent_bits(exponent_bits, [&](auto exp) {
    constexpr int EXP = decltype(exp)::value;
    if (block >= K) {
      y = tile_linear(
          pack_activations(x), x.size(0), weight.size(0), TILE_K,
          [&](int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
            write_values_float8<EXP>(w, K, n0, rows, k_begin, k_end, out);
          },
          [&](int64_t n) { return s[n]; });  // the values are exact, unscaled: the row's scale is all that is left
      return;
    }
    y = tile_linear(
        pack_activations(x), x.size(0), weight.size(0), TILE_K,
        [&](int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
          write_codes_float8<EXP>(w, s, K, block, n0, rows, k_begin, k_end, out);
        },
        [](int64_t) { return 1.0f; });  // the scales are in the written weights, as the reference applies them
  });
  return y;
}

}  // namespace quantizer_plugin
