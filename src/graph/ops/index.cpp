// IndexSelect and Gather: element selection by int64 indices (bytes copied: every dtype).
#include <cstring>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_index_select(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  auto d = checked_dim("index_select", attrs.i("dim"), x);
  if (in[1].dtype != DType::Int64 || in[1].shape.rank() != 1) {
    throw DTypeError("index_select: the index must be a 1-D int64 tensor, got " +
                     in[1].shape.to_string() + " " + std::string(dtype_name(in[1].dtype)));
  }
  Shape out = x;
  out[static_cast<std::size_t>(d)] = in[1].shape[0];
  return {{out, in[0].dtype}};
}

std::vector<ValueInfo> infer_gather(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  const Shape& idx = in[1].shape;
  auto d = checked_dim("gather", attrs.i("dim"), x);
  if (in[1].dtype != DType::Int64) {
    throw DTypeError("gather: the index must be int64, got " + std::string(dtype_name(in[1].dtype)));
  }
  if (idx.rank() != x.rank()) {
    throw ShapeError("gather: index " + idx.to_string() + " and input " + x.to_string() +
                     " must have the same rank");
  }
  for (int i = 0; i < x.rank(); ++i) {
    if (i != d && idx[static_cast<std::size_t>(i)] > x[static_cast<std::size_t>(i)]) {
      throw ShapeError("gather: index " + idx.to_string() + " is larger than input " +
                       x.to_string() + " in dim " + std::to_string(i));
    }
  }
  return {{idx, in[0].dtype}};
}


// ---- reference ----

std::string bad_index(const char* op, std::int64_t value, std::int64_t pos, std::int64_t size,
                      std::int64_t dim) {
  return std::string(op) + ": index " + std::to_string(value) + " at position " +
         std::to_string(pos) + " is outside [0, " + std::to_string(size) + ") of dim " +
         std::to_string(dim);
}

// out[o, j, i] = x[o, index[j], i] with x viewed as [outer, n, inner] around dim.
void ref_index_select(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                      const RefContext&) {
  const auto dim = static_cast<std::size_t>(attrs.i("dim"));
  const Shape& xs = in[0].shape();
  std::int64_t outer = 1, inner = 1;
  for (std::size_t i = 0; i < dim; ++i) outer *= xs[i];
  for (std::size_t i = dim + 1; i < xs.dims().size(); ++i) inner *= xs[i];
  const std::int64_t n = xs[dim], m = in[1].numel();
  const std::int64_t* idx = in[1].data<std::int64_t>();
  for (std::int64_t j = 0; j < m; ++j) {
    if (idx[j] < 0 || idx[j] >= n) {
      throw InvalidArgument(bad_index("index_select", idx[j], j, n, static_cast<std::int64_t>(dim)));
    }
  }
  const std::size_t chunk = static_cast<std::size_t>(inner) * dtype_size(in[0].dtype());
  const char* x = static_cast<const char*>(in[0].raw_data());
  char* y = static_cast<char*>(out[0].raw_data());
  for (std::int64_t o = 0; o < outer; ++o) {
    for (std::int64_t j = 0; j < m; ++j) {
      std::memcpy(y + static_cast<std::size_t>(o * m + j) * chunk,
                  x + static_cast<std::size_t>(o * n + idx[j]) * chunk, chunk);
    }
  }
}

// out[i0..ik] = x[i0.., index[i0..ik] at dim, ..ik].
void ref_gather(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                const RefContext&) {
  const auto dim = static_cast<std::size_t>(attrs.i("dim"));
  const Shape& xs = in[0].shape();
  const Shape& is = in[1].shape();
  const int r = xs.rank();
  std::vector<std::int64_t> xst(static_cast<std::size_t>(r), 1);
  for (int i = r - 2; i >= 0; --i) {
    xst[static_cast<std::size_t>(i)] = xst[static_cast<std::size_t>(i + 1)] * xs[static_cast<std::size_t>(i + 1)];
  }
  const std::size_t es = dtype_size(in[0].dtype());
  const std::int64_t* idx = in[1].data<std::int64_t>();
  const char* x = static_cast<const char*>(in[0].raw_data());
  char* y = static_cast<char*>(out[0].raw_data());
  std::vector<std::int64_t> c(static_cast<std::size_t>(r));
  for (std::int64_t e = 0; e < is.numel(); ++e) {
    std::int64_t rem = e;
    for (int i = r - 1; i >= 0; --i) {
      c[static_cast<std::size_t>(i)] = rem % is[static_cast<std::size_t>(i)];
      rem /= is[static_cast<std::size_t>(i)];
    }
    if (idx[e] < 0 || idx[e] >= xs[dim]) {
      throw InvalidArgument(bad_index("gather", idx[e], e, xs[dim], static_cast<std::int64_t>(dim)));
    }
    c[dim] = idx[e];
    std::int64_t src = 0;
    for (int i = 0; i < r; ++i) src += c[static_cast<std::size_t>(i)] * xst[static_cast<std::size_t>(i)];
    std::memcpy(y + static_cast<std::size_t>(e) * es, x + static_cast<std::size_t>(src) * es, es);
  }
}

}  // namespace

namespace ops {
const OpDef kIndexSelect{OpKind::IndexSelect, "index_select", 2, 2, infer_index_select,
                         ref_index_select};
const OpDef kGather{OpKind::Gather, "gather", 2, 2, infer_gather, ref_gather};
}  // namespace ops
}  // namespace devpipe
