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

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int QK = 32;  // elements per packed block and per activation block

inline int block_bytes(int bits) { return QK * bits / 8; }

// Unpack one block of 32 codes into 32 unsigned bytes.
template <int BITS>
inline __m256i unpack_block(const uint8_t* p) {
  if constexpr (BITS == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  } else if constexpr (BITS == 4) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, m);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
    return _mm256_set_m128i(hi, lo);
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

// One output row for NC activation rows starting at m0.
template <int BITS, int NC>
inline void row_tile(const Args& a, int64_t n, int64_t m0) {
  const int64_t nb = a.K / QK;
  const int bb = block_bytes(BITS);
  const uint8_t* wrow = a.qweight + n * nb * bb;
  const uint16_t* srow = a.scales + n * a.G;
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 acc[NC];
  for (int c = 0; c < NC; ++c) acc[c] = _mm256_setzero_ps();
  float corr[NC] = {0};
  const int8_t* xrow[NC];
  const float* drow[NC];
  const float* grow[NC];
  for (int c = 0; c < NC; ++c) {
    xrow[c] = a.xq + (m0 + c) * a.K;
    drow[c] = a.xd + (m0 + c) * nb;
    grow[c] = a.gsum + (m0 + c) * a.G;
  }
  int64_t b = 0;
  for (int64_t g = 0; g < a.G; ++g) {
    const float s = _cvtsh_ss(srow[g]);
    // 8-bit codes were made signed (code - 128) in the dot product, so their zero moves with them.
    const int z = (a.zeros ? a.zeros[n * a.G + g] : a.zero_const) - (BITS == 8 ? 128 : 0);
    if (z != 0) {
      for (int c = 0; c < NC; ++c) corr[c] += s * static_cast<float>(z) * grow[c][g];
    }
    for (int64_t e = b + a.bpg; b < e; ++b) {
      __m256i w = unpack_block<BITS>(wrow + b * bb);
      __m256i w_abs = w;
      if constexpr (BITS == 8) {
        w = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));  // code - 128, signed
        w_abs = _mm256_abs_epi8(w);
      }
      for (int c = 0; c < NC; ++c) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xrow[c] + b * QK));
        const __m256 d = _mm256_cvtepi32_ps(dot_block<BITS>(w, w_abs, x, ones16));
        acc[c] = _mm256_fmadd_ps(d, _mm256_set1_ps(s * drow[c][b]), acc[c]);
      }
    }
  }
  for (int c = 0; c < NC; ++c) {
    float y = hsum(acc[c]) - corr[c];
    if (a.bias) y += a.bias[n];
    a.out[(m0 + c) * a.N + n] = y;
  }
}

template <int BITS>
void gemm(const Args& a) {
  // Rows of the weight are split across threads; each thread walks all activation rows for its
  // rows, four at a time, so that one unpacked weight block serves four activation rows.
  const int64_t grain = std::max<int64_t>(4, 64 / std::max<int64_t>(1, a.M));
  at::parallel_for(0, a.N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      int64_t m = 0;
      for (; m + 4 <= a.M; m += 4) row_tile<BITS, 4>(a, n, m);
      for (; m + 2 <= a.M; m += 2) row_tile<BITS, 2>(a, n, m);
      for (; m < a.M; ++m) row_tile<BITS, 1>(a, n, m);
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

// x: [M, K] float32 contiguous; qweight: [N, K/32*bits*4] uint8; scales: [N, G] float16;
// zeros: [N, G] uint8 or empty; bias: [N] float32 or empty. Returns [M, N] float32.
torch::Tensor qlinear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                      int64_t zero_const, torch::Tensor bias, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: 2-D contiguous float32");
  TORCH_CHECK(qweight.scalar_type() == torch::kUInt8 && qweight.is_contiguous(), "qweight: contiguous uint8");
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), "scales: contiguous float16");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % QK == 0 && group_size % QK == 0 && K % group_size == 0, "K and group size must be multiples of 32");
  TORCH_CHECK(qweight.size(1) == K / QK * block_bytes(static_cast<int>(bits)), "qweight has the wrong width");
  const int64_t G = K / group_size;
  TORCH_CHECK(scales.size(0) == N && scales.size(1) == G, "scales shape");
  const bool has_zeros = zeros.numel() > 0;
  if (has_zeros) TORCH_CHECK(zeros.scalar_type() == torch::kUInt8 && zeros.sizes() == scales.sizes() && zeros.is_contiguous(), "zeros");
  const bool has_bias = bias.numel() > 0;
  if (has_bias) TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.numel() == N && bias.is_contiguous(), "bias");

  const int64_t bpg = group_size / QK;
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xd = torch::empty({M, K / QK}, torch::kFloat32);
  auto gsum = torch::empty({M, G}, torch::kFloat32);
  quantize_activations(x.data_ptr<float>(), M, K, bpg, xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
                       gsum.data_ptr<float>());
  auto out = torch::empty({M, N}, torch::kFloat32);
  Args a{qweight.data_ptr<uint8_t>(),
         reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>()),
         has_zeros ? zeros.data_ptr<uint8_t>() : nullptr,
         static_cast<int>(zero_const),
         xq.data_ptr<int8_t>(),
         xd.data_ptr<float>(),
         gsum.data_ptr<float>(),
         has_bias ? bias.data_ptr<float>() : nullptr,
         out.data_ptr<float>(),
         M, N, K, G, bpg};
  switch (bits) {
    case 8: gemm<8>(a); break;
    case 4: gemm<4>(a); break;
    case 3: gemm<3>(a); break;
    case 2: gemm<2>(a); break;
    default: TORCH_CHECK(false, "unsupported bit width ", bits);
  }
  return out;
}

// Expose the activation quantizer so the tests can check it against the Python reference.
std::vector<torch::Tensor> quantize_x(torch::Tensor x, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: 2-D contiguous float32");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % QK == 0 && group_size % QK == 0 && K % group_size == 0, "K and group size must be multiples of 32");
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto xd = torch::empty({M, K / QK}, torch::kFloat32);
  auto gsum = torch::empty({M, K / group_size}, torch::kFloat32);
  quantize_activations(x.data_ptr<float>(), M, K, group_size / QK, xq.data_ptr<int8_t>(), xd.data_ptr<float>(),
                       gsum.data_ptr<float>());
  return {xq, xd, gsum};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "low-bit weight x int8 activation linear (AVX2)");
  m.def("quantize_x", &quantize_x, "int8 per-block-of-32 activation quantization");
}
