// Integer affine formats (int4, int3, int2) on the CPU: a fused multiply for few activation rows (decode), the weight
// writers of amx.h's tile loop for larger bfloat16 batches, a dequantize of row ranges as the reference dequantizes
// them, and the per-thread dequantize-then-GEMM for the other batches.
//
// The layout is the checkpoint's own (quantizer_plugin/formats/affine.py): each row of the weight in its own bytes
// (int4/int2: ceil(K * bits / 8), 8 / bits codes per byte, the first in the high bits; int3: runs of 64 codes in 24
// bytes, three bit planes of 8 bytes, bit j of plane p's little-endian 64-bit word being bit p of code j, a short
// last run in three planes of ceil(r / 8) bytes: records.affine_row_bytes); a float16 scale s and zero point z
// per group of `block` consecutive columns of a row (the last group short when K is not a multiple). A code q stands
// for (q - z) * s, which the dequantize computes as the reference does: q - z in float32, then one float32 product
// (no FMA: the build passes -ffp-contract=off), rounded once to the output dtype.
//
// The fused kernels multiply the codes themselves (small integers, exact in bfloat16 and float32) and apply the
// group's affine map to the sum: y = sum over groups g of s_g * (sum of q x over g) - s_g * z_g * (sum of x over g).

#include <ATen/ATen.h>

#include "amx.h"
#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

namespace {

// Columns a fused step reads: 64 codes, 32 bytes of int4, 24 of int3 (one run of bit planes) or 16 of int2.
constexpr int64_t STEP = 64;
constexpr int64_t PLANE_BYTES = STEP / 8;  // int3: one bit plane of a run

// The bytes of a row (records.affine_row_bytes).
inline int64_t row_bytes_of(int64_t K, int64_t bits) {
  if (bits == 3) return K / STEP * 3 * PLANE_BYTES + 3 * ((K % STEP + 7) / 8);
  return (K * bits + 7) / 8;
}

// The activations' columns within each STEP in the order the fused kernels read the codes: the STEP / per_byte
// codes in the high bits of the STEP's bytes first, then the next bits, and so on (a transpose of (bytes, per_byte)).
// int3's planes give the codes in column order.
// Plain loops, as the two functions below: through ATen (reshape, transpose, contiguous; to, sum) they cost tens of
// microseconds a call in dispatcher overhead, a millisecond of a decode step.
template <typename T>
at::Tensor step_order(const at::Tensor& x, int64_t bits) {
  if (bits == 3) return x;  // contiguous (check_fused)
  const int64_t per_byte = 8 / bits, per_plane = STEP / per_byte, columns = x.size(0) * x.size(1);
  at::Tensor ordered = at::empty_like(x);
  const T* in = reinterpret_cast<const T*>(x.data_ptr());
  T* out = reinterpret_cast<T*>(ordered.data_ptr());
  for (int64_t step = 0; step < columns; step += STEP) {
    for (int64_t p = 0; p < per_byte; ++p) {
      for (int64_t b = 0; b < per_plane; ++b) out[step + p * per_plane + b] = in[step + b * per_byte + p];
    }
  }
  return ordered;
}

// The sum of each group's activations, (M, groups) float32: the zero points' share of the product.
template <typename T>
at::Tensor group_sums(const at::Tensor& x, int64_t block) {
  const int64_t groups = x.size(0) * (x.size(1) / block);
  at::Tensor sums = at::empty({x.size(0), x.size(1) / block}, x.options().dtype(at::kFloat));
  const T* in = reinterpret_cast<const T*>(x.data_ptr());
  float* out = sums.data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    float total = 0.0f;
    for (int64_t i = 0; i < block; ++i) total += static_cast<float>(in[g * block + i]);
    out[g] = total;
  }
  return sums;
}

// A float16 broadcast to 16 float32 lanes by the vector conversion (c10's scalar one is a dozen integer steps).
AVX512 inline __m512 broadcast_half(at::Half h) { return _mm512_cvtph_ps(_mm256_set1_epi16(static_cast<short>(h.x))); }

AVX512 inline void halves_to_floats(const at::Half* h, int64_t count, float* out) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i))));
  }
  for (; i < count; ++i) out[i] = static_cast<float>(h[i]);
}

// The sum over groups g of s[g] * z[g] * sums[g]: what a row's zero points take off its output.
AVX512 inline float zero_point_share(const float* s, const float* z, const float* sums, int64_t groups) {
  __m512 acc = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 16 <= groups; g += 16) {
    const __m512 sz = _mm512_mul_ps(_mm512_loadu_ps(s + g), _mm512_loadu_ps(z + g));
    acc = _mm512_fmadd_ps(sz, _mm512_loadu_ps(sums + g), acc);
  }
  float share = _mm512_reduce_add_ps(acc);
  for (; g < groups; ++g) share += s[g] * z[g] * sums[g];
  return share;
}

// One STEP of codes as two vectors of 32 bfloat16 integers (looked up in `table`, the bfloat16 of 0..15), in
// step_order: int4's high nibbles, then its low ones; int2's bits 7-6 and 5-4, then 3-2 and 1-0.
template <int BITS>
AVX512_BF16 inline void codes_bf16(const uint8_t* bytes, __m512i table, __m512bh& first, __m512bh& second) {
  if constexpr (BITS == 3) {  // columns 0-31, then 32-63: each plane's 32 bits as a lane mask adding 1, 2 or 4
    const __m512i one = _mm512_set1_epi16(1), two = _mm512_set1_epi16(2), four = _mm512_set1_epi16(4);
    __m512bh* out[2] = {&first, &second};
    for (int h = 0; h < 2; ++h) {
      const uint8_t* planes = bytes + 4 * h;
      __m512i index = _mm512_maskz_mov_epi16(_load_mask32((__mmask32*)planes), one);
      index = _mm512_mask_add_epi16(index, _load_mask32((__mmask32*)(planes + PLANE_BYTES)), index, two);
      index = _mm512_mask_add_epi16(index, _load_mask32((__mmask32*)(planes + 2 * PLANE_BYTES)), index, four);
      *out[h] = (__m512bh)_mm512_permutexvar_epi16(index, table);
    }
  } else if constexpr (BITS == 4) {
    const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
    first = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), table);
    second = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(words, _mm512_set1_epi16(0xF)), table);
  } else {
    const __m128i sixteen = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    const __m512i words = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(sixteen));  // the 16 bytes, twice
    const __m512i mask = _mm512_set1_epi16(0x3);
    // Shift by 6 in words 0-15 and by 4 in words 16-31, then by 2 and 0.
    const __m512i high = _mm512_mask_blend_epi16(0xFFFF0000, _mm512_set1_epi16(6), _mm512_set1_epi16(4));
    const __m512i low = _mm512_sub_epi16(high, _mm512_set1_epi16(4));
    first = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srlv_epi16(words, high), mask), table);
    second = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srlv_epi16(words, low), mask), table);
  }
}

