// The fused Conv2d + global average pool (conv2d_global_avg_pool), and the patch means that
// replace the pair when linear chains are folded (conv_patch_mean, at the end).
//
// conv2d_global_avg_pool: the convolution is computed
// row by row into registers and reduced there into the pooled sums, so its output
// ([N, O, OH, OW], 411 MB for the seed's stage) is never written to memory.
//
// The tasks are bands of up to 16 output rows of one image, run on the executable's WorkPool
// (its idle threads sleep; no OpenMP region); at tp > 1 with the ranks as threads of one process,
// a rank waiting at a collective runs bands of a rank still at its convolution (HelpBoard), so a
// batch split over ranks on unevenly fast cores is balanced as the bands of one rank are. Each thread keeps the input rows its band reads,
// zero padded and widened to float32, in a ring of (kh - 1) * dh + 1 rows per channel (L1-sized
// for small C): moving to the next output row widens only the rows that enter the window. The
// micro-kernel runs every filter tap over blocks of P output pixels with the output channels in
// vector lanes (AVX-512: 4 x 16 channels x 6 pixels = 24 accumulators; AVX2: 2 x 8 x 6 = 12),
// one weight load per channel vector and one broadcast per pixel per tap; for the common 3-wide
// filter at unit stride and dilation (AVX-512) the three taps of a filter row are unrolled and
// the tail pixels of a row run as one shorter block. The accumulators keep summing over the
// whole row; their sum is added, per row, to a double partial of the task, and the partials
// are reduced in a fixed order, so results do not depend on the thread count. The bias is
// added to the mean.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/kernel.h"
#include "backends/cpu/work_pool.h"

