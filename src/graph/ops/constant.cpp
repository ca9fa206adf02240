// Full and Arange: ops without inputs that produce a constant tensor.
#include <cmath>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_full(const std::vector<ValueInfo>&, const Attrs& attrs) {
  Shape s(attrs.ints("shape"));
  for (auto d : s.dims()) {
    if (d < 0) throw ShapeError("full: negative size in shape " + s.to_string());
  }
  const DType dt = dtype_attr("full", attrs);
  const double v = attrs.f("value");
  if (dt == DType::Int64 && (!std::isfinite(v) || v != std::trunc(v))) {
    throw DTypeError("full: an int64 tensor takes an integral value, got " + std::to_string(v));
  }
  return {{s, dt}};
}

std::vector<ValueInfo> infer_arange(const std::vector<ValueInfo>&, const Attrs& attrs) {
  const std::int64_t n = attrs.i("n");
  if (n < 0) throw ShapeError("arange: n must be >= 0, got " + std::to_string(n));
  return {{Shape({n}), dtype_attr("arange", attrs)}};
}


// ---- reference ----

void fill_with(Tensor& out, const std::vector<double>& values) {
  if (out.dtype() == DType::Int64) {
    std::int64_t* y = out.data<std::int64_t>();
    for (std::size_t i = 0; i < values.size(); ++i) y[i] = static_cast<std::int64_t>(values[i]);
    return;
  }
  std::vector<float> f(values.begin(), values.end());
  out.copy_from(Tensor::from_vector(f, out.shape(), out.dtype()));
}

void ref_full(const std::vector<Tensor>&, std::vector<Tensor>& out, const Attrs& attrs,
              const RefContext&) {
  fill_with(out[0], std::vector<double>(static_cast<std::size_t>(out[0].numel()), attrs.f("value")));
}

void ref_arange(const std::vector<Tensor>&, std::vector<Tensor>& out, const Attrs&,
                const RefContext&) {
  std::vector<double> v(static_cast<std::size_t>(out[0].numel()));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i);
  fill_with(out[0], v);
}

}  // namespace

namespace ops {
const OpDef kFull{OpKind::Full, "full", 0, 0, infer_full, ref_full};
const OpDef kArange{OpKind::Arange, "arange", 0, 0, infer_arange, ref_arange};
}  // namespace ops
}  // namespace devpipe
