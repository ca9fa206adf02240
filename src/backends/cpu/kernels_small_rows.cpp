// The Linear kernel for few rows (token generation: x[M <= 16, K] @ w[N, K]^T), float32 and
// bfloat16. With so few rows a Linear is a matrix-vector product: it reads every weight once
// and does two flops per weight, so it runs at the memory bandwidth when the weight streams
// through once, in its own [N, K] layout (no copy at load). oneDNN 2.6's matmul reaches a
// fraction of that for these shapes.
//
// A block of R rows of x (AVX-512: up to 8, AVX2: up to 4) against C rows of w, R x C <= 16
// (AVX2: 8) vector accumulators over K (bfloat16 weights widened to float32 in registers;
// accumulation in float32), reduced together by one transpose-reduce into one vector whose lane
// r C + c is output (r, c), stored into a chunk of 64 outputs per row; then the chunk's bias,
// activation and store in the output dtype, a vector at a time. With a small K (a chain of
// Linear(64, 64), K / 16 = 4 FMAs per output) the 16 horizontal sums a block needs otherwise
// cost more than its FMAs. A long K runs in blocks whose rows of x stay in the L1 cache, each
// against every weight row of the chunk (the partial sums added up in the chunk), with the
// weight rows prefetched ahead. The tasks are ranges of weight rows, run on the executable's
// WorkPool (work_pool.h), so a decode step opens no OpenMP region here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numbers>
#include <numeric>

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

#if defined(__x86_64__)

/// The activations applied one value at a time, with the library's tanh and exp (the vector
/// paths below do "none", "relu" and the exact GELU themselves).
inline float activate_scalar(Act act, float v) {
  if (act == Act::Silu) return v / (1.f + std::exp(-v));
  const float k = static_cast<float>(std::sqrt(2.0 / std::numbers::pi));  // Act::GeluTanh
  return 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
}

// The exact GELU, v (1 + erf(v / sqrt 2)) / 2, in float without a library call, branch-free.
// With y = |v| / sqrt 2: below 0.9, erf(y) = y P(y^2); above, erfc(y) = exp(-y^2 + S(1/y)) / y,
// so that 1 + erf(v / sqrt 2) for v < 0 is erfc(y) itself, without the cancellation of
// 1 - erf(y) (accurate in relative terms where the GELU is tiny). P (degree 5 in y^2) and S
// (degree 10 in 1/y - 0.6) are weighted least-squares fits in double to erf(y) / y on [0, 0.9]
// and to log(y erfc(y)) + y^2 on [0.9, 10] (errors 1.4e-8 relative and 4.8e-8 absolute). In
// float the GELU is within 2e-5 of the exact one in relative terms where it exceeds 1e-20
// (the rounding of y^2 near the far tail; a few ulps where it is not tiny).
//
// e^z for z <= 0 (0 below -87, where float underflows): z = n ln 2 + r (Cody and Waite's
// two-part ln 2), e^r by its Taylor polynomial to degree 7 (|r| <= ln 2 / 2: relative error
// < 1e-8), 2^n put into the exponent bits.
//
// The coefficients, highest degree first (Horner's order).
constexpr float kErfP[] = {-0.0006111518873038427f, 0.005016270682614405f, -0.02678198425611743f,
                           0.11282230673572219f,    -0.3761253250896482f,  1.128379155328142f};
constexpr float kErfcS[] = {-0.0179126625277548f,  -0.05114202739732545f, 0.10064109146887248f,
                            -0.05655816174518965f, -0.00663198090421563f, 0.06497935200120442f,
                            -0.11953891161358057f, 0.14353025788052426f,  -0.07441164144757215f,
                            -0.34705554482980344f, -0.70559943601137f};
constexpr float kExpTaylor[] = {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24,
                                1.f / 6,    0.5f,      1.f,       1.f};
constexpr float kLog2e = 1.44269504f;
constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-6f;
constexpr float kRoundShift = 12582912.f;  // 1.5 * 2^23: z log2(e) + this rounds to an integer
constexpr float kExpFloor = -87.f;
constexpr float kErfSplit = 0.9f;

#define DEVPIPE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define DEVPIPE_AVX2 __attribute__((target("avx2,fma")))

// GCC 12 warns that the _mm512_undefined_* inside its own intrinsic headers is used
// uninitialized (GCC bug 105593, fixed in 13): silenced for the AVX-512 code.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

