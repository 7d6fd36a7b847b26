// The int8 weight stream of one GPT-2 124M decode step (48 projections + the LM head), one thread, through the
// kernels' own dot_tile: the (N, K) rows (kI8) against panels (kI8Panels), alternated, medians of R rounds.
// FLUSH=1 reads 1 GiB before each timed step, as a real step finds the weights: otherwise 124 MB stays in a large
// last-level cache between back-to-back runs of one layout and the numbers flatter whichever ran last.
//   g++ -O3 -std=c++17 -fopenmp -Icsrc/cpu benchmarks/bench_int8_layouts.cpp -o /tmp/int8_layouts
//   FLUSH=1 /tmp/int8_layouts 1 9; FLUSH=1 /tmp/int8_layouts 8 9     (rows per step, rounds)
#include "isa.h"

#include <sys/mman.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,f16c")
#define GPT2FAST_ISA_AVX512 1
#define LANES 16
namespace gpt2fast_cpu {
#include "dot.h"
}  // namespace gpt2fast_cpu
using namespace gpt2fast_cpu;

static int8_t* huge_bytes(size_t bytes) {
  const size_t page = size_t(2) << 20;
  bytes = (bytes + page - 1) / page * page;
  void* p = std::aligned_alloc(page, bytes);
  if (!p) {
    std::fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
    std::exit(1);
  }
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 1, bytes);
  return static_cast<int8_t*>(p);
}

struct Matrix {
  int64_t N, K;
  int8_t* rows;    // [N, K]
  int8_t* panels;  // [ceil(N/16)][K/4][16][4]
  std::vector<float> scale;
};

int main(int argc, char** argv) {
  const int64_t M = argc > 1 ? std::atoi(argv[1]) : 1;
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 9;
  if (M < 1 || M > 64 || rounds < 1) {  // one tile of rows (linear.h's kTileM), as a decode step has
    std::fprintf(stderr, "usage: int8_layouts ROWS(1..64) ROUNDS(>=1)\n");
    return 2;
  }
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (N, K)
  for (int layer = 0; layer < 12; ++layer)
    shapes.insert(shapes.end(), {{2304, 768}, {768, 768}, {3072, 768}, {768, 3072}});
  shapes.push_back({50257, 768});
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> value(-127, 127);
  std::vector<Matrix> ms;
  for (auto [N, K] : shapes) {
    const int64_t Np = (N + 15) / 16 * 16;
    Matrix m{N, K, huge_bytes(size_t(N * K)), huge_bytes(size_t(Np * K)), std::vector<float>(size_t(N), 0.01f)};
    for (int64_t i = 0; i < N * K; ++i) m.rows[i] = int8_t(value(rng));
    for (int64_t n = 0; n < Np; ++n)
      for (int64_t k = 0; k < K; ++k)
        m.panels[(n / 16) * 16 * K + (k / 4) * 64 + (n % 16) * 4 + k % 4] = n < N ? m.rows[n * K + k] : 0;
    ms.push_back(std::move(m));
  }
  std::vector<int8_t> x(size_t(M * 3072));
  for (auto& v : x) v = int8_t(value(rng));
  std::vector<float> x_scale(size_t(M), 0.02f), y(64 * 64);
  std::vector<int32_t> x_sum(size_t(M), 0);
  const size_t flush_bytes = size_t(1) << 30;
  int8_t* flush = std::getenv("FLUSH") ? huge_bytes(flush_bytes) : nullptr;
  double sink = 0;
  auto step = [&](bool panels) {
    for (const Matrix& m : ms) {
      Activations a;
      a.M = M, a.K = a.Kp = m.K, a.u8 = x.data(), a.u8_scale = x_scale.data(), a.u8_sum = x_sum.data();
      const Weight w{panels ? m.panels : m.rows, panels ? kI8Panels : kI8, m.scale.data()};
      for (int64_t n0 = 0; n0 < m.N; n0 += 64) {  // linear.h's tiles of 64 channels
        dot_tile(a, w, n0, std::min(m.N, n0 + 64), y.data(), 64);
        sink += y[0];
      }
    }
  };
  std::vector<double> ms_of[2];
  for (int r = 0; r < rounds; ++r) {
    for (int panels = 0; panels < 2; ++panels) {
      if (flush)
        for (size_t i = 0; i < flush_bytes; i += 64) flush[i]++;
      const auto t0 = std::chrono::steady_clock::now();
      step(panels);
      ms_of[panels].push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  for (int panels = 0; panels < 2; ++panels) {
    auto& t = ms_of[panels];
    std::sort(t.begin(), t.end());
    std::printf("rows %lld, %s: median %.2f ms, min %.2f ms\n", (long long)M, panels ? "panels" : "(N, K) rows",
                t[t.size() / 2], t[0]);
  }
  return sink == 12345.0;  // keeps the results alive
}
