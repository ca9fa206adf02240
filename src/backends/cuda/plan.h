// Internal (cuda backend): host-side planning of iteration spaces and batched GEMMs.
//
// Plain C++ (no CUDA type), so the planning can be unit-tested on machines without a GPU.
#pragma once

#include <cstdint>
#include <vector>

#include "backends/cuda/strided_dims.h"
#include "devpipe/shape.h"

namespace devpipe::cuda {

/// Row-major strides of a shape (elements).
std::vector<std::int64_t> row_major_strides(const Shape& s);

/// Strides of `s` broadcast to `out` (right-aligned; 0 where s has size 1 or no dim).
std::vector<std::int64_t> broadcast_strides(const Shape& s, const Shape& out);

/// Drops size-1 dims and merges adjacent dims where both operands' strides chain; at least one
/// dim (size 1) remains. Throws Unsupported beyond kMaxDims dims.
StridedDims collapse_dims(const std::vector<std::int64_t>& size,
                          const std::vector<std::int64_t>& s0, const std::vector<std::int64_t>& s1);

/// Element offsets of one call of a planned GEMM.
struct GemmCall {
  std::int64_t a_off = 0, b_off = 0, c_off = 0;
};

/// Row-major C = A * B as calls of `batch` strided products of A [m, k] (row-major) and B
/// ([k, n], or [n, k] when `b_nk`), C [m, n] contiguous; offsets and strides in elements.
struct GemmPlan {
  std::int64_t m = 0, n = 0, k = 0;
  bool b_nk = false;
  std::int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
  std::vector<GemmCall> calls;
};

/// Linear: x [..., k] times a weight [n, k]; one call.
GemmPlan plan_linear(const Shape& x, const Shape& weight);

/// Matmul with broadcast batch dims: merged batch dims, the innermost one a strided batch when
/// both operands are batched there, folded into m when b is broadcast over it and a's batches
/// are contiguous, the rest enumerated as calls.
GemmPlan plan_matmul(const Shape& a, const Shape& b, const Shape& out);

}  // namespace devpipe::cuda