// The same STEP as four vectors of 16 float32 integers, in step_order.
template <int BITS>
AVX512 inline void codes_f32(const uint8_t* bytes, __m512* out) {
  if constexpr (BITS == 3) {  // columns 16q to 16q + 15 in out[q]: each plane's 16 bits adding 1, 2 or 4
    for (int q = 0; q < 4; ++q) {
      const uint8_t* planes = bytes + 2 * q;
      __m512 code = _mm512_maskz_mov_ps(_load_mask16((__mmask16*)planes), _mm512_set1_ps(1.0f));
      code = _mm512_mask_add_ps(code, _load_mask16((__mmask16*)(planes + PLANE_BYTES)), code, _mm512_set1_ps(2.0f));
      out[q] = _mm512_mask_add_ps(code, _load_mask16((__mmask16*)(planes + 2 * PLANE_BYTES)), code,
                                  _mm512_set1_ps(4.0f));
    }
    return;
  }
  if constexpr (BITS == 4) {
    const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes + 16)));
    const __m512i nibble = _mm512_set1_epi32(0xF);
    out[0] = _mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4));
    out[1] = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    out[2] = _mm512_cvtepi32_ps(_mm512_and_si512(a, nibble));
    out[3] = _mm512_cvtepi32_ps(_mm512_and_si512(b, nibble));
  } else {
    const __m512i a = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
    const __m512i mask = _mm512_set1_epi32(0x3);
    out[0] = _mm512_cvtepi32_ps(_mm512_srli_epi32(a, 6));
    out[1] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(a, 4), mask));
    out[2] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(a, 2), mask));
    out[3] = _mm512_cvtepi32_ps(_mm512_and_si512(a, mask));
  }
}

// What a fused row kernel reads: the codes and the float16 scales and zero points of N rows, K a multiple of the
// block and the block of STEP; the activations `x` (MT rows, K each, in step_order) and their group sums.
struct FusedArgs {
  const uint8_t* packed;
  const at::Half* scale;
  const at::Half* zero;
  int64_t block, K, N;
  const float* sums;  // (M, groups), from the kernel's first activation row
  float* y;           // (M, N), from the kernel's first activation row
};

// y[m][n] for rows n in [n_begin, n_end), bfloat16 activations multiplied by pairs with vdpbf16ps, float32 sums.
// Its loops repeat gemv_rows_f32's on purpose: an inner step shared through a lambda or a template would be compiled
// for a different target than its caller, and GCC would then call it per step, not inline it.
template <int BITS, int MT>
AVX512_BF16 void gemv_rows_bf16(const FusedArgs& a, const uint16_t* x, int64_t n_begin, int64_t n_end) {
  const int64_t row_bytes = a.K * BITS / 8, groups = a.K / a.block;
  alignas(64) uint16_t integers[32] = {0};
  for (int i = 0; i < 16; ++i) integers[i] = at::BFloat16(static_cast<float>(i)).x;
  const __m512i table = _mm512_load_si512(integers);
  std::vector<float> s(groups), z(groups);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = a.packed + n * row_bytes;
    halves_to_floats(a.scale + n * groups, groups, s.data());
    halves_to_floats(a.zero + n * groups, groups, z.data());
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0, k = 0; g < groups; ++g) {
      __m512 part[MT];
      for (int m = 0; m < MT; ++m) part[m] = _mm512_setzero_ps();
      for (const int64_t end = k + a.block; k < end; k += STEP) {
        const uint8_t* bytes = row + k * BITS / 8;
        prefetch_ahead_per_line(bytes, STEP * BITS / 8);
        __m512bh first, second;
        codes_bf16<BITS>(bytes, table, first, second);
        for (int m = 0; m < MT; ++m) {
          part[m] = _mm512_dpbf16_ps(part[m], first, (__m512bh)_mm512_loadu_si512(x + m * a.K + k));
          part[m] = _mm512_dpbf16_ps(part[m], second, (__m512bh)_mm512_loadu_si512(x + m * a.K + k + 32));
        }
      }
      const __m512 scale = _mm512_set1_ps(s[g]);
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(scale, part[m], acc[m]);
    }
    for (int m = 0; m < MT; ++m) {
      a.y[m * a.N + n] = _mm512_reduce_add_ps(acc[m]) - zero_point_share(s.data(), z.data(), a.sums + m * groups, groups);
    }
  }
}

// The same for float32 activations.
template <int BITS, int MT>
AVX512 void gemv_rows_f32(const FusedArgs& a, const float* x, int64_t n_begin, int64_t n_end) {
  const int64_t row_bytes = a.K * BITS / 8, groups = a.K / a.block;
  std::vector<float> s(groups), z(groups);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = a.packed + n * row_bytes;
    halves_to_floats(a.scale + n * groups, groups, s.data());
    halves_to_floats(a.zero + n * groups, groups, z.data());
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0, k = 0; g < groups; ++g) {
      __m512 part[MT];
      for (int m = 0; m < MT; ++m) part[m] = _mm512_setzero_ps();
      for (const int64_t end = k + a.block; k < end; k += STEP) {
        const uint8_t* bytes = row + k * BITS / 8;
        prefetch_ahead_per_line(bytes, STEP * BITS / 8);
        __m512 codes[4];
        codes_f32<BITS>(bytes, codes);
        for (int m = 0; m < MT; ++m) {
          for (int q = 0; q < 4; ++q) part[m] = _mm512_fmadd_ps(codes[q], _mm512_loadu_ps(x + m * a.K + k + 16 * q), part[m]);
        }
      }
      const __m512 scale = _mm512_set1_ps(s[g]);
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(scale, part[m], acc[m]);
    }
    for (int m = 0; m < MT; ++m) {
      a.y[m * a.N + n] = _mm512_reduce_add_ps(acc[m]) - zero_point_share(s.data(), z.data(), a.sums + m * groups, groups);
    }
  }
}

