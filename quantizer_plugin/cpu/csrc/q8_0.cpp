// Activations rounded as llama.cpp's q8_0 (the activations mode "q8_0", formats/activations.py): each activation row
// in blocks of 32 columns, each block int8 with one float32 scale, its absmax / 127. The 4-bit and 2-bit kernels of
// that mode (codebook4bit.cpp, affine.cpp) multiply these bytes by the weight's codes in integers (vpmaddubsw), 32
// at a time, and scale each block's integer sum once. The codes are written in the order the kernels read a
// weight's bytes: within each `span` of columns (32, or the columns of 32 weight bytes), the first code of every
// byte, then the second, and so on. Also each block's sum of the rounded activations (its integer sum times its
// scale), which the affine kernels' zero points take off.
//
// The rounding is the reference's, operation for operation: x * (127 / absmax) in float32, rounded half to even,
// so the codes are the reference's exactly. A block holding a NaN or an infinity gets codes 0 and a NaN scale, so
// that every output it reaches is NaN, never a silent number.

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels.h"
#include "simd.h"

namespace quantizer_plugin {

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_q8_0(const at::Tensor& x, int64_t per_byte, int64_t span) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32 (M, K)");
  TORCH_CHECK(per_byte == 1 || per_byte == 2 || per_byte == 4, "per_byte must be 1, 2 or 4, not ", per_byte);
  TORCH_CHECK(span > 0 && span % Q8_BLOCK == 0, "the span must be a multiple of ", Q8_BLOCK, ", not ", span);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % span == 0, "q8_0 activations need K a multiple of the span ", span, ", not ", K);
  at::Tensor codes = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({M, K / Q8_BLOCK}, x.options());
  at::Tensor sums = at::empty({M, K / Q8_BLOCK}, x.options());
  const float* in = x.data_ptr<float>();
  int8_t* out = codes.data_ptr<int8_t>();
  float* d = scales.data_ptr<float>();
  float* total = sums.data_ptr<float>();
  const int64_t planes = span / per_byte;  // a span's codes in the kernels' order: transpose (planes, per_byte)
  at::parallel_for(0, M * (K / Q8_BLOCK), 256, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const float* v = in + b * Q8_BLOCK;
      float absmax = 0.0f;
      bool finite = true;
      for (int i = 0; i < Q8_BLOCK; ++i) {
        absmax = std::max(absmax, std::fabs(v[i]));
        finite = finite && std::isfinite(v[i]);
      }
      const float inverse = 127.0f / std::max(absmax, std::numeric_limits<float>::min());
      d[b] = finite ? absmax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      int32_t code_sum = 0;
      for (int i = 0; i < Q8_BLOCK; ++i) {
        const float rounded = finite ? std::nearbyint(std::min(std::max(v[i] * inverse, -127.0f), 127.0f)) : 0.0f;
        const int64_t flat = b * Q8_BLOCK + i, j = flat % span;  // rows are whole spans (K % span == 0)
        out[flat - j + (j % per_byte) * planes + j / per_byte] = static_cast<int8_t>(rounded);
        code_sum += static_cast<int32_t>(rounded);
      }
      total[b] = static_cast<float>(code_sum) * d[b];
    }
  });
  return {codes, scales, sums};
}

}  // namespace quantizer_plugin
