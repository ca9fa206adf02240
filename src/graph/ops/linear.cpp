// Linear and Matmul.
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_linear(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  const Shape& w = in[1].shape;
  DType dt = common_float_dtype("linear", in);
  if (x.rank() < 1) throw ShapeError("linear: input must have rank >= 1, got " + x.to_string());
  if (w.rank() != 2) throw ShapeError("linear: weight must be 2-D [out, in], got " + w.to_string());
  if (x.dim(-1) != w[1]) {
    throw ShapeError("linear: input " + x.to_string() + " has last dim " +
                     std::to_string(x.dim(-1)) + " but the weight " + w.to_string() +
                     " expects in_features=" + std::to_string(w[1]));
  }
  if (in.size() == 3 && !(in[2].shape == Shape{w[0]})) {
    throw ShapeError("linear: bias " + in[2].shape.to_string() + " does not match out_features " +
                     std::to_string(w[0]));
  }
  std::string act = attrs.s("activation", "none");
  if (act != "none" && act != "relu" && act != "gelu" && act != "gelu_tanh" && act != "silu") {
    throw FormatError("linear: unknown fused activation '" + act + "'");
  }
  Shape out = x;
  out[static_cast<std::size_t>(out.rank() - 1)] = w[0];
  return {{out, dt}};
}

std::vector<ValueInfo> infer_matmul(const std::vector<ValueInfo>& in, const Attrs&) {
  const Shape& a = in[0].shape;
  const Shape& b = in[1].shape;
  DType dt = common_float_dtype("matmul", in);
  if (a.rank() < 2 || b.rank() < 2) {
    throw ShapeError("matmul: both operands need rank >= 2, got " + a.to_string() + " and " +
                     b.to_string());
  }
  if (a.dim(-1) != b.dim(-2)) {
    throw ShapeError("matmul: inner dimensions differ: " + a.to_string() + " @ " + b.to_string() +
                     " (" + std::to_string(a.dim(-1)) + " vs " + std::to_string(b.dim(-2)) + ")");
  }
  Shape ab(std::vector<std::int64_t>(a.dims().begin(), a.dims().end() - 2));
  Shape bb(std::vector<std::int64_t>(b.dims().begin(), b.dims().end() - 2));
  Shape out = broadcast_shapes("matmul", ab, bb);
  out.dims().push_back(a.dim(-2));
  out.dims().push_back(b.dim(-1));
  return {{out, dt}};
}

}  // namespace

namespace ops {
const OpDef kLinear{OpKind::Linear, "linear", 2, 3, infer_linear, nullptr};
const OpDef kMatmul{OpKind::Matmul, "matmul", 2, 2, infer_matmul, nullptr};
}  // namespace ops
}  // namespace devpipe
