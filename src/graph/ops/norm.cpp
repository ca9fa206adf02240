// LayerNorm and RmsNorm over the trailing normalized_shape dims.
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

void check_norm(const char* op, const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  Shape ns(attrs.ints("normalized_shape"));
  if (ns.rank() < 1 || ns.rank() > x.rank()) {
    throw ShapeError(std::string(op) + ": normalized_shape " + ns.to_string() +
                     " does not fit input " + x.to_string());
  }
  for (int i = 0; i < ns.rank(); ++i) {
    if (x[static_cast<std::size_t>(x.rank() - ns.rank() + i)] != ns[static_cast<std::size_t>(i)]) {
      throw ShapeError(std::string(op) + ": input " + x.to_string() +
                       " does not end with normalized_shape " + ns.to_string());
    }
  }
  for (std::size_t i = 1; i < in.size(); ++i) {
    if (!(in[i].shape == ns)) {
      throw ShapeError(std::string(op) + ": weight/bias " + in[i].shape.to_string() +
                       " does not match normalized_shape " + ns.to_string());
    }
  }
}

std::vector<ValueInfo> infer_layer_norm(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  DType dt = common_float_dtype("layer_norm", in);
  check_norm("layer_norm", in, attrs);
  return {{in[0].shape, dt}};
}

std::vector<ValueInfo> infer_rms_norm(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  DType dt = common_float_dtype("rms_norm", in);
  check_norm("rms_norm", in, attrs);
  return {{in[0].shape, dt}};
}

}  // namespace

namespace ops {
const OpDef kLayerNorm{OpKind::LayerNorm, "layer_norm", 1, 3, infer_layer_norm, nullptr};
const OpDef kRmsNorm{OpKind::RmsNorm, "rms_norm", 1, 2, infer_rms_norm, nullptr};
}  // namespace ops
}  // namespace devpipe
