// Conv2d, Conv2d fused with a global average pool (conv2d_global_avg_pool), and the patch
// means that replace a conv + global average pool when linear chains are folded
// (conv_patch_mean).
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_conv2d(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  const Shape& w = in[1].shape;
  DType dt = common_float_dtype("conv2d", in);
  if (x.rank() != 4) throw ShapeError("conv2d: input must be 4-D [N, C, H, W], got " + x.to_string());
  if (w.rank() != 4) {
    throw ShapeError("conv2d: weight must be 4-D [O, C/groups, kh, kw], got " + w.to_string());
  }
  const auto& stride = attrs.ints("stride");
  const auto& pad = attrs.ints("padding");
  const auto& dil = attrs.ints("dilation");
  std::int64_t groups = attrs.i("groups");
  if (groups < 1 || x[1] % groups != 0 || w[0] % groups != 0) {
    throw ShapeError("conv2d: groups=" + std::to_string(groups) + " must divide in_channels " +
                     std::to_string(x[1]) + " and out_channels " + std::to_string(w[0]));
  }
  if (w[1] * groups != x[1]) {
    throw ShapeError("conv2d: input " + x.to_string() + " has " + std::to_string(x[1]) +
                     " channels but the weight " + w.to_string() + " with groups=" +
                     std::to_string(groups) + " expects " + std::to_string(w[1] * groups));
  }
  if (in.size() == 3 && !(in[2].shape == Shape{w[0]})) {
    throw ShapeError("conv2d: bias " + in[2].shape.to_string() + " does not match out_channels " +
                     std::to_string(w[0]));
  }
  Shape out{x[0], w[0], 0, 0};
  for (int i = 0; i < 2; ++i) {
    if (stride[i] < 1 || dil[i] < 1 || pad[i] < 0) {
      throw ShapeError("conv2d: invalid stride/dilation/padding");
    }
    std::int64_t eff = dil[i] * (w[2 + i] - 1) + 1;
    std::int64_t o = (x[2 + i] + 2 * pad[i] - eff) / stride[i] + 1;
    if (x[2 + i] + 2 * pad[i] < eff || o < 1) {
      throw ShapeError("conv2d: input " + x.to_string() + " with padding " +
                       Shape(pad).to_string() + " is smaller than the dilated kernel " +
                       std::to_string(eff));
    }
    out[static_cast<std::size_t>(2 + i)] = o;
  }
  return {{out, dt}};
}


// ---- reference ----

void store(Tensor& out, const std::vector<float>& v) {
  out.copy_from(Tensor::from_vector(v, out.shape(), out.dtype()));
}

// Direct convolution with zero padding: for every output element, the dot product of the
// (dilated, strided) input window of its group's channels with the filter, in double.
std::vector<double> conv2d_double(const std::vector<Tensor>& in, const Shape& ys,
                                  const Attrs& attrs) {
  const Shape& xs = in[0].shape();
  const Shape& ws = in[1].shape();
  const auto& stride = attrs.ints("stride");
  const auto& pad = attrs.ints("padding");
  const auto& dil = attrs.ints("dilation");
  const std::int64_t groups = attrs.i("groups");
  const std::int64_t N = xs[0], C = xs[1], H = xs[2], W = xs[3];
  const std::int64_t O = ws[0], Cg = ws[1], KH = ws[2], KW = ws[3];
  const std::int64_t OH = ys[2], OW = ys[3];
  const std::int64_t Og = O / groups;
  auto x = in[0].to_float_vector();
  auto w = in[1].to_float_vector();
  std::vector<float> b;
  if (in.size() == 3) b = in[2].to_float_vector();
  std::vector<double> y(static_cast<std::size_t>(N * O * OH * OW));
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t o = 0; o < O; ++o) {
      const std::int64_t g = o / Og;
      for (std::int64_t oh = 0; oh < OH; ++oh) {
        for (std::int64_t ow = 0; ow < OW; ++ow) {
          double acc = b.empty() ? 0.0 : static_cast<double>(b[static_cast<std::size_t>(o)]);
          for (std::int64_t c = 0; c < Cg; ++c) {
            const std::int64_t ci = g * Cg + c;
            for (std::int64_t kh = 0; kh < KH; ++kh) {
              const std::int64_t ih = oh * stride[0] - pad[0] + kh * dil[0];
              if (ih < 0 || ih >= H) continue;
              for (std::int64_t kw = 0; kw < KW; ++kw) {
                const std::int64_t iw = ow * stride[1] - pad[1] + kw * dil[1];
                if (iw < 0 || iw >= W) continue;
                acc += static_cast<double>(x[static_cast<std::size_t>(((n * C + ci) * H + ih) * W + iw)]) *
                       w[static_cast<std::size_t>(((o * Cg + c) * KH + kh) * KW + kw)];
              }
            }
          }
          y[static_cast<std::size_t>(((n * O + o) * OH + oh) * OW + ow)] = acc;
        }
      }
    }
  }
  return y;
}

void ref_conv2d(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                const RefContext&) {
  std::vector<double> y = conv2d_double(in, out[0].shape(), attrs);
  store(out[0], std::vector<float>(y.begin(), y.end()));
}

// ---- the fused conv + global average pool ----

