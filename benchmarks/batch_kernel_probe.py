"""A probe, not a shipped kernel: how fast can an int4-g32 product of 2-512 rows get on this CPU with
int8 activations per block of 32 (the arithmetic, and so the output error, of shrink's kernel)?

shrink's kernel reads weights row by row (one output at a time, 32 inputs per vector), which suits one
row of activations. This probe repacks the weights so each vector holds 8 outputs x 4 inputs: one
`vpmaddubsw` per row then feeds 8 outputs, its 16-bit sums are added over a block of 32 inputs without
overflow (8 x 2 x 15 x 127 < 32767), and one `vpmaddwd`, one conversion and two FMAs per block and row
finish them (the second FMA applies the weights' zero points through the activations' block sums). The
codes stay 4-bit (two steps per byte, unpacked with a shift and a mask, once per tile of rows).

Measured side by side in one process, interleaved rounds, medians: fp32 `F.linear`, shrink's kernel as
its layers call it (`shrink.quant.kernels.qlinear`: the integer kernel below 64 rows, a float GEMM of the
int8 activations from there), and the probe (activation quantization included). The probe's outputs are
checked against the float64 reference of the same arithmetic (`reference.int8_activation_linear`).

    .venv/bin/python benchmarks/batch_kernel_probe.py [--rounds 5] [--out benchmarks/results/batch_kernel_probe.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from common import CpuLoad, interleaved_times, machine, median_spread  # noqa: E402

import shrink  # noqa: E402
from shrink.atomic import write_json  # noqa: E402
from shrink.quant import kernels  # noqa: E402
from shrink.quant.kernels import native, reference  # noqa: E402
from shrink.quant.packing import unpack  # noqa: E402

SOURCE = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <cstring>

// y[r, n0:n0+8] for R rows from r0; w: this tile's codes, [groups][4][8 outputs][4 inputs], two steps a byte.
template <int R>
static inline void tile(const uint8_t* w, const float* sw, const float* swz, const int8_t* xq, const float* xd,
                        const float* xs, int64_t K, int64_t r0, float* y, int64_t N, int64_t n0) {
  const int64_t G = K / 32;
  const __m256i ones = _mm256_set1_epi16(1), lo = _mm256_set1_epi8(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i a16[R];
    for (int r = 0; r < R; ++r) a16[r] = _mm256_setzero_si256();
    const uint8_t* wg = w + g * 128;
    for (int s = 0; s < 4; ++s) {
      const __m256i packed = _mm256_loadu_si256((const __m256i*)(wg + 32 * s));
      const __m256i w0 = _mm256_and_si256(packed, lo);
      const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(packed, 4), lo);
      for (int r = 0; r < R; ++r) {
        const int8_t* xr = xq + (r0 + r) * K + g * 32 + 8 * s;
        int32_t v0, v1;
        std::memcpy(&v0, xr, 4);
        std::memcpy(&v1, xr + 4, 4);
        a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(w0, _mm256_set1_epi32(v0)));
        a16[r] = _mm256_add_epi16(a16[r], _mm256_maddubs_epi16(w1, _mm256_set1_epi32(v1)));
      }
    }
    const __m256 s = _mm256_loadu_ps(sw + g * 8), sz = _mm256_loadu_ps(swz + g * 8);
    for (int r = 0; r < R; ++r) {
      const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(a16[r], ones));
      acc[r] = _mm256_fmadd_ps(f, _mm256_mul_ps(s, _mm256_set1_ps(xd[(r0 + r) * G + g])), acc[r]);
      acc[r] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(xs[(r0 + r) * G + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + (r0 + r) * N + n0, acc[r]);
}

// xq [M, K] int8, xd [M, K/32] block scales, xs [M, K/32] block scale x code sum; w [N/8, K/32*128] u8;
// sw, swz [N/8, K/32, 8] (scale, scale x zero).
torch::Tensor probe(torch::Tensor xq, torch::Tensor xd, torch::Tensor xs, torch::Tensor w, torch::Tensor sw,
                    torch::Tensor swz) {
  const int64_t M = xq.size(0), K = xq.size(1), T = w.size(0), N = T * 8, G = K / 32;
  auto y = torch::empty({M, N}, torch::kFloat32);
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const float *xdp = xd.data_ptr<float>(), *xsp = xs.data_ptr<float>(), *swp = sw.data_ptr<float>(),
              *swzp = swz.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  constexpr int64_t RB = 64;  // rows per block: a block's activations stay in cache across the tiles
  const int64_t nrb = (M + RB - 1) / RB;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t rb = 0; rb < nrb; ++rb)
    for (int64_t t = 0; t < T; ++t) {
      const uint8_t* wt = wp + t * G * 128;
      const float *s = swp + t * G * 8, *sz = swzp + t * G * 8;
      int64_t r = rb * RB;
      const int64_t end = std::min(M, r + RB);
      for (; r + 4 <= end; r += 4) tile<4>(wt, s, sz, xqp, xdp, xsp, K, r, yp, N, t * 8);
      for (; r < end; ++r) tile<1>(wt, s, sz, xqp, xdp, xsp, K, r, yp, N, t * 8);
    }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("probe", &probe); }
"""


