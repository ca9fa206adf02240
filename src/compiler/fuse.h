// Internal: graph fusion passes run by compile() before a graph is written to the artifact.
#pragma once

#include "devpipe/graph.h"

namespace devpipe {

/// Folds an activation (relu, exact or tanh gelu, silu) into the Linear that feeds it, when the
/// Linear's result has no other reader and is not a graph output: the backends run it as the
/// matmul's post-op (oneDNN) or epilogue (cuBLASLt). Returns how many were fused. The graph's
/// outputs and results are unchanged; the fused activation's node is removed.
int fuse_linear_activations(Graph& graph);

}  // namespace devpipe
