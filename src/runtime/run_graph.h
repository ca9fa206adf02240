// Internal: run one graph once on a backend (tests, tools). Not the pipeline path.
#pragma once

#include <vector>

#include "devpipe/graph.h"
#include "devpipe/tensor.h"

namespace devpipe {

class Backend;
class Communicator;

/// Compiles `graph` for rank 0 of 1 on `backend`, runs it on host `inputs` (graph.inputs
/// order) with `params` (graph.params order) and returns host copies of the outputs.
std::vector<Tensor> run_graph_once(Backend& backend, const Graph& graph,
                                   const std::vector<Tensor>& inputs,
                                   const std::vector<Tensor>& params);

}  // namespace devpipe
