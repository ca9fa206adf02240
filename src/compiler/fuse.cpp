#include "compiler/fuse.h"

#include <vector>

#include "graph/op_def.h"

namespace devpipe {

int fuse_linear_activations(Graph& g) {
  const std::size_t nv = g.values.size();
  std::vector<int> readers(nv, 0), producer(nv, -1);
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    for (int in : g.nodes[i].inputs) ++readers[static_cast<std::size_t>(in)];
    for (int out : g.nodes[i].outputs) producer[static_cast<std::size_t>(out)] = static_cast<int>(i);
  }
  for (int out : g.outputs) readers[static_cast<std::size_t>(out)] += 2;  // never fuse away an output

  std::vector<bool> removed(g.nodes.size(), false);
  int fused = 0;
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    Node& act = g.nodes[i];
    std::string name = activation_attr_of(act);
    if (name.empty()) continue;
    int x = act.inputs[0];
    int p = producer[static_cast<std::size_t>(x)];
    if (p < 0 || readers[static_cast<std::size_t>(x)] != 1) continue;
    Node& lin = g.nodes[static_cast<std::size_t>(p)];
    if (lin.op != OpKind::Linear || lin.attrs.s("activation", "none") != "none") continue;
    if (g.value(x).dtype != g.value(act.outputs[0]).dtype) continue;
    lin.attrs.set("activation", name);
    lin.outputs[0] = act.outputs[0];  // the Linear now produces the activation's value
    producer[static_cast<std::size_t>(act.outputs[0])] = p;
    removed[i] = true;
    ++fused;
  }
  if (fused == 0) return 0;
  std::vector<Node> kept;
  kept.reserve(g.nodes.size() - static_cast<std::size_t>(fused));
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    if (!removed[i]) kept.push_back(std::move(g.nodes[i]));
  }
  g.nodes = std::move(kept);
  return fused;
}

}  // namespace devpipe
