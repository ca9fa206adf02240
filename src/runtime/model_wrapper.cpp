#include "devpipe/model_wrapper.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <set>

#include "compiler/artifact.h"
#include "compiler/batch_split.h"
#include "compiler/fold.h"
#include "compiler/fuse.h"
#include "compiler/shard.h"
#include "core/log.h"
#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/safetensors.h"
#include "devpipe/timeline.h"
#include "devpipe/trace.h"
#include "devpipe/world.h"
#include "graph/cost.h"
#include "io/checkpoint.h"
#include "runtime/backend.h"
#include "runtime/checkpoint_keys.h"
#include "runtime/mpi.h"
#include "runtime/rank_group.h"
#include "runtime/state_store.h"
#include "runtime/wrapper_impl.h"

namespace devpipe {

namespace fs = std::filesystem;
using namespace wrapper_detail;

namespace {
std::string ms_since(std::chrono::steady_clock::time_point start) {
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
  return std::to_string(us.count() / 1000) + "." + std::to_string(us.count() / 100 % 10) + " ms";
}

/// One thing the processes of a multi-process world must agree on: (what, value).
using Fact = std::pair<std::string, std::string>;

std::string message_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

/// A meeting point of every process (ranks as processes; a no-op but the rethrow in one
/// process): they exchange `facts` (what each is about to do) and whether they `failed` so far.
/// This process's own failure is rethrown; a peer's becomes a CollectiveError naming the process
/// and its message; differing facts an ArtifactMismatch naming the fact, both values and both
/// processes. So all processes leave it the same way, and none is left waiting in a collective
/// the others never reach. `bounded`: wait at most the collective timeout.
void sync_processes(const World& world, const std::string& tag, const std::string& call,
                    const std::vector<Fact>& facts, const std::exception_ptr& failed,
                    bool bounded = true) {
  if (!world.multi_process()) {
    if (failed) std::rethrow_exception(failed);
    return;
  }
  nlohmann::json mine = {{"error", failed ? nlohmann::json(message_of(failed)) : nlohmann::json()},
                         {"facts", facts}};
  const std::vector<std::string> all =
      mpi::all_gather_text(mine.dump(), bounded ? world.collective_timeout_s() : 0);
  if (failed) std::rethrow_exception(failed);
  const std::string here = "this process (" + std::to_string(world.process()) + " of " +
                           std::to_string(world.num_processes()) + ")";
  for (std::size_t q = 0; q < all.size(); ++q) {
    const nlohmann::json theirs = nlohmann::json::parse(all[q]);
    if (!theirs.at("error").is_null()) {
      throw CollectiveError(prefix(tag) + call + " failed on process " + std::to_string(q) + ": " +
                            theirs.at("error").get<std::string>());
    }
  }
  for (std::size_t q = 0; q < all.size(); ++q) {
    const auto theirs = nlohmann::json::parse(all[q]).at("facts").get<std::vector<Fact>>();
    if (theirs.empty() || facts.empty()) continue;
    for (std::size_t k = 0; k < facts.size() && k < theirs.size(); ++k) {
      if (theirs[k] != facts[k]) {
        throw ArtifactMismatch(prefix(tag) + call + ": process " + std::to_string(q) + " has " +
                               theirs[k].first + " " + theirs[k].second + ", " + here + " has " +
                               facts[k].first + " " + facts[k].second +
                               ": every process must run the same program on the same "
                               "artifact and config");
      }
    }
  }
}

/// What the processes loading one stage must agree on.
std::vector<Fact> load_facts(const Manifest& m) {
  std::string buckets, weights;
  for (const auto& b : m.buckets)
    buckets += (buckets.empty() ? "" : ", ") + std::to_string(b.batch);
  for (const auto& w : m.weights) weights += (weights.empty() ? "" : ", ") + w.checksum;
  return {{"tag", "'" + m.tag + "'"},
          {"tp_degree", std::to_string(m.tp_degree)},
          {"dtype", std::string(dtype_name(m.dtype))},
          {"batch buckets", "[" + buckets + "]"},
          {"weights with checksums", "[" + weights + "]"}};
}
}  // namespace


ModelWrapper::ModelWrapper(const InferenceConfig& config, ModelFactory model_cls, WrapperOptions options)
    : config_(config), factory_(std::move(model_cls)), options_(std::move(options)) {
  config_.runtime_config().validate();
  if (options_.tag.empty()) throw ConfigError("a ModelWrapper needs a non-empty tag");
  make_key_rules(options_.ignore_checkpoint_keys, {});  // a bad pattern is an error here already
}

ModelWrapper::~ModelWrapper() = default;

std::vector<std::string> ModelWrapper::input_names() const {
  std::vector<std::string> names;
  for (int i = 0; i < factory_.arity(); ++i) names.push_back("input" + std::to_string(i));
  return names;
}

bool ModelWrapper::is_loaded() const { return impl_ != nullptr; }

// ------------------------------------------------------------------------------ compile

namespace {

/// Every bucket of a wrapper: the batch buckets times every combination of the sizes of the
/// named dims its inputs use (sorted by batch, then by the named sizes).
std::vector<ArtifactBucket> plan_buckets(const RuntimeConfig& rc, const std::vector<std::string>& used,
                                         const std::string& tag) {
  auto named = rc.named_buckets();
  std::vector<ArtifactBucket> out;
  for (std::int64_t b : rc.batch_buckets()) out.push_back({b, {}, {}});
  for (const std::string& name : used) {
    auto it = named.find(name);
    if (it == named.end()) {
      std::string have;
      for (const auto& [k, v] : named) have += (have.empty() ? "" : ", ") + k;
      throw ConfigError(prefix(tag) + "input_dims() names the dim '" + name +
                        "', but the config's dim_buckets has no sizes for it (it has: " +
                        (have.empty() ? std::string("none") : have) + ")");
    }
    std::vector<ArtifactBucket> next;
    for (const auto& b : out) {
      for (std::int64_t size : it->second) {
        ArtifactBucket nb = b;
        nb.dims[name] = size;
        next.push_back(std::move(nb));
      }
    }
    out = std::move(next);
  }
  return out;
}

/// Checks a wrapper's dim names for `count` tensors (`what`: "input" / "output") and returns
/// them (the legacy [batch, fixed...] when `dims` is empty).
std::vector<std::vector<std::string>> checked_dims(const std::vector<std::vector<std::string>>& dims,
                                                   const std::vector<int>& ranks, const char* what,
                                                   const std::string& tag) {
  std::vector<std::vector<std::string>> out;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    std::vector<std::string> d(static_cast<std::size_t>(ranks[i]));
    if (!d.empty()) d[0] = "batch";
    if (!dims.empty()) {
      if (dims.size() != ranks.size()) {
        throw InvalidArgument(prefix(tag) + std::string(what) + "_dims() names the dims of " +
                              std::to_string(dims.size()) + " " + what + "s, the stage has " +
                              std::to_string(ranks.size()));
      }
      if (static_cast<int>(dims[i].size()) != ranks[i] || dims[i].empty() || dims[i][0] != "batch") {
        throw InvalidArgument(prefix(tag) + std::string(what) + " " + std::to_string(i) + ": " + what +
                              "_dims() gives " + std::to_string(dims[i].size()) + " names for a rank-" +
                              std::to_string(ranks[i]) + " tensor; dim 0 must be named \"batch\"");
      }
      for (std::size_t k = 1; k < dims[i].size(); ++k) {
        if (dims[i][k] == "batch") {
          throw InvalidArgument(prefix(tag) + std::string(what) + " " + std::to_string(i) + ": only dim 0 can be \"batch\"");
        }
        d[k] = dims[i][k];
      }
    }
    out.push_back(std::move(d));
  }
  return out;
}

/// The StageIO of a tensor of `shape` whose dims are named `dims` (dims[0] = "batch").
StageIO stage_io(const std::string& name, const Shape& shape, DType dtype, const std::vector<std::string>& dims) {
  StageIO io{name, {}, dtype, {}};
  bool named = false;
  for (std::size_t k = 1; k < dims.size(); ++k) named = named || !dims[k].empty();
  for (std::size_t k = 1; k < dims.size(); ++k) {
    io.sample_shape.dims().push_back(dims[k].empty() ? shape[k] : -1);
    if (named) io.dims.push_back(dims[k]);
  }
  return io;
}

using StageInputs = std::vector<std::pair<std::string, ValueInfo>>;

/// Traces `module` on `inputs`; with rows_per_rank > 0, each rank's share of the batch: the
/// inputs sliced by rank, the outputs all-gathered.
Graph trace_stage(const ModelFactory& factory, nn::Module& module, const RuntimeConfig& rc,
                  const std::string& tag, const StageInputs& inputs, std::int64_t rows_per_rank) {
  Tracer tracer({rc.tp_degree, rc.dtype, tag});
  std::vector<Var> vars;
  for (const auto& [name, info] : inputs) {
    Var v = tracer.input(name, info.shape, info.dtype);
    if (rows_per_rank > 0) {  // rank r takes rows [r * rows_per_rank, (r + 1) * rows_per_rank)
      Attrs a;
      a.set("dim", std::int64_t{0}).set("start", std::int64_t{0}).set("end", rows_per_rank)
          .set("step", std::int64_t{1}).set("rank_stride", rows_per_rank);
      v = tracer.emit(OpKind::Slice, {v}, a);
    }
    vars.push_back(v);
  }
  std::vector<Var> outs = factory.call(module, vars);
  if (rows_per_rank > 0) {
    for (Var& o : outs) {
      if (o.rank() < 1 || o.dim(0) != rows_per_rank) {
        throw ShapeError(prefix(tag) + "output of " + o.shape().to_string() +
                         " does not keep the batch rows apart");
      }
      o = F::all_gather(o, 0);
    }
  }
  return tracer.finish(outs);
}

/// The stage traced split over the ranks (see trace_stage), or nullopt when the model does not
/// trace that way or the split graph's outputs or parameters differ from `replicated`'s.
std::optional<Graph> try_trace_split(const ModelFactory& factory, nn::Module& module,
                                     const RuntimeConfig& rc, const std::string& tag,
                                     const StageInputs& inputs, std::int64_t rows_per_rank,
                                     const Graph& replicated) {
  Graph split;
  try {
    split = trace_stage(factory, module, rc, tag, inputs, rows_per_rank);
  } catch (const Error&) {
    return std::nullopt;  // the model fixes its batch size somewhere: stay replicated
  }
  // The same results, batch for batch: same outputs and the same parameters.
  if (split.outputs.size() != replicated.outputs.size() ||
      split.params.size() != replicated.params.size()) {
    return std::nullopt;
  }
  for (std::size_t i = 0; i < split.outputs.size(); ++i) {
    if (!(split.value(split.outputs[i]) == replicated.value(replicated.outputs[i]))) {
      return std::nullopt;
    }
  }
  for (std::size_t i = 0; i < split.params.size(); ++i) {
    if (split.params[i].key != replicated.params[i].key) return std::nullopt;
  }
  // The same ops in the same order between the input slices and the output gathers (the model
  // takes no other path for fewer rows, so batch_split_blocker's verdict on `replicated` holds).
  const std::size_t n_in = inputs.size(), n_out = split.outputs.size();
  if (split.nodes.size() != replicated.nodes.size() + n_in + n_out) return std::nullopt;
  for (std::size_t i = 0; i < replicated.nodes.size(); ++i) {
    if (split.nodes[n_in + i].op != replicated.nodes[i].op) return std::nullopt;
  }
  return split;
}

}  // namespace

