// Linear kernels for skinny float32 shapes, where oneDNN 2.6's gemm falls far short of the
// memory bandwidth: a tiny inner dimension (x[M, K<=16] @ w^T -> [M, N], "expand") or a tiny
// output (x[M, K] @ w^T -> [M, N<=8], "reduce"), with M large. Both are memory bound: the
// kernels stream the big operand once, keep the weights in registers or L1, and write an
// expanded output with non-temporal stores (no read-for-ownership of the destination).
//
// expand: a block of 4 rows x 4 (AVX-512) or 2 (AVX2) vectors of output channels in registers,
//         the bias as the accumulators' start, one broadcast of x per row and input channel.
// reduce: each row's K values are read once; the N <= 8 dot products accumulate in vector
//         lanes (AVX-512: 2 rows at a time), then one horizontal reduction per row.
// Chosen at compile time by make_skinny_linear_kernel; other shapes keep oneDNN.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/kernel.h"

namespace devpipe::cpu {

namespace {

constexpr std::int64_t kMaxExpandK = 16;
constexpr std::int64_t kMaxReduceN = 8;
constexpr std::int64_t kMinRows = 1024;
/// Outputs at least this large are written with non-temporal stores.
constexpr std::size_t kStreamBytes = 8u << 20;
/// How far ahead of the reads the reduce kernel prefetches.
constexpr int kPrefetchBytes = 2048;

std::int64_t round_up(std::int64_t n, std::int64_t m) { return (n + m - 1) / m * m; }

#if defined(__x86_64__)

// ---- expand: y[r, n] = b[n] + sum_k x[r, k] * wt[k, n] ----

template <int R, int NV, bool kStream>
__attribute__((target("avx512f,avx2,fma"))) inline void expand_block_avx512(
    const float* x, std::int64_t k, const float* wt, const float* bias, std::int64_t n,
    std::int64_t n0, float* y) {
  __m512 a[R][NV];
  for (int v = 0; v < NV; ++v) {
    const __m512 b = _mm512_loadu_ps(bias + n0 + 16 * v);
    for (int r = 0; r < R; ++r) a[r][v] = b;
  }
  for (std::int64_t j = 0; j < k; ++j) {
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wt + j * n + n0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * k + j]);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_fmadd_ps(w[v], xb, a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* dst = y + r * n + n0 + 16 * v;
      if constexpr (kStream) {
        _mm512_stream_ps(dst, a[r][v]);
      } else {
        _mm512_storeu_ps(dst, a[r][v]);
      }
    }
  }
}

template <int R, bool kStream>
__attribute__((target("avx512f,avx2,fma"))) void expand_rows_avx512(const float* x, std::int64_t k,
                                                                    const float* wt,
                                                                    const float* bias,
                                                                    std::int64_t n, float* y) {
  std::int64_t n0 = 0;
  for (; n0 + 64 <= n; n0 += 64) expand_block_avx512<R, 4, kStream>(x, k, wt, bias, n, n0, y);
  for (; n0 < n; n0 += 16) expand_block_avx512<R, 1, kStream>(x, k, wt, bias, n, n0, y);
}

template <int R, int NV, bool kStream>
__attribute__((target("avx2,fma"))) inline void expand_block_avx2(const float* x, std::int64_t k,
                                                                  const float* wt,
                                                                  const float* bias, std::int64_t n,
                                                                  std::int64_t n0, float* y) {
  __m256 a[R][NV];
  for (int v = 0; v < NV; ++v) {
    const __m256 b = _mm256_loadu_ps(bias + n0 + 8 * v);
    for (int r = 0; r < R; ++r) a[r][v] = b;
  }
  for (std::int64_t j = 0; j < k; ++j) {
    __m256 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(wt + j * n + n0 + 8 * v);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * k + j);
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(w[v], xb, a[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      float* dst = y + r * n + n0 + 8 * v;
      if constexpr (kStream) {
        _mm256_stream_ps(dst, a[r][v]);
      } else {
        _mm256_storeu_ps(dst, a[r][v]);
      }
    }
  }
}

template <int R, bool kStream>
__attribute__((target("avx2,fma"))) void expand_rows_avx2(const float* x, std::int64_t k,
                                                          const float* wt, const float* bias,
                                                          std::int64_t n, float* y) {
  std::int64_t n0 = 0;
  for (; n0 + 16 <= n; n0 += 16) expand_block_avx2<R, 2, kStream>(x, k, wt, bias, n, n0, y);
  for (; n0 < n; n0 += 8) expand_block_avx2<R, 1, kStream>(x, k, wt, bias, n, n0, y);
}

// ---- reduce: y[r, o] = b[o] + sum_k x[r, k] * w[o, k], o < 8 (w zero padded to 8 rows) ----

