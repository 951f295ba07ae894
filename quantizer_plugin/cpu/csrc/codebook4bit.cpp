// NF4/FP4 on the CPU: a fused dequantize-and-multiply for few activation rows (decode), a dequantize of any range
// of the flat weight, and the per-thread dequantize-then-GEMM for larger batches.
//
// The weight layout is the checkpoint's own (quantizer_plugin/formats/codebook4bit.py): the weight flattened
// row-major, two 4-bit codes per byte (the first element in the high nibble), one absmax per `block` consecutive
// elements, optionally double-quantized (8-bit dynamic codes, one float32 scale per 256 blocks, one offset).
// Each product of a code by its absmax is rounded once to float32 and never contracted into an FMA with anything
// else (the build passes -ffp-contract=off), so the dequantized weights equal the reference's bit for bit.


#include <atomic>
#include <cmath>
#include <tuple>

#include "amx.h"
#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

namespace {

struct Absmax {
  // Without double quantization: `plain` per block. With it: code8[codes[b]] * scales[b / 256] + offset.
  const float* plain = nullptr;
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;
  const float* code8 = nullptr;
  float offset = 0.0f;

  inline float operator()(int64_t block) const {
    if (plain != nullptr) return plain[block];
    float centred = code8[codes[block]] * scales[block >> 8];
    return centred + offset;
  }
};

Absmax make_absmax(const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                   const OptionalTensor& offset, const OptionalTensor& code8) {
  Absmax a;
  if (absmax.has_value()) {
    TORCH_CHECK(absmax->scalar_type() == at::kFloat && absmax->is_contiguous(), "absmax must be contiguous float32");
    a.plain = absmax->data_ptr<float>();
    return a;
  }
  TORCH_CHECK(codes.has_value() && scales.has_value() && offset.has_value() && code8.has_value(),
              "without absmax, the double-quantized absmax (codes, scales, offset, code8) is needed");
  TORCH_CHECK(codes->scalar_type() == at::kByte && codes->is_contiguous(), "absmax codes must be contiguous uint8");
  TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous(),
              "absmax scales must be contiguous float32");
  TORCH_CHECK(code8->scalar_type() == at::kFloat && code8->numel() == 256, "the dynamic code must be 256 float32");
  TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1, "the absmax offset must be one float32");
  a.codes = codes->data_ptr<uint8_t>();
  a.scales = scales->data_ptr<float>();
  a.code8 = code8->data_ptr<float>();
  a.offset = offset->data_ptr<float>()[0];
  return a;
}

// The code nearest `scaled`: its position among the 15 sorted midpoints (how many are below it), through `order`.
inline uint8_t code_of(float scaled, const float* midpoints, const uint8_t* order) {
  int position = 0;
  while (position < 15 && midpoints[position] < scaled) ++position;
  return order[position];
}

inline uint8_t code_at(const uint8_t* packed, int64_t element) {
  uint8_t byte = packed[element >> 1];
  return (element & 1) ? (byte & 0xF) : (byte >> 4);
}

// --- dequantize a range of the flat weight ----------------------------------------------------------------------

template <typename Out>
void dequantize_scalar(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block, int64_t begin,
                       int64_t end, int64_t first, Out* out) {
  for (int64_t e = begin; e < end; ++e) {
    float value = lut[code_at(packed, e)] * absmax(e / block);
    store_scalar(out, e - first, value);
  }
}

// The same loop compiled twice: with the BF16 extension only for its one-instruction bf16 store, so that nothing
// else in a build for CPUs without it can use BF16 instructions. Groups of 32 elements start at a multiple of 32:
// 16 bytes, their high nibbles the even elements, the low ones the odd. A block of 16 covers half a group.
// GROUPED writes each group as its 16 even elements, then its 16 odd ones (no interleaving shuffle); a GEMM on such
// rows multiplies activations whose columns are permuted the same way (see group_permuted_columns).
#define DEQUANTIZE_BODY                                                                                              \
  int64_t head_end = std::min(end, (begin + 31) / 32 * 32);                                                         \
  dequantize_scalar(packed, absmax, lut, block, begin, head_end, first, out);                                      \
  const __m512 table = _mm512_loadu_ps(lut);                                                                        \
  const __m512i low_nibble = _mm512_set1_epi32(0xF);                                                                \
  const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);            \
  const __m512i second_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);     \
  int64_t g = head_end;                                                                                             \
  const int block_shift = __builtin_ctzll(block); /* a power of two: no division per group */                        \
  for (; g + 32 <= end; g += 32) {                                                                                  \
    prefetch_ahead_per_line(packed + g / 2, 16);                                                                  \
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + g / 2)));       \
    __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);                                        \
    __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), table);                                 \
    __m512 scale = block >= 32 ? _mm512_set1_ps(absmax(g >> block_shift))                                           \
                               : _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(absmax(g >> 4)),                       \
                                                      _mm512_set1_ps(absmax((g >> 4) + 1)));                        \
    even = _mm512_mul_ps(even, scale);                                                                              \
    odd = _mm512_mul_ps(odd, scale);                                                                                \
    if constexpr (GROUPED) {                                                                                        \
      Store::store(out + (g - first), even, odd);                                                                   \
    } else {                                                                                                        \
      Store::store(out + (g - first), _mm512_permutex2var_ps(even, first_half, odd),                                \
                   _mm512_permutex2var_ps(even, second_half, odd));                                                 \
    }                                                                                                               \
  }                                                                                                                 \
  dequantize_scalar(packed, absmax, lut, block, g, end, first, out);

template <typename Out, typename Store, bool GROUPED>
AVX512 void dequantize_avx512(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block,
                              int64_t begin, int64_t end, int64_t first, Out* out) {
  DEQUANTIZE_BODY
}

template <bool GROUPED>
AVX512_BF16 void dequantize_avx512_bf16(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block,
                                        int64_t begin, int64_t end, int64_t first, at::BFloat16* out) {
  using Store = StoreBFloat16Native;
  DEQUANTIZE_BODY
}

