#include "devpipe/model_wrapper.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <set>

#include "compiler/artifact.h"
#include "compiler/fuse.h"
#include "compiler/shard.h"
#include "core/device_copy.h"
#include "core/pool.h"
#include "devpipe/error.h"
#include "devpipe/safetensors.h"
#include "devpipe/timeline.h"
#include "io/checkpoint.h"
#include "runtime/backend.h"
#include "runtime/rank_group.h"
#include "runtime/stats.h"
#include "runtime/stream.h"

namespace devpipe {

namespace fs = std::filesystem;

namespace {
class JobPool;
}

struct ModelWrapper::Impl {
  Manifest manifest;
  Backend* backend = nullptr;
  std::shared_ptr<RankGroup> group;
  std::vector<safetensors::File> weight_files;          // keep the mappings alive
  std::vector<std::vector<Tensor>> rank_params;         // [rank][graph.params order]
  // executables_[bucket index][rank]
  std::vector<std::vector<std::unique_ptr<Executable>>> executables;
  // Reusable per-forward state, shared with the jobs handed out (they come back to it).
  std::shared_ptr<JobPool> jobs;

  ~Impl() {
    // Executables may be referenced by queued tasks: drain the streams first.
    if (group) {
      for (int r = 0; r < group->size(); ++r) group->stream(r).synchronize();
    }
  }
};

namespace {

std::string prefix(const std::string& tag) { return "[" + tag + "] "; }

Shape sample_shape(const Shape& s) {
  return Shape(std::vector<std::int64_t>(s.dims().begin() + 1, s.dims().end()));
}

Shape with_batch(const Shape& sample, std::int64_t batch) {
  std::vector<std::int64_t> d{batch};
  d.insert(d.end(), sample.dims().begin(), sample.dims().end());
  return Shape(d);
}

std::string join(const std::vector<std::string>& xs, std::size_t max_items = 20) {
  std::string s;
  for (std::size_t i = 0; i < xs.size() && i < max_items; ++i) s += (i ? ", " : "") + xs[i];
  if (xs.size() > max_items) s += ", ... (" + std::to_string(xs.size() - max_items) + " more)";
  return s;
}

// ---- forward machinery: jobs reused from one forward to the next (no steady-state allocation)

/// One argument after ranked inputs are expanded to their outputs.
struct Arg {
  Tensor host;           // defined for host arguments (already in the stage dtype)
  RankedTensors ranked;  // non-empty for ranked arguments
  int output = 0;        // which output of `ranked`
};

struct Chunk {
  std::int64_t begin;  // first row of the caller's batch
  std::int64_t rows;   // real rows in this chunk
  std::size_t bucket;  // bucket index
};

/// What rank r's task of one forward uses; touched by the forward thread only before the task
/// is queued.
struct RankWork {
  detail::EventState done;             // rank r's outputs are written (or its failure)
  std::vector<const void*> in_ptrs;
  std::vector<void*> out_ptrs;
  std::vector<Tensor> temps;           // per-chunk input/output buffers (pooled), by index
  std::vector<std::pair<std::size_t, std::size_t>> staged;  // (output, temp index)
  Shape shape;                         // scratch
};

/// Everything one forward needs. Jobs come from the wrapper's JobPool and go back to it when
/// the last reference goes (the returned RankedTensors / Output, the queued tasks); every
/// container keeps its capacity, so a steady state of forwards allocates nothing.
struct Job {
  // Set by the forward thread before the tasks are queued.
  const Manifest* manifest = nullptr;
  Backend* backend = nullptr;
  RankGroup* group = nullptr;
  std::vector<std::vector<std::unique_ptr<Executable>>>* executables = nullptr;
  bool single = false;       // one chunk: outputs are the bucket itself
  bool host_result = false;  // forward() waits for `finished`, then copies to the host
  std::size_t num_args = 0;  // args[0, num_args) are this forward's
  std::vector<Arg> args;
  std::vector<Chunk> chunks;
  detail::RankedData result;    // outputs [rank][output] + rank events, handed out by aliasing
  std::vector<Tensor> host_out;  // host results
  std::vector<std::unique_ptr<RankWork>> ranks;
  Shape shape;  // scratch for the forward thread

  std::atomic<int> pending{0};  // tasks not finished
  detail::EventState finished;  // host_result: every task finished and let go of its references
  std::shared_ptr<Job> self;    // the queued tasks' reference; the last task drops it
  Job* next_free = nullptr;     // JobPool's free list