/// Rows of w per block for R rows of x: R x C accumulators, at most 16 (AVX2: 8), the number
/// one transpose-reduce sums at once; with R x-vectors and a weight vector they stay in the
/// registers (AVX-512 has 32, AVX2 16).
constexpr int cols_avx512(int r) { return 16 / r; }
constexpr int cols_avx2(int r) { return 8 / r; }
constexpr int kRowsAvx512 = 8, kRowsAvx2 = 4;
/// Weight rows streamed at once (AVX-512 with one row of x holds 16 accumulators: it makes two
/// passes over K, so that no more weight streams run than the prefetchers follow).
constexpr int kStreams = 8;
/// Values of x per K block (32 KiB: the rows of a block stay in the L1 cache while every weight
/// row of a chunk passes them).
constexpr std::int64_t kBlockFloats = 8192;
/// From this many values of K per block on, each weight row is prefetched kPrefetchBytes ahead
/// (the rows of a K block are read a piece at a time, and the hardware prefetchers start each
/// piece cold; the prefetches of one piece run into the next, which then starts from L2).
constexpr std::int64_t kPrefetchMin = 512, kPrefetchBytes = 1024;

template <class T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes);
}

// ---- AVX-512 ----

template <class T>
DEVPIPE_AVX512 inline __m512 load16(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_loadu_ps(p);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <class T>
DEVPIPE_AVX512 inline __m512 load16_masked(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

/// float_to_bf16 (round to nearest even, NaN kept quiet) of the lanes of m, stored at p.
DEVPIPE_AVX512 inline void store16_masked(std::uint16_t* p, __mmask16 m, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i high = _mm512_srli_epi32(u, 16);
  const __m512i rounding =
      _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, rounding), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

DEVPIPE_AVX512 inline void store16_masked(float* p, __mmask16 m, __m512 v) {
  _mm512_mask_storeu_ps(p, m, v);
}

/// Lanes i < n set (n may be <= 0 or >= 16).
DEVPIPE_AVX512 inline __mmask16 first_lanes16(std::int64_t n) {
  if (n <= 0) return 0;
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// The GELU below runs on N vectors at once, each step over all of them: N independent chains
// in program order, which the core overlaps (the GELU of one vector is a chain of some 40
// dependent instructions).

/// p = the polynomial with coefficients c (highest degree first) at each x.
template <int N, int M>
DEVPIPE_AVX512 inline void horner16(const __m512 (&x)[N], const float (&c)[M], __m512 (&p)[N]) {
#pragma GCC unroll 4
  for (int i = 0; i < N; ++i) p[i] = _mm512_set1_ps(c[0]);
#pragma GCC unroll 16
  for (int j = 1; j < M; ++j) {
#pragma GCC unroll 4
    for (int i = 0; i < N; ++i) p[i] = _mm512_fmadd_ps(p[i], x[i], _mm512_set1_ps(c[j]));
  }
}

/// e^z for z <= 0 (see kExpTaylor), in place; NaN stays NaN.
template <int N>
DEVPIPE_AVX512 inline void exp_nonpositive16(__m512 (&z)[N]) {
  __m512 shifted[N], r[N], p[N];
#pragma GCC unroll 4
  for (int i = 0; i < N; ++i) {
    const __m512 zc = _mm512_max_ps(_mm512_set1_ps(kExpFloor), z[i]);  // NaN: z
    shifted[i] = _mm512_fmadd_ps(zc, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kRoundShift));
    const __m512 n = _mm512_sub_ps(shifted[i], _mm512_set1_ps(kRoundShift));
    r[i] = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo),
                            _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), zc));
  }
  horner16(r, kExpTaylor, p);
#pragma GCC unroll 4
  for (int i = 0; i < N; ++i) {
    const __m512i e = _mm512_add_epi32(_mm512_castps_si512(shifted[i]),
                                       _mm512_set1_epi32(127 - 0x4B400000));  // n + 127 >= 1
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
    const __mmask16 keep = _mm512_cmp_ps_mask(z[i], _mm512_set1_ps(kExpFloor), _CMP_NLT_UQ);
    z[i] = _mm512_maskz_mul_ps(keep, p[i], scale);
  }
}

