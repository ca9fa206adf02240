// Reshape, Permute, Concat, Slice: ops that move data without arithmetic.
#include <algorithm>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_reshape(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  Shape out(attrs.ints("shape"));
  if (out.numel() != in[0].shape.numel()) {
    throw ShapeError("reshape: cannot reshape " + in[0].shape.to_string() + " (" +
                     std::to_string(in[0].shape.numel()) + " elements) to " + out.to_string());
  }
  return {{out, in[0].dtype}};
}

std::vector<ValueInfo> infer_permute(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  const auto& dims = attrs.ints("dims");
  if (static_cast<int>(dims.size()) != x.rank()) {
    throw ShapeError("permute: dims " + Shape(dims).to_string() + " do not match rank of " +
                     x.to_string());
  }
  std::vector<bool> seen(dims.size(), false);
  Shape out = x;
  for (std::size_t i = 0; i < dims.size(); ++i) {
    auto d = dims[i];
    if (d < 0 || d >= x.rank() || seen[static_cast<std::size_t>(d)]) {
      throw ShapeError("permute: dims " + Shape(dims).to_string() +
                       " is not a permutation for shape " + x.to_string());
    }
    seen[static_cast<std::size_t>(d)] = true;
    out[i] = x[static_cast<std::size_t>(d)];
  }
  return {{out, in[0].dtype}};
}

std::vector<ValueInfo> infer_concat(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  DType dt = in[0].dtype;
  for (const auto& v : in) {
    if (v.dtype != dt) {
      throw DTypeError("concat: inputs mix dtypes " + std::string(dtype_name(dt)) + " and " +
                       std::string(dtype_name(v.dtype)));
    }
  }
  const Shape& first = in[0].shape;
  auto dim = attrs.i("dim");
  if (dim < 0 || dim >= first.rank()) {
    throw ShapeError("concat: dim " + std::to_string(dim) + " out of range for " + first.to_string());
  }
  Shape out = first;
  out[static_cast<std::size_t>(dim)] = 0;
  for (const auto& v : in) {
    bool ok = v.shape.rank() == first.rank();
    for (int i = 0; ok && i < first.rank(); ++i) {
      if (i != dim && v.shape[static_cast<std::size_t>(i)] != first[static_cast<std::size_t>(i)]) ok = false;
    }
    if (!ok) {
      throw ShapeError("concat along dim " + std::to_string(dim) +
                       ": shapes must match in every other dimension, got " +
                       shapes_to_string(in));
    }
    out[static_cast<std::size_t>(dim)] += v.shape[static_cast<std::size_t>(dim)];
  }
  return {{out, dt}};
}

std::vector<ValueInfo> infer_slice(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  auto dim = attrs.i("dim");
  auto start = attrs.i("start");
  auto end = attrs.i("end");
  auto step = attrs.i("step", 1);
  auto rank_stride = attrs.i("rank_stride", 0);
  if (dim < 0 || dim >= x.rank()) {
    throw ShapeError("slice: dim " + std::to_string(dim) + " out of range for " + x.to_string());
  }
  std::int64_t n = x[static_cast<std::size_t>(dim)];
  if (step < 1 || start < 0 || end < start || end > n) {
    throw ShapeError("slice: [" + std::to_string(start) + ":" + std::to_string(end) + ":" +
                     std::to_string(step) + "] is invalid for dim " + std::to_string(dim) +
                     " of " + x.to_string());
  }
  if (rank_stride < 0) throw ShapeError("slice: negative rank_stride");
  Shape out = x;
  out[static_cast<std::size_t>(dim)] = (end - start + step - 1) / step;
  return {{out, in[0].dtype}};
}

}  // namespace

namespace ops {
const OpDef kReshape{OpKind::Reshape, "reshape", 1, 1, infer_reshape, nullptr};
const OpDef kPermute{OpKind::Permute, "permute", 1, 1, infer_permute, nullptr};
const OpDef kConcat{OpKind::Concat, "concat", 1, -1, infer_concat, nullptr};
const OpDef kSlice{OpKind::Slice, "slice", 1, 1, infer_slice, nullptr};
}  // namespace ops
}  // namespace devpipe
