// int8 weights times 16-bit activations on the AMX-INT8 tiles, for batches past decode.
//
// The int8 weight is the tiles' A operand as it is stored: each 16 x 64 tile is loaded straight from 16 rows of the
// weight (a row stride of K bytes), so nothing is converted or written per call, unlike the bfloat16 tile path
// (amx.h), whose weight writer was the bottleneck at M = 16. The activations become int8 instead: each row m is split
// into two int8 pieces and a float32 scale, x ~ scale_m * (high + low / 254), with |x - that| <= scale_m / 508 =
// max|x_m| / 64516, well inside the rounding of the bfloat16 or float16 activations themselves (2^-9 or 2^-12 of
// each element); int32 accumulation is exact. y = (W @ high + W @ low / 254) * scale_m * weight_scale_n / 127.
//
// Each group of 16 activation tile rows holds 8 activation rows' high pieces, then the same 8 rows' low pieces, so
// that every accumulator tile has both pieces of its rows and the epilogue combines them as it stores. Four
// accumulator tiles run side by side (four blocks of 16 weight rows, or two blocks times two groups), as in amx.h.

#include <cfloat>
#include <cmath>

#include "amx.h"
#include "int8_tiles.h"
#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

#define AMX_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,amx-int8")))

namespace {

constexpr int64_t K_STEP = INT8_TILE_K;
constexpr int64_t HALF_GROUP = 8;     // activation rows per group of 16 tile rows (their high, then low pieces)
constexpr int64_t WEIGHT_AHEAD = 512;  // bytes of each weight row prefetched ahead of the tile loads

// GCC's tile intrinsics take tile numbers as literals; these pick them from template arguments (amx.h's load_tile,
// zero_accumulator and store_accumulators serve the int8 tiles as they are).
template <int T>
AMX_INT8 inline void load_weight_tile(const int8_t* rows, int64_t stride) {
  if constexpr (T == 4) _tile_loadd(4, rows, stride);
  if constexpr (T == 7) _tile_loadd(7, rows, stride);
}
#define QP_INT8_DOT(c, a, b) \
  if constexpr (C == c && A == a && B == b) _tile_dpbssd(c, a, b);
template <int C, int A, int B>  // accumulator C += weights A @ activations B
AMX_INT8 inline void dot_int8() {
  QP_INT8_DOT(0, 4, 5) QP_INT8_DOT(0, 7, 5) QP_INT8_DOT(0, 4, 6) QP_INT8_DOT(0, 7, 6)
  QP_INT8_DOT(1, 4, 5) QP_INT8_DOT(1, 7, 5) QP_INT8_DOT(1, 4, 6) QP_INT8_DOT(1, 7, 6)
  QP_INT8_DOT(2, 4, 5) QP_INT8_DOT(2, 7, 5) QP_INT8_DOT(2, 4, 6) QP_INT8_DOT(2, 7, 6)
  QP_INT8_DOT(3, 4, 5) QP_INT8_DOT(3, 7, 5) QP_INT8_DOT(3, 4, 6) QP_INT8_DOT(3, 7, 6)
}
#undef QP_INT8_DOT

// Block I (16 weight rows from `rows`, stride K) times the GROUPS activation tiles, into accumulators I * GROUPS + g.
template <int I, int GROUPS>
AMX_INT8 inline void multiply_block(const int8_t* rows, int64_t K) {
  constexpr int A = I % 2 ? 7 : 4;
  for (int r = 0; r < TILE_ROWS; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(rows + r * K + WEIGHT_AHEAD), _MM_HINT_T0);
  }
  load_weight_tile<A>(rows, K);
  dot_int8<I * GROUPS, A, 5>();
  if constexpr (GROUPS > 1) dot_int8<I * GROUPS + 1, A, 6>();
}