// The absmax of blocks [first, first + count), 16 at a time: with double quantization one dependent chain of
// three loads per block is most of a decode step's scalar work, so it is gathered once per row instead.
AVX512 void decode_absmax(const Absmax& a, int64_t first, int64_t count, float* out) {
  if (a.plain != nullptr) {
    std::memcpy(out, a.plain + first, count * sizeof(float));
    return;
  }
  const __m512 offset = _mm512_set1_ps(a.offset);
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m512i blocks = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(first + i)),
                                            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.codes + first + i)));
    const __m512 values = _mm512_i32gather_ps(codes, a.code8, 4);
    const __m512 scales = _mm512_i32gather_ps(_mm512_srli_epi32(blocks, 8), a.scales, 4);
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_mul_ps(values, scales), offset));
  }
  for (; i < count; ++i) out[i] = a(first + i);
}

// For amx.h's write_weights_4bit: a block's 16 codebook entries times its absmax (float32, as the reference).
struct CodebookTable {
  const float* lut;
  const Absmax& absmax;
  AVX512 inline __m512 operator()(int64_t b) const { return _mm512_mul_ps(_mm512_loadu_ps(lut), _mm512_set1_ps(absmax(b))); }
};

// --- the fused dequantize-and-multiply for a few activation rows ------------------------------------------------

// y[m][n] for rows n in [n_begin, n_end): K % block == 0 and block % 32 == 0, so every row starts on a byte and on a
// block; xe/xo hold each activation row's even and odd elements (K / 2 each), so that a byte's high and low nibbles
// meet the activations they multiply without a shuffle.
template <int MT>
AVX512 void gemv_rows_avx512(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block, int64_t K,
                             const float* xe, const float* xo, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  const int64_t half = K / 2;
  const int64_t blocks_per_row = K / block;
  std::vector<float> row_absmax(blocks_per_row);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * half;
    decode_absmax(absmax, n * blocks_per_row, blocks_per_row, row_absmax.data());
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m512 part[MT];
      for (int m = 0; m < MT; ++m) part[m] = _mm512_setzero_ps();
      const int64_t start = b * (block / 2);
      for (int64_t off = start; off < start + block / 2; off += 16) {
        prefetch_ahead_per_line(row + off, 16);
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + off)));
        __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
        __m512 w_odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), table);
        for (int m = 0; m < MT; ++m) {
          part[m] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xe + m * half + off), part[m]);
          part[m] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xo + m * half + off), part[m]);
        }
      }
      const __m512 scale = _mm512_set1_ps(row_absmax[b]);
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(scale, part[m], acc[m]);
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// The same for bfloat16 activations: the codebook looked up as bfloat16 (vpermw, 32 codes at a time) and multiplied
// by pairs with vdpbf16ps, float32 accumulation. Half the shuffles of the float32 loop per weight; the codes are
// rounded to bfloat16 first (relative error <= 2^-9, as the reference's bfloat16 weights). Needs block % 64 == 0.
// Its row and block loops repeat gemv_rows_avx512's on purpose: an inner step shared through a lambda or a template
// would be compiled for a different target than its caller, and GCC would then call it per step, not inline it.
template <int MT>
AVX512_BF16 void gemv_rows_bf16(const uint8_t* packed, const Absmax& absmax, const uint16_t* lut16, int64_t block,
                                int64_t K, const uint16_t* xe, const uint16_t* xo, float* y, int64_t N,
                                int64_t n_begin, int64_t n_end) {
  const __m512i table = _mm512_loadu_si512(lut16);
  const __m512i low_nibble = _mm512_set1_epi16(0xF);
  const int64_t half = K / 2;
  const int64_t blocks_per_row = K / block;
  std::vector<float> row_absmax(blocks_per_row);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * half;
    decode_absmax(absmax, n * blocks_per_row, blocks_per_row, row_absmax.data());
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m512 part[MT];
      for (int m = 0; m < MT; ++m) part[m] = _mm512_setzero_ps();
      const int64_t start = b * (block / 2);
      for (int64_t off = start; off < start + block / 2; off += 32) {
        prefetch_ahead_per_line(row + off, 32);
        __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + off)));
        __m512bh w_even = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
        __m512bh w_odd = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(bytes, low_nibble), table);
        for (int m = 0; m < MT; ++m) {
          part[m] = _mm512_dpbf16_ps(part[m], w_even, (__m512bh)_mm512_loadu_si512(xe + m * half + off));
          part[m] = _mm512_dpbf16_ps(part[m], w_odd, (__m512bh)_mm512_loadu_si512(xo + m * half + off));
        }
      }
      const __m512 scale = _mm512_set1_ps(row_absmax[b]);
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(scale, part[m], acc[m]);
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// Eight 4-bit codes (one per int32 lane) looked up in the 16-entry float32 codebook: AVX2 permutes eight lanes, so
// each half of the codebook is permuted and the code's bit 3 (moved into the sign bit) picks between them.
AVX2 inline __m256 lookup8(__m256i codes, __m256 low_half, __m256 high_half) {
  const __m256 low = _mm256_permutevar8x32_ps(low_half, codes);
  const __m256 high = _mm256_permutevar8x32_ps(high_half, codes);
  return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));
}

// gemv_rows_avx512 for CPUs with AVX2 only: 8 bytes (16 codes) per step, float32 products as there.
template <int MT>
AVX2 void gemv_rows_avx2(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block, int64_t K,
                         const float* xe, const float* xo, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const __m256 low_half = _mm256_loadu_ps(lut), high_half = _mm256_loadu_ps(lut + 8);
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  const int64_t half = K / 2;
  const int64_t blocks_per_row = K / block;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * half;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m256 part[MT];
      for (int m = 0; m < MT; ++m) part[m] = _mm256_setzero_ps();
      const int64_t start = b * (block / 2);
      for (int64_t off = start; off < start + block / 2; off += 8) {
        if (off % 64 == 0) prefetch_ahead(row + off);
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + off)));
        const __m256 w_even = lookup8(_mm256_srli_epi32(bytes, 4), low_half, high_half);
        const __m256 w_odd = lookup8(_mm256_and_si256(bytes, low_nibble), low_half, high_half);
        for (int m = 0; m < MT; ++m) {
          part[m] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xe + m * half + off), part[m]);
          part[m] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xo + m * half + off), part[m]);
        }
      }
      const __m256 scale = _mm256_set1_ps(absmax(n * blocks_per_row + b));
      for (int m = 0; m < MT; ++m) acc[m] = _mm256_fmadd_ps(scale, part[m], acc[m]);
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = horizontal_sum(acc[m]);
  }
}

