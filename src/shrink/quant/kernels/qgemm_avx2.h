// Low-bit weight x int8 activation matrix multiply for x86-64 with AVX2, FMA and F16C.
//
// Weights are stored packed in blocks of 32 along the input dimension (see shrink/quant/packing.py):
//   8 bits: 32 bytes, one unsigned code per byte
//   4 bits: 16 bytes, byte j holds codes j (low nibble) and j+16 (high nibble)
//   3 bits: 8 bytes of low two bits (as 2 bits) followed by 4 bytes holding bit 2 of code i at bit i
//   2 bits: 8 bytes, byte j holds codes j, j+8, j+16, j+24 at bits 0, 2, 4, 6
// A weight is scale[g] * (code - zero[g]) for its group g; scales are fp16, zeros uint8 (or a constant
// for symmetric formats).
//
// Activations are quantized on the fly to int8 per block of 32 (scale = max|x| / 127), the way
// llama.cpp's Q8_0 does, so each block's dot product is an integer dot product:
//   y = sum_g s_g * sum_{b in g} d_b * (sum_j code_j * xq_j  -  zero_g * sum_j xq_j).
// The Python reference in shrink/quant/kernels/reference.py computes exactly this, for the tests.

#pragma once

#include "block.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace shrink_kernels {
namespace {

constexpr int64_t MAX_GROUPS = 1024;  // groups per row the kernel takes (K up to 32768 at g32)
#ifndef PF_TILES
#define PF_TILES 2  // prefetch distance in tiles of rows (measured best of 1, 2, 3 at batch 1)
#endif

inline int block_bytes(int bits) { return static_cast<int>(QK) * bits / 8; }

// Unpack one block of 32 codes into 32 unsigned bytes.
template <int BITS>
inline __m256i unpack_block(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {
    // Both halves hold the 16 bytes; keep the low nibbles in the low half, the high in the high half.
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i both = _mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
  } else if constexpr (BITS == 2) {
    int64_t w;
    std::memcpy(&w, p, 8);
    const __m256i v = _mm256_set1_epi64x(w);
    const __m256i sh = _mm256_srlv_epi64(v, _mm256_set_epi64x(6, 4, 2, 0));
    return _mm256_and_si256(sh, _mm256_set1_epi8(0x03));
  } else {  // BITS == 3
    const __m256i low = unpack_block<2>(p);
    uint32_t hb;
    std::memcpy(&hb, p + 8, 4);
    // Spread bit i of hb to byte i: replicate byte i/8 into byte i, then test bit i%8.
    const __m256i rep = _mm256_shuffle_epi8(
        _mm256_set1_epi32(static_cast<int32_t>(hb)),
        _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0));
    const __m256i sel = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i bit = _mm256_cmpeq_epi8(_mm256_and_si256(rep, sel), sel);
    return _mm256_or_si256(low, _mm256_and_si256(bit, _mm256_set1_epi8(0x04)));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Integer dot product of 32 weight codes with 32 int8 activations, as 8 int32 lanes.
// For 8-bit weights the codes are made signed (code - 128) and the sign trick keeps
// maddubs from saturating: |w| * sign(x, w).
template <int BITS>
inline __m256i dot_block(__m256i w, __m256i w_abs, __m256i x, __m256i ones16) {
  __m256i p;
  if constexpr (BITS == 8) {
    p = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(x, w));
  } else {
    p = _mm256_maddubs_epi16(w, x);
  }
  return _mm256_madd_epi16(p, ones16);
}

struct Args {
  const uint8_t* qweight;   // [N, nb * block_bytes]
  const uint16_t* scales;   // [N, G] fp16 bits
  const uint8_t* zeros;     // [N, G] or nullptr
  int zero_const;           // zero used when zeros == nullptr
  const int8_t* xq;         // [M, K]
  const float* xd;          // [M, nb]
  const float* gsum;        // [M, G]: sum over blocks of the group of d_b * sum(xq in block)
  const float* bias;        // [N] or nullptr
  float* out;               // [M, N]
  int64_t M, N, K, G, bpg;  // bpg: blocks per group
};

// sum_g s[g] * zc * gsum[g] for one weight row and one activation row: the zero-point term of a layer with
// one zero point (per-group zero points of -asym layers are summed in the tile itself).
inline float zero_term(const uint16_t* s, int zc, const float* gsum, int64_t G) {
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8)
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + g))),
                          _mm256_loadu_ps(gsum + g), acc);
  float t = hsum(acc) * static_cast<float>(zc);
  for (; g < G; ++g) t += _cvtsh_ss(s[g]) * static_cast<float>(zc) * gsum[g];
  return t;
}

