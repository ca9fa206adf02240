// Internal: runs a graph with the ops' reference implementations (tests, validation).
#pragma once

#include <vector>

#include "devpipe/graph.h"
#include "devpipe/tensor.h"
#include "graph/op_def.h"

namespace devpipe {

/// Runs `graph` on host tensors (inputs in graph.inputs order, params in graph.params order)
/// and returns the outputs. Collectives are the identity, so graphs with tp_degree > 1 are
/// rejected unless ctx says tp_degree 1. Throws ShapeError/DTypeError when an input does not
/// match the graph.
std::vector<Tensor> run_reference(const Graph& graph, const std::vector<Tensor>& inputs,
                                  const std::vector<Tensor>& params, const RefContext& ctx = {});

}  // namespace devpipe
