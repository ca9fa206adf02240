// The fused attention kernel for ScaledDotProductAttention and MaskedAttention.
//
// Flash-attention style: a work item is one (batch, kv head, tile of up to kRows query rows),
// where the rows of a tile are the (query head of the kv head's group, query position) pairs,
// so a GQA group reads each key/value block once. Keys are visited in blocks of kKeyBlock with
// an online softmax (running max m, running sum l, rescaled float32 accumulator): no [T, S]
// score matrix exists, only kRows x kKeyBlock scores. Each row stops at its last visible key
// (causal: i; masked_attention: min(kv_lengths[b], q_positions[b, i] + 1), and at most C with a
// key mask [B, C]), so the decode path reads the cache only up to each sequence's length and
// never past C: a token-generation stage compiled per cache bucket C attends over the first C
// rows of the [B, H, S, D] cache in place (keys are addressed with the cache's row stride S). bfloat16/float16 keys and values are
// widened block by block; all math is float32. Work items run in parallel over the OpenMP team.
//
// The tile routine is compiled three times, for AVX-512 (F/BW/VL/DQ), AVX2+FMA
// and baseline x86-64, and the kernel picks the best the CPU supports when it is built
// (cpu_isa(), shared with the other hand-written kernels); DEVPIPE_CPU_ISA=baseline|avx2|avx512
// asks for a lower one (tests run every path on one machine). Other compilers/architectures
// get the portable path only.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/kernel.h"
#include "graph/op_def.h"

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#define DEVPIPE_X86_DISPATCH 1
#define DEVPIPE_INLINE inline __attribute__((always_inline))
#else
#define DEVPIPE_X86_DISPATCH 0
#define DEVPIPE_INLINE inline
#endif

