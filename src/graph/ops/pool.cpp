// AdaptiveAvgPool2d and MaxPool2d.
#include <cmath>
#include <limits>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_adaptive_avg(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  DType dt = common_float_dtype("adaptive_avg_pool2d", in);
  if (x.rank() != 4) {
    throw ShapeError("adaptive_avg_pool2d: input must be 4-D [N, C, H, W], got " + x.to_string());
  }
  const auto& os = attrs.ints("output_size");
  if (os.size() != 2 || os[0] < 1 || os[1] < 1) {
    throw ShapeError("adaptive_avg_pool2d: output_size must be two positive sizes");
  }
  return {{Shape{x[0], x[1], os[0], os[1]}, dt}};
}

std::vector<ValueInfo> infer_max_pool(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  DType dt = common_float_dtype("max_pool2d", in);
  if (x.rank() != 4) throw ShapeError("max_pool2d: input must be 4-D [N, C, H, W], got " + x.to_string());
  const auto& k = attrs.ints("kernel_size");
  const auto& s = attrs.ints("stride");
  const auto& p = attrs.ints("padding");
  const auto& d = attrs.ints("dilation");
  Shape out{x[0], x[1], 0, 0};
  for (int i = 0; i < 2; ++i) {
    if (k[i] < 1 || s[i] < 1 || d[i] < 1 || p[i] < 0 || 2 * p[i] > k[i]) {
      throw ShapeError("max_pool2d: invalid kernel " + Shape(k).to_string() + " / stride / padding " +
                       Shape(p).to_string() + " (padding must be at most half the kernel)");
    }
    std::int64_t eff = d[i] * (k[i] - 1) + 1;
    std::int64_t o = (x[2 + i] + 2 * p[i] - eff) / s[i] + 1;
    if (x[2 + i] + 2 * p[i] < eff || o < 1) {
      throw ShapeError("max_pool2d: input " + x.to_string() + " is smaller than the kernel " +
                       Shape(k).to_string());
    }
    out[static_cast<std::size_t>(2 + i)] = o;
  }
  return {{out, dt}};
}


// ---- reference ----

void store(Tensor& out, const std::vector<float>& v) {
  out.copy_from(Tensor::from_vector(v, out.shape(), out.dtype()));
}

// PyTorch's adaptive windows: output i of o covers [floor(i*n/o), ceil((i+1)*n/o)).
void ref_adaptive_avg(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
                      const RefContext&) {
  const Shape& xs = in[0].shape();
  const Shape& ys = out[0].shape();
  const std::int64_t planes = xs[0] * xs[1], H = xs[2], W = xs[3], OH = ys[2], OW = ys[3];
  auto x = in[0].to_float_vector();
  std::vector<float> y(static_cast<std::size_t>(ys.numel()));
  for (std::int64_t p = 0; p < planes; ++p) {
    const float* xp = x.data() + p * H * W;
    for (std::int64_t i = 0; i < OH; ++i) {
      const std::int64_t h0 = (i * H) / OH, h1 = ((i + 1) * H + OH - 1) / OH;
      for (std::int64_t j = 0; j < OW; ++j) {
        const std::int64_t w0 = (j * W) / OW, w1 = ((j + 1) * W + OW - 1) / OW;
        double acc = 0;
        for (std::int64_t h = h0; h < h1; ++h) {
          for (std::int64_t w = w0; w < w1; ++w) acc += xp[h * W + w];
        }
        y[static_cast<std::size_t>((p * OH + i) * OW + j)] =
            static_cast<float>(acc / static_cast<double>((h1 - h0) * (w1 - w0)));
      }
    }
  }
  store(out[0], y);
}

// Max over the dilated window; padding positions count as -inf (never selected). NaN wins,
// as in PyTorch.
void ref_max_pool(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                  const RefContext&) {
  const auto& k = attrs.ints("kernel_size");
  const auto& s = attrs.ints("stride");
  const auto& pd = attrs.ints("padding");
  const auto& d = attrs.ints("dilation");
  const Shape& xs = in[0].shape();
  const Shape& ys = out[0].shape();
  const std::int64_t planes = xs[0] * xs[1], H = xs[2], W = xs[3], OH = ys[2], OW = ys[3];
  auto x = in[0].to_float_vector();
  std::vector<float> y(static_cast<std::size_t>(ys.numel()));
  for (std::int64_t p = 0; p < planes; ++p) {
    const float* xp = x.data() + p * H * W;
    for (std::int64_t i = 0; i < OH; ++i) {
      for (std::int64_t j = 0; j < OW; ++j) {
        float m = -std::numeric_limits<float>::infinity();
        for (std::int64_t a = 0; a < k[0]; ++a) {
          const std::int64_t h = i * s[0] - pd[0] + a * d[0];
          if (h < 0 || h >= H) continue;
          for (std::int64_t b = 0; b < k[1]; ++b) {
            const std::int64_t w = j * s[1] - pd[1] + b * d[1];
            if (w < 0 || w >= W) continue;
            const float v = xp[h * W + w];
            if (v > m || std::isnan(v)) m = v;
          }
        }
        y[static_cast<std::size_t>((p * OH + i) * OW + j)] = m;
      }
    }
  }
  store(out[0], y);
}

}  // namespace

namespace ops {
const OpDef kAdaptiveAvgPool2d{OpKind::AdaptiveAvgPool2d, "adaptive_avg_pool2d", 1, 1,
                               infer_adaptive_avg, ref_adaptive_avg};
const OpDef kMaxPool2d{OpKind::MaxPool2d, "max_pool2d", 1, 1, infer_max_pool, ref_max_pool};
}  // namespace ops
}  // namespace devpipe
