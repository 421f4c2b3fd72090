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

// Activations of a tile of R rows, interleaved so that one pointer reaches all R rows (no register per
// row): the quantized codes of block b, inputs 4j..4j+3 of row r at xq + (b * 8 + j) * 4R + 4r (for 8-bit
// codes, 16-bit pairs: inputs 2j, 2j+1 at x16 + (b * 16 + j) * 2R + 2r), the block scale at xd + b * R + r,
// the group sum at gsum + g * R + r. With R = 1 this is the activations' own row-major layout.
struct RowTile {
  const int8_t* xq;
  const int16_t* x16;
  const float* xd;
  const float* gsum;
};

struct TiledArgs {
  const uint8_t* codes;  // [T, nb, 128 or 256]
  const float* s;        // [T, G, 8]
  const float* sz;       // [T, G, 8]
  const float* bias;     // [N] or nullptr
  float* out;            // [M, N]
  int64_t M, N, K, G, bpg, T;
  // The activations, row by row ([M, K], [M, K], [M, nb], [M, G]) and, for the first M4 = M / 4 * 4 rows,
  // interleaved by 4 (the same sizes).
  const int8_t *xq, *xq4;
  const int16_t *x16, *x164;
  const float *xd, *xd4, *gsum, *gsum4;

  template <int R>
  RowTile rows(int64_t r0) const {
    const int64_t nb = K / QK;
    if constexpr (R == 4)
      return {xq4 + r0 * K, x164 ? x164 + r0 * K : nullptr, xd4 + r0 * nb, gsum4 + r0 * G};
    else
      return {xq + r0 * K, x16 ? x16 + r0 * K : nullptr, xd + r0 * nb, gsum + r0 * G};
  }
};

// The 8 integer dot products (one per output of the tile) of block b with each of the R rows.
template <int BITS, int R>
__attribute__((always_inline)) inline void block_dots(const uint8_t* wb, const RowTile& x, int64_t b,
                                                      __m256i (&dot)[R]) {
  if constexpr (BITS == 8) {
    const int16_t* xb = x.x16 + b * 32 * R;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * j)));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, xb + (j * R + r) * 2, 4);
        dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
      }
    }
  } else {
    const int8_t* xb = x.xq + b * 32 * R;
    const __m256i lo = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i sums[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sums[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 32 * j));
      const __m256i w0 = _mm256_and_si256(packed, lo), w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), lo);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        int32_t v0, v1;  // inputs 8j..8j+3 and 8j+4..8j+7 of row r
        std::memcpy(&v0, xb + ((2 * j) * R + r) * 4, 4);
        std::memcpy(&v1, xb + ((2 * j + 1) * R + r) * 4, 4);
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
  const RowTile x = a.rows<R>(r0);
  __m256 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  __m256i dot[R];
  for (int64_t g = 0, b = 0; g < G; ++g) {
    const __m256 s = _mm256_loadu_ps(st + g * 8), sz = _mm256_loadu_ps(szt + g * 8);
    if constexpr (ONE_BLOCK_GROUPS) {
      block_dots<BITS, R>(wt + b * BB, x, b, dot);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_mul_ps(_mm256_broadcast_ss(x.xd + b * R + r), s),
                                 acc[r]);
      ++b;
    } else {
      __m256 accg[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) accg[r] = _mm256_setzero_ps();
      for (const int64_t e = b + bpg; b < e; ++b) {
        block_dots<BITS, R>(wt + b * BB, x, b, dot);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          accg[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_broadcast_ss(x.xd + b * R + r), accg[r]);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(accg[r], s, acc[r]);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fnmadd_ps(sz, _mm256_broadcast_ss(x.gsum + g * R + r), acc[r]);
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
  // The first M4 rows interleaved by 4 (see RowTile): a copy of M x K bytes, small beside the product.
  const int64_t M4 = M / 4 * 4;
  torch::Tensor xq4, x164, xd4, gsum4;
  if (M4 > 0) {
    xq4 = interleave4<int32_t>(xq, M4, K / 4);  // 4 codes = one int32
    xd4 = interleave4<float>(xd, M4, nb);
    gsum4 = interleave4<float>(gsum, M4, G);
    if (eight) x164 = interleave4<int32_t>(x16, M4, K / 2);  // 2 16-bit codes = one int32
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
    for (const torch::Tensor* t : {&w.scales, &w.szero})
      TORCH_CHECK(t->is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == T * G * 8,
                  "tiled scales: contiguous float32 [outputs/8, groups, 8]");
    const bool has_bias = w.bias.numel() > 0;
    if (has_bias)
      TORCH_CHECK(w.bias.scalar_type() == torch::kFloat32 && w.bias.numel() == N && w.bias.is_contiguous(), "bias");
    outs.push_back(torch::empty({M, N}, torch::kFloat32));
    as.push_back(TiledArgs{w.codes.data_ptr<uint8_t>(), w.scales.data_ptr<float>(), w.szero.data_ptr<float>(),
                           has_bias ? w.bias.data_ptr<float>() : nullptr, outs.back().data_ptr<float>(), M, N, K, G,
                           bpg, T, xq.data_ptr<int8_t>(), M4 ? static_cast<int8_t*>(xq4.data_ptr()) : nullptr,
                           eight ? x16.data_ptr<int16_t>() : nullptr,
                           eight && M4 ? static_cast<int16_t*>(x164.data_ptr()) : nullptr, xd.data_ptr<float>(),
                           M4 ? static_cast<float*>(xd4.data_ptr()) : nullptr, gsum.data_ptr<float>(),
                           M4 ? static_cast<float*>(gsum4.data_ptr()) : nullptr});
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
