// Elementwise kernels: broadcasting add/mul, bias + activation, the cross-rank reduction, and
// the fallback GEMM.
#include <cmath>

#include "backends/cuda/device_common.cuh"

namespace devpipe::cuda {
namespace {

template <class T>
struct BinaryOp {
  __device__ __forceinline__ static T apply(T a, T b, BinOp op) {
    const float x = to_float(a), y = to_float(b);
    switch (op) {
      case BinOp::Add:
        return from_float<T>(x + y);
      case BinOp::Mul:
        return from_float<T>(x * y);
      case BinOp::Sub:
        return from_float<T>(x - y);
      case BinOp::Div:
        return from_float<T>(x / y);
    }
    return from_float<T>(x + y);
  }
};
template <>
struct BinaryOp<std::int64_t> {
  __device__ __forceinline__ static std::int64_t apply(std::int64_t a, std::int64_t b, BinOp op) {
    const auto x = static_cast<unsigned long long>(a), y = static_cast<unsigned long long>(b);
    // Wraps like the host's int64; Div is rejected for int64 by the op's inference.
    return static_cast<std::int64_t>(op == BinOp::Mul ? x * y : op == BinOp::Sub ? x - y : x + y);
  }
};

template <class T>
__global__ void binary_kernel(const T* a, const T* b, T* y, StridedDims d, std::int64_t n,
                              BinOp mul) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    std::int64_t rem = i, oa = 0, ob = 0;
    for (int k = d.ndim - 1; k >= 0; --k) {
      const std::int64_t c = rem % d.size[k];
      rem /= d.size[k];
      oa += c * d.stride0[k];
      ob += c * d.stride1[k];
    }
    y[i] = BinaryOp<T>::apply(a[oa], b[ob], mul);
  }
}

/// Same-shape fast path: no index arithmetic.
template <class T>
__global__ void binary_flat_kernel(const T* a, const T* b, T* y, std::int64_t n, BinOp mul) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    y[i] = BinaryOp<T>::apply(a[i], b[i], mul);
  }
}

__device__ __forceinline__ float activate(float v, Act act) {
  switch (act) {
    case Act::None:
      return v;
    case Act::Relu:
      return (v > 0.f || isnan(v)) ? v : 0.f;
    case Act::Gelu:
      return 0.5f * v * (1.f + erff(v * 0.70710678118654752440f));
    case Act::GeluTanh: {
      const float k = 0.79788456080286535588f;  // sqrt(2 / pi)
      return 0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
    case Act::Silu:
      return v / (1.f + expf(-v));
  }
  return v;
}

template <class T>
__global__ void bias_act_kernel(const T* x, const T* __restrict__ bias, T* y, std::int64_t rows,
                                std::int64_t cols, Act act) {
  const std::int64_t n = rows * cols;
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    float v = to_float(x[i]);
    if (bias) v += to_float(bias[i % cols]);
    y[i] = from_float<T>(activate(v, act));
  }
}

template <class T>
__global__ void rank_reduce_kernel(RankBuffers bufs, std::int64_t begin, std::int64_t end) {
  for (std::int64_t i = begin + global_index(); i < end; i += global_stride()) {
    float s = 0.f;
    for (int r = 0; r < bufs.count; ++r) s += to_float(static_cast<const T*>(bufs.ptr[r])[i]);
    const T v = from_float<T>(s);
    for (int r = 0; r < bufs.count; ++r) static_cast<T*>(bufs.ptr[r])[i] = v;
  }
}

template <class T>
__global__ void naive_gemm_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                  T* __restrict__ c, GemmParams p) {
  const std::int64_t total = p.batch * p.m * p.n;
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t col = i % p.n, row = (i / p.n) % p.m, bi = i / (p.n * p.m);
    const T* ap = a + bi * p.a_batch + row * p.a_m;
    const T* bp = b + bi * p.b_batch + col * p.b_n;
    float acc = 0.f;
    for (std::int64_t k = 0; k < p.k; ++k) acc += to_float(ap[k * p.a_k]) * to_float(bp[k * p.b_k]);
    c[i] = from_float<T>(acc);
  }
}

bool same_shape_contiguous(const StridedDims& d) {
  std::int64_t expect = 1;
  for (int k = d.ndim - 1; k >= 0; --k) {
    if (d.size[k] != 1 && (d.stride0[k] != expect || d.stride1[k] != expect)) return false;
    expect *= d.size[k];
  }
  return true;
}

}  // namespace

void launch_binary(BinOp mul, DType dt, const void* a, const void* b, void* y,
                   const StridedDims& dims, cudaStream_t stream) {
  static const char* const kNames[] = {"add", "mul", "sub", "div"};
  const char* name = kNames[static_cast<int>(mul)];
  std::int64_t n = 1;
  for (int k = 0; k < dims.ndim; ++k) n *= dims.size[k];
  if (n == 0) return;
  const bool flat = same_shape_contiguous(dims);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    if (flat) {
      binary_flat_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
          static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(y), n, mul);
    } else {
      binary_kernel<T><<<grid_for(n), kThreads, 0, stream>>>(
          static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(y), dims, n, mul);
    }
  };
  if (dt == DType::Int64) {
    go(std::int64_t{});
  } else {
    dispatch_float(dt, name, go);
  }
  check_launch(name);
}

void launch_bias_act(DType dt, const void* x, const void* bias, void* y, std::int64_t rows,
                     std::int64_t cols, Act act, cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch_float(dt, "bias/activation", [&](auto tag) {
    using T = decltype(tag);
    bias_act_kernel<T><<<grid_for(rows * cols), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(bias), static_cast<T*>(y), rows, cols, act);
  });
  check_launch("bias/activation");
}

void launch_rank_reduce(DType dt, const RankBuffers& bufs, std::int64_t begin, std::int64_t end,
                        cudaStream_t stream) {
  if (end <= begin) return;
  dispatch_float(dt, "all_reduce", [&](auto tag) {
    using T = decltype(tag);
    rank_reduce_kernel<T><<<grid_for(end - begin), kThreads, 0, stream>>>(bufs, begin, end);
  });
  check_launch("all_reduce");
}

void launch_naive_gemm(DType dt, const void* a, const void* b, void* c, const GemmParams& p,
                       cudaStream_t stream) {
  const std::int64_t total = p.batch * p.m * p.n;
  if (total == 0) return;
  dispatch_float(dt, "matmul", [&](auto tag) {
    using T = decltype(tag);
    naive_gemm_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(c), p);
  });
  check_launch("matmul (fallback gemm)");
}

}  // namespace devpipe::cuda
