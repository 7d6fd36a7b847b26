// cuda_emu.h — run our CUDA C++ kernels on the CPU, for tests. Force-included before a kernel
// translation unit (`g++ -std=c++20 -fno-strict-aliasing -include csrc/emu/cuda_emu.h -DCUDA_EMU`),
// it turns the very same `.cuh` source that nvcc compiles for sm_80/sm_90 into plain C++.
// The design is the one recorded in /work/shared/KERNEL_TESTING.md.
//
// What is emulated
//   - Launches: `LAUNCH(grid, block, smem, stream, kernel)(args...)` (csrc/common.cuh) calls
//     `emu::Launch`, which validates the configuration like the driver (1..1024 threads, grid
//     limits, dynamic shared memory), then runs the blocks one after another on the calling OS
//     thread. The stream is ignored: every launch is synchronous.
//   - CUDA threads are fibers: cooperative, switched by a 14-instruction x86-64 stack switch, each
//     on its own mmap'ed stack with a PROT_NONE guard page below it. A fiber runs until it reaches
//     a barrier or a warp collective, then yields to the block's scheduler.
//   - Scheduling: rounds over the block's threads in EMU_ORDER: 0 forward, 1 reverse, 2 shuffled
//     anew every round (seed EMU_SEED), 3 warp after warp (the last warp first, each running until
//     all its lanes wait at a block barrier or exit: warps far out of step, as a GPU may run them;
//     orders 0-2 keep warps within a collective of each other). A race that needs a
//     `__syncthreads` shows in at least one order. A round in which no thread could run is a
//     deadlock: the emulator prints the block and what every thread waits at (file:line) and
//     aborts — so an early `return` before a barrier is reported, not hidden.
//   - `__shared__` is `thread_local` (one copy per OS thread = per running block). Dynamic shared
//     memory is exactly one name, `dyn_smem` (declared in common.cuh), filled with 0xFF before
//     each block so that reads of never-written shared memory give NaN / -1. Under ASan the bytes
//     past the launch's dynamic size are poisoned.
//   - `__syncthreads`, `__syncthreads_count/_and/_or`, `__syncwarp`, `__shfl_sync`,
//     `__shfl_xor_sync`, `__shfl_up_sync`, `__shfl_down_sync` (with `width`), `__ballot_sync`,
//     `__any_sync`, `__all_sync`, `__activemask`: a counter per block / per warp; the last
//     arrival computes every lane's result and releases the others. Full masks only (a partial
//     warp at the end of a block may pass the mask of its existing lanes); any other mask, lanes
//     of one warp at different collectives, or a shuffle from a lane that does not exist, abort.
//   - Index built-ins, `atomicAdd/Max/Min/Exch/CAS` (std::atomic_ref), `__ldg`, `__ldcg`, bit and float
//     intrinsics, `__expf`-style fast math (exact here), half/bf16 shims for the device-only
//     `hexp`, `htanh`, `__hfma`, `h2exp`. `cuda_fp16.h` / `cuda_bf16.h` / `vector_types.h` /
//     `driver_types.h` come from the CUDA toolkit (they work in host code); nothing is linked.
//   - `cudaGetLastError` / `cudaPeekAtLastError` / `cudaGetErrorName` / `cudaGetErrorString`.
//   - Tensor-core PTX, as functions that csrc/kernels/mma.cuh calls where nvcc gets inline PTX
//     (see "tensor-core PTX" below): `mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}` and
//     `ldmatrix.sync.aligned.m8n8.{x1,x2,x4}[.trans].b16` are warp collectives whose
//     lane-to-element maps are the PTX ISA's tables. `cp.async.{ca,cg}.shared.global` (4/8/16
//     bytes, zero-fill) with `commit_group` / `wait_group` reads its source when issued, poisons
//     its destination (0xFF) at once and writes it only when a `wait_group` retires its group: a
//     read before the wait, or of a buffer refilled while another warp still reads it, sees the
//     poison.
//
// What is not emulated (keep it out of kernels, or behind `#if defined(__CUDA_ARCH__)` with a
// portable `#else` that runs here): other inline PTX, wmma, TMA, CUB/CUTLASS, clusters,
// grid sync, dynamic parallelism, textures, partial-mask collectives, spin-waits on memory (a
// fiber never yields there: it hangs). Races between threads of a block are only seen through
// the orders above; memory-model effects (fences, volatile, L1 staleness) are invisible. Static
// `__shared__` variables are not poisoned (they keep the previous block's values).
//
// `__noinline__` is left undefined (libstdc++ spells `__attribute__((__noinline__))`): write
// `__attribute__((noinline))`, which nvcc accepts too.
//
// Environment: EMU_ORDER=0|1|2|3 (default 0; `emu::set_order` overrides it), EMU_SEED=<uint64>
// (default 0; `emu::set_seed`). Build with -fno-strict-aliasing: kernels reinterpret `uint4`
// vectors as half/bfloat16 lanes, which g++ would otherwise miscompile. x86-64 Linux only.
#pragma once

#if !defined(__x86_64__) || !defined(__linux__)
#error "cuda_emu.h: the fiber switch is written for x86-64 Linux"
#endif
#if !__has_include(<cuda_fp16.h>)
#error "cuda_emu.h needs the CUDA toolkit's headers (cuda_fp16.h): add -I<cuda>/include"
#endif

