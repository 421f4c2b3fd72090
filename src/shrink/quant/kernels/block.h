// The block every kernel format is built on: 32 inputs are packed together and share one activation scale.
// Free of torch: the tiled loops (tiled_core.inc) are compiled apart from it, for AVX512-VNNI too.

#pragma once

#include <cstdint>

namespace shrink_kernels {
constexpr int64_t QK = 32;
}  // namespace shrink_kernels
