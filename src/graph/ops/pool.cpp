// AdaptiveAvgPool2d and MaxPool2d.
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_adaptive_avg(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  DType dt = common_float_dtype("adaptive_avg_pool2d", in);
  if (x.rank() != 4) {
    throw ShapeError("adaptive_avg_pool2d: input must be 4-D [N, C, H, W], got " + x.to_string());
  }
  const auto& os = attrs.ints("output_size");
  if (os.size() != 2 || os[0] < 1 || os[1] < 1) {
    throw ShapeError("adaptive_avg_pool2d: output_size must be two positive sizes");
  }
  return {{Shape{x[0], x[1], os[0], os[1]}, dt}};
}

std::vector<ValueInfo> infer_max_pool(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  DType dt = common_float_dtype("max_pool2d", in);
  if (x.rank() != 4) throw ShapeError("max_pool2d: input must be 4-D [N, C, H, W], got " + x.to_string());
  const auto& k = attrs.ints("kernel_size");
  const auto& s = attrs.ints("stride");
  const auto& p = attrs.ints("padding");
  const auto& d = attrs.ints("dilation");
  Shape out{x[0], x[1], 0, 0};
  for (int i = 0; i < 2; ++i) {
    if (k[i] < 1 || s[i] < 1 || d[i] < 1 || p[i] < 0 || 2 * p[i] > k[i]) {
      throw ShapeError("max_pool2d: invalid kernel " + Shape(k).to_string() + " / stride / padding " +
                       Shape(p).to_string() + " (padding must be at most half the kernel)");
    }
    std::int64_t eff = d[i] * (k[i] - 1) + 1;
    std::int64_t o = (x[2 + i] + 2 * p[i] - eff) / s[i] + 1;
    if (x[2 + i] + 2 * p[i] < eff || o < 1) {
      throw ShapeError("max_pool2d: input " + x.to_string() + " is smaller than the kernel " +
                       Shape(k).to_string());
    }
    out[static_cast<std::size_t>(2 + i)] = o;
  }
  return {{out, dt}};
}

}  // namespace

namespace ops {
const OpDef kAdaptiveAvgPool2d{OpKind::AdaptiveAvgPool2d, "adaptive_avg_pool2d", 1, 1,
                               infer_adaptive_avg, nullptr};
const OpDef kMaxPool2d{OpKind::MaxPool2d, "max_pool2d", 1, 1, infer_max_pool, nullptr};
}  // namespace ops
}  // namespace devpipe
