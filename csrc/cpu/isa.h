// What every isa_<name>.cpp includes *before* its target pragma, so the standard library's inline code
// is compiled for the baseline CPU (a function compiled after the pragma may use that instruction set,
// and the linker keeps one copy of each inline function for the whole module). Then each file sets the
// target and LANES, includes dot.h in an anonymous namespace (each build's copy private to its file),
// then rows.h, and defines gpt2fast_cpu::<name>_kernels() with GPT2FAST_DEFINE_ISA.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common.h"

#define GPT2FAST_DEFINE_ISA(name)                                                                         \
  namespace gpt2fast_cpu {                                                                                \
  Kernels name##_kernels() {                                                                              \
    return Kernels{#name, dot_tile, int8_uses_vnni() ? "vnni" : "dequant", layer_norm_row, quantize_row, \
                   finish_row, attend};                                                                   \
  }                                                                                                       \
  }