#ifndef CUDA_EMU
#define CUDA_EMU 1
#endif

// CUDA's host_defines.h only defines these when they are not defined yet: ours win.
#define __host__
#define __device__
#define __global__
#define __shared__ thread_local
#define __constant__
#define __managed__
#define __launch_bounds__(...)

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <sys/mman.h>
#include <unistd.h>
#include <vector_types.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <source_location>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp,
// switches to next_sp and pops the registers saved there. Hidden and weak: every module that
// includes this header carries its own copy without clashing.
extern "C" void emu_fiber_switch(void** save_sp, void* next_sp);
asm(R"(
  .pushsection .text
  .weak emu_fiber_switch
  .hidden emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch
  .popsection
)");

namespace emu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynSmem = 227 * 1024;  // H100's per-block opt-in maximum
#ifdef EMU_ASAN
constexpr size_t kFiberStack = 512 * 1024;  // ASan's redzones make frames several times larger
#else
constexpr size_t kFiberStack = 64 * 1024;
#endif

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fputs("cuda_emu: ", stderr);
  std::vfprintf(stderr, fmt, args);
  std::fputc('\n', stderr);
  va_end(args);
  std::fflush(stderr);
  std::abort();
}

inline const char* base_name(const char* path) {
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

// ---- configuration ---------------------------------------------------------------------------

inline int g_order_override = -1;
inline bool g_seed_set = false;
inline uint64_t g_seed = 0;

inline void set_order(int order) {
  if (order < -1 || order > 3)
    fail("set_order(%d): use 0 (forward), 1 (reverse), 2 (shuffled), 3 (warp by warp)", order);
  g_order_override = order;  // -1: read EMU_ORDER again
}
inline void set_seed(uint64_t seed) {
  g_seed = seed;
  g_seed_set = true;
}
inline int order() {
  if (g_order_override >= 0) return g_order_override;
  const char* env = std::getenv("EMU_ORDER");
  if (env == nullptr || *env == '\0') return 0;
  if (env[0] >= '0' && env[0] <= '3' && env[1] == '\0') return env[0] - '0';
  fail("EMU_ORDER=%s: use 0 (forward), 1 (reverse), 2 (shuffled) or 3 (warp by warp)", env);
}
// Kernel launches that ran (a valid configuration), so the ops layer can count launches per step.
inline std::atomic<uint64_t> g_launches{0};
inline uint64_t launch_count() { return g_launches.load(); }

inline uint64_t seed() {
  if (g_seed_set) return g_seed;
  const char* env = std::getenv("EMU_SEED");
  return env ? std::strtoull(env, nullptr, 10) : 0;
}

// ---- fibers and the per-OS-thread block runner ------------------------------------------------

enum class Wait : uint8_t { kReady, kBarrier, kWarp, kDone };
enum class WarpOp : uint8_t {
  kSync, kShfl, kShflXor, kShflUp, kShflDown, kBallot, kAny, kAll, kMma, kLdmatrix
};

// One cp.async in flight: the source bytes (read when issued), where they go, and the group.
struct AsyncCopy {
  void* dst;
  int size;   // 4, 8 or 16 bytes written (the source's src_size of them, then zeros)
  int group;  // the thread's commit count when issued: committed once group < Fiber::commits
  alignas(16) unsigned char bytes[16];
};

struct Fiber {
  void* sp = nullptr;          // saved stack pointer while switched out
  char* stack = nullptr;       // lowest usable byte; the guard page lies just below
  void* fake_stack = nullptr;  // ASan's fake-stack handle while switched out
  uint3 tid{};
  int linear = 0, lane = 0, warp = 0;
  Wait wait = Wait::kReady;
  const char* what = "";  // the collective it waits at (for deadlock reports)
  std::source_location where{};
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0, width = 0;
  uint64_t in = 0, out = 0;  // warp exchange: value offered, value received
  const void* payload = nullptr;  // mma / ldmatrix: this lane's operands and result (its stack)
  std::vector<AsyncCopy> copies;  // cp.async not yet retired by a wait_group
  int commits = 0;                // cp.async.commit_group calls so far
};

struct WarpState {
  int arrived = 0;
  int size = kWarpSize;  // existing lanes (the last warp of a block may be partial)
};

using Entry = void (*)(const void* closure);

struct Worker {
  // fiber stacks, reused by every block this OS thread runs
  char* stacks = nullptr;
  size_t stack_slots = 0;
  // the running block
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  int barrier_arrived = 0, barrier_count = 0;
  size_t smem = 0;  // the running launch's dynamic shared memory bytes
  int live = 0;
  Entry entry = nullptr;
  const void* closure = nullptr;
  const char* kernel = "";
  void* sched_sp = nullptr;
  void* sched_fake_stack = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;

  ~Worker() {
    if (stacks) munmap(stacks, stack_slots * (kFiberStack + page()));
  }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

  void reserve_stacks(size_t n) {
    if (n <= stack_slots) return;
    if (stacks) munmap(stacks, stack_slots * (kFiberStack + page()));
    const size_t slot = kFiberStack + page();
    void* mem = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) fail("cannot map %zu fiber stacks", n);
    stacks = static_cast<char*>(mem);
    stack_slots = n;
    for (size_t i = 0; i < n; ++i) {
      if (mprotect(stacks + i * slot, page(), PROT_NONE) != 0)
        fail("cannot protect a fiber stack guard page");
    }
  }
  char* stack_of(size_t i) const { return stacks + i * (kFiberStack + page()) + page(); }
};