// The bfloat16 decode for CPUs with AVX2 only, four times the float32 loop's weights per shuffle: the codebook rounded
// to bfloat16 (as gemv_rows_bf16 rounds it) is looked up one byte plane at a time with vpshufb, 32 codes per lookup,
// and the two planes interleaved into 16-bit words are float32 values once shifted or masked into the top half of
// 32-bit lanes. Each 16 bytes of codes (32 weights) so become four float32 vectors whose elements, per 32 columns, are
//   [0 2 4 6 16 18 20 22] [1 3 5 7 17 19 21 23] [8 10 12 14 24 26 28 30] [9 11 13 15 25 27 29 31],
// the order xp holds the activations in (permute_for_avx2_lookup). Products and sums in float32, the block's absmax
// applied once per block, as gemv_rows_avx2. Independent sums per activation row (U) keep the FMAs from waiting on one
// another's latency while the registers last. Needs block % 32 == 0.
template <int MT>
AVX2 void gemv_rows_bf16_avx2(const uint8_t* packed, const Absmax& absmax, const uint8_t* plane_bytes, int64_t block,
                              int64_t K, const float* xp, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  constexpr int U = avx2_chains(MT);
  const __m256i planes[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(plane_bytes)),
                             _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plane_bytes + 32))};
  const __m256i low_nibble = _mm256_set1_epi16(0xF), top_half = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t half = K / 2;
  const int64_t blocks_per_row = K / block;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * half;
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m256 part[MT][U];
      for (int m = 0; m < MT; ++m)
        for (int u = 0; u < U; ++u) part[m][u] = _mm256_setzero_ps();
      const int64_t start = b * (block / 2);
      for (int64_t off = start; off < start + block / 2; off += 16) {
        if (off % 64 == 0) prefetch_ahead(row + off);
        // word j holds byte j: its high nibble is column 2j's code, its low nibble column 2j + 1's
        const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + off)));
        const __m256i codes = _mm256_or_si256(_mm256_srli_epi16(words, 4),
                                              _mm256_slli_epi16(_mm256_and_si256(words, low_nibble), 8));
        // byte i of `codes` is column i's code (columns 16-31 in the upper 128 bits, where vpshufb looks up alike)
        const __m256i low = _mm256_shuffle_epi8(planes[0], codes), high = _mm256_shuffle_epi8(planes[1], codes);
        const __m256i first = _mm256_unpacklo_epi8(low, high), second = _mm256_unpackhi_epi8(low, high);
        const __m256 w[4] = {_mm256_castsi256_ps(_mm256_slli_epi32(first, 16)),
                             _mm256_castsi256_ps(_mm256_and_si256(first, top_half)),
                             _mm256_castsi256_ps(_mm256_slli_epi32(second, 16)),
                             _mm256_castsi256_ps(_mm256_and_si256(second, top_half))};
        const float* x = xp + 2 * off;
        for (int v = 0; v < 4; ++v)
          for (int m = 0; m < MT; ++m)
            part[m][v % U] = _mm256_fmadd_ps(w[v], _mm256_loadu_ps(x + m * K + 8 * v), part[m][v % U]);
      }
      const __m256 scale = _mm256_set1_ps(absmax(n * blocks_per_row + b));
      for (int m = 0; m < MT; ++m) {
        __m256 total = part[m][0];
        for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, part[m][u]);
        acc[m] = _mm256_fmadd_ps(scale, total, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = horizontal_sum(acc[m]);
  }
}

