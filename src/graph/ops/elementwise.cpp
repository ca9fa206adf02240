// Add, Mul (broadcasting) and the activations Gelu, Silu, Relu.
#include <cmath>
#include <numbers>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_binary(const char* op, const std::vector<ValueInfo>& in) {
  if (in[0].dtype != in[1].dtype) {
    throw DTypeError(std::string(op) + ": operands have dtypes " +
                     std::string(dtype_name(in[0].dtype)) + " and " +
                     std::string(dtype_name(in[1].dtype)));
  }
  return {{broadcast_shapes(op, in[0].shape, in[1].shape), in[0].dtype}};
}

std::vector<ValueInfo> infer_add(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_binary("add", in);
}
std::vector<ValueInfo> infer_mul(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_binary("mul", in);
}

std::vector<ValueInfo> infer_unary(const char* op, const std::vector<ValueInfo>& in) {
  if (!is_floating(in[0].dtype)) {
    throw DTypeError(std::string(op) + ": needs a floating-point input, got " +
                     std::string(dtype_name(in[0].dtype)));
  }
  return {in[0]};
}

std::vector<ValueInfo> infer_gelu(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  auto a = attrs.s("approximate", "none");
  if (a != "none" && a != "tanh") {
    throw FormatError("gelu: approximate must be 'none' or 'tanh', got '" + a + "'");
  }
  return infer_unary("gelu", in);
}
std::vector<ValueInfo> infer_silu(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_unary("silu", in);
}
std::vector<ValueInfo> infer_relu(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_unary("relu", in);
}


// ---- reference ----

void store(Tensor& out, const std::vector<float>& v) {
  out.copy_from(Tensor::from_vector(v, out.shape(), out.dtype()));
}

// For each output element, the flat index into an operand of shape `s` broadcast to `os`.
std::vector<std::int64_t> broadcast_index(const Shape& s, const Shape& os) {
  const int r = os.rank(), off = os.rank() - s.rank();
  std::vector<std::int64_t> map(static_cast<std::size_t>(os.numel()));
  std::vector<std::int64_t> idx(static_cast<std::size_t>(r));
  for (std::int64_t o = 0; o < os.numel(); ++o) {
    std::int64_t rem = o;
    for (int i = r - 1; i >= 0; --i) {
      idx[static_cast<std::size_t>(i)] = rem % os[static_cast<std::size_t>(i)];
      rem /= os[static_cast<std::size_t>(i)];
    }
    std::int64_t src = 0;
    for (int i = 0; i < s.rank(); ++i) {
      const std::int64_t d = s[static_cast<std::size_t>(i)];
      src = src * d + (d == 1 ? 0 : idx[static_cast<std::size_t>(off + i)]);
    }
    map[static_cast<std::size_t>(o)] = src;
  }
  return map;
}

template <bool kMul>
void ref_binary(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
                const RefContext&) {
  const Shape& os = out[0].shape();
  const auto ia = broadcast_index(in[0].shape(), os);
  const auto ib = broadcast_index(in[1].shape(), os);
  const std::size_t n = static_cast<std::size_t>(os.numel());
  if (out[0].dtype() == DType::Int64) {  // exact integer arithmetic
    const std::int64_t* a = in[0].data<std::int64_t>();
    const std::int64_t* b = in[1].data<std::int64_t>();
    std::int64_t* y = out[0].data<std::int64_t>();
    for (std::size_t i = 0; i < n; ++i) y[i] = kMul ? a[ia[i]] * b[ib[i]] : a[ia[i]] + b[ib[i]];
    return;
  }
  const auto a = in[0].to_float_vector();
  const auto b = in[1].to_float_vector();
  std::vector<float> y(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double x0 = a[static_cast<std::size_t>(ia[i])], x1 = b[static_cast<std::size_t>(ib[i])];
    y[i] = static_cast<float>(kMul ? x0 * x1 : x0 + x1);
  }
  store(out[0], y);
}

template <class Fn>
void unary(const Tensor& x, Tensor& out, Fn fn) {
  auto v = x.to_float_vector();
  for (auto& e : v) e = static_cast<float>(fn(static_cast<double>(e)));
  store(out, v);
}

void ref_gelu(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
              const RefContext&) {
  if (attrs.s("approximate", "none") == "tanh") {
    const double k = std::sqrt(2.0 / std::numbers::pi);
    unary(in[0], out[0], [k](double v) {
      return 0.5 * v * (1.0 + std::tanh(k * (v + 0.044715 * v * v * v)));
    });
  } else {
    unary(in[0], out[0], [](double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); });
  }
}

void ref_silu(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
              const RefContext&) {
  unary(in[0], out[0], [](double v) { return v / (1.0 + std::exp(-v)); });
}

void ref_relu(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
              const RefContext&) {
  unary(in[0], out[0], [](double v) { return std::isnan(v) ? v : (v > 0 ? v : 0.0); });
}

}  // namespace

std::string activation_attr_of(const Node& node) {
  switch (node.op) {
    case OpKind::Relu:
      return "relu";
    case OpKind::Silu:
      return "silu";
    case OpKind::Gelu:
      return node.attrs.s("approximate", "none") == "tanh" ? "gelu_tanh" : "gelu";
    default:
      return "";
  }
}

namespace ops {
const OpDef kAdd{OpKind::Add, "add", 2, 2, infer_add, ref_binary<false>};
const OpDef kMul{OpKind::Mul, "mul", 2, 2, infer_mul, ref_binary<true>};
const OpDef kGelu{OpKind::Gelu, "gelu", 1, 1, infer_gelu, ref_gelu};
const OpDef kSilu{OpKind::Silu, "silu", 1, 1, infer_silu, ref_silu};
const OpDef kRelu{OpKind::Relu, "relu", 1, 1, infer_relu, ref_relu};
}  // namespace ops
}  // namespace devpipe
