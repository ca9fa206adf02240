// Linear kernels for skinny float32 shapes, where oneDNN 2.6's gemm falls far short of the
// memory bandwidth: a tiny inner dimension (x[M, K<=16] @ w^T -> [M, N], "expand") or a tiny
// output (x[M, K] @ w^T -> [M, N<=8], "reduce"), with M large. Both are memory bound: the
// kernels stream the big operand once, keep the weights in registers or L1, and write an
// expanded output with non-temporal stores (no read-for-ownership of the destination).
//
// expand: a block of 4 rows x 4 (AVX-512) or 2 (AVX2) vectors of output channels in registers,
//         the bias as the accumulators' start, one broadcast of x per row and input channel.
// reduce: blocks of 16 rows walk K in chunks of 256 (so the chunk's weights stay in L1 beside
//         the x stream), the N <= 8 dot products accumulating in vector lanes (AVX-512: 2 rows
//         at a time), with a prefetch into L2 one block ahead; one horizontal reduction per row.
// The rows are split into tasks of 64 on the executable's WorkPool (claimed by whichever
// threads run, so a descheduled one does not hold the kernel up). Chosen at compile time by
// make_skinny_linear_kernel; other shapes keep oneDNN.
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/kernel.h"
#include "backends/cpu/work_pool.h"

