// The Linear kernel for few rows (token generation: x[M <= 16, K] @ w[N, K]^T), float32 and
// bfloat16. With so few rows a Linear is a matrix-vector product: it reads every weight once
// and does two flops per weight, so it runs at the memory bandwidth when the weight streams
// through once, in its own [N, K] layout (no copy at load). oneDNN 2.6's matmul reaches a
// fraction of that for these shapes.
//
// A block of R rows of x (AVX-512: up to 8, AVX2: up to 4) against C rows of w: R x C vector
// accumulators over K (bfloat16 weights widened to float32 in registers; accumulation in
// float32), one horizontal sum each, then bias, activation and the store in the output dtype.
// The tasks are ranges of weight rows, run on the executable's WorkPool (work_pool.h), so a
// decode step opens no OpenMP region here.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/kernel.h"
#include "backends/cpu/work_pool.h"
#include "devpipe/dtype.h"

namespace devpipe::cpu {

namespace {

constexpr std::int64_t kMaxRows = 16;
/// Weight bytes per task (a few microseconds of streaming), and the most tasks per run.
constexpr std::int64_t kTaskBytes = 48 << 10;
constexpr std::int64_t kMaxTasks = 64;

enum class Act { None, Relu, Gelu, GeluTanh, Silu };

Act act_of(const std::string& name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  return Act::None;  // "none" (the graph checked the name)
}

inline float activate(Act act, float v) {
  switch (act) {
    case Act::None:
      return v;
    case Act::Relu:
      return std::isnan(v) ? v : (v > 0.f ? v : 0.f);
    case Act::Gelu:
      return 0.5f * v * (1.f + std::erf(v * static_cast<float>(1.0 / std::numbers::sqrt2)));
    case Act::GeluTanh: {
      const float k = static_cast<float>(std::sqrt(2.0 / std::numbers::pi));
      return 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
    case Act::Silu:
      return v / (1.f + std::exp(-v));
  }
  return v;
}

#if defined(__x86_64__)

// GCC 12 warns that the _mm512_undefined_* inside its own intrinsic headers is used
// uninitialized (GCC bug 105593, fixed in 13): silenced for the AVX-512 code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

/// Rows of w per block for R rows of x (the accumulators, the C weight vectors and one x
/// vector stay in registers: AVX-512 has 32, AVX2 16).
constexpr int cols_avx512(int r) { return r <= 2 ? 8 : r == 3 ? 6 : r == 4 ? 4 : 3; }
constexpr int cols_avx2(int r) { return r <= 2 ? 4 : r == 3 ? 3 : 2; }
constexpr int kRowsAvx512 = 8, kRowsAvx2 = 4;

template <class T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <class T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline __m512 load16_masked(
    const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

/// out[r * C + c] = sum_j x[r * k + j] * w[c * k + j].
template <int R, int C, class T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void dot_block_avx512(
    const float* x, std::int64_t k, const T* w, float* out) {
  __m512 a[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) a[r][c] = _mm512_setzero_ps();
  }
  std::int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load16(w + c * k + j);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * k + j);
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  if (j < k) {
    const auto m = static_cast<__mmask16>((1u << (k - j)) - 1);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load16_masked(w + c * k + j, m);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * k + j);
      for (int c = 0; c < C; ++c) a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) out[r * C + c] = _mm512_reduce_add_ps(a[r][c]);
  }
}

#pragma GCC diagnostic pop

template <class T>
__attribute__((target("avx2,fma"))) inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float widen(float v) { return v; }
inline float widen(std::uint16_t v) { return bf16_to_float(v); }

template <int R, int C, class T>
__attribute__((target("avx2,fma"))) void dot_block_avx2(const float* x, std::int64_t k,
                                                        const T* w, float* out) {
  __m256 a[R][C];
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) a[r][c] = _mm256_setzero_ps();
  }
  std::int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    __m256 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load8(w + c * k + j);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * k + j);
      for (int c = 0; c < C; ++c) a[r][c] = _mm256_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float s = hsum8(a[r][c]);
      for (std::int64_t t = j; t < k; ++t) s += x[r * k + t] * widen(w[c * k + t]);
      out[r * C + c] = s;
    }
  }
}