  Arg& arg(std::size_t i) {
    if (i == args.size()) args.emplace_back();
    return args[i];
  }

  /// Lets go of the inputs (upstream buffers and their jobs), keeping the handles' capacity.
  void drop_inputs() noexcept {
    for (Arg& a : args) {
      detail::TensorAccess::drop(a.host);
      a.ranked = RankedTensors();
    }
  }

  /// Lets go of every buffer (back to the pools) before the job waits in the free list.
  void drop_all() noexcept {
    drop_inputs();
    for (auto& outs : result.per_rank) {
      for (Tensor& t : outs) detail::TensorAccess::drop(t);
    }
    for (Tensor& t : host_out) detail::TensorAccess::drop(t);
    for (auto& w : ranks) {
      for (Tensor& t : w->temps) detail::TensorAccess::drop(t);
    }
  }
};

/// A wrapper's free jobs. Shared by the wrapper and every job handed out (their deleter brings
/// them back), so results may outlive the wrapper.
class JobPool {
 public:
  JobPool() = default;
  JobPool(const JobPool&) = delete;
  JobPool& operator=(const JobPool&) = delete;
  ~JobPool() {
    while (head_) {
      Job* next = head_->next_free;
      delete head_;
      head_ = next;
    }
  }

  /// A free job (a new one when none is free), owned by the returned pointer; its control block
  /// comes from a pool allocator, so this allocates nothing in steady state.
  static std::shared_ptr<Job> acquire(const std::shared_ptr<JobPool>& pool) {
    Job* job = nullptr;
    {
      std::lock_guard lock(pool->mu_);
      if (pool->head_) {
        job = pool->head_;
        pool->head_ = job->next_free;
        job->next_free = nullptr;
      }
    }
    if (!job) job = new Job();
    return std::shared_ptr<Job>(job, GiveBack{pool}, detail::PoolAllocator<Job>());
  }

 private:
  struct GiveBack {
    std::shared_ptr<JobPool> pool;
    void operator()(Job* job) const noexcept {
      job->drop_all();
      std::lock_guard lock(pool->mu_);
      job->next_free = pool->head_;
      pool->head_ = job;
    }
  };