/// The exact GELU (see kErfP) of v's lanes, in place.
template <int N>
DEVPIPE_AVX512 inline void gelu16(__m512 (&v)[N]) {
  __m512 y[N], t[N], p[N], w[N], u[N], q[N];
#pragma GCC unroll 4
  for (int i = 0; i < N; ++i) {
    y[i] = _mm512_mul_ps(_mm512_abs_ps(v[i]), _mm512_set1_ps(0.70710678118654752f));
    t[i] = _mm512_mul_ps(y[i], y[i]);
    w[i] = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_max_ps(_mm512_set1_ps(kErfSplit), y[i]));
    u[i] = _mm512_sub_ps(w[i], _mm512_set1_ps(0.6f));
  }
  horner16(u, kErfcS, q);
  horner16(t, kErfP, p);
#pragma GCC unroll 4
  for (int i = 0; i < N; ++i) q[i] = _mm512_sub_ps(q[i], t[i]);
  exp_nonpositive16(q);
#pragma GCC unroll 4
  for (int i = 0; i < N; ++i) {
    const __m512 erf_y = _mm512_mul_ps(y[i], p[i]);
    const __m512 erfc_y = _mm512_mul_ps(q[i], w[i]);
    const __mmask16 neg = _mm512_cmp_ps_mask(v[i], _mm512_setzero_ps(), _CMP_LT_OQ);
    const __mmask16 small = _mm512_cmp_ps_mask(y[i], _mm512_set1_ps(kErfSplit), _CMP_LT_OQ);
    const __m512 one = _mm512_set1_ps(1.f);
    const __m512 near = _mm512_mask_sub_ps(_mm512_add_ps(one, erf_y), neg, one, erf_y);
    const __m512 far = _mm512_mask_mov_ps(_mm512_sub_ps(_mm512_set1_ps(2.f), erfc_y), neg, erfc_y);
    const __m512 one_plus_erf = _mm512_mask_mov_ps(far, small, near);
    v[i] = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v[i]), one_plus_erf);
  }
}

/// Two accumulators folded into one by their 256-bit halves: lanes 0-7 sum to p's total, 8-15
/// to q's.
DEVPIPE_AVX512 inline __m512 fold_halves(__m512 p, __m512 q) {
  return _mm512_add_ps(_mm512_shuffle_f32x4(p, q, 0x44), _mm512_shuffle_f32x4(p, q, 0xEE));
}

/// Lane i of the result: the sum of a[i]'s 16 lanes. A transpose-reduce: accumulators i and
/// i + 4 (i + 8 and i + 12) folded by their 256-bit halves, those pairs by their 128-bit blocks
/// (block b then holds a[4 b + i]'s partial sums), then lanes in pairs twice; 15 adds and 30
/// shuffles for 16 sums, where 16 horizontal sums take 64 and 64.
DEVPIPE_AVX512 inline __m512 sum_lanes16(const __m512 (&a)[16]) {
  __m512 u[4];
#pragma GCC unroll 16
  for (int g = 0; g < 4; ++g) {
    const __m512 lo = fold_halves(a[g], a[g + 4]), hi = fold_halves(a[g + 8], a[g + 12]);
    u[g] = _mm512_add_ps(_mm512_shuffle_f32x4(lo, hi, 0x88), _mm512_shuffle_f32x4(lo, hi, 0xDD));
  }
  const __m512 v0 =
      _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x44), _mm512_shuffle_ps(u[0], u[1], 0xEE));
  const __m512 v1 =
      _mm512_add_ps(_mm512_shuffle_ps(u[2], u[3], 0x44), _mm512_shuffle_ps(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(v0, v1, 0x88), _mm512_shuffle_ps(v0, v1, 0xDD));
}