inline thread_local Worker* tls_worker = nullptr;
inline thread_local Fiber* tls_fiber = nullptr;
inline thread_local uint3 tls_block_idx{};
inline thread_local dim3 tls_block_dim{};
inline thread_local dim3 tls_grid_dim{};
inline thread_local cudaError_t tls_last_error = cudaSuccess;

inline Worker& worker() {
  static thread_local Worker w;
  return w;
}

inline void asan_start_switch(void** fake_stack_save, const void* bottom, size_t size) {
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(fake_stack_save, bottom, size);
#else
  (void)fake_stack_save, (void)bottom, (void)size;
#endif
}
inline void asan_finish_switch(void* fake_stack, const void** old_bottom, size_t* old_size) {
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
#else
  (void)fake_stack, (void)old_bottom, (void)old_size;
#endif
}

// The current fiber gives the CPU back to its block's scheduler. Its `wait` says why (kDone: it
// finished and is never resumed, so ASan may drop its fake stack).
inline void park(Fiber& f) {
  Worker& w = *tls_worker;
  asan_start_switch(f.wait == Wait::kDone ? nullptr : &f.fake_stack, w.sched_bottom, w.sched_size);
  emu_fiber_switch(&f.sp, w.sched_sp);
  asan_finish_switch(f.fake_stack, &w.sched_bottom, &w.sched_size);
}

extern "C" [[noreturn]] inline void emu_fiber_main() {
  Worker& w = *tls_worker;
  asan_finish_switch(nullptr, &w.sched_bottom, &w.sched_size);
  Fiber& f = *tls_fiber;
  w.entry(w.closure);
  f.wait = Wait::kDone;
  f.what = "exited";
  --w.live;
  park(f);
  fail("a finished fiber was resumed");
}

inline void init_fiber(Fiber& f, char* stack) {
#ifdef EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(stack, kFiberStack);  // frames left by the previous block's fibers
#endif
  f.stack = stack;
  auto** sp = reinterpret_cast<void**>(stack + kFiberStack);  // 16-byte aligned top
  *--sp = nullptr;                                            // emu_fiber_main's return address
  *--sp = reinterpret_cast<void*>(&emu_fiber_main);           // where emu_fiber_switch's ret goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;                // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.wait = Wait::kReady;
  f.what = "";
  f.fake_stack = nullptr;
}

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Prints every thread's state, grouped into runs of consecutive threads, then aborts.
[[noreturn]] inline void report_deadlock(const Worker& w, int mode) {
  std::fprintf(
      stderr,
      "cuda_emu: deadlock in kernel %s, block (%u,%u,%u) of grid (%u,%u,%u), EMU_ORDER=%d: "
      "no thread can run (a thread returned or skipped a collective its block or warp "
      "still waits at)\n",
      w.kernel, tls_block_idx.x, tls_block_idx.y, tls_block_idx.z, tls_grid_dim.x, tls_grid_dim.y,
      tls_grid_dim.z, mode);
  const auto& fs = w.fibers;
  for (size_t i = 0; i < fs.size();) {
    size_t j = i + 1;
    auto same = [&](const Fiber& a, const Fiber& b) {
      return a.wait == b.wait && std::strcmp(a.what, b.what) == 0 &&
             a.where.line() == b.where.line();
    };
    while (j < fs.size() && same(fs[i], fs[j])) ++j;
    if (fs[i].wait == Wait::kDone) {
      std::fprintf(stderr, "  threads %zu-%zu: exited\n", i, j - 1);
    } else {
      std::fprintf(stderr, "  threads %zu-%zu: waiting at %s (%s:%u)\n", i, j - 1, fs[i].what,
                   base_name(fs[i].where.file_name()), fs[i].where.line());
    }
    i = j;
  }
  std::fflush(stderr);
  std::abort();
}