// products (NB * GROUPS, 16, 16) int32 = blocks [0, NB) (`blocks[i]`: 16 rows each, stride K) @ the packed
// activations of groups [group0, group0 + GROUPS), over all of K.
template <int NB, int GROUPS>
AMX_INT8 void multiply_rows(const int8_t* const* blocks, int64_t K, const int8_t* xp, int64_t groups, int64_t group0,
                            int32_t* products) {
  static_assert(NB * GROUPS <= 4 && GROUPS <= 2, "four accumulator tiles, two activation tiles");
  zero_accumulator<0>();
  if constexpr (NB * GROUPS > 1) zero_accumulator<1>();
  if constexpr (NB * GROUPS > 2) zero_accumulator<2>();
  if constexpr (NB * GROUPS > 3) zero_accumulator<3>();
  for (int64_t k0 = 0; k0 < K; k0 += K_STEP) {
    const int8_t* x = xp + (k0 / K_STEP * groups + group0) * TILE_ROWS * K_STEP;
    load_tile<5>(x);
    if constexpr (GROUPS > 1) load_tile<6>(x + TILE_ROWS * K_STEP);
    multiply_block<0, GROUPS>(blocks[0] + k0, K);
    if constexpr (NB > 1) multiply_block<1, GROUPS>(blocks[1] + k0, K);
    if constexpr (NB > 2) multiply_block<2, GROUPS>(blocks[2] + k0, K);
    if constexpr (NB > 3) multiply_block<3, GROUPS>(blocks[3] + k0, K);
  }
  store_accumulators(NB * GROUPS, products);
}

AMX_INT8 void multiply_rows(int64_t blocks, int64_t pair, const int8_t* const* rows, int64_t K, const int8_t* xp,
                            int64_t groups, int64_t group0, int32_t* products) {
  if (pair == 2) {
    if (blocks == 2) return multiply_rows<2, 2>(rows, K, xp, groups, group0, products);
    return multiply_rows<1, 2>(rows, K, xp, groups, group0, products);
  }
  switch (blocks) {
    case 4: return multiply_rows<4, 1>(rows, K, xp, groups, group0, products);
    case 3: return multiply_rows<3, 1>(rows, K, xp, groups, group0, products);
    case 2: return multiply_rows<2, 1>(rows, K, xp, groups, group0, products);
    default: return multiply_rows<1, 1>(rows, K, xp, groups, group0, products);
  }
}

}  // namespace

// One thread's weight rows [n_begin, n_end), four blocks of 16 at a time. A last block cut short is copied into a
// zero-padded buffer first, so that no tile load reads past the weight.
AMX_INT8 void int8_tile_products(const int8_t* weight, int64_t K, const int8_t* xp, int64_t groups, int64_t n_begin,
                                 int64_t n_end, const Int8TileFinish& finish) {
  configure_tiles();
  std::vector<int8_t> padded;
  alignas(64) int32_t products[4 * 256];
  for (int64_t n0 = n_begin; n0 < n_end; n0 += BLOCKS * TILE_ROWS) {
    const int64_t rows = std::min(BLOCKS * TILE_ROWS, n_end - n0);
    const int64_t blocks = (rows + TILE_ROWS - 1) / TILE_ROWS;
    const int8_t* block_rows[BLOCKS];
    for (int64_t i = 0; i < blocks; ++i) {
      const int64_t first = n0 + i * TILE_ROWS, count = std::min(TILE_ROWS, n0 + rows - first);
      block_rows[i] = weight + first * K;
      if (count < TILE_ROWS) {
        padded.assign(TILE_ROWS * K, 0);
        std::memcpy(padded.data(), block_rows[i], count * K);
        block_rows[i] = padded.data();
      }
    }
    for (int64_t g0 = 0; g0 < groups; g0 += 2) {
      const int64_t pair = std::min<int64_t>(2, groups - g0), per_pass = 4 / pair;
      for (int64_t i0 = 0; i0 < blocks; i0 += per_pass) {
        const int64_t count = std::min(per_pass, blocks - i0);
        multiply_rows(count, pair, block_rows + i0, K, xp, groups, g0, products);
        for (int64_t i = 0; i < count; ++i) {
          const int64_t first_n = n0 + (i0 + i) * TILE_ROWS;
          for (int64_t g = 0; g < pair; ++g) {
            finish(products + (i * pair + g) * 256, first_n, std::min(TILE_ROWS, n0 + rows - first_n), g0 + g);
          }
        }
      }
    }
  }
  _tile_release();
}

