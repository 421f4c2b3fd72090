// The same product as qgemm_avx2.h (int8 activations per block of 32, integer dot products, the same
// float arithmetic per output), over weights repacked in tiles of 8 outputs, for every batch size.
//
// The row layout of qgemm_avx2.h puts 32 inputs of one output in a vector, so each output ends in a
// horizontal sum and each activation row re-reads the weights' vectors. Here a vector holds 8 outputs
// times 4 inputs: one multiply-add per activation row feeds 8 outputs at once, nothing is summed across
// lanes, and each unpacked weight vector serves a tile of up to 4 activation rows. The loops are in
// tiled_core.inc (layouts there), compiled here for AVX2 and in tiled_vnni.cpp for AVX512-VNNI; the
// latter runs where the CPU has it, unless SHRINK_VNNI=0.

#pragma once

#include "qgemm_avx2.h"

#include <cstdlib>

namespace shrink_kernels {

void tiled_items_vnni(bool eight, const void* as, const int64_t* start, int64_t count, int64_t i0, int64_t i1);
bool tiled_vnni_supported();

namespace {

#define SHRINK_TILED_VNNI 0
#include "tiled_core.inc"
#undef SHRINK_TILED_VNNI

inline bool use_vnni() {
  static const bool yes = [] {
    const char* env = std::getenv("SHRINK_VNNI");
    return tiled_vnni_supported() && !(env && std::string(env) == "0");
  }();
  return yes;
}

// The (row block, tile) pairs of all the products, split across threads together.
inline void tiled_many_impl(bool eight, const TiledArgs* as, int64_t count) {
  std::vector<int64_t> start(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) start[i + 1] = start[i] + as[i].T;
  const int64_t M = as[0].M, row_blocks = (M + TILED_ROW_BLOCK - 1) / TILED_ROW_BLOCK;
  const int64_t grain = std::max<int64_t>(1, 32 / std::min<int64_t>(M, TILED_ROW_BLOCK));
  const bool vnni = use_vnni();
  at::parallel_for(0, row_blocks * start[count], grain, [&](int64_t i0, int64_t i1) {
    if (vnni) tiled_items_vnni(eight, as, start.data(), count, i0, i1);
    else tiled_items_any(eight, as, start.data(), count, i0, i1);
  });
}

// Rows [0, M4) of a row-major [M, width] array of 4-byte items, interleaved by 4 rows: item i of row 4q + r
// goes to (q * width + i) * 4 + r.
template <typename T>
torch::Tensor interleave4(const torch::Tensor& src, int64_t M4, int64_t width) {
  static_assert(sizeof(T) == 4, "4-byte items");
  torch::Tensor dst = torch::empty({M4 * width * 4}, torch::kUInt8);
  const T* in = static_cast<const T*>(src.data_ptr());
  T* out = static_cast<T*>(dst.data_ptr());
  at::parallel_for(0, M4 / 4, 16, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q)
      for (int r = 0; r < 4; ++r)
        for (int64_t i = 0; i < width; ++i) out[(q * width + i) * 4 + r] = in[(q * 4 + r) * width + i];
  });
  return dst;
}

}  // namespace

// A weight in the tiled layout: codes, scales (float16) and zero points (uint8, or empty: zero_const for all),
// as built by tiled.py.
struct TiledWeight {
  torch::Tensor codes, scales, zeros, bias;
  int64_t zero_const, bits, group_size;
};