inline void run_block(Worker& w, int mode, uint64_t block_seed) {
  const int n = static_cast<int>(tls_block_dim.x * tls_block_dim.y * tls_block_dim.z);
  w.reserve_stacks(n);
  w.fibers.assign(n, Fiber{});
  w.warps.assign((n + kWarpSize - 1) / kWarpSize, WarpState{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    init_fiber(f, w.stack_of(i));
    f.linear = i;
    f.lane = i % kWarpSize;
    f.warp = i / kWarpSize;
    f.tid = uint3{static_cast<unsigned>(i) % tls_block_dim.x,
                  static_cast<unsigned>(i) / tls_block_dim.x % tls_block_dim.y,
                  static_cast<unsigned>(i) / (tls_block_dim.x * tls_block_dim.y)};
  }
  for (size_t k = 0; k < w.warps.size(); ++k)
    w.warps[k].size = std::min(kWarpSize, n - static_cast<int>(k) * kWarpSize);
  w.barrier_arrived = w.barrier_count = 0;
  w.live = n;

  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = mode == 1 ? n - 1 - i : i;
  uint64_t rng = block_seed;
  while (w.live > 0) {
    if (mode == 2) {
      for (int i = n - 1; i > 0; --i) std::swap(order[i], order[splitmix64(rng) % (i + 1)]);
    }
    bool progressed = false;
    auto run = [&](Fiber& f) {
      progressed = true;
      tls_fiber = &f;
      asan_start_switch(&w.sched_fake_stack, f.stack, kFiberStack);
      emu_fiber_switch(&w.sched_sp, f.sp);
      asan_finish_switch(w.sched_fake_stack, nullptr, nullptr);
    };
    if (mode == 3) {  // warp after warp, the last first: each until none of its lanes can run
      for (int warp = static_cast<int>(w.warps.size()) - 1; warp >= 0; --warp) {
        const int first = warp * kWarpSize, end = first + w.warps[warp].size;
        for (bool again = true; again;) {
          again = false;
          for (int i = first; i < end; ++i) {
            if (w.fibers[i].wait == Wait::kReady) run(w.fibers[i]), again = true;
          }
        }
      }
    } else {
      for (int idx : order) {
        if (w.fibers[idx].wait == Wait::kReady) run(w.fibers[idx]);
      }
    }
    tls_fiber = nullptr;
    if (!progressed) report_deadlock(w, mode);
  }
}

inline unsigned lanes_mask(int size) { return size == kWarpSize ? kFullMask : (1u << size) - 1u; }

inline void check_mask(unsigned mask, const char* what, std::source_location loc) {
  const Fiber& f = *tls_fiber;
  const unsigned existing = lanes_mask(tls_worker->warps[f.warp].size);
  if (mask != kFullMask && mask != existing) {
    fail(
        "%s(mask=0x%08x) at %s:%u in kernel %s, block (%u,%u,%u), thread %d: the emulator supports "
        "full-warp masks only (0xffffffff%s)",
        what, mask, base_name(loc.file_name()), loc.line(), tls_worker->kernel, tls_block_idx.x,
        tls_block_idx.y, tls_block_idx.z, f.linear,
        existing == kFullMask ? "" : ", or the existing lanes");
  }
}

inline void resolve_tensor_core(Worker& w, int warp);  // below, with the tensor-core PTX

// Every lane of the warp has arrived at a collective: check they agree, compute each lane's
// result and release them.
inline void resolve_warp(Worker& w, int warp) {
  Fiber* lanes = &w.fibers[warp * kWarpSize];
  const int size = w.warps[warp].size;
  for (int l = 1; l < size; ++l) {
    if (lanes[l].op != lanes[0].op || lanes[l].width != lanes[0].width) {
      fail(
          "lanes 0 and %d of warp %d in kernel %s, block (%u,%u,%u) reached different warp "
          "collectives: %s (%s:%u) and %s (%s:%u)",
          l, warp, w.kernel, tls_block_idx.x, tls_block_idx.y, tls_block_idx.z, lanes[0].what,
          base_name(lanes[0].where.file_name()), lanes[0].where.line(), lanes[l].what,
          base_name(lanes[l].where.file_name()), lanes[l].where.line());
    }
  }
  if (lanes[0].op == WarpOp::kMma || lanes[0].op == WarpOp::kLdmatrix) {
    resolve_tensor_core(w, warp);
    for (int l = 0; l < size; ++l) lanes[l].wait = Wait::kReady;
    return;
  }
  unsigned ballot = 0;
  for (int l = 0; l < size; ++l) ballot |= (lanes[l].in != 0 ? 1u : 0u) << l;
  for (int l = 0; l < size; ++l) {
    Fiber& f = lanes[l];
    const int width = f.width;
    const int seg = l & ~(width - 1);  // first lane of this lane's width-segment
    int src = l;
    switch (f.op) {
      case WarpOp::kSync:
        break;
      case WarpOp::kShfl:
        src = seg + (f.arg & (width - 1));
        break;
      case WarpOp::kShflXor:
        src = l ^ f.arg;
        src = src >= seg + width ? l : src;
        break;
      case WarpOp::kShflUp:
        src = l - f.arg >= seg ? l - f.arg : l;
        break;
      case WarpOp::kShflDown:
        src = l + f.arg < seg + width ? l + f.arg : l;
        break;
      case WarpOp::kBallot:
        f.out = ballot;
        break;
      case WarpOp::kAny:
        f.out = ballot != 0;
        break;
      case WarpOp::kAll:
        f.out = ballot == lanes_mask(size);
        break;
    }
    if (f.op == WarpOp::kShfl || f.op == WarpOp::kShflXor || f.op == WarpOp::kShflUp ||
        f.op == WarpOp::kShflDown) {
      if (src < 0 || src >= size) {
        fail(
            "%s at %s:%u in kernel %s, block (%u,%u,%u): lane %d of warp %d reads lane %d, which "
            "does not exist (the warp has %d lanes)",
            f.what, base_name(f.where.file_name()), f.where.line(), w.kernel, tls_block_idx.x,
            tls_block_idx.y, tls_block_idx.z, l, warp, src, size);
      }
      f.out = lanes[src].in;
    }
  }
  for (int l = 0; l < size; ++l) lanes[l].wait = Wait::kReady;
}

inline uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                                const char* what, std::source_location loc) {
  if (tls_fiber == nullptr) fail("%s called outside a kernel", what);
  check_mask(mask, what, loc);
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0) {
    fail("%s at %s:%u: width %d is not a power of two in 1..32", what, base_name(loc.file_name()),
         loc.line(), width);
  }
  Worker& w = *tls_worker;
  Fiber& f = *tls_fiber;
  f.op = op, f.mask = mask, f.in = value, f.arg = arg, f.width = width;
  f.what = what, f.where = loc;
  WarpState& ws = w.warps[f.warp];
  if (++ws.arrived == ws.size) {
    ws.arrived = 0;
    resolve_warp(w, f.warp);  // the last lane goes on without yielding
  } else {
    f.wait = Wait::kWarp;
    park(f);
  }
  return f.out;
}

