// Embedding (optionally vocabulary-sharded across ranks).
#include <cstring>

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


// Copies row idx of the weight (bytes, so any dtype is exact). With vocab_per_rank > 0 the
// weight holds rows [rank*vocab_per_rank, rank*vocab_per_rank + V_local) of the full table and
// indices outside give zero rows; otherwise an index outside [0, V) is an error.
void ref_embedding(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                   const RefContext& ctx) {
  const std::int64_t vpr = attrs.i("vocab_per_rank", 0);
  const std::int64_t V = in[1].dim(0), D = in[1].dim(1);
  const std::size_t row_bytes = static_cast<std::size_t>(D) * dtype_size(in[1].dtype());
  const std::int64_t* idx = in[0].data<std::int64_t>();
  const char* w = static_cast<const char*>(in[1].raw_data());
  char* y = static_cast<char*>(out[0].raw_data());
  const std::int64_t offset = vpr > 0 ? static_cast<std::int64_t>(ctx.rank) * vpr : 0;
  for (std::int64_t i = 0; i < in[0].numel(); ++i) {
    const std::int64_t row = idx[i] - offset;
    char* dst = y + static_cast<std::size_t>(i) * row_bytes;
    if (row < 0 || row >= V) {
      if (vpr > 0) {
        std::memset(dst, 0, row_bytes);
        continue;
      }
      throw InvalidArgument("embedding: index " + std::to_string(idx[i]) + " at position " +
                            std::to_string(i) + " is outside [0, V=" + std::to_string(V) + ")");
    }
    std::memcpy(dst, w + static_cast<std::size_t>(row) * row_bytes, row_bytes);
  }
}

}  // namespace

namespace ops {
const OpDef kEmbedding{OpKind::Embedding, "embedding", 2, 2, infer_embedding, ref_embedding};
}  // namespace ops
}  // namespace devpipe