def build():
    """The probe's extension, compiled with the kernels' own flags."""
    from torch.utils.cpp_extension import load_inline

    return load_inline("shrink_batch_probe", cpp_sources=SOURCE, extra_cflags=list(native.CFLAGS),
                       extra_ldflags=["-fopenmp"], verbose=False)


def repack(layer):
    """(codes, scales, scale x zero) of an int4-g32 QuantLinear in the probe's layout."""
    n, k = layer.qweight.shape[0], layer.in_features
    g = k // 32
    codes = unpack(layer.qweight, 4, k).to(torch.uint8)  # [n, k], 0..15
    c = codes.view(n // 8, 8, g, 8, 4).permute(0, 2, 3, 1, 4)  # [tile, group, step, output, input]
    packed = (c[:, :, 0::2] | (c[:, :, 1::2] << 4)).contiguous().view(n // 8, g * 128)
    s = layer.scales.to(torch.float32)
    z = layer.zeros.to(torch.float32) if layer.zeros is not None else torch.full_like(s, float(layer.zero_const))
    tiles = lambda t: t.view(n // 8, 8, g).permute(0, 2, 1).contiguous()  # noqa: E731
    return packed, tiles(s), tiles(s * z)


def probe_linear(ext, q, x):
    """The probe's product, activation quantization included."""
    xq, xd, xs = native.load().quantize_x(x, 32)
    return ext.probe(xq, xd.contiguous(), xs.contiguous(), *q)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="576x1536,1536x576", help="in x out of the layers (SmolLM2's MLP)")
    ap.add_argument("--batches", default="1,2,8,32,128,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch_kernel_probe.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    if native.load() is None:
        sys.exit("the native kernel could not be built here; the probe needs a compiler and AVX2")
    ext = build()
    console = Console()
    load = CpuLoad()
    load.start()
    rows, record = [], {"machine": machine(), "threads": torch.get_num_threads(), "results": []}
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        lin = torch.nn.Linear(k, n, bias=False)
        ql = shrink.quantize(copy.deepcopy(torch.nn.Sequential(lin)), "int4-g32", progress=False, keep_output=False)[0]
        assert ql.uses_native(), "the packed layer should use the native kernel"
        q = repack(ql)
        for m in map(int, args.batches.split(",")):
            x = torch.randn(m, k)
            want = reference.int8_activation_linear(x, ql.qweight, ql.scales, ql.zeros, ql.zero_const, None, 4, k, 32)
            got = probe_linear(ext, q, x)
            err = float(((got - want).abs().max() / want.abs().max()))
            assert err < 1e-5, f"the probe's product is wrong at {shape}, batch {m}: {err:.2e}"
            fns = {"fp32": lambda: F.linear(x, lin.weight),
                   "shrink kernel": lambda: kernels.qlinear(x, ql, True),
                   "probe": lambda: probe_linear(ext, q, x)}
            with torch.no_grad():
                times = interleaved_times(fns, args.rounds, repeat=max(2, 256 // m))
            med = {name: median_spread(v)[0] for name, v in times.items()}
            ratios = {name: med["fp32"] / med[name] for name in fns}
            rows.append((shape, m, med["fp32"] * 1e6, ratios["shrink kernel"], ratios["probe"], err))
            record["results"].append({"shape": shape, "batch": m, "fp32_us": med["fp32"] * 1e6,
                                      "shrink_kernel_vs_fp32": ratios["shrink kernel"],
                                      "probe_vs_fp32": ratios["probe"], "probe_error": err,
                                      "seconds": times})
            console.print(f"{shape} batch {m}: fp32 {med['fp32'] * 1e6:.0f} us, shrink kernel "
                          f"{ratios['shrink kernel']:.2f}x, probe {ratios['probe']:.2f}x")
    record["cpu_load_others"] = load.stop()
    table = Table(title="int4-g32 with int8 activations: speed vs fp32 F.linear (higher is faster)")
    for col in ("layer (in x out)", "batch", "fp32", "shrink kernel", "probe (8x4 tiles)", "probe error"):
        table.add_column(col)
    for shape, m, us, a, b, err in rows:
        table.add_row(shape, str(m), f"{us:.0f} us", f"{a:.2f}x", f"{b:.2f}x", f"{err:.1e}")
    console.print(table)
    console.print(f"CPU load from other processes: {record['cpu_load_others']:.0%}")
    write_json(Path(args.out), record)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
