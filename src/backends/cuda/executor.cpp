// The cuda backend's Executable.
//
// Memory plan (as the cpu backend's): every value is a root or a view of one (Reshape is a
// zero-copy alias). A root is a graph input (the caller's buffer, bound per run), a parameter
// (uploaded to the device once, at compile), a graph output written in place (the caller's
// buffer, bound per run) or an intermediate placed by liveness into one device arena (first
// fit, biggest first, 256-byte aligned), next to the steps' scratch (cuDNN workspaces), which
// lives only during its step. Outputs that cannot be written in place are copied at the end.
// Everything is allocated at compile; run() allocates nothing.
//
// Launch and CUDA graph policy. run() binds the caller's pointers and enqueues on the rank's
// stream without synchronising the host. The first run with a given set of input/output
// pointers captures the launch sequence on the rank's private capture stream
// (cudaStreamCaptureModeThreadLocal, so other threads are unaffected) and instantiates it;
// that run and every later run with the same pointers replay it with one cudaGraphLaunch on
// the rank's stream. Up to kMaxGraphs pointer sets are kept (least recently used replaced);
// after kMaxCaptures captures the executable stops capturing (its callers keep changing
// buffers) and launches eagerly on a miss. Executables with a step that cannot be captured
// (collectives across ranks: they rendezvous with the peers' host threads), a failed capture,
// or DEVPIPE_CUDA_GRAPHS=0 always launch eagerly.
#include "backends/cuda/executor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>

#include "devpipe/error.h"

namespace devpipe::cuda {

namespace {

constexpr std::size_t kAlign = 256;
constexpr std::size_t kMaxGraphs = 4;
constexpr int kMaxCaptures = 16;

std::size_t round_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

std::size_t value_bytes(const ValueInfo& info) {
  return static_cast<std::size_t>(info.shape.numel()) * dtype_size(info.dtype);
}

std::string info_text(const ValueInfo& info) {
  return info.shape.to_string() + " " + std::string(dtype_name(info.dtype));
}

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

bool graphs_enabled_by_env() {
  static const bool enabled = [] {
    const char* v = std::getenv("DEVPIPE_CUDA_GRAPHS");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

struct Block {
  std::size_t bytes;
  int first;
  int last;
  std::size_t offset = 0;
};

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
      offset = std::max(offset, round_up(p->offset + p->bytes));
    }
    b.offset = offset;
    total = std::max(total, round_up(offset + b.bytes));
    placed.push_back(bi);
  }
  return total;
}

/// A step for nodes whose outputs are empty.
class NoopStep final : public Step {
 public:
  void launch(const LaunchContext&) override {}
};

class CudaExecutable final : public Executable {
 public:
  CudaExecutable(const Graph& graph, const std::vector<Tensor>& params, const RankInfo& rank);
  ~CudaExecutable() override = default;

  void run(const std::vector<const void*>& inputs, const std::vector<void*>& outputs) override;
  std::size_t workspace_bytes() const override { return arena_bytes_; }

 private:
  struct PlannedStep {
    std::unique_ptr<Step> step;
    std::byte* scratch = nullptr;
  };
  struct Alias {
    int value;
    int root;
    std::size_t offset;
  };
  struct EndCopy {
    std::size_t output;
    int value;
    std::size_t bytes;
  };
  struct Captured {
    std::vector<const void*> key;  // inputs then outputs
    GraphExecHandle exec;
    std::uint64_t last_use = 0;
  };

  void launch_all(cudaStream_t stream, const std::vector<void*>& outputs);
  Captured* find_graph(const std::vector<const void*>& inputs, const std::vector<void*>& outputs);
  Captured* capture(const std::vector<const void*>& inputs, const std::vector<void*>& outputs);
  void disable_graphs() { graphs_enabled_ = false; }

  Graph graph_;
  RankInfo rank_;
  RankContext& ctx_;
  std::vector<Tensor> params_;  // device copies (keep them alive)
  std::vector<int> root_;
  std::vector<std::size_t> root_offset_;
  std::vector<std::byte*> values_;
  std::vector<PlannedStep> steps_;
  std::vector<int> input_roots_;
  std::vector<int> output_roots_;
  std::vector<Alias> dynamic_aliases_;
  std::vector<EndCopy> end_copies_;
  std::shared_ptr<void> arena_;  // a pool block
  std::size_t arena_bytes_ = 0;