/// Lane sums of 8 vectors: {sum(a[0]), ..., sum(a[7])}.
__attribute__((target("avx2,fma"))) inline __m256 hsum8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// GCC 12 warns that the _mm512_undefined_ps() inside its own intrinsic headers is used
// uninitialized (GCC bug 105593, fixed in 13): silenced for this one function.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int R>
__attribute__((target("avx512f,avx2,fma"))) void reduce_rows_avx512(const float* x, std::int64_t k,
                                                                    std::int64_t kpad,
                                                                    const float* w,
                                                                    const float* bias,
                                                                    std::int64_t n, float* y) {
  __m512 a[R][kMaxReduceN];
  for (int r = 0; r < R; ++r) {
    for (int o = 0; o < kMaxReduceN; ++o) a[r][o] = _mm512_setzero_ps();
  }
  std::int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    __m512 xv[R];
    for (int r = 0; r < R; ++r) {
      xv[r] = _mm512_loadu_ps(x + r * k + j);
      _mm_prefetch(reinterpret_cast<const char*>(x + r * k + j) + kPrefetchBytes, _MM_HINT_T0);
    }
    for (int o = 0; o < kMaxReduceN; ++o) {
      const __m512 wv = _mm512_loadu_ps(w + o * kpad + j);
      for (int r = 0; r < R; ++r) a[r][o] = _mm512_fmadd_ps(xv[r], wv, a[r][o]);
    }
  }
  if (j < k) {
    const __mmask16 m = static_cast<__mmask16>((1u << (k - j)) - 1);
    __m512 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * k + j);
    for (int o = 0; o < kMaxReduceN; ++o) {
      const __m512 wv = _mm512_loadu_ps(w + o * kpad + j);  // zero padded to kpad
      for (int r = 0; r < R; ++r) a[r][o] = _mm512_fmadd_ps(xv[r], wv, a[r][o]);
    }
  }
  const __m256 b = _mm256_loadu_ps(bias);
  for (int r = 0; r < R; ++r) {
    __m256 half[kMaxReduceN];
    for (int o = 0; o < kMaxReduceN; ++o) {
      const __m512 folded =
          _mm512_add_ps(a[r][o], _mm512_shuffle_f32x4(a[r][o], a[r][o], _MM_SHUFFLE(1, 0, 3, 2)));
      half[o] = _mm512_castps512_ps256(folded);
    }
    alignas(32) float s[kMaxReduceN];
    _mm256_store_ps(s, _mm256_add_ps(hsum8(half), b));
    std::memcpy(y + r * n, s, static_cast<std::size_t>(n) * sizeof(float));
  }
}
#pragma GCC diagnostic pop

__attribute__((target("avx2,fma"))) void reduce_row_avx2(const float* x, std::int64_t k,
                                                         std::int64_t kpad, const float* w,
                                                         const float* bias, std::int64_t n,
                                                         float* y) {
  __m256 a[kMaxReduceN];
  for (int o = 0; o < kMaxReduceN; ++o) a[o] = _mm256_setzero_ps();
  std::int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 xv = _mm256_loadu_ps(x + j);
    for (int o = 0; o < kMaxReduceN; ++o) {
      a[o] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + o * kpad + j), a[o]);
    }
  }
  alignas(32) float s[kMaxReduceN];
  _mm256_store_ps(s, _mm256_add_ps(hsum8(a), _mm256_loadu_ps(bias)));
  for (; j < k; ++j) {
    for (int o = 0; o < kMaxReduceN; ++o) s[o] += x[j] * w[o * kpad + j];
  }
  std::memcpy(y, s, static_cast<std::size_t>(n) * sizeof(float));
}

#endif  // __x86_64__

class SkinnyLinearKernel final : public Kernel {
 public:
  enum class Form { Expand, Reduce };

  SkinnyLinearKernel(const BuildContext& cx, Form form, CpuIsa isa, std::int64_t m, std::int64_t k,
                     std::int64_t n)
      : form_(form), isa_(isa), x_(cx.in_id(0)), y_(cx.out_id()), m_(m), k_(k), n_(n) {
    const auto* w = reinterpret_cast<const float*>(cx.fixed_input(1));
    const auto* b =
        cx.num_inputs() == 3 ? reinterpret_cast<const float*>(cx.fixed_input(2)) : nullptr;
    switch (form_) {
      case Form::Expand:  // wt[k][n]
        w_.assign(static_cast<std::size_t>(k * n), 0.f);
        for (std::int64_t o = 0; o < n; ++o) {
          for (std::int64_t j = 0; j < k; ++j)
            w_[static_cast<std::size_t>(j * n + o)] = w[o * k + j];
        }
        bias_.assign(static_cast<std::size_t>(n), 0.f);
        break;
      case Form::Reduce:  // w[8][kpad], zero padded
        kpad_ = round_up(k, 16);
        w_.assign(static_cast<std::size_t>(kMaxReduceN * kpad_), 0.f);
        for (std::int64_t o = 0; o < n; ++o) {
          std::memcpy(&w_[static_cast<std::size_t>(o * kpad_)], w + o * k,
                      static_cast<std::size_t>(k) * sizeof(float));
        }
        bias_.assign(static_cast<std::size_t>(kMaxReduceN), 0.f);
        break;
    }
    if (b) std::memcpy(bias_.data(), b, static_cast<std::size_t>(n) * sizeof(float));
  }