inline int block_barrier(int pred, const char* what, std::source_location loc) {
  if (tls_fiber == nullptr) fail("%s called outside a kernel", what);
  Worker& w = *tls_worker;
  Fiber& f = *tls_fiber;
  f.what = what, f.where = loc;
  w.barrier_count += pred != 0;
  if (++w.barrier_arrived == static_cast<int>(w.fibers.size())) {
    const int count = w.barrier_count;
    w.barrier_arrived = w.barrier_count = 0;
    for (Fiber& g : w.fibers) {
      if (g.wait == Wait::kBarrier) g.wait = Wait::kReady, g.out = static_cast<uint64_t>(count);
    }
    f.out = static_cast<uint64_t>(count);
  } else {
    f.wait = Wait::kBarrier;
    park(f);
  }
  return static_cast<int>(f.out);
}

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8, "the emulator shuffles values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, sizeof(T));
  return v;
}

// ---- launches -----------------------------------------------------------------------------------

inline void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, Entry entry,
                     const void* closure);

// `LAUNCH(grid, block, smem, stream, kernel)(args...)` under CUDA_EMU: converts the arguments to
// the kernel's parameter types once (as a launch copies them), then runs every block.
template <typename... Params>
struct Launch {
  const char* name;
  dim3 grid, block;
  size_t smem;
  void (*kernel)(Params...);

  Launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t,
         void (*kernel)(Params...))
      : name(name), grid(grid), block(block), smem(smem), kernel(kernel) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    struct Closure {
      void (*kernel)(Params...);
      std::tuple<Params...> params;
    } closure{kernel, std::tuple<Params...>(std::forward<Args>(args)...)};
    Entry entry = [](const void* c) {
      const auto* cl = static_cast<const Closure*>(c);
      std::apply(cl->kernel, cl->params);
    };
    run_grid(name, grid, block, smem, entry, &closure);
  }
};

}  // namespace emu

// The one dynamic shared memory array (common.cuh declares it `extern __shared__`). The dynamic
// initialiser is deliberate: without one, g++ 12 with -fPIC calls a missing TLS init function
// through address 0 when another declaration is `extern`.
inline unsigned char emu_dyn_smem_first_byte() { return 0xFF; }
alignas(16) inline thread_local unsigned char dyn_smem[emu::kMaxDynSmem] = {
    emu_dyn_smem_first_byte()};

namespace emu {

inline void run_grid(const char* kernel, dim3 grid, dim3 block, size_t smem, Entry entry,
                     const void* closure) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 0x7fffffffu) {
    tls_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > kMaxDynSmem) {
    tls_last_error = cudaErrorInvalidValue;
    return;
  }
  g_launches.fetch_add(1);
  Worker& w = worker();
  Worker* outer_worker = tls_worker;
  if (outer_worker != nullptr)
    fail("kernel %s launched from inside kernel %s", kernel, outer_worker->kernel);
  tls_worker = &w;
  w.entry = entry, w.closure = closure, w.kernel = kernel, w.smem = smem;
  tls_grid_dim = grid;
  tls_block_dim = block;
  const int mode = order();
  const uint64_t base_seed = seed();
  unsigned char* smem_bytes = dyn_smem;  // (the TLS wrapper runs the dummy initialiser here)
#ifdef EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(smem_bytes, kMaxDynSmem);
  ASAN_POISON_MEMORY_REGION(smem_bytes + smem, kMaxDynSmem - smem);
#endif
  uint64_t block_id = 0;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x, ++block_id) {
        tls_block_idx = uint3{x, y, z};
        std::memset(smem_bytes, 0xFF, smem);
        run_block(w, mode, base_seed ^ (block_id * 0x9e3779b97f4a7c15ull));
      }
    }
  }
#ifdef EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(smem_bytes, kMaxDynSmem);
#endif
  tls_worker = nullptr;
}

