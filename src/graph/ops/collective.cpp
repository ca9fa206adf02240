// AllReduce (sum) and AllGather across tensor-parallel ranks.
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_all_reduce(const std::vector<ValueInfo>& in, const Attrs&) {
  if (!is_floating(in[0].dtype)) throw DTypeError("all_reduce: needs a floating-point input");
  return {in[0]};
}

std::vector<ValueInfo> infer_all_gather(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  auto dim = attrs.i("dim");
  auto parts = attrs.i("parts");
  if (dim < 0 || dim >= in[0].shape.rank() || parts < 1) {
    throw ShapeError("all_gather: dim " + std::to_string(dim) + " / parts " +
                     std::to_string(parts) + " invalid for " + in[0].shape.to_string());
  }
  Shape out = in[0].shape;
  out[static_cast<std::size_t>(dim)] *= parts;
  return {{out, in[0].dtype}};
}

// With one rank both collectives are the identity; across ranks the runtime's communicator
// implements them.
void ref_identity(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
                  const RefContext& ctx) {
  if (ctx.tp_degree != 1) {
    throw Unsupported("collective reference implementation runs only at tp_degree 1");
  }
  out[0].copy_from(in[0]);
}

}  // namespace

namespace ops {
const OpDef kAllReduce{OpKind::AllReduce, "all_reduce", 1, 1, infer_all_reduce, ref_identity};
const OpDef kAllGather{OpKind::AllGather, "all_gather", 1, 1, infer_all_gather, ref_identity};
}  // namespace ops
}  // namespace devpipe
