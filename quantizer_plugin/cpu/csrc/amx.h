// The AMX path for bfloat16 batches past decode (GEMV_MAX_M + 1 activation rows and more).
//
// Each thread takes its weight rows four blocks of 16 rows at a time, and their columns a chunk at a time: it writes
// the chunk of the four blocks as bfloat16 (the format's code writer: nf4/fp4 entries times their block's absmax,
// bit for bit as the reference dequantizes them; int8 integers, exact, the row scale applied after) into a buffer
// laid out as the tiles read it, which stays in L1, and the tile unit multiplies it by the activations. Two buffers
// alternate: the next chunk is written while the tile unit multiplies the current one. Four accumulator tiles run
// side by side (four blocks, or two blocks times two groups of 16 activation rows), so that each activation tile,
// read once, serves up to four products, and no product waits for the one before it in the same tile (a tile
// product's latency is about 2.5 times its issue interval, measured here). Each chunk's 16 x 16 float32 products
// are then scaled by their rows' scale and summed in float32.
//
// The product is computed transposed, y.T (N, M) = W (N, K) @ x.T, so that the weight is the tiles' A operand, whose
// rows are the weight's own rows; x.T is the B operand, packed once per call into 1 KB tiles of pairs of columns of
// x (pack_activations). A code writer may put a row's columns in another order (codebook4bit.cpp does, within each
// 128), and then packs x in that order itself.
//
// AMX is used only where the CPU has AMX-TILE and AMX-BF16 and Linux grants this process the tile state
// (arch_prctl(ARCH_REQ_XCOMP_PERM)); `has_amx_bf16()` checks both once.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace quantizer_plugin {

#define AMX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))

inline constexpr int64_t TILE_ROWS = 16;  // rows of every tile here; 64 bytes per tile row: 32 bf16 or 16 float32
inline constexpr int64_t TILE_K = 32;     // weight columns per A tile
inline constexpr int64_t TILE_ELEMENTS = TILE_ROWS * TILE_K;
inline constexpr int64_t BLOCKS = 4;  // blocks of 16 weight rows written and multiplied together
// Columns per chunk: the four blocks' chunk, twice (two buffers, 32 KB of bfloat16), stays in L1 until the tiles
// read it. Written for a whole row instead, the buffer spilled to L2 and writing it took longer than the products
// (measured here).
inline constexpr int64_t CHUNK_COLUMNS = 128;

// The code writers read a chunk of each row at a time, which the hardware prefetcher does not follow; each read asks
// for the same bytes of the row this far ahead (the next four blocks, 64 rows) to be brought into L2.
inline constexpr int64_t TILE_PREFETCH_ROWS = BLOCKS * TILE_ROWS;

// Where the code writers put row r's column k of a block: the 16 x 32 tile of columns k / 32, row-major.
inline int64_t tile_offset(int64_t r, int64_t k) { return (k / TILE_K) * TILE_ELEMENTS + r * TILE_K + k % TILE_K; }

// Tiles 0-3 accumulate, tiles 4 and 7 hold weights (alternately, so that loading one block's does not wait for the
// products still reading the other's), tiles 5 and 6 activations; all 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

AMX_BF16 inline void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = TILE_ROWS;
  }
  _tile_loadconfig(&config);
}

// GCC's tile intrinsics take tile numbers as literals; these pick them from template arguments.
template <int T>
AMX_BF16 inline void load_tile(const void* source) {  // a 16 x 64-byte tile (bf16 or int8)
  if constexpr (T == 4) _tile_loadd(4, source, 64);
  if constexpr (T == 5) _tile_loadd(5, source, 64);
  if constexpr (T == 6) _tile_loadd(6, source, 64);
  if constexpr (T == 7) _tile_loadd(7, source, 64);
}
template <int C>
AMX_BF16 inline void zero_accumulator() {
  if constexpr (C == 0) _tile_zero(0);
  if constexpr (C == 1) _tile_zero(1);
  if constexpr (C == 2) _tile_zero(2);
  if constexpr (C == 3) _tile_zero(3);
}
template <int C>
AMX_BF16 inline void store_accumulator(void* out) {  // 16 x 16 float32 (bf16 products) or int32 (int8)
  if constexpr (C == 0) _tile_stored(0, out, 64);
  if constexpr (C == 1) _tile_stored(1, out, 64);
  if constexpr (C == 2) _tile_stored(2, out, 64);
  if constexpr (C == 3) _tile_stored(3, out, 64);
}
#define QP_TILE_DOT(c, a, b) \
  if constexpr (C == c && A == a && B == b) _tile_dpbf16ps(c, a, b);
