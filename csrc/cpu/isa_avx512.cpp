// The AVX-512 build of the kernels (F, BW, VL, DQ, VNNI, BF16: Zen 4, Sapphire Rapids and newer).
#include "isa.h"

#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,f16c")

#define GPT2FAST_ISA_AVX512 1
#define LANES 16
namespace gpt2fast_cpu {
namespace {
#include "dot.h"
#include "rows.h"
}  // namespace
}  // namespace gpt2fast_cpu
GPT2FAST_DEFINE_ISA(avx512)
#endif