namespace devpipe::cpu {

namespace {

constexpr std::int64_t kRows = 16;        // query rows per tile
constexpr std::int64_t kKeyBlock = 32;    // keys per block
constexpr std::int64_t kMaxHeadDim = 256;

enum class MaskKind { None, Causal, Int, Float, Positions };

/// 16 floats (GCC/Clang vector extension): one AVX-512 register, two AVX2 or four SSE ones in
/// the tile routine's three builds.
typedef float Vec16 __attribute__((vector_size(64)));
constexpr std::int64_t kScoreRows = 4;  // query rows whose scores one pass over a key block computes
static_assert(kRows % kScoreRows == 0 && kKeyBlock == 32);

/// Everything a tile needs (pointers are the run's, element counts as in the graph).
struct AttnArgs {
  const void* q;
  const void* k;
  const void* v;
  void* y;
  const void* mask;            // Int: int64; Float: the dtype; else null
  const std::int64_t* pos;     // Positions: [B, T]
  const std::int64_t* len;     // Positions: [B]
  const std::int64_t* key_mask;  // Positions with a key mask: [B, C] (null: none)
  std::int64_t C;              // keys visible at most: the key mask's C, else S
  int dtype;                   // 0 float32, 1 bfloat16, 2 float16
  MaskKind kind;
  std::int64_t B, Hq, Hkv, T, S, D, Dv, group;
  std::int64_t mst[4];         // mask element strides over [B, Hq, T, S] (0: broadcast)
  float scale;
};

inline float load_elem(const void* base, std::int64_t i, int dtype) {
  switch (dtype) {
    case 0:
      return static_cast<const float*>(base)[i];
    case 1:
      return bf16_bits_to_float(static_cast<const std::uint16_t*>(base)[i]);
    default:
      return fp16_to_float(static_cast<const std::uint16_t*>(base)[i]);
  }
}

inline void store_elem(void* base, std::int64_t i, int dtype, float f) {
  switch (dtype) {
    case 0:
      static_cast<float*>(base)[i] = f;
      break;
    case 1:
      static_cast<std::uint16_t*>(base)[i] = float_to_bf16_bits(f);
      break;
    default:
      static_cast<std::uint16_t*>(base)[i] = float_to_fp16(f);
      break;
  }
}

/// `n` elements of row `row` (of `width`) of a [.., width] tensor as float32 into `dst`; for
/// float32 returns the tensor's own memory instead.
DEVPIPE_INLINE const float* widen_rows(const void* base, std::int64_t first_elem, std::int64_t n, int dtype,
                        float* dst) {
  if (dtype == 0) return static_cast<const float*>(base) + first_elem;
  if (dtype == 1) {
    const std::uint16_t* s = static_cast<const std::uint16_t*>(base) + first_elem;
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) {
      dst[i] = std::bit_cast<float>(static_cast<std::uint32_t>(s[i]) << 16);
    }
    return dst;
  }
  const std::uint16_t* s = static_cast<const std::uint16_t*>(base) + first_elem;
  for (std::int64_t i = 0; i < n; ++i) dst[i] = fp16_to_float(s[i]);
  return dst;
}

/// One tile: kv head `hk` of batch `b`, rows [r0, r1) of the group's (head, position) rows.
DEVPIPE_INLINE void attend_tile_body(const AttnArgs& a, std::int64_t b, std::int64_t hk, std::int64_t r0,
                 std::int64_t r1) {
  alignas(64) float qf[kRows][kMaxHeadDim];
  alignas(64) float acc[kRows][kMaxHeadDim];
  alignas(64) float sc[kRows][kKeyBlock];
  alignas(64) float kbuf[kKeyBlock * kMaxHeadDim];
  alignas(64) float kt[kMaxHeadDim * kKeyBlock];  // the key block transposed: kt[d * kKeyBlock + j]
  alignas(64) float vbuf[kKeyBlock * kMaxHeadDim];
  float m[kRows], l[kRows];
  std::int64_t limit[kRows], qrow[kRows], trow[kRows], hrow[kRows];
  const std::int64_t D = a.D, Dv = a.Dv, S = a.S, T = a.T;
  const std::int64_t nr = r1 - r0;
  std::int64_t key_end = 0;
  for (std::int64_t r = 0; r < nr; ++r) {
    const std::int64_t g = (r0 + r) / T, t = (r0 + r) % T;
    const std::int64_t h = hk * a.group + g;
    hrow[r] = h;
    trow[r] = t;
    qrow[r] = (b * a.Hq + h) * T + t;
    std::int64_t lim = S;
    switch (a.kind) {
      case MaskKind::Causal:
        lim = std::min(S, t + 1);
        break;
      case MaskKind::Positions:
        lim = std::clamp<std::int64_t>(std::min(a.len[b], a.pos[b * T + t] + 1), 0, a.C);
        break;
      case MaskKind::None:
      case MaskKind::Int:
      case MaskKind::Float:
        break;
    }
    limit[r] = lim;
    key_end = std::max(key_end, lim);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
    const float* qsrc = widen_rows(a.q, qrow[r] * D, D, a.dtype, qf[r]);
    const float s = a.scale;
#pragma omp simd
    for (std::int64_t d = 0; d < D; ++d) qf[r][d] = qsrc[d] * s;
#pragma omp simd
    for (std::int64_t d = 0; d < Dv; ++d) acc[r][d] = 0.f;
  }
  for (std::int64_t r = nr; r < (nr + kScoreRows - 1) / kScoreRows * kScoreRows; ++r) {
    for (std::int64_t d = 0; d < D; ++d) qf[r][d] = 0.f;  // rows past the tile: their scores go unread
  }
  const std::int64_t kv_base = (b * a.Hkv + hk) * S;
  for (std::int64_t j0 = 0; j0 < key_end; j0 += kKeyBlock) {
    const std::int64_t jn = std::min(kKeyBlock, key_end - j0);
    const float* kb = widen_rows(a.k, (kv_base + j0) * D, jn * D, a.dtype, kbuf);
    const float* vb = widen_rows(a.v, (kv_base + j0) * Dv, jn * Dv, a.dtype, vbuf);
    // Scores of every row of the tile against the block: the keys transposed, so that each
    // row's 32 dot products are two vectors accumulated over d (keys past jn are zeros); four
    // rows at a time, eight independent accumulators.
    for (std::int64_t j = 0; j < jn; ++j) {
      for (std::int64_t d = 0; d < D; ++d) kt[d * kKeyBlock + j] = kb[j * D + d];
    }
    for (std::int64_t j = jn; j < kKeyBlock; ++j) {
      for (std::int64_t d = 0; d < D; ++d) kt[d * kKeyBlock + j] = 0.f;
    }
    for (std::int64_t r = 0; r < nr; r += kScoreRows) {
      Vec16 lo[kScoreRows] = {}, hi[kScoreRows] = {};
      for (std::int64_t d = 0; d < D; ++d) {
        Vec16 k0, k1;  // (memcpy, not a vector function: no vector passes an ISA boundary)
        std::memcpy(&k0, kt + d * kKeyBlock, sizeof k0);
        std::memcpy(&k1, kt + d * kKeyBlock + 16, sizeof k1);
        for (std::int64_t i = 0; i < kScoreRows; ++i) {
          const float q = qf[r + i][d];
          lo[i] += q * k0;
          hi[i] += q * k1;
        }
      }
      for (std::int64_t i = 0; i < kScoreRows; ++i) {
        std::memcpy(sc[r + i], &lo[i], sizeof lo[i]);
        std::memcpy(sc[r + i] + 16, &hi[i], sizeof hi[i]);
      }
    }
    for (std::int64_t r = 0; r < nr; ++r) {
      if (j0 >= limit[r]) continue;
      const std::int64_t cnt = std::min(jn, limit[r] - j0);
      float* s = sc[r];
      float bm = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j < cnt; ++j) {
        float dot = s[j];
        if (a.key_mask && a.key_mask[b * a.C + j0 + j] == 0) dot = -std::numeric_limits<float>::infinity();
        if (a.kind == MaskKind::Int || a.kind == MaskKind::Float) {
          const std::int64_t mi = b * a.mst[0] + hrow[r] * a.mst[1] + trow[r] * a.mst[2] +
                                  (j0 + j) * a.mst[3];
          if (a.kind == MaskKind::Int) {
            if (static_cast<const std::int64_t*>(a.mask)[mi] == 0) {
              dot = -std::numeric_limits<float>::infinity();
            }
          } else {
            dot += load_elem(a.mask, mi, a.dtype);
          }
        }
        s[j] = dot;
        bm = std::max(bm, dot);
      }
      if (bm == -std::numeric_limits<float>::infinity()) continue;  // nothing visible here
      const float mnew = std::max(m[r], bm);
      const float corr = std::exp(m[r] - mnew);  // 0 on the first visible block
      float sum = 0.f;
      for (std::int64_t j = 0; j < cnt; ++j) {
        s[j] = std::exp(s[j] - mnew);
        sum += s[j];
      }
      l[r] = l[r] * corr + sum;
      float* o = acc[r];
      if (corr != 1.f) {
#pragma omp simd
        for (std::int64_t d = 0; d < Dv; ++d) o[d] *= corr;
      }
      for (std::int64_t j = 0; j < cnt; ++j) {
        const float p = s[j];
        if (p == 0.f) continue;
        const float* vr = vb + j * Dv;
#pragma omp simd
        for (std::int64_t d = 0; d < Dv; ++d) o[d] += p * vr[d];
      }
      m[r] = mnew;
    }
  }
  for (std::int64_t r = 0; r < nr; ++r) {
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no visible key: zeros
    const std::int64_t base = qrow[r] * Dv;
    if (a.dtype == 0) {
      float* y = static_cast<float*>(a.y) + base;
#pragma omp simd
      for (std::int64_t d = 0; d < Dv; ++d) y[d] = acc[r][d] * inv;
    } else {
      for (std::int64_t d = 0; d < Dv; ++d) store_elem(a.y, base + d, a.dtype, acc[r][d] * inv);
    }
  }
}