namespace devpipe::cpu {

namespace {

std::size_t round_up(std::size_t n, std::size_t m) { return (n + m - 1) / m * m; }

/// The convolution's geometry (groups: cg input and og output channels each).
struct ConvGeom {
  std::int64_t n, c, h, w, o, kh, kw, sh, sw, ph, pw, dh, dw, groups, oh, ow, cg, og;
  std::int64_t wp;    // row buffer width: (ow - 1) * sw + (kw - 1) * dw + 1
  std::int64_t taps;  // cg * kh * kw
};

/// The geometry of a convolution of x [N, C, H, W] by `o` filters of kh x kw in `groups`
/// groups, with the stride, padding and dilation of `at`.
ConvGeom conv_geom(const Shape& x, std::int64_t o, std::int64_t kh, std::int64_t kw, std::int64_t groups,
                   const Attrs& at) {
  const auto& st = at.ints("stride");
  const auto& pad = at.ints("padding");
  const auto& dil = at.ints("dilation");
  ConvGeom g{};
  g.n = x[0];
  g.c = x[1];
  g.h = x[2];
  g.w = x[3];
  g.o = o;
  g.kh = kh;
  g.kw = kw;
  g.sh = st[0];
  g.sw = st[1];
  g.ph = pad[0];
  g.pw = pad[1];
  g.dh = dil[0];
  g.dw = dil[1];
  g.groups = groups;
  g.cg = g.c / groups;
  g.og = g.o / groups;
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  g.wp = (g.ow - 1) * g.sw + (g.kw - 1) * g.dw + 1;
  g.taps = g.cg * g.kh * g.kw;
  return g;
}

/// Pixels per register block of the vector paths.
constexpr int kPixels = 6;

/// Converts `count` elements of dtype `dt` at `src` to float32.
void widen(const std::byte* src, DType dt, std::int64_t count, float* dst) {
  switch (dt) {
    case DType::Float32:
      std::memcpy(dst, src, static_cast<std::size_t>(count) * sizeof(float));
      return;
    case DType::BFloat16: {
      const auto* s = reinterpret_cast<const std::uint16_t*>(src);
      for (std::int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(s[i]);
      return;
    }
    case DType::Float16: {
      const auto* s = reinterpret_cast<const std::uint16_t*>(src);
      for (std::int64_t i = 0; i < count; ++i) dst[i] = fp16_to_float(s[i]);
      return;
    }
    case DType::Int64:
      return;  // rejected at build
  }
}

void narrow_store(std::byte* dst, DType dt, std::int64_t i, float v) {
  switch (dt) {
    case DType::Float32:
      reinterpret_cast<float*>(dst)[i] = v;
      break;
    case DType::BFloat16:
      reinterpret_cast<std::uint16_t*>(dst)[i] = float_to_bf16(v);
      break;
    case DType::Float16:
      reinterpret_cast<std::uint16_t*>(dst)[i] = float_to_fp16(v);
      break;
    case DType::Int64:
      break;
  }
}

// ---- the row micro-kernels: sums[o] += sum over the row's pixels of the conv at o ----
//
// rb: the row buffer, tap t of pixel x at rb[off[t] + x * sw]; w: packed weights [taps][opad].

#if defined(__x86_64__)
template <int NV, bool kUnitStride>
__attribute__((target("avx512f"))) void row_avx512(const float* rb, const std::int64_t* off,
                                                   std::int64_t taps, std::int64_t stride,
                                                   std::int64_t ow, const float* w,
                                                   std::int64_t opad, float* sums) {
  const std::int64_t sw = kUnitStride ? 1 : stride;  // a constant stride: no address math
  __m512 a[kPixels][NV];
  for (int p = 0; p < kPixels; ++p) {
    for (int v = 0; v < NV; ++v) a[p][v] = _mm512_setzero_ps();
  }
  std::int64_t x = 0;
  for (; x + kPixels <= ow; x += kPixels) {
    const float* base = rb + x * sw;
    const float* wt = w;
    for (std::int64_t t = 0; t < taps; ++t, wt += opad) {
      const float* px = base + off[t];
      __m512 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wt + 16 * v);
      for (int p = 0; p < kPixels; ++p) {
        const __m512 xb = _mm512_set1_ps(px[p * sw]);
        for (int v = 0; v < NV; ++v) a[p][v] = _mm512_fmadd_ps(wv[v], xb, a[p][v]);
      }
    }
  }
  for (; x < ow; ++x) {
    const float* base = rb + x * sw;
    const float* wt = w;
    for (std::int64_t t = 0; t < taps; ++t, wt += opad) {
      const __m512 xb = _mm512_set1_ps(base[off[t]]);
      for (int v = 0; v < NV; ++v)
        a[0][v] = _mm512_fmadd_ps(_mm512_loadu_ps(wt + 16 * v), xb, a[0][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    __m512 s = a[0][v];
    for (int p = 1; p < kPixels; ++p) s = _mm512_add_ps(s, a[p][v]);
    _mm512_storeu_ps(sums + 16 * v, _mm512_add_ps(_mm512_loadu_ps(sums + 16 * v), s));
  }
}

template <int NV, bool kUnitStride>
__attribute__((target("avx2,fma"))) void row_avx2(const float* rb, const std::int64_t* off,
                                                  std::int64_t taps, std::int64_t stride,
                                                  std::int64_t ow, const float* w,
                                                  std::int64_t opad, float* sums) {
  const std::int64_t sw = kUnitStride ? 1 : stride;  // a constant stride: no address math
  __m256 a[kPixels][NV];
  for (int p = 0; p < kPixels; ++p) {
    for (int v = 0; v < NV; ++v) a[p][v] = _mm256_setzero_ps();
  }
  std::int64_t x = 0;
  for (; x + kPixels <= ow; x += kPixels) {
    const float* base = rb + x * sw;
    const float* wt = w;
    for (std::int64_t t = 0; t < taps; ++t, wt += opad) {
      const float* px = base + off[t];
      __m256 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(wt + 8 * v);
      for (int p = 0; p < kPixels; ++p) {
        const __m256 xb = _mm256_broadcast_ss(px + p * sw);
        for (int v = 0; v < NV; ++v) a[p][v] = _mm256_fmadd_ps(wv[v], xb, a[p][v]);
      }
    }
  }
  for (; x < ow; ++x) {
    const float* base = rb + x * sw;
    const float* wt = w;
    for (std::int64_t t = 0; t < taps; ++t, wt += opad) {
      const __m256 xb = _mm256_broadcast_ss(base + off[t]);
      for (int v = 0; v < NV; ++v)
        a[0][v] = _mm256_fmadd_ps(_mm256_loadu_ps(wt + 8 * v), xb, a[0][v]);
    }
  }
  for (int v = 0; v < NV; ++v) {
    __m256 s = a[0][v];
    for (int p = 1; p < kPixels; ++p) s = _mm256_add_ps(s, a[p][v]);
    _mm256_storeu_ps(sums + 8 * v, _mm256_add_ps(_mm256_loadu_ps(sums + 8 * v), s));
  }
}

/// P pixels from `base` (unit stride and dilation, 3 taps a filter row): a[p] += the conv at
/// pixel p, over the `rows` filter rows at base + roff[r] (cg * kh of them).
template <int NV, int P>
__attribute__((target("avx512f"), always_inline)) inline void block3_avx512(
    const float* base, const std::int64_t* roff, std::int64_t rows, const float* w,
    std::int64_t opad, __m512 (&a)[P][NV]) {
  const float* wt = w;
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* px0 = base + roff[r];
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k, wt += opad) {
      // Opaque to the optimiser: otherwise it keeps the broadcasts that the next tap shares
      // (px0[p + k]) live across taps, which spills accumulators out of the 32 registers.
      const float* px = px0 + k;
      asm("" : "+r"(px));
      __m512 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wt + 16 * v);
      for (int p = 0; p < P; ++p) {
        const __m512 xb = _mm512_set1_ps(px[p]);
        for (int v = 0; v < NV; ++v) a[p][v] = _mm512_fmadd_ps(wv[v], xb, a[p][v]);
      }
    }
  }
}

/// The last `R` pixels of a row (R < kPixels) as one block, added into a[0 .. R).
template <int NV, int R>
__attribute__((target("avx512f"), always_inline)) inline void tail3_avx512(
    const float* base, const std::int64_t* roff, std::int64_t rows, const float* w,
    std::int64_t opad, __m512 (&a)[kPixels][NV]) {
  __m512 t[R][NV];
  for (int p = 0; p < R; ++p) {
    for (int v = 0; v < NV; ++v) t[p][v] = _mm512_setzero_ps();
  }
  block3_avx512<NV, R>(base, roff, rows, w, opad, t);
  for (int p = 0; p < R; ++p) {
    for (int v = 0; v < NV; ++v) a[p][v] = _mm512_add_ps(a[p][v], t[p][v]);
  }
}

/// row_avx512 for a 3-wide filter at unit stride and dilation: the filter rows at roff[r],
/// their three taps unrolled; the tail pixels as one shorter block.
template <int NV>
__attribute__((target("avx512f"))) void row3_avx512(const float* rb, const std::int64_t* roff,
                                                    std::int64_t rows, std::int64_t ow,
                                                    const float* w, std::int64_t opad,
                                                    float* sums) {
  __m512 a[kPixels][NV];
  for (int p = 0; p < kPixels; ++p) {
    for (int v = 0; v < NV; ++v) a[p][v] = _mm512_setzero_ps();
  }
  std::int64_t x = 0;
  for (; x + kPixels <= ow; x += kPixels)
    block3_avx512<NV, kPixels>(rb + x, roff, rows, w, opad, a);
  static_assert(kPixels == 6, "the tail switch below covers 1 .. kPixels - 1 pixels");
  switch (ow - x) {
    case 1:
      tail3_avx512<NV, 1>(rb + x, roff, rows, w, opad, a);
      break;
    case 2:
      tail3_avx512<NV, 2>(rb + x, roff, rows, w, opad, a);
      break;
    case 3:
      tail3_avx512<NV, 3>(rb + x, roff, rows, w, opad, a);
      break;
    case 4:
      tail3_avx512<NV, 4>(rb + x, roff, rows, w, opad, a);
      break;
    case 5:
      tail3_avx512<NV, 5>(rb + x, roff, rows, w, opad, a);
      break;
    default:
      break;
  }
  for (int v = 0; v < NV; ++v) {
    __m512 s = a[0][v];
    for (int p = 1; p < kPixels; ++p) s = _mm512_add_ps(s, a[p][v]);
    _mm512_storeu_ps(sums + 16 * v, _mm512_add_ps(_mm512_loadu_ps(sums + 16 * v), s));
  }
}
#endif

/// Any CPU: one pixel at a time, the channel loop left to the compiler's vectoriser.
void row_baseline(const float* rb, const std::int64_t* off, std::int64_t taps, std::int64_t sw,
                  std::int64_t ow, const float* w, std::int64_t opad, float* sums) {
  for (std::int64_t x = 0; x < ow; ++x) {
    const float* base = rb + x * sw;
    const float* wt = w;
    for (std::int64_t t = 0; t < taps; ++t, wt += opad) {
      const float xv = base[off[t]];
      for (std::int64_t o = 0; o < opad; ++o) sums[o] += wt[o] * xv;
    }
  }
}

/// Output rows per task at most: a band of one image.
constexpr std::int64_t kMaxBandRows = 16;
/// Tasks to aim for (smaller bands when the problem is small), so that a thread the scheduler
/// takes away near the end holds up little. Not a function of the thread count: the bands, and
/// so the order of the sums, are the same on any number of threads.
constexpr std::int64_t kTargetTasks = 256;

std::int64_t floor_mod(std::int64_t a, std::int64_t m) { return ((a % m) + m) % m; }

class ConvGlobalAvgPoolKernel final : public Kernel {
 public:
  explicit ConvGlobalAvgPoolKernel(const BuildContext& cx)
      : x_(cx.in_id(0)),
        w_(cx.in_id(1)),
        b_(cx.num_inputs() == 3 ? cx.in_id(2) : -1),
        y_(cx.out_id()),
        dt_(cx.out().dtype),
        isa_(cpu_isa()) {
    const Shape& ws = cx.in(1).shape;
    g_ = conv_geom(cx.in(0).shape, ws[0], ws[2], ws[3], cx.node.attrs.i("groups"), cx.node.attrs);
    const ConvGeom& g = g_;
    const std::size_t lanes = isa_ == CpuIsa::Avx512 ? 16 : 8;
    opad_ = static_cast<std::int64_t>(round_up(static_cast<std::size_t>(g.og), lanes));
    three_ = isa_ == CpuIsa::Avx512 && g.kw == 3 && g.sw == 1 && g.dw == 1;
    span_ = (g.kh - 1) * g.dh + 1;
    // Bands of rows per image: enough tasks to balance the threads, each a few rows. The
    // executable's pool has the thread count the kernel is built with (omp_get_max_threads()).
    threads_ = std::max(1, omp_get_max_threads());
    // Ranks that are threads of this process help each other with their bands while they wait
    // at a collective (HelpBoard): scratch for them too, as threads threads_ + slot.
    board_ = rank_help_board(cx.rank);
    const int slots = threads_ + (board_ != nullptr ? board_->helpers() : 0);
    rows_per_band_ = std::clamp<std::int64_t>((g.n * g.oh + kTargetTasks - 1) / kTargetTasks, 1,
                                              std::min(g.oh, kMaxBandRows));
    bands_ = (g.oh + rows_per_band_ - 1) / rows_per_band_;
    // Per thread: which input row each ring slot holds, the filter rows' and the taps' offsets
    // in the ring for the current output row.
    index_stride_ = static_cast<std::size_t>(span_ + g.cg * g.kh + g.taps);
    index_.resize(static_cast<std::size_t>(slots) * index_stride_);
    // Scratch: per thread the ring of rows and a row sum; per task the double partials; the
    // packed weights when they are not fixed at compile time.
    rb_floats_ = round_up(static_cast<std::size_t>(g.cg * span_ * g.wp), 16);
    thread_bytes_ = (rb_floats_ + static_cast<std::size_t>(opad_)) * sizeof(float);
    partial_off_ = static_cast<std::size_t>(slots) * thread_bytes_;
    const std::size_t partial_bytes =
        static_cast<std::size_t>(g.n * bands_ * g.groups * opad_) * sizeof(double);
    packed_floats_ = static_cast<std::size_t>(g.groups * g.taps * opad_);
    packed_off_ = partial_off_ + round_up(partial_bytes, 64);
    if (const std::byte* fixed = cx.fixed_input(1)) {
      owned_.resize(packed_floats_);
      pack(fixed, owned_.data());
      packed_ = owned_.data();
    }
    scratch_ = packed_off_ + (packed_ ? 0 : packed_floats_ * sizeof(float));
  }

