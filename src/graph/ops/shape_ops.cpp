// Reshape, Permute, Concat, Slice: ops that move data without arithmetic.
#include <algorithm>
#include <cstring>

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


// ---- reference ----
// These ops only move elements, so they copy raw bytes (dtype_size each) and work for every
// dtype, int64 included.

// Row-major strides (in elements) of `s`.
std::vector<std::int64_t> strides_of(const Shape& s) {
  std::vector<std::int64_t> st(static_cast<std::size_t>(s.rank()), 1);
  for (int i = s.rank() - 2; i >= 0; --i) {
    st[static_cast<std::size_t>(i)] = st[static_cast<std::size_t>(i + 1)] * s[static_cast<std::size_t>(i + 1)];
  }
  return st;
}

void ref_reshape(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
                 const RefContext&) {
  std::memcpy(out[0].raw_data(), in[0].raw_data(), out[0].nbytes());
}

// out[i0, ..., ik] = x[j] where x's index along dims[d] is i_d.
void ref_permute(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                 const RefContext&) {
  const auto& dims = attrs.ints("dims");
  const Shape& os = out[0].shape();
  const int r = os.rank();
  const auto xst = strides_of(in[0].shape());
  const std::size_t es = dtype_size(in[0].dtype());
  const char* x = static_cast<const char*>(in[0].raw_data());
  char* y = static_cast<char*>(out[0].raw_data());
  std::vector<std::int64_t> idx(static_cast<std::size_t>(r), 0);
  for (std::int64_t o = 0; o < os.numel(); ++o) {
    std::int64_t rem = o, src = 0;
    for (int i = r - 1; i >= 0; --i) {
      idx[static_cast<std::size_t>(i)] = rem % os[static_cast<std::size_t>(i)];
      rem /= os[static_cast<std::size_t>(i)];
    }
    for (int i = 0; i < r; ++i) {
      src += idx[static_cast<std::size_t>(i)] * xst[static_cast<std::size_t>(dims[static_cast<std::size_t>(i)])];
    }
    std::memcpy(y + static_cast<std::size_t>(o) * es, x + static_cast<std::size_t>(src) * es, es);
  }
}

// The output is [outer, sum of sizes along dim, inner]; each input fills its band.
void ref_concat(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                const RefContext&) {
  const auto dim = static_cast<std::size_t>(attrs.i("dim"));
  const Shape& os = out[0].shape();
  const std::size_t es = dtype_size(out[0].dtype());
  std::int64_t outer = 1, inner = 1;
  for (std::size_t i = 0; i < dim; ++i) outer *= os[i];
  for (std::size_t i = dim + 1; i < os.dims().size(); ++i) inner *= os[i];
  const std::size_t out_row = static_cast<std::size_t>(os[dim] * inner) * es;
  char* y = static_cast<char*>(out[0].raw_data());
  std::size_t band = 0;
  for (const Tensor& t : in) {
    const std::size_t row = static_cast<std::size_t>(t.shape()[dim] * inner) * es;
    const char* x = static_cast<const char*>(t.raw_data());
    for (std::int64_t o = 0; o < outer; ++o) {
      std::memcpy(y + static_cast<std::size_t>(o) * out_row + band,
                  x + static_cast<std::size_t>(o) * row, row);
    }
    band += row;
  }
}

// x[..., start:end:step, ...] along dim, with start and end shifted by rank * rank_stride.
void ref_slice(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
               const RefContext& ctx) {
  const auto dim = static_cast<std::size_t>(attrs.i("dim"));
  const std::int64_t shift = static_cast<std::int64_t>(ctx.rank) * attrs.i("rank_stride", 0);
  const std::int64_t start = attrs.i("start") + shift;
  const std::int64_t end = attrs.i("end") + shift;
  const std::int64_t step = attrs.i("step", 1);
  const Shape& xs = in[0].shape();
  const std::int64_t n = xs[dim];
  if (start < 0 || end > n) {
    throw ShapeError("slice: rank " + std::to_string(ctx.rank) + " range [" +
                     std::to_string(start) + ":" + std::to_string(end) + "] is outside dim " +
                     std::to_string(dim) + " of " + xs.to_string());
  }
  const std::size_t es = dtype_size(in[0].dtype());
  std::int64_t outer = 1, inner = 1;
  for (std::size_t i = 0; i < dim; ++i) outer *= xs[i];
  for (std::size_t i = dim + 1; i < xs.dims().size(); ++i) inner *= xs[i];
  const std::int64_t m = out[0].shape()[dim];
  const std::size_t chunk = static_cast<std::size_t>(inner) * es;
  const char* x = static_cast<const char*>(in[0].raw_data());
  char* y = static_cast<char*>(out[0].raw_data());
  for (std::int64_t o = 0; o < outer; ++o) {
    for (std::int64_t j = 0; j < m; ++j) {
      const std::int64_t src = (o * n + start + j * step) * inner;
      const std::int64_t dst = (o * m + j) * inner;
      std::memcpy(y + static_cast<std::size_t>(dst) * es, x + static_cast<std::size_t>(src) * es,
                  chunk);
    }
  }
}

}  // namespace

namespace ops {
const OpDef kReshape{OpKind::Reshape, "reshape", 1, 1, infer_reshape, ref_reshape};
const OpDef kPermute{OpKind::Permute, "permute", 1, 1, infer_permute, ref_permute};
const OpDef kConcat{OpKind::Concat, "concat", 1, -1, infer_concat, ref_concat};
const OpDef kSlice{OpKind::Slice, "slice", 1, 1, infer_slice, ref_slice};
}  // namespace ops
}  // namespace devpipe
