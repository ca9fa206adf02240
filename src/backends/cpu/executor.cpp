#include "backends/cpu/executor.h"

#include "devpipe/timeline.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>

namespace devpipe::cpu {

namespace {

/// Sets the calling thread's OpenMP thread count for a scope (ICVs are per thread).
class OmpThreadsScope {
 public:
  explicit OmpThreadsScope(int n) : previous_(omp_get_max_threads()) {
    if (n > 0) omp_set_num_threads(n);
  }
  ~OmpThreadsScope() { omp_set_num_threads(previous_); }
  OmpThreadsScope(const OmpThreadsScope&) = delete;
  OmpThreadsScope& operator=(const OmpThreadsScope&) = delete;

 private:
  int previous_;
};

/// A kernel that does nothing (nodes whose outputs are empty).
class NoopKernel : public Kernel {
 public:
  void run(const RunContext&) override {}
};

std::size_t round_up_64(std::size_t n) { return (n + 63) / 64 * 64; }

std::size_t value_bytes(const ValueInfo& info) {
  return static_cast<std::size_t>(info.shape.numel()) * dtype_size(info.dtype);
}

std::string info_text(const ValueInfo& info) {
  return info.shape.to_string() + " " + std::string(dtype_name(info.dtype));
}

/// "linear at 'enc.fc1' ([2, 4] float32, [3, 4] float32) -> [2, 3] float32".
std::string describe(const Graph& g, const Node& node) {
  std::string s(op_name(node.op));
  if (!node.scope.empty()) s += " at '" + node.scope + "'";
  s += " (";
  for (std::size_t i = 0; i < node.inputs.size(); ++i) {
    if (i) s += ", ";
    s += info_text(g.value(node.inputs[i]));
  }
  s += ") -> ";
  for (std::size_t i = 0; i < node.outputs.size(); ++i) {
    if (i) s += ", ";
    s += info_text(g.value(node.outputs[i]));
  }
  return s;
}

/// A block of the arena: live from step `first` to step `last` inclusive.
struct Block {
  std::size_t bytes;
  int first;
  int last;
  std::size_t offset = 0;
};

/// First-fit placement, biggest blocks first; returns the arena size.
std::size_t place_blocks(std::vector<Block>& blocks) {
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
      offset = std::max(offset, round_up_64(p->offset + p->bytes));
    }
    b.offset = offset;
    total = std::max(total, round_up_64(offset + b.bytes));
    placed.push_back(bi);
  }
  return total;
}

}  // namespace

void CpuExecutable::ArenaFree::operator()(std::byte* p) const { std::free(p); }

