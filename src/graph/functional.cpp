#include "devpipe/functional.h"

#include <algorithm>

#include "devpipe/error.h"

namespace devpipe::F {

namespace {
Tracer& tr() { return Tracer::current(); }

std::vector<Var> with_optional(std::vector<Var> xs, std::optional<Var> a,
                               std::optional<Var> b = std::nullopt) {
  if (a) xs.push_back(*a);
  if (b) {
    if (!a) throw InvalidArgument("internal: optional operand order");
    xs.push_back(*b);
  }
  return xs;
}

int norm_axis(Var x, int dim, const char* op) {
  int r = x.rank();
  int d = dim < 0 ? dim + r : dim;
  if (d < 0 || d >= r) {
    throw ShapeError(tr().where() + op + ": dim " + std::to_string(dim) + " out of range for " +
                     x.shape().to_string());
  }
  return d;
}
}  // namespace

Var linear(Var x, Var weight, std::optional<Var> bias) {
  return tr().emit(OpKind::Linear, with_optional({x, weight}, bias));
}

Var matmul(Var a, Var b) { return tr().emit(OpKind::Matmul, {a, b}); }

Var conv2d(Var x, Var weight, std::optional<Var> bias, std::vector<std::int64_t> stride,
           std::vector<std::int64_t> padding, std::vector<std::int64_t> dilation,
           std::int64_t groups) {
  if (stride.size() != 2 || padding.size() != 2 || dilation.size() != 2) {
    throw InvalidArgument(tr().where() + "conv2d: stride, padding and dilation need 2 values");
  }
  Attrs a;
  a.set("stride", stride).set("padding", padding).set("dilation", dilation).set("groups", groups);
  return tr().emit(OpKind::Conv2d, with_optional({x, weight}, bias), a);
}

Var adaptive_avg_pool2d(Var x, std::vector<std::int64_t> output_size) {
  Attrs a;
  a.set("output_size", std::move(output_size));
  return tr().emit(OpKind::AdaptiveAvgPool2d, {x}, a);
}

Var max_pool2d(Var x, std::vector<std::int64_t> kernel_size, std::vector<std::int64_t> stride,
               std::vector<std::int64_t> padding, std::vector<std::int64_t> dilation) {
  if (kernel_size.size() != 2 || stride.size() != 2 || padding.size() != 2 ||
      dilation.size() != 2) {
    throw InvalidArgument(tr().where() + "max_pool2d: kernel_size, stride, padding and dilation need 2 values");
  }
  Attrs a;
  a.set("kernel_size", kernel_size).set("stride", stride).set("padding", padding)
      .set("dilation", dilation);
  return tr().emit(OpKind::MaxPool2d, {x}, a);
}

Var embedding(Var indices, Var weight, std::int64_t vocab_per_rank) {
  Attrs a;
  a.set("vocab_per_rank", vocab_per_rank);
  return tr().emit(OpKind::Embedding, {indices, weight}, a);
}

Var layer_norm(Var x, std::vector<std::int64_t> normalized_shape, std::optional<Var> weight,
               std::optional<Var> bias, double eps) {
  Attrs a;
  a.set("normalized_shape", std::move(normalized_shape)).set("eps", eps);
  return tr().emit(OpKind::LayerNorm, with_optional({x}, weight, bias), a);
}

Var rms_norm(Var x, std::vector<std::int64_t> normalized_shape, std::optional<Var> weight,
             double eps) {
  Attrs a;
  a.set("normalized_shape", std::move(normalized_shape)).set("eps", eps);
  return tr().emit(OpKind::RmsNorm, with_optional({x}, weight), a);
}

Var reshape(Var x, std::vector<std::int64_t> shape) {
  int infer = -1;
  std::int64_t known = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0) {
        throw ShapeError(tr().where() + "reshape: more than one -1 in " + Shape(shape).to_string());
      }
      infer = static_cast<int>(i);
    } else if (shape[i] < 0) {
      throw ShapeError(tr().where() + "reshape: invalid size in " + Shape(shape).to_string());
    } else {
      known *= shape[i];
    }
  }
  std::int64_t n = x.shape().numel();
  if (infer >= 0) {
    if (known == 0 || n % known != 0) {
      throw ShapeError(tr().where() + "reshape: cannot reshape " + x.shape().to_string() + " to " +
                       Shape(shape).to_string());
    }
    shape[static_cast<std::size_t>(infer)] = n / known;
  }
  if (Shape(shape) == x.shape()) return x;
  Attrs a;
  a.set("shape", std::move(shape));
  return tr().emit(OpKind::Reshape, {x}, a);
}