using TileFn = void (*)(const AttnArgs&, std::int64_t, std::int64_t, std::int64_t, std::int64_t);

void attend_tile_baseline(const AttnArgs& a, std::int64_t b, std::int64_t hk, std::int64_t r0,
                          std::int64_t r1) {
  attend_tile_body(a, b, hk, r0, r1);
}
#if DEVPIPE_X86_DISPATCH
__attribute__((target("avx2,fma"))) void attend_tile_avx2(const AttnArgs& a, std::int64_t b,
                                                              std::int64_t hk, std::int64_t r0,
                                                              std::int64_t r1) {
  attend_tile_body(a, b, hk, r0, r1);
}
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"))) void attend_tile_avx512(
    const AttnArgs& a, std::int64_t b, std::int64_t hk, std::int64_t r0, std::int64_t r1) {
  attend_tile_body(a, b, hk, r0, r1);
}
#endif

/// The widest tile routine this CPU runs, capped by DEVPIPE_CPU_ISA (cpu_isa()); `isa` gets
/// its name.
TileFn pick_tile_fn(std::string& isa) {
  const CpuIsa best = cpu_isa();
#if DEVPIPE_X86_DISPATCH
  switch (best) {
    case CpuIsa::Avx512:
      isa = isa_name(best);
      return attend_tile_avx512;
    case CpuIsa::Avx2:
      isa = isa_name(best);
      return attend_tile_avx2;
    case CpuIsa::Baseline:
      break;
  }
#else
  (void)best;
#endif
  isa = isa_name(CpuIsa::Baseline);
  return attend_tile_baseline;
}

