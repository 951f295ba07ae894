// NF4/FP4 on the CPU: a fused dequantize-and-multiply for few activation rows (decode), and a dequantize of any
// range of the flat weight (for the dequantize-then-GEMM path of larger batches).
//
// The weight layout is the checkpoint's own (quantizer_plugin/formats/codebook4bit.py): the weight flattened
// row-major, two 4-bit codes per byte (the first element in the high nibble), one absmax per `block` consecutive
// elements, optionally double-quantized (8-bit dynamic codes, one float32 scale per 256 blocks, one offset).
//
// SIMD is chosen at run time: AVX-512 (F, BW, VL, DQ) functions are compiled with target attributes, next to plain
// C++ ones, and picked by __builtin_cpu_supports; the build itself never uses -march=native. Threads come from
// at::parallel_for, so torch.set_num_threads applies. Each product of a code by its absmax is rounded once to
// float32 and never contracted into an FMA with anything else (the build passes -ffp-contract=off), so the
// dequantized weights equal the reference's bit for bit.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstring>

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

Absmax make_absmax(const at::Tensor& absmax, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offset,
                   const at::Tensor& code8) {
  Absmax a;
  if (absmax.defined() && absmax.numel() > 0) {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "absmax must be contiguous float32");
    a.plain = absmax.data_ptr<float>();
    return a;
  }
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "absmax codes must be contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "absmax scales must be contiguous float32");
  TORCH_CHECK(code8.scalar_type() == at::kFloat && code8.numel() == 256, "the dynamic code must be 256 float32");
  TORCH_CHECK(offset.scalar_type() == at::kFloat && offset.numel() == 1, "the absmax offset must be one float32");
  a.codes = codes.data_ptr<uint8_t>();
  a.scales = scales.data_ptr<float>();
  a.code8 = code8.data_ptr<float>();
  a.offset = offset.data_ptr<float>()[0];
  return a;
}

inline uint8_t code_at(const uint8_t* packed, int64_t element) {
  uint8_t byte = packed[element >> 1];
  return (element & 1) ? (byte & 0xF) : (byte >> 4);
}

// --- dequantize a range of the flat weight ----------------------------------------------------------------------

template <typename Out>
inline void store_scalar(Out* out, int64_t i, float value);
template <>
inline void store_scalar<float>(float* out, int64_t i, float value) { out[i] = value; }
template <>
inline void store_scalar<at::BFloat16>(at::BFloat16* out, int64_t i, float value) { out[i] = at::BFloat16(value); }
template <>
inline void store_scalar<at::Half>(at::Half* out, int64_t i, float value) { out[i] = at::Half(value); }

template <typename Out>
void dequantize_scalar(const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block, int64_t begin,
                       int64_t end, int64_t first, Out* out) {
  for (int64_t e = begin; e < end; ++e) {
    float value = lut[code_at(packed, e)] * absmax(e / block);
    store_scalar(out, e - first, value);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m256i bf16_round(__m512 v) {
  // float32 -> bfloat16, round to nearest even (as torch converts); the values here are finite
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

template <typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline void store16(Out* out, __m512 v);
template <>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline void store16<float>(float* out, __m512 v) {
  _mm512_storeu_ps(out, v);
}
template <>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline void store16<at::BFloat16>(at::BFloat16* out,
                                                                                                __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bf16_round(v));
}
template <>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline void store16<at::Half>(at::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void dequantize_avx512(
    const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block, int64_t begin, int64_t end,
    int64_t first, Out* out) {
  // Groups of 32 elements starting at a multiple of 32: 16 bytes, high nibbles the even elements, low the odd.
  int64_t head_end = std::min(end, (begin + 31) / 32 * 32);
  dequantize_scalar(packed, absmax, lut, block, begin, head_end, first, out);
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  const __m512i first_half = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second_half = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  int64_t g = head_end;
  for (; g + 32 <= end; g += 32) {
    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + g / 2)));
    __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
    __m512 odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), table);
    __m512 scale;
    if (block >= 32) {
      scale = _mm512_set1_ps(absmax(g / block));
    } else {  // block 16: lanes 0-7 hold elements g..g+15, lanes 8-15 the next block
      scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(absmax(g / 16)), _mm512_set1_ps(absmax(g / 16 + 1)));
    }
    even = _mm512_mul_ps(even, scale);
    odd = _mm512_mul_ps(odd, scale);
    store16(out + (g - first), _mm512_permutex2var_ps(even, first_half, odd));
    store16(out + (g - first) + 16, _mm512_permutex2var_ps(even, second_half, odd));
  }
  dequantize_scalar(packed, absmax, lut, block, g, end, first, out);
}

bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes;
}

// --- the fused dequantize-and-multiply for a few activation rows ------------------------------------------------

