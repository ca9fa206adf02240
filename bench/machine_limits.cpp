// Peak FMA throughput and triad bandwidth (see machine_limits.h).
#include "machine_limits.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <ctime>
#include <utility>
#include <vector>
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

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

/// One parallel run: its wall time, and the sum over the threads of their work's rate per
/// second of their own CPU time (what the threads reach when they hold a core).
struct Timing {
  double wall_s = 0;
  double rate_on_cpu = 0;  // units of `work` per second
};

/// Runs `fn(thread, threads)` on `threads` threads started together; each returns its work.
template <class Fn>
Timing timed_parallel(int threads, Fn fn) {
  std::vector<double> rate(static_cast<std::size_t>(threads), 0.0);
  const auto t0 = Clock::now();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const double c0 = thread_cpu_seconds();
    const double work = fn(t, omp_get_num_threads());
    const double cpu = thread_cpu_seconds() - c0;
    rate[static_cast<std::size_t>(t)] = cpu > 0 ? work / cpu : 0;
  }
  Timing r;
  r.wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
  for (double v : rate) r.rate_on_cpu += v;
  return r;
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
    return timed_parallel(r.threads, [&](int, int) {
      float v = avx512 ? fma_loop_avx512(iters) : fma_loop_avx2(iters);
      g_sink = g_sink + v;
      return per_iter * static_cast<double>(iters);
    });
  };
  // Calibrate to about 40 ms a run, then keep the best of 3 runs.
  std::int64_t iters = 200000;
  const double t = fma(iters).wall_s;
  iters = std::max<std::int64_t>(iters, static_cast<std::int64_t>(static_cast<double>(iters) * 0.04 / t));
  double best = 1e30, best_on_cpu = 0;
  for (int k = 0; k < 3; ++k) {
    const Timing tm = fma(iters);
    best = std::min(best, tm.wall_s);
    best_on_cpu = std::max(best_on_cpu, tm.rate_on_cpu);
  }
  r.peak_gflops_wall = per_iter * static_cast<double>(iters) * r.threads / best / 1e9;
  r.peak_gflops = std::max(r.peak_gflops_wall, best_on_cpu / 1e9);

  // Triad over 3 x 64 MiB (beyond any last-level cache), first touched by the threads that use
  // them (the same static split as the timed passes); best of 6 passes after one untimed.
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
  auto chunk = [n](int t, int nt) {
    return std::pair<std::int64_t, std::int64_t>{n * t / nt, n * (t + 1) / nt};
  };
  timed_parallel(r.threads, [&](int t, int nt) {
    auto [lo, hi] = chunk(t, nt);
    for (std::int64_t i = lo; i < hi; ++i) {
      pa[i] = 0.0f;
      pb[i] = 1.0f;
      pc[i] = 2.0f;
    }
    return 0.0;
  });
  const float s = 0.5f;
  double best_triad = 1e30, best_triad_on_cpu = 0;
  for (int k = 0; k < 7; ++k) {
    const Timing tm = timed_parallel(r.threads, [&](int t, int nt) {
      auto [lo, hi] = chunk(t, nt);
      for (std::int64_t i = lo; i < hi; ++i) pa[i] = pb[i] + s * pc[i];
      return static_cast<double>(hi - lo) * 3 * sizeof(float);
    });
    if (k == 0) continue;
    best_triad = std::min(best_triad, tm.wall_s);
    best_triad_on_cpu = std::max(best_triad_on_cpu, tm.rate_on_cpu);
  }
  g_sink = g_sink + pa[n / 2];
  r.triad_gbs_wall = static_cast<double>(r.triad_bytes) / best_triad / 1e9;
  r.triad_gbs = std::max(r.triad_gbs_wall, best_triad_on_cpu / 1e9);
  r.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return r;
}

}  // namespace devpipe::bench