void ModelWrapper::compile(const std::string& checkpoint_path, const std::string& dir,
                           const ProgressFn& progress) {
  const World& world = World::get();
  if (!world.multi_process()) {
    compile_in_process(checkpoint_path, dir, progress);
    return;
  }
  // Ranks as processes: the processes agree on what is compiled, process 0 writes the artifact
  // (the others would race on `dir`), and its outcome is every process's. Waiting for it is not
  // bounded by the collective timeout: a compile may take long.
  const std::string& tag = options_.tag;
  const std::string call = "compile('" + checkpoint_path + "', '" + dir + "')";
  const RuntimeConfig& rc = config_.runtime_config();
  sync_processes(world, tag, call,
                 {{"tag", "'" + tag + "'"},
                  {"tp_degree", std::to_string(rc.tp_degree)},
                  {"dtype", std::string(dtype_name(rc.dtype))},
                  {"batch_size", std::to_string(rc.batch_size)},
                  {"batch buckets", Shape(rc.batch_buckets()).to_string()},
                  {"config", config_.to_json()},
                  {"checkpoint", "'" + checkpoint_path + "'"},
                  {"artifact dir", "'" + dir + "'"}},
                 nullptr);
  std::exception_ptr failed;
  if (world.process() == 0) {
    try {
      compile_in_process(checkpoint_path, dir, progress);
    } catch (...) {
      failed = std::current_exception();
    }
  }
  sync_processes(world, tag, call, {}, failed, /*bounded=*/false);
}

