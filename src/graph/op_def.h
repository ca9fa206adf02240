// Internal: the single definition of each op.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "devpipe/graph.h"
#include "devpipe/tensor.h"

namespace devpipe {

/// Context an op's reference implementation may need (rank-dependent attributes).
struct RefContext {
  int rank = 0;
  int tp_degree = 1;
};

/// Shape/dtype inference: returns the output infos or throws ShapeError/DTypeError whose
/// message names the op and the shapes involved (the tracer prefixes the module path).
using InferFn = std::vector<ValueInfo> (*)(const std::vector<ValueInfo>& inputs, const Attrs& attrs);

/// Reference implementation on host tensors: `outputs` are preallocated with the inferred
/// shapes and dtypes. Plain loops in float (double accumulation where it matters); bfloat16 and
/// float16 values are widened to float and rounded back on store.
using ReferenceFn = void (*)(const std::vector<Tensor>& inputs, std::vector<Tensor>& outputs,
                             const Attrs& attrs, const RefContext& ctx);

struct OpDef {
  OpKind op;
  const char* name;
  int min_inputs;
  int max_inputs;  // -1: any
  InferFn infer;
  ReferenceFn reference;  // nullptr for ops only meaningful across ranks at tp > 1
};

/// The definition of `op`.
const OpDef& op_def(OpKind op);

/// Runs inference with arity checks; messages start with the op name.
std::vector<ValueInfo> infer_op(OpKind op, const std::vector<ValueInfo>& inputs, const Attrs& attrs);

// Registration tables, one per family file (src/graph/ops/<family>.cpp).
namespace ops {
extern const OpDef kLinear, kMatmul;
extern const OpDef kConv2d, kConv2dGlobalAvgPool, kConvPatchMean;
extern const OpDef kAdaptiveAvgPool2d, kMaxPool2d;
extern const OpDef kEmbedding;
extern const OpDef kLayerNorm, kRmsNorm;
extern const OpDef kReshape, kPermute, kConcat, kSlice;
extern const OpDef kAdd, kMul, kGelu, kSilu, kRelu;
extern const OpDef kSoftmax;
extern const OpDef kAllReduce, kAllGather;
extern const OpDef kSub, kDiv, kExp, kTanh, kSigmoid, kNeg, kAddScalar, kMulScalar, kWhere,
    kMaskedFill;
extern const OpDef kFull, kArange;
extern const OpDef kSum, kMean, kArgMax;
extern const OpDef kIndexSelect, kGather;
extern const OpDef kRotaryEmbedding, kScaledDotProductAttention, kMaskedAttention;
extern const OpDef kStateWrite, kSample;
}  // namespace ops

/// StateWrite's row copy, shared by the reference and the cpu kernel: for row i < values[0]
/// and t < values[dim], state[i, ..., positions[i, t], ...] = values[i, ..., t, ...] when
/// 0 <= positions[i, t] < state[dim]; other positions write nothing. Plain bytes, any dtype.
void state_write_rows(void* state, const Shape& state_shape, const void* values, const Shape& values_shape,
                      const std::int64_t* positions, int dim, std::size_t elem_size);

/// Sample's choice for one row of V logits, shared by the reference and the cpu kernel.
/// temperature <= 0: the first maximum (greedy). Otherwise softmax(logits / temperature) over
/// the top_k best (top_k <= 0 or >= V: all; ties by lower index), cut to the shortest prefix
/// whose probability reaches top_p (top_p outside (0, 1): no cut), and the token at which the
/// prefix's cumulative probability first exceeds u * its total (u in [0, 1)).
/// `work`: V floats, `order`: V ints of scratch.
std::int64_t sample_row(const float* logits, std::int64_t V, float temperature, float top_k, float top_p, float u,
                        float* work, std::int32_t* order);

/// The Linear "activation" attribute equivalent to an activation node ("relu", "gelu",
/// "gelu_tanh", "silu"), or "" for any other node. Fusion and the kernels use this one mapping.
std::string activation_attr_of(const Node& node);

// Shared helpers for inference.
std::string shapes_to_string(const std::vector<ValueInfo>& infos);
/// All floating inputs share one dtype; throws DTypeError naming op and dtypes otherwise.
DType common_float_dtype(const char* op, const std::vector<ValueInfo>& infos);
/// Numpy/PyTorch broadcasting of two shapes; throws ShapeError naming both.
Shape broadcast_shapes(const char* op, const Shape& a, const Shape& b);
/// For each element of `out` (row-major), the flat index into an operand of shape `s`
/// broadcast to it (reference implementations).
std::vector<std::int64_t> broadcast_index(const Shape& s, const Shape& out);
/// A dim attribute in [0, rank); throws ShapeError naming the op, the dim and the shape.
std::int64_t checked_dim(const char* op, std::int64_t dim, const Shape& shape);
/// Rotary inverse frequency i of a head of `dim` elements: float32(1 / theta^(2i/dim)), computed
/// in double (the one definition the reference and the kernels share).
float rope_inv_freq(std::int64_t i, std::int64_t dim, double theta);
/// The attention scale: attr "scale" when set, else 1/sqrt(head_dim).
double attention_scale(const Attrs& attrs, std::int64_t head_dim);
/// Element strides of an attention mask of shape `mask` (rank <= 4) broadcast to the scores
/// [B, Hq, T, S]: 0 along broadcast dims.
std::array<std::int64_t, 4> attention_mask_strides(const Shape& mask);
/// The dtype named by attribute `name` ("float32", ...); FormatError naming it otherwise.
DType dtype_attr(const char* op, const Attrs& attrs, const char* name = "dtype");

}  // namespace devpipe