/// Accumulators a[r * C + c] += x[r * ld + j] * wc[c][j] over j < len for the columns
/// [C0, C0 + G).
template <int R, int C, int C0, int G, bool kPrefetch, class T>
DEVPIPE_AVX512 __attribute__((always_inline)) inline void accumulate_avx512(
    const float* x, std::int64_t ld, std::int64_t len, const T* const* wc, __m512* a) {
  const std::int64_t body = len & ~std::int64_t{15};
  for (std::int64_t j = 0; j < body; j += 16) {
    __m512 xv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(x + r * ld + j);
#pragma GCC unroll 16
    for (int c = C0; c < C0 + G; ++c) {
      if constexpr (kPrefetch) prefetch_ahead(wc[c] + j);
      const __m512 wv = load16(wc[c] + j);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a[r * C + c] = _mm512_fmadd_ps(xv[r], wv, a[r * C + c]);
    }
  }
  if (body < len) {
    const auto tail = static_cast<__mmask16>((1u << (len - body)) - 1);
    __m512 xv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(tail, x + r * ld + body);
#pragma GCC unroll 16
    for (int c = C0; c < C0 + G; ++c) {
      const __m512 wv = load16_masked(wc[c] + body, tail);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a[r * C + c] = _mm512_fmadd_ps(xv[r], wv, a[r * C + c]);
    }
  }
}

/// The weight rows of a block: w + c ld; in a partial block (kPartial: cols < C) rows cols..
/// C - 1 repeat row cols - 1 (in cache; their sums are not stored).
template <int C, bool kPartial, class T>
__attribute__((always_inline)) inline void block_weights(const T* w, std::int64_t ld, int cols,
                                                         const T* (&wc)[C]) {
#pragma GCC unroll 16
  for (int c = 0; c < C; ++c) wc[c] = w + (kPartial ? std::min(c, cols - 1) : c) * ld;
}

/// out[r * stride + c] (+)= sum_{j < len} x[r * ld + j] * w[c * ld + j] for r < R, c < cols
/// (cols = C unless kPartial; added to what out holds when `add`).
template <int R, bool kPartial, class T>
DEVPIPE_AVX512 void dot_block_avx512(const float* x, const T* w, std::int64_t ld, std::int64_t len,
                                     int cols, float* out, std::int64_t stride, bool add) {
  constexpr int C = cols_avx512(R);
  const T* wc[C];
  block_weights<C, kPartial>(w, ld, cols, wc);
  __m512 a[16];
#pragma GCC unroll 16
  for (auto& v : a) v = _mm512_setzero_ps();
  // At most kStreams weight rows at a time.
  constexpr int G = std::min(C, kStreams);
  if (len >= kPrefetchMin) {
    accumulate_avx512<R, C, 0, G, true>(x, ld, len, wc, a);
    if constexpr (C > G) accumulate_avx512<R, C, G, C - G, true>(x, ld, len, wc, a);
  } else {
    accumulate_avx512<R, C, 0, G, false>(x, ld, len, wc, a);
    if constexpr (C > G) accumulate_avx512<R, C, G, C - G, false>(x, ld, len, wc, a);
  }
  __m512 s = sum_lanes16(a);
  // Row r's lanes r C.. r C + cols - 1 are at out + r * stride.
  const auto keep = static_cast<__mmask16>((1u << cols) - 1);
  if (add) {
    __m512 prev = _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      prev = _mm512_mask_loadu_ps(prev, static_cast<__mmask16>(keep << (r * C)),
                                  out + r * stride - r * C);
    }
    s = _mm512_add_ps(s, prev);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(out + r * stride - r * C, static_cast<__mmask16>(keep << (r * C)), s);
  }
}

/// v[0, count) + bias (when given), the activation, stored to dst; v is scratch.
template <class T>
DEVPIPE_AVX512 void finish_row_avx512(float* v, const T* bias, Act act, T* dst, int count) {
  const bool scalar = act == Act::GeluTanh || act == Act::Silu;
  if (scalar) {  // the bias first, then one value at a time
    for (int i = 0; bias && i < count; i += 16) {
      const __mmask16 m = first_lanes16(count - i);
      _mm512_mask_storeu_ps(
          v + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, v + i), load16_masked(bias + i, m)));
    }
    for (int j = 0; j < count; ++j) v[j] = activate_scalar(act, v[j]);
  }
  // Four vectors at a time (the GELU's chains overlap); lanes past count are 0.
  constexpr int kVectors = 4;
  for (int i0 = 0; i0 < count; i0 += 16 * kVectors) {
    __m512 s[kVectors];
    __mmask16 m[kVectors];
#pragma GCC unroll 4
    for (int q = 0; q < kVectors; ++q) {
      const int i = i0 + 16 * q;
      m[q] = first_lanes16(count - i);
      s[q] = _mm512_maskz_loadu_ps(m[q], v + i);
      if (!scalar && bias) s[q] = _mm512_add_ps(s[q], load16_masked(bias + i, m[q]));
      if (act == Act::Relu) s[q] = _mm512_max_ps(_mm512_setzero_ps(), s[q]);  // NaN: s
    }
    if (act == Act::Gelu) gelu16(s);
#pragma GCC unroll 4
    for (int q = 0; q < kVectors; ++q) store16_masked(dst + i0 + 16 * q, m[q], s[q]);
  }
}

