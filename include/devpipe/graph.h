// devpipe — graph IR.
//
// A Graph is the traced form of one submodel for one static shape (bucket) and one tensor-
// parallel degree. All ranks share the same graph: sharded parameters have their per-rank
// (local) shape, and rank-dependent behaviour (a vocabulary offset, an input slice) is an
// attribute scaled by the rank at run time. Values are numbered; nodes are in topological order.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "devpipe/dtype.h"
#include "devpipe/shape.h"
#include "devpipe/tensor.h"

namespace devpipe {

/// Every op of the IR. Each is defined once (src/graph/ops/): attributes, shape and dtype
/// inference, and a reference implementation; each backend supplies kernels.
enum class OpKind {
  Linear,             // x[..., in], w[out, in], (b[out]) -> [..., out]; attr activation
  Matmul,             // a[..., M, K], b[..., K, N] (batch dims broadcast) -> [..., M, N]
  Conv2d,             // x[N, C, H, W], w[O, C/groups, kh, kw], (b[O]); stride/padding/dilation/groups
  AdaptiveAvgPool2d,  // x[N, C, H, W] -> [N, C, oh, ow]; output_size
  MaxPool2d,          // x[N, C, H, W]; kernel/stride/padding/dilation
  Embedding,          // idx[...] int64, w[V, D] -> [..., D]; vocab_per_rank (0: not sharded)
  LayerNorm,          // x, (w), (b); normalized_shape, eps
  RmsNorm,            // x, (w); normalized_shape, eps
  Reshape,            // shape
  Permute,            // dims
  Concat,             // n inputs; dim
  Slice,              // dim, start, end, step, rank_stride (start += rank * rank_stride)
  Add,                // broadcasting
  Mul,                // broadcasting
  Softmax,            // dim
  Gelu,               // approximate: "none" | "tanh"
  Silu,
  Relu,
  AllReduce,          // sum over ranks
  AllGather,          // concatenate the ranks' tensors along dim
  Sub,                // broadcasting a - b (int64 exact)
  Div,                // broadcasting a / b (floating)
  Exp,
  Tanh,
  Sigmoid,
  Neg,                // -x (int64 exact)
  AddScalar,          // x + value; attr value (integral for int64 x)
  MulScalar,          // x * value; attr value (integral for int64 x)
  Full,               // no inputs -> a constant; attrs shape, value, dtype
  Arange,             // no inputs -> [n] holding 0..n-1; attrs n, dtype
  Sum,                // over dims; attrs dims, keepdim
  Mean,               // over dims; attrs dims, keepdim
  ArgMax,             // index of the first maximum along dim -> int64; attrs dim, keepdim
  IndexSelect,        // x, index[n] int64 -> x with dim resized to n; attr dim
  Gather,             // x, index int64 (same rank) -> index's shape (torch.gather); attr dim
  Where,              // cond int64 (nonzero: a), a, b: all broadcast
  MaskedFill,         // x, mask int64 (nonzero: value) broadcast to x; attr value
  RotaryEmbedding,    // x[B, H, T, D], positions[B, T] int64; attr theta (HF rotate-half)
  ScaledDotProductAttention,  // q, k, v, (mask); attrs is_causal, (scale)
  MaskedAttention,    // q, k, v, q_positions[B, T], kv_lengths[B] (int64), (key_mask[B, C]
                      // int64: only keys j < C with a nonzero mask); attr (scale)
  StateWrite,         // state[B, ..., S, ...], values[b, ..., T, ...], positions[b, T] int64 ->
                      // the state with rows written in place (dim: the position dim); a
                      // position outside [0, S) writes nothing
  Sample,             // logits[B, V], params[B, 3] f32 (temperature, top_k, top_p), u[B] f32
                      // -> token ids [B] int64 (temperature <= 0: argmax)
  Conv2dGlobalAvgPool,  // Conv2d's inputs and attrs -> [N, O, 1, 1]: the conv, then its mean
                        // over H and W (made by the compiler's conv + pool fusion)
  ConvPatchMean,      // x[N, C, H, W] -> [N, C * kh * kw]: each filter tap's input window
                      // averaged over the conv's output positions; attrs kernel_size, stride,
                      // padding, dilation (made by the compiler's fold_linear_chains)
};

/// Number of OpKind values (for tables).
inline constexpr int kNumOpKinds = static_cast<int>(OpKind::ConvPatchMean) + 1;

std::string_view op_name(OpKind op);
/// Throws FormatError naming the text when it is not an op name.
OpKind op_from_name(std::string_view name);

/// An attribute value.
using AttrValue = std::variant<std::int64_t, double, std::string, std::vector<std::int64_t>>;

/// Named attributes of a node, with typed getters that throw FormatError naming the attribute
/// when it is missing or has another type.
class Attrs {
 public:
  Attrs() = default;
  Attrs& set(const std::string& name, AttrValue value) {
    items_[name] = std::move(value);
    return *this;
  }
  bool has(std::string_view name) const { return items_.find(std::string(name)) != items_.end(); }
  std::int64_t i(std::string_view name) const;
  std::int64_t i(std::string_view name, std::int64_t fallback) const;
  double f(std::string_view name) const;
  double f(std::string_view name, double fallback) const;
  const std::string& s(std::string_view name) const;
  std::string s(std::string_view name, const std::string& fallback) const;
  const std::vector<std::int64_t>& ints(std::string_view name) const;
  const std::map<std::string, AttrValue>& items() const { return items_; }
  /// "stride=[1, 1], groups=1".
  std::string to_string() const;