  std::size_t scratch_bytes() const override { return scratch_; }

  bool wants_pool() const override { return true; }

  void run(const RunContext& cx) override {
    const ConvGeom& g = g_;
    const float* wpk = packed_;
    if (!wpk) {
      auto* dst = reinterpret_cast<float*>(cx.scratch + packed_off_);
      pack(cx.values[w_], dst);
      wpk = dst;
    }
    auto* partial = reinterpret_cast<double*>(cx.scratch + partial_off_);
    const std::int64_t tasks = g.n * bands_;
    auto task = [&](std::int64_t t, int thread) {
      run_band(cx.values[x_], wpk, t, cx.scratch + static_cast<std::size_t>(thread) * thread_bytes_,
               index_.data() + static_cast<std::size_t>(thread) * index_stride_,
               partial + t * g.groups * opad_);
    };
    if (!cx.pool) {
      for (std::int64_t t = 0; t < tasks; ++t) task(t, 0);
    } else {
      if (cx.pool->threads() > threads_) {
        throw Error("cpu backend: " + where + " was built for " + std::to_string(threads_) +
                    " threads, the executable's pool has " + std::to_string(cx.pool->threads()));
      }
      // The bands' sums are reduced in band order below, whichever thread ran them.
      cx.pool->run_shared(tasks, task, board_, cx.rank.rank);
    }
    // Reduce the bands in order, divide, add the bias.
    std::byte* y = cx.values[y_];
    const std::byte* bias = b_ >= 0 ? cx.values[b_] : nullptr;
    const double inv = 1.0 / static_cast<double>(g.oh * g.ow);
    for (std::int64_t n = 0; n < g.n; ++n) {
      for (std::int64_t gi = 0; gi < g.groups; ++gi) {
        for (std::int64_t o = 0; o < g.og; ++o) {
          double s = 0;
          for (std::int64_t band = 0; band < bands_; ++band) {
            s += partial[((n * bands_ + band) * g.groups + gi) * opad_ + o];
          }
          const std::int64_t oc = gi * g.og + o;
          double v = s * inv;
          if (bias) {
            float bv;
            widen(bias + static_cast<std::size_t>(oc) * dtype_size(dt_), dt_, 1, &bv);
            v += bv;
          }
          narrow_store(y, dt_, n * g.o + oc, static_cast<float>(v));
        }
      }
    }
  }

