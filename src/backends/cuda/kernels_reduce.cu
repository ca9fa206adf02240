// Reduction kernels: softmax, layer/rms norm, pooling.
#include <cmath>

#include "backends/cuda/device_common.cuh"

namespace devpipe::cuda {
namespace {

/// Threads per block for a kernel that reduces rows of n elements with one block per row.
int row_threads(std::int64_t n) {
  if (n <= 64) return 32;
  if (n <= 256) return 64;
  if (n <= 1024) return 128;
  return 256;
}

unsigned row_blocks(std::int64_t rows) {
  return static_cast<unsigned>(
      std::max<std::int64_t>(1, std::min<std::int64_t>(rows, 65535LL * 16)));
}

// ---- softmax ----

/// inner == 1: one block per row.
template <class T>
__global__ void softmax_rows_kernel(const T* __restrict__ x, T* __restrict__ y, std::int64_t rows,
                                    std::int64_t n) {
  __shared__ float sh[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    float m = -INFINITY;
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, to_float(xr[j]));
    m = block_max(m, sh);
    float s = 0.f;
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) s += expf(to_float(xr[j]) - m);
    s = block_sum(s, sh);
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      yr[j] = from_float<T>(expf(to_float(xr[j]) - m) / s);
    }
  }
}

/// inner > 1: one thread per (outer, inner) column, striding by inner.
template <class T>
__global__ void softmax_cols_kernel(const T* __restrict__ x, T* __restrict__ y, std::int64_t outer,
                                    std::int64_t n, std::int64_t inner) {
  const std::int64_t cols = outer * inner;
  for (std::int64_t i = global_index(); i < cols; i += global_stride()) {
    const std::int64_t base = (i / inner) * n * inner + i % inner;
    float m = -INFINITY;
    for (std::int64_t k = 0; k < n; ++k) m = fmaxf(m, to_float(x[base + k * inner]));
    float s = 0.f;
    for (std::int64_t k = 0; k < n; ++k) s += expf(to_float(x[base + k * inner]) - m);
    for (std::int64_t k = 0; k < n; ++k) {
      y[base + k * inner] = from_float<T>(expf(to_float(x[base + k * inner]) - m) / s);
    }
  }
}

// ---- norms ----

template <class T, bool kRms>
__global__ void norm_kernel(const T* __restrict__ x, const T* __restrict__ w,
                            const T* __restrict__ b, T* __restrict__ y, std::int64_t rows,
                            std::int64_t d, float eps) {
  __shared__ float sh[32];
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    float mean = 0.f;
    if (!kRms) {
      float s = 0.f;
      for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) s += to_float(xr[j]);
      mean = block_sum(s, sh) / static_cast<float>(d);
    }
    float q = 0.f;
    for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const float v = to_float(xr[j]) - mean;
      q += v * v;
    }
    const float inv = rsqrtf(block_sum(q, sh) / static_cast<float>(d) + eps);
    for (std::int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float v = (to_float(xr[j]) - mean) * inv;
      if (w) v *= to_float(w[j]);
      if (b) v += to_float(b[j]);
      yr[j] = from_float<T>(v);
    }
  }
}

// ---- pooling ----

template <class T>
__global__ void adaptive_avg_kernel(const T* __restrict__ x, T* __restrict__ y, PoolParams p) {
  const std::int64_t total = p.planes * p.oh * p.ow;
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t oj = i % p.ow, oi = (i / p.ow) % p.oh, plane = i / (p.ow * p.oh);
    const std::int64_t h0 = (oi * p.h) / p.oh, h1 = ((oi + 1) * p.h + p.oh - 1) / p.oh;
    const std::int64_t w0 = (oj * p.w) / p.ow, w1 = ((oj + 1) * p.w + p.ow - 1) / p.ow;
    const T* xp = x + plane * p.h * p.w;
    float acc = 0.f;
    for (std::int64_t h = h0; h < h1; ++h) {
      for (std::int64_t w = w0; w < w1; ++w) acc += to_float(xp[h * p.w + w]);
    }
    y[i] = from_float<T>(acc / static_cast<float>((h1 - h0) * (w1 - w0)));
  }
}

