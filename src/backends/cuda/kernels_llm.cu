// Kernels of the decoder-LLM ops: unary math and scalar affine, constants, selection
// (where/masked_fill, index_select, gather), argmax, sum/mean, rotary embedding and attention.
// Written for correctness first: simple grid-stride loops, one block per attention query row.
// Compile-checked only when written (no GPU at hand): the conformance suite
// (tests/test_cuda_backend.cpp) runs every one of them against the reference on a device.
#include <cmath>

#include "backends/cuda/device_common.cuh"

namespace devpipe::cuda {
namespace {

template <class T>
__global__ void unary_kernel(const T* x, T* y, std::int64_t n, UnaryOp op, float a, float b) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    const float v = to_float(x[i]);
    float r = v;
    switch (op) {
      case UnaryOp::Exp:
        r = expf(v);
        break;
      case UnaryOp::Tanh:
        r = tanhf(v);
        break;
      case UnaryOp::Sigmoid:
        r = 1.f / (1.f + expf(-v));
        break;
      case UnaryOp::Affine:
        r = v * a + b;
        break;
    }
    y[i] = from_float<T>(r);
  }
}

__global__ void affine_i64_kernel(const std::int64_t* x, std::int64_t* y, std::int64_t n,
                                  unsigned long long a, unsigned long long b) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    y[i] = static_cast<std::int64_t>(static_cast<unsigned long long>(x[i]) * a + b);
  }
}

template <class E>
__global__ void fill_kernel(E* y, std::int64_t n, E value) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) y[i] = value;
}

template <class T>
__global__ void arange_kernel(T* y, std::int64_t n) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    y[i] = from_float<T>(static_cast<float>(i));
  }
}
__global__ void arange_i64_kernel(std::int64_t* y, std::int64_t n) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) y[i] = i;
}

template <class E>
__global__ void select_kernel(const std::int64_t* cond, const E* a, E fill, const E* b, E* y,
                              SelectDims d, std::int64_t n) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    std::int64_t rem = i, oc = 0, oa = 0, ob = 0;
    for (int k = d.ndim - 1; k >= 0; --k) {
      const std::int64_t c = rem % d.size[k];
      rem /= d.size[k];
      oc += c * d.sc[k];
      oa += c * d.sa[k];
      ob += c * d.sb[k];
    }
    y[i] = cond[oc] != 0 ? (a ? a[oa] : fill) : b[ob];
  }
}

__device__ __forceinline__ void record(DeviceErrorRecord* err, int code, int tag,
                                       std::int64_t value, std::int64_t pos, std::int64_t limit) {
  if (err && atomicCAS(&err->code, 0, code) == 0) {
    err->tag = tag;
    err->value = value;
    err->position = pos;
    err->limit = limit;
  }
}

template <class E>
__global__ void index_select_kernel(const E* x, const std::int64_t* idx, E* y, std::int64_t outer,
                                    std::int64_t n, std::int64_t inner, std::int64_t m,
                                    DeviceErrorRecord* err, int tag) {
  const std::int64_t total = outer * m * inner;
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t c = i % inner, j = (i / inner) % m, o = i / (inner * m);
    const std::int64_t r = idx[j];
    if (r < 0 || r >= n) {
      y[i] = E{};
      if (c == 0 && o == 0) record(err, kErrIndexOutOfRange, tag, r, j, n);
    } else {
      y[i] = x[(o * n + r) * inner + c];
    }
  }
}

template <class E>
__global__ void gather_kernel(const E* x, const std::int64_t* idx, E* y, StridedDims d, int dim,
                              std::int64_t limit, std::int64_t total, DeviceErrorRecord* err,
                              int tag) {
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t r = idx[i];
    if (r < 0 || r >= limit) {
      y[i] = E{};
      record(err, kErrIndexOutOfRange, tag, r, i, limit);
      continue;
    }
    std::int64_t rem = i, off = 0;
    for (int k = d.ndim - 1; k >= 0; --k) {
      const std::int64_t c = rem % d.size[k];
      rem /= d.size[k];
      off += (k == dim ? r : c) * d.stride0[k];
    }
    y[i] = x[off];
  }
}

