// Binary arithmetic Add, Mul, Sub, Div (broadcasting), the unary ops Gelu, Silu, Relu, Exp, Tanh,
// Sigmoid, Neg, the scalar ops AddScalar/MulScalar, and the selections Where and MaskedFill.
#include <cmath>
#include <cstring>
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
std::vector<ValueInfo> infer_sub(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_binary("sub", in);
}
std::vector<ValueInfo> infer_div(const std::vector<ValueInfo>& in, const Attrs&) {
  if (!is_floating(in[0].dtype)) {
    throw DTypeError("div: needs floating-point operands (true division), got " +
                     std::string(dtype_name(in[0].dtype)));
  }
  return infer_binary("div", in);
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
std::vector<ValueInfo> infer_exp(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_unary("exp", in);
}
std::vector<ValueInfo> infer_tanh(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_unary("tanh", in);
}
std::vector<ValueInfo> infer_sigmoid(const std::vector<ValueInfo>& in, const Attrs&) {
  return infer_unary("sigmoid", in);
}
std::vector<ValueInfo> infer_neg(const std::vector<ValueInfo>& in, const Attrs&) {
  return {in[0]};
}

// An int64 operand takes only integral scalars (the result stays exact integer arithmetic).
void check_scalar(const char* op, DType dtype, double value) {
  if (dtype == DType::Int64 && (!std::isfinite(value) || value != std::trunc(value) ||
                                std::fabs(value) > 9.2e18)) {
    throw DTypeError(std::string(op) + ": an int64 tensor takes an integral value, got " +
                     std::to_string(value));
  }
}

std::vector<ValueInfo> infer_add_scalar(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  check_scalar("add_scalar", in[0].dtype, attrs.f("value"));
  return {in[0]};
}
std::vector<ValueInfo> infer_mul_scalar(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  check_scalar("mul_scalar", in[0].dtype, attrs.f("value"));
  return {in[0]};
}

std::vector<ValueInfo> infer_where(const std::vector<ValueInfo>& in, const Attrs&) {
  if (in[0].dtype != DType::Int64) {
    throw DTypeError("where: the condition must be int64 (nonzero: true), got " +
                     std::string(dtype_name(in[0].dtype)));
  }
  if (in[1].dtype != in[2].dtype) {
    throw DTypeError("where: the operands have dtypes " + std::string(dtype_name(in[1].dtype)) +
                     " and " + std::string(dtype_name(in[2].dtype)));
  }
  Shape s = broadcast_shapes("where", in[0].shape, in[1].shape);
  return {{broadcast_shapes("where", s, in[2].shape), in[1].dtype}};
}

std::vector<ValueInfo> infer_masked_fill(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  if (in[1].dtype != DType::Int64) {
    throw DTypeError("masked_fill: the mask must be int64 (nonzero: fill), got " +
                     std::string(dtype_name(in[1].dtype)));
  }
  if (!(broadcast_shapes("masked_fill", in[0].shape, in[1].shape) == in[0].shape)) {
    throw ShapeError("masked_fill: mask " + in[1].shape.to_string() +
                     " does not broadcast to the input " + in[0].shape.to_string());
  }
  check_scalar("masked_fill", in[0].dtype, attrs.f("value"));
  return {in[0]};
}


// ---- reference ----

void store(Tensor& out, const std::vector<float>& v) {
  out.copy_from(Tensor::from_vector(v, out.shape(), out.dtype()));
}

enum class Arith { Add, Mul, Sub, Div };

template <Arith kOp>
void ref_binary(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
                const RefContext&) {
  const Shape& os = out[0].shape();
  const auto ia = broadcast_index(in[0].shape(), os);
  const auto ib = broadcast_index(in[1].shape(), os);
  const std::size_t n = static_cast<std::size_t>(os.numel());
  if (out[0].dtype() == DType::Int64) {  // exact (wrapping) integer arithmetic
    const std::int64_t* a = in[0].data<std::int64_t>();
    const std::int64_t* b = in[1].data<std::int64_t>();
    std::int64_t* y = out[0].data<std::int64_t>();
    for (std::size_t i = 0; i < n; ++i) {
      const auto x0 = static_cast<std::uint64_t>(a[ia[i]]), x1 = static_cast<std::uint64_t>(b[ib[i]]);
      std::uint64_t r = 0;
      switch (kOp) {
        case Arith::Add:
          r = x0 + x1;
          break;
        case Arith::Mul:
          r = x0 * x1;
          break;
        case Arith::Sub:
          r = x0 - x1;
          break;
        case Arith::Div:  // rejected by inference
          break;
      }
      y[i] = static_cast<std::int64_t>(r);
    }
    return;
  }
  const auto a = in[0].to_float_vector();
  const auto b = in[1].to_float_vector();
  std::vector<float> y(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double x0 = a[static_cast<std::size_t>(ia[i])], x1 = b[static_cast<std::size_t>(ib[i])];
    double r = 0;
    switch (kOp) {
      case Arith::Add:
        r = x0 + x1;
        break;
      case Arith::Mul:
        r = x0 * x1;
        break;
      case Arith::Sub:
        r = x0 - x1;
        break;
      case Arith::Div:
        r = x0 / x1;
        break;
    }
    y[i] = static_cast<float>(r);
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

void ref_exp(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
             const RefContext&) {
  unary(in[0], out[0], [](double v) { return std::exp(v); });
}
void ref_tanh(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
              const RefContext&) {
  unary(in[0], out[0], [](double v) { return std::tanh(v); });
}
void ref_sigmoid(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
                 const RefContext&) {
  unary(in[0], out[0], [](double v) { return 1.0 / (1.0 + std::exp(-v)); });
}

// y = x * scale + shift: exact (wrapping) integers for int64, else double math rounded once.
void affine(const Tensor& x, Tensor& out, double scale, double shift) {
  if (x.dtype() == DType::Int64) {
    const std::int64_t* a = x.data<std::int64_t>();
    std::int64_t* y = out.data<std::int64_t>();
    const auto s = static_cast<std::uint64_t>(static_cast<std::int64_t>(scale));
    const auto t = static_cast<std::uint64_t>(static_cast<std::int64_t>(shift));
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      y[i] = static_cast<std::int64_t>(static_cast<std::uint64_t>(a[i]) * s + t);
    }
    return;
  }
  unary(x, out, [scale, shift](double v) { return v * scale + shift; });
}
void ref_neg(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
             const RefContext&) {
  affine(in[0], out[0], -1.0, 0.0);
}
void ref_add_scalar(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                    const RefContext&) {
  affine(in[0], out[0], 1.0, attrs.f("value"));
}
void ref_mul_scalar(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                    const RefContext&) {
  affine(in[0], out[0], attrs.f("value"), 0.0);
}

// Element selection copies bytes, so every dtype is exact.
void ref_where(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
               const RefContext&) {
  const Shape& os = out[0].shape();
  const auto ic = broadcast_index(in[0].shape(), os);
  const auto ia = broadcast_index(in[1].shape(), os);
  const auto ib = broadcast_index(in[2].shape(), os);
  const std::int64_t* c = in[0].data<std::int64_t>();
  const std::size_t es = dtype_size(out[0].dtype());
  const char* a = static_cast<const char*>(in[1].raw_data());
  const char* b = static_cast<const char*>(in[2].raw_data());
  char* y = static_cast<char*>(out[0].raw_data());
  for (std::size_t i = 0; i < ic.size(); ++i) {
    const char* src = c[ic[i]] != 0 ? a + static_cast<std::size_t>(ia[i]) * es
                                    : b + static_cast<std::size_t>(ib[i]) * es;
    std::memcpy(y + i * es, src, es);
  }
}

void ref_masked_fill(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                     const RefContext&) {
  const Shape& os = out[0].shape();
  const auto im = broadcast_index(in[1].shape(), os);
  const std::int64_t* m = in[1].data<std::int64_t>();
  const double value = attrs.f("value");
  if (out[0].dtype() == DType::Int64) {
    const std::int64_t* x = in[0].data<std::int64_t>();
    std::int64_t* y = out[0].data<std::int64_t>();
    for (std::size_t i = 0; i < im.size(); ++i) {
      y[i] = m[im[i]] != 0 ? static_cast<std::int64_t>(value) : x[i];
    }
    return;
  }
  auto v = in[0].to_float_vector();
  for (std::size_t i = 0; i < im.size(); ++i) {
    if (m[im[i]] != 0) v[i] = static_cast<float>(value);
  }
  store(out[0], v);
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
const OpDef kAdd{OpKind::Add, "add", 2, 2, infer_add, ref_binary<Arith::Add>};
const OpDef kMul{OpKind::Mul, "mul", 2, 2, infer_mul, ref_binary<Arith::Mul>};
const OpDef kSub{OpKind::Sub, "sub", 2, 2, infer_sub, ref_binary<Arith::Sub>};
const OpDef kDiv{OpKind::Div, "div", 2, 2, infer_div, ref_binary<Arith::Div>};
const OpDef kExp{OpKind::Exp, "exp", 1, 1, infer_exp, ref_exp};
const OpDef kTanh{OpKind::Tanh, "tanh", 1, 1, infer_tanh, ref_tanh};
const OpDef kSigmoid{OpKind::Sigmoid, "sigmoid", 1, 1, infer_sigmoid, ref_sigmoid};
const OpDef kNeg{OpKind::Neg, "neg", 1, 1, infer_neg, ref_neg};
const OpDef kAddScalar{OpKind::AddScalar, "add_scalar", 1, 1, infer_add_scalar, ref_add_scalar};
const OpDef kMulScalar{OpKind::MulScalar, "mul_scalar", 1, 1, infer_mul_scalar, ref_mul_scalar};
const OpDef kWhere{OpKind::Where, "where", 3, 3, infer_where, ref_where};
const OpDef kMaskedFill{OpKind::MaskedFill, "masked_fill", 2, 2, infer_masked_fill,
                        ref_masked_fill};
const OpDef kGelu{OpKind::Gelu, "gelu", 1, 1, infer_gelu, ref_gelu};
const OpDef kSilu{OpKind::Silu, "silu", 1, 1, infer_silu, ref_silu};
const OpDef kRelu{OpKind::Relu, "relu", 1, 1, infer_relu, ref_relu};
}  // namespace ops
}  // namespace devpipe
