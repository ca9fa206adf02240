// Data-movement kernels (embedding gather, strided copy for permute/slice) and the fallback
// direct convolution.
#include "backends/cuda/device_common.cuh"

namespace devpipe::cuda {
namespace {

/// An element of `bytes` bytes moved as one unit.
template <std::size_t kBytes>
struct Unit;
template <>
struct Unit<1> {
  using T = std::uint8_t;
};
template <>
struct Unit<2> {
  using T = std::uint16_t;
};
template <>
struct Unit<4> {
  using T = std::uint32_t;
};
template <>
struct Unit<8> {
  using T = unsigned long long;
};

template <class F>
void dispatch_bytes(std::size_t bytes, const char* what, F&& f) {
  switch (bytes) {
    case 1:
      f(Unit<1>::T{});
      return;
    case 2:
      f(Unit<2>::T{});
      return;
    case 4:
      f(Unit<4>::T{});
      return;
    case 8:
      f(Unit<8>::T{});
      return;
    default:
      break;
  }
  throw Unsupported(std::string("cuda backend: ") + what + " of " + std::to_string(bytes) +
                    "-byte elements");
}

template <class E>
__global__ void embedding_kernel(const std::int64_t* __restrict__ idx, const E* __restrict__ table,
                                 E* __restrict__ y, std::int64_t count, std::int64_t rows,
                                 std::int64_t dim, std::int64_t first, bool report,
                                 DeviceErrorRecord* err, int tag) {
  const std::int64_t total = count * dim;
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t pos = i / dim, c = i % dim;
    const std::int64_t index = idx[pos];
    const std::int64_t row = index - first;
    if (row < 0 || row >= rows) {
      y[i] = E{};
      if (report && c == 0 && atomicCAS(&err->code, 0, 1) == 0) {
        err->tag = tag;
        err->value = index;
        err->position = pos;
        err->limit = rows;
      }
    } else {
      y[i] = table[row * dim + c];
    }
  }
}

template <class E>
__global__ void strided_copy_kernel(const E* __restrict__ x, E* __restrict__ y, StridedDims d,
                                    std::int64_t n) {
  for (std::int64_t i = global_index(); i < n; i += global_stride()) {
    std::int64_t rem = i, off = 0;
    for (int k = d.ndim - 1; k >= 0; --k) {
      off += (rem % d.size[k]) * d.stride0[k];
      rem /= d.size[k];
    }
    y[i] = x[off];
  }
}

template <class T>
__global__ void direct_conv_kernel(const T* __restrict__ x, const T* __restrict__ w,
                                   const T* __restrict__ bias, T* __restrict__ y, ConvParams p) {
  const std::int64_t total = p.n * p.o * p.oh * p.ow;
  const std::int64_t og = p.o / p.groups, cg = p.c / p.groups;
  for (std::int64_t i = global_index(); i < total; i += global_stride()) {
    const std::int64_t ow = i % p.ow, oh = (i / p.ow) % p.oh, o = (i / (p.ow * p.oh)) % p.o,
                       n = i / (p.ow * p.oh * p.o);
    const std::int64_t g = o / og;
    float acc = bias ? to_float(bias[o]) : 0.f;
    for (std::int64_t c = 0; c < cg; ++c) {
      const T* xp = x + ((n * p.c + g * cg + c) * p.h) * p.w;
      const T* wp = w + ((o * cg + c) * p.kh) * p.kw;
      for (int a = 0; a < p.kh; ++a) {
        const std::int64_t ih = oh * p.sh - p.ph + static_cast<std::int64_t>(a) * p.dh;
        if (ih < 0 || ih >= p.h) continue;
        for (int b = 0; b < p.kw; ++b) {
          const std::int64_t iw = ow * p.sw - p.pw + static_cast<std::int64_t>(b) * p.dw;
          if (iw < 0 || iw >= p.w) continue;
          acc += to_float(xp[ih * p.w + iw]) * to_float(wp[a * p.kw + b]);
        }
      }
    }
    y[i] = from_float<T>(acc);
  }
}

}  // namespace

void launch_embedding(std::size_t elem_bytes, const std::int64_t* idx, const void* table, void* y,
                      std::int64_t count, std::int64_t rows, std::int64_t dim, std::int64_t first,
                      bool report, DeviceErrorRecord* err, int tag, cudaStream_t stream) {
  if (count * dim == 0) return;
  dispatch_bytes(elem_bytes, "embedding", [&](auto unit) {
    using E = decltype(unit);
    embedding_kernel<E><<<grid_for(count * dim), kThreads, 0, stream>>>(
        idx, static_cast<const E*>(table), static_cast<E*>(y), count, rows, dim, first, report, err,
        tag);
  });
  check_launch("embedding");
}

void launch_strided_copy(std::size_t elem_bytes, const void* x, void* y, const StridedDims& dims,
                         cudaStream_t stream) {
  std::int64_t n = 1;
  for (int k = 0; k < dims.ndim; ++k) n *= dims.size[k];
  if (n == 0) return;
  dispatch_bytes(elem_bytes, "strided copy", [&](auto unit) {
    using E = decltype(unit);
    strided_copy_kernel<E><<<grid_for(n), kThreads, 0, stream>>>(static_cast<const E*>(x),
                                                                 static_cast<E*>(y), dims, n);
  });
  check_launch("strided copy");
}

void launch_direct_conv(DType dt, const void* x, const void* w, const void* bias, void* y,
                        const ConvParams& p, cudaStream_t stream) {
  const std::int64_t total = p.n * p.o * p.oh * p.ow;
  if (total == 0) return;
  dispatch_float(dt, "conv2d", [&](auto tag) {
    using T = decltype(tag);
    direct_conv_kernel<T><<<grid_for(total), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), static_cast<const T*>(bias),
        static_cast<T*>(y), p);
  });
  check_launch("conv2d (direct fallback)");
}

}  // namespace devpipe::cuda