// ---- tensor-core PTX ----------------------------------------------------------------------------
// What csrc/kernels/mma.cuh calls under CUDA_EMU where nvcc gets inline PTX. The lane-to-element
// maps are the PTX ISA's ("Matrix Fragments for mma.m16n8k16 with floating point type" and
// "Warp-level matrix load instruction: ldmatrix"), with groupID = lane >> 2 and
// threadID_in_group = lane % 4; tests/test_cuda_tensor_core.py checks them against those tables
// written out independently, and against float64 matmuls. Each 32-bit register holds two 16-bit
// elements, the lower-numbered one in its low half.

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: D = A (16x16) B (16x8) + C.
struct MmaLane {
  uint32_t a[4];  // a0..a7
  uint32_t b[2];  // b0..b3
  float c[4];
  float d[4];
};
// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16: matrix j's row r comes from the address
// lane 8 j + r holds; lane l receives one 32-bit register per matrix.
struct LdmatrixLane {
  const void* row;
  uint32_t r[4];
};

constexpr int kMmaF16 = 0, kMmaBf16 = 1;

// Element i (0..7) of A's fragment in lane l sits at row a_row, column a_col; B's element i (0..3)
// at row (k) b_row, column (n) b_col; C's and D's element i (0..3) at c_row, c_col.
inline int mma_a_row(int lane, int i) { return (lane >> 2) + 8 * ((i >> 1) & 1); }
inline int mma_a_col(int lane, int i) { return (lane % 4) * 2 + (i & 1) + 8 * (i >> 2); }
inline int mma_b_row(int lane, int i) { return (lane % 4) * 2 + (i & 1) + 8 * (i >> 1); }
inline int mma_b_col(int lane, int /*i*/) { return lane >> 2; }
inline int mma_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
inline int mma_c_col(int lane, int i) { return (lane % 4) * 2 + (i & 1); }

inline double half_bits_to_double(uint16_t bits, int type) {
  if (type == kMmaF16) {
    __half_raw raw;
    raw.x = bits;
    return static_cast<double>(__half2float(__half(raw)));
  }
  return static_cast<double>(std::bit_cast<float>(static_cast<uint32_t>(bits) << 16));
}
inline uint16_t element_of(const uint32_t* regs, int i) {
  return static_cast<uint16_t>(regs[i >> 1] >> (16 * (i & 1)));
}

