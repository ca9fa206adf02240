// Internal (cpu backend): oneDNN helpers — the shared engine, dtype mapping, plain memory
// descriptors and small element conversions used by the loop kernels.
#pragma once

#include <bit>
#include <cstdint>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <vector>

#include "devpipe/dtype.h"
#include "devpipe/error.h"
#include "devpipe/shape.h"

namespace devpipe::cpu {

using DnnlDims = dnnl::memory::dims;
using DnnlType = dnnl::memory::data_type;
using DnnlDesc = dnnl::memory::desc;

/// The process-wide oneDNN cpu engine (created on first use).
const dnnl::engine& cpu_engine();

/// oneDNN data type of a floating dtype; throws Unsupported for dtypes oneDNN cannot hold
/// (int64), naming `what`.
DnnlType dnnl_type(DType dtype, const std::string& what);

/// Row-major strides of `dims` (in elements).
DnnlDims row_major_strides(const DnnlDims& dims);

/// Plain (row-major) descriptor of `dims`; a scalar becomes [1].
DnnlDesc plain_desc(const DnnlDims& dims, DnnlType type);

/// Descriptor with explicit strides (in elements) and an element offset.
DnnlDesc strided_desc(const DnnlDims& dims, DnnlType type, const DnnlDims& strides,
                      std::int64_t offset0 = 0);

/// Dims of a shape as oneDNN dims; a scalar becomes [1].
DnnlDims to_dims(const Shape& shape);

/// `dims` with leading 1s so that it has `rank` dims.
DnnlDims pad_leading(const DnnlDims& dims, int rank);

/// For data-movement ops (permute, slice, concat) of any dtype: the oneDNN type that moves its
/// elements bit-exactly, and how many of them make one element (int64 moves as 2 x s32).
struct MoveType {
  DnnlType type;
  int lanes;
};
MoveType move_type(DType dtype);

/// Inline scalar conversions for the loop kernels (same results as devpipe/dtype.h).
inline float bf16_bits_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}
inline std::uint16_t float_to_bf16_bits(float value) {
  std::uint32_t u = std::bit_cast<std::uint32_t>(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40);
  std::uint32_t rounding = 0x7fff + ((u >> 16) & 1);
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

/// Element access for a storage type: load widens to float, store rounds back.
template <DType D>
struct Elem;
template <>
struct Elem<DType::Float32> {
  static constexpr DType kDType = DType::Float32;
  using T = float;
  static float load(T v) { return v; }
  static T store(float f) { return f; }
};
template <>
struct Elem<DType::BFloat16> {
  static constexpr DType kDType = DType::BFloat16;
  using T = std::uint16_t;
  static float load(T v) { return bf16_bits_to_float(v); }
  static T store(float f) { return float_to_bf16_bits(f); }
};
template <>
struct Elem<DType::Float16> {
  static constexpr DType kDType = DType::Float16;
  using T = std::uint16_t;
  static float load(T v) { return fp16_to_float(v); }
  static T store(float f) { return float_to_fp16(f); }
};

/// Calls `fn(Elem<D>{})` for the floating dtype `dtype`; throws Unsupported for int64, naming
/// `what`.
template <class Fn>
decltype(auto) dispatch_float(DType dtype, const std::string& what, Fn&& fn) {
  switch (dtype) {
    case DType::Float32:
      return fn(Elem<DType::Float32>{});
    case DType::BFloat16:
      return fn(Elem<DType::BFloat16>{});
    case DType::Float16:
      return fn(Elem<DType::Float16>{});
    case DType::Int64:
      break;
  }
  throw Unsupported("cpu backend: " + what + " does not support dtype " +
                    std::string(dtype_name(dtype)));
}

}  // namespace devpipe::cpu
