// Embedding (optionally vocabulary-sharded across ranks).
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_embedding(const std::vector<ValueInfo>& in, const Attrs&) {
  if (in[0].dtype != DType::Int64) {
    throw DTypeError("embedding: indices must be int64, got " + std::string(dtype_name(in[0].dtype)));
  }
  const Shape& w = in[1].shape;
  if (w.rank() != 2) throw ShapeError("embedding: weight must be 2-D [V, D], got " + w.to_string());
  if (!is_floating(in[1].dtype)) throw DTypeError("embedding: weight must be floating point");
  Shape out = in[0].shape;
  out.dims().push_back(w[1]);
  return {{out, in[1].dtype}};
}

}  // namespace

namespace ops {
const OpDef kEmbedding{OpKind::Embedding, "embedding", 2, 2, infer_embedding, nullptr};
}  // namespace ops
}  // namespace devpipe
