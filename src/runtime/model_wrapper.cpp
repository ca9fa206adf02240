#include "devpipe/model_wrapper.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

#include "compiler/artifact.h"
#include "compiler/shard.h"
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

struct ModelWrapper::Impl {
  Manifest manifest;
  Backend* backend = nullptr;
  std::shared_ptr<RankGroup> group;
  std::vector<safetensors::File> weight_files;          // keep the mappings alive
  std::vector<std::vector<Tensor>> rank_params;         // [rank][graph.params order]
  // executables_[bucket index][rank]
  std::vector<std::vector<std::unique_ptr<Executable>>> executables;

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
    report("traced bucket " + std::to_string(b) + " (" + std::to_string(m.buckets.back().graph.nodes.size()) + " ops)");
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

namespace {

/// One argument after ranked inputs are expanded to their outputs.
struct Arg {
  Tensor host;            // defined for host arguments (already in the stage dtype)
  const RankedTensors* ranked = nullptr;
  int output = 0;         // which output of `ranked`
};

struct Chunk {
  std::int64_t begin;  // first row of the caller's batch
  std::int64_t rows;   // real rows in this chunk
  std::size_t bucket;  // bucket index
};

}  // namespace

Output ModelWrapper::forward(const std::vector<Input>& inputs) {
  const std::string& tag = options_.tag;
  if (!impl_) {
    throw StateError(prefix(tag) + "forward() called before load(): compile(path) and load(path) the model first");
  }
  Impl& im = *impl_;
  const Manifest& m = im.manifest;
  const int tp = m.tp_degree;
  Backend& be = *im.backend;
  im.group->recover_if_failed();
  ++stats::forwards;
  timeline::Span host_span(tag.c_str(), "host", 0);

  // ---- expand and validate the arguments
  // The tasks run after forward() returns: they hold their own copy of the inputs.
  auto held = std::make_shared<const std::vector<Input>>(inputs);
  std::vector<Arg> args;
  for (const Input& in : *held) {
    if (in.is_ranked()) {
      for (int k = 0; k < in.ranked().num_outputs(); ++k) args.push_back({Tensor(), &in.ranked(), k});
    } else {
      args.push_back({in.tensor(), nullptr, 0});
    }
  }
  auto names = input_names();
  auto arg_name = [&](std::size_t i) {
    return "argument " + std::to_string(i) + " ('" + (i < m.inputs.size() ? m.inputs[i].name : std::string("?")) + "')";
  };
  if (args.size() != m.inputs.size()) {
    std::string want;
    for (const auto& io : m.inputs) want += (want.empty() ? "" : ", ") + io.name + " " + with_batch(io.sample_shape, -1).to_string();
    throw InvalidArgument(prefix(tag) + "forward() got " + std::to_string(args.size()) + " input(s), expected " +
                          std::to_string(m.inputs.size()) + " (" + want +
                          "); a ranked argument counts as its " + "number of outputs");
  }
  std::int64_t batch = -1;
  for (std::size_t i = 0; i < args.size(); ++i) {
    Arg& a = args[i];
    const StageIO& spec = m.inputs[i];
    std::int64_t rows;
    if (a.ranked) {
      const RankedTensors& r = *a.ranked;
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
        if (t.rank() < 1 || sample_shape(t.shape()) != spec.sample_shape || t.shape()[0] < r.real_batch()) {
          throw ShapeError(prefix(tag) + arg_name(i) + ": ranked tensor from '" + r.producer() + "' has shape " +
                           t.shape().to_string() + ", expected " + with_batch(spec.sample_shape, r.real_batch()).to_string() +
                           " (batch x " + spec.sample_shape.to_string() + ")");
        }
      }
      rows = r.real_batch();
    } else {
      if (!a.host.defined()) throw InvalidArgument(prefix(tag) + arg_name(i) + " is an undefined tensor");
      if (a.host.rank() < 1 || sample_shape(a.host.shape()) != spec.sample_shape) {
        throw ShapeError(prefix(tag) + arg_name(i) + " has shape " + a.host.shape().to_string() + ", expected " +
                         with_batch(spec.sample_shape, a.host.rank() >= 1 ? a.host.shape()[0] : 1).to_string() +
                         " (batch x " + spec.sample_shape.to_string() + ")");
      }
      if (a.host.dtype() != spec.dtype) {
        if (!is_floating(a.host.dtype()) || !is_floating(spec.dtype)) {
          throw DTypeError(prefix(tag) + arg_name(i) + " is " + std::string(dtype_name(a.host.dtype())) +
                           ", expected " + std::string(dtype_name(spec.dtype)));
        }
        a.host = a.host.to_host().to_dtype(spec.dtype);
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
  (void)names;

  // ---- plan chunks: the smallest bucket that fits, or chunks of the largest
  std::vector<Chunk> chunks;
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
      chunks.push_back({begin, rows, bi});
      begin += rows;
    }
  }
  const bool single = chunks.size() == 1;

  // ---- output buffers: the bucket itself when one chunk, else the caller's batch
  std::vector<std::vector<Tensor>> outs(static_cast<std::size_t>(tp));
  for (int r = 0; r < tp; ++r) {
    Device dev = be.device_for_rank(r, tp);
    for (const auto& spec : m.outputs) {
      std::int64_t rows = single ? m.buckets[chunks[0].bucket].batch : batch;
      outs[static_cast<std::size_t>(r)].push_back(be.allocate(with_batch(spec.sample_shape, rows), spec.dtype, dev));
    }
  }

  // ---- one task per rank runs every chunk
  std::vector<Event> ready;
  for (int r = 0; r < tp; ++r) {
    Event done = make_event();
    ready.push_back(done);
    Device dev = be.device_for_rank(r, tp);
    auto task = [&im, &be, r, dev, done, chunks, args, held, out = outs[static_cast<std::size_t>(r)], single,
                 tag]() mutable {
      (void)held;  // keeps the ranked inputs (and their buffers) alive until the task ran
      const Manifest& m = im.manifest;
      const bool host_shared = be.device_memory_is_host();
      timeline::Span stage_span(tag.c_str(), "stage", r + 1);
      try {
        for (const Arg& a : args) {
          if (a.ranked) a.ranked->ready(r)->wait();  // producer's failure propagates here
        }
        std::vector<Tensor> temps;  // per-chunk input/output buffers (pooled)
        std::vector<const void*> in_ptrs(args.size());
        std::vector<void*> out_ptrs(m.outputs.size());
        for (const Chunk& c : chunks) {
          std::int64_t bsz = m.buckets[c.bucket].batch;
          temps.clear();
          for (std::size_t i = 0; i < args.size(); ++i) {
            const Arg& a = args[i];
            const StageIO& spec = m.inputs[i];
            std::size_t row_bytes = static_cast<std::size_t>(spec.sample_shape.numel()) * dtype_size(spec.dtype);
            if (a.ranked) {
              const Tensor& t = (*a.ranked)[r][static_cast<std::size_t>(a.output)];
              if (t.shape()[0] >= c.begin + bsz) {
                in_ptrs[i] = static_cast<const char*>(t.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes;
                ++stats::in_place;
                timeline::instant("ranked hand-off (in place)", "handoff", r + 1);
                continue;
              }
              Tensor buf = be.allocate(with_batch(spec.sample_shape, bsz), spec.dtype, dev);
              be.copy(buf.raw_data(), dev, static_cast<const char*>(t.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes,
                      t.device(), static_cast<std::size_t>(c.rows) * row_bytes);
              be.fill_zero(static_cast<char*>(buf.raw_data()) + static_cast<std::size_t>(c.rows) * row_bytes, dev,
                           static_cast<std::size_t>(bsz - c.rows) * row_bytes);
              stats::d2d += static_cast<std::size_t>(c.rows) * row_bytes;
              ++stats::copied;
              timeline::instant("ranked hand-off (re-padded on device)", "handoff", r + 1);
              in_ptrs[i] = buf.raw_data();
              temps.push_back(std::move(buf));
            } else if (host_shared && c.rows == bsz && a.host.device().is_host()) {
              // The rank's device memory is host memory and no padding is needed: read in place.
              in_ptrs[i] = static_cast<const char*>(a.host.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes;
              ++stats::host_in_place;
            } else {
              Tensor buf = be.allocate(with_batch(spec.sample_shape, bsz), spec.dtype, dev);
              be.copy(buf.raw_data(), dev, static_cast<const char*>(a.host.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes,
                      a.host.device(), static_cast<std::size_t>(c.rows) * row_bytes);
              be.fill_zero(static_cast<char*>(buf.raw_data()) + static_cast<std::size_t>(c.rows) * row_bytes, dev,
                           static_cast<std::size_t>(bsz - c.rows) * row_bytes);
              stats::h2d += static_cast<std::size_t>(c.rows) * row_bytes;
              in_ptrs[i] = buf.raw_data();
              temps.push_back(std::move(buf));
            }
          }
          // outputs: straight into the result when the chunk fills its bucket rows
          std::vector<std::pair<std::size_t, Tensor>> staged;
          for (std::size_t o = 0; o < m.outputs.size(); ++o) {
            const StageIO& spec = m.outputs[o];
            std::size_t row_bytes = static_cast<std::size_t>(spec.sample_shape.numel()) * dtype_size(spec.dtype);
            if (single || c.rows == bsz) {
              out_ptrs[o] = static_cast<char*>(out[o].raw_data()) + (single ? 0 : static_cast<std::size_t>(c.begin) * row_bytes);
            } else {
              Tensor buf = be.allocate(with_batch(spec.sample_shape, bsz), spec.dtype, dev);
              out_ptrs[o] = buf.raw_data();
              staged.emplace_back(o, std::move(buf));
            }
          }
          {
            timeline::Span run_span(tag.c_str(), "compute", r + 1);
            im.executables[c.bucket][static_cast<std::size_t>(r)]->run(in_ptrs, out_ptrs);
          }
          for (auto& [o, buf] : staged) {
            const StageIO& spec = m.outputs[o];
            std::size_t row_bytes = static_cast<std::size_t>(spec.sample_shape.numel()) * dtype_size(spec.dtype);
            be.copy(static_cast<char*>(out[o].raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes, dev,
                    buf.raw_data(), dev, static_cast<std::size_t>(c.rows) * row_bytes);
            stats::d2d += static_cast<std::size_t>(c.rows) * row_bytes;
          }
        }
        done->signal();
      } catch (const std::exception&) {
        im.group->mark_failed();
        done->signal(std::current_exception());
      } catch (...) {
        im.group->mark_failed();
        done->signal(std::make_exception_ptr(Error(prefix(tag) + "rank " + std::to_string(r) + " failed")));
      }
    };
    im.group->stream(r).enqueue(std::move(task));
  }

  RankedTensors result(std::move(outs), batch, tag, std::move(ready));
  if (options_.pipeline_execution && !options_.return_ranked_to_cpu) return Output(std::move(result));
  try {
    return Output(result.to_host());
  } catch (...) {
    im.group->recover_if_failed();
    throw;
  }
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