// R weight rows from n0 of gemv_rows_q8_avx2, 32 columns at a time: each row's 16 bytes of codes looked up, and
// each activation row's 32 bytes loaded once for all R of them. R rows in flight are R streams from memory and R
// independent chains of sums.
template <int MT, int R>
AVX2 inline __attribute__((always_inline)) void q8_rows(const uint8_t* packed, const Absmax& absmax, __m256i table,
                                                         int64_t block, int64_t K, const int8_t* x8, const float* xd,
                                                         float* y, int64_t N, int64_t n0) {
  const int64_t blocks_per_row = K / block, steps = K / Q8_BLOCK, chunks = block / Q8_BLOCK;
  const uint8_t* bytes[R];
  for (int r = 0; r < R; ++r) bytes[r] = packed + (n0 + r) * (K / 2);
  const int8_t* x = x8;
  const float* d = xd;
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks_per_row; ++b) {
    __m256 part[MT][R];
    for (int m = 0; m < MT; ++m)
      for (int r = 0; r < R; ++r) part[m][r] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c, x += Q8_BLOCK, ++d) {
      __m256i w[R], magnitude[R];
      for (int r = 0; r < R; ++r) {
        if (c % 4 == 0) prefetch_ahead(bytes[r]);
        const __m128i pairs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes[r]));
        bytes[r] += 16;
        const __m256i codes = _mm256_and_si256(_mm256_set_m128i(pairs, _mm_srli_epi16(pairs, 4)),
                                               _mm256_set1_epi8(0x0F));
        w[r] = _mm256_shuffle_epi8(table, codes);
        magnitude[r] = _mm256_sign_epi8(w[r], w[r]);
      }
      for (int m = 0; m < MT; ++m) {
        const __m256i xm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K));
        const __m256 scale = _mm256_set1_ps(d[m * steps]);
        for (int r = 0; r < R; ++r) {
          const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[r], _mm256_sign_epi8(xm, w[r])),
                                                 _mm256_set1_epi16(1));
          part[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, part[m][r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 scale = _mm256_set1_ps(absmax((n0 + r) * blocks_per_row + b) * (1.0f / 127.0f));
      for (int m = 0; m < MT; ++m) acc[m][r] = _mm256_fmadd_ps(scale, part[m][r], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = horizontal_sum(acc[m][r]);
}

// The q8_0 decode (activations mode "q8_0", q8_0.cpp): the codebook rounded to int8 steps (round(127 c), llama.cpp's
// IQ4_NL's arithmetic) and looked up with one vpshufb per 32 codes, each 16 bytes of a row split into their high
// nibbles (the 16 even columns of 32) in the lower 128 bits and their low nibbles (the odd ones) in the upper, the
// order quantize_q8_0(x, 2, 32) writes the activations in. vpmaddubsw multiplies unsigned by signed bytes: |w| by x
// carrying w's sign (vpsignb), two products per 16-bit sum (at most 2 * 127 * 127, no saturation), vpmaddwd adds
// them into 8 exact int32 sums; each 32 columns' sum times the activations' block scale in float32, and the block's
// absmax / 127 once per block. Needs block % 32 == 0.
// The same decode 64 columns at a time, for blocks of 64 or more: a row's 32 bytes in one load, their high nibbles
// (the 32 even columns) and low nibbles (the odd ones) each looked up whole, against the activations written in
// that order per 64 columns (quantize_q8_0(x, 2, 64)). Lanes 0-3 of each int32 sum hold columns of the span's first
// block of 32 and lanes 4-7 of its second, so one vector of the two activation scales scales both halves at once,
// and one conversion and one FMA serve 64 weights, where the 32-at-a-time loop spends them per 32.
template <int MT, int R>
AVX2 inline __attribute__((always_inline)) void q8_span_rows(const uint8_t* packed, const Absmax& absmax,
                                                              __m256i table, int64_t block, int64_t K,
                                                              const int8_t* x8, const float* xd, float* y, int64_t N,
                                                              int64_t n0) {
  constexpr int64_t SPAN = 2 * Q8_BLOCK;
  const int64_t blocks_per_row = K / block, steps = K / Q8_BLOCK, spans_per_block = block / SPAN;
  const __m256i low_nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* bytes[R];
  for (int r = 0; r < R; ++r) bytes[r] = packed + (n0 + r) * (K / 2);
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks_per_row; ++b) {
    float block_scale[R];
    for (int r = 0; r < R; ++r) block_scale[r] = absmax((n0 + r) * blocks_per_row + b) * (1.0f / 127.0f);
    for (int64_t s = b * spans_per_block; s < (b + 1) * spans_per_block; ++s) {
      __m256i even[R], odd[R];
      for (int r = 0; r < R; ++r) {
        if (s % 2 == 0) prefetch_ahead(bytes[r]);
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes[r]));
        bytes[r] += 32;
        even[r] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_nibble));
        odd[r] = _mm256_shuffle_epi8(table, _mm256_and_si256(raw, low_nibble));
      }
      for (int m = 0; m < MT; ++m) {
        const int8_t* x = x8 + m * K + s * SPAN;
        const __m256i x_even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i x_odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + Q8_BLOCK));
        const float* d = xd + m * steps + 2 * s;
        const __m256 scales = _mm256_setr_m128(_mm_set1_ps(d[0]), _mm_set1_ps(d[1]));
        for (int r = 0; r < R; ++r) {
          const __m256i sums = _mm256_add_epi32(
              _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(even[r], even[r]),
                                                     _mm256_sign_epi8(x_even, even[r])), ones),
              _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(odd[r], odd[r]),
                                                     _mm256_sign_epi8(x_odd, odd[r])), ones));
          acc[m][r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), scales),
                                      _mm256_set1_ps(block_scale[r]), acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) y[m * N + n0 + r] = horizontal_sum(acc[m][r]);
}

// Rows [n_begin, n_end) of the q8_0 decode, R at a time and the rest one by one: 64 columns at a time (q8_span_rows)
// or 32 (q8_rows), against activations quantize_q8_0 wrote for that span.
template <int MT, bool BY_SPAN>
AVX2 void gemv_rows_q8_avx2(const uint8_t* packed, const Absmax& absmax, const int8_t* table16, int64_t block,
                            int64_t K, const int8_t* x8, const float* xd, float* y, int64_t N, int64_t n_begin,
                            int64_t n_end) {
  const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table16)));
  constexpr int R = q8_weight_rows(MT);
  // (no lambda for the two loops: GCC compiles one without the target, and then will not inline these into it)
  int64_t n = n_begin;
  if constexpr (BY_SPAN) {
    for (; n + R <= n_end; n += R) q8_span_rows<MT, R>(packed, absmax, table, block, K, x8, xd, y, N, n);
    for (; n < n_end; ++n) q8_span_rows<MT, 1>(packed, absmax, table, block, K, x8, xd, y, N, n);
  } else {
    for (; n + R <= n_end; n += R) q8_rows<MT, R>(packed, absmax, table, block, K, x8, xd, y, N, n);
    for (; n < n_end; ++n) q8_rows<MT, 1>(packed, absmax, table, block, K, x8, xd, y, N, n);
  }
}

