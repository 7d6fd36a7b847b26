// The portable build: the compiler's baseline vectors (SSE2 on x86-64, NEON on aarch64), for any other machine.
#include "isa.h"

#define LANES 4
namespace gpt2fast_cpu {
namespace {
#include "dot.h"
#include "rows.h"
}  // namespace
}  // namespace gpt2fast_cpu
GPT2FAST_DEFINE_ISA(portable)