#endif  // __x86_64__

class SmallRowsLinearKernel final : public Kernel {
 public:
  SmallRowsLinearKernel(const BuildContext& cx, CpuIsa isa, std::int64_t m, std::int64_t k,
                        std::int64_t n)
      : isa_(isa),
        bf16_(cx.out().dtype == DType::BFloat16),
        act_(act_of(cx.node.attrs.s("activation", "none"))),
        x_(cx.in_id(0)),
        w_(cx.in_id(1)),
        b_(cx.num_inputs() == 3 ? cx.in_id(2) : -1),
        y_(cx.out_id()),
        m_(m),
        k_(k),
        n_(n) {
    const std::int64_t elem = bf16_ ? 2 : 4;
    const std::int64_t want = (n * k * elem + kTaskBytes - 1) / kTaskBytes;
    const std::int64_t tasks = std::clamp<std::int64_t>(want, 1, kMaxTasks);
    // Rows per task: a multiple of 24 (whole blocks for every row count) when there are enough.
    rows_per_task_ = (n + tasks - 1) / tasks;
    if (n >= 48) rows_per_task_ = (rows_per_task_ + 23) / 24 * 24;
    tasks_ = (n + rows_per_task_ - 1) / rows_per_task_;
  }

  std::size_t scratch_bytes() const override {
    return bf16_ ? static_cast<std::size_t>(m_ * k_) * sizeof(float) : 0;  // x widened
  }

  bool wants_pool() const override { return true; }

  void run(const RunContext& cx) override {
    const float* x = reinterpret_cast<const float*>(cx.values[x_]);
    if (bf16_) {
      auto* wide = reinterpret_cast<float*>(cx.scratch);
      const auto* xs = reinterpret_cast<const std::uint16_t*>(cx.values[x_]);
      for (std::int64_t i = 0; i < m_ * k_; ++i) wide[i] = bf16_to_float(xs[i]);
      x = wide;
    }
    const std::byte* w = cx.values[w_];
    const std::byte* b = b_ >= 0 ? cx.values[b_] : nullptr;
    std::byte* y = cx.values[y_];
    auto rows = [&](std::int64_t n0, std::int64_t n1) {  // outputs [n0, n1) of every row
      if (bf16_) {
        run_rows(x, reinterpret_cast<const std::uint16_t*>(w), b, y, n0, n1);
      } else {
        run_rows(x, reinterpret_cast<const float*>(w), b, y, n0, n1);
      }
    };
    // A pool of one thread, or none (a caller without one), runs the tasks in order.
    if (!cx.pool || cx.pool->threads() <= 1 || tasks_ == 1) {
      rows(0, n_);
      return;
    }
    cx.pool->run(tasks_, [&](std::int64_t t) {
      const std::int64_t n0 = t * rows_per_task_;
      rows(n0, std::min(n_, n0 + rows_per_task_));
    });
  }