namespace devpipe::cpu {

namespace {

constexpr std::int64_t kMaxExpandK = 16;
constexpr std::int64_t kMaxReduceN = 8;
constexpr std::int64_t kMinRows = 1024;
/// Outputs at least this large are written with non-temporal stores.
constexpr std::size_t kStreamBytes = 8u << 20;
/// The reduce kernel's row block and K chunk (a multiple of 16).
constexpr std::int64_t kReduceRows = 16;
constexpr std::int64_t kReduceChunk = 256;
/// Rows per WorkPool task (a multiple of the expand kernel's 4 and of kReduceRows).
constexpr std::int64_t kTaskRows = 64;

std::int64_t round_up(std::int64_t n, std::int64_t m) { return (n + m - 1) / m * m; }

#if defined(__x86_64__)

// ---- expand: y[r, n] = b[n] + sum_k x[r, k] * wt[k, n] ----
// The unroll pragmas keep the R x NV accumulators in registers: without them GCC 12 keeps the
// array in memory around the runtime k loop (a spill and a reload of every accumulator per
// block, which doubled the kernel's instruction count).

template <int R, int NV, bool kStream>
__attribute__((target("avx512f,avx2,fma"))) inline void expand_block_avx512(
    const float* __restrict x, std::int64_t k, const float* __restrict wt,
    const float* __restrict bias, std::int64_t n, std::int64_t n0, float* __restrict y) {
  __m512 a[R][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const __m512 b = _mm512_loadu_ps(bias + n0 + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r][v] = b;
  }
  const float* wj = wt + n0;
  for (std::int64_t j = 0; j < k; ++j, wj += n) {
    __m512 w[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wj + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[r * k + j]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[r][v] = _mm512_fmadd_ps(w[v], xb, a[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
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
__attribute__((target("avx2,fma"))) inline void expand_block_avx2(
    const float* __restrict x, std::int64_t k, const float* __restrict wt,
    const float* __restrict bias, std::int64_t n, std::int64_t n0, float* __restrict y) {
  __m256 a[R][NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const __m256 b = _mm256_loadu_ps(bias + n0 + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a[r][v] = b;
  }
  const float* wj = wt + n0;
  for (std::int64_t j = 0; j < k; ++j, wj += n) {
    __m256 w[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_ps(wj + 8 * v);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * k + j);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(w[v], xb, a[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
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

/// Rows [r0, r1) of the expand form: blocks of kExpandRows rows, then one row at a time.
template <bool kAvx512, bool kStream>
void expand_rows(const float* x, std::int64_t k, const float* wt, const float* bias,
                 std::int64_t n, float* y, std::int64_t r0, std::int64_t r1) {
  constexpr std::int64_t kR = 4;
  std::int64_t r = r0;
  for (; r + kR <= r1; r += kR) {
    if constexpr (kAvx512) {
      expand_rows_avx512<kR, kStream>(x + r * k, k, wt, bias, n, y + r * n);
    } else {
      expand_rows_avx2<kR, kStream>(x + r * k, k, wt, bias, n, y + r * n);
    }
  }
  for (; r < r1; ++r) {
    if constexpr (kAvx512) {
      expand_rows_avx512<1, kStream>(x + r * k, k, wt, bias, n, y + r * n);
    } else {
      expand_rows_avx2<1, kStream>(x + r * k, k, wt, bias, n, y + r * n);
    }
  }
  if constexpr (kStream) _mm_sfence();  // the streamed stores are visible before the task ends
}

// ---- reduce: y[r, o] = b[o] + sum_k x[r, k] * w[o, k], o < 8 (w zero padded to 8 rows) ----
// The weights (8 x K floats, 40 KB at K = 1280) do not share L1 with the x stream well: rows
// run in blocks of kReduceRows, and each block walks K in chunks of kReduceChunk (8 KB of
// weights, interleaved [K/L][8][L] for L lanes so a chunk is contiguous), keeping the rows'
// accumulators in a small buffer between chunks. Every x load is paired with a prefetch into
// L2 of the same place one block ahead.

/// Lane sums of 8 vectors: {sum(a[0]), ..., sum(a[7])}.
__attribute__((target("avx2,fma"))) inline __m256 hsum8(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

/// Keeps `v` in a register: GCC would otherwise fold a weight load into each of the R FMAs
/// that use it (R loads instead of one). The ISA is named for clang, which allocates a vector
/// register for the asm only where the function itself has that ISA.
__attribute__((target("avx512f,avx2,fma"))) inline void in_register(__m512& v) {
  asm volatile("" : "+v"(v));
}

// GCC 12 warns that the _mm512_undefined_ps() inside its own intrinsic headers is used
// uninitialized (GCC bug 105593, fixed in 13): silenced for these functions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
/// R rows (x, row stride k), columns [j0, j1) of K: acc[r * 8 + o] += the partial dot products
/// (zeroed first when `first`). wi: the weights interleaved [kpad / 16][8][16].
template <int R>
__attribute__((target("avx512f,avx2,fma"))) inline void reduce_chunk_avx512(
    const float* x, std::int64_t k, std::int64_t j0, std::int64_t j1, const float* wi, __m512* acc,
    bool first, std::int64_t ahead) {
  __m512 a[R][kMaxReduceN];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int o = 0; o < kMaxReduceN; ++o) a[r][o] = first ? _mm512_setzero_ps() : acc[r * 8 + o];
  }
  std::int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    __m512 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      xv[r] = _mm512_loadu_ps(x + r * k + j);
      _mm_prefetch(reinterpret_cast<const char*>(x + r * k + j + ahead), _MM_HINT_T1);
    }
    const float* wj = wi + j * kMaxReduceN;
#pragma GCC unroll 8
    for (int o = 0; o < kMaxReduceN; ++o) {
      __m512 wv = _mm512_loadu_ps(wj + 16 * o);
      if constexpr (R > 1) in_register(wv);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][o] = _mm512_fmadd_ps(xv[r], wv, a[r][o]);
    }
  }
  if (j < j1) {  // the K tail (last chunk only): the weights are zero padded to kpad
    const __mmask16 m = static_cast<__mmask16>((1u << (j1 - j)) - 1);
    __m512 xv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, x + r * k + j);
    const float* wj = wi + j * kMaxReduceN;
#pragma GCC unroll 8
    for (int o = 0; o < kMaxReduceN; ++o) {
      const __m512 wv = _mm512_loadu_ps(wj + 16 * o);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) a[r][o] = _mm512_fmadd_ps(xv[r], wv, a[r][o]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int o = 0; o < kMaxReduceN; ++o) acc[r * 8 + o] = a[r][o];
  }
}

/// Rows [0, rows) (rows <= kReduceRows) of x into y.
__attribute__((target("avx512f,avx2,fma"))) void reduce_block_avx512(
    const float* x, std::int64_t rows, std::int64_t k, const float* wi, const float* bias,
    std::int64_t n, float* y) {
  alignas(64) __m512 acc[kReduceRows * kMaxReduceN];
  const std::int64_t ahead = kReduceRows * k;  // the same place in the next block
  for (std::int64_t j0 = 0; j0 < k; j0 += kReduceChunk) {
    const std::int64_t j1 = std::min(k, j0 + kReduceChunk);
    std::int64_t r = 0;
    for (; r + 2 <= rows; r += 2) {
      reduce_chunk_avx512<2>(x + r * k, k, j0, j1, wi, acc + r * 8, j0 == 0, ahead);
    }
    if (r < rows) reduce_chunk_avx512<1>(x + r * k, k, j0, j1, wi, acc + r * 8, j0 == 0, ahead);
  }
  const __m256 b = _mm256_loadu_ps(bias);
  for (std::int64_t r = 0; r < rows; ++r) {
    __m256 half[kMaxReduceN];
    for (int o = 0; o < kMaxReduceN; ++o) {
      const __m512 v = acc[r * 8 + o];
      half[o] = _mm512_castps512_ps256(
          _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2))));
    }
    alignas(32) float s[kMaxReduceN];
    _mm256_store_ps(s, _mm256_add_ps(hsum8(half), b));
    std::memcpy(y + r * n, s, static_cast<std::size_t>(n) * sizeof(float));
  }
}
#pragma GCC diagnostic pop

/// The AVX2 block: one row at a time (8 accumulators of 8 lanes), the same chunks and
/// prefetch; wi interleaved [kpad / 8][8][8].
__attribute__((target("avx2,fma"))) void reduce_block_avx2(const float* x, std::int64_t rows,
                                                           std::int64_t k, const float* wi,
                                                           const float* bias, std::int64_t n,
                                                           float* y) {
  alignas(32) __m256 acc[kReduceRows * kMaxReduceN];
  const std::int64_t ahead = kReduceRows * k;
  alignas(32) std::int32_t lanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  for (std::int64_t j0 = 0; j0 < k; j0 += kReduceChunk) {
    const std::int64_t j1 = std::min(k, j0 + kReduceChunk);
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * k;
      __m256 a[kMaxReduceN];
#pragma GCC unroll 8
      for (int o = 0; o < kMaxReduceN; ++o) {
        a[o] = j0 == 0 ? _mm256_setzero_ps() : acc[r * 8 + o];
      }
      std::int64_t j = j0;
      for (; j + 8 <= j1; j += 8) {
        const __m256 xv = _mm256_loadu_ps(xr + j);
        _mm_prefetch(reinterpret_cast<const char*>(xr + j + ahead), _MM_HINT_T1);
        const float* wj = wi + j * kMaxReduceN;
#pragma GCC unroll 8
        for (int o = 0; o < kMaxReduceN; ++o) {
          a[o] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wj + 8 * o), a[o]);
        }
      }
      if (j < j1) {  // the K tail: the weights are zero padded
        const __m256i m =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + 8 - (j1 - j)));
        const __m256 xv = _mm256_maskload_ps(xr + j, m);
        const float* wj = wi + j * kMaxReduceN;
#pragma GCC unroll 8
        for (int o = 0; o < kMaxReduceN; ++o) {
          a[o] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wj + 8 * o), a[o]);
        }
      }