[[noreturn]] inline void tensor_core_fail(const Fiber& f, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));
inline void tensor_core_fail(const Fiber& f, const char* fmt, ...) {
  char message[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(message, sizeof message, fmt, args);
  va_end(args);
  fail("%s at %s:%u in kernel %s, block (%u,%u,%u), thread %d: %s", f.what,
       base_name(f.where.file_name()), f.where.line(), tls_worker->kernel, tls_block_idx.x,
       tls_block_idx.y, tls_block_idx.z, f.linear, message);
}

// Where the shared-memory bytes [p, p + bytes) sit in the launch's dynamic shared memory (the
// only shared memory tensor-core kernels address), else abort naming the access.
inline const unsigned char* smem_bytes(const Fiber& f, const void* p, size_t bytes, size_t align);

inline void resolve_tensor_core(Worker& w, int warp) {
  Fiber* lanes = &w.fibers[warp * kWarpSize];
  if (w.warps[warp].size != kWarpSize)
    tensor_core_fail(lanes[0], "a partial warp of %d lanes (the instruction needs all 32)",
                     w.warps[warp].size);
  for (int l = 1; l < kWarpSize; ++l) {
    if (lanes[l].arg != lanes[0].arg)
      tensor_core_fail(lanes[l], "lane %d's variant %d differs from lane 0's %d", l, lanes[l].arg,
                       lanes[0].arg);
  }
  if (lanes[0].op == WarpOp::kMma) {
    const int type = lanes[0].arg;
    double a[16][16], b[16][8], c[16][8];
    for (int l = 0; l < kWarpSize; ++l) {
      const auto& in = *static_cast<const MmaLane*>(lanes[l].payload);
      for (int i = 0; i < 8; ++i)
        a[mma_a_row(l, i)][mma_a_col(l, i)] = half_bits_to_double(element_of(in.a, i), type);
      for (int i = 0; i < 4; ++i) {
        b[mma_b_row(l, i)][mma_b_col(l, i)] = half_bits_to_double(element_of(in.b, i), type);
        c[mma_c_row(l, i)][mma_c_col(l, i)] = in.c[i];
      }
    }
    for (int l = 0; l < kWarpSize; ++l) {
      auto& out = *static_cast<MmaLane*>(const_cast<void*>(lanes[l].payload));
      for (int i = 0; i < 4; ++i) {
        const int row = mma_c_row(l, i), col = mma_c_col(l, i);
        double sum = c[row][col];  // products of 16-bit inputs are exact; one rounding at the end
        for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
        out.d[i] = static_cast<float>(sum);
      }
    }
    return;
  }
  // ldmatrix: arg = matrices (1, 2, 4) | 8 when .trans
  const int matrices = lanes[0].arg & 7;
  const bool trans = (lanes[0].arg & 8) != 0;
  uint16_t m[4][8][8];  // [matrix][row][column] as stored in shared memory
  for (int j = 0; j < matrices; ++j) {
    for (int r = 0; r < 8; ++r) {
      const Fiber& src = lanes[8 * j + r];
      const void* row = static_cast<const LdmatrixLane*>(src.payload)->row;
      std::memcpy(m[j][r], smem_bytes(src, row, 16, 16), 16);
    }
  }
  for (int l = 0; l < kWarpSize; ++l) {
    auto& out = *static_cast<LdmatrixLane*>(const_cast<void*>(lanes[l].payload));
    for (int j = 0; j < matrices; ++j) {
      uint16_t lo, hi;
      if (trans) {
        lo = m[j][2 * (l % 4)][l >> 2];
        hi = m[j][2 * (l % 4) + 1][l >> 2];
      } else {
        lo = m[j][l >> 2][2 * (l % 4)];
        hi = m[j][l >> 2][2 * (l % 4) + 1];
      }
      out.r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

inline void tensor_core_collective(WarpOp op, int arg, void* payload, const char* what,
                                   std::source_location loc) {
  if (tls_fiber == nullptr) fail("%s called outside a kernel", what);
  Worker& w = *tls_worker;
  Fiber& f = *tls_fiber;
  f.op = op, f.mask = kFullMask, f.arg = arg, f.width = kWarpSize, f.payload = payload;
  f.what = what, f.where = loc;
  WarpState& ws = w.warps[f.warp];
  if (++ws.arrived == ws.size) {
    ws.arrived = 0;
    resolve_warp(w, f.warp);
  } else {
    f.wait = Wait::kWarp;
    park(f);
  }
  f.payload = nullptr;
}

inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4], int type, std::source_location loc) {
  MmaLane lane;
  std::memcpy(lane.a, a, sizeof lane.a);
  std::memcpy(lane.b, b, sizeof lane.b);
  std::memcpy(lane.c, c, sizeof lane.c);
  tensor_core_collective(WarpOp::kMma, type, &lane,
                         type == kMmaF16 ? "mma.m16n8k16.f16" : "mma.m16n8k16.bf16", loc);
  std::memcpy(d, lane.d, sizeof lane.d);
}

inline void ldmatrix(uint32_t* r, int matrices, bool trans, const void* row,
                     std::source_location loc) {
  LdmatrixLane lane{row, {}};
  tensor_core_collective(WarpOp::kLdmatrix, matrices | (trans ? 8 : 0), &lane,
                         trans ? "ldmatrix.trans" : "ldmatrix", loc);
  for (int j = 0; j < matrices; ++j) r[j] = lane.r[j];
}

inline const unsigned char* smem_bytes(const Fiber& f, const void* p, size_t bytes, size_t align) {
  const auto* q = static_cast<const unsigned char*>(p);
  const unsigned char* base = ::dyn_smem;
  if (reinterpret_cast<uintptr_t>(q) % align != 0)
    tensor_core_fail(f, "shared address %p is not aligned to %zu bytes", p, align);
  if (q < base || q + bytes > base + tls_worker->smem) {
    tensor_core_fail(f, "shared address %p (%zu bytes) is outside the launch's %zu bytes of "
                        "dynamic shared memory", p, bytes, tls_worker->smem);
  }
  return q;
}

// cp.async.{ca,cg}.shared.global [dst], [src], size, src_size: reads src_size bytes now, then
// zeros up to size; dst holds the 0xFF poison from the issue until a wait_group retires the copy's
// group and writes them (the two ends of the window in which the chip may write them).
inline void cp_async(void* dst, const void* src, int size, int src_size, bool cg,
                     std::source_location loc) {
  if (tls_fiber == nullptr) fail("cp.async called outside a kernel");
  Fiber& f = *tls_fiber;
  f.what = cg ? "cp.async.cg" : "cp.async.ca", f.where = loc;
  if (size != 4 && size != 8 && size != 16) tensor_core_fail(f, "size %d is not 4, 8 or 16", size);
  if (cg && size != 16) tensor_core_fail(f, "cp.async.cg copies 16 bytes, not %d", size);
  if (src_size < 0 || src_size > size)
    tensor_core_fail(f, "src_size %d is outside 0..%d", src_size, size);
  if (reinterpret_cast<uintptr_t>(src) % size != 0)
    tensor_core_fail(f, "global address %p is not aligned to %d bytes", src, size);
  smem_bytes(f, dst, size, size);
  AsyncCopy copy{dst, size, f.commits, {}};
  if (src_size > 0) std::memcpy(copy.bytes, src, src_size);
  f.copies.push_back(copy);
  // On the chip the bytes may land any time from now: the destination is clobbered (0xFF) at once,
  // so a thread still reading the old contents (a missing barrier before the reuse) sees NaN.
  std::memset(dst, 0xFF, size);
}
inline void cp_async_commit() {
  if (tls_fiber == nullptr) fail("cp.async.commit_group called outside a kernel");
  ++tls_fiber->commits;
}
// cp.async.wait_group n: every committed group but the n most recent has landed.
inline void cp_async_wait(int n) {
  if (tls_fiber == nullptr) fail("cp.async.wait_group called outside a kernel");
  Fiber& f = *tls_fiber;
  size_t kept = 0;
  for (size_t i = 0; i < f.copies.size(); ++i) {
    AsyncCopy& copy = f.copies[i];
    if (copy.group < f.commits - n) {
      std::memcpy(copy.dst, copy.bytes, copy.size);
    } else {
      f.copies[kept++] = copy;
    }
  }
  f.copies.resize(kept);
}

}  // namespace emu

// ---- the CUDA built-ins kernels use ---------------------------------------------------------

#define threadIdx (::emu::tls_fiber->tid)
#define blockIdx (::emu::tls_block_idx)
#define blockDim (::emu::tls_block_dim)
#define gridDim (::emu::tls_grid_dim)
constexpr int warpSize = emu::kWarpSize;

inline void __syncthreads(std::source_location loc = std::source_location::current()) {
  emu::block_barrier(0, "__syncthreads", loc);
}
inline int __syncthreads_count(int pred,
                               std::source_location loc = std::source_location::current()) {
  return emu::block_barrier(pred, "__syncthreads_count", loc);
}
inline int __syncthreads_and(int pred, std::source_location loc = std::source_location::current()) {
  return emu::block_barrier(pred, "__syncthreads_and", loc) ==
         static_cast<int>(emu::tls_worker->fibers.size());
}
inline int __syncthreads_or(int pred, std::source_location loc = std::source_location::current()) {
  return emu::block_barrier(pred, "__syncthreads_or", loc) != 0;
}
inline void __syncwarp(unsigned mask = emu::kFullMask,
                       std::source_location loc = std::source_location::current()) {
  emu::warp_collective(emu::WarpOp::kSync, mask, 0, 0, emu::kWarpSize, "__syncwarp", loc);
}
inline unsigned __activemask() {
  return emu::lanes_mask(emu::tls_worker->warps[emu::tls_fiber->warp].size);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              std::source_location loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::WarpOp::kShfl, mask, emu::to_bits(var),
                                                src_lane, width, "__shfl_sync", loc));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  std::source_location loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::WarpOp::kShflXor, mask, emu::to_bits(var),
                                                lane_mask, width, "__shfl_xor_sync", loc));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 std::source_location loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::WarpOp::kShflUp, mask, emu::to_bits(var),
                                                static_cast<int>(delta), width, "__shfl_up_sync",
                                                loc));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   std::source_location loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::WarpOp::kShflDown, mask, emu::to_bits(var),
                                                static_cast<int>(delta), width, "__shfl_down_sync",
                                                loc));
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              std::source_location loc = std::source_location::current()) {
  return static_cast<unsigned>(emu::warp_collective(emu::WarpOp::kBallot, mask, pred != 0, 0,
                                                    warpSize, "__ballot_sync", loc));
}
inline int __any_sync(unsigned mask, int pred,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      emu::warp_collective(emu::WarpOp::kAny, mask, pred != 0, 0, warpSize, "__any_sync", loc));
}
inline int __all_sync(unsigned mask, int pred,
                      std::source_location loc = std::source_location::current()) {
  return static_cast<int>(
      emu::warp_collective(emu::WarpOp::kAll, mask, pred != 0, 0, warpSize, "__all_sync", loc));
}

