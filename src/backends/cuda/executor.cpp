// The cuda backend's Executable.
//
// Memory plan: the compiler pass plan_views/plan_arena (compiler/memory_plan.h), as for the
// cpu backend. Parameters are uploaded to the device once, at compile; intermediates and the
// steps' scratch (cuDNN workspaces) share one 256-byte aligned device arena. Everything is
// allocated at compile; run() allocates nothing.
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

#include "compiler/memory_plan.h"
#include "devpipe/error.h"
#include "devpipe/world.h"

namespace devpipe::cuda {

namespace {

constexpr std::size_t kAlign = 256;
constexpr std::size_t kMaxGraphs = 4;
constexpr int kMaxCaptures = 16;

bool graphs_enabled_by_env() {
  static const bool enabled = [] {
    const char* v = std::getenv("DEVPIPE_CUDA_GRAPHS");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

/// A rank's completion on the device: a CUDA event recorded on the rank's stream.
class CudaDeviceEvent final : public DeviceEvent {
 public:
  explicit CudaDeviceEvent(int device) : event_(Event::create(device)) {}
  void synchronize() override {
    const cudaError_t err = cudaEventSynchronize(event_.get());
    throw_if_collectives_failed();  // an aborted NCCL collective ends early, its outputs invalid
    check_cuda(err, "cudaEventSynchronize");
  }
  cudaEvent_t get() const { return event_.get(); }

 private:
  Event event_;
};

/// The context `rank`'s executables run in: its group's (RankInfo::resources), else one of the
/// executable's own on the device World::device_of_rank gives the rank.
std::shared_ptr<RankContext> context_for(const RankInfo& rank) {
  if (!rank.resources) {
    const Device device =
        World::device_of_rank(DeviceKind::Cuda, rank.rank, rank.tp_degree, num_devices());
    return std::make_shared<RankContext>(rank.rank, device_state(device.index));
  }
  auto ctx = std::dynamic_pointer_cast<RankContext>(rank.resources);
  if (!ctx) {
    throw StateError("cuda backend: compile for rank " + std::to_string(rank.rank) +
                     " got another backend's rank resources (RankInfo.resources)");
  }
  return ctx;
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
  std::size_t workspace_bytes() const override { return plan_.arena_bytes; }
  std::unique_ptr<DeviceEvent> create_event() override { return std::make_unique<CudaDeviceEvent>(ctx_.device()); }
  void record(DeviceEvent& event) override {
    DEVPIPE_CUDA_CHECK(cudaEventRecord(static_cast<CudaDeviceEvent&>(event).get(), ctx_.stream()));
  }
  void wait(DeviceEvent& event) override {
    DEVPIPE_CUDA_CHECK(cudaStreamWaitEvent(ctx_.stream(), static_cast<CudaDeviceEvent&>(event).get(), 0));
  }

 private:
  struct PlannedStep {
    std::unique_ptr<Step> step;
    std::byte* scratch = nullptr;
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
  std::shared_ptr<RankContext> context_;  // the rank's (its group's) or this executable's own
  RankContext& ctx_;
  std::vector<Tensor> params_;  // device copies (keep them alive)
  MemoryPlan plan_;
  std::shared_ptr<void> arena_;  // a pool block
  ValueAddresses values_;
  std::vector<PlannedStep> steps_;

  bool graphs_enabled_ = false;
  int captures_ = 0;
  std::uint64_t use_clock_ = 0;
  std::vector<Captured> graphs_;
};

CudaExecutable::CudaExecutable(const Graph& graph, const std::vector<Tensor>& params,
                               const RankInfo& rank)
    : graph_(graph), rank_(rank), context_(context_for(rank)), ctx_(*context_) {
  if (params.size() != graph.params.size()) {
    throw InvalidArgument("cuda backend: compile got " + std::to_string(params.size()) +
                          " parameters, the graph has " + std::to_string(graph.params.size()));
  }
  const int device = ctx_.device();
  DeviceGuard guard(device);
  const int num_nodes = static_cast<int>(graph.nodes.size());

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
                            ") tensor " + value_text(info));
    }
  }
  params_.reserve(params.size());
  std::vector<std::byte*> param_addresses;
  for (const Tensor& t : params) {
    params_.push_back(upload_parameter(t, device));
    param_addresses.push_back(static_cast<std::byte*>(params_.back().raw_data()));
  }

  // Roots and views.
  plan_ = plan_views(graph, "cuda backend");
  const std::vector<std::byte*> fixed = fixed_addresses(graph, plan_, param_addresses);

  // Steps (under the rank's lock: builders use its library handles, which a run on another
  // thread may be using).
  std::unique_lock rank_lock(ctx_.mu);
  steps_.resize(static_cast<std::size_t>(num_nodes));
  std::vector<std::size_t> scratch(static_cast<std::size_t>(num_nodes), 0);
  bool capturable = true;
  for (int i = 0; i < num_nodes; ++i) {
    const Node& node = graph.nodes[static_cast<std::size_t>(i)];
    if (node.op == OpKind::Reshape) continue;
    BuildContext cx{graph_, node, rank_, ctx_, fixed, describe_node(graph, node)};
    bool empty = false;
    for (int out : node.outputs) empty = empty || graph.value(out).shape.numel() == 0;
    std::unique_ptr<Step> s = empty ? std::make_unique<NoopStep>() : make_step(cx);
    s->where = cx.where;
    capturable = capturable && s->capturable();
    scratch[static_cast<std::size_t>(i)] = s->scratch_bytes();
    steps_[static_cast<std::size_t>(i)].step = std::move(s);
  }
  rank_lock.unlock();

  // Outputs, liveness and the arena.
  plan_arena(plan_, graph, scratch, kAlign, "cuda backend");
  if (plan_.arena_bytes > 0) arena_ = ctx_.device_state().acquire(plan_.arena_bytes);
  values_ = ValueAddresses(graph, plan_, fixed, static_cast<std::byte*>(arena_.get()));
  for (int i = 0; i < num_nodes; ++i) {
    steps_[static_cast<std::size_t>(i)].scratch = values_.scratch(i);
  }

  bool has_work = !plan_.end_copies.empty();
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
  for (const MemoryPlan::EndCopy& c : plan_.end_copies) {
    if (c.bytes == 0) continue;
    DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(outputs[c.output], values_.at(c.value), c.bytes,
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
  if (inputs.size() != graph_.inputs.size() || outputs.size() != graph_.outputs.size()) {
    throw InvalidArgument("cuda backend: run got " + std::to_string(inputs.size()) +
                          " inputs and " + std::to_string(outputs.size()) +
                          " outputs, the graph has " + std::to_string(graph_.inputs.size()) +
                          " and " + std::to_string(graph_.outputs.size()));
  }
  std::lock_guard lock(ctx_.mu);
  DeviceGuard guard(ctx_.device());
  values_.bind(inputs, outputs);
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
    case OpKind::Exp:
    case OpKind::Tanh:
    case OpKind::Sigmoid:
    case OpKind::Neg:
    case OpKind::AddScalar:
    case OpKind::MulScalar:
    case OpKind::Full:
    case OpKind::Arange:
    case OpKind::Sum:
    case OpKind::Mean:
    case OpKind::ArgMax:
    case OpKind::IndexSelect:
    case OpKind::Gather:
    case OpKind::Where:
    case OpKind::MaskedFill:
    case OpKind::RotaryEmbedding:
    case OpKind::ScaledDotProductAttention:
    case OpKind::MaskedAttention:
      return make_llm_step(cx);
    default:
      return make_basic_step(cx);
  }
}

std::unique_ptr<Executable> make_executable(const Graph& graph, const std::vector<Tensor>& params,
                                            const RankInfo& rank) {
  return std::make_unique<CudaExecutable>(graph, params, rank);
}

}  // namespace devpipe::cuda