#pragma GCC unroll 8
      for (int o = 0; o < kMaxReduceN; ++o) acc[r * 8 + o] = a[o];
    }
  }
  const __m256 b = _mm256_loadu_ps(bias);
  for (std::int64_t r = 0; r < rows; ++r) {
    alignas(32) float s[kMaxReduceN];
    _mm256_store_ps(s, _mm256_add_ps(hsum8(acc + r * 8), b));
    std::memcpy(y + r * n, s, static_cast<std::size_t>(n) * sizeof(float));
  }
}

#endif  // __x86_64__

class SkinnyLinearKernel final : public Kernel {
 public:
  enum class Form { Expand, Reduce };

  SkinnyLinearKernel(const BuildContext& cx, Form form, CpuIsa isa, std::int64_t m, std::int64_t k,
                     std::int64_t n)
      : form_(form), isa_(isa), x_(cx.in_id(0)), y_(cx.out_id()), m_(m), k_(k), n_(n) {
    // At tp > 1 with the ranks as threads, a rank waiting at a collective takes row tasks of
    // this one (HelpBoard): rows are independent, so the result does not depend on who ran them.
    board_ = rank_help_board(cx.rank);
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
      case Form::Reduce: {  // wi[kpad / L][8][L] for L lanes, zero padded in K and in the rows
        const std::int64_t lanes = isa_ == CpuIsa::Avx512 ? 16 : 8;
        const std::int64_t kpad = round_up(k, 16);
        w_.assign(static_cast<std::size_t>(kMaxReduceN * kpad), 0.f);
        for (std::int64_t o = 0; o < n; ++o) {
          for (std::int64_t j = 0; j < k; ++j) {
            w_[static_cast<std::size_t>((j / lanes * kMaxReduceN + o) * lanes + j % lanes)] =
                w[o * k + j];
          }
        }
        bias_.assign(static_cast<std::size_t>(kMaxReduceN), 0.f);
        break;
      }
    }
    if (b) std::memcpy(bias_.data(), b, static_cast<std::size_t>(n) * sizeof(float));
  }

  bool wants_pool() const override { return true; }

  void run(const RunContext& cx) override {
#if defined(__x86_64__)
    const auto* x = reinterpret_cast<const float*>(cx.values[x_]);
    auto* y = reinterpret_cast<float*>(cx.values[y_]);
    const bool stream = form_ == Form::Expand && reinterpret_cast<std::uintptr_t>(y) % 64 == 0 &&
                        (n_ * 4) % 64 == 0 &&
                        static_cast<std::size_t>(m_ * n_) * sizeof(float) >= kStreamBytes;
    auto rows = [&](std::int64_t r0, std::int64_t r1) {
      switch (form_) {
        case Form::Expand:
          run_expand(x, y, stream, r0, r1);
          return;
        case Form::Reduce:
          run_reduce(x, y, r0, r1);
          return;
      }
    };
    // Tasks of kTaskRows rows, claimed in ascending order (the pool hands out the last first),
    // so that each thread's reads and writes move forward through memory.
    const std::int64_t tasks = (m_ + kTaskRows - 1) / kTaskRows;
    if (!cx.pool || (cx.pool->threads() <= 1 && board_ == nullptr)) {
      rows(0, m_);
      return;
    }
    cx.pool->run_shared(
        tasks,
        [&](std::int64_t t) {
          const std::int64_t r0 = (tasks - 1 - t) * kTaskRows;
          rows(r0, std::min(m_, r0 + kTaskRows));
        },
        board_, cx.rank.rank);
#else
    (void)cx;
#endif
  }

 private:
