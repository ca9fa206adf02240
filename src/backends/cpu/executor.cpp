#include "backends/cpu/executor.h"

#include "core/pool.h"
#include "devpipe/timeline.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace devpipe::cpu {

namespace {

/// Elements a node may read and write (parameters aside) and still run on one thread.
constexpr std::int64_t kSerialElements = 1 << 16;
/// The same for attention, which streams its keys and values once per query block: a decode
/// step's attention (one query row per sequence) reads its cache at about a core's bandwidth.
constexpr std::int64_t kSerialAttentionElements = 1 << 20;
/// And the multiply-adds of its scores (query elements x keys) an attention with several query
/// rows per sequence may take on one thread: an encoder's or a prefill's attention grows with
/// T x S, not with its operands (a vision tower's [1, 4, 256, 64] is 16.8M; a decode step's
/// one row per sequence stays with the element rule).
constexpr std::int64_t kSerialAttentionWork = 1 << 22;

/// Whether `node` runs with one OpenMP thread. A token-generation step has a few hundred
/// nodes of a few thousand elements (adds, norms, rotary, copies): waking the team costs more
/// than their work, and every OpenMP region ends in a barrier that stalls while a thread of
/// the team is descheduled (a machine whose cores other processes share). Linear, Matmul and
/// convolutions keep the team (their work grows faster than their operands; the decode-sized
/// Linear runs on the executable's WorkPool instead).
bool runs_serial(const Graph& g, const Node& node, const std::vector<std::byte*>& fixed) {
  const OpKind op = node.op;
  if (op == OpKind::Linear || op == OpKind::Matmul || op == OpKind::Conv2d ||
      op == OpKind::Conv2dGlobalAvgPool) {
    return false;
  }
  std::int64_t elements = 0;
  for (int in : node.inputs) {
    if (!fixed[static_cast<std::size_t>(in)]) elements += g.value(in).shape.numel();
  }
  for (int out : node.outputs) elements += g.value(out).shape.numel();
  if (op == OpKind::ScaledDotProductAttention || op == OpKind::MaskedAttention) {
    const Shape& q = g.value(node.inputs[0]).shape;
    const std::int64_t keys = g.value(node.inputs[1]).shape[2];
    const bool light = q[2] == 1 || q.numel() * keys <= kSerialAttentionWork;
    return light && g.value(node.outputs[0]).shape.numel() <= kSerialElements && elements <= kSerialAttentionElements;
  }
  return elements <= kSerialElements;
}

/// A kernel that does nothing (nodes whose outputs are empty).
class NoopKernel : public Kernel {
 public:
  void run(const RunContext&) override {}
};

}  // namespace

namespace {
thread_local int t_last_run_threads = 0;
}  // namespace

std::shared_ptr<WorkPool> CpuRankResources::pool(int threads) {
  std::lock_guard lock(mu_);
  std::erase_if(pools_, [](const auto& kv) { return kv.second.expired(); });
  std::weak_ptr<WorkPool>& slot = pools_[threads];
  std::shared_ptr<WorkPool> pool = slot.lock();
  if (!pool) {
    pool = std::make_shared<WorkPool>(threads);
    slot = pool;
  }
  return pool;
}

