#include "backends/cpu/dnnl_util.h"

namespace devpipe::cpu {

const dnnl::engine& cpu_engine() {
  static const dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

DnnlType dnnl_type(DType dtype, const std::string& what) {
  switch (dtype) {
    case DType::Float32:
      return DnnlType::f32;
    case DType::BFloat16:
      return DnnlType::bf16;
    case DType::Float16:
      return DnnlType::f16;
    case DType::Int64:
      break;
  }
  throw Unsupported("cpu backend: " + what + ": dtype " + std::string(dtype_name(dtype)) +
                    " is not supported by this op");
}

DnnlDims row_major_strides(const DnnlDims& dims) {
  DnnlDims strides(dims.size(), 1);
  for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) {
    auto u = static_cast<std::size_t>(i);
    strides[u] = strides[u + 1] * dims[u + 1];
  }
  return strides;
}

DnnlDims to_dims(const Shape& shape) {
  if (shape.rank() == 0) return {1};
  return DnnlDims(shape.dims().begin(), shape.dims().end());
}

DnnlDesc plain_desc(const DnnlDims& dims, DnnlType type) {
  if (dims.empty()) return DnnlDesc({1}, type, DnnlDims{1});
  return DnnlDesc(dims, type, row_major_strides(dims));
}

DnnlDesc strided_desc(const DnnlDims& dims, DnnlType type, const DnnlDims& strides,
                      std::int64_t offset0) {
  DnnlDesc md(dims, type, strides);
  md.data.offset0 = offset0;
  return md;
}

DnnlDims pad_leading(const DnnlDims& dims, int rank) {
  DnnlDims out(static_cast<std::size_t>(rank) - dims.size(), 1);
  out.insert(out.end(), dims.begin(), dims.end());
  return out;
}

MoveType move_type(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return {DnnlType::f32, 1};
    case DType::BFloat16:
      return {DnnlType::bf16, 1};
    case DType::Float16:
      return {DnnlType::f16, 1};
    case DType::Int64:
      return {DnnlType::s32, 2};
  }
  return {DnnlType::f32, 1};
}

}  // namespace devpipe::cpu
