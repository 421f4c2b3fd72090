// The tiled kernel's loops (tiled_core.inc) compiled for CPUs with AVX512-VNNI (256-bit vpdpbusd), beside
// the AVX2 copy; tiled_avx2.h picks one at run time. No torch header here: everything in this object file
// is built for those CPUs, so nothing in it may be shared with (and chosen by the linker over) the AVX2 code.

#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#include "block.h"

#include <immintrin.h>

#include <cstdint>

namespace {
using shrink_kernels::QK;
#define SHRINK_TILED_VNNI 1
#include "tiled_core.inc"
#undef SHRINK_TILED_VNNI
}  // namespace

namespace shrink_kernels {

// Declared in tiled_avx2.h (with a struct of the same layout).
void tiled_items_vnni(bool eight, const void* as, const int64_t* start, int64_t count, int64_t i0, int64_t i1) {
  tiled_items_any(eight, static_cast<const TiledArgs*>(as), start, count, i0, i1);
}

bool tiled_vnni_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
}

}  // namespace shrink_kernels