/// dst[0, n) = src[0, n) widened from bfloat16.
DEVPIPE_AVX512 void widen_avx512(const std::uint16_t* src, float* dst, std::int64_t n) {
  for (std::int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes16(n - i);
    _mm512_mask_storeu_ps(dst + i, m, load16_masked(src + i, m));
  }
}

#pragma GCC diagnostic pop

// ---- AVX2 ----

inline float widen(float v) { return v; }
inline float widen(std::uint16_t v) { return bf16_to_float(v); }

template <class T>
DEVPIPE_AVX2 inline __m256 load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

/// -1 in the lanes i < n, 0 in the others.
DEVPIPE_AVX2 inline __m256i first_lanes8(std::int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<std::int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/// p[0, n), n <= 8, in lanes 0.. n - 1, the others 0 (nothing read past p + n).
template <class T>
DEVPIPE_AVX2 inline __m256 load8_first(const T* p, std::int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_maskload_ps(p, first_lanes8(n));
  } else {
    alignas(16) std::uint16_t part[8] = {};
    for (std::int64_t i = 0; i < n; ++i) part[i] = p[i];
    return load8(part);
  }
}

/// float_to_bf16 of v's lanes 0.. n - 1, stored at p.
DEVPIPE_AVX2 inline void store8_first(std::uint16_t* p, std::int64_t n, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i high = _mm256_srli_epi32(u, 16);
  const __m256i rounding =
      _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(high, _mm256_set1_epi32(1)));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, rounding), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_or_si256(high, _mm256_set1_epi32(0x40)),
                         _mm256_castps_si256(nan));
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return;
  }
  alignas(16) std::uint16_t part[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(part), h);
  std::memcpy(p, part, static_cast<std::size_t>(n) * sizeof(std::uint16_t));
}

DEVPIPE_AVX2 inline void store8_first(float* p, std::int64_t n, __m256 v) {
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else {
    _mm256_maskstore_ps(p, first_lanes8(n), v);
  }
}

template <int N>
DEVPIPE_AVX2 inline __m256 horner8(__m256 x, const float (&c)[N]) {
  __m256 p = _mm256_set1_ps(c[0]);
#pragma GCC unroll 16
  for (int i = 1; i < N; ++i) p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(c[i]));
  return p;
}

/// exp_nonpositive16 in 8 lanes.
DEVPIPE_AVX2 inline __m256 exp_nonpositive8(__m256 z) {
  const __m256 zc = _mm256_max_ps(_mm256_set1_ps(kExpFloor), z);  // NaN: z
  const __m256 shifted = _mm256_fmadd_ps(zc, _mm256_set1_ps(kLog2e), _mm256_set1_ps(kRoundShift));
  const __m256 n = _mm256_sub_ps(shifted, _mm256_set1_ps(kRoundShift));
  const __m256 r =
      _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), zc));
  const __m256i e =
      _mm256_add_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(127 - 0x4B400000));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  const __m256 keep = _mm256_cmp_ps(z, _mm256_set1_ps(kExpFloor), _CMP_NLT_UQ);
  return _mm256_and_ps(keep, _mm256_mul_ps(horner8(r, kExpTaylor), scale));
}

/// gelu16 in 8 lanes.
DEVPIPE_AVX2 inline __m256 gelu8(__m256 v) {
  const __m256 y = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), v),
                                 _mm256_set1_ps(0.70710678118654752f));
  const __m256 t = _mm256_mul_ps(y, y);
  const __m256 erf_y = _mm256_mul_ps(y, horner8(t, kErfP));
  const __m256 w = _mm256_div_ps(_mm256_set1_ps(1.f), _mm256_max_ps(_mm256_set1_ps(kErfSplit), y));
  const __m256 q = horner8(_mm256_sub_ps(w, _mm256_set1_ps(0.6f)), kErfcS);
  const __m256 erfc_y = _mm256_mul_ps(exp_nonpositive8(_mm256_sub_ps(q, t)), w);
  const __m256 neg = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 small = _mm256_cmp_ps(y, _mm256_set1_ps(kErfSplit), _CMP_LT_OQ);
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 near = _mm256_blendv_ps(_mm256_add_ps(one, erf_y), _mm256_sub_ps(one, erf_y), neg);
  const __m256 far = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.f), erfc_y), erfc_y, neg);
  const __m256 one_plus_erf = _mm256_blendv_ps(far, near, small);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), one_plus_erf);
}