  std::mutex mu_;
  Job* head_ = nullptr;
};

/// Rank r's share of a forward: every chunk through the rank's executable.
void run_chunks(Job& job, RankWork& w, int r) {
  const Manifest& m = *job.manifest;
  Backend& be = *job.backend;
  const std::string& tag = job.result.producer;
  const Device dev = be.device_for_rank(r, m.tp_degree);
  const bool host_shared = be.device_memory_is_host();
  const std::size_t nargs = job.num_args;
  const auto ru = static_cast<std::size_t>(r);
  std::vector<Tensor>& out = job.result.per_rank[ru];

  for (std::size_t i = 0; i < nargs; ++i) {
    const Arg& a = job.args[i];
    if (!a.ranked.empty()) a.ranked.ready(r)->wait();  // producer's failure propagates here
  }
  w.in_ptrs.resize(nargs);
  w.out_ptrs.resize(m.outputs.size());
  std::size_t used = 0;  // temps holding buffers of the current chunk
  for (const Chunk& c : job.chunks) {
    const std::int64_t bsz = m.buckets[c.bucket].batch;
    for (std::size_t k = 0; k < used; ++k) detail::TensorAccess::drop(w.temps[k]);
    used = 0;
    // A pooled [bsz, sample...] buffer for this chunk.
    auto temp = [&](const StageIO& spec) -> std::size_t {
      if (used == w.temps.size()) w.temps.emplace_back();
      detail::set_with_batch(w.shape, spec.sample_shape, bsz);
      be.allocate_into(w.temps[used], w.shape, spec.dtype, dev);
      return used++;
    };
    for (std::size_t i = 0; i < nargs; ++i) {
      const Arg& a = job.args[i];
      const StageIO& spec = m.inputs[i];
      const std::size_t row_bytes = static_cast<std::size_t>(spec.sample_shape.numel()) * dtype_size(spec.dtype);
      if (!a.ranked.empty()) {
        const Tensor& t = a.ranked[r][static_cast<std::size_t>(a.output)];
        if (t.shape()[0] >= c.begin + bsz) {
          w.in_ptrs[i] = static_cast<const char*>(t.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes;
          ++stats::in_place;
          timeline::instant("ranked hand-off (in place)", "handoff", r + 1);
          continue;
        }
        void* buf = w.temps[temp(spec)].raw_data();
        be.copy(buf, dev, static_cast<const char*>(t.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes,
                t.device(), static_cast<std::size_t>(c.rows) * row_bytes);
        be.fill_zero(static_cast<char*>(buf) + static_cast<std::size_t>(c.rows) * row_bytes, dev,
                     static_cast<std::size_t>(bsz - c.rows) * row_bytes);
        stats::d2d += static_cast<std::size_t>(c.rows) * row_bytes;
        ++stats::copied;
        timeline::instant("ranked hand-off (re-padded on device)", "handoff", r + 1);
        w.in_ptrs[i] = buf;
      } else if (host_shared && c.rows == bsz && a.host.device().is_host()) {
        // The rank's device memory is host memory and no padding is needed: read in place.
        w.in_ptrs[i] = static_cast<const char*>(a.host.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes;
        ++stats::host_in_place;
      } else {
        void* buf = w.temps[temp(spec)].raw_data();
        be.copy(buf, dev, static_cast<const char*>(a.host.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes,
                a.host.device(), static_cast<std::size_t>(c.rows) * row_bytes);
        be.fill_zero(static_cast<char*>(buf) + static_cast<std::size_t>(c.rows) * row_bytes, dev,
                     static_cast<std::size_t>(bsz - c.rows) * row_bytes);
        stats::h2d += static_cast<std::size_t>(c.rows) * row_bytes;
        w.in_ptrs[i] = buf;
      }
    }
    // outputs: straight into the result when the chunk fills its bucket rows
    w.staged.clear();
    for (std::size_t o = 0; o < m.outputs.size(); ++o) {
      const StageIO& spec = m.outputs[o];
      const std::size_t row_bytes = static_cast<std::size_t>(spec.sample_shape.numel()) * dtype_size(spec.dtype);
      if (job.single || c.rows == bsz) {
        w.out_ptrs[o] = static_cast<char*>(out[o].raw_data()) + (job.single ? 0 : static_cast<std::size_t>(c.begin) * row_bytes);
      } else {
        std::size_t k = temp(spec);
        w.out_ptrs[o] = w.temps[k].raw_data();
        w.staged.emplace_back(o, k);
      }
    }
    {
      timeline::Span run_span(tag.c_str(), "compute", r + 1);
      (*job.executables)[c.bucket][ru]->run(w.in_ptrs, w.out_ptrs);
    }
    for (const auto& [o, k] : w.staged) {
      const StageIO& spec = m.outputs[o];
      const std::size_t row_bytes = static_cast<std::size_t>(spec.sample_shape.numel()) * dtype_size(spec.dtype);
      be.copy(static_cast<char*>(out[o].raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes, dev,
              w.temps[k].raw_data(), dev, static_cast<std::size_t>(c.rows) * row_bytes);
      stats::d2d += static_cast<std::size_t>(c.rows) * row_bytes;
    }
  }
}

/// The stream task of rank r (context: the Job). Never throws: a failure is signalled on the
/// rank's event and aborts the communicator so that peers blocked in a collective return.
void run_rank(void* context, int r) {
  Job& job = *static_cast<Job*>(context);
  RankWork& w = *job.ranks[static_cast<std::size_t>(r)];
  std::exception_ptr error;
  {
    timeline::Span stage_span(job.result.producer.c_str(), "stage", r + 1);
    try {
      run_chunks(job, w, r);
    } catch (const std::exception&) {
      error = std::current_exception();
    } catch (...) {
      error = std::make_exception_ptr(Error(prefix(job.result.producer) + "rank " + std::to_string(r) + " failed"));
    }
  }
  for (Tensor& t : w.temps) detail::TensorAccess::drop(t);
  if (error) job.group->mark_failed();
  w.done.signal(error);

  if (job.pending.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  // The last task of the forward: let go of the inputs and of the tasks' reference.
  job.drop_inputs();
  if (job.host_result) {
    // forward() holds a reference while it waits on `finished`: this is not the last one, and
    // once forward() wakes every reference but its own is gone (deterministic reuse).
    std::shared_ptr<Job>().swap(job.self);
    job.finished.signal();
  } else {
    std::shared_ptr<Job> last = std::move(job.self);  // may return the job to its pool
  }
}

}  // namespace

ModelWrapper::ModelWrapper(const InferenceConfig& config, ModelFactory model_cls, WrapperOptions options)
    : config_(config), factory_(std::move(model_cls)), options_(std::move(options)) {
  config_.runtime_config().validate();
  if (options_.tag.empty()) throw ConfigError("a ModelWrapper needs a non-empty tag");
}

ModelWrapper::~ModelWrapper() = default;

std::vector<std::string> ModelWrapper::input_names() const {
  std::vector<std::string> names;
  for (int i = 0; i < factory_.arity(); ++i) names.push_back("input" + std::to_string(i));
  return names;
}

bool ModelWrapper::is_loaded() const { return impl_ != nullptr; }

// ------------------------------------------------------------------------------ compile

void ModelWrapper::compile(const std::string& checkpoint_path, const std::string& dir,
                           const ProgressFn& progress) {
  const RuntimeConfig& rc = config_.runtime_config();
  const std::string& tag = options_.tag;
  auto buckets = rc.batch_buckets();
  auto examples = input_generator();
  if (examples.empty() || (examples.size() != 1 && examples.size() != buckets.size())) {
    throw InvalidArgument(prefix(tag) + "input_generator() returned " + std::to_string(examples.size()) +
                          " input sets; expected 1 or one per bucket (" + std::to_string(buckets.size()) + ")");
  }
  auto names = input_names();
  int total_steps = static_cast<int>(buckets.size()) + rc.tp_degree + 1;
  int step = 0;
  auto report = [&](const std::string& what) {
    ++step;
    if (progress) progress(tag, step, total_steps, what);
  };

  std::unique_ptr<nn::Module> module = factory_.create(config_);
  Manifest m;
  m.devpipe_version = devpipe_version();
  m.tag = tag;
  m.dtype = rc.dtype;
  m.tp_degree = rc.tp_degree;
  m.pipeline_execution = options_.pipeline_execution;
  m.return_ranked_to_cpu = options_.return_ranked_to_cpu;
  m.config_json = config_.to_json();

  for (std::size_t bi = 0; bi < buckets.size(); ++bi) {
    std::int64_t b = buckets[bi];
    const auto& ex = examples.size() == 1 ? examples[0] : examples[bi];
    if (static_cast<int>(ex.size()) != factory_.arity()) {
      throw InvalidArgument(prefix(tag) + "input_generator() gives " + std::to_string(ex.size()) +
                            " inputs but the model's forward() takes " + std::to_string(factory_.arity()));
    }
    Tracer tracer({rc.tp_degree, rc.dtype, tag});
    std::vector<Var> vars;
    std::vector<StageIO> ins;
    for (std::size_t i = 0; i < ex.size(); ++i) {
      const Tensor& t = ex[i];
      std::string name = i < names.size() ? names[i] : "input" + std::to_string(i);
      if (!t.defined() || t.rank() < 1) {
        throw InvalidArgument(prefix(tag) + "example input '" + name +
                              "' must be a tensor whose first dim is the batch");
      }
      DType dt = is_floating(t.dtype()) ? rc.dtype : t.dtype();
      Shape s = with_batch(sample_shape(t.shape()), b);
      vars.push_back(tracer.input(name, s, dt));
      ins.push_back({name, sample_shape(t.shape()), dt});
    }
    std::vector<Var> outs = factory_.call(*module, vars);
    Graph g = tracer.finish(outs);
    int fused = fuse_linear_activations(g);
    std::vector<StageIO> out_specs;
    for (std::size_t o = 0; o < g.outputs.size(); ++o) {
      const ValueInfo& info = g.value(g.outputs[o]);
      if (info.shape.rank() < 1 || info.shape[0] != b) {
        throw ShapeError(prefix(tag) + "output " + std::to_string(o) + " has shape " + info.shape.to_string() +
                         "; its first dim must be the batch (" + std::to_string(b) + ")");
      }
      out_specs.push_back({"output" + std::to_string(o), sample_shape(info.shape), info.dtype});
    }
    if (bi == 0) {
      m.inputs = ins;
      m.outputs = out_specs;
    }
    m.buckets.push_back({b, std::move(g)});
    report("traced bucket " + std::to_string(b) + " (" + std::to_string(m.buckets.back().graph.nodes.size()) +
           " ops" + (fused ? ", " + std::to_string(fused) + " activation(s) fused" : std::string()) + ")");
  }

  // Weights: every parameter the graphs use, from the checkpoint, checked, converted, sharded.
  const Graph& g0 = m.buckets.front().graph;
  Checkpoint ckpt = Checkpoint::open(checkpoint_path);
  std::vector<std::string> missing, leftover;
  std::set<std::string> used;
  for (const auto& p : g0.params) {
    used.insert(p.key);
    if (!ckpt.contains(p.key)) missing.push_back(p.key);
  }
  for (const auto& k : ckpt.keys()) {
    if (!used.count(k)) leftover.push_back(k);
  }
  if (!missing.empty() || !leftover.empty()) {
    std::string msg = prefix(tag) + "checkpoint '" + checkpoint_path + "' does not match the model:";
    if (!missing.empty()) msg += " missing " + std::to_string(missing.size()) + " tensor(s): " + join(missing) + ";";
    if (!leftover.empty()) msg += " unused " + std::to_string(leftover.size()) + " tensor(s): " + join(leftover) + ";";
    throw InvalidArgument(msg);
  }
  std::vector<Tensor> full;
  for (const auto& p : g0.params) {
    Tensor t = ckpt.get(p.key);
    if (t.shape() != p.full_shape) {
      throw ShapeError(prefix(tag) + "checkpoint tensor '" + p.key + "' has shape " + t.shape().to_string() +
                       " but the model declares " + p.full_shape.to_string());
    }
    if (!is_floating(t.dtype())) {
      throw DTypeError(prefix(tag) + "checkpoint tensor '" + p.key + "' is " +
                       std::string(dtype_name(t.dtype())) + "; parameters must be floating point");
    }
    full.push_back(t.to_dtype(rc.dtype));
  }

  fs::create_directories(fs::path(dir) / "weights");
  fs::remove(fs::path(dir) / "manifest.json");  // a half-written artifact must not load
  for (int r = 0; r < rc.tp_degree; ++r) {
    std::vector<std::pair<std::string, Tensor>> shard_tensors;
    for (std::size_t i = 0; i < g0.params.size(); ++i) {
      shard_tensors.emplace_back(g0.params[i].key,
                                 shard_tensor(full[i], g0.params[i].shard_dim, rc.tp_degree, r));
    }
    std::string rel = "weights/rank" + std::to_string(r) + ".safetensors";
    std::string path = (fs::path(dir) / rel).string();
    safetensors::save(path, shard_tensors,
                      {{"tag", tag}, {"rank", std::to_string(r)}, {"tp_degree", std::to_string(rc.tp_degree)}});
    m.weights.push_back({r, rel, file_checksum(path), static_cast<std::uint64_t>(fs::file_size(path))});
    report("wrote weights for rank " + std::to_string(r));
  }
  write_manifest(dir, m);
  report("wrote manifest");
}

// --------------------------------------------------------------------------------- load

void ModelWrapper::load(const std::string& dir, const ProgressFn& progress) {
  const RuntimeConfig& rc = config_.runtime_config();
  const std::string& tag = options_.tag;
  auto impl = std::make_unique<Impl>();
  Manifest& m = impl->manifest;
  m = read_manifest(dir);
  auto mismatch = [&](const std::string& what, const std::string& artifact, const std::string& here) {
    throw ArtifactMismatch(prefix(tag) + "artifact at '" + dir + "' was compiled with " + what + " " + artifact +
                           ", but this wrapper has " + what + " " + here +
                           ": recompile with compile() or fix the config");
  };
  if (m.tag != tag) mismatch("tag", "'" + m.tag + "'", "'" + tag + "'");
  if (m.tp_degree != rc.tp_degree) mismatch("tp_degree", std::to_string(m.tp_degree), std::to_string(rc.tp_degree));
  if (m.dtype != rc.dtype) mismatch("dtype", std::string(dtype_name(m.dtype)), std::string(dtype_name(rc.dtype)));
  std::vector<std::int64_t> art_buckets;
  for (const auto& b : m.buckets) art_buckets.push_back(b.batch);
  if (art_buckets != rc.batch_buckets()) {
    mismatch("batch buckets", Shape(art_buckets).to_string(), Shape(rc.batch_buckets()).to_string());
  }
  int total = rc.tp_degree + static_cast<int>(m.buckets.size()) + 1;
  int step = 0;
  auto report = [&](const std::string& what) {
    ++step;
    if (progress) progress(tag, step, total, what);
  };

  // Weights: checksum, then map each graph parameter to its tensor in the rank's file.
  const Graph& g0 = m.buckets.front().graph;
  for (int r = 0; r < rc.tp_degree; ++r) {
    const WeightFileEntry* entry = nullptr;
    for (const auto& w : m.weights) {
      if (w.rank == r) entry = &w;
    }
    if (!entry) throw FormatError(prefix(tag) + "manifest in '" + dir + "' lists no weight file for rank " + std::to_string(r));
    std::string path = (fs::path(dir) / entry->file).string();
    std::string sum = file_checksum(path);
    if (sum != entry->checksum) {
      throw FormatError(prefix(tag) + "weight file '" + path + "' is corrupted or was modified: checksum " + sum +
                        ", the manifest records " + entry->checksum + " (" + std::to_string(entry->bytes) +
                        " bytes); recompile the model");
    }
    auto file = safetensors::File::open(path);
    std::vector<Tensor> params;
    for (const auto& p : g0.params) {
      if (!file.contains(p.key)) {
        throw FormatError(prefix(tag) + "weight file '" + path + "' lacks parameter '" + p.key + "'");
      }
      Tensor t = file.get(p.key);
      const ValueInfo& info = g0.value(p.value);
      if (t.shape() != info.shape || t.dtype() != info.dtype) {
        throw FormatError(prefix(tag) + "weight '" + p.key + "' in '" + path + "' is " + t.shape().to_string() + " " +
                          std::string(dtype_name(t.dtype())) + ", the graph expects " + info.shape.to_string() + " " +
                          std::string(dtype_name(info.dtype)));
      }
      params.push_back(std::move(t));
    }
    impl->rank_params.push_back(std::move(params));
    impl->weight_files.push_back(std::move(file));
    report("verified weights of rank " + std::to_string(r));
  }

  impl->jobs = std::make_shared<JobPool>();
  impl->backend = &backend_for(rc.device);
  impl->group = RankGroup::get(rc.device, rc.tp_degree);
  for (const auto& b : m.buckets) {
    std::vector<std::unique_ptr<Executable>> per_rank;
    for (int r = 0; r < rc.tp_degree; ++r) {
      RankInfo info{r, rc.tp_degree, &impl->group->comm(), impl->group->threads_per_rank()};
      per_rank.push_back(impl->backend->compile(b.graph, impl->rank_params[static_cast<std::size_t>(r)], info));
    }
    impl->executables.push_back(std::move(per_rank));
    report("built bucket " + std::to_string(b.batch));
  }
  impl_ = std::move(impl);

  // Warm-up: every bucket once on every rank, with zero inputs.
  for (const auto& b : m.buckets) {
    std::vector<Input> zeros;
    for (const auto& io : m.inputs) zeros.emplace_back(Tensor::zeros(with_batch(io.sample_shape, b.batch), io.dtype));
    auto saved = options_;
    options_.return_ranked_to_cpu = true;
    try {
      forward(zeros);
    } catch (...) {
      options_ = saved;
      impl_.reset();
      throw;
    }
    options_ = saved;
  }
  report("warmed up");
}

std::vector<std::int64_t> ModelWrapper::loaded_buckets() const {
  std::vector<std::int64_t> out;
  if (impl_) {
    for (const auto& b : impl_->manifest.buckets) out.push_back(b.batch);
  }
  return out;
}

std::string ModelWrapper::graph_text(std::int64_t bucket) const {
  if (!impl_) throw StateError(prefix(options_.tag) + "graph_text() before load()");
  for (const auto& b : impl_->manifest.buckets) {
    if (b.batch == bucket) return b.graph.to_text();
  }
  throw InvalidArgument(prefix(options_.tag) + "no bucket " + std::to_string(bucket));
}

// ------------------------------------------------------------------------------ forward

// The hot path: in steady state forward() makes no heap allocation. The per-forward state (the
// argument list, chunk plan, per-rank outputs, events and pointer arrays) lives in a Job reused
// from the wrapper's pool; output buffers come from the backend's caching pool into reused
// tensor handles; each rank gets a plain StreamTask; the RankedTensors / Output returned alias
// the job. Errors (exceptions, messages) may allocate: they are not the hot path.
Output ModelWrapper::forward(const std::vector<Input>& inputs) {
  const std::string& tag = options_.tag;
  if (!impl_) {
    throw StateError(prefix(tag) + "forward() called before load(): compile(path) and load(path) the model first");
  }
  Impl& im = *impl_;
  const Manifest& m = im.manifest;
  const int tp = m.tp_degree;
  const auto tpu = static_cast<std::size_t>(tp);
  Backend& be = *im.backend;
  im.group->recover_if_failed();
  ++stats::forwards;
  timeline::Span host_span(tag.c_str(), "host", 0);

  std::shared_ptr<Job> held = JobPool::acquire(im.jobs);
  Job& job = *held;
  job.manifest = &m;
  job.backend = &be;
  job.group = im.group.get();
  job.executables = &im.executables;

  // ---- expand and validate the arguments
  // The tasks run after forward() returns: the job holds its own references to the inputs.
  std::size_t nargs = 0;
  for (const Input& in : inputs) {
    if (in.is_ranked()) {
      for (int k = 0; k < in.ranked().num_outputs(); ++k) {
        Arg& a = job.arg(nargs++);
        detail::TensorAccess::drop(a.host);
        a.ranked = in.ranked();
        a.output = k;
      }
    } else {
      Arg& a = job.arg(nargs++);
      a.host = in.tensor();
      a.ranked = RankedTensors();
      a.output = 0;
    }
  }
  job.num_args = nargs;
  auto arg_name = [&](std::size_t i) {
    return "argument " + std::to_string(i) + " ('" + (i < m.inputs.size() ? m.inputs[i].name : std::string("?")) + "')";
  };
  if (nargs != m.inputs.size()) {
    std::string want;
    for (const auto& io : m.inputs) want += (want.empty() ? "" : ", ") + io.name + " " + with_batch(io.sample_shape, -1).to_string();
    throw InvalidArgument(prefix(tag) + "forward() got " + std::to_string(nargs) + " input(s), expected " +
                          std::to_string(m.inputs.size()) + " (" + want +
                          "); a ranked argument counts as its " + "number of outputs");
  }
  std::int64_t batch = -1;
  for (std::size_t i = 0; i < nargs; ++i) {
    Arg& a = job.args[i];
    const StageIO& spec = m.inputs[i];
    std::int64_t rows;
    if (!a.ranked.empty()) {
      const RankedTensors& r = a.ranked;
      if (r.num_ranks() != tp) {
        throw InvalidArgument(prefix(tag) + arg_name(i) + ": ranked tensors from '" + r.producer() + "' have " +
                              std::to_string(r.num_ranks()) + " ranks, this stage has tp_degree " + std::to_string(tp));
      }
      for (int rk = 0; rk < tp; ++rk) {
        const Tensor& t = r[rk][static_cast<std::size_t>(a.output)];
        Device want = be.device_for_rank(rk, tp);
        if (t.device() != want) {
          throw InvalidArgument(prefix(tag) + arg_name(i) + ": rank " + std::to_string(rk) + "'s tensor from '" +
                                r.producer() + "' lives on " + t.device().to_string() + ", this stage's rank " +
                                std::to_string(rk) + " runs on " + want.to_string());
        }
        if (t.dtype() != spec.dtype) {
          throw DTypeError(prefix(tag) + arg_name(i) + ": ranked tensor from '" + r.producer() + "' is " +
                           std::string(dtype_name(t.dtype())) + ", expected " + std::string(dtype_name(spec.dtype)));
        }
        if (!detail::has_sample_shape(t.shape(), spec.sample_shape) || t.shape()[0] < r.real_batch()) {
          throw ShapeError(prefix(tag) + arg_name(i) + ": ranked tensor from '" + r.producer() + "' has shape " +
                           t.shape().to_string() + ", expected " + with_batch(spec.sample_shape, r.real_batch()).to_string() +
                           " (batch x " + spec.sample_shape.to_string() + ")");
        }
      }
      rows = r.real_batch();
    } else {
      if (!a.host.defined()) throw InvalidArgument(prefix(tag) + arg_name(i) + " is an undefined tensor");
      if (!detail::has_sample_shape(a.host.shape(), spec.sample_shape)) {
        throw ShapeError(prefix(tag) + arg_name(i) + " has shape " + a.host.shape().to_string() + ", expected " +
                         with_batch(spec.sample_shape, a.host.rank() >= 1 ? a.host.shape()[0] : 1).to_string() +
                         " (batch x " + spec.sample_shape.to_string() + ")");
      }
      if (a.host.dtype() != spec.dtype) {
        if (!is_floating(a.host.dtype()) || !is_floating(spec.dtype)) {
          throw DTypeError(prefix(tag) + arg_name(i) + " is " + std::string(dtype_name(a.host.dtype())) +
                           ", expected " + std::string(dtype_name(spec.dtype)));
        }
        a.host = a.host.to_host().to_dtype(spec.dtype);  // a conversion allocates
      }
      rows = a.host.shape()[0];
    }
    if (rows < 1) throw ShapeError(prefix(tag) + arg_name(i) + " has an empty batch");
    if (batch >= 0 && rows != batch) {
      throw ShapeError(prefix(tag) + arg_name(i) + " has batch " + std::to_string(rows) + " but earlier arguments have batch " +
                       std::to_string(batch));
    }
    batch = rows;
  }

  // ---- plan chunks: the smallest bucket that fits, or chunks of the largest
  job.chunks.clear();
  {
    std::size_t nb = m.buckets.size();
    std::int64_t largest = m.buckets.back().batch;
    std::int64_t begin = 0;
    while (begin < batch) {
      std::int64_t left = batch - begin;
      std::size_t bi = nb - 1;
      for (std::size_t k = 0; k < nb; ++k) {
        if (m.buckets[k].batch >= left) {
          bi = k;
          break;
        }
      }
      std::int64_t rows = std::min(left, largest);
      job.chunks.push_back({begin, rows, bi});
      begin += rows;
    }
  }
  job.single = job.chunks.size() == 1;

  // ---- output buffers: the bucket itself when one chunk, else the caller's batch
  detail::RankedData& res = job.result;
  res.per_rank.resize(tpu);
  res.ready.resize(tpu);
  while (job.ranks.size() < tpu) job.ranks.push_back(std::make_unique<RankWork>());
  const std::int64_t out_rows = job.single ? m.buckets[job.chunks[0].bucket].batch : batch;
  for (std::size_t r = 0; r < tpu; ++r) {
    Device dev = be.device_for_rank(static_cast<int>(r), tp);
    res.per_rank[r].resize(m.outputs.size());
    for (std::size_t o = 0; o < m.outputs.size(); ++o) {
      detail::set_with_batch(job.shape, m.outputs[o].sample_shape, out_rows);
      be.allocate_into(res.per_rank[r][o], job.shape, m.outputs[o].dtype, dev);
    }
  }
  res.real_batch = batch;
  res.producer = tag;

  // ---- one task per rank runs every chunk
  job.host_result = !(options_.pipeline_execution && !options_.return_ranked_to_cpu);
  job.finished.reset();
  for (std::size_t r = 0; r < tpu; ++r) {
    job.ranks[r]->done.reset();
    res.ready[r] = &job.ranks[r]->done;
  }
  job.pending.store(tp, std::memory_order_relaxed);
  job.self = held;
  im.group->submit(&run_rank, &job);

  if (!job.host_result) {
    return Output(RankedTensors(std::shared_ptr<const detail::RankedData>(held, &job.result)));
  }

  // ---- host results: rank 0's outputs cut to the caller's batch, in pooled host memory
  job.finished.wait();
  try {
    for (std::size_t r = 0; r < tpu; ++r) {
      if (std::exception_ptr e = job.ranks[r]->done.error()) std::rethrow_exception(e);
    }
    job.host_out.resize(m.outputs.size());
    for (std::size_t o = 0; o < m.outputs.size(); ++o) {
      const Tensor& t = res.per_rank[0][o];
      detail::set_with_batch(job.shape, m.outputs[o].sample_shape, batch);
      Tensor& h = job.host_out[o];
      detail::TensorAccess::rebind_host_pool(h, job.shape, t.dtype());
      detail::copy_bytes(h.raw_data(), h.device(), t.raw_data(), t.device(), h.nbytes());
      stats::d2h += h.nbytes();
    }
  } catch (...) {
    im.group->recover_if_failed();
    throw;
  }
  // The device buffers go back to their pool now; the host copies live as long as the Output.
  for (auto& outs : res.per_rank) {
    for (Tensor& t : outs) detail::TensorAccess::drop(t);
  }
  return Output(Output::SharedHost{}, std::shared_ptr<const std::vector<Tensor>>(held, &job.host_out));
}

// -------------------------------------------------------------------------- application

ApplicationBase::ApplicationBase(std::string model_path, InferenceConfig config)
    : model_path_(std::move(model_path)), config_(std::move(config)) {}

ApplicationBase::~ApplicationBase() = default;

void ApplicationBase::compile(const std::string& compiled_model_path) {
  if (models.empty()) throw StateError("compile(): the application has no models (append wrappers to models)");
  for (const auto& w : models) {
    w->compile(model_path_, (fs::path(compiled_model_path) / w->tag()).string(), progress_);
  }
}

void ApplicationBase::load(const std::string& compiled_model_path) {
  if (models.empty()) throw StateError("load(): the application has no models (append wrappers to models)");
  for (const auto& w : models) w->load((fs::path(compiled_model_path) / w->tag()).string(), progress_);
}

}  // namespace devpipe
