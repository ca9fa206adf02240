// Internal: graph fusion passes run by compile() before a graph is written to the artifact.
#pragma once

#include "devpipe/graph.h"

namespace devpipe {

/// Folds an activation (relu, exact or tanh gelu, silu) into the Linear that feeds it, when the
/// Linear's result has no other reader and is not a graph output: the backends run it as the
/// matmul's post-op (oneDNN) or epilogue (cuBLASLt). Returns how many were fused. The graph's
/// outputs and results are unchanged; the fused activation's node is removed.
int fuse_linear_activations(Graph& graph);

/// Folds an AdaptiveAvgPool2d to (1, 1) into the Conv2d that feeds it (one
/// Conv2dGlobalAvgPool node), when the conv's result has no other reader and is not a graph
/// output: the cpu backend then reduces the conv's tiles into the pooled sums without writing
/// the conv's output. Returns how many were fused; the graph's results are unchanged up to
/// rounding (the sum runs in another order).
int fuse_conv_global_avg_pool(Graph& graph);

}  // namespace devpipe