// One STEP of codes as eight vectors of 8 float32 integers, in step_order (vector q multiplies its columns 8q to
// 8q + 7), for CPUs with AVX2 only.
template <int BITS>
AVX2 inline void codes_f32_avx2(const uint8_t* bytes, __m256* out) {
  if constexpr (BITS == 3) {  // columns 8q to 8q + 7 in out[q]: byte q of each plane, lane i shifted down by i
    const __m256i down = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int q = 0; q < 8; ++q) {
      const int32_t planes = bytes[q] | bytes[PLANE_BYTES + q] << 8 | bytes[2 * PLANE_BYTES + q] << 16;
      const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(planes), down);  // plane p's bit i at bit 8 p
      const __m256i code = _mm256_or_si256(
          _mm256_and_si256(v, _mm256_set1_epi32(1)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v, 7), _mm256_set1_epi32(2)),
                          _mm256_and_si256(_mm256_srli_epi32(v, 14), _mm256_set1_epi32(4))));
      out[q] = _mm256_cvtepi32_ps(code);
    }
  } else if constexpr (BITS == 4) {
    const __m256i nibble = _mm256_set1_epi32(0xF);
    for (int i = 0; i < 4; ++i) {
      const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * i)));
      out[i] = _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4));
      out[4 + i] = _mm256_cvtepi32_ps(_mm256_and_si256(a, nibble));
    }
  } else {
    const __m256i mask = _mm256_set1_epi32(0x3);
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * h)));
      for (int j = 0; j < 4; ++j) {
        out[2 * j + h] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(a, 6 - 2 * j), mask));
      }
    }
  }
}

// gemv_rows_f32 for CPUs with AVX2 only: the same sums, 8 lanes wide, in U independent chains per activation row
// while the registers last (one chain waits on each FMA's latency: 8 in a row per step).
template <int BITS, int MT>
AVX2 void gemv_rows_f32_avx2(const FusedArgs& a, const float* x, int64_t n_begin, int64_t n_end) {
  constexpr int U = avx2_chains(MT);
  const int64_t row_bytes = a.K * BITS / 8, groups = a.K / a.block;
  std::vector<float> s(groups), z(groups);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = a.packed + n * row_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      s[g] = static_cast<float>(a.scale[n * groups + g]);
      z[g] = static_cast<float>(a.zero[n * groups + g]);
    }
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0, k = 0; g < groups; ++g) {
      __m256 part[MT][U];
      for (int m = 0; m < MT; ++m)
        for (int u = 0; u < U; ++u) part[m][u] = _mm256_setzero_ps();
      for (const int64_t end = k + a.block; k < end; k += STEP) {
        const uint8_t* bytes = row + k * BITS / 8;
        prefetch_ahead_per_line(bytes, STEP * BITS / 8);
        __m256 codes[8];
        codes_f32_avx2<BITS>(bytes, codes);
        for (int m = 0; m < MT; ++m) {
          for (int q = 0; q < 8; ++q) {
            part[m][q % U] = _mm256_fmadd_ps(codes[q], _mm256_loadu_ps(x + m * a.K + k + 8 * q), part[m][q % U]);
          }
        }
      }
      const __m256 scale = _mm256_set1_ps(s[g]);
      for (int m = 0; m < MT; ++m) {
        __m256 total = part[m][0];
        for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, part[m][u]);
        acc[m] = _mm256_fmadd_ps(scale, total, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      float share = 0.0f;  // what the row's zero points take off its output
      for (int64_t g = 0; g < groups; ++g) share += s[g] * z[g] * a.sums[m * groups + g];
      a.y[m * a.N + n] = horizontal_sum(acc[m]) - share;
    }
  }
}

// One 32 columns of gemv_rows_q8_avx2: their codes (16 bytes of int4, 8 of int2) against each activation row's 32
// bytes, into `part`.
template <int BITS, int MT>
AVX2 inline __attribute__((always_inline)) void q8_step(const uint8_t* bytes, const int8_t* x, const float* d,
                                                         int64_t K, int64_t steps, __m256 (&part)[MT]) {
  __m256i codes;
  if constexpr (BITS == 4) {
    const __m128i pairs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
    codes = _mm256_set_m128i(pairs, _mm_srli_epi16(pairs, 4));
  } else {
    const __m128i quads = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
    codes = _mm256_set_m128i(_mm_unpacklo_epi64(_mm_srli_epi16(quads, 2), quads),
                             _mm_unpacklo_epi64(_mm_srli_epi16(quads, 6), _mm_srli_epi16(quads, 4)));
  }
  codes = _mm256_and_si256(codes, _mm256_set1_epi8(BITS == 4 ? 0x0F : 0x03));
  for (int m = 0; m < MT; ++m) {
    const __m256i xm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K));
    const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xm), _mm256_set1_epi16(1));
    part[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d[m * steps]), part[m]);
  }
}

// The q8_0 decode (activations mode "q8_0", q8_0.cpp): 32 codes at a time as bytes, in the order quantize_q8_0(x,
// 8 / BITS, 32) writes the activations in (int4: a row's 16 bytes' high nibbles, then their low ones; int2: the 8 bytes'
// top bit pairs, then the next, and so on), multiplied as unsigned bytes by the signed activation bytes
// (vpmaddubsw: at most 2 * 15 * 127 per 16-bit sum) and summed exactly into int32 (vpmaddwd); each 32 columns' sum
// times its activation scale, each group's times s, and the zero points' share, s * z times the group's sum of the
// rounded activations (`sums`), taken off at the end. Needs block % 32 == 0.
template <int BITS, int MT>
AVX2 void gemv_rows_q8_avx2(const FusedArgs& a, const int8_t* x8, const float* xd, int64_t n_begin, int64_t n_end) {
  constexpr int64_t step_bytes = Q8_BLOCK * BITS / 8;
  const int64_t groups = a.K / a.block, steps = a.K / Q8_BLOCK, chunks = a.block / Q8_BLOCK;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* bytes = a.packed + n * (a.K * BITS / 8);
    const int8_t* x = x8;
    const float* d = xd;
    __m256 acc[MT];
    float share[MT] = {0.0f};
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256 even[MT], odd[MT];  // two chains of sums, so that each FMA need not wait for the last
      for (int m = 0; m < MT; ++m) even[m] = odd[m] = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 2 <= chunks; c += 2, bytes += 2 * step_bytes, x += 2 * Q8_BLOCK, d += 2) {
        prefetch_ahead_per_line(bytes, 2 * step_bytes);
        q8_step<BITS, MT>(bytes, x, d, a.K, steps, even);
        q8_step<BITS, MT>(bytes + step_bytes, x + Q8_BLOCK, d + 1, a.K, steps, odd);
      }
      if (c < chunks) {  // a group of 32
        q8_step<BITS, MT>(bytes, x, d, a.K, steps, even);
        bytes += step_bytes, x += Q8_BLOCK, d += 1;
      }
      const float s = static_cast<float>(a.scale[n * groups + g]), z = static_cast<float>(a.zero[n * groups + g]);
      const __m256 scale = _mm256_set1_ps(s);
      for (int m = 0; m < MT; ++m) {
        acc[m] = _mm256_fmadd_ps(scale, _mm256_add_ps(even[m], odd[m]), acc[m]);
        share[m] += s * z * a.sums[m * groups + g];
      }
    }
    for (int m = 0; m < MT; ++m) a.y[m * a.N + n] = horizontal_sum(acc[m]) - share[m];
  }
}

