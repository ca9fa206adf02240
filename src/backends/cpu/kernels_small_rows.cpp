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
#include <bit>
#include <cstdint>
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
/// Outputs per row whose bias, activation and store are applied together.
constexpr int kChunk = 64;

enum class Act { None, Relu, Gelu, GeluTanh, Silu };

Act act_of(const std::string& name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  return Act::None;  // "none" (the graph checked the name)
}

/// e^z for z <= 0 (0 below -87, where float underflows), without a library call: z = n ln 2 +
/// r (Cody and Waite's two-part ln 2), e^r by its Taylor polynomial to degree 7 (|r| <= ln 2 /
/// 2: relative error < 1e-8), 2^n put into the exponent bits. Branch-free, so a loop over it
/// vectorizes.
[[gnu::always_inline]] inline float exp_nonpositive(float z) {
  const float zc = std::max(z, -87.f);
  const float shifted = zc * 1.44269504f + 12582912.f;  // + 1.5 * 2^23 rounds to an integer n
  const float n = shifted - 12582912.f;
  const float r = (zc - n * 0.693145751953125f) - n * 1.428606765330187e-6f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const std::int32_t e = std::bit_cast<std::int32_t>(shifted) - 0x4B400000 + 127;  // n + 127 >= 1
  const float scale = std::bit_cast<float>(e << 23);
  return z < -87.f ? 0.f : p * scale;
}

/// The exact GELU, v (1 + erf(v / sqrt 2)) / 2, in float without a library call, branch-free.
/// With y = |v| / sqrt 2: below 0.9, erf(y) = y P(y^2); above, erfc(y) = exp(-y^2 + S(1/y)) / y,
/// so that 1 + erf(v / sqrt 2) for v < 0 is erfc(y) itself, without the cancellation of
/// 1 - erf(y) (accurate in relative terms where the GELU is tiny). P (degree 5 in y^2) and S
/// (degree 10 in 1/y - 0.6) are weighted least-squares fits in double to erf(y) / y on [0, 0.9]
/// and to log(y erfc(y)) + y^2 on [0.9, 10] (errors 1.4e-8 relative and 4.8e-8 absolute). In
/// float the GELU is within 2e-5 of the exact one in relative terms where it exceeds 1e-20
/// (the rounding of y^2 near the far tail; a few ulps where it is not tiny).
[[gnu::always_inline]] inline float gelu_erf(float v) {
  const float y = std::fabs(v) * static_cast<float>(1.0 / std::numbers::sqrt2);
  const float t = y * y;
  float p = -0.0006111518873038427f;
  p = p * t + 0.005016270682614405f;
  p = p * t - 0.02678198425611743f;
  p = p * t + 0.11282230673572219f;
  p = p * t - 0.3761253250896482f;
  p = p * t + 1.128379155328142f;
  const float erf_y = y * p;
  const float w = 1.f / std::max(y, 0.9f);
  const float u = w - 0.6f;
  float q = -0.0179126625277548f;
  q = q * u - 0.05114202739732545f;
  q = q * u + 0.10064109146887248f;
  q = q * u - 0.05655816174518965f;
  q = q * u - 0.00663198090421563f;
  q = q * u + 0.06497935200120442f;
  q = q * u - 0.11953891161358057f;
  q = q * u + 0.14353025788052426f;
  q = q * u - 0.07441164144757215f;
  q = q * u - 0.34705554482980344f;
  q = q * u - 0.70559943601137f;
  const float erfc_y = exp_nonpositive(q - t) * w;
  const float one_plus_erf =
      y < 0.9f ? 1.f + (v < 0.f ? -erf_y : erf_y) : (v < 0.f ? erfc_y : 2.f - erfc_y);
  return 0.5f * v * one_plus_erf;
}