template <int C, int A, int B>  // accumulator C += weights A @ activations B
AMX_BF16 inline void tile_dot() {
  QP_TILE_DOT(0, 4, 5) QP_TILE_DOT(0, 7, 5) QP_TILE_DOT(0, 4, 6) QP_TILE_DOT(0, 7, 6)
  QP_TILE_DOT(1, 4, 5) QP_TILE_DOT(1, 7, 5) QP_TILE_DOT(1, 4, 6) QP_TILE_DOT(1, 7, 6)
  QP_TILE_DOT(2, 4, 5) QP_TILE_DOT(2, 7, 5) QP_TILE_DOT(2, 4, 6) QP_TILE_DOT(2, 7, 6)
  QP_TILE_DOT(3, 4, 5) QP_TILE_DOT(3, 7, 5) QP_TILE_DOT(3, 4, 6) QP_TILE_DOT(3, 7, 6)
}
#undef QP_TILE_DOT

// Block I's weights (tile 4 or 7) times the GROUPS activation tiles, into accumulators I * GROUPS + g.
template <int I, int GROUPS>
AMX_BF16 inline void multiply_block(const uint16_t* weights) {
  constexpr int A = I % 2 ? 7 : 4;
  load_tile<A>(weights);
  tile_dot<I * GROUPS, A, 5>();
  if constexpr (GROUPS > 1) tile_dot<I * GROUPS + 1, A, 6>();
}

// Accumulators [0, NB * GROUPS) = blocks [0, NB) of the chunk `a` (columns [k_begin, k_end), `block_stride` apart)
// @ x.T for activation groups [group0, group0 + GROUPS) of the packed activations `xp`; NB * GROUPS <= 4.
template <int NB, int GROUPS>
AMX_BF16 void multiply_chunk(const uint16_t* a, int64_t block_stride, int64_t k_begin, int64_t k_end,
                             const uint16_t* xp, int64_t groups, int64_t group0) {
  static_assert(NB * GROUPS <= 4 && GROUPS <= 2, "four accumulator tiles, two activation tiles");
  zero_accumulator<0>();
  if constexpr (NB * GROUPS > 1) zero_accumulator<1>();
  if constexpr (NB * GROUPS > 2) zero_accumulator<2>();
  if constexpr (NB * GROUPS > 3) zero_accumulator<3>();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += TILE_K) {
    const uint16_t* x = xp + (k0 / TILE_K * groups + group0) * TILE_ELEMENTS;
    load_tile<5>(x);
    if constexpr (GROUPS > 1) load_tile<6>(x + TILE_ELEMENTS);
    const uint16_t* w = a + (k0 - k_begin) / TILE_K * TILE_ELEMENTS;
    multiply_block<0, GROUPS>(w);
    if constexpr (NB > 1) multiply_block<1, GROUPS>(w + block_stride);
    if constexpr (NB > 2) multiply_block<2, GROUPS>(w + 2 * block_stride);
    if constexpr (NB > 3) multiply_block<3, GROUPS>(w + 3 * block_stride);
  }
}

// product (count, 16, 16) = accumulators [0, count): float32 for bf16 products, int32 for int8 ones.
template <typename Sum>
AMX_BF16 inline void store_accumulators(int64_t count, Sum* product) {
  store_accumulator<0>(product);
  if (count > 1) store_accumulator<1>(product + 256);
  if (count > 2) store_accumulator<2>(product + 512);
  if (count > 3) store_accumulator<3>(product + 768);
}