 private:
  /// Task t (image t / bands_, band t % bands_) on a thread's scratch `mine` and index arrays
  /// `idx`: the band's row sums, per group, into `part` [groups][opad].
  void run_band(const std::byte* x, const float* wpk, std::int64_t t, std::byte* mine,
                std::int64_t* idx, double* part) const {
    const ConvGeom& g = g_;
    const std::int64_t n = t / bands_, band = t % bands_;
    const std::int64_t r0 = band * rows_per_band_, r1 = std::min(g.oh, r0 + rows_per_band_);
    auto* rb = reinterpret_cast<float*>(mine);
    float* sums = rb + rb_floats_;
    std::int64_t* held = idx;                // [span_]: the input row in each ring slot
    std::int64_t* roff = held + span_;       // [cg * kh]: each filter row's offset in the ring
    std::int64_t* off = roff + g.cg * g.kh;  // [taps]: each tap's offset
    std::fill(part, part + g.groups * opad_, 0.0);
    for (std::int64_t gi = 0; gi < g.groups; ++gi) {
      std::fill(held, held + span_, std::numeric_limits<std::int64_t>::min());  // none yet
      for (std::int64_t oh = r0; oh < r1; ++oh) {
        for (std::int64_t r = 0; r < g.kh; ++r) {
          // The kh rows one output row reads lie within span_ consecutive input rows, so their
          // slots differ.
          const std::int64_t ih = oh * g.sh - g.ph + r * g.dh, slot = floor_mod(ih, span_);
          if (held[slot] != ih) {
            fill_row(x, n, gi, ih, slot, rb);
            held[slot] = ih;
          }
          for (std::int64_t c = 0; c < g.cg; ++c) roff[c * g.kh + r] = (c * span_ + slot) * g.wp;
        }
        if (!three_) {
          for (std::int64_t fr = 0; fr < g.cg * g.kh; ++fr) {
            for (std::int64_t k = 0; k < g.kw; ++k) off[fr * g.kw + k] = roff[fr] + k * g.dw;
          }
        }
        if (oh + 1 < r1) prefetch_rows(x, n, gi, oh + 1, held);
        std::fill(sums, sums + opad_, 0.f);
        run_row(rb, roff, off, wpk + gi * g.taps * opad_, sums);
        double* pg = part + gi * opad_;
        for (std::int64_t o = 0; o < opad_; ++o) pg[o] += sums[o];
      }
    }
  }

