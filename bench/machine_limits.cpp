// Peak FMA throughput and triad bandwidth (see machine_limits.h).
#include "machine_limits.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <memory>
#include <sstream>

#include "core/pool.h"
#include "devpipe/error.h"

namespace devpipe::bench {
namespace {

using Clock = std::chrono::steady_clock;

// a = a * m + c on independent accumulators: enough of them to cover the FMA latency times the
// FMA ports (4 cycles x 2 ports on current x86 cores). m < 1 keeps the values bounded.

__attribute__((target("avx2,fma"))) float fma_loop_avx2(std::int64_t iters) {
  constexpr int kAcc = 12;
  __m256 a[kAcc];
  for (int j = 0; j < kAcc; ++j) a[j] = _mm256_set1_ps(1.0f + 0.01f * static_cast<float>(j));
  const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
  for (std::int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < kAcc; ++j) a[j] = _mm256_fmadd_ps(a[j], m, c);
  }
  __m256 s = a[0];
  for (int j = 1; j < kAcc; ++j) s = _mm256_add_ps(s, a[j]);
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  return out[0] + out[7];
}
constexpr double kFlopsPerIterAvx2 = 12 * 8 * 2;

__attribute__((target("avx512f"))) float fma_loop_avx512(std::int64_t iters) {
  constexpr int kAcc = 16;
  __m512 a[kAcc];
  for (int j = 0; j < kAcc; ++j) a[j] = _mm512_set1_ps(1.0f + 0.01f * static_cast<float>(j));
  const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
  for (std::int64_t i = 0; i < iters; ++i) {
    for (int j = 0; j < kAcc; ++j) a[j] = _mm512_fmadd_ps(a[j], m, c);
  }
  __m512 s = a[0];
  for (int j = 1; j < kAcc; ++j) s = _mm512_add_ps(s, a[j]);
  return _mm512_reduce_add_ps(s);
}
constexpr double kFlopsPerIterAvx512 = 16 * 16 * 2;

/// Seconds `threads` threads take to run `fn(iters)` each (all started together).
template <class Fn>
double timed_parallel(int threads, Fn fn) {
  const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads)
  fn();
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

volatile float g_sink = 0;  // keeps the FMA results alive

}  // namespace

std::vector<std::string> cpu_isa_flags() {
  static const char* kInteresting[] = {"sse4_2",     "avx",         "avx2",        "fma",
                                       "f16c",       "avx512f",     "avx512bw",    "avx512vl",
                                       "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile",
                                       "amx_bf16"};
  std::ifstream ci("/proc/cpuinfo");
  std::vector<std::string> out;
  for (std::string line; std::getline(ci, line);) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream words(line.substr(line.find(':') + 1));
    std::vector<std::string> have{std::istream_iterator<std::string>(words), {}};
    for (const char* f : kInteresting) {
      if (std::find(have.begin(), have.end(), f) != have.end()) out.emplace_back(f);
    }
    break;
  }
  return out;
}

MachineLimits measure_machine_limits(int threads) {
  MachineLimits r;
  r.threads = std::max(1, threads);
  const auto start = Clock::now();
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 && !(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) {
    throw StateError("bench: the CPU has neither AVX-512 nor AVX2+FMA; cannot measure peak FMA throughput");
  }
  r.fma_isa = avx512 ? "avx512f" : "avx2+fma";
  const double per_iter = avx512 ? kFlopsPerIterAvx512 : kFlopsPerIterAvx2;
  auto fma = [&](std::int64_t iters) {
    return timed_parallel(r.threads, [&] {
      float v = avx512 ? fma_loop_avx512(iters) : fma_loop_avx2(iters);
      g_sink = g_sink + v;
    });
  };
  // Calibrate to about 40 ms a run, then keep the best of 3 runs.
  std::int64_t iters = 200000;
  double t = fma(iters);
  iters = std::max<std::int64_t>(iters, static_cast<std::int64_t>(static_cast<double>(iters) * 0.04 / t));
  double best = 1e30;
  for (int k = 0; k < 3; ++k) best = std::min(best, fma(iters));
  r.peak_gflops = per_iter * static_cast<double>(iters) * r.threads / best / 1e9;

  // Triad over 3 x 64 MiB (beyond any last-level cache), first touched by the threads that use
  // them; best of 6 passes after one untimed.
  const std::int64_t n = 16 << 20;
  r.triad_bytes = 3 * static_cast<std::size_t>(n) * sizeof(float);
  auto mk = [&] {
    return std::unique_ptr<float, void (*)(void*)>(
        static_cast<float*>(devpipe::detail::host_alloc(static_cast<std::size_t>(n) * sizeof(float))),
        [](void* p) { std::free(p); });
  };
  auto a = mk(), b = mk(), c = mk();
  if (!a || !b || !c) throw StateError("bench: cannot allocate the triad's 192 MiB");
  float *pa = a.get(), *pb = b.get(), *pc = c.get();
#pragma omp parallel for schedule(static) num_threads(r.threads)
  for (std::int64_t i = 0; i < n; ++i) {
    pa[i] = 0.0f;
    pb[i] = 1.0f;
    pc[i] = 2.0f;
  }
  const float s = 0.5f;
  double best_triad = 1e30;
  for (int k = 0; k < 7; ++k) {
    const auto t0 = Clock::now();
#pragma omp parallel for schedule(static) num_threads(r.threads)
    for (std::int64_t i = 0; i < n; ++i) pa[i] = pb[i] + s * pc[i];
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    if (k > 0) best_triad = std::min(best_triad, dt);
  }
  g_sink = g_sink + pa[n / 2];
  r.triad_gbs = static_cast<double>(r.triad_bytes) / best_triad / 1e9;
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

}  // namespace devpipe::bench