#if defined(__x86_64__)
  void run_expand(const float* x, float* y, bool stream, std::int64_t r0, std::int64_t r1) const {
    const float* wt = w_.data();
    const float* b = bias_.data();
    if (isa_ == CpuIsa::Avx512) {
      if (stream) {
        expand_rows<true, true>(x, k_, wt, b, n_, y, r0, r1);
      } else {
        expand_rows<true, false>(x, k_, wt, b, n_, y, r0, r1);
      }
    } else if (stream) {
      expand_rows<false, true>(x, k_, wt, b, n_, y, r0, r1);
    } else {
      expand_rows<false, false>(x, k_, wt, b, n_, y, r0, r1);
    }
  }

  void run_reduce(const float* x, float* y, std::int64_t r0, std::int64_t r1) const {
    for (std::int64_t r = r0; r < r1; r += kReduceRows) {
      const std::int64_t rows = std::min(kReduceRows, r1 - r);
      if (isa_ == CpuIsa::Avx512) {
        reduce_block_avx512(x + r * k_, rows, k_, w_.data(), bias_.data(), n_, y + r * n_);
      } else {
        reduce_block_avx2(x + r * k_, rows, k_, w_.data(), bias_.data(), n_, y + r * n_);
      }
    }
  }
#endif

  Form form_;
  CpuIsa isa_;
  int x_, y_;
  std::int64_t m_, k_, n_;
  AlignedFloats w_, bias_;
  HelpBoard* board_ = nullptr;  // the rank's peers in this process that help with its rows
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