  /// Weights [O, cg, kh, kw] (dtype dt_) to float32 [groups][taps][opad], zero padded.
  void pack(const std::byte* w, float* dst) const {
    const ConvGeom& g = g_;
    std::fill(dst, dst + packed_floats_, 0.f);
    const std::size_t esize = dtype_size(dt_);
    for (std::int64_t oc = 0; oc < g.o; ++oc) {
      const std::int64_t gi = oc / g.og, o = oc % g.og;
      for (std::int64_t t = 0; t < g.taps; ++t) {
        widen(w + static_cast<std::size_t>(oc * g.taps + t) * esize, dt_, 1,
              dst + (gi * g.taps + t) * opad_ + o);
      }
    }
  }

  /// Asks for the input rows output row `oh` reads that the ring does not hold yet, so that
  /// they arrive from memory while the current row computes.
  void prefetch_rows(const std::byte* x, std::int64_t n, std::int64_t gi, std::int64_t oh,
                     const std::int64_t* held) const {
    const ConvGeom& g = g_;
    const std::size_t esize = dtype_size(dt_);
    const std::size_t bytes = static_cast<std::size_t>(g.w) * esize;
    for (std::int64_t r = 0; r < g.kh; ++r) {
      const std::int64_t ih = oh * g.sh - g.ph + r * g.dh;
      if (ih < 0 || ih >= g.h || held[floor_mod(ih, span_)] == ih) continue;
      for (std::int64_t c = 0; c < g.cg; ++c) {
        const std::byte* row =
            x + static_cast<std::size_t>(((n * g.c + gi * g.cg + c) * g.h + ih) * g.w) * esize;
        for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
      }
    }
  }