// RN output rows (n0..n0+RN) for NC activation rows (m0..m0+NC). Within a group the integer dot
// products are scaled by the activation block scale and summed; the weight scale is applied once
// per group. RN * NC independent accumulator chains hide the FMA latency; each unpacked weight block
// serves NC activation rows and each activation block RN weight rows.
template <int BITS, int RN, int NC>
inline void tile(const Args& a, int64_t n0, int64_t m0) {
  const int64_t nb = a.K / QK;
  const int bb = block_bytes(BITS);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const uint8_t* wrow[RN];
  const uint16_t* srow[RN];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r) {
    wrow[r] = a.qweight + (n0 + r) * nb * bb;
    srow[r] = a.scales + (n0 + r) * a.G;
  }
  const int8_t* xrow[NC];
  const float* drow[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) {
    xrow[c] = a.xq + (m0 + c) * a.K;
    drow[c] = a.xd + (m0 + c) * nb;
  }
  // The rows' scales in fp32, converted 8 at a time, so the inner loop broadcasts them from memory.
  alignas(32) float sbuf[RN][MAX_GROUPS + 8];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r) {
    int64_t g = 0;
    for (; g + 8 <= a.G; g += 8)
      _mm256_store_ps(&sbuf[r][g], _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(srow[r] + g))));
    for (; g < a.G; ++g) sbuf[r][g] = _cvtsh_ss(srow[r][g]);
  }
  __m256 acc[RN][NC];
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm256_setzero_ps();
  // For block b: the integer dot product of each of the RN weight rows with each of the NC activation
  // rows, as floats, handed to `use(r, c, t, d)` with d the activation block scale.
  auto block_dots = [&](int64_t b, auto&& use) {
    __m256i w[RN], w_abs[RN];
#pragma GCC unroll 8
    for (int r = 0; r < RN; ++r) {
      // Fetch the same block of rows a few tiles ahead: the hardware prefetcher alone leaves DRAM
      // bandwidth idle at batch 1 (measured: about 1.3x slower without this).
      _mm_prefetch(reinterpret_cast<const char*>(wrow[r] + (PF_TILES * RN * nb + b) * bb), _MM_HINT_T0);
      w[r] = unpack_block<BITS>(wrow[r] + b * bb);
      if constexpr (BITS == 8) {
        w[r] = _mm256_xor_si256(w[r], _mm256_set1_epi8(static_cast<char>(0x80)));  // code - 128, signed
        w_abs[r] = _mm256_abs_epi8(w[r]);
      } else {
        w_abs[r] = w[r];
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow[c] + b * QK));
      const __m256 d = _mm256_broadcast_ss(drow[c] + b);
#pragma GCC unroll 8
      for (int r = 0; r < RN; ++r) use(r, c, _mm256_cvtepi32_ps(dot_block<BITS>(w[r], w_abs[r], x, ones16)), d);
    }
  };
  if (a.bpg == 1) {
    // One block per group: apply both scales at once.
    for (int64_t b = 0; b < nb; ++b) {
      block_dots(b, [&](int r, int c, __m256 t, __m256 d) {
        acc[r][c] = _mm256_fmadd_ps(t, _mm256_mul_ps(d, _mm256_broadcast_ss(&sbuf[r][b])), acc[r][c]);
      });
    }
  } else {
    // Within a group, scale each block's integer dot product by its activation scale and sum;
    // apply the weight scale once per group.
    int64_t b = 0;
    for (int64_t g = 0; g < a.G; ++g) {
      __m256 accg[RN][NC];
#pragma GCC unroll 8
      for (int r = 0; r < RN; ++r)
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) accg[r][c] = _mm256_setzero_ps();
      for (const int64_t e = b + a.bpg; b < e; ++b) {
        block_dots(b, [&](int r, int c, __m256 t, __m256 d) { accg[r][c] = _mm256_fmadd_ps(t, d, accg[r][c]); });
      }
#pragma GCC unroll 8
      for (int r = 0; r < RN; ++r) {
        const __m256 sv = _mm256_broadcast_ss(&sbuf[r][g]);
#pragma GCC unroll 8
        for (int c = 0; c < NC; ++c) acc[r][c] = _mm256_fmadd_ps(accg[r][c], sv, acc[r][c]);
      }
    }
  }
  // 8-bit codes were made signed (code - 128) in the dot product, so their zero moves with them.
  const int shift = BITS == 8 ? 128 : 0;
