// Internal: folding linear chains, the compile option RuntimeConfig::fold_linear_chains.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "devpipe/graph.h"
#include "devpipe/tensor.h"

namespace devpipe {

/// A parameter's full (unsharded) value on the host, any floating dtype.
using ParamValueFn = std::function<Tensor(const GraphParam&)>;

struct FoldCounts {
  int patch_means = 0;   // Conv2d + global average pool -> conv_patch_mean + Linear
  int linear_pairs = 0;  // Linear -> Linear -> one Linear
  int total() const { return patch_means + linear_pairs; }
};

/// Rewrites chains with nothing nonlinear between them, exactly in real arithmetic (the results
/// change by rounding only):
///  - Conv2d (groups 1) whose only reader is AdaptiveAvgPool2d to (1, 1): the pooled value is
///    W.reshape(O, C * kh * kw) @ conv_patch_mean(x) + b, the mean of each filter tap's input
///    window computed once (C * kh * kw numbers per image instead of the conv's O * H * W
///    outputs). Only with `patch_means` (a backend that has the conv_patch_mean kernel).
///  - Linear(x, W1, b1) without activation whose only reader is another Linear(., W2, b2),
///    directly or through reshapes that give back the same shape: one Linear(x, W2 W1,
///    W2 b1 + b2) with the second one's activation, where that does not cost more
///    multiply-adds per row (k1 n2 <= k1 n1 + n1 n2).
/// Only replicated parameters are folded (not the shards of parallel layers), and only weights
/// and biases that are parameters. The folded weights are computed in double from
/// `value_of` (or the constants they derive from) and become constant parameters keyed
/// "folded:<key of the weight they replace>", rounded once to the parameter dtype; parameters
/// no node reads any more are dropped from the graph.
FoldCounts fold_linear_chains(Graph& graph, const ParamValueFn& value_of, bool patch_means);

}  // namespace devpipe