template <class T>
__global__ void argmax_kernel(const T* x, std::int64_t* y, std::int64_t outer, std::int64_t n,
                              std::int64_t inner) {
  for (std::int64_t r = global_index(); r < outer * inner; r += global_stride()) {
    const T* p = x + (r / inner) * n * inner + r % inner;
    std::int64_t best = 0;
    float bv = to_float(p[0]);
    for (std::int64_t k = 1; k < n && !isnan(bv); ++k) {
      const float v = to_float(p[k * inner]);
      if (v > bv || isnan(v)) {
        bv = v;
        best = k;
      }
    }
    y[r] = best;
  }
}

__device__ __forceinline__ std::int64_t offset_of(std::int64_t i, const StridedDims& d) {
  std::int64_t off = 0;
  for (int k = d.ndim - 1; k >= 0; --k) {
    off += (i % d.size[k]) * d.stride0[k];
    i /= d.size[k];
  }
  return off;
}

/// One block per output element; the block sums its reduced space.
template <class T>
__global__ void reduce_kernel(const T* x, T* y, StridedDims kept, StridedDims red,
                              std::int64_t n_red, float scale) {
  __shared__ float sh[32];
  const std::int64_t o = blockIdx.x;
  const T* base = x + offset_of(o, kept);
  float s = 0.f;
  for (std::int64_t i = threadIdx.x; i < n_red; i += blockDim.x) s += to_float(base[offset_of(i, red)]);
  s = block_sum(s, sh);
  if (threadIdx.x == 0) y[o] = from_float<T>(s * scale);
}

template <class T>
__global__ void rotary_kernel(const T* x, const std::int64_t* pos, T* y, RopeParams p) {
  const std::int64_t total = p.rows * p.half;
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t row = i / p.half, j = i % p.half;
    const std::int64_t b = row / (p.h * p.t), t = row % p.t;
    const float angle = static_cast<float>(pos[b * p.t + t]) * p.inv_freq[j];
    const float c = cosf(angle), s = sinf(angle);
    const T* xr = x + row * 2 * p.half;
    T* yr = y + row * 2 * p.half;
    const float x1 = to_float(xr[j]), x2 = to_float(xr[j + p.half]);
    yr[j] = from_float<T>(x1 * c - x2 * s);
    yr[j + p.half] = from_float<T>(x2 * c + x1 * s);
  }
}

constexpr int kAttnThreads = 128;
constexpr int kAttnPerThread = kMaxAttnHeadDim / kAttnThreads;

/// One block per (b, h, i) query row: keys in order with an online softmax; every thread
/// holds kAttnPerThread of the Dv accumulators.
template <class T>
__global__ void attention_kernel(const T* q, const T* k, const T* v, T* y, const void* mask,
                                 const std::int64_t* pos, const std::int64_t* len, AttnParams p,
                                 DeviceErrorRecord* err, int tag) {
  __shared__ float qs[kMaxAttnHeadDim];
  __shared__ float sh[32];
  const std::int64_t row = blockIdx.x;  // (b * Hq + h) * T + i
  const std::int64_t i = row % p.t, h = (row / p.t) % p.hq, b = row / (p.t * p.hq);
  const std::int64_t hk = h / p.group;
  for (std::int64_t d = threadIdx.x; d < p.d; d += blockDim.x) qs[d] = to_float(q[row * p.d + d]) * p.scale;
  __syncthreads();
  std::int64_t lim = p.s;
  if (p.kind == 1) lim = i + 1 < p.s ? i + 1 : p.s;
  if (p.kind == 4) {
    std::int64_t n = len[b];
    if (n < 0 || n > p.s) {
      if (threadIdx.x == 0 && h == 0 && i == 0) record(err, kErrKvLength, tag, n, b, p.s);
      n = n < 0 ? 0 : (n > p.s ? p.s : n);
    }
    const std::int64_t upto = pos[b * p.t + i] + 1;
    lim = upto < n ? upto : n;
    if (lim > p.c) lim = p.c;  // a key mask [B, c]: the cache past c is never read
    if (lim < 0) lim = 0;
  }
  float acc[kAttnPerThread];
  for (int c = 0; c < kAttnPerThread; ++c) acc[c] = 0.f;
  float m = -INFINITY, l = 0.f;
  const T* kb = k + (b * p.hkv + hk) * p.s * p.d;
  const T* vb = v + (b * p.hkv + hk) * p.s * p.dv;
  for (std::int64_t j = 0; j < lim; ++j) {
    float part = 0.f;
    for (std::int64_t d = threadIdx.x; d < p.d; d += blockDim.x) part += qs[d] * to_float(kb[j * p.d + d]);
    float s = block_sum(part, sh);
    if (p.kind == 4 && mask && static_cast<const std::int64_t*>(mask)[b * p.c + j] == 0) s = -INFINITY;
    if (p.kind == 2 || p.kind == 3) {
      const std::int64_t mi = b * p.mst[0] + h * p.mst[1] + i * p.mst[2] + j * p.mst[3];
      if (p.kind == 2) {
        if (static_cast<const std::int64_t*>(mask)[mi] == 0) s = -INFINITY;
      } else {
        s += to_float(static_cast<const T*>(mask)[mi]);
      }
    }
    if (s == -INFINITY) continue;  // uniform over the block: every thread has the same s
    const float mnew = fmaxf(m, s);
    const float corr = expf(m - mnew), e = expf(s - mnew);
    l = l * corr + e;
    for (int c = 0; c < kAttnPerThread; ++c) {
      const std::int64_t d = threadIdx.x + c * blockDim.x;
      if (d < p.dv) acc[c] = acc[c] * corr + e * to_float(vb[j * p.dv + d]);
    }
    m = mnew;
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int c = 0; c < kAttnPerThread; ++c) {
    const std::int64_t d = threadIdx.x + c * blockDim.x;
    if (d < p.dv) y[row * p.dv + d] = from_float<T>(acc[c] * inv);
  }
}