#pragma GCC unroll 8
  for (int r = 0; r < RN; ++r) {
    const uint8_t* zrow = a.zeros ? a.zeros + (n0 + r) * a.G : nullptr;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      float y = hsum(acc[r][c]);
      if (zrow) {
        float t = 0.f;
        for (int64_t g = 0; g < a.G; ++g)
          t += _cvtsh_ss(srow[r][g]) * static_cast<float>(zrow[g] - shift) * a.gsum[(m0 + c) * a.G + g];
        y -= t;
      } else if (a.zero_const != shift) {
        y -= zero_term(srow[r], a.zero_const - shift, a.gsum + (m0 + c) * a.G, a.G);
      }
      if (a.bias) y += a.bias[n0 + r];
      a.out[(m0 + c) * a.N + n0 + r] = y;
    }
  }
}

template <int BITS, int RN>
inline void rows(const Args& a, int64_t n) {
  int64_t m = 0;
  if constexpr (RN == 1) {
    for (; m + 4 <= a.M; m += 4) tile<BITS, RN, 4>(a, n, m);
  }
  for (; m + 2 <= a.M; m += 2) tile<BITS, RN, 2>(a, n, m);
  for (; m < a.M; ++m) tile<BITS, RN, 1>(a, n, m);
}

// Weight rows [4 * q0, 4 * q1) of one product: in tiles of 4 rows at small batches, else row by row
// over tiles of activation rows.
template <int BITS>
void quads(const Args& a, int64_t q0, int64_t q1) {
  const int64_t n_end = std::min(a.N, q1 * 4);
  int64_t n = q0 * 4;
  if (a.M >= 4) {
    for (; n < n_end; ++n) rows<BITS, 1>(a, n);
  } else {
    for (; n + 4 <= n_end; n += 4) rows<BITS, 4>(a, n);
  }
  for (; n < n_end; ++n) rows<BITS, 1>(a, n);
}

// Several products of the same activations (say q, k and v) in one parallel region: the weight rows of
// all of them, in quads, split across threads, so a step waits for its threads once, not once a product.
template <int BITS>
void gemm_many(const Args* as, int64_t count) {
  std::vector<int64_t> start(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) start[i + 1] = start[i] + (as[i].N + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, 16 / std::max<int64_t>(1, as[0].M));
  at::parallel_for(0, start[count], grain, [&](int64_t q0, int64_t q1) {
    for (int64_t i = 0; i < count; ++i) {
      const int64_t lo = std::max(q0, start[i]), hi = std::min(q1, start[i + 1]);
      if (lo < hi) quads<BITS>(as[i], lo - start[i], hi - start[i]);
    }
  });
}