// The same decode a row's 32 bytes at a time (64 int4 columns, 128 int2), R rows at once, for groups of 64 or more:
// code plane p of the bytes (their high nibbles, then their low ones; int2: bits 7-6, 5-4, 3-2, 1-0) against the
// activations written in that order per span (quantize_q8_0(x, 8 / BITS, 32 * 8 / BITS)). Each int32 lane sums
// columns of one activation block and one group, so that a vector of the span's activation scales and one of its
// group scales (an int2 span of 128 covers two groups of 64) scale all lanes at once: one conversion and one FMA per
// span and row, where the 32-at-a-time loop spends them per 32 columns. The zero points' share, 8 groups at a time.
template <int BITS, int MT, int R>
AVX2_F16C inline __attribute__((always_inline)) void q8_span_rows(
    const FusedArgs& a, const int8_t* x8, const float* xd, int64_t n0) {
  constexpr int PLANES = 8 / BITS;
  constexpr int64_t SPAN = 32 * PLANES, BLOCKS = SPAN / Q8_BLOCK;  // columns of a span, activation blocks in it
  const int64_t groups = a.K / a.block, steps = a.K / Q8_BLOCK, row_bytes = a.K * BITS / 8;
  const __m256i mask = _mm256_set1_epi8((1 << BITS) - 1), ones = _mm256_set1_epi16(1);
  // lane l (bytes 4l to 4l + 3) holds columns [4l, 4l + 4) * PLANES of the span: activation block l * PLANES / 8
  const __m256i block_of_lane = BITS == 4 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
                                          : _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const bool two_groups = a.block < SPAN;  // int2 with groups of 64: lanes 0-3 one group, lanes 4-7 the next
  const uint16_t* scale_bits = reinterpret_cast<const uint16_t*>(a.scale);
  const uint8_t* bytes[R];
  for (int r = 0; r < R; ++r) bytes[r] = a.packed + (n0 + r) * row_bytes;
  __m256 acc[MT][R];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t s = 0; s < a.K / SPAN; ++s) {
    const int64_t g = s * SPAN / a.block;
    __m256i codes[R][PLANES];
    __m256 group_scale[R];
    for (int r = 0; r < R; ++r) {
      if (s % 2 == 0) prefetch_ahead(bytes[r]);
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes[r]));
      bytes[r] += 32;
      for (int p = 0; p < PLANES; ++p)
        codes[r][p] = _mm256_and_si256(_mm256_srli_epi16(raw, 8 - BITS * (p + 1)), mask);
      const uint16_t* row_scales = scale_bits + (n0 + r) * groups + g;
      group_scale[r] = two_groups ? _mm256_setr_m128(_mm_set1_ps(_cvtsh_ss(row_scales[0])),
                                                     _mm_set1_ps(_cvtsh_ss(row_scales[1])))
                                  : _mm256_set1_ps(_cvtsh_ss(row_scales[0]));
    }
    for (int m = 0; m < MT; ++m) {
      const int8_t* x = x8 + m * a.K + s * SPAN;
      __m256i xp[PLANES];
      for (int p = 0; p < PLANES; ++p) xp[p] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * p));
      const float* d = xd + m * steps + s * BLOCKS;  // the span's BLOCKS scales, read no further (2 for int4)
      const __m128 span_scales = BLOCKS == 4 ? _mm_loadu_ps(d)
                                             : _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(d)));
      const __m256 scales = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(span_scales), block_of_lane);
      for (int r = 0; r < R; ++r) {
        __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(codes[r][0], xp[0]), ones);
        for (int p = 1; p < PLANES; ++p)
          sums = _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(codes[r][p], xp[p]), ones));
        acc[m][r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(sums), scales), group_scale[r], acc[m][r]);
      }
    }
  }
  const uint16_t* zero_bits = reinterpret_cast<const uint16_t*>(a.zero);
  for (int r = 0; r < R; ++r) {
    const uint16_t* s = scale_bits + (n0 + r) * groups;
    const uint16_t* z = zero_bits + (n0 + r) * groups;
    for (int m = 0; m < MT; ++m) {
      const float* sums = a.sums + m * groups;
      __m256 share8 = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= groups; g += 8) {
        const __m256 sz = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g))),
                                        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z + g))));
        share8 = _mm256_fmadd_ps(sz, _mm256_loadu_ps(sums + g), share8);
      }
      float share = horizontal_sum(share8);
      for (; g < groups; ++g) share += _cvtsh_ss(s[g]) * _cvtsh_ss(z[g]) * sums[g];
      a.y[m * a.N + n0 + r] = horizontal_sum(acc[m][r]) - share;
    }
  }
}

template <int BITS, int MT>
AVX2_F16C void gemv_rows_q8_span_avx2(const FusedArgs& a, const int8_t* x8, const float* xd, int64_t n_begin,
                                      int64_t n_end) {
  constexpr int R = q8_weight_rows(MT);
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) q8_span_rows<BITS, MT, R>(a, x8, xd, n);
  for (; n < n_end; ++n) q8_span_rows<BITS, MT, 1>(a, x8, xd, n);
}