at::Tensor pack_int8_tile_rows(const at::Tensor& rows) {
  const int64_t R = rows.size(0), K = rows.size(1);
  TORCH_CHECK(rows.scalar_type() == at::kChar && R % TILE_ROWS == 0 && K % K_STEP == 0,
              "int8 tile rows must be (a multiple of 16, a multiple of 64) int8");
  return rows.view({R / TILE_ROWS, TILE_ROWS, K / K_STEP, K_STEP / 4, 4}).permute({2, 0, 3, 1, 4}).contiguous();
}

at::Tensor linear_int8_amx(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(has_amx_int8(), "linear_int8_amx needs a CPU with AMX-INT8 and the tile state granted");
  TORCH_CHECK(x.dim() == 2, "x must be a matrix");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be a contiguous int8 matrix");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == weight.size(0),
              "scale must be contiguous float32, one per row");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x and weight disagree on K");
  TORCH_CHECK(K % K_STEP == 0, "linear_int8_amx needs K a multiple of ", K_STEP, ", not ", K);
  TORCH_CHECK(K <= INT32_MAX / (127 * 127), "K = ", K, " could overflow the int32 sums");
  // The pieces: x ~ x_scale * (high + low / 254), |high|, |low| <= 127.
  const at::Tensor xf = x.to(at::kFloat);
  const at::Tensor x_scale = xf.abs().amax(1).div_(127.0f).clamp_min_(FLT_MIN);
  const at::Tensor v = xf / x_scale.unsqueeze(1);
  const at::Tensor high = v.round().clamp_(-127, 127);
  const at::Tensor low = (v - high).mul_(254.0f).round_().clamp_(-127, 127);
  // Groups of 16 tile rows: 8 activation rows' high pieces, then their low pieces; as the tiles' B operand, 1 KB tiles
  // of 16 rows of four consecutive columns by 16 tile rows: (K / 64, groups, 16, 16, 4).
  const int64_t groups = (M + HALF_GROUP - 1) / HALF_GROUP, padded_m = groups * HALF_GROUP;
  const at::Tensor pieces = at::stack({at::constant_pad_nd(high, {0, 0, 0, padded_m - M}).view({groups, HALF_GROUP, K}),
                                       at::constant_pad_nd(low, {0, 0, 0, padded_m - M}).view({groups, HALF_GROUP, K})},
                                      1)
                                .to(at::kChar);  // (groups, 2, 8, K)
  const at::Tensor xp = pack_int8_tile_rows(pieces.view({groups * TILE_ROWS, K}));
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  const float* row_scale = scale.data_ptr<float>();
  const float* x_scales = x_scale.data_ptr<float>();
  float* out = y.data_ptr<float>();
  const Int8TileFinish finish = [&](const int32_t* p, int64_t first_n, int64_t rows, int64_t group) {
    for (int64_t r = 0; r < rows; ++r) {
      const float weight_scale = row_scale[first_n + r] / 127.0f;
      for (int64_t c = 0; c < HALF_GROUP; ++c) {
        const int64_t m = group * HALF_GROUP + c;
        if (m >= M) break;
        const float sum = static_cast<float>(p[r * 16 + c]) + static_cast<float>(p[r * 16 + c + 8]) / 254.0f;
        // a row holding a NaN or an infinity has a non-finite scale and meaningless pieces: its outputs are NaN, as a
        // 16-bit product's would be (never a finite number)
        const float x_scale_m = x_scales[m];
        out[m * N + first_n + r] = std::isfinite(x_scale_m) ? sum * x_scale_m * weight_scale : NAN;
      }
    }
  };
  const int8_t* w = weight.data_ptr<int8_t>();
  const int8_t* packed = xp.data_ptr<int8_t>();
  at::parallel_for(0, (N + TILE_ROWS - 1) / TILE_ROWS, 1, [&](int64_t first_block, int64_t last_block) {
    int8_tile_products(w, K, packed, groups, first_block * TILE_ROWS, std::min(N, last_block * TILE_ROWS), finish);
  });
  return y;
}

}  // namespace quantizer_plugin