// y[m][n] for rows n in [n_begin, n_end): K % block == 0 and block % 32 == 0, so every row starts on a byte and on a
// block; xe/xo hold each activation row's even and odd elements (K / 2 each), so that a byte's high and low nibbles
// meet the activations they multiply without a shuffle.
template <int MT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void gemv_rows_avx512(
    const uint8_t* packed, const Absmax& absmax, const float* lut, int64_t block, int64_t K, const float* xe,
    const float* xo, int64_t M, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const __m512 table = _mm512_loadu_ps(lut);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);
  const int64_t half = K / 2;
  const int64_t blocks_per_row = K / block;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* row = packed + n * half;
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m512 part[MT];
      for (int m = 0; m < MT; ++m) part[m] = _mm512_setzero_ps();
      const int64_t start = b * (block / 2);
      for (int64_t off = start; off < start + block / 2; off += 16) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + off)));
        __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);
        __m512 w_odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), table);
        for (int m = 0; m < MT; ++m) {
          part[m] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xe + m * half + off), part[m]);
          part[m] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xo + m * half + off), part[m]);
        }
      }
      const __m512 scale = _mm512_set1_ps(absmax(n * blocks_per_row + b));
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(scale, part[m], acc[m]);
    }
    for (int m = 0; m < MT; ++m) y[m * N + n] = _mm512_reduce_add_ps(acc[m]);
  }
  (void)M;
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

}  // namespace

// y (M, N) float32 = x (M, K) @ dequant(W).T, for x float32 contiguous.
at::Tensor gemv_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& codes,
                     const at::Tensor& scales, const at::Tensor& offset, const at::Tensor& code8, const at::Tensor& lut,
                     int64_t N, int64_t block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "the codebook must be 16 float32 values");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(block % 32 == 0 && K % block == 0, "gemv_4bit needs K a multiple of the block and the block of 32");
  TORCH_CHECK(packed.numel() * 2 >= N * K, "packed holds fewer than N * K codes");
  const Absmax a = make_absmax(absmax, codes, scales, offset, code8);
  // each activation row split into its even and odd elements
  at::Tensor pairs = x.reshape({M, K / 2, 2});
  at::Tensor xe = pairs.select(2, 0).contiguous(), xo = pairs.select(2, 1).contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* table = lut.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const bool vector = has_avx512();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const int64_t rows = std::min<int64_t>(4, M - m0);
      const float* e = xe.data_ptr<float>() + m0 * (K / 2);
      const float* o = xo.data_ptr<float>() + m0 * (K / 2);
      float* ym = out + m0 * N;
      if (!vector) {
        gemv_rows_scalar(p, a, table, block, K, e, o, rows, ym, N, begin, end);
      } else if (rows == 4) {
        gemv_rows_avx512<4>(p, a, table, block, K, e, o, rows, ym, N, begin, end);
      } else if (rows == 3) {
        gemv_rows_avx512<3>(p, a, table, block, K, e, o, rows, ym, N, begin, end);
      } else if (rows == 2) {
        gemv_rows_avx512<2>(p, a, table, block, K, e, o, rows, ym, N, begin, end);
      } else {
        gemv_rows_avx512<1>(p, a, table, block, K, e, o, rows, ym, N, begin, end);
      }
    }
  });
  return y;
}

// out (end - begin,) = the flat weight's elements [begin, end), dequantized in out's dtype (float32/bfloat16/half).
void dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& codes,
                     const at::Tensor& scales, const at::Tensor& offset, const at::Tensor& code8, const at::Tensor& lut,
                     int64_t block, int64_t begin, int64_t end, at::Tensor& out) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "the codebook must be 16 float32 values");
  TORCH_CHECK(0 <= begin && begin <= end && end <= packed.numel() * 2, "element range outside the packed weight");
  TORCH_CHECK(out.is_contiguous() && out.numel() == end - begin, "out must be contiguous with end - begin elements");
  const Absmax a = make_absmax(absmax, codes, scales, offset, code8);
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const float* table = lut.data_ptr<float>();
  const bool vector = has_avx512();
  constexpr int64_t grain = 1 << 14;  // elements per task, a multiple of 32 so tasks start on a group
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_4bit", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "dequantize_4bit writes float32, bfloat16 or float16");
    } else {
      at::parallel_for(0, (end - begin + grain - 1) / grain, 1, [&](int64_t first_task, int64_t last_task) {
        for (int64_t task = first_task; task < last_task; ++task) {
          int64_t s = begin + task * grain, e = std::min(end, s + grain);
          if (vector) {
            dequantize_avx512(p, a, table, block, s, e, begin, o);
          } else {
            dequantize_scalar(p, a, table, block, s, e, begin, o);
          }
        }
      });
    }
  });
}

bool uses_avx512() { return has_avx512(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_4bit", &gemv_4bit, "y = x @ dequant(W).T for a few float32 activation rows");
  m.def("dequantize_4bit", &dequantize_4bit, "dequantize elements [begin, end) of a packed 4-bit weight into out");
  m.def("uses_avx512", &uses_avx512, "whether the AVX-512 kernels run on this CPU");
}
