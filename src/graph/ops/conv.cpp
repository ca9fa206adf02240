// Conv2d.
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_conv2d(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  const Shape& w = in[1].shape;
  DType dt = common_float_dtype("conv2d", in);
  if (x.rank() != 4) throw ShapeError("conv2d: input must be 4-D [N, C, H, W], got " + x.to_string());
  if (w.rank() != 4) {
    throw ShapeError("conv2d: weight must be 4-D [O, C/groups, kh, kw], got " + w.to_string());
  }
  const auto& stride = attrs.ints("stride");
  const auto& pad = attrs.ints("padding");
  const auto& dil = attrs.ints("dilation");
  std::int64_t groups = attrs.i("groups");
  if (groups < 1 || x[1] % groups != 0 || w[0] % groups != 0) {
    throw ShapeError("conv2d: groups=" + std::to_string(groups) + " must divide in_channels " +
                     std::to_string(x[1]) + " and out_channels " + std::to_string(w[0]));
  }
  if (w[1] * groups != x[1]) {
    throw ShapeError("conv2d: input " + x.to_string() + " has " + std::to_string(x[1]) +
                     " channels but the weight " + w.to_string() + " with groups=" +
                     std::to_string(groups) + " expects " + std::to_string(w[1] * groups));
  }
  if (in.size() == 3 && !(in[2].shape == Shape{w[0]})) {
    throw ShapeError("conv2d: bias " + in[2].shape.to_string() + " does not match out_channels " +
                     std::to_string(w[0]));
  }
  Shape out{x[0], w[0], 0, 0};
  for (int i = 0; i < 2; ++i) {
    if (stride[i] < 1 || dil[i] < 1 || pad[i] < 0) {
      throw ShapeError("conv2d: invalid stride/dilation/padding");
    }
    std::int64_t eff = dil[i] * (w[2 + i] - 1) + 1;
    std::int64_t o = (x[2 + i] + 2 * pad[i] - eff) / stride[i] + 1;
    if (x[2 + i] + 2 * pad[i] < eff || o < 1) {
      throw ShapeError("conv2d: input " + x.to_string() + " with padding " +
                       Shape(pad).to_string() + " is smaller than the dilated kernel " +
                       std::to_string(eff));
    }
    out[static_cast<std::size_t>(2 + i)] = o;
  }
  return {{out, dt}};
}

}  // namespace

namespace ops {
const OpDef kConv2d{OpKind::Conv2d, "conv2d", 2, 3, infer_conv2d, nullptr};
}  // namespace ops
}  // namespace devpipe