Var flatten(Var x, int start_dim, int end_dim) {
  if (x.rank() == 0) return reshape(x, {1});
  int s = norm_axis(x, start_dim, "flatten");
  int e = norm_axis(x, end_dim, "flatten");
  if (s > e) {
    throw ShapeError(tr().where() + "flatten: start_dim " + std::to_string(start_dim) +
                     " is after end_dim " + std::to_string(end_dim));
  }
  std::vector<std::int64_t> out;
  const auto& d = x.shape().dims();
  for (int i = 0; i < s; ++i) out.push_back(d[static_cast<std::size_t>(i)]);
  std::int64_t p = 1;
  for (int i = s; i <= e; ++i) p *= d[static_cast<std::size_t>(i)];
  out.push_back(p);
  for (int i = e + 1; i < x.rank(); ++i) out.push_back(d[static_cast<std::size_t>(i)]);
  return reshape(x, out);
}

Var permute(Var x, std::vector<std::int64_t> dims) {
  for (auto& d : dims) {
    if (d < 0) d += x.rank();
  }
  bool identity = true;
  for (std::size_t i = 0; i < dims.size(); ++i) identity = identity && dims[i] == static_cast<std::int64_t>(i);
  if (identity && static_cast<int>(dims.size()) == x.rank()) return x;
  Attrs a;
  a.set("dims", std::move(dims));
  return tr().emit(OpKind::Permute, {x}, a);
}

Var transpose(Var x, int dim0, int dim1) {
  int a = norm_axis(x, dim0, "transpose");
  int b = norm_axis(x, dim1, "transpose");
  std::vector<std::int64_t> dims(static_cast<std::size_t>(x.rank()));
  for (int i = 0; i < x.rank(); ++i) dims[static_cast<std::size_t>(i)] = i;
  std::swap(dims[static_cast<std::size_t>(a)], dims[static_cast<std::size_t>(b)]);
  return permute(x, dims);
}

Var concat(const std::vector<Var>& xs, int dim) {
  if (xs.empty()) throw InvalidArgument(tr().where() + "concat: needs at least one tensor");
  int d = norm_axis(xs[0], dim, "concat");
  if (xs.size() == 1) return xs[0];
  Attrs a;
  a.set("dim", static_cast<std::int64_t>(d));
  return tr().emit(OpKind::Concat, xs, a);
}

Var slice(Var x, int dim, std::int64_t start, std::int64_t end, std::int64_t step) {
  int d = norm_axis(x, dim, "slice");
  if (step < 1) throw ShapeError(tr().where() + "slice: step must be >= 1, got " + std::to_string(step));
  std::int64_t n = x.shape()[static_cast<std::size_t>(d)];
  auto clamp = [n](std::int64_t v) {
    if (v < 0) v += n;
    return std::clamp<std::int64_t>(v, 0, n);
  };
  std::int64_t s = clamp(start), e = std::max(clamp(end), clamp(start));
  Attrs a;
  a.set("dim", static_cast<std::int64_t>(d)).set("start", s).set("end", e).set("step", step);
  return tr().emit(OpKind::Slice, {x}, a);
}

Var add(Var a, Var b) { return tr().emit(OpKind::Add, {a, b}); }
Var mul(Var a, Var b) { return tr().emit(OpKind::Mul, {a, b}); }

Var sub(Var a, Var b) { return tr().emit(OpKind::Sub, {a, b}); }
Var div(Var a, Var b) { return tr().emit(OpKind::Div, {a, b}); }
Var exp(Var x) { return tr().emit(OpKind::Exp, {x}); }
Var tanh(Var x) { return tr().emit(OpKind::Tanh, {x}); }
Var sigmoid(Var x) { return tr().emit(OpKind::Sigmoid, {x}); }
Var neg(Var x) { return tr().emit(OpKind::Neg, {x}); }

Var add(Var a, double s) {
  Attrs at;
  at.set("value", s);
  return tr().emit(OpKind::AddScalar, {a}, at);
}
Var mul(Var a, double s) {
  Attrs at;
  at.set("value", s);
  return tr().emit(OpKind::MulScalar, {a}, at);
}

Var full(std::vector<std::int64_t> shape, double value, DType dtype) {
  Attrs at;
  at.set("shape", std::move(shape)).set("value", value).set("dtype", std::string(dtype_name(dtype)));
  return tr().emit(OpKind::Full, {}, at);
}
Var arange(std::int64_t n, DType dtype) {
  Attrs at;
  at.set("n", n).set("dtype", std::string(dtype_name(dtype)));
  return tr().emit(OpKind::Arange, {}, at);
}

