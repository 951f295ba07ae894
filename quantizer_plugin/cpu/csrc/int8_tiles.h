// The AMX-INT8 tile loop both int8 tile kernels share (int8_amx.cpp defines it): weight-only int8 (each activation
// row split into two int8 pieces) and LLM.int8 (llm_int8.cpp: each activation row's int8 codes as they are).
//
// The int8 weight (N, K) is the tiles' A operand as it is stored, 16 rows by 64 bytes per tile; the activations' side
// is any set of int8 "tile rows", packed in groups of 16 as the B operand. What a tile row stands for is the caller's:
// each 16 x 16 int32 product tile is handed to its `finish`, which turns exact sums into outputs.

#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

#include "amx.h"  // TILE_ROWS: weight rows per block, tile rows per packed group

namespace quantizer_plugin {

inline constexpr int64_t INT8_TILE_K = 64;  // bytes of K per tile row: K must be a multiple of it

// rows (R, K) int8, R a multiple of 16, as the tiles' B operand: 1 KB tiles of 16 rows of four consecutive columns
// by 16 tile rows, (K / 64, R / 16, 16, 16, 4).
at::Tensor pack_int8_tile_rows(const at::Tensor& rows);

// tile[r * 16 + c] = weight row first_n + r . tile row c of group `group` (exact int32 sums over all of K), for
// r < rows (a last block may hold fewer than 16 weight rows).
using Int8TileFinish = std::function<void(const int32_t* tile, int64_t first_n, int64_t rows, int64_t group)>;

// Every product tile of weight rows [n_begin, n_end) with the `groups` packed groups, handed to `finish` one at a
// time on the calling thread. Needs AMX-INT8 (has_amx_int8()).
void int8_tile_products(const int8_t* weight, int64_t K, const int8_t* packed_rows, int64_t groups, int64_t n_begin,
                        int64_t n_end, const Int8TileFinish& finish);

}  // namespace quantizer_plugin
