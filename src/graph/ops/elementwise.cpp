// Add, Mul (broadcasting) and the activations Gelu, Silu, Relu.
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

}  // namespace

namespace ops {
const OpDef kAdd{OpKind::Add, "add", 2, 2, infer_add, nullptr};
const OpDef kMul{OpKind::Mul, "mul", 2, 2, infer_mul, nullptr};
const OpDef kGelu{OpKind::Gelu, "gelu", 1, 1, infer_gelu, nullptr};
const OpDef kSilu{OpKind::Silu, "silu", 1, 1, infer_silu, nullptr};
const OpDef kRelu{OpKind::Relu, "relu", 1, 1, infer_relu, nullptr};
}  // namespace ops
}  // namespace devpipe
