// What the CPU kernels share: SIMD target attributes, stores of 32 results in each output dtype, the prefetch
// distance, and the per-thread dequantize-then-GEMM loop (the run-time CPU checks are declared in kernels.h).
//
// SIMD is chosen at run time: AVX2 (with FMA) and AVX-512 (F, BW, VL, DQ) functions are compiled with target
// attributes, next to plain C++ ones, and picked by __builtin_cpu_supports (cpu_features.cpp); the build itself
// never uses -march=native. Threads come from at::parallel_for, so torch.set_num_threads applies.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace quantizer_plugin {

// The weights stream from memory once per call, and each loop asks for them ahead of what it reads: the hardware
// prefetcher stops at every 4 KB page (asking halved a cold 4096 x 4096 decode). Once per 64-byte line read, the line
// PREFETCH_L1_BYTES ahead comes into L1 and the one PREFETCH_L2_BYTES ahead into L2: L2's requests keep more lines in
// flight than L1's few fill buffers. A cold nf4 decode on 2 threads of the Xeon with AMX streamed 11.3 GB/s with 4 KB
// into L1 alone and 13.5 to 14.5 GB/s with both (its read probe: 18 GB/s).
inline constexpr int64_t PREFETCH_L1_BYTES = 1024;
inline constexpr int64_t PREFETCH_L2_BYTES = 8192;

inline __attribute__((always_inline)) void prefetch_ahead(const void* read) {
  _mm_prefetch(static_cast<const char*>(read) + PREFETCH_L1_BYTES, _MM_HINT_T0);
  _mm_prefetch(static_cast<const char*>(read) + PREFETCH_L2_BYTES, _MM_HINT_T1);
}

// prefetch_ahead for a loop that reads `step` bytes (at most 64) at `read` per iteration: once per 64-byte line, in
// the iteration whose read crosses into it (a second request for a line costs issue slots and brings nothing).
inline __attribute__((always_inline)) void prefetch_ahead_per_line(const void* read, int64_t step) {
  if (reinterpret_cast<uintptr_t>(read) % 64 < static_cast<uintptr_t>(step)) prefetch_ahead(read);
}

// Independent sum chains per activation row in the AVX2 decode kernels, for MT activation rows at once: enough chains
// that no FMA waits on the previous one's latency, while 16 ymm registers hold them all (MT * chains accumulators).
inline constexpr int avx2_chains(int MT) { return MT == 1 ? 4 : (MT == 2 ? 2 : 1); }

// Weight rows the q8_0 kernels take at once for MT activation rows: as many streams from memory as the accumulators
// (MT * rows of them) leave registers for.
inline constexpr int q8_weight_rows(int MT) { return MT == 1 ? 4 : (MT == 2 ? 2 : 1); }

template <typename Out>
inline void store_scalar(Out* out, int64_t i, float value);
template <>
inline void store_scalar<float>(float* out, int64_t i, float value) { out[i] = value; }
template <>
inline void store_scalar<at::BFloat16>(at::BFloat16* out, int64_t i, float value) { out[i] = at::BFloat16(value); }
template <>
inline void store_scalar<at::Half>(at::Half* out, int64_t i, float value) { out[i] = at::Half(value); }

#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_F16C __attribute__((target("avx2,fma,f16c")))  // every AVX2 CPU has F16C; has_avx2 checks both
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// The sum of 8 float32 lanes (the AVX2 kernels' end of a row).
AVX2 inline float horizontal_sum(__m256 v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

AVX512 inline __m256i bf16_round(__m512 v) {
  // float32 -> bfloat16, round to nearest even (as torch converts); the values here are finite
  __m512i bits = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// Sixteen consecutive weights as float32, from float32, bfloat16 or float16 (all exact).
AVX512 inline __m512 load_weights(const float* w) { return _mm512_loadu_ps(w); }
AVX512 inline __m512 load_weights(const at::BFloat16* w) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
AVX512 inline __m512 load_weights(const at::Half* w) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}

// Calls fn(typed pointer) for a float32, bfloat16 or float16 weight.
template <typename Fn>
inline void with_weight_type(const at::Tensor& weight, const char* op, const Fn& fn) {
  switch (weight.scalar_type()) {
    case at::kFloat: return fn(weight.data_ptr<float>());
    case at::kBFloat16: return fn(weight.data_ptr<at::BFloat16>());
    case at::kHalf: return fn(weight.data_ptr<at::Half>());
    default: TORCH_CHECK(false, op, " reads float32, bfloat16 or float16 weights, not ", weight.scalar_type());
  }
}

// Stores 32 consecutive outputs: `first` holds elements 0-15, `second` 16-31.
struct StoreFloat {
  AVX512 static inline void store(float* out, __m512 first, __m512 second) {
    _mm512_storeu_ps(out, first);
    _mm512_storeu_ps(out + 16, second);
  }
};
struct StoreHalf {
  AVX512 static inline void store(at::Half* out, __m512 first, __m512 second) {
    constexpr int rounding = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(first, rounding));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), _mm512_cvtps_ph(second, rounding));
  }
};
struct StoreBFloat16 {  // integer rounding, for AVX-512 CPUs without the BF16 extension
  AVX512 static inline void store(at::BFloat16* out, __m512 first, __m512 second) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), bf16_round(first));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), bf16_round(second));
  }
};
struct StoreBFloat16Native {  // one instruction for 32 values (round to nearest even, as above)
  AVX512_BF16 static inline void store(at::BFloat16* out, __m512 first, __m512 second) {
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(second, first));
  }
};

