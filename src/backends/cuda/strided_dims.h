// Internal (cuda backend): the iteration-space descriptor shared by the host planning
// (plan.h) and the kernels (kernels.h). Plain C++17, no CUDA type.
#pragma once

#include <cstdint>

namespace devpipe::cuda {

inline constexpr int kMaxDims = 8;

/// An iteration space (row-major, `size`) and, per operand, the element stride of every dim
/// (0 where the operand is broadcast). Passed by value to the kernels.
struct StridedDims {
  int ndim = 0;
  std::int64_t size[kMaxDims] = {};
  std::int64_t stride0[kMaxDims] = {};
  std::int64_t stride1[kMaxDims] = {};
};

}  // namespace devpipe::cuda