// The q8_0 decode on CPUs with AVX512-VNNI: a row's 64 bytes per step (128 int4 columns, 256 int2), code plane p as
// q8_span_rows takes it, against the activations written in that order per span (quantize_q8_0(x, 8 / BITS,
// 64 * 8 / BITS)). The codes are unsigned bytes already, as vpdpbusd multiplies them: four products per int32 lane,
// one instruction per 64 codes where the AVX2 loop spends three per 32. Lane l holds columns [4l, 4l + 4) * PLANES
// of the span: activation block l * PLANES / 8, and group l * 4 * PLANES / block of the span's (at most 4; the caller
// checks, q8_0_vnni_takes_affine). The zero points' share is taken off as the fused kernels take it (zero_point_share).
template <int BITS, int MT>
AVX512_VNNI void gemv_rows_q8_vnni(const FusedArgs& a, const int8_t* x8, const float* xd, int64_t n_begin,
                                   int64_t n_end) {
  constexpr int PLANES = 8 / BITS;
  constexpr int64_t SPAN = 64 * PLANES, BLOCKS = SPAN / Q8_BLOCK;  // columns of a span, activation blocks in it
  const int64_t groups = a.K / a.block, steps = a.K / Q8_BLOCK, spans = a.K / SPAN, row_bytes = a.K * BITS / 8;
  const int64_t span_groups = std::max<int64_t>(1, SPAN / a.block);
  const __mmask16 group_mask = static_cast<__mmask16>((1 << span_groups) - 1);
  const __m512i mask = _mm512_set1_epi8((1 << BITS) - 1);
  int32_t group_of[16];
  for (int l = 0; l < 16; ++l) group_of[l] = static_cast<int32_t>(span_groups == 1 ? 0 : l * 4 * PLANES / a.block);
  const __m512i group_of_lane = _mm512_loadu_si512(group_of);
  const std::vector<float> lane_scale = q8_lane_scales(xd, MT, steps, spans, BLOCKS, 1.0f);
  std::vector<float> s(groups), z(groups);  // the row's scales and zero points in float32
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* bytes = a.packed + n * row_bytes;
    halves_to_floats(a.scale + n * groups, groups, s.data());
    halves_to_floats(a.zero + n * groups, groups, z.data());
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t sp = 0; sp < spans; ++sp, bytes += 64) {
      prefetch_ahead(bytes);
      const __m512i raw = _mm512_loadu_si512(bytes);
      __m512i codes[PLANES];
      for (int p = 0; p < PLANES; ++p) codes[p] = _mm512_and_si512(_mm512_srli_epi16(raw, 8 - BITS * (p + 1)), mask);
      const __m512 span_scales = _mm512_maskz_loadu_ps(group_mask, s.data() + sp * SPAN / a.block);
      const __m512 group_scale = _mm512_permutexvar_ps(group_of_lane, span_scales);
      for (int m = 0; m < MT; ++m) {
        const int8_t* x = x8 + m * a.K + sp * SPAN;
        __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[0], _mm512_loadu_si512(x));
        for (int p = 1; p < PLANES; ++p) sums = _mm512_dpbusd_epi32(sums, codes[p], _mm512_loadu_si512(x + 64 * p));
        const __m512 lane = _mm512_loadu_ps(lane_scale.data() + (m * spans + sp) * 16);
        acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), lane), group_scale, acc[m]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      a.y[m * a.N + n] = _mm512_reduce_add_ps(acc[m]) - zero_point_share(s.data(), z.data(), a.sums + m * groups, groups);
    }
  }
}

// --- dequantize rows ----------------------------------------------------------------------------------------------

struct Rows {
  const uint8_t* packed;
  const at::Half* scale;
  const at::Half* zero;
  int64_t bits, block, K, row_bytes, groups;
};

// int3's code of column k of a row (records.affine_row_bytes): bit p from plane p of its run.
inline int64_t plane_code(const uint8_t* row, int64_t K, int64_t k) {
  const int64_t run = k / STEP, j = k % STEP;
  const int64_t plane = run < K / STEP ? PLANE_BYTES : (K % STEP + 7) / 8;  // a short last run's planes are shorter
  const uint8_t* bytes = row + run * 3 * PLANE_BYTES + j / 8;
  return (bytes[0] >> (j % 8) & 1) | (bytes[plane] >> (j % 8) & 1) << 1 | (bytes[2 * plane] >> (j % 8) & 1) << 2;
}

template <typename Out>
void dequantize_rows_scalar(const Rows& r, int64_t n, int64_t k_begin, Out* out) {
  const int64_t per_byte = 8 / r.bits, mask = (1 << r.bits) - 1;
  const uint8_t* row = r.packed + n * r.row_bytes;
  for (int64_t k = k_begin; k < r.K; ++k) {
    const int64_t q = r.bits == 3 ? plane_code(row, r.K, k) : row[k / per_byte] >> (8 - r.bits * (k % per_byte + 1)) & mask;
    const float s = static_cast<float>(r.scale[n * r.groups + k / r.block]);
    const float z = static_cast<float>(r.zero[n * r.groups + k / r.block]);
    store_scalar(out, k, (static_cast<float>(q) - z) * s);
  }
}

// For codes16: the 32-bit word of its 2 * BITS bytes that lane e's code is in, and the shift that brings the code
// down (words are little-endian; the first code of a byte is in its high bits).
template <int BITS>
struct Lanes {
  alignas(64) int32_t word[16];
  alignas(64) int32_t shift[16];
};
template <int BITS>
constexpr Lanes<BITS> make_lanes() {
  constexpr int per_byte = 8 / BITS;
  Lanes<BITS> lanes{};
  for (int e = 0; e < 16; ++e) {
    lanes.word[e] = e / per_byte / 4;
    lanes.shift[e] = 8 * (e / per_byte % 4) + 8 - BITS * (e % per_byte + 1);
  }
  return lanes;
}
template <int BITS>
inline constexpr Lanes<BITS> LANES = make_lanes<BITS>();

// Sixteen consecutive codes, 2 * BITS bytes from `bytes`, as float32.
template <int BITS>
AVX512 inline __m512 codes16(const uint8_t* bytes) {
  __m128i raw;
  if constexpr (BITS == 4) {
    raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  } else {
    int32_t word;
    std::memcpy(&word, bytes, 4);
    raw = _mm_cvtsi32_si128(word);
  }
  const __m512i words = _mm512_permutexvar_epi32(_mm512_load_si512(LANES<BITS>.word), _mm512_castsi128_si512(raw));
  const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(words, _mm512_load_si512(LANES<BITS>.shift)),
                                         _mm512_set1_epi32((1 << BITS) - 1));
  return _mm512_cvtepi32_ps(codes);
}

// Row n's columns [0, K) into out, 32 at a time, then the scalar loop for the last K % 32. The block is 16 or more,
// so each 16 of the 32 share one group.
template <int BITS, typename Out, typename Store>
AVX512 void dequantize_row_avx512(const Rows& r, int64_t n, Out* out) {
  const uint8_t* row = r.packed + n * r.row_bytes;
  const at::Half* scale = r.scale + n * r.groups;
  const at::Half* zero = r.zero + n * r.groups;
  int64_t k = 0;
  if constexpr (BITS == 3) {  // whole runs of 64: codes_f32's four vectors, 16 columns of one group each
    for (; k + STEP <= r.K; k += STEP) {
      __m512 codes[4];
      codes_f32<3>(row + k / STEP * 3 * PLANE_BYTES, codes);
      for (int h = 0; h < 2; ++h) {
        const int64_t g0 = (k + 32 * h) / r.block, g1 = (k + 32 * h + 16) / r.block;
        Store::store(out + k + 32 * h,
                     _mm512_mul_ps(_mm512_sub_ps(codes[2 * h], broadcast_half(zero[g0])), broadcast_half(scale[g0])),
                     _mm512_mul_ps(_mm512_sub_ps(codes[2 * h + 1], broadcast_half(zero[g1])), broadcast_half(scale[g1])));
      }
    }
    return dequantize_rows_scalar(r, n, k, out);
  }
  for (; k + 32 <= r.K; k += 32) {
    const int64_t g0 = k / r.block, g1 = (k + 16) / r.block;
    const __m512 first = _mm512_mul_ps(_mm512_sub_ps(codes16<BITS>(row + k * BITS / 8), broadcast_half(zero[g0])),
                                       broadcast_half(scale[g0]));
    const __m512 second = _mm512_mul_ps(
        _mm512_sub_ps(codes16<BITS>(row + (k + 16) * BITS / 8), broadcast_half(zero[g1])), broadcast_half(scale[g1]));
    Store::store(out + k, first, second);
  }
  dequantize_rows_scalar(r, n, k, out);
}