// x [M, K] (float32, contiguous) times each of several tiled weights of the same kind (8-bit, or 2-4 bits)
// and group size: the activations quantized once, the products in one parallel region. [M, N_i] each.
inline std::vector<torch::Tensor> tiled_many(const torch::Tensor& x, const std::vector<TiledWeight>& ws) {
  TORCH_CHECK(!ws.empty(), "no weights");
  const int64_t group_size = ws[0].group_size;
  const bool eight = ws[0].bits == 8;
  const QuantizedX q = quantize_for(x, group_size);
  const int64_t M = q.M, K = q.K, nb = K / QK, G = q.G, bpg = q.bpg;
  const torch::Tensor &xq = q.xq, &xd = q.xd, &gsum = q.gsum;
  // The first M4 rows interleaved by 4 (see RowTile): a copy of M x K bytes, small beside the product.
  const int64_t M4 = M / 4 * 4;
  torch::Tensor xq4, xd4, gsum4;
  if (M4 > 0) {
    xq4 = interleave4<int32_t>(xq, M4, K / 4);  // 4 codes = one int32
    xd4 = interleave4<float>(xd, M4, nb);
    gsum4 = interleave4<float>(gsum, M4, G);
  }
  std::vector<torch::Tensor> outs;
  std::vector<TiledArgs> as;
  for (const TiledWeight& w : ws) {
    TORCH_CHECK((w.bits == 8) == eight && w.group_size == group_size,
                "products computed together share the kind of codes and the group size");
    TORCH_CHECK(w.bits == 8 || (w.bits >= 2 && w.bits <= 4), "unsupported bit width ", w.bits);
    const int64_t T = w.codes.size(0), N = T * 8;
    TORCH_CHECK(w.codes.is_cpu() && w.codes.scalar_type() == torch::kUInt8 && w.codes.is_contiguous() &&
                    w.codes.dim() == 2 && w.codes.size(1) == nb * (eight ? 256 : 128),
                "tiled codes: contiguous uint8 [outputs/8, K/32 * ", eight ? 256 : 128, "]");
    TORCH_CHECK(w.scales.is_cpu() && w.scales.scalar_type() == torch::kFloat16 && w.scales.is_contiguous() &&
                    w.scales.numel() == T * G * 8,
                "tiled scales: contiguous float16 [outputs/8, groups, 8]");
    const bool has_zeros = w.zeros.numel() > 0;
    if (has_zeros)
      TORCH_CHECK(w.zeros.is_cpu() && w.zeros.scalar_type() == torch::kUInt8 && w.zeros.is_contiguous() &&
                      w.zeros.numel() == T * G * 8,
                  "tiled zero points: contiguous uint8 [outputs/8, groups, 8]");
    const bool has_bias = w.bias.numel() > 0;
    if (has_bias)
      TORCH_CHECK(w.bias.scalar_type() == torch::kFloat32 && w.bias.numel() == N && w.bias.is_contiguous(), "bias");
    outs.push_back(torch::empty({M, N}, torch::kFloat32));
    as.push_back(TiledArgs{w.codes.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(w.scales.data_ptr<at::Half>()),
                           has_zeros ? w.zeros.data_ptr<uint8_t>() : nullptr, static_cast<float>(w.zero_const),
                           has_bias ? w.bias.data_ptr<float>() : nullptr, outs.back().data_ptr<float>(), M, N, K, G,
                           bpg, T, xq.data_ptr<int8_t>(), M4 ? static_cast<int8_t*>(xq4.data_ptr()) : nullptr,
                           xd.data_ptr<float>(),
                           M4 ? static_cast<float*>(xd4.data_ptr()) : nullptr, gsum.data_ptr<float>(),
                           M4 ? static_cast<float*>(gsum4.data_ptr()) : nullptr});
  }
  if (M > 0) {
    tiled_many_impl(eight, as.data(), static_cast<int64_t>(as.size()));
  }
  return outs;
}

// x [..., K] float32 times one tiled weight, plus its bias: [..., N] float32. (Leading dimensions are
// flattened here rather than by the caller: in Python each reshape costs about a microsecond.)
inline torch::Tensor tiled_qlinear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                                   int64_t zero_const, torch::Tensor bias, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32, "x: float32 [..., in_features]");
  const int64_t K = x.size(-1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = codes.size(0) * 8;
  const torch::Tensor y = tiled_many(x.reshape({-1, K}).contiguous(),
                                     {TiledWeight{codes, scales, zeros, bias, zero_const, bits, group_size}})[0];
  return y.view(shape);
}

}  // namespace shrink_kernels