// Quantize activations [M, K] to int8 per block of 32; also the per-group sums used for zero points.
void quantize_activations(const float* x, int64_t M, int64_t K, int64_t bpg, int8_t* xq, float* xd,
                          float* gsum) {
  const int64_t nb = K / QK;
  const int64_t G = nb / bpg;
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    const __m256 sign_mask = _mm256_set1_ps(-0.0f);
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t g = 0; g < G; ++g) {
        float gs = 0.f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          const float* p = x + m * K + b * QK;
          __m256 v[4];
          __m256 mx = _mm256_setzero_ps();
          for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(p + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign_mask, v[i]));
          }
          __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
          h = _mm_max_ps(h, _mm_movehl_ps(h, h));
          h = _mm_max_ss(h, _mm_movehdup_ps(h));
          const float amax = _mm_cvtss_f32(h);
          const float d = amax / 127.f;
          const float id = d != 0.f ? 1.f / d : 0.f;
          xd[m * nb + b] = d;
          const __m256 mul = _mm256_set1_ps(id);
          __m256i q[4];
          for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], mul));  // round half even
          // Block sum of the codes, exact in int32.
          __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
          __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
          s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
          s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
          gs += d * static_cast<float>(_mm_cvtsi128_si32(s4));
          // Pack int32 -> int8 in element order (packs interleave 128-bit lanes, so fix with a permute).
          const __m256i p01 = _mm256_packs_epi32(q[0], q[1]);
          const __m256i p23 = _mm256_packs_epi32(q[2], q[3]);
          const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23),
                                                             _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * QK), packed);
        }
        gsum[m * G + g] = gs;
      }
    }
  });
}

}  // namespace

// x [M, K] as every product takes it: int8 codes per block of 32, the blocks' scales, and per group the sum
// of scale x code sum that the zero-point term needs; with the checks every product makes of x and the
// group size. Quantized once for all the products of one input.
struct QuantizedX {
  torch::Tensor xq, xd, gsum;  // [M, K] int8, [M, K/32] float32, [M, G] float32
  int64_t M, K, G, bpg;        // bpg: blocks per group
};

inline QuantizedX quantize_for(const torch::Tensor& x, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.is_cpu(),
              "x: 2-D contiguous float32 on the CPU");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0 && group_size % QK == 0 && K % group_size == 0, "K and group size must be multiples of 32");
  const int64_t G = K / group_size, bpg = group_size / QK;
  QuantizedX q{torch::empty({M, K}, torch::kInt8), torch::empty({M, K / QK}, torch::kFloat32),
               torch::empty({M, G}, torch::kFloat32), M, K, G, bpg};
  quantize_activations(x.data_ptr<float>(), M, K, bpg, q.xq.data_ptr<int8_t>(), q.xd.data_ptr<float>(),
                       q.gsum.data_ptr<float>());
  return q;
}

// A packed weight as the kernel takes it: qweight [N, K/32*bits*4] uint8; scales [N, G] float16;
// zeros [N, G] uint8 or empty; bias [N] float32 or empty.
struct PackedWeight {
  torch::Tensor qweight, scales, zeros, bias;
  int64_t zero_const, bits, group_size;
};

// x [M, K] (float32, contiguous) times each of several packed weights of the same bit width and group
// size: the activations quantized once, the products computed in one parallel region. [M, N_i] each.
inline std::vector<torch::Tensor> qlinear_many(const torch::Tensor& x, const std::vector<PackedWeight>& ws) {
  TORCH_CHECK(!ws.empty(), "no weights");
  const int64_t bits = ws[0].bits, group_size = ws[0].group_size;
  const QuantizedX q = quantize_for(x, group_size);
  const int64_t M = q.M, K = q.K, G = q.G, bpg = q.bpg;
  TORCH_CHECK(G <= MAX_GROUPS, "at most ", MAX_GROUPS, " groups per row");
  const torch::Tensor &xq = q.xq, &xd = q.xd, &gsum = q.gsum;
  std::vector<torch::Tensor> outs;
  std::vector<Args> as;
  for (const PackedWeight& w : ws) {
    TORCH_CHECK(w.bits == bits && w.group_size == group_size, "products computed together share bits and group size");
    TORCH_CHECK(x.is_cpu() && w.qweight.is_cpu() && w.scales.is_cpu(), "the AVX2 kernel runs on CPU tensors only");
    TORCH_CHECK(w.qweight.scalar_type() == torch::kUInt8 && w.qweight.is_contiguous(), "qweight: contiguous uint8");
    TORCH_CHECK(w.scales.scalar_type() == torch::kFloat16 && w.scales.is_contiguous(), "scales: contiguous float16");
    const int64_t N = w.qweight.size(0);
    TORCH_CHECK(w.qweight.size(1) == K / QK * block_bytes(static_cast<int>(bits)), "qweight has the wrong width");
    TORCH_CHECK(w.scales.size(0) == N && w.scales.size(1) == G, "scales shape");
    const bool has_zeros = w.zeros.numel() > 0, has_bias = w.bias.numel() > 0;
    if (has_zeros)
      TORCH_CHECK(w.zeros.scalar_type() == torch::kUInt8 && w.zeros.sizes() == w.scales.sizes() && w.zeros.is_contiguous(), "zeros");
    if (has_bias)
      TORCH_CHECK(w.bias.scalar_type() == torch::kFloat32 && w.bias.numel() == N && w.bias.is_contiguous(), "bias");
    outs.push_back(torch::empty({M, N}, torch::kFloat32));
    as.push_back(Args{w.qweight.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(w.scales.data_ptr<at::Half>()),
                      has_zeros ? w.zeros.data_ptr<uint8_t>() : nullptr, static_cast<int>(w.zero_const),
                      xq.data_ptr<int8_t>(), xd.data_ptr<float>(), gsum.data_ptr<float>(),
                      has_bias ? w.bias.data_ptr<float>() : nullptr, outs.back().data_ptr<float>(), M, N, K, G, bpg});
  }
  const int64_t n = static_cast<int64_t>(as.size());
  switch (bits) {
    case 8: gemm_many<8>(as.data(), n); break;
    case 4: gemm_many<4>(as.data(), n); break;
    case 3: gemm_many<3>(as.data(), n); break;
    case 2: gemm_many<2>(as.data(), n); break;
    default: TORCH_CHECK(false, "unsupported bit width ", bits);
  }
  return outs;
}