namespace {
Var reduce(OpKind op, const char* name, Var x, std::vector<std::int64_t> dims, bool keepdim) {
  if (dims.empty()) {
    for (int i = 0; i < x.rank(); ++i) dims.push_back(i);
  }
  for (auto& d : dims) d = norm_axis(x, static_cast<int>(d), name);
  std::sort(dims.begin(), dims.end());
  Attrs at;
  at.set("dims", std::move(dims)).set("keepdim", static_cast<std::int64_t>(keepdim));
  return tr().emit(op, {x}, at);
}
}  // namespace

Var sum(Var x, std::vector<std::int64_t> dims, bool keepdim) {
  return reduce(OpKind::Sum, "sum", x, std::move(dims), keepdim);
}
Var mean(Var x, std::vector<std::int64_t> dims, bool keepdim) {
  return reduce(OpKind::Mean, "mean", x, std::move(dims), keepdim);
}

Var argmax(Var x, int dim, bool keepdim) {
  Attrs at;
  at.set("dim", static_cast<std::int64_t>(norm_axis(x, dim, "argmax")))
      .set("keepdim", static_cast<std::int64_t>(keepdim));
  return tr().emit(OpKind::ArgMax, {x}, at);
}

Var index_select(Var x, int dim, Var index) {
  Attrs at;
  at.set("dim", static_cast<std::int64_t>(norm_axis(x, dim, "index_select")));
  return tr().emit(OpKind::IndexSelect, {x, index}, at);
}
Var gather(Var x, int dim, Var index) {
  Attrs at;
  at.set("dim", static_cast<std::int64_t>(norm_axis(x, dim, "gather")));
  return tr().emit(OpKind::Gather, {x, index}, at);
}

Var where(Var cond, Var a, Var b) { return tr().emit(OpKind::Where, {cond, a, b}); }

Var masked_fill(Var x, Var mask, double value) {
  Attrs at;
  at.set("value", value);
  return tr().emit(OpKind::MaskedFill, {x, mask}, at);
}

Var scaled_dot_product_attention(Var q, Var k, Var v, std::optional<Var> attn_mask,
                                 bool is_causal, std::optional<double> scale) {
  Attrs at;
  at.set("is_causal", static_cast<std::int64_t>(is_causal));
  if (scale) at.set("scale", *scale);
  return tr().emit(OpKind::ScaledDotProductAttention, with_optional({q, k, v}, attn_mask), at);
}

Var masked_attention(Var q, Var k, Var v, Var q_positions, Var kv_lengths,
                     std::optional<double> scale) {
  Attrs at;
  if (scale) at.set("scale", *scale);
  return tr().emit(OpKind::MaskedAttention, {q, k, v, q_positions, kv_lengths}, at);
}

Var masked_attention(Var q, Var k, Var v, Var q_positions, Var kv_lengths, Var key_mask,
                     std::optional<double> scale) {
  Attrs at;
  if (scale) at.set("scale", *scale);
  return tr().emit(OpKind::MaskedAttention, {q, k, v, q_positions, kv_lengths, key_mask}, at);
}

Var rotary_embedding(Var x, Var positions, double theta) {
  Attrs at;
  at.set("theta", theta);
  return tr().emit(OpKind::RotaryEmbedding, {x, positions}, at);
}

Var softmax(Var x, int dim) {
  Attrs a;
  a.set("dim", static_cast<std::int64_t>(norm_axis(x, dim, "softmax")));
  return tr().emit(OpKind::Softmax, {x}, a);
}

Var gelu(Var x, const std::string& approximate) {
  Attrs a;
  a.set("approximate", approximate);
  return tr().emit(OpKind::Gelu, {x}, a);
}
Var silu(Var x) { return tr().emit(OpKind::Silu, {x}); }
Var relu(Var x) { return tr().emit(OpKind::Relu, {x}); }

Var all_reduce(Var x) {
  if (tr().options().tp_degree == 1) return x;
  return tr().emit(OpKind::AllReduce, {x});
}

Var all_gather(Var x, int dim) {
  int d = norm_axis(x, dim, "all_gather");
  if (tr().options().tp_degree == 1) return x;
  Attrs a;
  a.set("dim", static_cast<std::int64_t>(d)).set("parts", static_cast<std::int64_t>(tr().options().tp_degree));
  return tr().emit(OpKind::AllGather, {x}, a);
}

}  // namespace devpipe::F