template <class F>
void dispatch_bytes(std::size_t bytes, const char* what, F&& f) {
  switch (bytes) {
    case 2:
      f(std::uint16_t{});
      return;
    case 4:
      f(std::uint32_t{});
      return;
    case 8:
      f(std::uint64_t{});
      return;
    default:
      break;
  }
  throw Unsupported(std::string("cuda backend: ") + what + " of " + std::to_string(bytes) +
                    "-byte elements");
}

}  // namespace

void launch_unary(UnaryOp op, DType dt, const void* x, void* y, std::int64_t n, double a,
                  double b, cudaStream_t stream) {
  if (n == 0) return;
  if (dt == DType::Int64) {
    if (op != UnaryOp::Affine) throw Unsupported("cuda backend: int64 unary math");
    affine_i64_kernel<<<grid_for(n), kThreads, 0, stream>>>(
        static_cast<const std::int64_t*>(x), static_cast<std::int64_t*>(y), n,
        static_cast<unsigned long long>(static_cast<long long>(a)),
        static_cast<unsigned long long>(static_cast<long long>(b)));
  } else {
    dispatch_float(dt, "unary", [&](auto tag) {
      using T = decltype(tag);
      unary_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const T*>(x),
                                                            static_cast<T*>(y), n, op,
                                                            static_cast<float>(a),
                                                            static_cast<float>(b));
    });
  }
  check_launch("unary");
}

void launch_fill(std::size_t elem_bytes, unsigned long long bits, void* y, std::int64_t n,
                 cudaStream_t stream) {
  if (n == 0) return;
  dispatch_bytes(elem_bytes, "full", [&](auto tag) {
    using E = decltype(tag);
    fill_kernel<E><<<grid_for(n), kThreads, 0, stream>>>(static_cast<E*>(y), n,
                                                         static_cast<E>(bits));
  });
  check_launch("full");
}

void launch_arange(DType dt, void* y, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (dt == DType::Int64) {
    arange_i64_kernel<<<grid_for(n), kThreads, 0, stream>>>(static_cast<std::int64_t*>(y), n);
  } else {
    dispatch_float(dt, "arange", [&](auto tag) {
      using T = decltype(tag);
      arange_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(static_cast<T*>(y), n);
    });
  }
  check_launch("arange");
}

void launch_select(std::size_t elem_bytes, const std::int64_t* cond, const void* a,
                   unsigned long long fill_bits, const void* b, void* y, const SelectDims& d,
                   cudaStream_t stream) {
  std::int64_t n = 1;
  for (int k = 0; k < d.ndim; ++k) n *= d.size[k];
  if (n == 0) return;
  dispatch_bytes(elem_bytes, "where/masked_fill", [&](auto tag) {
    using E = decltype(tag);
    select_kernel<E><<<grid_for(n), kThreads, 0, stream>>>(
        cond, static_cast<const E*>(a), static_cast<E>(fill_bits), static_cast<const E*>(b),
        static_cast<E*>(y), d, n);
  });
  check_launch("where/masked_fill");
}

