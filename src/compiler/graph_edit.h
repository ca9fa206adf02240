// Internal: what the compiler's graph passes (fuse.cpp, fold.cpp) need to edit a graph.
#pragma once

#include <cstddef>
#include <vector>

#include "devpipe/graph.h"

namespace devpipe {

/// Per value: how many nodes read it (a graph output counts as two readers, so a pass never
/// removes it) and which node produces it (-1: an input or parameter).
struct ValueUses {
  std::vector<int> readers, producer;
  explicit ValueUses(const Graph& g) : readers(g.values.size(), 0), producer(g.values.size(), -1) {
    for (std::size_t i = 0; i < g.nodes.size(); ++i) {
      for (int in : g.nodes[i].inputs) ++readers[static_cast<std::size_t>(in)];
      for (int out : g.nodes[i].outputs) producer[static_cast<std::size_t>(out)] = static_cast<int>(i);
    }
    for (int out : g.outputs) readers[static_cast<std::size_t>(out)] += 2;
  }
  int readers_of(int value) const { return readers[static_cast<std::size_t>(value)]; }
  int producer_of(int value) const { return producer[static_cast<std::size_t>(value)]; }
};

/// Drops the nodes marked in `removed` (`count` of them), keeping the others' order.
inline void erase_nodes(Graph& g, const std::vector<bool>& removed, int count) {
  std::vector<Node> kept;
  kept.reserve(g.nodes.size() - static_cast<std::size_t>(count));
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    if (!removed[i]) kept.push_back(std::move(g.nodes[i]));
  }
  g.nodes = std::move(kept);
}

}  // namespace devpipe