void ModelWrapper::compile_in_process(const std::string& checkpoint_path, const std::string& dir,
                                      const ProgressFn& progress) {
  const RuntimeConfig& rc = config_.runtime_config();
  const std::string& tag = options_.tag;
  auto examples = input_generator();
  if (examples.empty()) throw InvalidArgument(prefix(tag) + "input_generator() returned no input sets");
  auto names = input_names();
  const std::vector<bool> keep_dtype = keep_input_dtype();
  std::vector<int> in_ranks;
  for (const Tensor& t : examples[0]) in_ranks.push_back(t.defined() ? t.rank() : 0);
  auto in_dims = checked_dims(input_dims(), in_ranks, "input", tag);
  std::vector<std::string> named;
  for (const auto& d : in_dims) {
    for (std::size_t k = 1; k < d.size(); ++k) {
      if (!d[k].empty() && std::find(named.begin(), named.end(), d[k]) == named.end()) named.push_back(d[k]);
    }
  }
  std::sort(named.begin(), named.end());
  std::vector<ArtifactBucket> buckets = plan_buckets(rc, named, tag);
  if (examples.size() != 1 && examples.size() != buckets.size()) {
    throw InvalidArgument(prefix(tag) + "input_generator() returned " + std::to_string(examples.size()) +
                          " input sets; expected 1 or one per bucket (" + std::to_string(buckets.size()) + ")");
  }
  int total_steps = static_cast<int>(buckets.size()) + rc.tp_degree + 1;
  int step = 0;
  const auto start = std::chrono::steady_clock::now();
  auto report = [&](const std::string& what) {
    ++step;
    log::debug(prefix(tag) + "compile: " + what);
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

  // Folding linear chains needs the weights while the graphs are rewritten: the checkpoint is
  // opened first and its keys matched against the unfolded model's (the same strict check as
  // below); the keys whose tensors were folded away count as used.
  std::optional<Checkpoint> fold_ckpt;
  std::map<std::string, std::string> fold_source;  // model key -> checkpoint key
  std::vector<std::string> unfolded_keys;
  auto fold_value = [&](const GraphParam& p) -> Tensor {
    auto it = fold_source.find(p.key);
    if (it == fold_source.end()) throw Error(prefix(tag) + "fold_linear_chains: no checkpoint tensor for '" + p.key + "'");
    Tensor t = fold_ckpt->get(it->second);
    if (!is_floating(t.dtype())) {
      throw DTypeError(prefix(tag) + "checkpoint tensor '" + it->second + "' is " + std::string(dtype_name(t.dtype())) +
                       "; parameters must be floating point");
    }
    return t;
  };

  for (std::size_t bi = 0; bi < buckets.size(); ++bi) {
    ArtifactBucket& bucket = buckets[bi];
    const std::int64_t b = bucket.batch;
    const auto& ex = examples.size() == 1 ? examples[0] : examples[bi];
    if (static_cast<int>(ex.size()) != factory_.arity()) {
      throw InvalidArgument(prefix(tag) + "input_generator() gives " + std::to_string(ex.size()) +
                            " inputs but the model's forward() takes " + std::to_string(factory_.arity()));
    }
    std::vector<StageIO> ins;
    StageInputs in_infos;
    for (std::size_t i = 0; i < ex.size(); ++i) {
      const Tensor& t = ex[i];
      std::string name = i < names.size() ? names[i] : "input" + std::to_string(i);
      if (!t.defined() || t.rank() < 1 || t.rank() != static_cast<int>(in_dims[i].size())) {
        throw InvalidArgument(prefix(tag) + "example input '" + name +
                              "' must be a tensor whose first dim is the batch" +
                              (t.defined() ? " (of rank " + std::to_string(in_dims[i].size()) + ")" : std::string()));
      }
      const bool keep = i < keep_dtype.size() && keep_dtype[i];
      DType dt = is_floating(t.dtype()) && !keep ? rc.dtype : t.dtype();
      StageIO io = stage_io(name, t.shape(), dt, in_dims[i]);
      in_infos.push_back({name, {bucket_shape(io, bucket), dt}});
      ins.push_back(std::move(io));
    }
    Graph g = trace_stage(factory_, *module, rc, tag, in_infos, 0);
    bool split_batch = false;
    // A stage with no parallel layers would compute everything on every rank: each rank runs
    // its share of the batch instead and the ranks all-gather the outputs (only where every
    // output row depends on its input row alone and the stage has no state).
    if (rc.tp_degree > 1 && b % rc.tp_degree == 0) {
      const std::string blocker = batch_split_blocker(g, b);
      if (!blocker.empty()) {
        log::debug(prefix(tag) + "bucket " + bucket_text(b, bucket.dims) + " stays replicated: " + blocker);
      } else if (auto split = try_trace_split(factory_, *module, rc, tag, in_infos, b / rc.tp_degree, g)) {
        g = std::move(*split);
        split_batch = true;
      }
    }
    FoldCounts folded;
    if (rc.fold_linear_chains) {
      if (!fold_ckpt) {
        fold_ckpt = Checkpoint::open(checkpoint_path);
        for (const auto& p : g.params) {
          if (!p.constant) unfolded_keys.push_back(p.key);
        }
        const std::vector<std::string> src = match_checkpoint_keys(
            *fold_ckpt, unfolded_keys,
            make_key_rules(options_.ignore_checkpoint_keys, options_.checkpoint_key_map), prefix(tag));
        for (std::size_t k = 0; k < unfolded_keys.size(); ++k) fold_source[unfolded_keys[k]] = src[k];
      }
      // Only the cpu backend has the conv_patch_mean kernel; every backend runs a Linear.
      folded = fold_linear_chains(g, fold_value, rc.device == DeviceKind::Cpu);
    }
    int fused = fuse_linear_activations(g);
    // Only the cpu backend has a fused conv + pool kernel; the cuda backend keeps the pair.
    int pooled = rc.device == DeviceKind::Cpu ? fuse_conv_global_avg_pool(g) : 0;
    std::vector<int> out_ranks;
    for (int v : g.outputs) out_ranks.push_back(g.value(v).shape.rank());
    auto out_dims = checked_dims(output_dims(), out_ranks, "output", tag);
    std::vector<StageIO> out_specs;
    for (std::size_t o = 0; o < g.outputs.size(); ++o) {
      const ValueInfo& info = g.value(g.outputs[o]);
      if (info.shape.rank() < 1 || info.shape[0] != b) {
        throw ShapeError(prefix(tag) + "output " + std::to_string(o) + " has shape " + info.shape.to_string() +
                         "; its first dim must be the batch (" + std::to_string(b) + ")");
      }
      StageIO io = stage_io("output" + std::to_string(o), info.shape, info.dtype, out_dims[o]);
      if (bucket_shape(io, bucket) != info.shape) {
        throw ShapeError(prefix(tag) + "output " + std::to_string(o) + " has shape " + info.shape.to_string() +
                         " in bucket " + bucket_text(b, bucket.dims) + ", but output_dims() names a dim whose size differs");
      }
      out_specs.push_back(std::move(io));
    }
    std::vector<StateSpec> states;
    for (const auto& in : g.inputs) {
      if (in.is_state()) states.push_back({in.name, g.value(in.value).shape, g.value(in.value).dtype});
    }
    if (bi == 0) {
      m.inputs = ins;
      m.outputs = out_specs;
      m.states = states;
    } else if (states != m.states) {
      throw ShapeError(prefix(tag) + "bucket " + bucket_text(b, bucket.dims) + " declares other states than bucket " +
                       bucket_text(m.buckets[0].batch, m.buckets[0].dims) +
                       ": a stage's states must not depend on the bucket");
    }
    // Every bucket's graph against the specs (an undeclared bucketed output dim shows here).
    bucket.graph = std::move(g);
    try {
      validate_stage_graph(bucket.graph, bucket, m, prefix(tag) + "bucket " + bucket_text(b, bucket.dims));
    } catch (const FormatError& e) {
      throw ShapeError(std::string(e.what()) + " (declare bucketed output dims with output_dims())");
    }
    m.buckets.push_back(std::move(bucket));
    report("traced bucket " + bucket_text(b, m.buckets.back().dims) + " (" +
           std::to_string(m.buckets.back().graph.nodes.size()) + " ops" +
           (folded.patch_means ? ", " + std::to_string(folded.patch_means) + " conv + pool folded into patch means" : std::string()) +
           (folded.linear_pairs ? ", " + std::to_string(folded.linear_pairs) + " Linear pair(s) folded" : std::string()) +
           (fused ? ", " + std::to_string(fused) + " activation(s) fused" : std::string()) +
           (pooled ? ", " + std::to_string(pooled) + " conv + pool fused" : std::string()) +
           (split_batch ? ", batch split over " + std::to_string(rc.tp_degree) + " ranks" : std::string()) +
           ")");
  }

  // Weights: every parameter the graphs use, from the checkpoint, checked, converted, sharded.
  const Graph& g0 = m.buckets.front().graph;
  // The checkpoint folding opened already, or opened now.
  Checkpoint ckpt = fold_ckpt ? std::move(*fold_ckpt) : Checkpoint::open(checkpoint_path);
  // Module buffers (constant params) take their values from the model, not the checkpoint.
  std::vector<std::string> model_keys;
  for (const auto& p : g0.params) {
    if (!p.constant) model_keys.push_back(p.key);
  }
  for (const std::string& k : unfolded_keys) {  // folded away: used by the folded constants
    if (std::find(model_keys.begin(), model_keys.end(), k) == model_keys.end()) model_keys.push_back(k);
  }
  const std::vector<std::string> source = match_checkpoint_keys(
      ckpt, model_keys, make_key_rules(options_.ignore_checkpoint_keys, options_.checkpoint_key_map), prefix(tag));
  std::vector<Tensor> full;
  std::size_t next_source = 0;
  for (std::size_t i = 0; i < g0.params.size(); ++i) {
    const auto& p = g0.params[i];
    if (p.constant) {
      full.push_back(g0.constants.at(p.key));
      continue;
    }
    const std::string& src = source[next_source++];
    const std::string named = src == p.key ? "'" + p.key + "'" : "'" + src + "' (for '" + p.key + "')";
    Tensor t = ckpt.get(src);
    if (t.shape() != p.full_shape) {
      throw ShapeError(prefix(tag) + "checkpoint tensor " + named + " has shape " + t.shape().to_string() +
                       " but the model declares " + p.full_shape.to_string());
    }
    if (!is_floating(t.dtype())) {
      throw DTypeError(prefix(tag) + "checkpoint tensor " + named + " is " +
                       std::string(dtype_name(t.dtype())) + "; parameters must be floating point");
    }
    full.push_back(t.to_dtype(rc.dtype));
  }

  // Written beside `dir`, then renamed into place: a compile that fails half-way (a full disk,
  // an exception) leaves the previous artifact there as it was.
  replace_artifact_dir(dir, [&](const std::string& out) {
    fs::create_directories(fs::path(out) / "weights");
    for (int r = 0; r < rc.tp_degree; ++r) {
      std::vector<std::pair<std::string, Tensor>> shard_tensors;
      for (std::size_t i = 0; i < g0.params.size(); ++i) {
        shard_tensors.emplace_back(g0.params[i].key,
                                   shard_tensor(full[i], g0.params[i].shard_dim, rc.tp_degree, r));
      }
      std::string rel = "weights/rank" + std::to_string(r) + ".safetensors";
      std::string path = (fs::path(out) / rel).string();
      safetensors::save(path, shard_tensors,
                        {{"tag", tag}, {"rank", std::to_string(r)}, {"tp_degree", std::to_string(rc.tp_degree)}});
      m.weights.push_back({r, rel, file_checksum(path), static_cast<std::uint64_t>(fs::file_size(path))});
      report("wrote weights for rank " + std::to_string(r));
    }
    write_manifest(out, m);
  });
  report("wrote manifest");
  std::string bucket_list;
  for (const auto& b : m.buckets) {
    bucket_list += (bucket_list.empty() ? "" : b.dims.empty() ? ", " : "; ") + bucket_text(b.batch, b.dims);
  }
  log::info(prefix(tag) + "compiled " + std::to_string(m.buckets.size()) + " bucket(s) [" + bucket_list +
            "], tp_degree " + std::to_string(rc.tp_degree) + ", " +
            std::string(dtype_name(rc.dtype)) + ", " + std::to_string(g0.params.size()) +
            " parameter(s) from '" + checkpoint_path + "' into '" + dir + "' in " + ms_since(start));
}

// --------------------------------------------------------------------------------- load

void ModelWrapper::load(const std::string& dir, const ProgressFn& progress) {
  const RuntimeConfig& rc = config_.runtime_config();
  const std::string& tag = options_.tag;
  // No forward() may run while impl_ is replaced: refuse when one does, and make those that
  // start from now on refuse (see CallGuard).
  bool was_loading = false;
  if (!loading_.compare_exchange_strong(was_loading, true)) {
    throw StateError(prefix(tag) + "load('" + dir + "') called while another load() runs on this wrapper");
  }
  struct Done {
    std::atomic<bool>& loading;
    ~Done() { loading.store(false); }
  } done{loading_};
  if (int n = calls_in_flight_.load(); n > 0) {
    throw StateError(prefix(tag) + "load('" + dir + "') called while " + std::to_string(n) +
                     " forward() call(s) run on this wrapper in other threads: let them return first "
                     "(or load into another wrapper)");
  }
  auto impl = std::make_unique<Impl>();
  Manifest& m = impl->manifest;
  const World& world = World::get();
  const std::string call = "load('" + dir + "')";
  std::vector<std::int64_t> art_buckets;
  std::exception_ptr failed;
  try {
    m = read_manifest(dir);
    auto mismatch = [&](const std::string& what, const std::string& artifact,
                        const std::string& here) {
      throw ArtifactMismatch(prefix(tag) + "artifact at '" + dir + "' was compiled with " + what +
                             " " + artifact + ", but this wrapper has " + what + " " + here +
                             ": recompile with compile() or fix the config");
    };
    if (m.tag != tag) mismatch("tag", "'" + m.tag + "'", "'" + tag + "'");
    if (m.tp_degree != rc.tp_degree)
      mismatch("tp_degree", std::to_string(m.tp_degree), std::to_string(rc.tp_degree));
    if (m.dtype != rc.dtype)
      mismatch("dtype", std::string(dtype_name(m.dtype)), std::string(dtype_name(rc.dtype)));
    const bool art_folded = InferenceConfig::from_json(m.config_json).runtime_config().fold_linear_chains;
    if (art_folded != rc.fold_linear_chains) {
      mismatch("fold_linear_chains", art_folded ? "on" : "off", rc.fold_linear_chains ? "on" : "off");
    }
    std::map<std::string, std::vector<std::int64_t>> art_named;
    for (const auto& b : m.buckets) {
      art_buckets.push_back(b.batch);
      for (const auto& [name, size] : b.dims) art_named[name].push_back(size);
    }
    auto distinct = [](std::vector<std::int64_t> v) {
      std::sort(v.begin(), v.end());
      v.erase(std::unique(v.begin(), v.end()), v.end());
      return v;
    };
    if (distinct(art_buckets) != rc.batch_buckets()) {
      mismatch("batch buckets", Shape(distinct(art_buckets)).to_string(),
               Shape(rc.batch_buckets()).to_string());
    }
    const auto named_config = rc.named_buckets();
    for (const auto& [name, sizes] : art_named) {
      auto it = named_config.find(name);
      Shape here = it == named_config.end() ? Shape() : Shape(it->second);
      if (Shape(distinct(sizes)) != here) {
        mismatch("'" + name + "' buckets", Shape(distinct(sizes)).to_string(),
                 it == named_config.end() ? std::string("none") : here.to_string());
      }
    }
  } catch (...) {
    failed = std::current_exception();
  }
  // Every process must load the same artifact with the same config: they compare what they
  // read before any of them builds (or a process that failed here would leave the others
  // waiting in the warm-up's collectives).
  sync_processes(world, tag, call, failed ? std::vector<Fact>{} : load_facts(m), failed);
  const std::vector<int> local = world.local_ranks(rc.tp_degree);
  int total = static_cast<int>(local.size()) + static_cast<int>(m.buckets.size()) + 1;
  int step = 0;
  const auto start = std::chrono::steady_clock::now();
  auto report = [&](const std::string& what) {
    ++step;
    log::debug(prefix(tag) + "load: " + what);
    if (progress) progress(tag, step, total, what);
  };

  // Weights: checksum, then map each graph parameter to its tensor in the rank's file; only the
  // ranks this process runs.
  const auto tpu = static_cast<std::size_t>(rc.tp_degree);
  std::vector<std::vector<Tensor>> scratch(tpu);
  try {
    const Graph& g0 = m.buckets.front().graph;
    impl->rank_params.resize(tpu);
    for (int r : local) {
      const WeightFileEntry* entry = nullptr;
      for (const auto& w : m.weights) {
        if (w.rank == r) entry = &w;
      }
      if (!entry)
        throw FormatError(prefix(tag) + "manifest in '" + dir + "' lists no weight file for rank " +
                          std::to_string(r));
      std::string path = (fs::path(dir) / entry->file).string();
      // Inside the artifact and a regular file, before anything is opened.
      const std::string real = resolve_artifact_file(dir, entry->file);
      std::string sum = file_checksum(real);
      if (sum != entry->checksum) {
        throw FormatError(prefix(tag) + "weight file '" + path +
                          "' is corrupted or was modified: checksum " + sum +
                          ", the manifest records " + entry->checksum + " (" +
                          std::to_string(entry->bytes) + " bytes); recompile the model");
      }
      auto file = safetensors::File::open(real);
      std::vector<Tensor> params;
      for (const auto& p : g0.params) {
        if (!file.contains(p.key)) {
          throw FormatError(prefix(tag) + "weight file '" + path + "' lacks parameter '" + p.key +
                            "'");
        }
        Tensor t = file.get(p.key);
        const ValueInfo& info = g0.value(p.value);
        if (t.shape() != info.shape || t.dtype() != info.dtype) {
          throw FormatError(prefix(tag) + "weight '" + p.key + "' in '" + path + "' is " +
                            t.shape().to_string() + " " + std::string(dtype_name(t.dtype())) +
                            ", the graph expects " + info.shape.to_string() + " " +
                            std::string(dtype_name(info.dtype)));
        }
        params.push_back(std::move(t));
      }
      impl->rank_params[static_cast<std::size_t>(r)] = std::move(params);
      impl->weight_files.push_back(std::move(file));
      report("verified weights of rank " + std::to_string(r));
    }

    impl->jobs = make_job_pool();
    impl->backend = &backend_for(rc.device);
    impl->group = RankGroup::get(rc.device, rc.tp_degree);
    const std::vector<Device>& devices = impl->group->devices();
    impl->rank_device.assign(tpu, Device{});
    for (std::size_t i = 0; i < local.size(); ++i) impl->rank_device[static_cast<std::size_t>(local[i])] = devices[i];
    // Whether the local ranks share one device whose memory is the host's (Impl::once).
    const bool shared_memory =
        devices.size() > 1 && impl->backend->device_memory_is_host() &&
        std::all_of(devices.begin(), devices.end(), [&](const Device& d) { return d == devices.front(); });
    for (const auto& b : m.buckets) {
      std::vector<std::unique_ptr<Executable>> per_rank(tpu);
      for (int r : local) {
        const RankInfo info = impl->group->rank_info(r, threads_per_rank(rc));
        per_rank[static_cast<std::size_t>(r)] =
            impl->backend->compile(b.graph, impl->rank_params[static_cast<std::size_t>(r)], info);
      }
      impl->executables.push_back(std::move(per_rank));
      impl->once.push_back(shared_memory && rank_dependence(b.graph).empty());
      const GraphCost cost = graph_cost(b.graph);
      impl->light.push_back(impl->backend->runs_on_calling_thread() && cost.flops <= kLightFlops &&
                            cost.min_bytes() + cost.intermediate_bytes <= kLightBytes);
      report("built bucket " + bucket_text(b.batch, b.dims));
    }
    // Named dims: one index per name, the full shapes of every bucket.
    for (const auto* ios : {&m.inputs, &m.outputs}) {
      for (const StageIO& io : *ios) {
        for (const std::string& d : io.dims) {
          if (!d.empty() &&
              std::find(impl->named.begin(), impl->named.end(), d) == impl->named.end()) {
            impl->named.push_back(d);
          }
        }
      }
    }
    std::sort(impl->named.begin(), impl->named.end());
    impl->has_named = !impl->named.empty();
    auto name_index = [&](const std::vector<StageIO>& ios) {
      std::vector<std::vector<int>> out;
      for (const StageIO& io : ios) {
        std::vector<int> idx(io.sample_shape.dims().size(), -1);
        for (std::size_t k = 0; k < io.dims.size(); ++k) {
          if (io.dims[k].empty()) continue;
          idx[k] = static_cast<int>(std::find(impl->named.begin(), impl->named.end(), io.dims[k]) -
                                    impl->named.begin());
        }
        out.push_back(std::move(idx));
      }
      return out;
    };
    impl->in_named = name_index(m.inputs);
    impl->out_named = name_index(m.outputs);
    for (const auto& b : m.buckets) {
      std::vector<Shape> ins, outs;
      for (const auto& io : m.inputs) ins.push_back(bucket_shape(io, b));
      for (const auto& io : m.outputs) outs.push_back(bucket_shape(io, b));
      impl->in_shapes.push_back(std::move(ins));
      impl->out_shapes.push_back(std::move(outs));
      std::vector<std::int64_t> sizes;
      for (const auto& name : impl->named) {
        auto it = b.dims.find(name);
        if (it == b.dims.end()) {
          throw FormatError(prefix(tag) + "artifact at '" + dir + "': bucket " +
                            bucket_text(b.batch, b.dims) + " has no size for the named dim '" +
                            name + "'");
        }
        sizes.push_back(it->second);
      }
      impl->bucket_named.push_back(std::move(sizes));
    }

    // States: the store's buffers on every rank (allocated by the first stage that names them).
    impl->states = states_ ? states_ : std::make_shared<StateStore>();
    impl->state_bufs.assign(tpu, {});
    for (const StateSpec& st : m.states) {
      std::vector<Tensor> bufs = impl->states->impl_->acquire(st.name, st.shape, st.dtype,
                                                              rc.tp_degree, *impl->backend, tag);
      for (int r : local)
        impl->state_bufs[static_cast<std::size_t>(r)].push_back(bufs[static_cast<std::size_t>(r)]);
    }
    // Warm-up runs on scratch states: whatever the graphs write there is thrown away.
    impl->state_ptrs.assign(tpu, {});
    for (int rk : local) {
      const auto r = static_cast<std::size_t>(rk);
      Device dev = impl->backend->device_for_rank(rk, rc.tp_degree);
      for (const StateSpec& st : m.states) {
        scratch[r].push_back(impl->backend->allocate(st.shape, st.dtype, dev));
        impl->backend->fill_zero(scratch[r].back().raw_data(), dev,
                                 static_cast<std::size_t>(st.shape.numel()) * dtype_size(st.dtype));
        impl->state_ptrs[r].push_back(scratch[r].back().raw_data());
      }
    }
  } catch (...) {
    failed = std::current_exception();
  }
  // Before the warm-up's collectives: did every process get this far?
  sync_processes(world, tag, call, {}, failed);

  // Warm-up: every bucket once on every rank, with zero inputs, waited for. A failure leaves
  // the wrapper as it was.
  for (const auto& b : m.buckets) {
    std::vector<Input> zeros;
    for (const auto& io : m.inputs) zeros.emplace_back(Tensor::zeros(bucket_shape(io, b), io.dtype));
    Output out = run_forward(*impl, zeros);
    if (out.is_ranked()) out.ranked().wait();
  }
  for (int rk : local) {
    const auto r = static_cast<std::size_t>(rk);
    for (std::size_t k = 0; k < m.states.size(); ++k) impl->state_ptrs[r][k] = impl->state_bufs[r][k].raw_data();
  }
  impl_ = std::move(impl);
  states_ = impl_->states;
  report("warmed up");
  log::info(prefix(tag) + "loaded '" + dir + "': bucket(s) " + Shape(art_buckets).to_string() + ", tp_degree " +
            std::to_string(rc.tp_degree) + " on " + std::string(device_kind_name(rc.device)) + ", " +
            std::to_string(threads_per_rank(rc)) + " thread(s) per rank, in " + ms_since(start));
}

void ModelWrapper::set_state_store(std::shared_ptr<StateStore> store) { states_ = std::move(store); }

std::vector<std::int64_t> ModelWrapper::loaded_buckets() const {
  CallGuard guard(calls_in_flight_, loading_, options_.tag, "loaded_buckets()");
  std::vector<std::int64_t> out;
  if (impl_) {
    for (const auto& b : impl_->manifest.buckets) out.push_back(b.batch);
  }
  return out;
}

std::string ModelWrapper::graph_text(std::int64_t bucket) const {
  CallGuard guard(calls_in_flight_, loading_, options_.tag, "graph_text()");
  if (!impl_) throw StateError(prefix(options_.tag) + "graph_text() before load()");
  for (const auto& b : impl_->manifest.buckets) {
    if (b.batch == bucket) return b.graph.to_text();
  }
  throw InvalidArgument(prefix(options_.tag) + "no bucket " + std::to_string(bucket));
}

// -------------------------------------------------------------------------- application

ApplicationBase::ApplicationBase(std::string model_path, InferenceConfig config)
    : model_path_(std::move(model_path)), config_(std::move(config)), states_(std::make_shared<StateStore>()) {}

ApplicationBase::~ApplicationBase() = default;

void ApplicationBase::compile(const std::string& compiled_model_path) {
  if (models.empty()) throw StateError("compile(): the application has no models (append wrappers to models)");
  for (const auto& w : models) {
    const std::string& own = w->options().checkpoint_path;
    w->compile(own.empty() ? model_path_ : own, (fs::path(compiled_model_path) / w->tag()).string(), progress_);
  }
}

void ApplicationBase::load(const std::string& compiled_model_path) {
  if (models.empty()) throw StateError("load(): the application has no models (append wrappers to models)");
  for (const auto& w : models) {
    w->set_state_store(states_);
    w->load((fs::path(compiled_model_path) / w->tag()).string(), progress_);
  }
}

}  // namespace devpipe