  /// Input row `ih` (zeros outside the image) of every channel of group `gi`, zero padded and
  /// widened to float32, into ring slot `slot`.
  void fill_row(const std::byte* x, std::int64_t n, std::int64_t gi, std::int64_t ih,
                std::int64_t slot, float* rb) const {
    const ConvGeom& g = g_;
    const std::size_t esize = dtype_size(dt_);
    const std::int64_t lo = std::min(g.pw, g.wp);  // left padding
    const std::int64_t len = std::max<std::int64_t>(0, std::min(g.w, g.wp - g.pw));
    for (std::int64_t c = 0; c < g.cg; ++c) {
      float* dst = rb + (c * span_ + slot) * g.wp;
      if (ih < 0 || ih >= g.h || len == 0) {
        std::fill(dst, dst + g.wp, 0.f);
        continue;
      }
      const std::int64_t ci = gi * g.cg + c;
      std::fill(dst, dst + lo, 0.f);
      widen(x + static_cast<std::size_t>(((n * g.c + ci) * g.h + ih) * g.w) * esize, dt_, len,
            dst + lo);
      std::fill(dst + lo + len, dst + g.wp, 0.f);
    }
  }

  void run_row(const float* rb, const std::int64_t* roff, const std::int64_t* off, const float* w,
               float* sums) const {
    const ConvGeom& g = g_;
    switch (isa_) {
      case CpuIsa::Avx512:
#if defined(__x86_64__)
        for (std::int64_t o0 = 0; o0 < opad_; o0 += 64) {
          const std::int64_t nv = std::min<std::int64_t>(4, (opad_ - o0) / 16);
          if (three_) {
            auto* row = nv == 4   ? row3_avx512<4>
                        : nv == 3 ? row3_avx512<3>
                        : nv == 2 ? row3_avx512<2>
                                  : row3_avx512<1>;
            row(rb, roff, g.cg * g.kh, g.ow, w + o0, opad_, sums + o0);
            continue;
          }
          switch (nv) {
            case 4:
              (g.sw == 1 ? row_avx512<4, true> : row_avx512<4, false>)(rb, off, g.taps, g.sw, g.ow,
                                                                       w + o0, opad_, sums + o0);
              break;
            case 3:
              (g.sw == 1 ? row_avx512<3, true> : row_avx512<3, false>)(rb, off, g.taps, g.sw, g.ow,
                                                                       w + o0, opad_, sums + o0);
              break;
            case 2:
              (g.sw == 1 ? row_avx512<2, true> : row_avx512<2, false>)(rb, off, g.taps, g.sw, g.ow,
                                                                       w + o0, opad_, sums + o0);
              break;
            default:
              (g.sw == 1 ? row_avx512<1, true> : row_avx512<1, false>)(rb, off, g.taps, g.sw, g.ow,
                                                                       w + o0, opad_, sums + o0);
              break;
          }
        }
        return;
#endif
      case CpuIsa::Avx2:
#if defined(__x86_64__)
        for (std::int64_t o0 = 0; o0 < opad_; o0 += 16) {
          if (opad_ - o0 >= 16) {
            (g.sw == 1 ? row_avx2<2, true> : row_avx2<2, false>)(rb, off, g.taps, g.sw, g.ow,
                                                                 w + o0, opad_, sums + o0);
          } else {
            (g.sw == 1 ? row_avx2<1, true> : row_avx2<1, false>)(rb, off, g.taps, g.sw, g.ow,
                                                                 w + o0, opad_, sums + o0);
          }
        }
        return;
#endif
      case CpuIsa::Baseline:
        row_baseline(rb, off, g.taps, g.sw, g.ow, w, opad_, sums);
        return;
    }
  }