CpuExecutable::CpuExecutable(const Graph& graph, const std::vector<Tensor>& params,
                             const RankInfo& rank)
    : graph_(graph), rank_(rank), params_(params), stream_(cpu_engine()) {
  if (params.size() != graph.params.size()) {
    throw InvalidArgument("cpu backend: compile got " + std::to_string(params.size()) +
                          " parameters, the graph has " + std::to_string(graph.params.size()));
  }
  const std::size_t nv = graph.values.size();
  const int num_nodes = static_cast<int>(graph.nodes.size());
  enum class Kind { None, Input, Param, Produced };
  std::vector<Kind> kind(nv, Kind::None);
  std::vector<int> producer(nv, -1);
  std::vector<std::byte*> fixed(nv, nullptr);
  for (const auto& in : graph.inputs) kind.at(static_cast<std::size_t>(in.value)) = Kind::Input;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const GraphParam& p = graph.params[i];
    const ValueInfo& info = graph.value(p.value);
    const Tensor& t = params[i];
    if (!t.defined() || !t.device().is_host() || t.shape() != info.shape ||
        t.dtype() != info.dtype) {
      throw InvalidArgument("cpu backend: parameter '" + p.key + "' is " +
                            (t.defined() ? t.shape().to_string() + " " +
                                               std::string(dtype_name(t.dtype())) + " on " +
                                               t.device().to_string()
                                         : std::string("undefined")) +
                            ", the graph expects a host tensor " + info_text(info));
    }
    auto v = static_cast<std::size_t>(p.value);
    kind[v] = Kind::Param;
    fixed[v] = static_cast<std::byte*>(t.raw_data());
  }

  // Roots and views.
  root_.resize(nv);
  std::iota(root_.begin(), root_.end(), 0);
  root_offset_.assign(nv, 0);
  for (int i = 0; i < num_nodes; ++i) {
    const Node& node = graph.nodes[static_cast<std::size_t>(i)];
    for (int in : node.inputs) {
      if (kind.at(static_cast<std::size_t>(root_.at(static_cast<std::size_t>(in)))) == Kind::None) {
        throw FormatError("cpu backend: " + describe(graph, node) + " reads value " +
                          std::to_string(in) + " before anything defines it");
      }
    }
    for (int out : node.outputs) {
      auto o = static_cast<std::size_t>(out);
      if (kind.at(o) != Kind::None) {
        throw FormatError("cpu backend: " + describe(graph, node) + " redefines value " +
                          std::to_string(out));
      }
      kind[o] = Kind::Produced;
      producer[o] = i;
    }
    if (node.op == OpKind::Reshape) {
      auto o = static_cast<std::size_t>(node.outputs.at(0));
      auto in = static_cast<std::size_t>(node.inputs.at(0));
      root_[o] = root_[in];
      root_offset_[o] = root_offset_[in];
    }
  }
  for (std::size_t v = 0; v < nv; ++v) {
    auto r = static_cast<std::size_t>(root_[v]);
    if (kind[r] == Kind::Param) fixed[v] = fixed[r] + root_offset_[v];
  }

  // A value read only by one pooling node (and not returned or viewed) may stay in its
  // producer's preferred blocked layout: a convolution then feeds the pool without the reorder
  // to plain NCHW, as oneDNN's own conv + pool pairing does.
  std::vector<int> readers(nv, 0), reader(nv, -1);
  for (int i = 0; i < num_nodes; ++i) {
    for (int in : graph.nodes[static_cast<std::size_t>(i)].inputs) {
      ++readers[static_cast<std::size_t>(in)];
      reader[static_cast<std::size_t>(in)] = i;
    }
  }
  for (int out : graph.outputs) readers[static_cast<std::size_t>(out)] += 2;
  std::vector<bool> blocked_ok(nv, false);
  for (std::size_t v = 0; v < nv; ++v) {
    if (readers[v] != 1 || kind[v] != Kind::Produced) continue;
    const Node& r = graph.nodes[static_cast<std::size_t>(reader[v])];
    const Shape& x = graph.value(r.inputs[0]).shape;
    const Shape& y = graph.value(r.outputs[0]).shape;
    bool avg = r.op == OpKind::AdaptiveAvgPool2d && x[2] % y[2] == 0 && x[3] % y[3] == 0;
    bool max = r.op == OpKind::MaxPool2d && r.attrs.ints("dilation") == std::vector<std::int64_t>{1, 1};
    blocked_ok[v] = avg || max;
  }
  std::vector<DnnlDesc> layouts(nv);

  // Kernels: every oneDNN primitive is created here, with the rank's thread count.
  OmpThreadsScope threads(rank.num_threads);
  steps_.resize(static_cast<std::size_t>(num_nodes));
  std::vector<std::size_t> scratch(static_cast<std::size_t>(num_nodes), 0);
  for (int i = 0; i < num_nodes; ++i) {
    const Node& node = graph.nodes[static_cast<std::size_t>(i)];
    if (node.op == OpKind::Reshape) continue;
    BuildContext cx{graph_, node, rank_, fixed, describe(graph, node), &blocked_ok, &layouts};
    bool empty = false;
    for (int out : node.outputs) empty = empty || graph.value(out).shape.numel() == 0;
    std::unique_ptr<Kernel> k;
    try {
      k = empty ? std::make_unique<NoopKernel>() : make_kernel(cx);
    } catch (const dnnl::error& e) {
      throw Error("cpu backend: oneDNN failed to build " + cx.where + ": " + e.what());
    }
    k->where = cx.where;
    scratch[static_cast<std::size_t>(i)] = k->scratch_bytes();
    steps_[static_cast<std::size_t>(i)].kernel = std::move(k);
    steps_[static_cast<std::size_t>(i)].label = op_name(node.op).data();  // a string literal
  }

  // Outputs written in place: a produced root returned whole, once.
  std::vector<bool> claimed(nv, false);
  output_roots_.assign(graph.outputs.size(), -1);
  for (std::size_t j = 0; j < graph.outputs.size(); ++j) {
    const int v = graph.outputs[j];
    const auto r = static_cast<std::size_t>(root_.at(static_cast<std::size_t>(v)));
    if (kind[r] == Kind::None) {
      throw FormatError("cpu backend: graph output " + std::to_string(j) + " (value " +
                        std::to_string(v) + ") is never defined");
    }
    const std::size_t bytes = value_bytes(graph.value(v));
    if (kind[r] == Kind::Produced && !claimed[r] &&
        root_offset_[static_cast<std::size_t>(v)] == 0 &&
        bytes == value_bytes(graph.value(static_cast<int>(r)))) {
      claimed[r] = true;
      output_roots_[j] = static_cast<int>(r);
    } else {
      end_copies_.push_back({j, v, bytes});
    }
  }

  // Liveness of the arena roots.
  std::vector<int> last(nv, -1);
  for (int i = 0; i < num_nodes; ++i) {
    for (int in : graph.nodes[static_cast<std::size_t>(i)].inputs) {
      auto r = static_cast<std::size_t>(root_[static_cast<std::size_t>(in)]);
      last[r] = std::max(last[r], i);
    }
  }
  for (const EndCopy& c : end_copies_) {
    last[static_cast<std::size_t>(root_[static_cast<std::size_t>(c.value)])] = num_nodes;
  }
  std::vector<Block> blocks;
  std::vector<int> block_value;  // value id, or -(node + 1) for a node's scratch
  for (std::size_t v = 0; v < nv; ++v) {
    if (root_[v] != static_cast<int>(v) || kind[v] != Kind::Produced || claimed[v]) continue;
    blocks.push_back({value_bytes(graph.values[v]), producer[v], std::max(last[v], producer[v])});
    block_value.push_back(static_cast<int>(v));
  }
  for (int i = 0; i < num_nodes; ++i) {
    if (scratch[static_cast<std::size_t>(i)] == 0) continue;
    blocks.push_back({scratch[static_cast<std::size_t>(i)], i, i});
    block_value.push_back(-(i + 1));
  }
  arena_bytes_ = place_blocks(blocks);
  void* arena = std::aligned_alloc(64, std::max<std::size_t>(arena_bytes_, 64));
  if (!arena) {
    throw OutOfMemory("cpu backend: cannot allocate the " + std::to_string(arena_bytes_) +
                      "-byte workspace");
  }
  arena_.reset(static_cast<std::byte*>(arena));

  // Addresses fixed from now on; per-run ones stay null until run().
  values_.assign(nv, nullptr);
  for (std::size_t v = 0; v < nv; ++v) {
    if (kind[v] == Kind::Param && root_[v] == static_cast<int>(v)) values_[v] = fixed[v];
  }
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    std::byte* p = arena_.get() + blocks[b].offset;
    if (block_value[b] >= 0) {
      values_[static_cast<std::size_t>(block_value[b])] = p;
    } else {
      steps_[static_cast<std::size_t>(-block_value[b] - 1)].scratch = p;
    }
  }
  for (std::size_t v = 0; v < nv; ++v) {
    auto r = static_cast<std::size_t>(root_[v]);
    if (r == v || kind[r] == Kind::None) continue;
    if (values_[r]) {
      values_[v] = values_[r] + root_offset_[v];
    } else {
      dynamic_aliases_.push_back({static_cast<int>(v), static_cast<int>(r), root_offset_[v]});
    }
  }
  for (Step& s : steps_) {
    if (s.kernel) s.kernel->bind(BindContext{values_, s.scratch});
  }
  for (const auto& in : graph.inputs) input_roots_.push_back(in.value);
}