  void run(const RunContext& cx) override {
#if defined(__x86_64__)
    const auto* x = reinterpret_cast<const float*>(cx.values[x_]);
    auto* y = reinterpret_cast<float*>(cx.values[y_]);
    switch (form_) {
      case Form::Expand: {
        const bool stream = reinterpret_cast<std::uintptr_t>(y) % 64 == 0 && (n_ * 4) % 64 == 0 &&
                            static_cast<std::size_t>(m_ * n_) * sizeof(float) >= kStreamBytes;
        run_expand(x, y, stream);
        return;
      }
      case Form::Reduce:
        run_reduce(x, y);
        return;
    }
#endif
  }

 private:
#if defined(__x86_64__)
  void run_expand(const float* x, float* y, bool stream) const {
    constexpr std::int64_t kR = 4;
    const std::int64_t blocks = m_ / kR;
    const float* wt = w_.data();
    const float* b = bias_.data();
    const std::int64_t k = k_, n = n_;
    const bool avx512 = isa_ == CpuIsa::Avx512;
#pragma omp parallel
    {
#pragma omp for schedule(static)
      for (std::int64_t i = 0; i < blocks; ++i) {
        const float* xr = x + i * kR * k;
        float* yr = y + i * kR * n;
        if (avx512) {
          if (stream) {
            expand_rows_avx512<kR, true>(xr, k, wt, b, n, yr);
          } else {
            expand_rows_avx512<kR, false>(xr, k, wt, b, n, yr);
          }
        } else if (stream) {
          expand_rows_avx2<kR, true>(xr, k, wt, b, n, yr);
        } else {
          expand_rows_avx2<kR, false>(xr, k, wt, b, n, yr);
        }
      }
      if (stream) _mm_sfence();  // the streamed stores are visible before the next kernel
    }
    for (std::int64_t r = blocks * kR; r < m_; ++r) {  // the last rows (fewer than kR)
      if (avx512) {
        expand_rows_avx512<1, false>(x + r * k, k, wt, b, n, y + r * n);
      } else {
        expand_rows_avx2<1, false>(x + r * k, k, wt, b, n, y + r * n);
      }
    }
  }

  void run_reduce(const float* x, float* y) const {
    const float* w = w_.data();
    const float* b = bias_.data();
    const std::int64_t k = k_, n = n_, kpad = kpad_;
    if (isa_ == CpuIsa::Avx512) {
      const std::int64_t pairs = m_ / 2;
#pragma omp parallel for schedule(static)
      for (std::int64_t i = 0; i < pairs; ++i) {
        reduce_rows_avx512<2>(x + 2 * i * k, k, kpad, w, b, n, y + 2 * i * n);
      }
      if (m_ % 2) reduce_rows_avx512<1>(x + (m_ - 1) * k, k, kpad, w, b, n, y + (m_ - 1) * n);
      return;
    }
#pragma omp parallel for schedule(static)
    for (std::int64_t r = 0; r < m_; ++r) reduce_row_avx2(x + r * k, k, kpad, w, b, n, y + r * n);
  }
#endif

  Form form_;
  CpuIsa isa_;
  int x_, y_;
  std::int64_t m_, k_, n_, kpad_ = 0;
  std::vector<float> w_, bias_;
};

}  // namespace

SkinnyForm skinny_linear_form(std::int64_t m, std::int64_t k, std::int64_t n, CpuIsa isa) {
  if (isa == CpuIsa::Baseline || m < kMinRows) return SkinnyForm::None;
  const std::int64_t lanes = isa == CpuIsa::Avx512 ? 16 : 8;
  if (k <= kMaxExpandK && n >= 4 * lanes && n % lanes == 0) return SkinnyForm::Expand;
  if (n <= kMaxReduceN && k >= 4 * lanes) return SkinnyForm::Reduce;
  return SkinnyForm::None;
}

std::unique_ptr<Kernel> make_skinny_linear_kernel(const BuildContext& cx) {
  if (cx.out().dtype != DType::Float32 || cx.in(0).dtype != DType::Float32) return nullptr;
  if (cx.node.attrs.s("activation", "none") != "none") return nullptr;
  if (!cx.fixed_input(1) || (cx.num_inputs() == 3 && !cx.fixed_input(2))) return nullptr;
  const CpuIsa isa = cpu_isa();
  const std::int64_t n = cx.in(1).shape[0], k = cx.in(1).shape[1];
  const std::int64_t m = cx.in(0).shape.numel() / k;
  using Form = SkinnyLinearKernel::Form;
  switch (skinny_linear_form(m, k, n, isa)) {
    case SkinnyForm::None:
      break;
    case SkinnyForm::Expand:
      return std::make_unique<SkinnyLinearKernel>(cx, Form::Expand, isa, m, k, n);
    case SkinnyForm::Reduce:
      return std::make_unique<SkinnyLinearKernel>(cx, Form::Reduce, isa, m, k, n);
  }
  return nullptr;
}

}  // namespace devpipe::cpu