// The q8_0 decode on CPUs with AVX512-VNNI, for blocks of 64 or more and K a multiple of 128: a row's 64 bytes (128
// columns) per step, their high nibbles (the 64 even columns) and low nibbles (the odd ones) each looked up whole with
// vpshufb, against the activations written in that order per 128 columns (quantize_q8_0(x, 2, 128)). vpdpbusd
// multiplies unsigned bytes by signed ones, four products into each int32 lane, so the codebook is looked up as
// round(127 c) + 128 (1 to 255) and each lane starts from -128 times the sum of the eight activation codes it
// multiplies: that takes the offset off exactly (|sum| < 2^19). Lane j holds columns 8j to 8j + 7, so lanes 0-7 are
// the span's first 64 columns and 8-15 its second (one weight block each), and lanes 4i to 4i + 3 the activations'
// block i. One vpdpbusd serves 64 weights where the AVX2 loop spends six instructions on 32 (q8_span_rows): a
// decode at M = 1 goes from compute-bound to memory-bound (2 threads of the Xeon with AMX: 14 to 17 GB/s in a
// stand-alone loop, against an 18 GB/s read probe).
template <int MT>
AVX512_VNNI void gemv_rows_q8_vnni(const uint8_t* packed, const Absmax& absmax, const int8_t* table16, int64_t block,
                                   int64_t K, const int8_t* x8, const float* xd, float* y, int64_t N, int64_t n_begin,
                                   int64_t n_end) {
  constexpr int64_t SPAN = 4 * Q8_BLOCK;
  const int64_t spans = K / SPAN, blocks_per_row = K / block, steps = K / Q8_BLOCK;
  uint8_t offset_table[16];
  for (int i = 0; i < 16; ++i) offset_table[i] = static_cast<uint8_t>(table16[i] + 128);
  const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(offset_table)));
  const __m512i low_nibble = _mm512_set1_epi8(0x0F), ones = _mm512_set1_epi8(1);
  // per activation row and span: each lane's starting sum (the offset taken off), and its activation scale times the
  // codebook's int8 step, 1 / 127
  std::vector<int32_t> start(MT * spans * 16);
  for (int m = 0; m < MT; ++m) {
    for (int64_t s = 0; s < spans; ++s) {
      const int8_t* x = x8 + m * K + s * SPAN;
      __m512i codes = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_loadu_si512(x));
      codes = _mm512_dpbusd_epi32(codes, ones, _mm512_loadu_si512(x + SPAN / 2));
      _mm512_storeu_si512(start.data() + (m * spans + s) * 16,
                          _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(codes, 7)));
    }
  }
  const std::vector<float> lane_scale = q8_lane_scales(xd, MT, steps, spans, SPAN / Q8_BLOCK, 1.0f / 127.0f);
  std::vector<float> row_absmax(blocks_per_row);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * (K / 2);
    decode_absmax(absmax, n * blocks_per_row, blocks_per_row, row_absmax.data());
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t s = 0; s < spans; ++s) {
      prefetch_ahead(row + s * (SPAN / 2));
      const __m512i raw = _mm512_loadu_si512(row + s * (SPAN / 2));
      const __m512i even = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_nibble));
      const __m512i odd = _mm512_shuffle_epi8(table, _mm512_and_si512(raw, low_nibble));
      const __m512 weight_scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(row_absmax[s * SPAN / block]),
                                                       _mm512_set1_ps(row_absmax[(s * SPAN + SPAN / 2) / block]));
      for (int m = 0; m < MT; ++m) {
        const int8_t* x = x8 + m * K + s * SPAN;
        const int64_t at = (m * spans + s) * 16;
        __m512i sums = _mm512_dpbusd_epi32(_mm512_loadu_si512(start.data() + at), even, _mm512_loadu_si512(x));
        sums = _mm512_dpbusd_epi32(sums, odd, _mm512_loadu_si512(x + SPAN / 2));
        acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_loadu_ps(lane_scale.data() + at)),
                                 weight_scale, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// x (M, K) bfloat16 as float32 in gemv_rows_bf16_avx2's column order within each 32 columns (K % 32 == 0).
at::Tensor permute_for_avx2_lookup(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor xp = at::empty({M, K}, x.options().dtype(at::kFloat));
  const at::BFloat16* in = x.data_ptr<at::BFloat16>();
  float* out = xp.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < K; g += 32) {
      for (int v = 0; v < 4; ++v) {
        for (int i = 0; i < 8; ++i) {
          const int64_t column = g + (i >= 4 ? 16 : 0) + (v >= 2 ? 8 : 0) + 2 * (i % 4) + v % 2;
          out[m * K + g + 8 * v + i] = static_cast<float>(in[m * K + column]);
        }
      }
    }
  }
  return xp;
}

// The flat weight's elements [begin, end) as float32, 16 (8 bytes) at a time, for CPUs with AVX2 only (the chunks
// of a float32 compute dtype): each code times its block's absmax, one rounding, as the reference.
AVX2 void dequantize_avx2(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block,
                          int64_t begin, int64_t end, int64_t first, float* out) {
  const int64_t head_end = std::min(end, (begin + 15) / 16 * 16);  // steps start on 16 elements: one block each
  dequantize_scalar(packed, absmax, lut, block, begin, head_end, first, out);
  const __m256 low_half = _mm256_loadu_ps(lut), high_half = _mm256_loadu_ps(lut + 8);
  const __m256i low_nibble = _mm256_set1_epi32(0xF);
  const int block_shift = __builtin_ctzll(block);  // a power of two of 16 or more
  int64_t g = head_end;
  for (; g + 16 <= end; g += 16) {
    if (g % 128 == 0) prefetch_ahead(packed + g / 2);
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + g / 2)));
    const __m256 scale = _mm256_set1_ps(absmax(g >> block_shift));
    const __m256 even = _mm256_mul_ps(lookup8(_mm256_srli_epi32(bytes, 4), low_half, high_half), scale);
    const __m256 odd = _mm256_mul_ps(lookup8(_mm256_and_si256(bytes, low_nibble), low_half, high_half), scale);
    const __m256 pairs_low = _mm256_unpacklo_ps(even, odd), pairs_high = _mm256_unpackhi_ps(even, odd);
    _mm256_storeu_ps(out + (g - first), _mm256_permute2f128_ps(pairs_low, pairs_high, 0x20));
    _mm256_storeu_ps(out + (g - first) + 8, _mm256_permute2f128_ps(pairs_low, pairs_high, 0x31));
  }
  dequantize_scalar(packed, absmax, lut, block, g, end, first, out);
}

void gemv_rows_scalar(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block, int64_t K,
                      const float* xe, const float* xo, int64_t M, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t half = K / 2;
  const int64_t blocks_per_row = K / block;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * half;
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        float part = 0.0f;
        for (int64_t off = b * (block / 2); off < (b + 1) * (block / 2); ++off) {
          part += lut[row[off] >> 4] * xe[m * half + off] + lut[row[off] & 0xF] * xo[m * half + off];
        }
        acc += absmax(n * blocks_per_row + b) * part;
      }
      y[m * N + n] = acc;
    }
  }
}

