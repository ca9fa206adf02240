#include "graph/reference.h"

#include <string>

#include "devpipe/error.h"

namespace devpipe {

namespace {

std::string info_string(const Shape& shape, DType dtype) {
  return shape.to_string() + " " + std::string(dtype_name(dtype));
}

// Checks one bound tensor against the graph's value; `what` names it ("input 'x'").
void check_bound(const Graph& graph, int value, const Tensor& t, const std::string& what) {
  const ValueInfo& info = graph.value(value);
  if (!t.defined()) throw InvalidArgument("run_reference: " + what + " is an undefined tensor");
  if (t.shape() != info.shape) {
    throw ShapeError("run_reference: " + what + " has shape " + info_string(t.shape(), t.dtype()) +
                     ", the graph expects " + info_string(info.shape, info.dtype));
  }
  if (t.dtype() != info.dtype) {
    throw DTypeError("run_reference: " + what + " has dtype " + std::string(dtype_name(t.dtype())) +
                     ", the graph expects " + std::string(dtype_name(info.dtype)));
  }
}

}  // namespace

std::vector<Tensor> run_reference(const Graph& graph, const std::vector<Tensor>& inputs,
                                  const std::vector<Tensor>& params, const RefContext& ctx) {
  if (graph.tp_degree > 1 && ctx.tp_degree != 1) {
    throw Unsupported("run_reference: the graph is traced for tp_degree " +
                      std::to_string(graph.tp_degree) +
                      " and the reference runs collectives only as the identity; pass a "
                      "RefContext with tp_degree 1");
  }
  if (ctx.rank < 0) throw InvalidArgument("run_reference: negative rank " + std::to_string(ctx.rank));
  if (inputs.size() != graph.inputs.size()) {
    throw InvalidArgument("run_reference: got " + std::to_string(inputs.size()) +
                          " inputs, the graph has " + std::to_string(graph.inputs.size()));
  }
  if (params.size() != graph.params.size()) {
    throw InvalidArgument("run_reference: got " + std::to_string(params.size()) +
                          " parameters, the graph has " + std::to_string(graph.params.size()));
  }

  std::vector<Tensor> values(graph.values.size());
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const GraphInput& gi = graph.inputs[i];
    std::string what = "input " + std::to_string(i) + " '" + gi.name + "'";
    check_bound(graph, gi.value, inputs[i], what);
    values.at(static_cast<std::size_t>(gi.value)) = inputs[i].to_host();
  }
  for (std::size_t i = 0; i < params.size(); ++i) {
    const GraphParam& gp = graph.params[i];
    std::string what = "parameter " + std::to_string(i) + " '" + gp.key + "'";
    check_bound(graph, gp.value, params[i], what);
    values.at(static_cast<std::size_t>(gp.value)) = params[i].to_host();
  }

  for (std::size_t n = 0; n < graph.nodes.size(); ++n) {
    const Node& node = graph.nodes[n];
    const OpDef& def = op_def(node.op);
    std::string where = "run_reference: node " + std::to_string(n) + " (" + def.name +
                        (node.scope.empty() ? std::string() : " in " + node.scope) + ")";
    if (!def.reference) {
      throw Unsupported(where + ": op has no reference implementation");
    }
    std::vector<Tensor> in;
    in.reserve(node.inputs.size());
    for (int id : node.inputs) {
      const Tensor& t = values.at(static_cast<std::size_t>(id));
      if (!t.defined()) {
        throw StateError(where + ": input value " + std::to_string(id) +
                         " is used before it is computed");
      }
      in.push_back(t);
    }
    std::vector<Tensor> out;
    out.reserve(node.outputs.size());
    for (int id : node.outputs) {
      const ValueInfo& info = graph.value(id);
      out.push_back(Tensor::empty(info.shape, info.dtype));
    }
    def.reference(in, out, node.attrs, ctx);
    for (std::size_t k = 0; k < node.outputs.size(); ++k) {
      values.at(static_cast<std::size_t>(node.outputs[k])) = std::move(out[k]);
    }
  }

  std::vector<Tensor> result;
  result.reserve(graph.outputs.size());
  for (int id : graph.outputs) {
    const Tensor& t = values.at(static_cast<std::size_t>(id));
    if (!t.defined()) {
      throw StateError("run_reference: output value " + std::to_string(id) + " is never computed");
    }
    // A graph output that is an input or a parameter is returned as a copy, not an alias.
    bool computed = false;
    for (const Node& node : graph.nodes) {
      for (int o : node.outputs) computed = computed || o == id;
    }
    result.push_back(computed ? t : t.clone());
  }
  return result;
}

}  // namespace devpipe
