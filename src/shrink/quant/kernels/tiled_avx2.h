// The same product as qgemm_avx2.h (int8 activations per block of 32, integer dot products, the same
// float arithmetic per output), over weights repacked in tiles of 8 outputs, for every batch size.
//
// The row layout of qgemm_avx2.h puts 32 inputs of one output in a vector, so each output ends in a
// horizontal sum and each activation row re-reads the weights' vectors. Here a vector holds 8 outputs
// times a few inputs: one multiply-add per activation row feeds 8 outputs at once, nothing is summed
// across lanes, and each unpacked weight vector serves a tile of up to 4 activation rows.
//
// Tiled layouts (built by shrink/quant/kernels/tiled.py), per tile of 8 outputs and block of 32 inputs:
//   codes of 2-4 bits: 128 bytes, [step 0..3][output 0..7][input 0..3] with byte = input 8s+i (low nibble)
//                      and input 8s+4+i (high nibble); codes unsigned 0..15. vpmaddubsw pairs sum to at most
//                      2 * 15 * 127 and 8 of them to 30480, so a block's 16-bit sums never overflow.
//   codes of 8 bits:   256 bytes, [step 0..15][output 0..7][input 0..1] as signed bytes (code - 128), taken
//                      to 16 bits and multiplied by 16-bit activations with vpmaddwd (exact in 32 bits).
//   scales [tiles, groups, 8] float32, and scale * (zero - shift) [tiles, groups, 8] float32, where shift
//   is 128 for 8-bit codes (made signed) and 0 otherwise.
// A row's result never depends on which rows come with it: every row runs the same instructions.

#pragma once

#include "qgemm_avx2.h"

namespace shrink_kernels {
namespace {

struct TiledArgs {
  const uint8_t* codes;  // [T, nb, 128 or 256]
  const float* s;        // [T, G, 8]
  const float* sz;       // [T, G, 8]
  const float* bias;     // [N] or nullptr
  const int8_t* xq;      // [M, K]
  const int16_t* x16;    // [M, K] (8-bit codes only)
  const float* xd;       // [M, nb]
  const float* gsum;     // [M, G]
  float* out;            // [M, N]
  int64_t M, N, K, G, bpg, T;
};

// The 8 integer dot products (one per output of the tile) of block b with row r's activations.
template <int BITS, int R>
__attribute__((always_inline)) inline void block_dots(const TiledArgs& a, const uint8_t* wb, int64_t b, int64_t r0, __m256i (&dot)[R]) {
  if constexpr (BITS == 8) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
#pragma GCC unroll 16
    for (int s = 0; s < 16; ++s) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * s)));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a.x16 + (r0 + r) * a.K + b * QK + 2 * s, 4);
        dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
      }
    }
  } else {
    const __m256i lo = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i sums[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * s));
      const __m256i w0 = _mm256_and_si256(packed, lo), w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), lo);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int8_t* x = a.xq + (r0 + r) * a.K + b * QK + 8 * s;
        int32_t v0, v1;
        std::memcpy(&v0, x, 4);
        std::memcpy(&v1, x + 4, 4);
        sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(w0, _mm256_set1_epi32(v0)));
        sums[r] = _mm256_add_epi16(sums[r], _mm256_maddubs_epi16(w1, _mm256_set1_epi32(v1)));
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) dot[r] = _mm256_madd_epi16(sums[r], ones);
  }
}