// Each activation row split into its even and odd elements (K / 2 each), which a byte's high and low nibbles
// multiply.
// (2, M, K / 2): x's even columns, then its odd ones, written by one loop into one tensor. Two strided copies
// through ATen (select, contiguous) cost 26 us a call in dispatcher overhead, about 1 ms of a decode step's 42 calls.
template <typename T>
at::Tensor split_even_odd(const at::Tensor& x) {
  const int64_t M = x.size(0), half = x.size(1) / 2;
  at::Tensor both = at::empty({2, M, half}, x.options());
  const T* in = reinterpret_cast<const T*>(x.data_ptr());
  T* even = reinterpret_cast<T*>(both.data_ptr());
  T* odd = even + M * half;
  for (int64_t i = 0; i < M * half; ++i) {
    even[i] = in[2 * i];
    odd[i] = in[2 * i + 1];
  }
  return both;
}

}  // namespace

// --- quantize (loading) ------------------------------------------------------------------------------------------

// The reference's rounding to the nearest code (formats/codebook4bit.py): the position among the 15 sorted
// midpoints (how many are below the value; the 16th entry of `midpoints` is +inf), by a 4-step binary search, then
// `order` maps that position to the code.
AVX512 inline __m512i nearest_codes(__m512 scaled, __m512 midpoints, __m512i order) {
  __m512i position = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step /= 2) {
    const __m512i probe = _mm512_add_epi32(position, _mm512_set1_epi32(step - 1));
    const __mmask16 below = _mm512_cmp_ps_mask(_mm512_permutexvar_ps(probe, midpoints), scaled, _CMP_LT_OQ);
    position = _mm512_mask_add_epi32(position, below, position, _mm512_set1_epi32(step));
  }
  return _mm512_permutexvar_epi32(position, order);
}

// One full block of `block` (a multiple of 32) weights: its absmax, and its codes packed two per byte (the first in
// the high nibble). Returns false, having written nothing, when the block holds a NaN or an infinity.
template <typename In>
AVX512 bool quantize_block_avx512(const In* w, int64_t block, const float* midpoints16, const uint8_t* positions,
                                  uint8_t* packed, float* absmax) {
  const __m512 midpoints = _mm512_loadu_ps(midpoints16);
  const __m512i order = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(positions)));
  __m512 largest = _mm512_setzero_ps();
  __mmask16 not_finite = 0;
  for (int64_t i = 0; i < block; i += 16) {
    const __m512 magnitude = _mm512_abs_ps(load_weights(w + i));
    not_finite |= _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(INFINITY), _CMP_NLT_UQ);  // inf or NaN
    largest = _mm512_max_ps(largest, magnitude);
  }
  if (not_finite) return false;
  const float a = _mm512_reduce_max_ps(largest);
  *absmax = a;
  const __m512 inverse = _mm512_set1_ps(1.0f / std::max(a, 1e-38f));  // as the reference: x * (1 / absmax)
  const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (int64_t i = 0; i < block; i += 32) {
    __m512 first = _mm512_mul_ps(load_weights(w + i), inverse);
    __m512 second = _mm512_mul_ps(load_weights(w + i + 16), inverse);
    first = _mm512_min_ps(_mm512_max_ps(first, minus_one), one);
    second = _mm512_min_ps(_mm512_max_ps(second, minus_one), one);
    const __m512i codes_first = nearest_codes(first, midpoints, order);
    const __m512i codes_second = nearest_codes(second, midpoints, order);
    const __m512i high = _mm512_permutex2var_epi32(codes_first, evens, codes_second);
    const __m512i low = _mm512_permutex2var_epi32(codes_first, odds, codes_second);
    const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_or_si512(_mm512_slli_epi32(high, 4), low));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), bytes);
  }
  return true;
}

// The same for any block, the scalar way; `divide` for the short last block, which the reference divides by its
// (clamped) absmax instead of multiplying by the reciprocal. Elements past `count` (an odd last element's partner) are
// quantized as zeros, as the reference pads them.
template <typename In>
bool quantize_block_scalar(const In* w, int64_t count, bool divide, const float* midpoints, const uint8_t* order,
                           uint8_t* packed, float* absmax) {
  float a = 0.0f;
  for (int64_t i = 0; i < count; ++i) {
    const float magnitude = std::fabs(static_cast<float>(w[i]));
    if (!std::isfinite(magnitude)) return false;
    a = std::max(a, magnitude);
  }
  const float clamped = std::max(a, 1e-38f), inverse = 1.0f / clamped;
  *absmax = divide ? clamped : a;  // the reference keeps the short block's absmax clamped, the full blocks' not
  auto code = [&](int64_t i) -> uint8_t {
    if (i >= count) return code_of(0.0f, midpoints, order);
    const float value = static_cast<float>(w[i]);
    return code_of(std::min(std::max(divide ? value / clamped : value * inverse, -1.0f), 1.0f), midpoints, order);
  };
  for (int64_t i = 0; i < count; i += 2) packed[i / 2] = static_cast<uint8_t>(code(i) << 4 | code(i + 1));
  return true;
}

// y (M, N) float32 = x (M, K) @ dequant(W).T, for x float32 contiguous.
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed,
                     const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                     const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                     int64_t N, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "the codebook must be 16 float32 values");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(block % 32 == 0 && K % block == 0, "gemv_4bit needs K a multiple of the block and the block of 32");
  TORCH_CHECK(packed.numel() * 2 >= N * K, "packed holds fewer than N * K codes");
  const Absmax a = make_absmax(absmax, codes, scales, offset, code8);
  const at::Tensor split = split_even_odd<float>(x);
  const float* e0 = split.data_ptr<float>();
  const float* o0 = e0 + M * (K / 2);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* table = lut.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const bool avx512 = has_avx512(), avx2 = has_avx2();
  for_row_groups(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
    const float* e = e0 + m0 * (K / 2);
    const float* o = o0 + m0 * (K / 2);
    if (avx512) {
      gemv_rows_avx512<decltype(rows)::value>(p, a, table, block, K, e, o, out + m0 * N, N, begin, end);
    } else if (avx2) {
      gemv_rows_avx2<decltype(rows)::value>(p, a, table, block, K, e, o, out + m0 * N, N, begin, end);
    } else {
      gemv_rows_scalar(p, a, table, block, K, e, o, rows, out + m0 * N, N, begin, end);
    }
  });
  return y;
}