int last_run_threads() { return t_last_run_threads; }

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
  std::vector<std::byte*> param_addresses;
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
                            ", the graph expects a host tensor " + value_text(info));
    }
    param_addresses.push_back(static_cast<std::byte*>(t.raw_data()));
  }

  // Roots and views.
  plan_ = plan_views(graph, "cpu backend", rank.rank);
  const std::vector<std::byte*> fixed = fixed_addresses(graph, plan_, param_addresses);

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
    if (readers[v] != 1 || plan_.kind[v] != MemoryPlan::Kind::Produced) continue;
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
    if (node.op == OpKind::Slice && !plan_.is_root(node.outputs[0])) continue;  // a view
    BuildContext cx{graph_, node, rank_, fixed, describe_node(graph, node), &blocked_ok, &layouts};
    bool empty = false;
    for (int out : node.outputs) empty = empty || graph.value(out).shape.numel() == 0;
    const bool serial = runs_serial(graph, node, fixed);
    std::unique_ptr<Kernel> k;
    try {
      OmpThreadsScope one(serial ? 1 : 0);  // oneDNN sizes its primitives by the thread count
      k = empty ? std::make_unique<NoopKernel>() : make_kernel(cx);
    } catch (const dnnl::error& e) {
      throw Error("cpu backend: oneDNN failed to build " + cx.where + ": " + e.what());
    }
    k->where = cx.where;
    steps_[static_cast<std::size_t>(i)].serial = serial;
    steps_[static_cast<std::size_t>(i)].parks_pool = !serial && !empty && !k->wants_pool();
    if (k->wants_pool() && !pool_) {
      const int pool_threads = rank.num_threads > 0 ? rank.num_threads : omp_get_max_threads();
      if (rank.resources) {
        auto* resources = dynamic_cast<CpuRankResources*>(rank.resources.get());
        if (!resources) {
          throw StateError("cpu backend: compile for rank " + std::to_string(rank.rank) +
                           " got another backend's rank resources (RankInfo.resources)");
        }
        pool_ = resources->pool(pool_threads);
      } else {
        pool_ = std::make_shared<WorkPool>(pool_threads);
      }
    }
    scratch[static_cast<std::size_t>(i)] = k->scratch_bytes();
    steps_[static_cast<std::size_t>(i)].kernel = std::move(k);
    steps_[static_cast<std::size_t>(i)].label = op_name(node.op).data();  // a string literal
  }

  // Outputs, liveness and the arena.
  plan_arena(plan_, graph, scratch, 64, "cpu backend");
  void* arena = detail::host_alloc(plan_.arena_bytes);
  if (!arena) {
    throw OutOfMemory("cpu backend: cannot allocate the " + std::to_string(plan_.arena_bytes) +
                      "-byte workspace");
  }
  arena_.reset(static_cast<std::byte*>(arena));

  // Addresses fixed from now on; per-run ones stay null until run().
  values_ = ValueAddresses(graph, plan_, fixed, arena_.get());
  for (int i = 0; i < num_nodes; ++i) {
    Step& s = steps_[static_cast<std::size_t>(i)];
    s.scratch = values_.scratch(i);
    if (s.kernel) s.kernel->bind(BindContext{values_.values(), s.scratch});
  }
}

CpuExecutable::~CpuExecutable() = default;

void CpuExecutable::run(const std::vector<const void*>& inputs, const std::vector<void*>& outputs) {
  if (inputs.size() != graph_.inputs.size() || outputs.size() != graph_.outputs.size()) {
    throw InvalidArgument("cpu backend: run got " + std::to_string(inputs.size()) + " inputs and " +
                          std::to_string(outputs.size()) + " outputs, the graph has " +
                          std::to_string(graph_.inputs.size()) + " and " +
                          std::to_string(graph_.outputs.size()));
  }
  OmpThreadsScope restore(0);  // the caller's count again when the run ends (or throws)
  if (rank_.num_threads > 0) omp_set_num_threads(rank_.num_threads);
  const int team = omp_get_max_threads();
  t_last_run_threads = team;
  bool serial = false;         // whether the OpenMP thread count is 1 now
  auto threads_for = [&](const Step& s) {
    if (s.serial != serial) {
      serial = s.serial;
      omp_set_num_threads(serial ? 1 : team);
    }
  };
  values_.bind(inputs, outputs);
  if (timeline::recording_kernels()) {
    for (Step& s : steps_) {
      if (!s.kernel) continue;
      timeline::Span span(s.label, "kernel", rank_.rank + 1);
      threads_for(s);
      if (s.parks_pool && pool_) pool_->park();
      RunContext cx{values_.data(), s.scratch, stream_, rank_, pool_.get()};
      s.kernel->run(cx);
      stream_.wait();
    }
  } else {
    for (Step& s : steps_) {
      if (!s.kernel) continue;
      threads_for(s);
      if (s.parks_pool && pool_) pool_->park();
      RunContext cx{values_.data(), s.scratch, stream_, rank_, pool_.get()};
      s.kernel->run(cx);
    }
  }
  stream_.wait();
  for (const MemoryPlan::EndCopy& c : plan_.end_copies) {
    if (c.bytes) std::memcpy(outputs[c.output], values_.at(c.value), c.bytes);
  }
}

}  // namespace devpipe::cpu
