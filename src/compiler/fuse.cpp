#include "compiler/fuse.h"

#include <vector>

#include "graph/op_def.h"

namespace devpipe {

namespace {

/// Per value: how many nodes read it (a graph output counts as two readers, so it is never
/// fused away) and which node produces it (-1: an input or parameter).
struct Uses {
  std::vector<int> readers, producer;
  explicit Uses(const Graph& g)
      : readers(g.values.size(), 0), producer(g.values.size(), -1) {
    for (std::size_t i = 0; i < g.nodes.size(); ++i) {
      for (int in : g.nodes[i].inputs) ++readers[static_cast<std::size_t>(in)];
      for (int out : g.nodes[i].outputs) producer[static_cast<std::size_t>(out)] = static_cast<int>(i);
    }
    for (int out : g.outputs) readers[static_cast<std::size_t>(out)] += 2;
  }
};

/// Drops the nodes marked in `removed`.
void erase_nodes(Graph& g, const std::vector<bool>& removed, int count) {
  std::vector<Node> kept;
  kept.reserve(g.nodes.size() - static_cast<std::size_t>(count));
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    if (!removed[i]) kept.push_back(std::move(g.nodes[i]));
  }
  g.nodes = std::move(kept);
}

}  // namespace

int fuse_linear_activations(Graph& g) {
  Uses uses(g);
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
  Uses uses(g);
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