// y (M, N) float32 = x (M, K) @ dequant(W).T for bfloat16 x, on CPUs with AVX512-BF16 (see gemv_rows_bf16).
at::Tensor gemv_4bit_bf16(const at::Tensor& x, const at::Tensor& packed,
                          const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                          const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                          int64_t N, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be contiguous bf16");
  TORCH_CHECK(has_avx512_bf16() || has_avx2(), "gemv_4bit_bf16 needs a CPU with AVX512-BF16 or AVX2");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "the codebook must be 16 float32 values");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(block % 64 == 0 && K % block == 0, "gemv_4bit_bf16 needs K a multiple of the block and the block of 64");
  TORCH_CHECK(packed.numel() * 2 >= N * K, "packed holds fewer than N * K codes");
  const Absmax a = make_absmax(absmax, codes, scales, offset, code8);
  uint16_t lut16[32] = {0};
  for (int i = 0; i < 16; ++i) lut16[i] = at::BFloat16(lut.data_ptr<float>()[i]).x;
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  if (!has_avx512_bf16()) {  // AVX2: the codebook's bfloat16 bytes, low and high planes, in both 128-bit halves
    uint8_t planes[64];
    for (int i = 0; i < 32; ++i) {
      planes[i] = static_cast<uint8_t>(lut16[i % 16] & 0xFF);
      planes[32 + i] = static_cast<uint8_t>(lut16[i % 16] >> 8);
    }
    const at::Tensor xp = permute_for_avx2_lookup(x);
    const float* x0 = xp.data_ptr<float>();
    for_row_groups(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
      gemv_rows_bf16_avx2<decltype(rows)::value>(p, a, planes, block, K, x0 + m0 * K, out + m0 * N, N, begin, end);
    });
    return y;
  }
  const at::Tensor split = split_even_odd<uint16_t>(x);
  const auto* e0 = reinterpret_cast<const uint16_t*>(split.data_ptr<at::BFloat16>());
  const uint16_t* o0 = e0 + M * (K / 2);
  for_row_groups(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
    gemv_rows_bf16<decltype(rows)::value>(p, a, lut16, block, K, e0 + m0 * (K / 2), o0 + m0 * (K / 2), out + m0 * N,
                                          N, begin, end);
  });
  return y;
}

// Whether gemv_4bit_q8 takes gemv_rows_q8_vnni (codebook4bit.py's served name states the same condition).
static bool q8_0_vnni_takes(int64_t block, int64_t K) {
  return has_avx512_vnni() && block % (2 * Q8_BLOCK) == 0 && K % (4 * Q8_BLOCK) == 0;
}

// y (M, N) float32 = q8_0(x) (M, K) @ dequant(W with the codebook in int8 steps).T, for x float32 contiguous, on CPUs
// with AVX2 (see gemv_rows_q8_avx2).
at::Tensor gemv_4bit_q8(const at::Tensor& x, const at::Tensor& packed,
                        const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                        const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                        int64_t N, int64_t block) {
  TORCH_CHECK(has_avx2(), "gemv_4bit_q8 needs a CPU with AVX2");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "the codebook must be 16 float32 values");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(block % Q8_BLOCK == 0 && K % block == 0, "gemv_4bit_q8 needs K a multiple of the block and the block of 32");
  TORCH_CHECK(packed.numel() * 2 >= N * K, "packed holds fewer than N * K codes");
  const Absmax a = make_absmax(absmax, codes, scales, offset, code8);
  int8_t table16[16];
  for (int i = 0; i < 16; ++i) table16[i] = static_cast<int8_t>(std::nearbyint(lut.data_ptr<float>()[i] * 127.0f));
  const bool by_span = block % (2 * Q8_BLOCK) == 0;  // 64 columns at a time (q8_span_rows), else 32
  const bool vnni = q8_0_vnni_takes(block, K);  // 128 columns at a time (gemv_rows_q8_vnni)
  const auto [x8, xd, block_sums] = quantize_q8_0(x, 2, vnni ? 4 * Q8_BLOCK : (by_span ? 2 * Q8_BLOCK : Q8_BLOCK));
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  float* out = y.data_ptr<float>();
  for_row_groups(M, N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
    constexpr int MT = decltype(rows)::value;
    const int8_t* x0 = x8.data_ptr<int8_t>() + m0 * K;
    const float* d0 = xd.data_ptr<float>() + m0 * (K / Q8_BLOCK);
    if (vnni) gemv_rows_q8_vnni<MT>(p, a, table16, block, K, x0, d0, out + m0 * N, N, begin, end);
    else if (by_span) gemv_rows_q8_avx2<MT, true>(p, a, table16, block, K, x0, d0, out + m0 * N, N, begin, end);
    else gemv_rows_q8_avx2<MT, false>(p, a, table16, block, K, x0, d0, out + m0 * N, N, begin, end);
  });
  return y;
}