// The (blocks, groups) combinations multiply_chunk is instantiated for, picked at run time.
AMX_BF16 inline void multiply_chunk(int64_t blocks, int64_t pair, const uint16_t* a, int64_t block_stride,
                                    int64_t k_begin, int64_t k_end, const uint16_t* xp, int64_t groups,
                                    int64_t group0) {
  if (pair == 2) {
    if (blocks == 2) return multiply_chunk<2, 2>(a, block_stride, k_begin, k_end, xp, groups, group0);
    return multiply_chunk<1, 2>(a, block_stride, k_begin, k_end, xp, groups, group0);
  }
  switch (blocks) {
    case 4: return multiply_chunk<4, 1>(a, block_stride, k_begin, k_end, xp, groups, group0);
    case 3: return multiply_chunk<3, 1>(a, block_stride, k_begin, k_end, xp, groups, group0);
    case 2: return multiply_chunk<2, 1>(a, block_stride, k_begin, k_end, xp, groups, group0);
    default: return multiply_chunk<1, 1>(a, block_stride, k_begin, k_end, xp, groups, group0);
  }
}

// acc (16, 16) += product (16, 16), row r scaled by scale[r].
AMX_BF16 inline void add_scaled(const float* product, const float* scale, float* acc) {
  for (int r = 0; r < TILE_ROWS; ++r) {
    const __m512 sum = _mm512_fmadd_ps(_mm512_load_ps(product + r * 16), _mm512_set1_ps(scale[r]),
                                       _mm512_loadu_ps(acc + r * 16));
    _mm512_storeu_ps(acc + r * 16, sum);
  }
}

// One thread's weight rows [n_begin, n_end), BLOCKS blocks of 16 at a time, into y (M, N). The chunks alternate
// between two buffers: the next chunk is written while the tile unit multiplies the current one, before its
// products are collected, so that the vector unit and the tile unit work at the same time.
template <typename WriteCodes, typename RowScale>
AMX_BF16 void tile_linear_rows(const uint16_t* xp, int64_t M, int64_t groups, int64_t K, int64_t N, int64_t chunk,
                               float* y, int64_t n_begin, int64_t n_end, const WriteCodes& write_codes,
                               const RowScale& row_scale) {
  configure_tiles();
  const int64_t block_stride = TILE_ROWS * chunk;
  std::vector<uint16_t> buffers(2 * BLOCKS * block_stride, 0);
  std::vector<float> acc(BLOCKS * groups * 256);  // acc[block][group] is that 16 x 16 part of y.T
  std::vector<float> scale(BLOCKS * TILE_ROWS);
  alignas(64) float product[4 * 256];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += BLOCKS * TILE_ROWS) {
    const int64_t rows = std::min(BLOCKS * TILE_ROWS, n_end - n0);
    const int64_t blocks = (rows + TILE_ROWS - 1) / TILE_ROWS;
    if (rows % TILE_ROWS) std::fill(buffers.begin(), buffers.end(), 0);  // missing rows multiply as zeros
    for (int64_t r = 0; r < BLOCKS * TILE_ROWS; ++r) scale[r] = r < rows ? row_scale(n0 + r) : 0.0f;
    std::fill(acc.begin(), acc.end(), 0.0f);
    auto write_chunk = [&](int64_t k0) {
      uint16_t* a = buffers.data() + (k0 / chunk % 2) * BLOCKS * block_stride;
      for (int64_t i = 0; i < blocks; ++i) {
        const int64_t first = n0 + i * TILE_ROWS;
        write_codes(first, std::min(TILE_ROWS, n0 + rows - first), k0, k0 + chunk, a + i * block_stride);
      }
    };
    write_chunk(0);
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const uint16_t* a = buffers.data() + (k0 / chunk % 2) * BLOCKS * block_stride;
      bool next_written = k0 + chunk >= K;
      for (int64_t g0 = 0; g0 < groups; g0 += 2) {
        const int64_t pair = std::min<int64_t>(2, groups - g0), per_pass = 4 / pair;
        for (int64_t i0 = 0; i0 < blocks; i0 += per_pass) {
          const int64_t count = std::min(per_pass, blocks - i0);
          multiply_chunk(count, pair, a + i0 * block_stride, block_stride, k0, k0 + chunk, xp, groups, g0);
          if (!next_written) write_chunk(k0 + chunk), next_written = true;
          store_accumulators(count * pair, product);
          for (int64_t i = 0; i < count; ++i) {
            for (int64_t g = 0; g < pair; ++g) {
              add_scaled(product + (i * pair + g) * 256, scale.data() + (i0 + i) * TILE_ROWS,
                         acc.data() + ((i0 + i) * groups + g0 + g) * 256);
            }
          }
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t r = 0; r < rows; ++r) {
        y[m * N + n0 + r] = acc[((r / TILE_ROWS) * groups + m / TILE_ROWS) * 256 + (r % TILE_ROWS) * 16 + m % 16];
      }
    }
  }
  _tile_release();
}