  int x_, w_, b_, y_;
  DType dt_;
  CpuIsa isa_;
  ConvGeom g_{};
  std::int64_t opad_ = 0;
  bool three_ = false;     // the AVX-512 3-wide unit-stride path
  std::int64_t span_ = 1;  // ring rows per channel
  int threads_ = 1;
  HelpBoard* board_ = nullptr;  // the rank's peers in this process that help with its bands
  std::int64_t bands_ = 1, rows_per_band_ = 1;
  std::size_t index_stride_ = 0;
  std::vector<std::int64_t> index_;  // per thread and helper slot: held, roff, off (run_band)
  std::size_t rb_floats_ = 0, thread_bytes_ = 0, partial_off_ = 0, packed_off_ = 0;
  std::size_t packed_floats_ = 0, scratch_ = 0;
  AlignedFloats owned_;  // the packed weights, when fixed at compile
  const float* packed_ = nullptr;
};

/// conv_patch_mean: for each (image, channel) plane, every filter tap's input window summed
/// over the conv's output positions. Per input row, the sums over the columns each tap column
/// reads (the row's total less the few columns that tap skips, for a unit stride); then per tap
/// row, the sum of those over the rows it reads. Sums in double, divided once; planes in
/// parallel, each written by one thread.
class ConvPatchMeanKernel final : public Kernel {
 public:
  explicit ConvPatchMeanKernel(const BuildContext& cx)
      : x_(cx.in_id(0)),
        y_(cx.out_id()),
        dt_(cx.out().dtype),
        g_(conv_geom(cx.in(0).shape, 1, cx.node.attrs.ints("kernel_size")[0], cx.node.attrs.ints("kernel_size")[1],
                     1, cx.node.attrs)) {
    threads_ = std::max(1, omp_get_max_threads());
    // Per thread: one row widened to float, and the row sums [H][kw] in double.
    thread_bytes_ = round_up(static_cast<std::size_t>(g_.w) * sizeof(float), 64) +
                    round_up(static_cast<std::size_t>(g_.h * g_.kw) * sizeof(double), 64);
  }

  std::size_t scratch_bytes() const override { return static_cast<std::size_t>(threads_) * thread_bytes_; }