  friend bool operator==(const Attrs&, const Attrs&) = default;

 private:
  std::map<std::string, AttrValue> items_;
};

/// Shape and dtype of a value.
struct ValueInfo {
  Shape shape;
  DType dtype = DType::Float32;
  friend bool operator==(const ValueInfo&, const ValueInfo&) = default;
};

/// One op application.
struct Node {
  OpKind op = OpKind::Add;
  std::vector<int> inputs;   // value ids
  std::vector<int> outputs;  // value ids
  Attrs attrs;
  std::string scope;  // module path that emitted it ("encoder.layers.0.fc1"), for messages
};

/// A graph input: a runtime argument of the stage (Data), or a state (State): a buffer that
/// lives on the rank's device across runs, owned by the application and shared by name between
/// its stages (a KV cache, a latent). Its value's shape and dtype are the per-rank ones. A
/// graph reads a state through its value and updates it in place with StateWrite, whose
/// output aliases the state buffer; states come after every data input.
struct GraphInput {
  enum class Kind { Data, State };
  int value = -1;
  std::string name;  // "x", "vision_features", "layers.0.k_cache", ...
  Kind kind = Kind::Data;
  bool is_state() const { return kind == Kind::State; }
};

/// A parameter: a weight bound at load time from the artifact.
struct GraphParam {
  int value = -1;
  std::string key;        // checkpoint key exactly as PyTorch names it ("fc.weight")
  Shape full_shape;       // unsharded shape in the checkpoint
  int shard_dim = -1;     // -1: replicated; else split into tp_degree equal parts on this dim
  /// A module buffer (nn::Module::register_buffer, not persistent): its value comes from the
  /// model (Graph::constants), not from the checkpoint, and is baked into the artifact's
  /// weight files; always replicated.
  bool constant = false;
};

/// A traced graph.
struct Graph {
  std::vector<ValueInfo> values;
  std::vector<Node> nodes;
  std::vector<GraphInput> inputs;
  std::vector<GraphParam> params;
  std::vector<int> outputs;
  int tp_degree = 1;
  /// Host values of the constant params by key, in the params' dtype, as traced. Not part of
  /// the graph text/JSON: a compiled artifact stores them in its weight files.
  std::map<std::string, Tensor> constants;

  int add_value(ValueInfo info) {
    values.push_back(std::move(info));
    return static_cast<int>(values.size()) - 1;
  }
  const ValueInfo& value(int id) const { return values.at(static_cast<std::size_t>(id)); }

  /// Readable text form, one line per input, parameter, node and output.
  std::string to_text() const;
};

}  // namespace devpipe
