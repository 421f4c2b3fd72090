// The kernels of qgemm_avx2.h as an extension module: dispatcher ops (torch.ops.shrink.*), so torch.compile
// can keep them in a graph (their shapes for tracing are registered in native.py), and direct calls.

#include "tiled_avx2.h"

using shrink_kernels::dequantize;
using shrink_kernels::qlinear;
using shrink_kernels::quantize_x;
using shrink_kernels::tiled_qlinear;

TORCH_LIBRARY(shrink, m) {
  m.def("qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int zero_const, Tensor bias, int bits, "
        "int group_size) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor zeros, int zero_const, int bits, int group_size, int K) -> Tensor");
  m.def("tiled_qlinear(Tensor x, Tensor codes, Tensor scales, Tensor szero, Tensor bias, int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(shrink, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("dequantize", &dequantize);
  m.impl("tiled_qlinear", &tiled_qlinear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "low-bit weight x int8 activation linear (AVX2)");
  m.def("dequantize", &dequantize, "packed weights to float32");
  m.def("tiled_qlinear", &tiled_qlinear, "the same product over weights in tiles of 8 outputs (any batch)");
  m.def("uses_vnni", &shrink_kernels::use_vnni, "whether the tiled kernel runs its AVX512-VNNI copy");
  m.def("quantize_x", &quantize_x, "int8 per-block-of-32 activation quantization");
}