// x (M, K) as the tiles' B operand: 1 KB tiles of 16 pairs of consecutive columns by 16 rows of x, M padded with
// zero rows to whole groups of 16: (K / 32, groups, 16, 16, 2).
inline at::Tensor pack_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be a bfloat16 matrix");
  const int64_t M = x.size(0), K = x.size(1), groups = (M + TILE_ROWS - 1) / TILE_ROWS;
  TORCH_CHECK(K % TILE_K == 0, "the AMX kernels need K a multiple of 32, not ", K);
  return at::constant_pad_nd(x, {0, 0, 0, groups * TILE_ROWS - M})
      .reshape({groups, TILE_ROWS, K / TILE_K, TILE_K / 2, 2})
      .permute({2, 0, 3, 1, 4})
      .contiguous();
}

// Rows [n0, n0 + rows), columns [k_begin, k_end) of a weight of 4-bit codes (the checkpoint's bytes: each row in
// K / 2 bytes, two codes a byte, the first in the high nibble; NF4/FP4 and int4) in bfloat16 at tile_offset, bit for
// bit the reference's: `table(b)` gives the 16 values (float32) the codes of block b stand for, which are rounded
// once to bfloat16 into the table vpermw looks the codes up in (NF4/FP4: the codebook times the block's absmax;
// int4: (i - z) * s). Block b holds the weight's flat elements [b * block, (b + 1) * block). Each 128 columns (64
// bytes: 32 little-endian words of four codes) take four lookups, one per shift of the words: element 4i + j of the
// first 64 columns is in bits (j ^ 1) * 4 of word i (the first element of a byte is its high nibble), and of the
// second 64 in word 16 + i, whose index also gets bit 4 set to read the second half of a 32-entry table holding the
// second 64 columns' block. So lookup j writes the 32 columns [32j, 32j + 32) as elements 4i + j, then 64 + 4i + j,
// i < 16, and the activations are packed in that order (pack_activations_nibble_order). Needs K % 128 == 0,
// block % 64 == 0 (a power of two), the range on 128s.
template <typename Table>
AMX_BF16 void write_weights_4bit(const uint8_t* packed, const Table& table, int64_t block, int64_t K, int64_t n0,
                                 int64_t rows, int64_t k_begin, int64_t k_end, uint16_t* a) {
  const __m512i nibble = _mm512_set1_epi16(0xF);
  const __m512i second_table = _mm512_maskz_set1_epi16(0xFFFF0000, 16);
  constexpr int nibble_or_table = 0xEA;  // vpternlog: (words & nibble) | second_table
  const int block_shift = __builtin_ctzll(block);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = packed + (n0 + r) * (K / 2) + k_begin / 2;
    uint16_t* out = a + tile_offset(r, 0);  // 128 columns = four tiles on: a pointer step, no division per step
    const int64_t row_start = (n0 + r) * K;
    for (int64_t e = row_start + k_begin; e < row_start + k_end; e += 128, bytes += 64, out += 4 * TILE_ELEMENTS) {
      _mm_prefetch(reinterpret_cast<const char*>(bytes + TILE_PREFETCH_ROWS * (K / 2)), _MM_HINT_T1);
      const __m512i values = (__m512i)_mm512_cvtne2ps_pbh(table((e + 64) >> block_shift), table(e >> block_shift));
      const __m512i words = _mm512_loadu_si512(bytes);
      for (int j = 0; j < 4; ++j) {
        const __m512i shifted = _mm512_srli_epi16(words, (j ^ 1) * 4);
        const __m512i index = _mm512_ternarylogic_epi32(shifted, nibble, second_table, nibble_or_table);
        _mm512_storeu_si512(out + j * TILE_ELEMENTS, _mm512_permutexvar_epi16(index, values));
      }
    }
  }
}