// The q8_0 activations' scales (one per 32 columns, q8_0.cpp) spread over the 16 int32 lanes of the AVX512-VNNI
// q8_0 loops' 64-byte steps (codebook4bit.cpp, affine.cpp), times `factor`: a step covers `blocks` activation blocks
// (4 or 8), and its lane l sums columns of block l * blocks / 16. Row m's step s is at (m * steps + s) * 16; `xd`
// holds `per_row` scales a row.
AVX512 inline std::vector<float> q8_lane_scales(const float* xd, int64_t rows, int64_t per_row, int64_t steps,
                                                int64_t blocks, float factor) {
  int32_t block_of[16];
  for (int l = 0; l < 16; ++l) block_of[l] = static_cast<int32_t>(l * blocks / 16);
  const __m512i block_of_lane = _mm512_loadu_si512(block_of);
  const __mmask16 first_blocks = static_cast<__mmask16>((1 << blocks) - 1);
  std::vector<float> lane_scales(rows * steps * 16);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t s = 0; s < steps; ++s) {
      const __m512 scales = _mm512_maskz_loadu_ps(first_blocks, xd + m * per_row + s * blocks);
      _mm512_storeu_ps(lane_scales.data() + (m * steps + s) * 16,
                       _mm512_mul_ps(_mm512_permutexvar_ps(block_of_lane, scales), _mm512_set1_ps(factor)));
    }
  }
  return lane_scales;
}

// Weight rows a task runs through every group of activation rows before it moves on, when x has more than one group:
// their bytes (16 to 64 KB at K = 4096) stay in L1 and L2 for the next group, so that the weight streams from memory
// once per call however many rows x has. Each group's pass over a task's whole range read it from memory again,
// once per 4 rows of x (M = 16 was 0.8x bf16 on AVX512-BF16 without AMX).
inline constexpr int64_t ROW_TILE = 16;

// kernel(n0, n1, m0, std::integral_constant<int, rows>) for a run-time `rows` from 1 to R.
template <int R, typename Kernel>
inline void call_with_rows(int64_t rows, int64_t n0, int64_t n1, int64_t m0, const Kernel& kernel) {
  if constexpr (R > 1) {
    if (rows < R) return call_with_rows<R - 1>(rows, n0, n1, m0, kernel);
  }
  kernel(n0, n1, m0, std::integral_constant<int, R>{});
}

// Runs kernel(n_begin, n_end, m0, rows) for a decode kernel: output rows split across threads (16 per task at the
// least), activation rows in groups of at most MAX_ROWS (4 unless a kernel has registers for more) from m0, the most
// a kernel keeps accumulators for. `rows` is a std::integral_constant, so that a kernel templated on its row count
// is instantiated once per group size.
template <int MAX_ROWS = 4, typename Kernel>
inline void for_row_groups(int64_t M, int64_t N, const Kernel& kernel) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const int64_t tile = M > MAX_ROWS ? ROW_TILE : end - begin;  // one group: a single pass, the kernel's own stream
    for (int64_t n0 = begin; n0 < end; n0 += tile) {
      const int64_t n1 = std::min(end, n0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
        call_with_rows<MAX_ROWS>(std::min<int64_t>(MAX_ROWS, M - m0), n0, n1, m0, kernel);
      }
    }
  });
}

// y (M, N) = x (M, K) @ W.T, W made chunk by chunk: each task takes consecutive rows of W, dequantizes them with
// `fill(first, last, buffer)` into its own buffer (in its core's L2) and multiplies them right there with a
// single-threaded GEMM (at::mm inside a parallel region runs on the calling thread), writing its own columns of y.
template <typename Fill>
inline at::Tensor chunked_linear(const at::Tensor& x, int64_t N, int64_t rows_per_chunk, const Fill& fill) {
  const int64_t M = x.size(0), K = x.size(1);
  // y is written in place, a chunk's columns at a time (a column slice is a BLAS matrix with leading dimension N):
  // a contiguous result, so that what follows a layer (attention's views, elementwise ops) reads it at full speed
  at::Tensor y = at::empty({M, N}, x.options());
  const int64_t chunks = (N + rows_per_chunk - 1) / rows_per_chunk;
  at::parallel_for(0, chunks, 1, [&](int64_t first_chunk, int64_t last_chunk) {
    at::Tensor buffer = at::empty({rows_per_chunk, K}, x.options());
    for (int64_t c = first_chunk; c < last_chunk; ++c) {
      const int64_t first = c * rows_per_chunk, last = std::min(N, first + rows_per_chunk);
      at::Tensor weight = buffer.narrow(0, 0, last - first);
      fill(first, last, weight);
      at::Tensor out = y.narrow(1, first, last - first);
      at::mm_out(out, x, weight.t());
    }
  });
  return y;
}

}  // namespace quantizer_plugin