void launch_index_select(std::size_t elem_bytes, const void* x, const std::int64_t* idx, void* y,
                         std::int64_t outer, std::int64_t n, std::int64_t inner, std::int64_t m,
                         DeviceErrorRecord* err, int tag, cudaStream_t stream) {
  const std::int64_t total = outer * m * inner;
  if (total == 0) return;
  dispatch_bytes(elem_bytes, "index_select", [&](auto t) {
    using E = decltype(t);
    index_select_kernel<E><<<grid_for(total), kThreads, 0, stream>>>(
        static_cast<const E*>(x), idx, static_cast<E*>(y), outer, n, inner, m, err, tag);
  });
  check_launch("index_select");
}

void launch_gather(std::size_t elem_bytes, const void* x, const std::int64_t* idx, void* y,
                   const StridedDims& d, int dim, std::int64_t limit, DeviceErrorRecord* err,
                   int tag, cudaStream_t stream) {
  std::int64_t total = 1;
  for (int k = 0; k < d.ndim; ++k) total *= d.size[k];
  if (total == 0) return;
  dispatch_bytes(elem_bytes, "gather", [&](auto t) {
    using E = decltype(t);
    gather_kernel<E><<<grid_for(total), kThreads, 0, stream>>>(
        static_cast<const E*>(x), idx, static_cast<E*>(y), d, dim, limit, total, err, tag);
  });
  check_launch("gather");
}

void launch_argmax(DType dt, const void* x, std::int64_t* y, std::int64_t outer, std::int64_t n,
                   std::int64_t inner, cudaStream_t stream) {
  if (outer * inner == 0) return;
  dispatch_float(dt, "argmax", [&](auto tag) {
    using T = decltype(tag);
    argmax_kernel<T><<<grid_for(outer * inner), kThreads, 0, stream>>>(static_cast<const T*>(x),
                                                                        y, outer, n, inner);
  });
  check_launch("argmax");
}

void launch_reduce(DType dt, const void* x, void* y, const StridedDims& kept,
                   const StridedDims& reduced, float scale, cudaStream_t stream) {
  std::int64_t n_out = 1, n_red = 1;
  for (int k = 0; k < kept.ndim; ++k) n_out *= kept.size[k];
  for (int k = 0; k < reduced.ndim; ++k) n_red *= reduced.size[k];
  if (n_out == 0) return;
  if (n_out > 0x7fffffffLL) throw Unsupported("cuda backend: sum/mean with more than 2^31 outputs");
  dispatch_float(dt, "sum/mean", [&](auto tag) {
    using T = decltype(tag);
    reduce_kernel<T><<<static_cast<unsigned>(n_out), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), kept, reduced, n_red, scale);
  });
  check_launch("sum/mean");
}

void launch_rotary(DType dt, const void* x, const std::int64_t* pos, void* y, const RopeParams& p,
                   cudaStream_t stream) {
  if (p.rows * p.half == 0) return;
  dispatch_float(dt, "rotary_embedding", [&](auto tag) {
    using T = decltype(tag);
    rotary_kernel<T><<<grid_for(p.rows * p.half), kThreads, 0, stream>>>(
        static_cast<const T*>(x), pos, static_cast<T*>(y), p);
  });
  check_launch("rotary_embedding");
}

void launch_attention(DType dt, const void* q, const void* k, const void* v, void* y,
                      const void* mask, const std::int64_t* pos, const std::int64_t* len,
                      const AttnParams& p, DeviceErrorRecord* err, int tag, cudaStream_t stream) {
  const std::int64_t rows = p.b * p.hq * p.t;
  if (rows == 0) return;
  if (rows > 0x7fffffffLL) throw Unsupported("cuda backend: attention with more than 2^31 rows");
  dispatch_float(dt, "attention", [&](auto t) {
    using T = decltype(t);
    attention_kernel<T><<<static_cast<unsigned>(rows), kAttnThreads, 0, stream>>>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
        static_cast<T*>(y), mask, pos, len, p, err, tag);
  });
  check_launch("attention");
}

}  // namespace devpipe::cuda
