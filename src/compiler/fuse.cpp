#include "compiler/fuse.h"

#include <vector>

#include "compiler/graph_edit.h"
#include "graph/op_def.h"

namespace devpipe {

int fuse_linear_activations(Graph& g) {
  ValueUses uses(g);
  std::vector<int>& readers = uses.readers;
  std::vector<int>& producer = uses.producer;

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
  if (fused > 0) erase_nodes(g, removed, fused);
  return fused;
}

int fuse_conv_global_avg_pool(Graph& g) {
  ValueUses uses(g);
  std::vector<bool> removed(g.nodes.size(), false);
  int fused = 0;
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    Node& pool = g.nodes[i];
    if (pool.op != OpKind::AdaptiveAvgPool2d ||
        pool.attrs.ints("output_size") != std::vector<std::int64_t>{1, 1}) {
      continue;
    }
    const int x = pool.inputs[0];
    const int p = uses.producer[static_cast<std::size_t>(x)];
    if (p < 0 || uses.readers[static_cast<std::size_t>(x)] != 1) continue;
    Node& conv = g.nodes[static_cast<std::size_t>(p)];
    if (conv.op != OpKind::Conv2d) continue;
    if (g.value(x).dtype != g.value(pool.outputs[0]).dtype) continue;
    conv.op = OpKind::Conv2dGlobalAvgPool;
    conv.outputs[0] = pool.outputs[0];  // the conv now produces the pooled value
    uses.producer[static_cast<std::size_t>(pool.outputs[0])] = p;
    removed[i] = true;
    ++fused;
  }
  if (fused > 0) erase_nodes(g, removed, fused);
  return fused;
}

}  // namespace devpipe