std::vector<ValueInfo> infer_conv2d_global_avg_pool(const std::vector<ValueInfo>& in,
                                                    const Attrs& attrs) {
  try {
    ValueInfo conv = infer_conv2d(in, attrs)[0];
    return {{Shape{conv.shape[0], conv.shape[1], 1, 1}, conv.dtype}};
  } catch (const ShapeError& e) {
    throw ShapeError(std::string("conv2d_global_avg_pool: ") + e.what());
  }
}

// The convolution in double, then the mean of each (n, o) plane, rounded once.
void ref_conv2d_global_avg_pool(const std::vector<Tensor>& in, std::vector<Tensor>& out,
                                const Attrs& attrs, const RefContext&) {
  Shape conv = infer_conv2d({{in[0].shape(), in[0].dtype()}, {in[1].shape(), in[1].dtype()}},
                            attrs)[0].shape;
  std::vector<double> y = conv2d_double(in, conv, attrs);
  const std::int64_t planes = conv[0] * conv[1], hw = conv[2] * conv[3];
  std::vector<float> mean(static_cast<std::size_t>(planes));
  for (std::int64_t p = 0; p < planes; ++p) {
    double acc = 0;
    for (std::int64_t i = 0; i < hw; ++i) acc += y[static_cast<std::size_t>(p * hw + i)];
    mean[static_cast<std::size_t>(p)] = static_cast<float>(acc / static_cast<double>(hw));
  }
  store(out[0], mean);
}

// ---- the patch means (conv_patch_mean) ----
//
// y[n, (c * kh + i) * kw + j] = the mean over the conv's output positions (oh, ow) of the
// zero-padded input at (oh * sh - ph + i * dh, ow * sw - pw + j * dw): the conv's mean over H
// and W is then W.reshape(O, C * kh * kw) @ y + b (the compiler's fold_linear_chains).

/// The conv geometry of conv_patch_mean's attributes as a Conv2d over `x` (its output shape).
Shape patch_mean_conv_shape(const Shape& x, const Attrs& attrs) {
  const auto& k = attrs.ints("kernel_size");
  if (k.size() != 2 || k[0] < 1 || k[1] < 1) {
    throw ShapeError("conv_patch_mean: kernel_size must be two sizes >= 1, got " + Shape(k).to_string());
  }
  if (x.rank() != 4) throw ShapeError("conv_patch_mean: input must be 4-D [N, C, H, W], got " + x.to_string());
  Attrs conv = attrs;
  conv.set("groups", std::int64_t{1});
  try {
    return infer_conv2d({{x, DType::Float32}, {Shape{1, x[1], k[0], k[1]}, DType::Float32}}, conv)[0].shape;
  } catch (const ShapeError& e) {
    throw ShapeError(std::string("conv_patch_mean: ") + e.what());
  }
}

std::vector<ValueInfo> infer_conv_patch_mean(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  DType dt = common_float_dtype("conv_patch_mean", in);
  patch_mean_conv_shape(in[0].shape, attrs);
  const auto& k = attrs.ints("kernel_size");
  return {{Shape{in[0].shape[0], in[0].shape[1] * k[0] * k[1]}, dt}};
}

// Every window sum in double, divided once, rounded once.
void ref_conv_patch_mean(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                         const RefContext&) {
  const Shape& xs = in[0].shape();
  const Shape conv = patch_mean_conv_shape(xs, attrs);
  const auto& k = attrs.ints("kernel_size");
  const auto& stride = attrs.ints("stride");
  const auto& pad = attrs.ints("padding");
  const auto& dil = attrs.ints("dilation");
  const std::int64_t N = xs[0], C = xs[1], H = xs[2], W = xs[3], OH = conv[2], OW = conv[3];
  auto x = in[0].to_float_vector();
  std::vector<float> y(static_cast<std::size_t>(N * C * k[0] * k[1]));
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t c = 0; c < C; ++c) {
      for (std::int64_t i = 0; i < k[0]; ++i) {
        for (std::int64_t j = 0; j < k[1]; ++j) {
          double acc = 0;
          for (std::int64_t oh = 0; oh < OH; ++oh) {
            const std::int64_t ih = oh * stride[0] - pad[0] + i * dil[0];
            if (ih < 0 || ih >= H) continue;
            for (std::int64_t ow = 0; ow < OW; ++ow) {
              const std::int64_t iw = ow * stride[1] - pad[1] + j * dil[1];
              if (iw < 0 || iw >= W) continue;
              acc += x[static_cast<std::size_t>(((n * C + c) * H + ih) * W + iw)];
            }
          }
          y[static_cast<std::size_t>(((n * C + c) * k[0] + i) * k[1] + j)] =
              static_cast<float>(acc / static_cast<double>(OH * OW));
        }
      }
    }
  }
  store(out[0], y);
}

}  // namespace

namespace ops {
const OpDef kConv2d{OpKind::Conv2d, "conv2d", 2, 3, infer_conv2d, ref_conv2d};
const OpDef kConv2dGlobalAvgPool{OpKind::Conv2dGlobalAvgPool, "conv2d_global_avg_pool", 2, 3,
                                 infer_conv2d_global_avg_pool, ref_conv2d_global_avg_pool};
const OpDef kConvPatchMean{OpKind::ConvPatchMean, "conv_patch_mean", 1, 1, infer_conv_patch_mean,
                           ref_conv_patch_mean};
}  // namespace ops
}  // namespace devpipe
