// Round to nearest in one pass: a weight [N, K] as stored (float32, bf16 or fp16) to the row layout of
// packing.py (4-bit: byte j of a block of 32 holds code j low and j + 16 high; 8-bit: a code a byte) and fp16
// scales, for the symmetric formats of format.py. The arithmetic is format.py's, value for value: per group the
// signed value of largest magnitude (the first met where a value and its negation tie) over -2^(bits-1), or for
// 8 bits the largest magnitude over 127; a zero scale +0; the scale rounded to fp16 (nearest, ties to even) and the codes
// computed against it: nearbyint(w / scale) + 2^(bits-1), clamped to the range. The PyTorch path
// (rtn.quantize_weight, then packing.pack) is the reference the tests compare with, bit for bit.
// A group holding a NaN or an infinity gets a NaN scale: the caller refuses the weight, naming it.

#pragma once

#include <torch/extension.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace shrink_kernels {

// Eight stored values as float32 (exact: bf16 and fp16 values are float32 values).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

template <typename T>
void round_rows_typed(const T* w, int64_t n, int64_t k, int64_t group, int64_t bits, uint8_t* out,
                      uint16_t* scales) {
  const int64_t groups = k / group, width = bits == 4 ? k / 2 : k;
  const float zero = static_cast<float>(1 << (bits - 1)), top = static_cast<float>((1 << bits) - 1);
  const __m256 sign = _mm256_set1_ps(-0.0f), vzero = _mm256_set1_ps(zero), vtop = _mm256_set1_ps(top);
  const __m256 vmax = _mm256_set1_ps(std::numeric_limits<float>::max());
#pragma omp parallel
  {
    std::vector<float> row(k);
    std::vector<uint8_t> codes(k);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) {
      const T* src = w + r * k;
      for (int64_t i = 0; i < k; i += 8) _mm256_storeu_ps(row.data() + i, load8(src + i));
      for (int64_t g = 0; g < groups; ++g) {
        const float* x = row.data() + g * group;
        // the largest magnitude (max of |x|: NaN never wins, and is counted apart with the infinities)
        __m256 most = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int64_t i = 0; i < group; i += 8) {
          const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i));
          most = _mm256_max_ps(most, a);
          bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, vmax, _CMP_NLE_UQ));  // not <= FLT_MAX: NaN or infinite
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, most);
        float largest = 0.0f;
        for (float v : lanes) largest = v > largest ? v : largest;
        const bool finite = _mm256_movemask_ps(bad) == 0;
        float pick = 0.0f;  // the first value of that magnitude, with its sign (argmax's rule on ties)
        for (int64_t i = 0; i < group; ++i)
          if (std::fabs(x[i]) == largest) {
            pick = x[i];
            break;
          }
        // + 0: an all-zero group's scale is +0, as format.py makes it
        const float scale = (bits == 8 ? largest / 127.0f : pick / -zero) + 0.0f;
        uint16_t half = _cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT);
        if (!finite) half = 0x7E00;  // NaN
        scales[r * groups + g] = half;
        const float s = _cvtsh_ss(half);
        const __m256 safe = _mm256_set1_ps(s == 0.0f ? 1.0f : s);
        uint8_t* c = codes.data() + g * group;
        for (int64_t i = 0; i < group; i += 8) {
          __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), safe),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          q = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(q, vzero), _mm256_setzero_ps()), vtop);
          const __m256i v = _mm256_cvttps_epi32(q);  // 0..255: the low byte of each lane
          const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
          _mm_storel_epi64(reinterpret_cast<__m128i*>(c + i), _mm_packus_epi16(w16, w16));
        }
      }
      uint8_t* dst = out + r * width;
      if (bits == 8) {
        std::memcpy(dst, codes.data(), k);
      } else {
        for (int64_t b = 0; b < k / 32; ++b) {
          const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes.data() + b * 32));
          const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes.data() + b * 32 + 16));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + b * 16), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
        }
      }
    }
  }
}

// (qweight [N, K/2 or K] uint8, scales [N, K/group] fp16) of a contiguous 2-D weight; bits 4 or 8, K a
// multiple of 32 and of the group size.
inline std::vector<torch::Tensor> round_rows(torch::Tensor w, int64_t bits, int64_t group_size) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "round_rows: a contiguous 2-D weight");
  TORCH_CHECK(bits == 4 || bits == 8, "round_rows: 4 or 8 bits");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(k % 32 == 0 && group_size > 0 && group_size % 8 == 0 && k % group_size == 0,
              "round_rows: input size a multiple of 32 and of the group size, a multiple of 8");
  auto qweight = torch::empty({n, bits == 4 ? k / 2 : k}, torch::kUInt8);
  auto scales = torch::empty({n, k / group_size}, torch::kFloat16);
  auto* out = qweight.data_ptr<uint8_t>();
  auto* s = reinterpret_cast<uint16_t*>(scales.data_ptr<at::Half>());
  switch (w.scalar_type()) {
    case torch::kFloat32: round_rows_typed(w.data_ptr<float>(), n, k, group_size, bits, out, s); break;
    case torch::kBFloat16: round_rows_typed(w.data_ptr<at::BFloat16>(), n, k, group_size, bits, out, s); break;
    case torch::kFloat16: round_rows_typed(w.data_ptr<at::Half>(), n, k, group_size, bits, out, s); break;
    default: TORCH_CHECK(false, "round_rows: a float32, bf16 or fp16 weight");
  }
  return {qweight, scales};
}

}  // namespace shrink_kernels