  void run(const RunContext& cx) override {
    const std::byte* x = cx.values[x_];
    std::byte* y = cx.values[y_];
    const std::size_t esize = dtype_size(dt_);
    const std::int64_t planes = g_.n * g_.c;
    const double inv = 1.0 / static_cast<double>(g_.oh * g_.ow);
#pragma omp parallel num_threads(threads_)
    {
      std::byte* mine = cx.scratch + static_cast<std::size_t>(omp_get_thread_num()) * thread_bytes_;
      auto* row = reinterpret_cast<float*>(mine);
      auto* rs = reinterpret_cast<double*>(mine + round_up(static_cast<std::size_t>(g_.w) * sizeof(float), 64));
#pragma omp for schedule(static)
      for (std::int64_t p = 0; p < planes; ++p) {
        for (std::int64_t ih = 0; ih < g_.h; ++ih) {
          widen(x + static_cast<std::size_t>((p * g_.h + ih) * g_.w) * esize, dt_, g_.w, row);
          row_sums(row, rs + ih * g_.kw);
        }
        for (std::int64_t i = 0; i < g_.kh; ++i) {
          for (std::int64_t j = 0; j < g_.kw; ++j) {
            double acc = 0;
            for (std::int64_t o = 0; o < g_.oh; ++o) {
              const std::int64_t ih = o * g_.sh - g_.ph + i * g_.dh;
              if (ih >= 0 && ih < g_.h) acc += rs[ih * g_.kw + j];
            }
            narrow_store(y, dt_, (p * g_.kh + i) * g_.kw + j, static_cast<float>(acc * inv));
          }
        }
      }
    }
  }

 private:
  /// out[j] = the sum of row[ow * sw - pw + j * dw] over the output columns ow that land inside.
  void row_sums(const float* row, double* out) const {
    if (g_.sw == 1) {
      double total = 0, t1 = 0, t2 = 0, t3 = 0;
      std::int64_t k = 0;
      for (; k + 4 <= g_.w; k += 4) {
        total += row[k];
        t1 += row[k + 1];
        t2 += row[k + 2];
        t3 += row[k + 3];
      }
      for (; k < g_.w; ++k) total += row[k];
      total += t1 + t2 + t3;
      for (std::int64_t j = 0; j < g_.kw; ++j) {
        // Columns j * dw - pw .. j * dw - pw + ow - 1, clipped to the row: the total less the
        // columns before and after.
        const std::int64_t lo = j * g_.dw - g_.pw, hi = lo + g_.ow;
        double s = total;
        for (std::int64_t q = 0; q < std::min(lo, g_.w); ++q) s -= row[q];
        for (std::int64_t q = std::max<std::int64_t>(hi, 0); q < g_.w; ++q) s -= row[q];
        if (lo >= g_.w || hi <= 0) s = 0;
        out[j] = s;
      }
      return;
    }
    for (std::int64_t j = 0; j < g_.kw; ++j) {
      double s = 0;
      for (std::int64_t o = 0; o < g_.ow; ++o) {
        const std::int64_t iw = o * g_.sw - g_.pw + j * g_.dw;
        if (iw >= 0 && iw < g_.w) s += row[iw];
      }
      out[j] = s;
    }
  }

  int x_, y_;
  DType dt_;
  ConvGeom g_;
  int threads_ = 1;
  std::size_t thread_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Kernel> make_conv_global_avg_pool_kernel(const BuildContext& cx) {
  if (!is_floating(cx.out().dtype)) {
    throw Unsupported("cpu backend: no " + std::string(dtype_name(cx.out().dtype)) +
                      " kernel for " + cx.where);
  }
  return std::make_unique<ConvGlobalAvgPoolKernel>(cx);
}

std::unique_ptr<Kernel> make_conv_patch_mean_kernel(const BuildContext& cx) {
  if (!is_floating(cx.out().dtype)) {
    throw Unsupported("cpu backend: no " + std::string(dtype_name(cx.out().dtype)) +
                      " kernel for " + cx.where);
  }
  return std::make_unique<ConvPatchMeanKernel>(cx);
}

}  // namespace devpipe::cpu