// x: [M, K] float32 contiguous times one packed weight, plus its bias. Returns [M, N] float32.
inline torch::Tensor qlinear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                             int64_t zero_const, torch::Tensor bias, int64_t bits, int64_t group_size) {
  return qlinear_many(x, {PackedWeight{qweight, scales, zeros, bias, zero_const, bits, group_size}})[0];
}

// Dequantize packed weights to float32 [N, K]: for large batches, where a float GEMM on the
// dequantized weight beats integer dot products, this keeps the extra cost to one pass over the weights.
inline torch::Tensor dequantize(torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros, int64_t zero_const,
                         int64_t bits, int64_t group_size, int64_t K) {
  TORCH_CHECK(qweight.is_cpu() && scales.is_cpu(), "the AVX2 kernel runs on CPU tensors only");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(), "qweight: contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales: contiguous float16");
  TORCH_CHECK(K % QK == 0 && group_size % QK == 0 && K % group_size == 0, "K and group size must be multiples of 32");
  const int64_t N = qweight.size(0), G = K / group_size, nb = K / QK, bpg = group_size / QK;
  const int bb = block_bytes(static_cast<int>(bits));
  TORCH_CHECK(qweight.size(1) == nb * bb, "qweight has the wrong width");
  const bool has_zeros = zeros.numel() > 0;
  auto out = torch::empty({N, K}, torch::kFloat32);
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const uint16_t* sc = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint8_t* zp = has_zeros ? zeros.data_ptr<uint8_t>() : nullptr;
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t g = b / bpg;
        const float s = _cvtsh_ss(sc[n * G + g]);
        const float z = static_cast<float>(zp ? zp[n * G + g] : zero_const);
        __m256i w;
        const uint8_t* p = qw + (n * nb + b) * bb;
        switch (bits) {
          case 8: w = unpack_block<8>(p); break;
          case 4: w = unpack_block<4>(p); break;
          case 3: w = unpack_block<3>(p); break;
          default: w = unpack_block<2>(p); break;
        }
        const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
        float* dst = o + n * K + b * QK;
        const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int i = 0; i < 4; ++i) {
          const __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i]));
          _mm256_storeu_ps(dst + 8 * i, _mm256_mul_ps(_mm256_sub_ps(f, zv), sv));  // as the reference rounds
        }
      }
    }
  });
  return out;
}

// Expose the activation quantizer so the tests can check it against the Python reference.
inline std::vector<torch::Tensor> quantize_x(torch::Tensor x, int64_t group_size) {
  const QuantizedX q = quantize_for(x, group_size);
  return {q.xq, q.xd, q.gsum};
}

}  // namespace shrink_kernels