// Row n as float32, 8 codes (BITS bytes) at a time, for CPUs with AVX2 only (the chunks of a float32 compute
// dtype): (q - z) * s with the reference's two roundings. The codes of 8 columns from a 32-bit word of
// their bytes: each lane takes its byte and shifts its code down (the first code of a byte is in its high bits).
template <int BITS>
AVX2 void dequantize_row_avx2(const Rows& r, int64_t n, float* out) {
  constexpr int per_byte = 8 / BITS;
  const __m256i byte_of_lane = per_byte == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                                             : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
  const __m256i shifts = per_byte == 2 ? _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)
                                       : _mm256_setr_epi32(6, 4, 2, 0, 6, 4, 2, 0);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  const uint8_t* row = r.packed + n * r.row_bytes;
  const int64_t group_mask = r.block - 1;  // the block is a power of two of 16 or more
  const int block_shift = __builtin_ctzll(r.block);
  __m256 s = _mm256_setzero_ps(), z = s;
  int64_t k = 0;
  for (; k + 8 <= r.K; k += 8) {
    if ((k & group_mask) == 0) {  // a new group (8 columns never straddle one)
      const int64_t g = n * r.groups + (k >> block_shift);
      s = _mm256_set1_ps(static_cast<float>(r.scale[g]));
      z = _mm256_set1_ps(static_cast<float>(r.zero[g]));
    }
    int32_t word = 0;
    std::memcpy(&word, row + k / per_byte, BITS);  // the 8 codes' bytes
    const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi32_si128(word)), byte_of_lane);
    const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(bytes, shifts), mask));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(_mm256_sub_ps(q, z), s));
  }
  dequantize_rows_scalar(r, n, k, out);
}

template <typename Out, typename Store>
void dequantize_range(const Rows& r, int64_t first, int64_t last, Out* out) {
  const bool vector = has_avx512();
  for (int64_t n = first; n < last; ++n) {
    Out* o = out + (n - first) * r.K;
    if (!vector) {
      if constexpr (std::is_same_v<Out, float>) {
        if (has_avx2() && r.bits != 3) {  // int3 without AVX-512: the plain loop (the fused kernel serves decode)
          r.bits == 4 ? dequantize_row_avx2<4>(r, n, o) : dequantize_row_avx2<2>(r, n, o);
          continue;
        }
      }
      dequantize_rows_scalar(r, n, 0, o);
    } else if (r.bits == 4) {
      dequantize_row_avx512<4, Out, Store>(r, n, o);
    } else if (r.bits == 3) {
      dequantize_row_avx512<3, Out, Store>(r, n, o);
    } else {
      dequantize_row_avx512<2, Out, Store>(r, n, o);
    }
  }
}

// --- the AMX tiles for larger bfloat16 batches --------------------------------------------------------------------

// Group g's values (i - z) * s for the codes i = 0..15 (float32, as the reference computes them), for the writers.
// The writers read each row's groups a chunk at a time, which the hardware prefetcher does not follow: each call
// asks for the same group `ahead` groups on (the rows the writer takes next) to be brought into L2.
struct AffineTable {
  const at::Half* scale;
  const at::Half* zero;
  int64_t ahead;
  AVX512 inline __m512 operator()(int64_t g) const {
    _mm_prefetch(reinterpret_cast<const char*>(scale + g + ahead), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(zero + g + ahead), _MM_HINT_T1);
    const __m512 codes = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_mul_ps(_mm512_sub_ps(codes, broadcast_half(zero[g])), broadcast_half(scale[g]));
  }
};

// int2's counterpart of amx.h's write_weights_4bit: rows [n0, n0 + rows), columns [k_begin, k_end) in bfloat16 at
// tile_offset, bit for bit the reference's. Each 128 columns are 32 bytes, byte i widened to word i; lookup j (the
// bits 6 - 2j of every byte) writes tile columns [32j, 32j + 32) as elements 4i + j. Bytes 16-31 hold the second 64
// columns, whose index gets bit 4 set to read the second half of the table, their group's values. The activations
// are packed in that order (pack_activations_2bit_order). Needs K % 128 == 0, block % 64 == 0, the range on 128s.
AMX_BF16 void write_weights_2bit(const uint8_t* packed, const AffineTable& table, int64_t block, int64_t K,
                                 int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* a) {
  const __m512i two_bits = _mm512_set1_epi16(0x3);
  const __m512i second_table = _mm512_maskz_set1_epi16(0xFFFF0000, 16);
  constexpr int bits_or_table = 0xEA;  // vpternlog: (words & two_bits) | second_table
  const int block_shift = __builtin_ctzll(block);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = packed + (n0 + r) * (K / 4) + k_begin / 4;
    uint16_t* out = a + tile_offset(r, 0);
    const int64_t row_start = (n0 + r) * K;
    for (int64_t e = row_start + k_begin; e < row_start + k_end; e += 128, bytes += 32, out += 4 * TILE_ELEMENTS) {
      _mm_prefetch(reinterpret_cast<const char*>(bytes + TILE_PREFETCH_ROWS * (K / 4)), _MM_HINT_T1);
      const __m512i values = (__m512i)_mm512_cvtne2ps_pbh(table((e + 64) >> block_shift), table(e >> block_shift));
      const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
      for (int j = 0; j < 4; ++j) {
        const __m512i shifted = _mm512_srli_epi16(words, 6 - 2 * j);
        const __m512i index = _mm512_ternarylogic_epi32(shifted, two_bits, second_table, bits_or_table);
        _mm512_storeu_si512(out + j * TILE_ELEMENTS, _mm512_permutexvar_epi16(index, values));
      }
    }
  }
}