CpuExecutable::~CpuExecutable() = default;

void CpuExecutable::run(const std::vector<const void*>& inputs, const std::vector<void*>& outputs) {
  if (inputs.size() != input_roots_.size() || outputs.size() != output_roots_.size()) {
    throw InvalidArgument("cpu backend: run got " + std::to_string(inputs.size()) + " inputs and " +
                          std::to_string(outputs.size()) + " outputs, the graph has " +
                          std::to_string(input_roots_.size()) + " and " +
                          std::to_string(output_roots_.size()));
  }
  if (rank_.num_threads > 0) omp_set_num_threads(rank_.num_threads);
  for (std::size_t j = 0; j < inputs.size(); ++j) {
    values_[static_cast<std::size_t>(input_roots_[j])] =
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
  if (timeline::recording_kernels()) {
    for (Step& s : steps_) {
      if (!s.kernel) continue;
      timeline::Span span(s.label, "kernel", rank_.rank + 1);
      RunContext cx{values_.data(), s.scratch, stream_, rank_};
      s.kernel->run(cx);
      stream_.wait();
    }
  } else {
    for (Step& s : steps_) {
      if (!s.kernel) continue;
      RunContext cx{values_.data(), s.scratch, stream_, rank_};
      s.kernel->run(cx);
    }
  }
  stream_.wait();
  for (const EndCopy& c : end_copies_) {
    if (c.bytes)
      std::memcpy(outputs[c.output], values_[static_cast<std::size_t>(c.value)], c.bytes);
  }
}

}  // namespace devpipe::cpu