// Outputs 8t..8t+7 of activation rows r0..r0+R: per group, the blocks' integer dot products times their
// activation scales, summed, times the weight scale (one FMA with both scales when a group is one block),
// less the zero-point term s_g (z_g - shift) gsum_g; then the bias.
template <int BITS, int R, bool ONE_BLOCK_GROUPS>
inline void tiled_tile(const TiledArgs& a, int64_t t, int64_t r0) {
  const int64_t nb = a.K / QK, G = a.G, bpg = ONE_BLOCK_GROUPS ? 1 : a.bpg;
  constexpr int64_t BB = BITS == 8 ? 256 : 128;
  const uint8_t* wt = a.codes + t * nb * BB;
  const float* st = a.s + t * G * 8;
  const float* szt = a.sz + t * G * 8;
  const float* xd[R];
  const float* gs[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    xd[r] = a.xd + (r0 + r) * nb;
    gs[r] = a.gsum + (r0 + r) * G;
  }
  __m256 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256i dot[R];
  for (int64_t g = 0, b = 0; g < G; ++g) {
    const __m256 s = _mm256_loadu_ps(st + g * 8), sz = _mm256_loadu_ps(szt + g * 8);
    if constexpr (ONE_BLOCK_GROUPS) {
      block_dots<BITS, R>(a, wt + b * BB, b, r0, dot);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_mul_ps(_mm256_broadcast_ss(xd[r] + b), s), acc[r]);
      ++b;
    } else {
      __m256 accg[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) accg[r] = _mm256_setzero_ps();
      for (const int64_t e = b + bpg; b < e; ++b) {
        block_dots<BITS, R>(a, wt + b * BB, b, r0, dot);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          accg[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_broadcast_ss(xd[r] + b), accg[r]);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(accg[r], s, acc[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fnmadd_ps(sz, _mm256_broadcast_ss(gs[r] + g), acc[r]);
  }
  const __m256 bias = a.bias ? _mm256_loadu_ps(a.bias + 8 * t) : _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(a.out + (r0 + r) * a.N + 8 * t, _mm256_add_ps(acc[r], bias));
}

template <int BITS, bool ONE_BLOCK_GROUPS>
inline void tiled_rows(const TiledArgs& a, int64_t t, int64_t r, int64_t end) {
  for (; r + 4 <= end; r += 4) tiled_tile<BITS, 4, ONE_BLOCK_GROUPS>(a, t, r);
  for (; r < end; ++r) tiled_tile<BITS, 1, ONE_BLOCK_GROUPS>(a, t, r);
}

// Rows are taken in blocks of 64 (their activations stay in cache while every tile of outputs passes
// over them) and the (row block, tile) pairs of all the products are split across threads together.
constexpr int64_t ROW_BLOCK = 64;

template <int BITS>
void tiled_many_impl(const TiledArgs* as, int64_t count) {
  std::vector<int64_t> start(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) start[i + 1] = start[i] + as[i].T;
  const int64_t tiles = start[count], M = as[0].M, row_blocks = (M + ROW_BLOCK - 1) / ROW_BLOCK;
  const int64_t grain = std::max<int64_t>(1, 32 / std::min<int64_t>(M, ROW_BLOCK));
  at::parallel_for(0, row_blocks * tiles, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t rb = i / tiles, tg = i % tiles;
      int64_t p = 0;
      while (tg >= start[p + 1]) ++p;
      const TiledArgs& a = as[p];
      const int64_t t = tg - start[p], end = std::min(M, (rb + 1) * ROW_BLOCK);
      if (a.bpg == 1) tiled_rows<BITS, true>(a, t, rb * ROW_BLOCK, end);
      else tiled_rows<BITS, false>(a, t, rb * ROW_BLOCK, end);
    }
  });
}

}  // namespace

// A weight in the tiled layout: codes, scales and scale x (zero - shift) as built by tiled.py.
struct TiledWeight {
  torch::Tensor codes, scales, szero, bias;
  int64_t bits, group_size;
};

// x [M, K] (float32, contiguous) times each of several tiled weights of the same kind (8-bit, or 2-4 bits)
// and group size: the activations quantized once, the products in one parallel region. [M, N_i] each.
inline std::vector<torch::Tensor> tiled_many(const torch::Tensor& x, const std::vector<TiledWeight>& ws) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.is_cpu(),
              "x: 2-D contiguous float32 on the CPU");
  TORCH_CHECK(!ws.empty(), "no weights");
  const int64_t M = x.size(0), K = x.size(1), group_size = ws[0].group_size;
  const bool eight = ws[0].bits == 8;
  TORCH_CHECK(K % QK == 0 && group_size % QK == 0 && K % group_size == 0, "K and group size must be multiples of 32");
  const int64_t nb = K / QK, G = K / group_size, bpg = group_size / QK;
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xd = torch::empty({M, nb}, torch::kFloat32);
  auto gsum = torch::empty({M, G}, torch::kFloat32);
  quantize_activations(x.data_ptr<float>(), M, K, bpg, xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
                       gsum.data_ptr<float>());
  const torch::Tensor x16 = eight ? xq.to(torch::kInt16) : torch::Tensor();
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
    for (const torch::Tensor* t : {&w.scales, &w.szero})
      TORCH_CHECK(t->is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == T * G * 8,
                  "tiled scales: contiguous float32 [outputs/8, groups, 8]");
    const bool has_bias = w.bias.numel() > 0;
    if (has_bias)
      TORCH_CHECK(w.bias.scalar_type() == torch::kFloat32 && w.bias.numel() == N && w.bias.is_contiguous(), "bias");
    outs.push_back(torch::empty({M, N}, torch::kFloat32));
    as.push_back(TiledArgs{w.codes.data_ptr<uint8_t>(), w.scales.data_ptr<float>(), w.szero.data_ptr<float>(),
                           has_bias ? w.bias.data_ptr<float>() : nullptr, xq.data_ptr<int8_t>(),
                           eight ? x16.data_ptr<int16_t>() : nullptr, xd.data_ptr<float>(), gsum.data_ptr<float>(),
                           outs.back().data_ptr<float>(), M, N, K, G, bpg, T});
  }
  if (M > 0) {
    if (eight) tiled_many_impl<8>(as.data(), static_cast<int64_t>(as.size()));
    else tiled_many_impl<4>(as.data(), static_cast<int64_t>(as.size()));
  }
  return outs;
}

// x [..., K] float32 times one tiled weight, plus its bias: [..., N] float32. (Leading dimensions are
// flattened here rather than by the caller: in Python each reshape costs about a microsecond.)
inline torch::Tensor tiled_qlinear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor szero,
                                   torch::Tensor bias, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32, "x: float32 [..., in_features]");
  const int64_t K = x.size(-1);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = codes.size(0) * 8;
  const torch::Tensor y = tiled_many(x.reshape({-1, K}).contiguous(),
                                     {TiledWeight{codes, scales, szero, bias, bits, group_size}})[0];
  return y.view(shape);
}

}  // namespace shrink_kernels