// int3's counterpart: each 128 columns are two runs of bit planes (48 bytes) and come out in column order: tile j
// (columns 32j to 32j + 31) from bits 32 (j % 2) on of run j / 2's planes, as lane masks adding 1, 2 and 4 to the
// index, which gets bit 4 set in the second run to read its group's half of the table. The activations are packed
// in column order (pack_activations). Needs K % 128 == 0, block % 64 == 0, the range on 128s.
AMX_BF16 void write_weights_3bit(const uint8_t* packed, const AffineTable& table, int64_t block, int64_t K,
                                 int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* a) {
  const __m512i one = _mm512_set1_epi16(1), two = _mm512_set1_epi16(2), four = _mm512_set1_epi16(4);
  const __m512i second_table = _mm512_set1_epi16(16);
  const int64_t row_bytes = K / STEP * 3 * PLANE_BYTES;
  const int block_shift = __builtin_ctzll(block);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = packed + (n0 + r) * row_bytes + k_begin / STEP * 3 * PLANE_BYTES;
    uint16_t* out = a + tile_offset(r, 0);
    const int64_t row_start = (n0 + r) * K;
    for (int64_t e = row_start + k_begin; e < row_start + k_end; e += 128, bytes += 6 * PLANE_BYTES, out += 4 * TILE_ELEMENTS) {
      _mm_prefetch(reinterpret_cast<const char*>(bytes + TILE_PREFETCH_ROWS * row_bytes), _MM_HINT_T1);
      const __m512i values = (__m512i)_mm512_cvtne2ps_pbh(table((e + 64) >> block_shift), table(e >> block_shift));
      for (int j = 0; j < 4; ++j) {
        const uint8_t* planes = bytes + (j / 2) * 3 * PLANE_BYTES + 4 * (j % 2);
        __m512i index = _mm512_maskz_mov_epi16(_load_mask32((__mmask32*)planes), one);
        index = _mm512_mask_add_epi16(index, _load_mask32((__mmask32*)(planes + PLANE_BYTES)), index, two);
        index = _mm512_mask_add_epi16(index, _load_mask32((__mmask32*)(planes + 2 * PLANE_BYTES)), index, four);
        if (j >= 2) index = _mm512_or_si512(index, second_table);
        _mm512_storeu_si512(out + j * TILE_ELEMENTS, _mm512_permutexvar_epi16(index, values));
      }
    }
  }
}

// pack_activations for write_weights_2bit's column order: column 128G + 32j + i of the tiles is x's 128G + 4i + j.
at::Tensor pack_activations_2bit_order(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 128 == 0, "the 2-bit AMX kernel needs K a multiple of 128");
  const int64_t M = x.size(0), K = x.size(1);
  return pack_activations(x.reshape({M, K / 128, 32, 4}).transpose(2, 3).reshape({M, K}));
}

Rows check_rows(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                int64_t block, int64_t K) {
  TORCH_CHECK(bits == 4 || bits == 3 || bits == 2, "the affine kernels take 4, 3 or 2 bits, not ", bits);
  TORCH_CHECK(block >= 16 && (block & (block - 1)) == 0, "the block must be a power of two of 16 or more, not ", block);
  const int64_t row_bytes = row_bytes_of(K, bits), groups = (K + block - 1) / block;
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
                  packed.size(1) == row_bytes,
              "packed must be contiguous uint8 (N, ", row_bytes, ") for K = ", K);
  const int64_t N = packed.size(0);
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 && t->size(0) == N &&
                    t->size(1) == groups,
                "scale and zero must be contiguous float16 (", N, ", ", groups, ")");
  }
  return {packed.data_ptr<uint8_t>(), scale.data_ptr<at::Half>(), zero.data_ptr<at::Half>(), bits, block, K,
          row_bytes, groups};
}

FusedArgs check_fused(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                      int64_t bits, int64_t block) {
  const int64_t K = x.size(1);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix");
  TORCH_CHECK(has_avx2(), "the fused affine kernels need AVX2");
  TORCH_CHECK(block % STEP == 0 && K % block == 0, "the fused affine kernels need K a multiple of the block and the "
              "block of ", STEP, ", not K = ", K, ", block = ", block);
  const Rows r = check_rows(packed, scale, zero, bits, block, K);
  return {r.packed, r.scale, r.zero, block, K, packed.size(0), nullptr, nullptr};
}

}  // namespace

at::Tensor gemv_affine_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                            const at::Tensor& zero, int64_t bits, int64_t block) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bfloat16");
  TORCH_CHECK(has_avx512_bf16(), "gemv_affine_bf16 needs a CPU with AVX512-BF16");
  FusedArgs a = check_fused(x, packed, scale, zero, bits, block);
  const at::Tensor xs = step_order<at::BFloat16>(x, bits), sums = group_sums<at::BFloat16>(x, block);
  at::Tensor y = at::empty({x.size(0), a.N}, x.options().dtype(at::kFloat));
  const auto* x0 = reinterpret_cast<const uint16_t*>(xs.data_ptr<at::BFloat16>());
  for_row_groups(x.size(0), a.N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
    FusedArgs part = a;
    part.sums = sums.data_ptr<float>() + m0 * sums.size(1);
    part.y = y.data_ptr<float>() + m0 * a.N;
    constexpr int MT = decltype(rows)::value;
    if (bits == 4) gemv_rows_bf16<4, MT>(part, x0 + m0 * a.K, begin, end);
    else if (bits == 3) gemv_rows_bf16<3, MT>(part, x0 + m0 * a.K, begin, end);
    else gemv_rows_bf16<2, MT>(part, x0 + m0 * a.K, begin, end);
  });
  return y;
}

at::Tensor gemv_affine(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                       int64_t bits, int64_t block) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32");
  FusedArgs a = check_fused(x, packed, scale, zero, bits, block);
  const at::Tensor xs = step_order<float>(x, bits), sums = group_sums<float>(x, block);
  at::Tensor y = at::empty({x.size(0), a.N}, x.options());
  const float* x0 = xs.data_ptr<float>();
  const bool avx512 = has_avx512();
  for_row_groups(x.size(0), a.N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
    FusedArgs part = a;
    part.sums = sums.data_ptr<float>() + m0 * sums.size(1);
    part.y = y.data_ptr<float>() + m0 * a.N;
    constexpr int MT = decltype(rows)::value;
    if (avx512) {
      if (bits == 4) gemv_rows_f32<4, MT>(part, x0 + m0 * a.K, begin, end);
      else if (bits == 3) gemv_rows_f32<3, MT>(part, x0 + m0 * a.K, begin, end);
      else gemv_rows_f32<2, MT>(part, x0 + m0 * a.K, begin, end);
    } else {
      if (bits == 4) gemv_rows_f32_avx2<4, MT>(part, x0 + m0 * a.K, begin, end);
      else if (bits == 3) gemv_rows_f32_avx2<3, MT>(part, x0 + m0 * a.K, begin, end);
      else gemv_rows_f32_avx2<2, MT>(part, x0 + m0 * a.K, begin, end);
    }
  });
  return y;
}

