// The one place that chooses how a packed weight is multiplied: over its tiled copy where it has one (any
// number of rows), else the row kernel below `large_batch` rows and, from there on, a float GEMM of the same
// int8 activations with the weight the kernel dequantizes. QuantLinear's forward (kernels.qlinear) and the
// decoding runtime (llama_decoder.cpp) both call it, so a layer computes the same thing in either.
// Also the float GEMV the runtime uses for layers kept in float32 (the output layer of most models).

#pragma once

#include "tiled_avx2.h"

#include <algorithm>

namespace shrink_kernels {

enum class Path { Tiled, Rows, LargeBatch };

// Which kernel multiplies `rows` rows by a packed weight (tiled: whether the weight has its tiled copy).
inline Path choose_path(bool tiled, int64_t rows, int64_t large_batch) {
  if (tiled) return Path::Tiled;
  return rows >= large_batch ? Path::LargeBatch : Path::Rows;
}

// x [..., K] float32 times a packed weight (row layout: qweight, scales, zeros, zero_const; tiled copy:
// tcodes, tscales, tzeros, or empty tensors), plus the bias (or empty): [..., N] float32.
inline torch::Tensor packed_linear(torch::Tensor x, torch::Tensor qweight, torch::Tensor scales, torch::Tensor zeros,
                                   int64_t zero_const, torch::Tensor bias, int64_t bits, int64_t group_size,
                                   torch::Tensor tcodes, torch::Tensor tscales, torch::Tensor tzeros,
                                   int64_t large_batch) {
  TORCH_CHECK(x.dim() >= 1 && x.scalar_type() == torch::kFloat32, "x: float32 [..., in_features]");
  const int64_t K = x.size(-1);
  const torch::Tensor x2 = x.reshape({-1, K}).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  torch::Tensor y;
  switch (choose_path(tcodes.numel() > 0, x2.size(0), large_batch)) {
    case Path::Tiled:
      y = tiled_many(x2, {TiledWeight{tcodes, tscales, tzeros, bias, zero_const, bits, group_size}})[0];
      break;
    case Path::LargeBatch: {
      auto q = quantize_x(x2, 32);
      const torch::Tensor xa = (q[0].view({x2.size(0), -1, 32}).to(torch::kFloat32) * q[1].unsqueeze(-1)).view(x2.sizes());
      const torch::Tensor w = dequantize(qweight, scales, zeros, zero_const, bits, group_size, K);
      y = bias.numel() > 0 ? at::linear(xa, w, bias) : at::linear(xa, w);
      break;
    }
    case Path::Rows:
      y = qlinear(x2, qweight, scales, zeros, zero_const, bias, bits, group_size);
      break;
  }
  shape.back() = y.size(1);
  return y.view(shape);
}

namespace {

// Float32 products for up to GEMV_MAX_ROWS rows (decoding): past GEMV_ROWS rows, tiles of GEMV_ROWS rows of x
// by two weight rows, all in registers, so each weight row is read from memory once for all rows (the next
// tile of rows finds it in L1); the output columns are split across threads. torch's GEMV runs a large
// matrix (the output layer) on one thread at about a third of the memory bandwidth here, and its GEMM for a
// few rows streams the weights at a fraction of it.
constexpr int64_t GEMV_ROWS = 4, GEMV_MAX_ROWS = 16;
using torch::Tensor;

// y[m * N] (and y[m * N + 1] when `two`) for the R rows of xb [R, K] against weight rows w0 and w1.
template <int R>
inline void gemv_tile(const float* xb, int64_t K, const float* w0, const float* w1, bool two, const float* b,
                      float* y, int64_t N) {
  __m256 a0[R], a1[R];
  for (int m = 0; m < R; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 u = _mm256_loadu_ps(w0 + k), v = _mm256_loadu_ps(w1 + k);
    for (int m = 0; m < R; ++m) {
      const __m256 xv = _mm256_loadu_ps(xb + m * K + k);
      a0[m] = _mm256_fmadd_ps(u, xv, a0[m]);
      a1[m] = _mm256_fmadd_ps(v, xv, a1[m]);
    }
  }
  for (int m = 0; m < R; ++m) {
    float t0 = shrink_kernels::hsum(a0[m]), t1 = shrink_kernels::hsum(a1[m]);
    for (int64_t kk = k; kk < K; ++kk) {
      t0 += w0[kk] * xb[m * K + kk];
      t1 += w1[kk] * xb[m * K + kk];
    }
    y[m * N] = b ? t0 + b[0] : t0;
    if (two) y[m * N + 1] = b ? t1 + b[1] : t1;
  }
}

// One weight row at a time against all (up to GEMV_ROWS) rows, two accumulators each: for 1-4 rows this
// streams the weights faster than the tiles (measured; latency of the FMA chains, not loads, bounds it).
void gemv_few(const float* xp, int64_t M, int64_t K, const float* wp, const float* bp, float* yp, int64_t N,
              int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = wp + n * K;
    __m256 acc[GEMV_ROWS][2];
    for (int64_t m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m256 w0 = _mm256_loadu_ps(wr + k), w1 = _mm256_loadu_ps(wr + k + 8);
      for (int64_t m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + m * K + k), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + m * K + k + 8), acc[m][1]);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      float t = shrink_kernels::hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
      for (int64_t kk = k; kk < K; ++kk) t += wr[kk] * xp[m * K + kk];
      yp[m * N + n] = bp ? t + bp[n] : t;
    }
  }
}

// y [M, N] (contiguous float32) = x w^T + bias, for up to GEMV_MAX_ROWS rows.
void float_gemv_into(const Tensor& x, const Tensor& w, const Tensor& bias, Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M <= GEMV_MAX_ROWS && w.is_contiguous() && w.scalar_type() == torch::kFloat32, "float_gemv");
  TORCH_CHECK(y.is_contiguous() && y.size(0) == M && y.size(1) == N, "float_gemv: output shape");
  const Tensor xc = x.contiguous();
  const float *xp = xc.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bp = bias.numel() > 0 ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (M <= GEMV_ROWS) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { gemv_few(xp, M, K, wp, bp, yp, N, n0, n1); });
    return;
  }
  at::parallel_for(0, (N + 1) / 2, 32, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = 2 * p;
      const bool two = n + 1 < N;
      const float *w0 = wp + n * K, *w1 = two ? w0 + K : w0, *b = bp ? bp + n : nullptr;
      for (int64_t m0 = 0; m0 < M; m0 += GEMV_ROWS) {
        const float* xb = xp + m0 * K;
        float* yb = yp + m0 * N + n;
        switch (std::min(GEMV_ROWS, M - m0)) {
          case 4: gemv_tile<4>(xb, K, w0, w1, two, b, yb, N); break;
          case 3: gemv_tile<3>(xb, K, w0, w1, two, b, yb, N); break;
          case 2: gemv_tile<2>(xb, K, w0, w1, two, b, yb, N); break;
          default: gemv_tile<1>(xb, K, w0, w1, two, b, yb, N); break;
        }
      }
    }
  });
}

Tensor float_gemv(const Tensor& x, const Tensor& w, const Tensor& bias) {
  Tensor y = torch::empty({x.size(0), w.size(0)}, torch::kFloat32);
  float_gemv_into(x, w, bias, y);
  return y;
}

}  // namespace

}  // namespace shrink_kernels