 private:
  /// Outputs [n0, n1) of every row.
  template <class T>
  void run_rows(const float* x, const T* w, const std::byte* b, std::byte* y, std::int64_t n0,
                std::int64_t n1) const {
#if defined(__x86_64__)
    const std::int64_t group = isa_ == CpuIsa::Avx512 ? kRowsAvx512 : kRowsAvx2;
    for (std::int64_t r0 = 0; r0 < m_; r0 += group) {
      const std::int64_t rows = std::min(group, m_ - r0);
      if (isa_ == CpuIsa::Avx512) {
        switch (rows) {
          case 1: block_rows<1, true>(x, w, b, y, r0, n0, n1); break;
          case 2: block_rows<2, true>(x, w, b, y, r0, n0, n1); break;
          case 3: block_rows<3, true>(x, w, b, y, r0, n0, n1); break;
          case 4: block_rows<4, true>(x, w, b, y, r0, n0, n1); break;
          case 5: block_rows<5, true>(x, w, b, y, r0, n0, n1); break;
          case 6: block_rows<6, true>(x, w, b, y, r0, n0, n1); break;
          case 7: block_rows<7, true>(x, w, b, y, r0, n0, n1); break;
          default: block_rows<8, true>(x, w, b, y, r0, n0, n1); break;
        }
      } else {
        switch (rows) {
          case 1: block_rows<1, false>(x, w, b, y, r0, n0, n1); break;
          case 2: block_rows<2, false>(x, w, b, y, r0, n0, n1); break;
          case 3: block_rows<3, false>(x, w, b, y, r0, n0, n1); break;
          default: block_rows<4, false>(x, w, b, y, r0, n0, n1); break;
        }
      }
    }
#endif
  }

#if defined(__x86_64__)
  template <int R, bool kAvx512, class T>
  void block_rows(const float* x, const T* w, const std::byte* b, std::byte* y, std::int64_t r0,
                  std::int64_t n0, std::int64_t n1) const {
    constexpr int C = kAvx512 ? cols_avx512(R) : cols_avx2(R);
    const float* xr = x + r0 * k_;
    float out[R * C];
    std::int64_t n = n0;
    for (; n + C <= n1; n += C) {
      if constexpr (kAvx512) {
        dot_block_avx512<R, C>(xr, k_, w + n * k_, out);
      } else {
        dot_block_avx2<R, C>(xr, k_, w + n * k_, out);
      }
      finish<R, C>(out, b, y, r0, n);
    }
    for (; n < n1; ++n) {
      if constexpr (kAvx512) {
        dot_block_avx512<R, 1>(xr, k_, w + n * k_, out);
      } else {
        dot_block_avx2<R, 1>(xr, k_, w + n * k_, out);
      }
      finish<R, 1>(out, b, y, r0, n);
    }
  }
#endif

  /// Adds the bias, applies the activation and stores rows [r0, r0 + R) x cols [n, n + C).
  template <int R, int C>
  void finish(const float* out, const std::byte* b, std::byte* y, std::int64_t r0,
              std::int64_t n) const {
    for (int c = 0; c < C; ++c) {
      float bias = 0.f;
      if (b) {
        bias = bf16_ ? bf16_to_float(reinterpret_cast<const std::uint16_t*>(b)[n + c])
                     : reinterpret_cast<const float*>(b)[n + c];
      }
      for (int r = 0; r < R; ++r) {
        const float v = activate(act_, out[r * C + c] + bias);
        const std::int64_t at = (r0 + r) * n_ + n + c;
        if (bf16_) {
          reinterpret_cast<std::uint16_t*>(y)[at] = float_to_bf16(v);
        } else {
          reinterpret_cast<float*>(y)[at] = v;
        }
      }
    }
  }

  CpuIsa isa_;
  bool bf16_;
  Act act_;
  int x_, w_, b_, y_;
  std::int64_t m_, k_, n_;
  std::int64_t rows_per_task_ = 1, tasks_ = 1;
};

}  // namespace

bool small_rows_linear_applies(std::int64_t m, std::int64_t k, DType dtype, CpuIsa isa) {
  if (isa == CpuIsa::Baseline || m < 1 || m > kMaxRows || k < 1) return false;
  return dtype == DType::Float32 || dtype == DType::BFloat16;
}

std::unique_ptr<Kernel> make_small_rows_linear_kernel(const BuildContext& cx) {
  const DType dt = cx.out().dtype;
  for (std::size_t i = 0; i < cx.num_inputs(); ++i) {
    if (cx.in(i).dtype != dt) return nullptr;
  }
  const std::int64_t n = cx.in(1).shape[0], k = cx.in(1).shape[1];
  if (k < 1 || n < 1) return nullptr;
  const std::int64_t m = cx.in(0).shape.numel() / k;
  const CpuIsa isa = cpu_isa();
  if (!small_rows_linear_applies(m, k, dt, isa)) return nullptr;
  return std::make_unique<SmallRowsLinearKernel>(cx, isa, m, k, n);
}

}  // namespace devpipe::cpu