template <class T>
__global__ void max_pool_kernel(const T* __restrict__ x, T* __restrict__ y, PoolParams p) {
  const std::int64_t total = p.planes * p.oh * p.ow;
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t oj = i % p.ow, oi = (i / p.ow) % p.oh, plane = i / (p.ow * p.oh);
    const T* xp = x + plane * p.h * p.w;
    float m = -INFINITY;
    for (int a = 0; a < p.kh; ++a) {
      const std::int64_t h = oi * p.sh - p.ph + static_cast<std::int64_t>(a) * p.dh;
      if (h < 0 || h >= p.h) continue;
      for (int c = 0; c < p.kw; ++c) {
        const std::int64_t w = oj * p.sw - p.pw + static_cast<std::int64_t>(c) * p.dw;
        if (w < 0 || w >= p.w) continue;
        const float v = to_float(xp[h * p.w + w]);
        if (v > m || isnan(v)) m = v;
      }
    }
    y[i] = from_float<T>(m);
  }
}

}  // namespace

void launch_softmax(DType dt, const void* x, void* y, std::int64_t outer, std::int64_t n,
                    std::int64_t inner, cudaStream_t stream) {
  if (outer * n * inner == 0) return;
  dispatch_float(dt, "softmax", [&](auto tag) {
    using T = decltype(tag);
    if (inner == 1) {
      softmax_rows_kernel<T><<<row_blocks(outer), row_threads(n), 0, stream>>>(
          static_cast<const T*>(x), static_cast<T*>(y), outer, n);
    } else {
      softmax_cols_kernel<T><<<grid_for(outer * inner), kThreads, 0, stream>>>(
          static_cast<const T*>(x), static_cast<T*>(y), outer, n, inner);
    }
  });
  check_launch("softmax");
}

void launch_norm(DType dt, bool rms, const void* x, const void* w, const void* b, void* y,
                 std::int64_t rows, std::int64_t d, float eps, cudaStream_t stream) {
  if (rows * d == 0) return;
  dispatch_float(dt, rms ? "rms_norm" : "layer_norm", [&](auto tag) {
    using T = decltype(tag);
    auto* xp = static_cast<const T*>(x);
    auto* wp = static_cast<const T*>(w);
    auto* bp = static_cast<const T*>(b);
    auto* yp = static_cast<T*>(y);
    if (rms) {
      norm_kernel<T, true>
          <<<row_blocks(rows), row_threads(d), 0, stream>>>(xp, wp, nullptr, yp, rows, d, eps);
    } else {
      norm_kernel<T, false>
          <<<row_blocks(rows), row_threads(d), 0, stream>>>(xp, wp, bp, yp, rows, d, eps);
    }
  });
  check_launch(rms ? "rms_norm" : "layer_norm");
}

void launch_adaptive_avg_pool(DType dt, const void* x, void* y, const PoolParams& p,
                              cudaStream_t stream) {
  const std::int64_t total = p.planes * p.oh * p.ow;
  if (total == 0) return;
  dispatch_float(dt, "adaptive_avg_pool2d", [&](auto tag) {
    using T = decltype(tag);
    adaptive_avg_kernel<T>
        <<<grid_for(total), kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), p);
  });
  check_launch("adaptive_avg_pool2d");
}

void launch_max_pool(DType dt, const void* x, void* y, const PoolParams& p, cudaStream_t stream) {
  const std::int64_t total = p.planes * p.oh * p.ow;
  if (total == 0) return;
  dispatch_float(dt, "max_pool2d", [&](auto tag) {
    using T = decltype(tag);
    max_pool_kernel<T>
        <<<grid_for(total), kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<T*>(y), p);
  });
  check_launch("max_pool2d");
}

}  // namespace devpipe::cuda
