// Softmax along one dim.
#include <algorithm>
#include <cmath>

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


// exp(x - max) / sum(exp(x - max)) along dim; the input viewed as [outer, n, inner].
void ref_softmax(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                 const RefContext&) {
  const auto dim = static_cast<std::size_t>(attrs.i("dim"));
  const Shape& xs = in[0].shape();
  std::int64_t outer = 1, inner = 1;
  for (std::size_t i = 0; i < dim; ++i) outer *= xs[i];
  for (std::size_t i = dim + 1; i < xs.dims().size(); ++i) inner *= xs[i];
  const std::int64_t n = xs[dim];
  auto x = in[0].to_float_vector();
  std::vector<float> y(x.size());
  std::vector<double> e(static_cast<std::size_t>(n));
  for (std::int64_t o = 0; o < outer; ++o) {
    for (std::int64_t j = 0; j < inner; ++j) {
      auto at = [&](std::int64_t k) { return static_cast<std::size_t>((o * n + k) * inner + j); };
      double mx = -INFINITY;
      for (std::int64_t k = 0; k < n; ++k) mx = std::max(mx, static_cast<double>(x[at(k)]));
      double sum = 0;
      for (std::int64_t k = 0; k < n; ++k) {
        e[static_cast<std::size_t>(k)] = std::exp(static_cast<double>(x[at(k)]) - mx);
        sum += e[static_cast<std::size_t>(k)];
      }
      for (std::int64_t k = 0; k < n; ++k) y[at(k)] = static_cast<float>(e[static_cast<std::size_t>(k)] / sum);
    }
  }
  out[0].copy_from(Tensor::from_vector(y, out[0].shape(), out[0].dtype()));
}

}  // namespace

namespace ops {
const OpDef kSoftmax{OpKind::Softmax, "softmax", 1, 1, infer_softmax, ref_softmax};
}  // namespace ops
}  // namespace devpipe