class AttentionKernel : public Kernel {
 public:
  explicit AttentionKernel(const BuildContext& cx)
      : q_(cx.in_id(0)), k_(cx.in_id(1)), v_(cx.in_id(2)), out_(cx.out_id()) {
    const Shape &q = cx.in(0).shape, &k = cx.in(1).shape, &v = cx.in(2).shape;
    AttnArgs& a = args_;
    a = {};
    a.B = q[0];
    a.Hq = q[1];
    a.T = q[2];
    a.D = q[3];
    a.Hkv = k[1];
    a.S = k[2];
    a.Dv = v[3];
    a.group = a.Hq / a.Hkv;
    a.C = a.S;
    if (a.D > kMaxHeadDim || a.Dv > kMaxHeadDim) {
      throw Unsupported("cpu backend: " + cx.where + ": head dims above " +
                        std::to_string(kMaxHeadDim) + " (got " + std::to_string(a.D) + ", " +
                        std::to_string(a.Dv) + ")");
    }
    switch (cx.out().dtype) {
      case DType::Float32:
        a.dtype = 0;
        break;
      case DType::BFloat16:
        a.dtype = 1;
        break;
      case DType::Float16:
        a.dtype = 2;
        break;
      case DType::Int64:
        throw Unsupported("cpu backend: " + cx.where + ": no int64 attention");
    }
    a.scale = static_cast<float>(attention_scale(cx.node.attrs, a.D));
    if (cx.node.op == OpKind::MaskedAttention) {
      a.kind = MaskKind::Positions;
      pos_ = cx.in_id(3);
      len_ = cx.in_id(4);
      if (cx.num_inputs() == 6) {
        key_mask_ = cx.in_id(5);
        a.C = cx.in(5).shape[1];
      }
    } else if (cx.num_inputs() == 4) {
      mask_ = cx.in_id(3);
      a.kind = cx.in(3).dtype == DType::Int64 ? MaskKind::Int : MaskKind::Float;
      const auto st = attention_mask_strides(cx.in(3).shape);
      std::copy(st.begin(), st.end(), a.mst);
    } else {
      a.kind = cx.node.attrs.i("is_causal", 0) != 0 ? MaskKind::Causal : MaskKind::None;
    }
    rows_ = a.group * a.T;
    tiles_ = (rows_ + kRows - 1) / kRows;
    std::string isa;
    tile_ = pick_tile_fn(isa);
  }

  void run(const RunContext& cx) override {
    AttnArgs a = args_;
    a.q = cx.values[q_];
    a.k = cx.values[k_];
    a.v = cx.values[v_];
    a.y = cx.values[out_];
    if (mask_ >= 0) a.mask = cx.values[mask_];
    if (a.kind == MaskKind::Positions) {
      a.pos = reinterpret_cast<const std::int64_t*>(cx.values[pos_]);
      a.len = reinterpret_cast<const std::int64_t*>(cx.values[len_]);
      if (key_mask_ >= 0) a.key_mask = reinterpret_cast<const std::int64_t*>(cx.values[key_mask_]);
      for (std::int64_t b = 0; b < a.B; ++b) {
        if (a.len[b] < 0 || a.len[b] > a.S) {
          throw InvalidArgument("cpu backend: " + where + ": kv_lengths[" + std::to_string(b) +
                                "] = " + std::to_string(a.len[b]) + " is outside [0, " +
                                std::to_string(a.S) + "] (the cache length)");
        }
      }
    }
    const std::int64_t items = a.B * a.Hkv * tiles_;
    const std::int64_t rows = rows_, tiles = tiles_, hkv = a.Hkv;
    const TileFn tile_fn = tile_;
    auto body = [&](std::int64_t it) {
      const std::int64_t tile = it % tiles, bh = it / tiles;
      const std::int64_t r0 = tile * kRows;
      tile_fn(a, bh / hkv, bh % hkv, r0, std::min(rows, r0 + kRows));
    };
    if (items < 2 || a.C * a.D * rows < 16384) {
      for (std::int64_t it = 0; it < items; ++it) body(it);
      return;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (std::int64_t it = 0; it < items; ++it) body(it);
  }

 private:
  int q_, k_, v_, out_, mask_ = -1, pos_ = -1, len_ = -1, key_mask_ = -1;
  AttnArgs args_;
  std::int64_t rows_ = 0, tiles_ = 0;
  TileFn tile_ = nullptr;
};

}  // namespace

std::unique_ptr<Kernel> make_attention_kernel(const BuildContext& cx) {
  return std::make_unique<AttentionKernel>(cx);
}

std::string attention_isa() {
  std::string isa;
  pick_tile_fn(isa);
  return isa;
}

}  // namespace devpipe::cpu
