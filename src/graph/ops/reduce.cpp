// Reductions: Sum and Mean over a set of dims, ArgMax along one dim.
#include <cmath>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

// Output shape of a reduction over `reduced` (flags per dim of `x`).
Shape reduced_shape(const Shape& x, const std::vector<bool>& reduced, bool keepdim) {
  std::vector<std::int64_t> d;
  for (int i = 0; i < x.rank(); ++i) {
    if (!reduced[static_cast<std::size_t>(i)]) {
      d.push_back(x[static_cast<std::size_t>(i)]);
    } else if (keepdim) {
      d.push_back(1);
    }
  }
  return Shape(d);
}

std::vector<bool> reduced_dims(const char* op, const Shape& x, const std::vector<std::int64_t>& dims) {
  if (dims.empty()) throw ShapeError(std::string(op) + ": no dims to reduce over");
  std::vector<bool> r(static_cast<std::size_t>(x.rank()), false);
  for (auto d : dims) {
    checked_dim(op, d, x);
    if (r[static_cast<std::size_t>(d)]) {
      throw ShapeError(std::string(op) + ": dim " + std::to_string(d) + " appears twice in " +
                       Shape(dims).to_string());
    }
    r[static_cast<std::size_t>(d)] = true;
  }
  return r;
}

std::vector<ValueInfo> infer_reduce(const char* op, const std::vector<ValueInfo>& in,
                                    const Attrs& attrs) {
  if (!is_floating(in[0].dtype)) {
    throw DTypeError(std::string(op) + ": needs a floating-point input, got " +
                     std::string(dtype_name(in[0].dtype)));
  }
  auto r = reduced_dims(op, in[0].shape, attrs.ints("dims"));
  return {{reduced_shape(in[0].shape, r, attrs.i("keepdim", 0) != 0), in[0].dtype}};
}
std::vector<ValueInfo> infer_sum(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  return infer_reduce("sum", in, attrs);
}
std::vector<ValueInfo> infer_mean(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  return infer_reduce("mean", in, attrs);
}

std::vector<ValueInfo> infer_argmax(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  if (!is_floating(in[0].dtype)) {
    throw DTypeError("argmax: needs a floating-point input, got " +
                     std::string(dtype_name(in[0].dtype)));
  }
  const Shape& x = in[0].shape;
  auto d = checked_dim("argmax", attrs.i("dim"), x);
  if (x[static_cast<std::size_t>(d)] == 0) {
    throw ShapeError("argmax: dim " + std::to_string(d) + " of " + x.to_string() + " is empty");
  }
  std::vector<bool> r(static_cast<std::size_t>(x.rank()), false);
  r[static_cast<std::size_t>(d)] = true;
  return {{reduced_shape(x, r, attrs.i("keepdim", 0) != 0), DType::Int64}};
}


// ---- reference ----

// Sums in double over the reduced dims; mean divides by their element count.
template <bool kMean>
void ref_reduce(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                const RefContext&) {
  const Shape& xs = in[0].shape();
  auto r = reduced_dims("sum", xs, attrs.ints("dims"));
  // Each input element's output index: the kept dims' coordinates, row-major.
  const int rank = xs.rank();
  std::vector<double> acc(static_cast<std::size_t>(out[0].numel()), 0.0);
  std::int64_t count = 1;
  for (int i = 0; i < rank; ++i) {
    if (r[static_cast<std::size_t>(i)]) count *= xs[static_cast<std::size_t>(i)];
  }
  const auto x = in[0].to_float_vector();
  std::vector<std::int64_t> idx(static_cast<std::size_t>(rank));
  for (std::int64_t e = 0; e < xs.numel(); ++e) {
    std::int64_t rem = e;
    for (int i = rank - 1; i >= 0; --i) {
      idx[static_cast<std::size_t>(i)] = rem % xs[static_cast<std::size_t>(i)];
      rem /= xs[static_cast<std::size_t>(i)];
    }
    std::int64_t o = 0;
    for (int i = 0; i < rank; ++i) {
      if (!r[static_cast<std::size_t>(i)]) o = o * xs[static_cast<std::size_t>(i)] + idx[static_cast<std::size_t>(i)];
    }
    acc[static_cast<std::size_t>(o)] += x[static_cast<std::size_t>(e)];
  }
  std::vector<float> y(acc.size());
  for (std::size_t i = 0; i < acc.size(); ++i) {
    y[i] = static_cast<float>(kMean ? acc[i] / static_cast<double>(count) : acc[i]);
  }
  out[0].copy_from(Tensor::from_vector(y, out[0].shape(), out[0].dtype()));
}

// The first index of the maximum along dim; a NaN counts as the maximum (as PyTorch).
void ref_argmax(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                const RefContext&) {
  const Shape& xs = in[0].shape();
  const auto dim = static_cast<std::size_t>(attrs.i("dim"));
  std::int64_t outer = 1, inner = 1;
  for (std::size_t i = 0; i < dim; ++i) outer *= xs[i];
  for (std::size_t i = dim + 1; i < xs.dims().size(); ++i) inner *= xs[i];
  const std::int64_t n = xs[dim];
  const auto x = in[0].to_float_vector();
  std::int64_t* y = out[0].data<std::int64_t>();
  for (std::int64_t o = 0; o < outer; ++o) {
    for (std::int64_t j = 0; j < inner; ++j) {
      std::int64_t best = 0;
      float bv = x[static_cast<std::size_t>(o * n * inner + j)];
      for (std::int64_t k = 1; k < n && !std::isnan(bv); ++k) {
        const float v = x[static_cast<std::size_t>((o * n + k) * inner + j)];
        if (std::isnan(v) || v > bv) {
          bv = v;
          best = k;
        }
      }
      y[o * inner + j] = best;
    }
  }
}

}  // namespace

namespace ops {
const OpDef kSum{OpKind::Sum, "sum", 1, 1, infer_sum, ref_reduce<false>};
const OpDef kMean{OpKind::Mean, "mean", 1, 1, infer_mean, ref_reduce<true>};
const OpDef kArgMax{OpKind::ArgMax, "argmax", 1, 1, infer_argmax, ref_argmax};
}  // namespace ops
}  // namespace devpipe