// Whether gemv_affine_q8 takes gemv_rows_q8_vnni (affine.py's served name states the same condition).
static bool q8_0_vnni_takes_affine(int64_t bits, int64_t block, int64_t K) {
  const int64_t span = 64 * (8 / bits);  // gemv_rows_q8_vnni's columns per step: whole groups, or at most 4 of them
  return has_avx512_vnni() && K % span == 0 && (block % span == 0 || (span % block == 0 && span / block <= 4));
}

// y (M, N) float32 = q8_0(x) (M, K) @ dequant(W).T for x float32, on CPUs with AVX2 (see gemv_rows_q8_avx2).
at::Tensor gemv_affine_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                          const at::Tensor& zero, int64_t bits, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(has_avx2(), "gemv_affine_q8 needs a CPU with AVX2");
  TORCH_CHECK(bits == 4 || bits == 2, "gemv_affine_q8 takes int4 and int2 (int3 has no q8_0 mode), not ", bits, " bits");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(block % Q8_BLOCK == 0 && K % block == 0, "gemv_affine_q8 needs K a multiple of the block and the block "
              "of ", Q8_BLOCK, ", not K = ", K, ", block = ", block);
  const Rows r = check_rows(packed, scale, zero, bits, block, K);
  // a row's 64 bytes at a time with AVX512-VNNI (gemv_rows_q8_vnni); else 32 (q8_span_rows) where a span of them lies
  // within one group, or two of 64; else 32 columns
  const bool vnni = q8_0_vnni_takes_affine(bits, block, K);
  const int64_t span = 32 * (8 / bits);
  const bool by_span = K % span == 0 && (block % span == 0 || (bits == 2 && block == 64));
  const auto [x8, xd, block_sums] = quantize_q8_0(x, 8 / bits, vnni ? 2 * span : (by_span ? span : Q8_BLOCK));
  // each group's sum of the rounded activations, from its blocks'
  const int64_t groups = K / block, blocks_per_group = block / Q8_BLOCK;
  at::Tensor sums = at::zeros({M, groups}, x.options());
  const float* from = block_sums.data_ptr<float>();
  float* to = sums.data_ptr<float>();
  for (int64_t i = 0; i < M * groups * blocks_per_group; ++i) to[i / blocks_per_group] += from[i];
  at::Tensor y = at::empty({M, packed.size(0)}, x.options());
  const FusedArgs a{r.packed, r.scale, r.zero, block, K, packed.size(0), nullptr, nullptr};
  for_row_groups(M, a.N, [&](int64_t begin, int64_t end, int64_t m0, auto rows) {
    FusedArgs part = a;
    part.sums = sums.data_ptr<float>() + m0 * sums.size(1);
    part.y = y.data_ptr<float>() + m0 * a.N;
    constexpr int MT = decltype(rows)::value;
    const int8_t* x0 = x8.data_ptr<int8_t>() + m0 * K;
    const float* d0 = xd.data_ptr<float>() + m0 * (K / Q8_BLOCK);
    if (vnni) {
      bits == 4 ? gemv_rows_q8_vnni<4, MT>(part, x0, d0, begin, end)
                : gemv_rows_q8_vnni<2, MT>(part, x0, d0, begin, end);
    } else if (by_span) {
      bits == 4 ? gemv_rows_q8_span_avx2<4, MT>(part, x0, d0, begin, end)
                : gemv_rows_q8_span_avx2<2, MT>(part, x0, d0, begin, end);
    } else {
      bits == 4 ? gemv_rows_q8_avx2<4, MT>(part, x0, d0, begin, end)
                : gemv_rows_q8_avx2<2, MT>(part, x0, d0, begin, end);
    }
  });
  return y;
}

at::Tensor linear_affine_tiles(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               const at::Tensor& zero, int64_t bits, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be a bfloat16 matrix");
  const int64_t K = x.size(1);
  TORCH_CHECK(block % 64 == 0 && K % block == 0 && K % 128 == 0,
              "linear_affine_tiles needs K a multiple of the block and of 128, the block of 64, not K = ", K,
              ", block = ", block);
  const Rows r = check_rows(packed, scale, zero, bits, block, K);
  const AffineTable table{r.scale, r.zero, TILE_PREFETCH_ROWS * r.groups};
  const auto no_scale = [](int64_t) { return 1.0f; };  // the written weights are scaled already
  if (bits == 4) {
    return tile_linear(pack_activations_nibble_order(x), x.size(0), packed.size(0), 128,
                       [&](int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
                         write_weights_4bit(r.packed, table, block, K, n0, rows, k_begin, k_end, out);
                       }, no_scale);
  }
  if (bits == 3) {
    return tile_linear(pack_activations(x), x.size(0), packed.size(0), 128,
                       [&](int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
                         write_weights_3bit(r.packed, table, block, K, n0, rows, k_begin, k_end, out);
                       }, no_scale);
  }
  return tile_linear(pack_activations_2bit_order(x), x.size(0), packed.size(0), 128,
                     [&](int64_t n0, int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* out) {
                       write_weights_2bit(r.packed, table, block, K, n0, rows, k_begin, k_end, out);
                     }, no_scale);
}

void dequantize_affine(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                       int64_t block, int64_t first, int64_t last, at::Tensor& out) {
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == last - first,
              "out must be a contiguous (last - first, K) matrix");
  const Rows r = check_rows(packed, scale, zero, bits, block, out.size(1));
  TORCH_CHECK(0 <= first && first <= last && last <= packed.size(0), "row range outside the weight");
  auto run = [&](auto* o, auto store) {
    using Out = std::remove_pointer_t<decltype(o)>;
    at::parallel_for(first, last, 16, [&](int64_t begin, int64_t end) {
      dequantize_range<Out, decltype(store)>(r, begin, end, o + (begin - first) * r.K);
    });
  };
  switch (out.scalar_type()) {
    case at::kFloat: return run(out.data_ptr<float>(), StoreFloat{});
    case at::kHalf: return run(out.data_ptr<at::Half>(), StoreHalf{});
    case at::kBFloat16: return run(out.data_ptr<at::BFloat16>(), StoreBFloat16{});
    default: TORCH_CHECK(false, "dequantize_affine writes float32, bfloat16 or float16, not ", out.scalar_type());
  }
}

at::Tensor linear_affine_chunked(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                                 const at::Tensor& zero, int64_t bits, int64_t block, int64_t rows_per_chunk) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix");
  return chunked_linear(x, packed.size(0), rows_per_chunk, [&](int64_t first, int64_t last, at::Tensor& out) {
    dequantize_affine(packed, scale, zero, bits, block, first, last, out);  // runs on this thread (nested parallel_for)
  });
}

}  // namespace quantizer_plugin
