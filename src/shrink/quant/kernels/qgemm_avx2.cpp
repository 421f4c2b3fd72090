// shrink's one extension module: the kernels (qgemm_avx2.h, tiled_avx2.h, packed_linear.h) as dispatcher ops
// (torch.ops.shrink.*), so torch.compile can keep them in a graph (their shapes for tracing are registered in
// native.py), and as direct calls; and the decoding runtime's classes (llama_decoder.cpp).

#include "packed_linear.h"
#include "round_rows.h"

namespace shrink_kernels {
void bind_decoder(pybind11::module_& m);  // llama_decoder.cpp
}

using shrink_kernels::dequantize;
using shrink_kernels::packed_linear;
using shrink_kernels::qlinear;
using shrink_kernels::quantize_x;
using shrink_kernels::round_rows;
using shrink_kernels::tiled_qlinear;

TORCH_LIBRARY(shrink, m) {
  m.def("qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int zero_const, Tensor bias, int bits, "
        "int group_size) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor zeros, int zero_const, int bits, int group_size, int K) -> Tensor");
  m.def("tiled_qlinear(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int zero_const, Tensor bias, int bits, "
        "int group_size) -> Tensor");
  m.def("linear(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int zero_const, Tensor bias, int bits, "
        "int group_size, Tensor tcodes, Tensor tscales, Tensor tzeros, int large_batch) -> Tensor");
  m.def("round_rows(Tensor w, int bits, int group_size) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(shrink, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("dequantize", &dequantize);
  m.impl("tiled_qlinear", &tiled_qlinear);
  m.impl("linear", &packed_linear);
  m.impl("round_rows", &round_rows);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("qlinear", &qlinear, "low-bit weight x int8 activation linear (AVX2)");
  m.def("dequantize", &dequantize, "packed weights to float32");
  m.def("tiled_qlinear", &tiled_qlinear, "the same product over weights in tiles of 8 outputs (any batch)");
  m.def("uses_vnni", &shrink_kernels::use_vnni, "whether the tiled kernel runs its AVX512-VNNI copy");
  m.def("quantize_x", &quantize_x, "int8 per-block-of-32 activation quantization");
  m.def("round_rows", &round_rows, "round to nearest: a weight as stored to packed codes and fp16 scales");
  m.def("linear", &packed_linear, "a packed weight's product by the path packed_linear.h chooses (tiled, rows, large batch)");
  shrink_kernels::bind_decoder(m);
}

