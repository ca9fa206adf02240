// FLOP and byte counts of a graph (see cost.h).
#include "graph/cost.h"

#include <set>

#include "graph/op_def.h"

namespace devpipe {
namespace {

double numel(const ValueInfo& v) { return static_cast<double>(v.shape.numel()); }

std::uint64_t bytes(const ValueInfo& v) {
  return static_cast<std::uint64_t>(v.shape.numel()) * dtype_size(v.dtype);
}

/// Attention on q [..., T, D], k [..., S, D], v [..., S, Dv]: the two matmuls and the softmax
/// over every (query, key) pair (a causal or padding mask is not discounted).
double attention_flops(const Graph& g, const Node& n) {
  const Shape& q = g.value(n.inputs.at(0)).shape;
  const Shape& k = g.value(n.inputs.at(1)).shape;
  const Shape& v = g.value(n.inputs.at(2)).shape;
  const double t = static_cast<double>(q.dim(-2)), d = static_cast<double>(q.dim(-1));
  // masked_attention with a key mask [B, C] reads only the cache's first C keys.
  const bool key_mask = n.op == OpKind::MaskedAttention && n.inputs.size() == 6;
  const double s = static_cast<double>(key_mask ? g.value(n.inputs[5]).shape.dim(-1) : k.dim(-2));
  const double dv = static_cast<double>(v.dim(-1));
  const double heads = static_cast<double>(q.numel()) / (t * d);
  return heads * t * s * (2 * d + 2 * dv + 5);
}

double node_flops(const Graph& g, const Node& n) {
  const ValueInfo& out = g.value(n.outputs.at(0));
  auto in0 = [&]() -> const ValueInfo& { return g.value(n.inputs.at(0)); };
  switch (n.op) {
    case OpKind::Linear: {
      const double k = static_cast<double>(in0().shape.dim(-1));
      double f = 2.0 * numel(out) * k;
      if (n.inputs.size() == 3) f += numel(out);
      if (n.attrs.s("activation", "none") != "none") f += numel(out);
      return f;
    }
    case OpKind::Matmul:
      return 2.0 * numel(out) * static_cast<double>(in0().shape.dim(-1));
    case OpKind::Conv2d: {
      const Shape& w = g.value(n.inputs.at(1)).shape;  // [O, C/groups, kh, kw]
      double f = 2.0 * numel(out) * static_cast<double>(w[1] * w[2] * w[3]);
      if (n.inputs.size() == 3) f += numel(out);
      return f;
    }
    case OpKind::Conv2dGlobalAvgPool: {  // the conv's FLOPs on its whole output, then the pool's
      std::vector<ValueInfo> conv_in;
      for (int v : n.inputs) conv_in.push_back(g.value(v));
      const double conv_out = numel(infer_op(OpKind::Conv2d, conv_in, n.attrs).at(0));
      const Shape& w = g.value(n.inputs.at(1)).shape;
      double f = 2.0 * conv_out * static_cast<double>(w[1] * w[2] * w[3]) + conv_out;
      if (n.inputs.size() == 3) f += conv_out;
      return f;
    }
    case OpKind::ConvPatchMean: {  // one add per tap and output position, then a divide
      const auto& k = n.attrs.ints("kernel_size");
      const Shape& x = in0().shape;
      return static_cast<double>(x.numel()) * static_cast<double>(k[0] * k[1]) + numel(out);
    }
    case OpKind::AdaptiveAvgPool2d:
    case OpKind::MaxPool2d:
    case OpKind::Sum:
    case OpKind::Mean:
    case OpKind::ArgMax:
      return numel(in0());
    case OpKind::Add:
    case OpKind::Mul:
    case OpKind::Sub:
    case OpKind::Div:
    case OpKind::Neg:
    case OpKind::AddScalar:
    case OpKind::MulScalar:
    case OpKind::Exp:
    case OpKind::Tanh:
    case OpKind::Sigmoid:
    case OpKind::Gelu:
    case OpKind::Silu:
    case OpKind::Relu:
    case OpKind::Where:
    case OpKind::MaskedFill:
    case OpKind::AllReduce:
      return numel(out);
    case OpKind::RotaryEmbedding:
      return 3.0 * numel(out);
    case OpKind::Softmax:
    case OpKind::LayerNorm:
    case OpKind::RmsNorm:
      return 5.0 * numel(out);
    case OpKind::Sample:  // a softmax over the logits, nominally (top-k/top-p selection not counted)
      return 5.0 * numel(in0());
    case OpKind::ScaledDotProductAttention:
    case OpKind::MaskedAttention:
      return attention_flops(g, n);
    case OpKind::Embedding:
    case OpKind::Reshape:
    case OpKind::Permute:
    case OpKind::Concat:
    case OpKind::Slice:
    case OpKind::AllGather:
    case OpKind::IndexSelect:
    case OpKind::Gather:
    case OpKind::Full:
    case OpKind::Arange:
    case OpKind::StateWrite:
      return 0;
  }
  return 0;
}

}  // namespace

GraphCost& GraphCost::operator+=(const GraphCost& o) {
  flops += o.flops;
  param_bytes += o.param_bytes;
  input_bytes += o.input_bytes;
  output_bytes += o.output_bytes;
  intermediate_bytes += o.intermediate_bytes;
  return *this;
}

GraphCost graph_cost(const Graph& graph) {
  GraphCost c;
  std::set<int> outputs(graph.outputs.begin(), graph.outputs.end());
  for (const GraphParam& p : graph.params) c.param_bytes += bytes(graph.value(p.value));
  for (const GraphInput& in : graph.inputs) c.input_bytes += bytes(graph.value(in.value));
  for (int o : outputs) c.output_bytes += bytes(graph.value(o));
  for (const Node& n : graph.nodes) {
    c.flops += node_flops(graph, n);
    for (int o : n.outputs) {
      if (!outputs.count(o)) c.intermediate_bytes += bytes(graph.value(o));
    }
  }
  return c;
}

}  // namespace devpipe