inline float activate(Act act, float v) {
  switch (act) {
    case Act::None:
      return v;
    case Act::Relu:
      return std::isnan(v) ? v : (v > 0.f ? v : 0.f);
    case Act::Gelu:
      return gelu_erf(v);
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

/// gelu_erf over v[0, n) in place, a vector of lanes at a time.
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) void gelu_avx512(float* v, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) v[i] = gelu_erf(v[i]);
}

__attribute__((target("avx2,fma"))) void gelu_avx2(float* v, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) v[i] = gelu_erf(v[i]);
}

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
  /// Rows [r0, r0 + R) x outputs [n0, n1): dot products of C outputs at a time into a chunk of
  /// kChunk outputs per row, then the chunk's bias, activation and store at once (the
  /// activation's vector code then has independent vectors to overlap).
  template <int R, bool kAvx512, class T>
  void block_rows(const float* x, const T* w, const std::byte* b, std::byte* y, std::int64_t r0,
                  std::int64_t n0, std::int64_t n1) const {
    constexpr int C = kAvx512 ? cols_avx512(R) : cols_avx2(R);
    const float* xr = x + r0 * k_;
    float out[R * C];
    float chunk[R * kChunk];
    for (std::int64_t c0 = n0; c0 < n1; c0 += kChunk) {
      const std::int64_t c1 = std::min(n1, c0 + kChunk);
      std::int64_t n = c0;
      for (; n + C <= c1; n += C) {
        if constexpr (kAvx512) {
          dot_block_avx512<R, C>(xr, k_, w + n * k_, out);
        } else {
          dot_block_avx2<R, C>(xr, k_, w + n * k_, out);
        }
        for (int r = 0; r < R; ++r) {
          for (int c = 0; c < C; ++c) chunk[r * kChunk + (n - c0) + c] = out[r * C + c];
        }
      }
      for (; n < c1; ++n) {
        if constexpr (kAvx512) {
          dot_block_avx512<R, 1>(xr, k_, w + n * k_, out);
        } else {
          dot_block_avx2<R, 1>(xr, k_, w + n * k_, out);
        }
        for (int r = 0; r < R; ++r) chunk[r * kChunk + (n - c0)] = out[r];
      }
      finish<R, kAvx512>(chunk, b, y, r0, c0, static_cast<int>(c1 - c0));
    }
  }
#endif

  /// Adds the bias to chunk[r * kChunk + j] (outputs n + j, j < count, of rows r0 + r), applies
  /// the activation and stores them.
  template <int R, bool kAvx512>
  void finish(float* chunk, const std::byte* b, std::byte* y, std::int64_t r0, std::int64_t n,
              int count) const {
    if (b) {
      for (int j = 0; j < count; ++j) {
        const float bias = bf16_ ? bf16_to_float(reinterpret_cast<const std::uint16_t*>(b)[n + j])
                                 : reinterpret_cast<const float*>(b)[n + j];
        for (int r = 0; r < R; ++r) chunk[r * kChunk + j] += bias;
      }
    }
    for (int r = 0; r < R; ++r) {
      float* v = chunk + r * kChunk;
      // One loop per activation (the GELU's in vector registers).
      switch (act_) {
        case Act::None:
          break;
        case Act::Gelu:
#if defined(__x86_64__)
          if constexpr (kAvx512) {
            gelu_avx512(v, count);
          } else {
            gelu_avx2(v, count);
          }
#else
          for (int j = 0; j < count; ++j) v[j] = gelu_erf(v[j]);
#endif
          break;
        case Act::Relu:
        case Act::GeluTanh:
        case Act::Silu:
          for (int j = 0; j < count; ++j) v[j] = activate(act_, v[j]);
          break;
      }
      const std::int64_t at = (r0 + r) * n_ + n;
      if (bf16_) {
        auto* dst = reinterpret_cast<std::uint16_t*>(y) + at;
        for (int j = 0; j < count; ++j) dst[j] = float_to_bf16(v[j]);
      } else {
        std::memcpy(reinterpret_cast<float*>(y) + at, v, static_cast<std::size_t>(count) * sizeof(float));
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
