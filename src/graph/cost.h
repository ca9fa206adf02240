// Internal: the work a graph asks for — floating-point operations and the bytes it must move —
// for roofline estimates (devpipe bench).
#pragma once

#include <cstdint>

#include "devpipe/graph.h"

namespace devpipe {

/// What one run of a graph costs, counted from its nodes' shapes.
struct GraphCost {
  /// Floating-point operations: 2 per multiply-add in Linear, Matmul and Conv2d (plus 1 per
  /// output for a bias and 1 per output for a fused activation); attention: both matmuls plus 5
  /// per (query, key) pair for the softmax, masks not discounted (masked_attention's key mask
  /// [B, C] bounds the keys to C); 1 per input element for
  /// pooling and the reductions (Sum, Mean, ArgMax); 1 per output element for the elementwise
  /// ops (Add, Sub, Mul, Div, Neg, the scalar ops, Exp, Tanh, Sigmoid, Relu, Gelu, Silu, Where,
  /// MaskedFill) and AllReduce; 3 per output element for RotaryEmbedding; 5 per element for
  /// Softmax, LayerNorm and RmsNorm and per logit for Sample; 0 for data movement and
  /// constants (Reshape, Permute, Concat, Slice, Embedding, IndexSelect, Gather, AllGather,
  /// StateWrite, Full, Arange).
  double flops = 0;
  std::uint64_t param_bytes = 0;         ///< the parameters read (each distinct value once)
  std::uint64_t input_bytes = 0;         ///< the graph inputs read
  std::uint64_t output_bytes = 0;        ///< the graph outputs written
  std::uint64_t intermediate_bytes = 0;  ///< every other node output (could be fused away)

  /// Bytes a run must move at least: parameters + inputs + outputs (intermediates inside one
  /// graph are not counted: a fused kernel need not materialise them).
  std::uint64_t min_bytes() const { return param_bytes + input_bytes + output_bytes; }
  GraphCost& operator+=(const GraphCost& o);
};

/// Counts `graph`'s FLOPs and bytes (see GraphCost). Values are per rank: a graph traced at
/// tp_degree > 1 has per-rank parameter shapes.
GraphCost graph_cost(const Graph& graph);

}  // namespace devpipe