/// Lane i of the result: the sum of a[i]'s 8 lanes (sum_lanes16's transpose-reduce in 8 lanes:
/// 7 adds and 14 shuffles for 8 sums).
DEVPIPE_AVX2 inline __m256 sum_lanes8(const __m256 (&a)[8]) {
  __m256 s[4];
#pragma GCC unroll 16
  for (int g = 0; g < 4; ++g) {
    s[g] = _mm256_add_ps(_mm256_permute2f128_ps(a[g], a[g + 4], 0x20),
                         _mm256_permute2f128_ps(a[g], a[g + 4], 0x31));
  }
  const __m256 v0 =
      _mm256_add_ps(_mm256_shuffle_ps(s[0], s[1], 0x44), _mm256_shuffle_ps(s[0], s[1], 0xEE));
  const __m256 v1 =
      _mm256_add_ps(_mm256_shuffle_ps(s[2], s[3], 0x44), _mm256_shuffle_ps(s[2], s[3], 0xEE));
  return _mm256_add_ps(_mm256_shuffle_ps(v0, v1, 0x88), _mm256_shuffle_ps(v0, v1, 0xDD));
}

/// Rows r < R of out (stride apart), C values each, in the lanes r C.. r C + C - 1 (the rest
/// 0).
template <int R, int C>
DEVPIPE_AVX2 inline __m256 load_rows8(const float* out, std::int64_t stride) {
  if constexpr (C == 8) {
    return _mm256_loadu_ps(out);
  } else if constexpr (C == 4) {
    return _mm256_set_m128(R > 1 ? _mm_loadu_ps(out + stride) : _mm_setzero_ps(),
                           _mm_loadu_ps(out));
  } else {
    static_assert(C == 2);
    auto pair = [](const float* p) { return reinterpret_cast<const __m64*>(p); };
    const __m128 lo =
        _mm_loadh_pi(_mm_loadl_pi(_mm_setzero_ps(), pair(out)), pair(out + (R > 1 ? stride : 0)));
    __m128 hi = _mm_loadl_pi(_mm_setzero_ps(), pair(out + 2 * stride));
    if constexpr (R > 3) hi = _mm_loadh_pi(hi, pair(out + 3 * stride));
    return _mm256_set_m128(hi, lo);
  }
}

/// accumulate_avx512 in 8 lanes, for j < body (a multiple of 8), all C columns.
template <int R, bool kPrefetch, class T>
DEVPIPE_AVX2 __attribute__((always_inline)) inline void accumulate_avx2(
    const float* x, std::int64_t ld, std::int64_t body, const T* const* wc, __m256* a) {
  constexpr int C = cols_avx2(R);
  for (std::int64_t j = 0; j < body; j += 8) {
    __m256 xv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * ld + j);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      if constexpr (kPrefetch) prefetch_ahead(wc[c] + j);
      const __m256 wv = load8(wc[c] + j);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a[r * C + c] = _mm256_fmadd_ps(xv[r], wv, a[r * C + c]);
    }
  }
}

