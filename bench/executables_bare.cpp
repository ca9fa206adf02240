// executables_bare: a workload's compiled executables run back to back without the runtime
// (see executables_bare.h).
#include "executables_bare.h"

#include <chrono>
#include <filesystem>
#include <sstream>
#include <utility>

#include "compiler/artifact.h"
#include "compiler/batch_split.h"
#include "devpipe/config.h"
#include "devpipe/error.h"
#include "devpipe/safetensors.h"
#include "runtime/backend.h"
#include "runtime/rank_group.h"

namespace devpipe::bench {

namespace fs = std::filesystem;

namespace {

/// One stage: its executable, what it keeps alive, and its argument pointers (fixed once).
struct BareStageRun {
  std::string tag;
  std::vector<safetensors::File> files;  // the weights' mapping, viewed by `params`
  std::vector<Tensor> params;
  std::unique_ptr<Executable> exe;
  std::vector<Tensor> host_in;  // copies of the stage's host inputs
  std::vector<Tensor> outputs;  // its output buffers
  std::vector<const void*> in_ptrs;
  std::vector<void*> out_ptrs;
  int threads = 1;
};

const ArtifactBucket* find_bucket(const Manifest& m, std::int64_t batch) {
  for (const auto& b : m.buckets) {
    if (b.batch == batch) return &b;
  }
  return nullptr;
}

std::string bucket_list(const Manifest& m) {
  std::string s;
  for (const auto& b : m.buckets) s += (s.empty() ? "" : ", ") + bucket_text(b.batch, b.dims);
  return s;
}

std::string io_text(const Shape& shape, DType dtype) {
  return shape.to_string() + " " + std::string(dtype_name(dtype));
}

}  // namespace

struct ExecutablesBare::Plan {
  // Rank 0's resources (Backend::make_rank_resources), shared by every stage's executable as a
  // rank group shares them: on cpu one WorkPool per thread count for all the stages.
  std::shared_ptr<RankResources> rank0;
  std::vector<BareStageRun> stages;
};

std::string ExecutablesBare::why_not_alone(const std::string& dir, std::int64_t batch) {
  const Manifest m = read_manifest(dir);
  if (m.tp_degree == 1) return "";
  const ArtifactBucket* b = find_bucket(m, batch);
  if (!b) {
    return "artifact '" + dir + "' has no bucket of batch " + std::to_string(batch) + " (it has " +
           bucket_list(m) + ")";
  }
  const std::string dep = rank_dependence(b->graph);
  if (dep.empty()) return "";
  return "stage '" + m.tag + "' (artifact '" + dir + "') at tp_degree " +
         std::to_string(m.tp_degree) + " needs every rank: " + dep;
}

ExecutablesBare::ExecutablesBare(const std::vector<std::string>& artifact_dirs, std::int64_t batch,
                                 const std::vector<std::vector<Tensor>>& host_inputs)
    : plan_(std::make_unique<Plan>()) {
  if (artifact_dirs.empty()) throw InvalidArgument("executables_bare: no stage artifacts given");
  if (host_inputs.size() != artifact_dirs.size()) {
    throw InvalidArgument("executables_bare: " + std::to_string(artifact_dirs.size()) +
                          " stage artifacts but " + std::to_string(host_inputs.size()) +
                          " lists of host inputs");
  }
  std::ostringstream what;
  int tp = 0;
  std::vector<int> threads;
  for (std::size_t i = 0; i < artifact_dirs.size(); ++i) {
    const std::string& dir = artifact_dirs[i];
    const Manifest m = read_manifest(dir);
    const std::string where = "executables_bare: stage " + std::to_string(i) + " '" + m.tag +
                              "' (artifact '" + dir + "')";
    const ArtifactBucket* bucket = find_bucket(m, batch);
    if (!bucket) {
      throw InvalidArgument(where + " has no bucket of batch " + std::to_string(batch) +
                            " (it has " + bucket_list(m) + ")");
    }
    if (const std::string why = why_not_alone(dir, batch); !why.empty()) {
      throw InvalidArgument("executables_bare: rank 0 cannot run " + why);
    }
    if (!m.states.empty()) {
      throw InvalidArgument(where + " has " + std::to_string(m.states.size()) + " state(s) ('" +
                            m.states.front().name +
                            "', ...); executables_bare runs stateless stages only");
    }
    const Graph& g = bucket->graph;
    const RuntimeConfig rc = InferenceConfig::from_json(m.config_json).runtime_config();
    Backend& backend = backend_for(rc.device);
    if (!backend.device_memory_is_host()) {
      throw InvalidArgument(
          where + " is compiled for " + std::string(device_kind_name(rc.device)) +
          "; executables_bare runs backends whose device memory is the host's (cpu)");
    }
    const Device dev = backend.device_for_rank(0, m.tp_degree);

    BareStageRun s;
    s.tag = m.tag;
    // Rank 0's weights, as load() reads them: checksum, then a view per graph parameter.
    const WeightFileEntry* entry = nullptr;
    for (const auto& w : m.weights) {
      if (w.rank == 0) entry = &w;
    }
    if (!entry) throw FormatError(where + ": the manifest lists no weight file for rank 0");
    const std::string real = resolve_artifact_file(dir, entry->file);
    if (const std::string sum = file_checksum(real); sum != entry->checksum) {
      throw FormatError(where + ": weight file '" + real + "' has checksum " + sum +
                        ", the manifest records " + entry->checksum);
    }
    s.files.push_back(safetensors::File::open(real));
    for (const auto& p : g.params) {
      Tensor t =
          s.files.back().get(p.key);  // InvalidArgument naming the file and the key when absent
      const ValueInfo& info = g.value(p.value);
      if (t.shape() != info.shape || t.dtype() != info.dtype) {
        throw FormatError(where + ": weight '" + p.key + "' is " + io_text(t.shape(), t.dtype()) +
                          ", the graph expects " + io_text(info.shape, info.dtype));
      }
      s.params.push_back(std::move(t));
    }
    s.threads = threads_per_rank(rc);
    if (!plan_->rank0) plan_->rank0 = backend.make_rank_resources(0, dev);
    s.exe = backend.compile(g, s.params, RankInfo{0, m.tp_degree, nullptr, s.threads, nullptr, plan_->rank0});

    // Inputs: the previous stage's output buffer, then this stage's host inputs.
    std::size_t data_inputs = 0;
    for (const auto& in : g.inputs) data_inputs += in.is_state() ? 0 : 1;
    const std::size_t from_prev = i > 0 ? 1 : 0;
    if (data_inputs != from_prev + host_inputs[i].size()) {
      throw InvalidArgument(where + " takes " + std::to_string(data_inputs) + " input(s), given " +
                            (i > 0 ? "the previous stage's output and " : "") +
                            std::to_string(host_inputs[i].size()) + " host input(s)");
    }
    auto expect = [&](std::size_t k, const Shape& shape, DType dtype,
                      const std::string& what_input) {
      const ValueInfo& info = g.value(g.inputs[k].value);
      if (shape != info.shape || dtype != info.dtype) {
        throw ShapeError(where + " input " + std::to_string(k) + " ('" + g.inputs[k].name +
                         "'): " + what_input + " is " + io_text(shape, dtype) +
                         ", the graph takes " + io_text(info.shape, info.dtype));
      }
    };
    if (i > 0) {
      const BareStageRun& prev = plan_->stages.back();
      if (prev.outputs.size() != 1) {
        throw InvalidArgument(where + ": the previous stage '" + prev.tag + "' has " +
                              std::to_string(prev.outputs.size()) +
                              " outputs; the pipeline hands on one");
      }
      expect(0, prev.outputs[0].shape(), prev.outputs[0].dtype(), "the previous stage's output");
      s.in_ptrs.push_back(prev.outputs[0].raw_data());
    }
    for (std::size_t k = 0; k < host_inputs[i].size(); ++k) {
      const Tensor& h = host_inputs[i][k];
      expect(from_prev + k, h.shape(), h.dtype(), "host input " + std::to_string(k));
      if (!h.device().is_host())
        throw InvalidArgument(where + ": host input " + std::to_string(k) + " is not on the host");
      Tensor buf = backend.allocate(h.shape(), h.dtype(), dev);
      backend.copy(buf.raw_data(), dev, h.raw_data(), Device::cpu(), h.nbytes());
      s.in_ptrs.push_back(buf.raw_data());
      s.host_in.push_back(std::move(buf));
    }
    for (int out : g.outputs) {
      const ValueInfo& info = g.value(out);
      s.outputs.push_back(backend.allocate(info.shape, info.dtype, dev));
      s.out_ptrs.push_back(s.outputs.back().raw_data());
    }
    if (s.outputs.empty()) throw InvalidArgument(where + " has no output");

    tp = m.tp_degree;
    threads.push_back(s.threads);
    what << " " << m.tag << "[";
    for (std::size_t n = 0; n < g.nodes.size(); ++n)
      what << (n ? "+" : "") << op_name(g.nodes[n].op);
    what << ", " << s.threads << " thread(s)]";
    plan_->stages.push_back(std::move(s));
  }
  std::ostringstream head;
  head << "executables_bare: " << plan_->stages.size() << " stage(s) from "
       << fs::path(artifact_dirs.front()).parent_path().string() << ", rank 0 of tp " << tp
       << (tp > 1 ? " (replicated stages)" : "") << ", batch " << batch << ":" << what.str();
  what_ = head.str();
}

ExecutablesBare::~ExecutablesBare() = default;

std::vector<double> ExecutablesBare::run(int iters) {
  if (iters < 1)
    throw InvalidArgument("executables_bare: iters must be >= 1, got " + std::to_string(iters));
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(iters));
  for (int it = 0; it < iters; ++it) {
    const auto t0 = std::chrono::steady_clock::now();
    for (BareStageRun& s : plan_->stages) s.exe->run(s.in_ptrs, s.out_ptrs);
    const auto t1 = std::chrono::steady_clock::now();
    samples.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return samples;
}

std::vector<float> ExecutablesBare::output() const {
  return plan_->stages.back().outputs.front().to_float_vector();
}

int ExecutablesBare::threads() const { return plan_->stages.front().threads; }

}  // namespace devpipe::bench
