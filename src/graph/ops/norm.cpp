// LayerNorm and RmsNorm over the trailing normalized_shape dims.
#include <cmath>

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


// ---- reference ----

void store(Tensor& out, const std::vector<float>& v) {
  out.copy_from(Tensor::from_vector(v, out.shape(), out.dtype()));
}

std::int64_t norm_size(const Attrs& attrs) {
  return Shape(attrs.ints("normalized_shape")).numel();
}

// y = (x - mean) / sqrt(var + eps) * w + b over the trailing normalized_shape elements; var is
// the biased (population) variance.
void ref_layer_norm(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                    const RefContext&) {
  const std::int64_t D = norm_size(attrs);
  const double eps = attrs.f("eps");
  const std::int64_t rows = D ? in[0].numel() / D : 0;
  auto x = in[0].to_float_vector();
  std::vector<float> w, b;
  if (in.size() >= 2) w = in[1].to_float_vector();
  if (in.size() >= 3) b = in[2].to_float_vector();
  std::vector<float> y(x.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * D;
    double mean = 0;
    for (std::int64_t i = 0; i < D; ++i) mean += xr[i];
    mean /= static_cast<double>(D);
    double var = 0;
    for (std::int64_t i = 0; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= static_cast<double>(D);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (std::int64_t i = 0; i < D; ++i) {
      double v = (xr[i] - mean) * inv;
      if (!w.empty()) v *= w[static_cast<std::size_t>(i)];
      if (!b.empty()) v += b[static_cast<std::size_t>(i)];
      y[static_cast<std::size_t>(r * D + i)] = static_cast<float>(v);
    }
  }
  store(out[0], y);
}

// y = x / sqrt(mean(x^2) + eps) * w over the trailing normalized_shape elements.
void ref_rms_norm(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                  const RefContext&) {
  const std::int64_t D = norm_size(attrs);
  const double eps = attrs.f("eps");
  const std::int64_t rows = D ? in[0].numel() / D : 0;
  auto x = in[0].to_float_vector();
  std::vector<float> w;
  if (in.size() >= 2) w = in[1].to_float_vector();
  std::vector<float> y(x.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* xr = x.data() + r * D;
    double ss = 0;
    for (std::int64_t i = 0; i < D; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    for (std::int64_t i = 0; i < D; ++i) {
      double v = xr[i] * inv;
      if (!w.empty()) v *= w[static_cast<std::size_t>(i)];
      y[static_cast<std::size_t>(r * D + i)] = static_cast<float>(v);
    }
  }
  store(out[0], y);
}

}  // namespace

namespace ops {
const OpDef kLayerNorm{OpKind::LayerNorm, "layer_norm", 1, 3, infer_layer_norm, ref_layer_norm};
const OpDef kRmsNorm{OpKind::RmsNorm, "rms_norm", 1, 2, infer_rms_norm, ref_rms_norm};
}  // namespace ops
}  // namespace devpipe
