// The AVX2 + FMA build of the kernels (x86-64 since Haswell / Zen 1): weights widened in registers.
#include "isa.h"

#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")

#define GPT2FAST_ISA_AVX2 1
#define LANES 8
namespace gpt2fast_cpu {
namespace {
#include "dot.h"
#include "rows.h"
}  // namespace
}  // namespace gpt2fast_cpu
GPT2FAST_DEFINE_ISA(avx2)
#endif