// pack_activations for x (M, K) whose columns the tiles take in write_weights_4bit's order: column 128G + 32j +
// 16h + i of the tiles is x's 128G + 64h + 4i + j.
inline at::Tensor pack_activations_nibble_order(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be a bfloat16 matrix");
  const int64_t M = x.size(0), K = x.size(1), groups = (M + TILE_ROWS - 1) / TILE_ROWS;
  TORCH_CHECK(K % 128 == 0, "the 4-bit AMX kernel needs K a multiple of 128, not ", K);
  // x as (groups, m, G, h, i / 2, i % 2, j), to (G, j, groups, h, i / 2, m, i % 2): tile 4G + j, pair 8h + i / 2
  return at::constant_pad_nd(x, {0, 0, 0, groups * TILE_ROWS - M})
      .reshape({groups, TILE_ROWS, K / 128, 2, 8, 2, 4})
      .permute({2, 6, 0, 3, 4, 1, 5})
      .contiguous()
      .view({K / TILE_K, groups, TILE_ROWS, TILE_ROWS, 2});
}

// y (M, N) float32 = x @ W.T on the tiles, x (M, K) packed by a pack_activations* function into `xp`.
// `write_codes(n0, rows, k_begin, k_end, a)` writes weight rows [n0, n0 + rows), columns [k_begin, k_end), as
// bfloat16 at tile_offset(r, k - k_begin) of `a` (in the column order x was packed in); `row_scale(n)` is the
// float32 that row n's products are multiplied by. The chunks' columns are the widest multiple of `unit` (a
// multiple of 32) that divides K and is at most CHUNK_COLUMNS (or `unit`).
template <typename WriteCodes, typename RowScale>
at::Tensor tile_linear(const at::Tensor& xp, int64_t M, int64_t N, int64_t unit, const WriteCodes& write_codes,
                       const RowScale& row_scale) {
  TORCH_CHECK(has_amx_bf16(), "the AMX kernels need a CPU with AMX-BF16 and the tile state granted");
  TORCH_CHECK(xp.dim() == 5 && xp.is_contiguous() && xp.size(2) == TILE_ROWS && xp.size(3) == TILE_ROWS,
              "activations not packed for the tiles");
  const int64_t K = xp.size(0) * TILE_K, groups = xp.size(1);
  TORCH_CHECK(unit % TILE_K == 0 && K % unit == 0, "the AMX kernels need K a multiple of ", unit, ", not ", K);
  int64_t chunk = std::max(unit, CHUNK_COLUMNS / unit * unit);
  while (K % chunk) chunk -= unit;
  at::Tensor y = at::empty({M, N}, xp.options().dtype(at::kFloat));
  const auto* packed_x = reinterpret_cast<const uint16_t*>(xp.data_ptr<at::BFloat16>());
  float* out = y.data_ptr<float>();
  at::parallel_for(0, (N + TILE_ROWS - 1) / TILE_ROWS, 1, [&](int64_t first_block, int64_t last_block) {
    tile_linear_rows(packed_x, M, groups, K, N, chunk, out, first_block * TILE_ROWS,
                     std::min(N, last_block * TILE_ROWS), write_codes, row_scale);
  });
  return y;
}

}  // namespace quantizer_plugin