/// dot_block_avx512 in 8 lanes; it stores all C outputs of a row (cols.. C - 1: repeats), so
/// out needs room for them.
template <int R, bool kPartial, class T>
DEVPIPE_AVX2 void dot_block_avx2(const float* x, const T* w, std::int64_t ld, std::int64_t len,
                                 int cols, float* out, std::int64_t stride, bool add) {
  constexpr int C = cols_avx2(R);
  const T* wc[C];
  block_weights<C, kPartial>(w, ld, cols, wc);
  __m256 a[8];
#pragma GCC unroll 16
  for (auto& v : a) v = _mm256_setzero_ps();
  const std::int64_t body = len & ~std::int64_t{7};
  if (len >= kPrefetchMin) {
    accumulate_avx2<R, true>(x, ld, body, wc, a);
  } else {
    accumulate_avx2<R, false>(x, ld, body, wc, a);
  }
  if (body < len) {
    // With a whole vector before it, the tail is the last 8 values with the first ones (done
    // above) zeroed; else the values themselves.
    const bool overlap = body > 0;
    const std::int64_t at = overlap ? len - 8 : 0;
    const __m256 fresh = _mm256_castsi256_ps(
        _mm256_cmpgt_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                           _mm256_set1_epi32(static_cast<int>(body + 7 - len))));
    __m256 xv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      xv[r] = overlap ? _mm256_and_ps(fresh, _mm256_loadu_ps(x + r * ld + at))
                      : load8_first(x + r * ld, len);
    }
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const __m256 wv = overlap ? _mm256_and_ps(fresh, load8(wc[c] + at)) : load8_first(wc[c], len);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a[r * C + c] = _mm256_fmadd_ps(xv[r], wv, a[r * C + c]);
    }
  }
  __m256 s = sum_lanes8(a);
  if (add) s = _mm256_add_ps(s, load_rows8<R, C>(out, stride));
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* o = out + r * stride;
    if constexpr (C == 8) {
      _mm256_storeu_ps(o, s);
    } else if constexpr (C == 4) {
      _mm_storeu_ps(o, r == 0 ? _mm256_castps256_ps128(s) : _mm256_extractf128_ps(s, 1));
    } else {
      static_assert(C == 2);
      const __m128 half = r < 2 ? _mm256_castps256_ps128(s) : _mm256_extractf128_ps(s, 1);
      if (r % 2 == 0) {
        _mm_storel_pi(reinterpret_cast<__m64*>(o), half);
      } else {
        _mm_storeh_pi(reinterpret_cast<__m64*>(o), half);
      }
    }
  }
}

/// finish_row_avx512 in 8 lanes.
template <class T>
DEVPIPE_AVX2 void finish_row_avx2(float* v, const T* bias, Act act, T* dst, int count) {
  const bool scalar = act == Act::GeluTanh || act == Act::Silu;
  if (scalar) {
    for (int j = 0; bias && j < count; ++j) v[j] += widen(bias[j]);
    for (int j = 0; j < count; ++j) v[j] = activate_scalar(act, v[j]);
  }
  for (int i = 0; i < count; i += 8) {
    __m256 s = _mm256_maskload_ps(v + i, first_lanes8(count - i));
    if (!scalar) {
      if (bias)
        s = _mm256_add_ps(s, count - i >= 8 ? load8(bias + i) : load8_first(bias + i, count - i));
      if (act == Act::Gelu) s = gelu8(s);
      if (act == Act::Relu) s = _mm256_max_ps(_mm256_setzero_ps(), s);  // NaN: s
    }
    store8_first(dst + i, count - i, s);
  }
}