  bool graphs_enabled_ = false;
  int captures_ = 0;
  std::uint64_t use_clock_ = 0;
  std::vector<Captured> graphs_;
};

CudaExecutable::CudaExecutable(const Graph& graph, const std::vector<Tensor>& params,
                               const RankInfo& rank)
    : graph_(graph), rank_(rank), ctx_(rank_context(rank.rank)) {
  if (params.size() != graph.params.size()) {
    throw InvalidArgument("cuda backend: compile got " + std::to_string(params.size()) +
                          " parameters, the graph has " + std::to_string(graph.params.size()));
  }
  const int device = ctx_.device();
  DeviceGuard guard(device);
  const std::size_t nv = graph.values.size();
  const int num_nodes = static_cast<int>(graph.nodes.size());
  enum class Kind { None, Input, Param, Produced };
  std::vector<Kind> kind(nv, Kind::None);
  std::vector<int> producer(nv, -1);
  std::vector<std::byte*> fixed(nv, nullptr);
  for (const auto& in : graph.inputs) kind.at(static_cast<std::size_t>(in.value)) = Kind::Input;

  // Parameters: checked, then uploaded once (shared with other executables of the same host
  // tensors on this device).
  for (std::size_t i = 0; i < params.size(); ++i) {
    const GraphParam& p = graph.params[i];
    const ValueInfo& info = graph.value(p.value);
    const Tensor& t = params[i];
    const bool usable = t.defined() && (t.device().is_host() || t.device() == Device::cuda(device));
    if (!usable || t.shape() != info.shape || t.dtype() != info.dtype) {
      throw InvalidArgument("cuda backend: parameter '" + p.key + "' is " +
                            (t.defined() ? t.shape().to_string() + " " +
                                               std::string(dtype_name(t.dtype())) + " on " +
                                               t.device().to_string()
                                         : std::string("undefined")) +
                            ", the graph expects a host (or cuda:" + std::to_string(device) +
                            ") tensor " + info_text(info));
    }
  }
  params_.reserve(params.size());
  for (std::size_t i = 0; i < params.size(); ++i) {
    params_.push_back(upload_parameter(params[i], device));
    auto v = static_cast<std::size_t>(graph.params[i].value);
    kind[v] = Kind::Param;
    fixed[v] = static_cast<std::byte*>(params_.back().raw_data());
  }

  // Roots and views.
  root_.resize(nv);
  std::iota(root_.begin(), root_.end(), 0);
  root_offset_.assign(nv, 0);
  for (int i = 0; i < num_nodes; ++i) {
    const Node& node = graph.nodes[static_cast<std::size_t>(i)];
    for (int in : node.inputs) {
      if (kind.at(static_cast<std::size_t>(root_.at(static_cast<std::size_t>(in)))) == Kind::None) {
        throw FormatError("cuda backend: " + describe(graph, node) + " reads value " +
                          std::to_string(in) + " before anything defines it");
      }
    }
    for (int out : node.outputs) {
      auto o = static_cast<std::size_t>(out);
      if (kind.at(o) != Kind::None) {
        throw FormatError("cuda backend: " + describe(graph, node) + " redefines value " +
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

  // Steps (under the rank's lock: builders use its library handles, which a run on another
  // thread may be using).
  std::unique_lock rank_lock(ctx_.mu);
  steps_.resize(static_cast<std::size_t>(num_nodes));
  std::vector<std::size_t> scratch(static_cast<std::size_t>(num_nodes), 0);
  bool capturable = true;
  for (int i = 0; i < num_nodes; ++i) {
    const Node& node = graph.nodes[static_cast<std::size_t>(i)];
    if (node.op == OpKind::Reshape) continue;
    BuildContext cx{graph_, node, rank_, ctx_, fixed, describe(graph, node)};
    bool empty = false;
    for (int out : node.outputs) empty = empty || graph.value(out).shape.numel() == 0;
    std::unique_ptr<Step> s = empty ? std::make_unique<NoopStep>() : make_step(cx);
    s->where = cx.where;
    capturable = capturable && s->capturable();
    scratch[static_cast<std::size_t>(i)] = s->scratch_bytes();
    steps_[static_cast<std::size_t>(i)].step = std::move(s);
  }
  rank_lock.unlock();

  // Outputs written in place: a produced root returned whole, once.
  std::vector<bool> claimed(nv, false);
  output_roots_.assign(graph.outputs.size(), -1);
  for (std::size_t j = 0; j < graph.outputs.size(); ++j) {
    const int v = graph.outputs[j];
    const auto r = static_cast<std::size_t>(root_.at(static_cast<std::size_t>(v)));
    if (kind[r] == Kind::None) {
      throw FormatError("cuda backend: graph output " + std::to_string(j) + " (value " +
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

  // Liveness and the arena.
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
  std::vector<int> block_value;  // value id, or -(node + 1) for a step's scratch
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
  if (arena_bytes_ > 0) arena_ = ctx_.device_state().acquire(arena_bytes_);
  auto* base = static_cast<std::byte*>(arena_.get());

  values_.assign(nv, nullptr);
  for (std::size_t v = 0; v < nv; ++v) {
    if (kind[v] == Kind::Param && root_[v] == static_cast<int>(v)) values_[v] = fixed[v];
  }
  for (std::size_t b = 0; b < blocks.size(); ++b) {
    if (blocks[b].bytes == 0) continue;
    std::byte* p = base + blocks[b].offset;
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
  for (const auto& in : graph.inputs) input_roots_.push_back(in.value);

  bool has_work = !end_copies_.empty();
  for (const auto& s : steps_) has_work = has_work || s.step != nullptr;
  graphs_enabled_ = capturable && has_work && graphs_enabled_by_env();
  graphs_.reserve(kMaxGraphs);
}

void CudaExecutable::launch_all(cudaStream_t stream, const std::vector<void*>& outputs) {
  for (PlannedStep& s : steps_) {
    if (!s.step) continue;
    LaunchContext cx{values_.data(), s.scratch, stream, ctx_, rank_};
    s.step->launch(cx);
  }
  for (const EndCopy& c : end_copies_) {
    if (c.bytes == 0) continue;
    DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(outputs[c.output],
                                       values_[static_cast<std::size_t>(c.value)], c.bytes,
                                       cudaMemcpyDeviceToDevice, stream));
  }
}

CudaExecutable::Captured* CudaExecutable::find_graph(const std::vector<const void*>& inputs,
                                                     const std::vector<void*>& outputs) {
  for (Captured& g : graphs_) {
    bool same = true;
    for (std::size_t i = 0; same && i < inputs.size(); ++i) same = g.key[i] == inputs[i];
    for (std::size_t i = 0; same && i < outputs.size(); ++i)
      same = g.key[inputs.size() + i] == outputs[i];
    if (same) return &g;
  }
  return nullptr;
}

CudaExecutable::Captured* CudaExecutable::capture(const std::vector<const void*>& inputs,
                                                  const std::vector<void*>& outputs) {
  cudaStream_t cs = ctx_.capture_stream();
  if (cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
    (void)cudaGetLastError();
    disable_graphs();
    return nullptr;
  }
  bool launched = true;
  try {
    launch_all(cs, outputs);
  } catch (...) {
    launched = false;  // the eager launch that follows reports a real failure
  }
  GraphHandle graph;
  cudaError_t err = cudaStreamEndCapture(cs, graph.out());
  if (!launched || err != cudaSuccess || !graph) {
    (void)cudaGetLastError();
    disable_graphs();
    return nullptr;
  }
  GraphExecHandle exec;
  if (cudaGraphInstantiate(exec.out(), graph.get(), 0) != cudaSuccess) {
    (void)cudaGetLastError();
    disable_graphs();
    return nullptr;
  }
  ++captures_;
  note_graph_capture();
  Captured* slot = nullptr;
  if (graphs_.size() < kMaxGraphs) {
    slot = &graphs_.emplace_back();
  } else {
    slot = &*std::min_element(
        graphs_.begin(), graphs_.end(),
        [](const Captured& a, const Captured& b) { return a.last_use < b.last_use; });
  }
  slot->key.assign(inputs.begin(), inputs.end());
  slot->key.insert(slot->key.end(), outputs.begin(), outputs.end());
  slot->exec = std::move(exec);
  return slot;
}

void CudaExecutable::run(const std::vector<const void*>& inputs,
                         const std::vector<void*>& outputs) {
  if (inputs.size() != input_roots_.size() || outputs.size() != output_roots_.size()) {
    throw InvalidArgument("cuda backend: run got " + std::to_string(inputs.size()) +
                          " inputs and " + std::to_string(outputs.size()) +
                          " outputs, the graph has " + std::to_string(input_roots_.size()) +
                          " and " + std::to_string(output_roots_.size()));
  }
  std::lock_guard lock(ctx_.mu);
  DeviceGuard guard(ctx_.device());
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
  const cudaStream_t stream = ctx_.stream();
  if (graphs_enabled_) {
    Captured* g = find_graph(inputs, outputs);
    if (!g && captures_ < kMaxCaptures) g = capture(inputs, outputs);
    if (g) {
      g->last_use = ++use_clock_;
      DEVPIPE_CUDA_CHECK(cudaGraphLaunch(g->exec.get(), stream));
      note_graph_replay();
      return;
    }
  }
  launch_all(stream, outputs);
  note_eager_run();
}

}  // namespace

std::unique_ptr<Step> make_step(const BuildContext& cx) {
  switch (cx.node.op) {
    case OpKind::Linear:
      return make_linear_step(cx);
    case OpKind::Matmul:
      return make_matmul_step(cx);
    case OpKind::Conv2d:
      return make_conv2d_step(cx);
    case OpKind::AllReduce:
    case OpKind::AllGather:
      return make_collective_step(cx);
    default:
      return make_basic_step(cx);
  }
}

std::unique_ptr<Executable> make_executable(const Graph& graph, const std::vector<Tensor>& params,
                                            const RankInfo& rank) {
  return std::make_unique<CudaExecutable>(graph, params, rank);
}

}  // namespace devpipe::cuda