// Atomics: blocks run one at a time, but launches may come from several host threads.
template <typename T>
T atomicAdd(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_add(val);
}
template <typename T>
T atomicExch(T* address, T val) {
  return std::atomic_ref<T>(*address).exchange(val);
}
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, val);
  return compare;  // the old value, whether or not it swapped
}
template <typename T>
T atomicMax(T* address, T val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < val && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T val) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (val < old && !ref.compare_exchange_weak(old, val)) {
  }
  return old;
}

template <typename T>
T __ldg(const T* ptr) {
  return *ptr;
}
template <typename T>
T __ldcg(const T* ptr) {  // ld.global.cg: through L2 on a GPU; one memory here
  return *ptr;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Integer and bit intrinsics.
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : std::countl_zero(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero(static_cast<unsigned>(x)) + 1; }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }

// Float intrinsics: the GPU's fast approximations are exact here (tolerances must allow for that).
// glibc declares __expf/__logf but does not export them: define them, with its declaration's
// linkage and exception specification.
extern "C" inline float __expf(float x) noexcept { return expf(x); }
extern "C" inline float __logf(float x) noexcept { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.0f), 1.0f); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// Half / bfloat16 functions that cuda_fp16.h / cuda_bf16.h define for the device only.
inline __half hexp(__half a) { return __float2half_rn(expf(__half2float(a))); }
inline __half htanh(__half a) { return __float2half_rn(tanhf(__half2float(a))); }
inline __half __hfma(__half a, __half b, __half c) {
  return __float2half_rn(fmaf(__half2float(a), __half2float(b), __half2float(c)));
}
inline __half2 h2exp(__half2 a) {
  return __halves2half2(hexp(__low2half(a)), hexp(__high2half(a)));
}
inline __nv_bfloat16 hexp(__nv_bfloat16 a) {
  return __float2bfloat16_rn(expf(__bfloat162float(a)));
}
inline __nv_bfloat16 htanh(__nv_bfloat16 a) {
  return __float2bfloat16_rn(tanhf(__bfloat162float(a)));
}
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __float2bfloat16_rn(fmaf(__bfloat162float(a), __bfloat162float(b), __bfloat162float(c)));
}

// ---- the runtime calls launchers and bindings make -------------------------------------------

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::tls_last_error;
  emu::tls_last_error = cudaSuccess;
  return err;
}
inline cudaError_t cudaPeekAtLastError() { return emu::tls_last_error; }
inline const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    default:
      return "cudaError (emulated)";
  }
}
inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    default:
      return "unknown error (emulated)";
  }
}
