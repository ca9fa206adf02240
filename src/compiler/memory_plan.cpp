#include "compiler/memory_plan.h"

#include <algorithm>
#include <numeric>

#include "devpipe/error.h"

namespace devpipe {

namespace {

std::size_t round_up(std::size_t n, std::size_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

/// A block of the arena: live from node `first` to node `last` inclusive.
struct Block {
  std::size_t bytes;
  int first;
  int last;
  std::size_t offset = 0;
};

/// First-fit placement, biggest blocks first; returns the arena size.
std::size_t place_blocks(std::vector<Block>& blocks, std::size_t alignment) {
  std::vector<std::size_t> order(blocks.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return blocks[a].bytes > blocks[b].bytes; });
  std::vector<std::size_t> placed;
  std::size_t total = 0;
  for (std::size_t bi : order) {
    Block& b = blocks[bi];
    if (b.bytes == 0) continue;
    std::vector<const Block*> live;
    for (std::size_t pi : placed) {
      const Block& p = blocks[pi];
      if (p.first <= b.last && b.first <= p.last) live.push_back(&p);
    }
    std::sort(live.begin(), live.end(),
              [](const Block* x, const Block* y) { return x->offset < y->offset; });
    std::size_t offset = 0;
    for (const Block* p : live) {
      if (offset + b.bytes <= p->offset) break;
      offset = std::max(offset, round_up(p->offset + p->bytes, alignment));
    }
    b.offset = offset;
    total = std::max(total, round_up(offset + b.bytes, alignment));
    placed.push_back(bi);
  }
  return total;
}

std::string prefix(std::string_view who) { return std::string(who) + ": "; }

}  // namespace

std::size_t value_bytes(const ValueInfo& info) {
  return static_cast<std::size_t>(info.shape.numel()) * dtype_size(info.dtype);
}

std::string value_text(const ValueInfo& info) {
  return info.shape.to_string() + " " + std::string(dtype_name(info.dtype));
}

std::string describe_node(const Graph& graph, const Node& node) {
  std::string s(op_name(node.op));
  if (!node.scope.empty()) s += " at '" + node.scope + "'";
  s += " (";
  for (std::size_t i = 0; i < node.inputs.size(); ++i) {
    if (i) s += ", ";
    s += value_text(graph.value(node.inputs[i]));
  }
  s += ") -> ";
  for (std::size_t i = 0; i < node.outputs.size(); ++i) {
    if (i) s += ", ";
    s += value_text(graph.value(node.outputs[i]));
  }
  return s;
}

namespace {

/// For a slice of whole leading rows (step 1, every dim before the sliced one of size 1), the
/// byte offset of rank `rank`'s rows in its input; npos for any other slice or out of range.
std::size_t leading_rows_offset(const Graph& graph, const Node& node, int rank) {
  const Attrs& at = node.attrs;
  const Shape& in = graph.value(node.inputs.at(0)).shape;
  const Shape& out = graph.value(node.outputs.at(0)).shape;
  const auto d = static_cast<std::size_t>(at.i("dim"));
  if (at.i("step", 1) != 1 || d >= static_cast<std::size_t>(in.rank())) return MemoryPlan::npos;
  std::int64_t row = 1;
  for (std::size_t i = 0; i < static_cast<std::size_t>(in.rank()); ++i) {
    if (i < d && in[i] != 1) return MemoryPlan::npos;
    if (i > d) row *= in[i];
  }
  const std::int64_t start = at.i("start") + static_cast<std::int64_t>(rank) * at.i("rank_stride", 0);
  if (start < 0 || start + out[d] > in[d]) return MemoryPlan::npos;
  return static_cast<std::size_t>(start * row) * dtype_size(graph.value(node.outputs[0]).dtype);
}

}  // namespace

MemoryPlan plan_views(const Graph& graph, std::string_view who, int rank) {
  using Kind = MemoryPlan::Kind;
  const std::size_t nv = graph.values.size();
  MemoryPlan plan;
  plan.kind.assign(nv, Kind::None);
  plan.producer.assign(nv, -1);
  plan.root.resize(nv);
  std::iota(plan.root.begin(), plan.root.end(), 0);
  plan.root_offset.assign(nv, 0);
  for (const auto& in : graph.inputs)
    plan.kind.at(static_cast<std::size_t>(in.value)) = in.is_state() ? Kind::State : Kind::Input;
  for (const auto& p : graph.params) plan.kind.at(static_cast<std::size_t>(p.value)) = Kind::Param;
  // Versions of the states: each StateWrite makes a new one; every read must see the latest.
  std::vector<int> version(nv, 0);     // per value whose root is a state
  std::vector<int> latest(nv, 0);      // per state root
  // Where each value's memory is when only Reshape and StateWrite alias (the roots state_write
  // may update), and the last node writing each state: a slice of a state is a view only when
  // nothing writes that state after it.
  std::vector<int> write_root(nv);
  std::iota(write_root.begin(), write_root.end(), 0);
  std::vector<int> last_write(nv, -1);  // per state root
  for (std::size_t i = 0; i < graph.nodes.size(); ++i) {
    const Node& node = graph.nodes[i];
    if ((node.op == OpKind::Reshape || node.op == OpKind::StateWrite) && !node.inputs.empty() &&
        !node.outputs.empty()) {
      const int r = write_root.at(static_cast<std::size_t>(node.inputs[0]));
      write_root.at(static_cast<std::size_t>(node.outputs[0])) = r;
      if (node.op == OpKind::StateWrite) last_write[static_cast<std::size_t>(r)] = static_cast<int>(i);
    }
  }
  auto state_name = [&](std::size_t r) {
    for (const auto& in : graph.inputs) {
      if (in.value == static_cast<int>(r)) return in.name;
    }
    return std::string("?");
  };

  for (std::size_t i = 0; i < graph.nodes.size(); ++i) {
    const Node& node = graph.nodes[i];
    for (int in : node.inputs) {
      const auto r = static_cast<std::size_t>(plan.root.at(static_cast<std::size_t>(in)));
      if (plan.kind.at(r) == Kind::None) {
        throw FormatError(prefix(who) + describe_node(graph, node) + " reads value " +
                          std::to_string(in) + " before anything defines it");
      }
      if (plan.kind[r] == Kind::State && version[static_cast<std::size_t>(in)] != latest[r]) {
        throw FormatError(prefix(who) + describe_node(graph, node) + " reads state '" + state_name(r) +
                          "' (value " + std::to_string(in) + ") after a state_write updated it in place; "
                          "read the state_write's result instead");
      }
    }
    if (node.op == OpKind::StateWrite) {
      const auto in = static_cast<std::size_t>(node.inputs.at(0));
      const auto r = static_cast<std::size_t>(plan.root[in]);
      if (plan.kind[r] != Kind::State || write_root[in] != static_cast<int>(r)) {  // not through a slice view
        throw FormatError(prefix(who) + describe_node(graph, node) + " writes value " + std::to_string(in) +
                          ", which is not a state: state_write updates a state (Tracer::state) in place");
      }
    }
    for (int out : node.outputs) {
      auto o = static_cast<std::size_t>(out);
      if (plan.kind.at(o) != Kind::None) {
        throw FormatError(prefix(who) + describe_node(graph, node) + " redefines value " +
                          std::to_string(out));
      }
      plan.kind[o] = Kind::Produced;
      plan.producer[o] = static_cast<int>(i);
    }
    if (node.op == OpKind::Reshape || node.op == OpKind::StateWrite) {
      auto o = static_cast<std::size_t>(node.outputs.at(0));
      auto in = static_cast<std::size_t>(node.inputs.at(0));
      plan.root[o] = plan.root[in];
      plan.root_offset[o] = plan.root_offset[in];
      version[o] = version[in];
      if (node.op == OpKind::StateWrite) {
        version[o] = ++latest[static_cast<std::size_t>(plan.root[in])];
      }
    }
    // A slice of a state is a view only when no later state_write updates that state (a view
    // would see it); it then reads the state's latest version, like its input. Otherwise a copy.
    if (node.op == OpKind::Slice && rank >= 0) {
      auto in = static_cast<std::size_t>(node.inputs.at(0));
      const auto r = static_cast<std::size_t>(plan.root[in]);
      const bool state = plan.kind[r] == Kind::State;
      const std::size_t off = leading_rows_offset(graph, node, rank);
      if (off != MemoryPlan::npos && (!state || last_write[r] < static_cast<int>(i))) {
        auto o = static_cast<std::size_t>(node.outputs.at(0));
        plan.root[o] = plan.root[in];
        plan.root_offset[o] = plan.root_offset[in] + off;
        version[o] = version[in];
      }
    }
  }
  return plan;
}

void plan_arena(MemoryPlan& plan, const Graph& graph, const std::vector<std::size_t>& scratch_bytes,
                std::size_t alignment, std::string_view who) {
  using Kind = MemoryPlan::Kind;
  const std::size_t nv = graph.values.size();
  const int num_nodes = static_cast<int>(graph.nodes.size());

  // Outputs written in place: a produced root returned whole, once.
  std::vector<bool> claimed(nv, false);
  plan.output_roots.assign(graph.outputs.size(), -1);
  plan.end_copies.clear();
  for (std::size_t j = 0; j < graph.outputs.size(); ++j) {
    const int v = graph.outputs[j];
    const auto r = static_cast<std::size_t>(plan.root.at(static_cast<std::size_t>(v)));
    if (plan.kind[r] == Kind::None) {
      throw FormatError(prefix(who) + "graph output " + std::to_string(j) + " (value " +
                        std::to_string(v) + ") is never defined");
    }
    const std::size_t bytes = value_bytes(graph.value(v));
    if (plan.kind[r] == Kind::Produced && !claimed[r] &&
        plan.root_offset[static_cast<std::size_t>(v)] == 0 &&
        bytes == value_bytes(graph.value(static_cast<int>(r)))) {
      claimed[r] = true;
      plan.output_roots[j] = static_cast<int>(r);
    } else {
      plan.end_copies.push_back({j, v, bytes});
    }
  }

  // Liveness of the arena roots: from their producer to their last reader; an end copy keeps
  // its root alive past the last node.
  std::vector<int> last(nv, -1);
  for (int i = 0; i < num_nodes; ++i) {
    for (int in : graph.nodes[static_cast<std::size_t>(i)].inputs) {
      auto r = static_cast<std::size_t>(plan.root[static_cast<std::size_t>(in)]);
      last[r] = std::max(last[r], i);
    }
  }
  for (const MemoryPlan::EndCopy& c : plan.end_copies) {
    last[static_cast<std::size_t>(plan.root[static_cast<std::size_t>(c.value)])] = num_nodes;
  }
  std::vector<Block> blocks;
  std::vector<int> block_value;  // value id, or -(node + 1) for a node's scratch
  for (std::size_t v = 0; v < nv; ++v) {
    if (plan.root[v] != static_cast<int>(v) || plan.kind[v] != Kind::Produced || claimed[v]) {
      continue;
    }
    blocks.push_back(
        {value_bytes(graph.values[v]), plan.producer[v], std::max(last[v], plan.producer[v])});
    block_value.push_back(static_cast<int>(v));
  }
  for (int i = 0; i < num_nodes; ++i) {
    if (scratch_bytes.at(static_cast<std::size_t>(i)) == 0) continue;
    blocks.push_back({scratch_bytes[static_cast<std::size_t>(i)], i, i});
    block_value.push_back(-(i + 1));
  }
  plan.arena_bytes = place_blocks(blocks, alignment);

  plan.arena_offset.assign(nv, MemoryPlan::npos);
  plan.scratch_offset.assign(static_cast<std::size_t>(num_nodes), MemoryPlan::npos);
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    if (block_value[b] >= 0) {
      plan.arena_offset[static_cast<std::size_t>(block_value[b])] = blocks[b].offset;
    } else {
      plan.scratch_offset[static_cast<std::size_t>(-block_value[b] - 1)] = blocks[b].offset;
    }
  }
}

