// Softmax along one dim.
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_softmax(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  auto dim = attrs.i("dim");
  if (dim < 0 || dim >= in[0].shape.rank()) {
    throw ShapeError("softmax: dim " + std::to_string(dim) + " out of range for " +
                     in[0].shape.to_string());
  }
  if (!is_floating(in[0].dtype)) throw DTypeError("softmax: needs a floating-point input");
  return {in[0]};
}

}  // namespace

namespace ops {
const OpDef kSoftmax{OpKind::Softmax, "softmax", 1, 1, infer_softmax, nullptr};
}  // namespace ops
}  // namespace devpipe