// out (end - begin,) = the flat weight's elements [begin, end), dequantized in out's dtype (float32/bfloat16/half).
void dequantize_4bit(const at::Tensor& packed,
                     const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                     const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                     int64_t block, int64_t begin, int64_t end, at::Tensor& out, bool grouped) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "the codebook must be 16 float32 values");
  TORCH_CHECK(0 <= begin && begin <= end && end <= packed.numel() * 2, "element range outside the packed weight");
  TORCH_CHECK(out.is_contiguous() && out.numel() == end - begin, "out must be contiguous with end - begin elements");
  TORCH_CHECK(!grouped || (begin % 32 == 0 && end % 32 == 0), "grouped order needs a range of whole groups of 32");
  const Absmax a = make_absmax(absmax, codes, scales, offset, code8);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* table = lut.data_ptr<float>();
  const bool vector = has_avx512();
  TORCH_CHECK(!grouped || vector, "grouped order needs the AVX-512 kernels");
  constexpr int64_t grain = 1 << 14;  // elements per task, a multiple of 32 so tasks start on a group
  // One task per `grain` elements; each picks the widest loop this CPU runs for the output dtype.
  auto run = [&](auto* o, auto&& range) {
    at::parallel_for(0, (end - begin + grain - 1) / grain, 1, [&](int64_t first_task, int64_t last_task) {
      for (int64_t task = first_task; task < last_task; ++task) {
        int64_t s = begin + task * grain;
        range(o, s, std::min(end, s + grain));
      }
    });
  };
  switch (out.scalar_type()) {
    case at::kFloat:
      run(out.data_ptr<float>(), [&](float* o, int64_t s, int64_t e) {
        if (grouped) return dequantize_avx512<float, StoreFloat, true>(p, a, table, block, s, e, begin, o);
        if (vector) return dequantize_avx512<float, StoreFloat, false>(p, a, table, block, s, e, begin, o);
        has_avx2() ? dequantize_avx2(p, a, table, block, s, e, begin, o)
                   : dequantize_scalar(p, a, table, block, s, e, begin, o);
      });
      break;
    case at::kHalf:
      run(out.data_ptr<at::Half>(), [&](at::Half* o, int64_t s, int64_t e) {
        if (grouped) return dequantize_avx512<at::Half, StoreHalf, true>(p, a, table, block, s, e, begin, o);
        vector ? dequantize_avx512<at::Half, StoreHalf, false>(p, a, table, block, s, e, begin, o)
               : dequantize_scalar(p, a, table, block, s, e, begin, o);
      });
      break;
    case at::kBFloat16:
      run(out.data_ptr<at::BFloat16>(), [&](at::BFloat16* o, int64_t s, int64_t e) {
        if (has_avx512_bf16()) {
          grouped ? dequantize_avx512_bf16<true>(p, a, table, block, s, e, begin, o)
                  : dequantize_avx512_bf16<false>(p, a, table, block, s, e, begin, o);
        } else if (grouped) {
          dequantize_avx512<at::BFloat16, StoreBFloat16, true>(p, a, table, block, s, e, begin, o);
        } else if (vector) {
          dequantize_avx512<at::BFloat16, StoreBFloat16, false>(p, a, table, block, s, e, begin, o);
        } else {
          dequantize_scalar(p, a, table, block, s, e, begin, o);
        }
      });
      break;
    default:
      TORCH_CHECK(false, "dequantize_4bit writes float32, bfloat16 or float16, not ", out.scalar_type());
  }
}

at::Tensor linear_4bit_chunked(const at::Tensor& x, const at::Tensor& packed,
                               const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                               const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                               int64_t N, int64_t block, bool grouped, int64_t rows_per_chunk) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix");
  const int64_t K = x.size(1);
  return chunked_linear(x, N, rows_per_chunk, [&](int64_t first, int64_t last, at::Tensor& out) {
    at::Tensor flat = out.view({-1});  // inside a parallel region, parallel_for runs on the calling thread
    dequantize_4bit(packed, absmax, codes, scales, offset, code8, lut, block, first * K, last * K, flat, grouped);
  });
}

at::Tensor linear_4bit_tiles(const at::Tensor& x, const at::Tensor& packed,
                             const OptionalTensor& absmax, const OptionalTensor& codes, const OptionalTensor& scales,
                             const OptionalTensor& offset, const OptionalTensor& code8, const at::Tensor& lut,
                             int64_t N, int64_t block) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "the codebook must be 16 float32 values");
  const int64_t K = x.size(1);
  TORCH_CHECK(block % 64 == 0 && K % block == 0 && K % 128 == 0,
              "linear_4bit_tiles needs K a multiple of the block and of 128, the block of 64");
  TORCH_CHECK(packed.numel() * 2 >= N * K, "packed holds fewer than N * K codes");
  const Absmax a = make_absmax(absmax, codes, scales, offset, code8);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* table = lut.data_ptr<float>();
  return tile_linear(
      pack_activations_nibble_order(x), x.size(0), N, std::max<int64_t>(block, 128),
      [&](int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
        write_weights_4bit(p, CodebookTable{table, a}, block, K, n0, rows, k_begin, k_end, out);
      },
      [](int64_t) { return 1.0f; });  // the written weights are scaled already
}

std::tuple<at::Tensor, at::Tensor, bool> quantize_4bit(const at::Tensor& weight, int64_t block,
                                                       const at::Tensor& midpoints, const at::Tensor& order) {
  TORCH_CHECK(weight.is_contiguous(), "the weight must be contiguous");
  TORCH_CHECK(midpoints.scalar_type() == at::kFloat && midpoints.numel() == 15, "15 float32 midpoints expected");
  TORCH_CHECK(order.scalar_type() == at::kByte && order.numel() == 16, "16 uint8 positions expected");
  TORCH_CHECK(block >= 2 && block % 2 == 0, "the block must be even");
  const int64_t n = weight.numel(), blocks = (n + block - 1) / block;
  at::Tensor packed = at::empty({(n + 1) / 2}, weight.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, weight.options().dtype(at::kFloat));
  float mids[16];
  std::copy_n(midpoints.data_ptr<float>(), 15, mids);
  mids[15] = INFINITY;
  const uint8_t* positions = order.data_ptr<uint8_t>();
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* scales = absmax.data_ptr<float>();
  const bool vector = has_avx512() && block % 32 == 0;
  std::atomic<bool> finite{true};
  auto run = [&](const auto* w) {
    at::parallel_for(0, blocks, 64, [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last && finite.load(std::memory_order_relaxed); ++b) {
        const int64_t start = b * block, count = std::min(block, n - start);
        const bool ok = vector && count == block
                            ? quantize_block_avx512(w + start, block, mids, positions, out + start / 2, scales + b)
                            : quantize_block_scalar(w + start, count, count < block, mids, positions, out + start / 2,
                                                    scales + b);
        if (!ok) finite.store(false, std::memory_order_relaxed);
      }
    });
  };
  with_weight_type(weight, "quantize_4bit", run);
  return {packed, absmax, finite.load()};
}

}  // namespace quantizer_plugin