DEVPIPE_AVX2 void widen_avx2(const std::uint16_t* src, float* dst, std::int64_t n) {
  std::int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

#undef DEVPIPE_AVX512
#undef DEVPIPE_AVX2

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
    // Rows per task: whole blocks of every row group when there are enough.
    std::int64_t unit = 1;
#if defined(__x86_64__)
    const bool avx512 = isa == CpuIsa::Avx512;
    const std::int64_t group = avx512 ? kRowsAvx512 : kRowsAvx2;
    for (std::int64_t rows : {std::min(m, group), m % group}) {
      if (rows == 0) continue;
      const int cols =
          avx512 ? cols_avx512(static_cast<int>(rows)) : cols_avx2(static_cast<int>(rows));
      unit = std::lcm(unit, std::int64_t{cols});
    }
#endif
    rows_per_task_ = (n + tasks - 1) / tasks;
    if (n >= 2 * unit) rows_per_task_ = (rows_per_task_ + unit - 1) / unit * unit;
    tasks_ = (n + rows_per_task_ - 1) / rows_per_task_;
  }

  std::size_t scratch_bytes() const override {
    return bf16_ ? static_cast<std::size_t>(m_ * k_) * sizeof(float) : 0;  // x widened
  }

  bool wants_pool() const override { return true; }

  void run(const RunContext& cx) override {
    const float* x = reinterpret_cast<const float*>(cx.values[x_]);
#if defined(__x86_64__)
    if (bf16_) {
      auto* wide = reinterpret_cast<float*>(cx.scratch);
      const auto* xs = reinterpret_cast<const std::uint16_t*>(cx.values[x_]);
      if (isa_ == CpuIsa::Avx512) {
        widen_avx512(xs, wide, m_ * k_);
      } else {
        widen_avx2(xs, wide, m_ * k_);
      }
      x = wide;
    }
#endif
    const std::byte* w = cx.values[w_];
    const std::byte* b = b_ >= 0 ? cx.values[b_] : nullptr;
    std::byte* y = cx.values[y_];
    auto rows = [&](std::int64_t n0, std::int64_t n1) {  // outputs [n0, n1) of every row
      if (bf16_) {
        run_rows(x, reinterpret_cast<const std::uint16_t*>(w),
                 reinterpret_cast<const std::uint16_t*>(b), reinterpret_cast<std::uint16_t*>(y), n0,
                 n1);
      } else {
        run_rows(x, reinterpret_cast<const float*>(w), reinterpret_cast<const float*>(b),
                 reinterpret_cast<float*>(y), n0, n1);
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
  /// Outputs [n0, n1) of every row; T is the dtype of w, b and y (x is float32).
  template <class T>
  void run_rows(const float* x, const T* w, const T* b, T* y, std::int64_t n0,
                std::int64_t n1) const {
#if defined(__x86_64__)
    const std::int64_t group = isa_ == CpuIsa::Avx512 ? kRowsAvx512 : kRowsAvx2;
    for (std::int64_t r0 = 0; r0 < m_; r0 += group) {
      const std::int64_t rows = std::min(group, m_ - r0);
      // clang-format off
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
      // clang-format on
    }
#endif
  }

#if defined(__x86_64__)
  /// Rows [r0, r0 + R) x outputs [n0, n1): blocks of C outputs into a chunk of up to kChunk
  /// (a whole number of blocks) per row, then the chunk's bias, activation and store at once
  /// (the activation's vector code then has independent vectors to overlap).
  template <int R, bool kAvx512, class T>
  void block_rows(const float* x, const T* w, const T* b, T* y, std::int64_t r0, std::int64_t n0,
                  std::int64_t n1) const {
    constexpr int C = kAvx512 ? cols_avx512(R) : cols_avx2(R);
    constexpr int kCols = kChunk / C * C;
    static_assert(kAvx512 || kCols == kChunk, "the AVX2 blocks store C outputs per row");
    // K in blocks whose R rows of x fit in the L1 cache, each block of K for the whole chunk.
    constexpr std::int64_t kBlock = (kBlockFloats / R) & ~std::int64_t{15};
    const float* xr = x + r0 * k_;
    alignas(64) float chunk[R * kChunk];
    for (std::int64_t c0 = n0; c0 < n1; c0 += kCols) {
      const auto count = static_cast<int>(std::min<std::int64_t>(n1 - c0, kCols));
      for (std::int64_t j0 = 0; j0 < k_; j0 += kBlock) {
        const std::int64_t len = std::min(kBlock, k_ - j0);
        const T* wb = w + c0 * k_ + j0;
        const bool add = j0 > 0;
        int c = 0;
        for (; c + C <= count; c += C) {
          if constexpr (kAvx512) {
            dot_block_avx512<R, false>(xr + j0, wb + c * k_, k_, len, C, chunk + c, kChunk, add);
          } else {
            dot_block_avx2<R, false>(xr + j0, wb + c * k_, k_, len, C, chunk + c, kChunk, add);
          }
        }
        if (c < count) {
          const int cols = count - c;
          if constexpr (kAvx512) {
            dot_block_avx512<R, true>(xr + j0, wb + c * k_, k_, len, cols, chunk + c, kChunk, add);
          } else {
            dot_block_avx2<R, true>(xr + j0, wb + c * k_, k_, len, cols, chunk + c, kChunk, add);
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        T* dst = y + (r0 + r) * n_ + c0;
        const T* bias = b ? b + c0 : nullptr;
        if constexpr (kAvx512) {
          finish_row_avx512(chunk + r * kChunk, bias, act_, dst, count);
        } else {
          finish_row_avx2(chunk + r * kChunk, bias, act_, dst, count);
        }
      }
    }
  }
#endif

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