std::vector<std::byte*> fixed_addresses(const Graph& graph, const MemoryPlan& plan,
                                        const std::vector<std::byte*>& params) {
  const std::size_t nv = plan.root.size();
  std::vector<std::byte*> fixed(nv, nullptr);
  for (std::size_t i = 0; i < graph.params.size(); ++i) {
    fixed.at(static_cast<std::size_t>(graph.params[i].value)) = params.at(i);
  }
  for (std::size_t v = 0; v < nv; ++v) {
    auto r = static_cast<std::size_t>(plan.root[v]);
    if (plan.kind[r] == MemoryPlan::Kind::Param) fixed[v] = fixed[r] + plan.root_offset[v];
  }
  return fixed;
}

ValueAddresses::ValueAddresses(const Graph& graph, const MemoryPlan& plan,
                               const std::vector<std::byte*>& fixed, std::byte* arena) {
  using Kind = MemoryPlan::Kind;
  const std::size_t nv = plan.root.size();
  values_.assign(nv, nullptr);
  for (std::size_t v = 0; v < nv; ++v) {
    if (plan.kind[v] == Kind::Param && plan.root[v] == static_cast<int>(v)) values_[v] = fixed[v];
    // An empty value gets an address too (the arena's start), never read.
    if (plan.arena_offset[v] != MemoryPlan::npos && arena)
      values_[v] = arena + plan.arena_offset[v];
  }
  scratch_.assign(plan.scratch_offset.size(), nullptr);
  for (std::size_t i = 0; i < scratch_.size(); ++i) {
    if (plan.scratch_offset[i] != MemoryPlan::npos) scratch_[i] = arena + plan.scratch_offset[i];
  }
  for (std::size_t v = 0; v < nv; ++v) {
    auto r = static_cast<std::size_t>(plan.root[v]);
    if (r == v || plan.kind[r] == Kind::None) continue;
    if (values_[r]) {
      values_[v] = values_[r] + plan.root_offset[v];
    } else {
      dynamic_aliases_.push_back({static_cast<int>(v), static_cast<int>(r), plan.root_offset[v]});
    }
  }
  for (const auto& in : graph.inputs) input_values_.push_back(in.value);
  output_roots_ = plan.output_roots;
}

void ValueAddresses::bind(const std::vector<const void*>& inputs,
                          const std::vector<void*>& outputs) {
  for (std::size_t j = 0; j < inputs.size(); ++j) {
    values_[static_cast<std::size_t>(input_values_[j])] =
        const_cast<std::byte*>(static_cast<const std::byte*>(inputs[j]));
  }
  for (std::size_t j = 0; j < outputs.size(); ++j) {
    if (output_roots_[j] >= 0) {
      values_[static_cast<std::size_t>(output_roots_[j])] = static_cast<std::byte*>(outputs[j]);
    }
  }
  for (const Alias& a : dynamic_aliases_) {
    values_[static_cast<std::size_t>(a.value)] =
        values_[static_cast<std::size_t>(a.root)] + a.offset;
  }
}

}  // namespace devpipe
