#include "runtime/run_graph.h"

#include "devpipe/error.h"
#include "runtime/backend.h"

namespace devpipe {

std::vector<Tensor> run_graph_once(Backend& backend, const Graph& graph,
                                   const std::vector<Tensor>& inputs,
                                   const std::vector<Tensor>& params) {
  if (inputs.size() != graph.inputs.size()) {
    throw InvalidArgument("run_graph_once: got " + std::to_string(inputs.size()) +
                          " inputs, the graph has " + std::to_string(graph.inputs.size()));
  }
  Device dev = backend.device_for_rank(0, 1);
  auto exe = backend.compile(graph, params, RankInfo{});
  std::vector<Tensor> dev_in;
  std::vector<const void*> in_ptrs;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const ValueInfo& info = graph.value(graph.inputs[i].value);
    if (inputs[i].shape() != info.shape || inputs[i].dtype() != info.dtype) {
      throw ShapeError("run_graph_once: input " + std::to_string(i) + " is " +
                       inputs[i].shape().to_string() + " " + std::string(dtype_name(inputs[i].dtype())) +
                       ", the graph expects " + info.shape.to_string() + " " +
                       std::string(dtype_name(info.dtype)));
    }
    Tensor t = backend.allocate(info.shape, info.dtype, dev);
    backend.copy(t.raw_data(), dev, inputs[i].raw_data(), inputs[i].device(), t.nbytes());
    in_ptrs.push_back(t.raw_data());
    dev_in.push_back(std::move(t));
  }
  std::vector<Tensor> dev_out;
  std::vector<void*> out_ptrs;
  for (int id : graph.outputs) {
    const ValueInfo& info = graph.value(id);
    Tensor t = backend.allocate(info.shape, info.dtype, dev);
    out_ptrs.push_back(t.raw_data());
    dev_out.push_back(std::move(t));
  }
  exe->run(in_ptrs, out_ptrs);
  std::vector<Tensor> host;
  for (auto& t : dev_out) {
    Tensor h = Tensor::empty(t.shape(), t.dtype());
    backend.copy(h.raw_data(), Device::cpu(), t.raw_data(), t.device(), h.nbytes());
    host.push_back(std::move(h));
  }
  return host;
}

}  // namespace devpipe
