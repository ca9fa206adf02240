// devpipe bench — the benchmark workloads through devpipe (pipeline and round-trip mode), the
// two floors (the bare oneDNN primitives, and devpipe's own compiled executables without the
// runtime), PyTorch and ONNX Runtime, as persistent workers timed in alternating rounds
// on the same weights and inputs, every output checked against devpipe's; the machine's limits
// (peak FMA throughput, memory bandwidth) measured first and each workload's roofline reported.
// Writes a JSON report and a latency plot. See bench/README.md.
#include <omp.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <type_traits>

#include "cli_common.h"
#include "compiler/artifact.h"
#include "devpipe/devpipe.h"
#include "devpipe/models/dit.h"
#include "devpipe/models/llama.h"
#include "devpipe/models/llava.h"
#include "devpipe/timeline.h"
#include "executables_bare.h"
#include "graph/cost.h"
#include "kernels_bare.h"
#include "machine_limits.h"
#include "peers.h"
#include "run_info.h"
#include "svg_plot.h"
#include "vision_text/models.h"
#include "workloads.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace devpipe::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct Stage {
  std::string tag;
  std::string weights_file;  // relative to the workload's weights dir
  std::function<std::unique_ptr<nn::Module>(const InferenceConfig&)> model;
  std::function<std::unique_ptr<ModelWrapper>(const InferenceConfig&, WrapperOptions)> wrapper;
  std::function<Graph(const InferenceConfig&)> trace;  // the stage's graph at tp 1
};

struct Workload {
  std::string name;        // report key
  std::string peer_name;   // the peers' --workload and kernels_bare's workload
  InferenceConfig config;
  std::vector<Stage> stages;
  std::vector<std::vector<Tensor>> extra;  // host inputs of each stage (stage i>0 also gets stage i-1's output)
  bool boundary_overhead = false;
  bool time_peers = true;  // false: the peers and kernels_bare run once, for the output check only
};

template <class M>
Stage stage(const std::string& tag, const std::string& file, std::vector<Tensor> example) {
  return Stage{tag, file, [](const InferenceConfig& c) { return model_cls<M>().create(c); },
               [example](const InferenceConfig& c, WrapperOptions o) -> std::unique_ptr<ModelWrapper> {
                 return std::make_unique<bench::BenchWrapper<M>>(c, std::move(o), example);
               },
               [example, tag](const InferenceConfig& c) {
                 const ModelFactory f = model_cls<M>();
                 std::unique_ptr<nn::Module> m = f.create(c);
                 Tracer tracer({1, DType::Float32, tag});
                 std::vector<Var> vars;
                 for (std::size_t i = 0; i < example.size(); ++i) {
                   vars.push_back(tracer.input("input" + std::to_string(i), example[i].shape(), example[i].dtype()));
                 }
                 return tracer.finish(f.call(*m, vars));
               }};
}

Workload make_workload(const std::string& name) {
  if (name == "seed_tp1" || name == "seed_tp2") {
    int tp = name == "seed_tp1" ? 1 : 2;
    Workload w{name, "seed", vision_text::seed_config(32, tp), {}, {}, false, tp == 1};
    Tensor image = Tensor::randn({32, 3, 224, 224}, 42), text = Tensor::randn({32, 256}, 43);
    w.stages.push_back(stage<vision_text::VisionModel>("vision_model", "vision.safetensors", {image}));
    w.stages.push_back(stage<vision_text::TextModel>("text_model", "text.safetensors",
                                                     {Tensor::zeros({32, 512}), text}));
    w.extra = {{image}, {text}};
    return w;
  }
  if (name == "large") {
    Workload w{name, "large", InferenceConfig(RuntimeConfig{.batch_size = 32, .tp_degree = 1}), {}, {}, false, true};
    Tensor x = Tensor::randn({32, 1440, 8}, 44);
    w.stages.push_back(stage<bench::Expand>("expand", "expand.safetensors", {x}));
    w.stages.push_back(stage<bench::Reduce>("reduce", "reduce.safetensors", {Tensor::zeros({32, 1440, 1280})}));
    w.extra = {{x}, {}};
    return w;
  }
  if (name == "chain8") {
    Workload w{name, "chain8", InferenceConfig(RuntimeConfig{.batch_size = 1, .tp_degree = 2}), {}, {}, true, true};
    Tensor x = Tensor::randn({1, 64}, 45);
    for (int i = 0; i < 8; ++i) {
      w.stages.push_back(stage<bench::ChainStage>("stage" + std::to_string(i), "stage" + std::to_string(i) + ".safetensors", {x}));
      w.extra.push_back(i == 0 ? std::vector<Tensor>{x} : std::vector<Tensor>{});
    }
    return w;
  }
  throw InvalidArgument("unknown workload '" + name + "' (seed_tp1, seed_tp2, large, chain8; 'seed' means both seed ones)");
}

/// The workload's host inputs in the order the whole pipeline takes them (input0, input1, ...).
std::vector<Tensor> pipeline_inputs(const Workload& w) {
  std::vector<Tensor> v;
  for (const auto& e : w.extra) v.insert(v.end(), e.begin(), e.end());
  return v;
}

json latency_json(const std::vector<double>& samples) {
  LatencyStats s = summarize(samples);
  return {{"min", s.min}, {"p50", s.p50}, {"p90", s.p90}, {"p95", s.p95},
          {"p99", s.p99}, {"max", s.max},  {"mean", s.mean}};
}

/// Runs the stages once: stage 0 on its host inputs, each next stage on the previous output
/// plus its own host inputs. Returns the final host output.
/// `between` (optional) accumulates the bytes copied at stage boundaries: every stage's
/// device-to-device copies (re-padding) and every non-final stage's device-to-host copies.
Tensor run_chain(std::vector<std::unique_ptr<ModelWrapper>>& ws, const Workload& w,
                 std::uint64_t* between = nullptr) {
  // No waits here: that would serialise the pipeline being timed. A non-final stage's copies
  // to the host happen inside its forward() (it returns host tensors); re-padding copies on the
  // devices are taken over the whole chain, complete once the final output is.
  const TransferStats start = transfer_stats();
  Output prev;
  // The argument list keeps its capacity from one call to the next, as a caller in a loop would
  // keep it: the harness allocates nothing per stage.
  thread_local std::vector<Input> args;
  for (std::size_t i = 0; i < ws.size(); ++i) {
    args.clear();
    if (i > 0) args.push_back(prev);
    for (const Tensor& t : w.extra[i]) args.emplace_back(t);
    const std::uint64_t d2h = transfer_stats().device_to_host_bytes;
    prev = ws[i]->forward(args);
    if (between && i + 1 < ws.size()) *between += transfer_stats().device_to_host_bytes - d2h;
  }
  args.clear();  // holds no stage's results past the chain
  Tensor out = prev.tensor();
  if (between) *between += transfer_stats().device_to_device_bytes - start.device_to_device_bytes;
  return out;
}

/// Where stage `i` of `w` is compiled for the mode labelled `label`:
/// work/artifacts/<workload>/<label>/<stage>.
std::string artifact_dir(const Workload& w, const std::string& work, const std::string& label, std::size_t i) {
  return (fs::path(work) / "artifacts" / w.name / label / w.stages[i].tag).string();
}

/// A wrapper of stage `i` of `w`, compiled from its checkpoint under work/weights/<workload> into
/// artifact_dir(w, work, label, i): with `pipeline`, stages hand ranked outputs on; without,
/// every stage returns to the host. The tag gets `tag_suffix`.
std::unique_ptr<ModelWrapper> compile_stage(const Workload& w, std::size_t i, bool pipeline, const std::string& work,
                                            const std::string& label, const std::string& tag_suffix) {
  const std::string wdir = (fs::path(work) / "weights" / w.name).string();
  const bool last = i + 1 == w.stages.size();
  auto wr = w.stages[i].wrapper(w.config, {.pipeline_execution = pipeline, .return_ranked_to_cpu = last,
                                           .tag = w.stages[i].tag + tag_suffix});
  wr->compile(wdir + "/" + w.stages[i].weights_file, artifact_dir(w, work, label, i));
  return wr;
}

/// Compiles (compile_stage) and loads every stage of `w`.
std::vector<std::unique_ptr<ModelWrapper>> build_stages(const Workload& w, bool pipeline, const std::string& work,
                                                        const std::string& label, const std::string& tag_suffix) {
  std::vector<std::unique_ptr<ModelWrapper>> ws;
  for (std::size_t i = 0; i < w.stages.size(); ++i) {
    auto wr = compile_stage(w, i, pipeline, work, label, tag_suffix);
    wr->load(artifact_dir(w, work, label, i));
    ws.push_back(std::move(wr));
  }
  return ws;
}

void add_bytes(TransferStats& acc, const TransferStats& a, const TransferStats& b) {
  acc.host_to_device_bytes += b.host_to_device_bytes - a.host_to_device_bytes;
  acc.device_to_host_bytes += b.device_to_host_bytes - a.device_to_host_bytes;
  acc.device_to_device_bytes += b.device_to_device_bytes - a.device_to_device_bytes;
}

double process_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

// ---- the workers: one per mode, built once, run round after round ----------------------------

/// One timed round: a wall-clock sample per forward and the CPU time the whole round took.
struct Round {
  std::vector<double> samples_ms;
  double cpu_ms = 0;
};

class Worker {
 public:
  explicit Worker(std::string mode) : mode_(std::move(mode)) {}
  virtual ~Worker() = default;
  const std::string& mode() const { return mode_; }
  /// Runs `iters` forwards back to back.
  virtual Round run(int iters) = 0;
  /// The final output of the last run, row-major float32.
  virtual std::vector<float> output() = 0;
  /// What the report says about this worker besides its times (threads, version, ...).
  virtual json info() { return json::object(); }

 private:
  std::string mode_;
};

/// The workload as a mode compiles it: `folded` with RuntimeConfig::fold_linear_chains.
Workload as_mode(const Workload& w, const std::string& mode) {
  Workload m = w;
  m.config.mutable_runtime_config().fold_linear_chains = mode == "folded";
  if (mode == "pipeline_tp1") m.config.mutable_runtime_config().tp_degree = 1;  // seed_tp2's tp 1 companion
  return m;
}

/// pipeline / roundtrip / folded (pipeline with the linear chains folded): the compiled stages
/// in this process.
class DevpipeWorker : public Worker {
 public:
  DevpipeWorker(const std::string& mode, const Workload& w, const std::string& work)
      : Worker(mode), w_(as_mode(w, mode)), wrappers_(build_stages(w_, mode != "roundtrip", work, mode, "@" + mode)) {}
  Round run(int iters) override {
    Round r;
    const TransferStats before = transfer_stats();
    const double c0 = process_cpu_ms();
    for (int i = 0; i < iters; ++i) {
      const auto t0 = Clock::now();
      last_ = run_chain(wrappers_, w_, &between_);
      r.samples_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
    }
    r.cpu_ms = process_cpu_ms() - c0;
    add_bytes(bytes_, before, transfer_stats());
    forwards_ += static_cast<std::uint64_t>(iters);
    return r;
  }
  std::vector<float> output() override { return last_.to_float_vector(); }
  json info() override {
    json j{{"threads", "one thread per rank, " + std::to_string(w_.config.runtime_config().tp_degree) + " rank(s)"}};
    if (forwards_ > 0) {
      j["bytes_host_device"] = (bytes_.host_to_device_bytes + bytes_.device_to_host_bytes) / forwards_;
      j["bytes_between_stages"] = between_ / forwards_;
    }
    return j;
  }
  /// Per-stage compute ms of rank 0 over `iters` forwards recorded with the timeline (untimed).
  /// With more than one rank, `by_rank` gets each rank's compute per forward: the time of its
  /// stages' compute spans less the time its collectives spent in them (waiting for the other
  /// ranks), plus the time it ran a peer's tasks while it waited there (`help` spans, inside
  /// the collective's); `help_by_rank` gets that last part alone. A static split of equal shares
  /// spreads as far as the cores do; with the ranks helping each other (HelpBoard) the one that
  /// finished first takes over part of the other's share.
  json stage_compute_ms(int iters, json* by_rank = nullptr, json* help_by_rank = nullptr) {
    timeline::start(false);
    for (int i = 0; i < iters; ++i) run_chain(wrappers_, w_);
    timeline::stop();
    std::map<std::string, double> us;
    std::map<int, double> own_us;   // track (rank + 1) -> compute less collective plus help us
    std::map<int, double> help_us;  // track -> help us
    for (const auto& e : timeline::events()) {
      if (e.track < 1) continue;
      if (e.category == "collective") own_us[e.track] -= e.dur_us;
      if (e.category == "help") {
        own_us[e.track] += e.dur_us;
        help_us[e.track] += e.dur_us;
      }
      if (e.category != "compute") continue;
      const auto at = e.name.find('@');
      if (at == std::string::npos || e.name.substr(at + 1) != mode()) continue;
      own_us[e.track] += e.dur_us;
      if (e.track == 1) us[e.name.substr(0, at)] += e.dur_us;
    }
    json j = json::object();
    for (const auto& [tag, v] : us) j[tag] = v / iters / 1000.0;
    if (by_rank && own_us.size() > 1) {
      *by_rank = json::array();
      if (help_by_rank) *help_by_rank = json::array();
      for (const auto& [track, v] : own_us) {
        by_rank->push_back(v / iters / 1000.0);
        if (help_by_rank) help_by_rank->push_back(help_us[track] / iters / 1000.0);
      }
    }
    return j;
  }

 private:
  const Workload w_;
  std::vector<std::unique_ptr<ModelWrapper>> wrappers_;
  Tensor last_;
  TransferStats bytes_{};
  std::uint64_t between_ = 0, forwards_ = 0;
};

/// One round of a floor run in this process (KernelsBare, ExecutablesBare): its samples and the
/// process's CPU time over them.
template <class Floor>
Round floor_round(Floor& floor, int iters) {
  Round r;
  const double c0 = process_cpu_ms();
  r.samples_ms = floor.run(iters);
  r.cpu_ms = process_cpu_ms() - c0;
  return r;
}

/// kernels_bare: the oneDNN primitives alone, on the same weights and inputs.
class BareWorker : public Worker {
 public:
  BareWorker(const Workload& w, const bench::BareData& data, int threads)
      : Worker("kernels_bare"), bare_(w.peer_name, threads, data), threads_(threads) {}
  Round run(int iters) override { return floor_round(bare_, iters); }
  std::vector<float> output() override { return bare_.output(); }
  json info() override { return {{"what", bare_.what()}, {"threads", threads_}}; }

 private:
  bench::KernelsBare bare_;
  int threads_;
};

/// executables_bare: the pipeline mode's compiled stages run by the backend alone, back to back
/// (bench/executables_bare.h). It reads the pipeline mode's artifacts when that mode was built
/// (`pipeline_built`), else compiles its own with the pipeline's options; where rank 0 cannot run
/// a stage of the workload's tp degree alone (a stage split over the ranks, with collectives),
/// it compiles the workload at tp 1 instead and says so in `note`.
class ExecutablesBareWorker : public Worker {
 public:
  ExecutablesBareWorker(const Workload& w, const std::string& work, bool pipeline_built)
      : Worker("executables_bare"), bare_(artifacts(w, work, pipeline_built, note_), batch(w), w.extra) {}
  Round run(int iters) override { return floor_round(bare_, iters); }
  std::vector<float> output() override { return bare_.output(); }
  json info() override {
    json j{{"what", bare_.what()}, {"threads", bare_.threads()}};
    if (!note_.empty()) j["note"] = note_;
    return j;
  }

 private:
  static std::int64_t batch(const Workload& w) { return w.config.runtime_config().batch_size; }
  static std::vector<std::string> artifacts(const Workload& w, const std::string& work, bool pipeline_built,
                                            std::string& note) {
    const std::string label = pipeline_built ? "pipeline" : "executables_bare";
    std::vector<std::string> dirs;
    std::string blocked;
    for (std::size_t i = 0; i < w.stages.size(); ++i) {
      if (!pipeline_built) compile_stage(w, i, /*pipeline=*/true, work, label, "@executables_bare");
      dirs.push_back(artifact_dir(w, work, label, i));
      if (blocked.empty()) blocked = bench::ExecutablesBare::why_not_alone(dirs.back(), batch(w));
    }
    if (blocked.empty()) return dirs;
    Workload tp1 = w;
    tp1.config.mutable_runtime_config().tp_degree = 1;
    note = "compiled at tp 1 for this mode, since " + blocked;
    dirs.clear();
    for (std::size_t i = 0; i < w.stages.size(); ++i) {
      compile_stage(tp1, i, /*pipeline=*/true, work, "executables_bare_tp1", "@executables_bare");
      dirs.push_back(artifact_dir(tp1, work, "executables_bare_tp1", i));
    }
    return dirs;
  }
  std::string note_;  // set by artifacts(), before bare_ is built
  bench::ExecutablesBare bare_;
};

/// pytorch_eager / onnxruntime: a child process on the worker protocol.
class PeerWorker : public Worker {
 public:
  PeerWorker(const std::string& mode, const std::vector<std::string>& argv, const std::string& log,
             std::string output_path)
      : Worker(mode), child_(mode, argv, log), output_path_(std::move(output_path)) {}
  Round run(int iters) override {
    json r = child_.request({{"cmd", "run"}, {"iters", iters}});
    return {r.at("samples_ms").get<std::vector<double>>(), r.at("cpu_ms").get<double>()};
  }
  std::vector<float> output() override {
    child_.request({{"cmd", "output"}, {"path", output_path_}});
    auto all = safetensors::load_all(output_path_);
    auto it = all.find("output");
    if (it == all.end()) throw StateError("bench: peer " + mode() + " wrote no tensor 'output' to " + output_path_);
    return it->second.to_float_vector();
  }
  json info() override {
    return {{"threads", child_.hello().value("threads", 0)},
            {"version", child_.hello().value("version", std::string("?"))}};
  }

 private:
  bench::ChildWorker child_;
  std::string output_path_;
};

// ---- the machine and the run -----------------------------------------------------------------

/// A number for the tables: 3 significant decimals below 10, fewer above.
std::string fmt_number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, std::fabs(v) < 10 ? "%.3f" : (std::fabs(v) < 1000 ? "%.1f" : "%.0f"), v);
  return buf;
}

/// A time in ms for the tables, in a column of 10: 3 decimals, 4 below 0.1 ms (chain8's
/// microseconds), so that times a few tenths of a microsecond apart print apart.
std::string fmt_ms(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, std::fabs(v) < 0.1 ? "%10.4f" : "%10.3f", v);
  return buf;
}

/// Runs `cmd` through the shell; returns its exit status and its stdout+stderr in `out`.
int run_command(const std::string& cmd, std::string& out) {
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return -1;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  int rc = ::pclose(p);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

/// The last non-empty line of a command's output (where the scripts put their message), at
/// most `max_chars` long: a skip reason fits on one line of the table.
std::string last_line(const std::string& s, std::size_t max_chars = 400) {
  std::string t = s;
  while (!t.empty() && (t.back() == '\n' || t.back() == ' ')) t.pop_back();
  const auto nl = t.rfind('\n');
  if (nl != std::string::npos) t = t.substr(nl + 1);
  return t.size() > max_chars ? t.substr(0, max_chars) + "..." : t;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

/// The pause before each mode's turn in a round (see run_workload).
constexpr std::chrono::milliseconds kSettle{50};

/// How far the limits measured at the end may differ from the start's (relative) before the run's
/// roofline ratios are flagged.
constexpr double kLimitsMoved = 0.15;

json machine_json(const bench::MachineLimits& lim) {
  json m = bench::host_json();
  m["isa_flags"] = bench::cpu_isa_flags();
  m["limits"] = {{"peak_fp32_gflops", lim.peak_gflops},
                 {"peak_fp32_gflops_wall_clock", lim.peak_gflops_wall},
                 {"fma_loop", lim.fma_isa},
                 {"triad_gb_per_s", lim.triad_gbs},
                 {"triad_gb_per_s_wall_clock", lim.triad_gbs_wall},
                 {"contended", lim.contended()},
                 {"triad_bytes", lim.triad_bytes},
                 {"threads", lim.threads},
                 {"measured_in_s", lim.seconds}};
  return m;
}

json run_json(int threads) {
  json r = bench::run_json((fs::path(DEVPIPE_BENCH_DIR) / "..").lexically_normal().string());
  r["threads"] = {{"hardware", std::thread::hardware_concurrency()},
                  {"omp_max", omp_get_max_threads()},
                  {"kernels_bare", threads},
                  {"pytorch", threads},
                  {"onnxruntime_intra_op", threads}};
  return r;
}

/// The ONNX Runtime peer's install: the folder holding node_modules, or why there is none.
struct OrtInstall {
  std::string dir;
  std::string skipped;  // non-empty: the reason the onnxruntime mode is skipped
};

OrtInstall install_ort(const std::string& dest) {
  std::string out;
  const std::string script = (fs::path(DEVPIPE_BENCH_DIR) / "ort" / "install.sh").string();
  std::cerr << "installing ONNX Runtime (npm onnxruntime-node) into " << dest << " ...\n";
  int rc = run_command("bash " + shell_quote(script) + " " + shell_quote(dest), out);
  if (rc != 0) return {"", "bench/ort/install.sh failed (exit " + std::to_string(rc) + "): " + last_line(out)};
  return {dest, ""};
}

/// Writes an in-process mode's final output to work/outputs/<workload>.<mode>.safetensors (key
/// "output", flat), beside the peers' own, for a look after a mismatch.
void save_output(const std::string& work, const std::string& workload, const std::string& mode,
                 const std::vector<float>& values) {
  safetensors::save((fs::path(work) / "outputs" / (workload + "." + mode + ".safetensors")).string(),
                    {{"output", Tensor::from_vector(values, Shape{static_cast<std::int64_t>(values.size())})}});
}

// ---- one workload ----------------------------------------------------------------------------

json run_workload(const std::string& name, const Args& a, const std::string& work, const bench::MachineLimits& lim,
                  const OrtInstall& ort, std::vector<std::pair<std::string, std::vector<double>>>& plot,
                  std::vector<std::string>& mismatches) {
  Workload w = make_workload(name);
  const int iters = static_cast<int>(a.get_int("iters", name == "chain8" ? 200 : 20));
  const int warmup = static_cast<int>(a.get_int("warmup", name == "chain8" ? 20 : 3));
  const int rounds = std::min(iters, static_cast<int>(a.get_int("rounds", 5)));
  const int threads = static_cast<int>(std::thread::hardware_concurrency());
  const std::string wdir = (fs::path(work) / "weights" / name).string();
  for (const char* sub : {"inputs", "outputs", "logs", "onnx"}) fs::create_directories(fs::path(work) / sub);
  fs::create_directories(wdir);

  // The same weights and the same inputs for every mode and peer, on disk.
  bench::BareData bare_data;
  for (std::size_t i = 0; i < w.stages.size(); ++i) {
    auto m = w.stages[i].model(w.config);
    auto sd = nn::random_state_dict(*m, 100 + i);
    safetensors::save(wdir + "/" + w.stages[i].weights_file, sd);
    for (const auto& [key, t] : sd) bare_data[w.stages[i].tag + "." + key] = t.to_float_vector();
  }
  const std::string inputs_path = (fs::path(work) / "inputs" / (name + ".safetensors")).string();
  {
    std::vector<std::pair<std::string, Tensor>> named;
    const auto ins = pipeline_inputs(w);
    for (std::size_t i = 0; i < ins.size(); ++i) {
      named.emplace_back("input" + std::to_string(i), ins[i]);
      bare_data["input" + std::to_string(i)] = ins[i].to_float_vector();
    }
    safetensors::save(inputs_path, named);
  }

  // The roofline: the FLOPs and the bytes of the problem (traced at tp 1; seed_tp2 is seed_tp1's
  // problem), at the measured peak and bandwidth.
  const Workload cost_w = name == "seed_tp2" ? make_workload("seed_tp1") : make_workload(name);
  GraphCost cost;
  for (const auto& s : cost_w.stages) cost += graph_cost(s.trace(cost_w.config));
  const double compute_ms = cost.flops / (lim.peak_gflops * 1e9) * 1e3;
  const double memory_ms = static_cast<double>(cost.min_bytes()) / (lim.triad_gbs * 1e9) * 1e3;
  const double roofline_ms = std::max(compute_ms, memory_ms);

  json report;
  report["config"] = json::parse(w.config.to_json());
  report["config"]["iterations"] = iters;
  report["config"]["warmup"] = warmup;
  report["config"]["rounds"] = rounds;
  report["config"]["stages"] = json::array();
  for (const auto& s : w.stages) report["config"]["stages"].push_back(s.tag);
  report["config"]["inputs"] = inputs_path;
  report["cost"] = {{"flops", cost.flops},
                    {"param_bytes", cost.param_bytes},
                    {"input_bytes", cost.input_bytes},
                    {"output_bytes", cost.output_bytes},
                    {"intermediate_bytes_within_stages", cost.intermediate_bytes},
                    {"min_bytes", cost.min_bytes()}};
  report["roofline"] = {{"compute_ms", compute_ms},
                        {"memory_ms", memory_ms},
                        {"time_ms", roofline_ms},
                        {"bound", compute_ms >= memory_ms ? "compute" : "memory"}};

  // The workers, built once. A peer that cannot start is reported as skipped.
  const auto wanted = a.get_list("modes", "pipeline,roundtrip,folded,kernels_bare,executables_bare,pytorch,onnxruntime");
  auto want = [&](const std::string& m) { return std::find(wanted.begin(), wanted.end(), m) != wanted.end(); };
  std::vector<std::unique_ptr<Worker>> timed, check_only;
  auto peers = [&]() -> std::vector<std::unique_ptr<Worker>>& { return w.time_peers ? timed : check_only; };
  for (const char* m : {"pipeline", "roundtrip"}) {
    if (want(m)) timed.push_back(std::make_unique<DevpipeWorker>(m, w, work));
  }
  if (timed.empty()) throw UsageError("option --modes: name pipeline or roundtrip too (the reference output)");
  // seed_tp2: the same pipeline at tp 1, timed in the same rounds, so that tp2 / tp1 compares
  // forwards run side by side (seed_tp1's rounds ran minutes apart on a machine whose speed drifts).
  if (name == "seed_tp2" && want("pipeline")) timed.push_back(std::make_unique<DevpipeWorker>("pipeline_tp1", w, work));
  // folded: only where the compile option changes the graphs (seed's conv + pool + fc).
  if (want("folded") && w.peer_name == "seed") timed.push_back(std::make_unique<DevpipeWorker>("folded", w, work));
  auto skip = [&](const std::string& mode, const std::string& why) {
    report["modes"][mode] = {{"skipped", why}};
    std::cerr << "  " << mode << " skipped: " << why << "\n";
  };
  if (want("kernels_bare")) peers().push_back(std::make_unique<BareWorker>(w, bare_data, threads));
  if (want("executables_bare")) {
    try {
      peers().push_back(std::make_unique<ExecutablesBareWorker>(w, work, want("pipeline")));
      std::cerr << "  " << peers().back()->info()["what"].get<std::string>() << "\n";
    } catch (const Error& e) {  // reported as the mode's error; its output is then not checked
      report["modes"]["executables_bare"] = {{"error", e.what()}};
      std::cerr << "  executables_bare failed: " << e.what() << "\n";
    }
  }
  if (want("pytorch") && !a.has("no-pytorch")) {
    std::cerr << "  starting the PyTorch worker...\n";
    try {
      peers().push_back(std::make_unique<PeerWorker>(
          "pytorch_eager",
          std::vector<std::string>{DEVPIPE_TORCH_PYTHON, std::string(DEVPIPE_BENCH_DIR) + "/pytorch_bench.py",
                                   "--serve", "--workload", w.peer_name, "--weights", wdir, "--inputs", inputs_path},
          (fs::path(work) / "logs" / (name + ".pytorch_eager.log")).string(),
          (fs::path(work) / "outputs" / (name + ".pytorch_eager.safetensors")).string()));
    } catch (const Error& e) {
      skip("pytorch_eager", e.what());
    }
  }
  if (want("onnxruntime")) {
    if (!ort.skipped.empty()) {
      skip("onnxruntime", ort.skipped);
    } else {
      std::cerr << "  exporting the ONNX model and starting the ONNX Runtime worker...\n";
      const std::string model = (fs::path(work) / "onnx" / (name + ".onnx")).string();
      std::string out;
      int rc = run_command(std::string(DEVPIPE_TORCH_PYTHON) + " " + shell_quote(std::string(DEVPIPE_BENCH_DIR) + "/ort/export_onnx.py") +
                               " --workload " + w.peer_name + " --weights " + shell_quote(wdir) + " --inputs " +
                               shell_quote(inputs_path) + " --out " + shell_quote(model),
                           out);
      if (rc != 0) {
        skip("onnxruntime", "bench/ort/export_onnx.py failed (exit " + std::to_string(rc) + "): " + last_line(out));
      } else {
        try {
          peers().push_back(std::make_unique<PeerWorker>(
              "onnxruntime",
              std::vector<std::string>{"node", std::string(DEVPIPE_BENCH_DIR) + "/ort/worker.js", "--ort", ort.dir,
                                       "--model", model, "--inputs", inputs_path, "--threads", std::to_string(threads)},
              (fs::path(work) / "logs" / (name + ".onnxruntime.log")).string(),
              (fs::path(work) / "outputs" / (name + ".onnxruntime.safetensors")).string()));
        } catch (const Error& e) {
          skip("onnxruntime", e.what());
        }
      }
    }
  }

  // Warm-up, then the timed rounds: every worker runs iters/rounds forwards in turn, the order
  // rotating from round to round and reversed every other round, so that each mode sees the
  // same machine and follows different modes. Before each mode's turn the bench waits
  // kSettle, so that the previous mode's threads that spin after their work (OpenMP teams,
  // ONNX Runtime's pool, the rank streams) are asleep and take no core from it: without the
  // wait, the mode that always followed onnxruntime ran with one vCPU of two taken.
  std::map<std::string, Round> times;
  std::map<std::string, std::string> failed;
  auto safely = [&](Worker& wk, const std::function<void()>& fn) {
    if (failed.count(wk.mode())) return;
    try {
      fn();
    } catch (const Error& e) {
      failed[wk.mode()] = e.what();
      std::cerr << "  " << wk.mode() << " failed: " << e.what() << "\n";
    }
  };
  if (warmup > 0) {
    for (auto& wk : timed) safely(*wk, [&] { wk->run(warmup); });
  }
  const int total = rounds * static_cast<int>(timed.size());
  int done = 0;
  for (int r = 0; r < rounds; ++r) {
    const int n = iters / rounds + (r < iters % rounds ? 1 : 0);
    for (std::size_t k = 0; k < timed.size(); ++k) {
      const std::size_t at = r % 2 == 0 ? k : timed.size() - 1 - k;
      Worker& wk = *timed[(at + static_cast<std::size_t>(r)) % timed.size()];
      if (timed.size() > 1) std::this_thread::sleep_for(kSettle);
      safely(wk, [&] {
        Round got = wk.run(n);
        Round& acc = times[wk.mode()];
        acc.samples_ms.insert(acc.samples_ms.end(), got.samples_ms.begin(), got.samples_ms.end());
        acc.cpu_ms += got.cpu_ms;
      });
      print_progress(name, ++done, total, "round " + std::to_string(r + 1) + " " + wk.mode());
    }
  }
  for (auto& wk : check_only) safely(*wk, [&] { wk->run(1); });

  // Every output against devpipe's (pipeline mode when it ran, else roundtrip).
  Worker& ref = *timed.front();
  std::vector<float> want_out;
  safely(ref, [&] {
    want_out = ref.output();
    save_output(work, name, ref.mode(), want_out);
  });
  auto check = [&](Worker& wk, json& m) {
    if (&wk == &ref || failed.count(ref.mode())) return;
    safely(wk, [&] {
      const std::vector<float> got = wk.output();
      if (!dynamic_cast<PeerWorker*>(&wk)) save_output(work, name, wk.mode(), got);
      const bench::OutputCheck c = bench::check_output(wk.mode(), name, want_out, got);
      m["output_check"] = {{"against", ref.mode()}, {"ok", c.ok},           {"max_abs_diff", c.max_abs},
                           {"max_rel_diff", c.max_rel}, {"message", c.message}};
      if (!c.ok) mismatches.push_back(c.message);
    });
  };

  auto p50_if_timed = [&](const std::string& mode) {
    return times.count(mode) && !times[mode].samples_ms.empty() ? summarize(times[mode].samples_ms).p50 : std::nan("");
  };
  const double bare_p50 = p50_if_timed("kernels_bare"), exe_p50 = p50_if_timed("executables_bare");
  auto describe = [&](Worker& wk, bool was_timed) {
    json m = wk.info();
    m["timed"] = was_timed;
    check(wk, m);
    if (was_timed && times.count(wk.mode())) {
      const Round& t = times[wk.mode()];
      const double p50 = summarize(t.samples_ms).p50;
      m["latency_ms"] = latency_json(t.samples_ms);
      m["cpu_ms_per_forward"] = t.cpu_ms / static_cast<double>(t.samples_ms.size());
      m["throughput_per_s"] = 1000.0 * static_cast<double>(w.config.runtime_config().batch_size) / p50;
      m["roofline_ratio"] = p50 / roofline_ms;
      // CPU time against what all threads at the limits would need: near the wall-clock ratio on
      // an idle machine when the mode keeps every thread busy; the honest figure on a loaded one.
      m["roofline_ratio_cpu"] = m["cpu_ms_per_forward"].get<double>() / (roofline_ms * threads);
      if (auto* dw = dynamic_cast<DevpipeWorker*>(&wk)) {
        json by_rank, help_by_rank;
        m["stage_compute_ms"] = dw->stage_compute_ms(std::min(iters, 3), &by_rank, &help_by_rank);
        if (!by_rank.is_null()) {
          m["rank_own_compute_ms"] = by_rank;
          m["rank_help_ms"] = help_by_rank;
        }
        const auto boundaries = static_cast<double>(w.stages.size() - 1);
        if (w.boundary_overhead && std::isfinite(bare_p50)) {
          m["boundary_overhead_us"] = (p50 - bare_p50) * 1000.0 / boundaries;
        }
        if (w.boundary_overhead && std::isfinite(exe_p50)) {
          m["boundary_overhead_vs_executables_us"] = (p50 - exe_p50) * 1000.0 / boundaries;
        }
      }
      plot.emplace_back(name + " " + wk.mode(), t.samples_ms);
    }
    if (failed.count(wk.mode())) m["error"] = failed[wk.mode()];
    report["modes"][wk.mode()] = m;
  };
  for (auto& wk : timed) describe(*wk, true);
  for (auto& wk : check_only) describe(*wk, false);
  return report;
}

// ---- the llm workload (issue 10) -------------------------------------------------------------
//
// A Llama-shaped causal LM (bench/llm_peers.py write-model: 100.1M parameters, or --llm-small),
// prefill at prompt 128 (batch 1) and greedy decode at batch 1 and 8, per dtype: devpipe's
// LlamaForCausalLM in this process, the PyTorch twin (pytorch_mkldnn, pytorch_eager) and
// llama.cpp (float32) as persistent child workers (llm_peers.py serve, llama_cpp/peer.mjs serve),
// timed in alternating rounds; every peer's greedy ids checked against devpipe's.

/// One timed request of the llm workload: wall-clock samples (one per prefill, or one per decode
/// step), the CPU ms of those samples, and the greedy ids (prefill: [[next id]]; decode: every
/// sequence's ids of the last run).
struct LlmRun {
  std::vector<double> samples_ms;
  double cpu_ms = 0;
  std::vector<std::vector<std::int64_t>> tokens;
};

/// The workload's shape: the same for every mode.
struct LlmShape {
  std::string model_dir;
  std::int64_t prompt_len = 128;
  std::int64_t decode_tokens = 16;  // generated tokens per decode run (the first comes from the prefill)
  std::vector<std::int64_t> batches{1, 8};
  std::vector<std::vector<std::int64_t>> prompts;  // max(batches) prompts of prompt_len ids
};

/// llm_peers.py's prompt formula: ids[b][i] = 3 + ((b * 131 + i) * 2654435761 + seed * 97) mod (vocab - 3).
std::vector<std::vector<std::int64_t>> llm_prompt_ids(std::int64_t n, std::int64_t len, std::int64_t vocab,
                                                      std::int64_t seed = 0) {
  std::vector<std::vector<std::int64_t>> p(static_cast<std::size_t>(n));
  for (std::int64_t b = 0; b < n; ++b) {
    for (std::int64_t i = 0; i < len; ++i) {
      p[static_cast<std::size_t>(b)].push_back(3 + ((b * 131 + i) * 2654435761LL + seed * 97) % (vocab - 3));
    }
  }
  return p;
}

/// Bytes of the weights one decode step reads (every matrix once, the norms, the embedding table
/// once: tied, it is the lm_head; the rows the embedding lookup reads are not counted), as
/// llm_peers.py's weight_bytes.
std::uint64_t llm_weight_bytes(const models::LlamaConfig& c, std::uint64_t elem) {
  const auto h = static_cast<std::uint64_t>(c.hidden_size), d = static_cast<std::uint64_t>(c.head_dim);
  const std::uint64_t per_layer =
      h * d * static_cast<std::uint64_t>(2 * c.num_attention_heads + 2 * c.num_key_value_heads) +
      3 * h * static_cast<std::uint64_t>(c.intermediate_size) + 2 * h;
  const std::uint64_t emb = static_cast<std::uint64_t>(c.vocab_size) * h;
  return elem * (static_cast<std::uint64_t>(c.num_hidden_layers) * per_layer + emb * (c.tie_word_embeddings ? 1 : 2) + h);
}

/// Greedy generation of n tokens, eos ignored (greedy ids of random weights: every run has the
/// same length).
models::GenerationConfig greedy(std::int64_t n) {
  models::GenerationConfig g;
  g.max_new_tokens = n;
  g.stop_at_eos = false;
  return g;
}

/// A generate() call with a per-token callback.
using GenerateFn = std::function<models::GenerationResult(const models::TokenCallback&)>;

/// One prefill sample: `generate` from the call to its first token (the wall and CPU time);
/// r.tokens = its tokens.
void time_to_first_token(LlmRun& r, const GenerateFn& generate) {
  double c1 = 0;
  Clock::time_point t1;
  const double c0 = process_cpu_ms();
  const auto t0 = Clock::now();
  auto res = generate([&](std::int64_t, std::int64_t) {
    t1 = Clock::now();
    c1 = process_cpu_ms();
  });
  r.samples_ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  r.cpu_ms += c1 - c0;
  r.tokens = res.tokens;
}

/// The decode steps of one `generate` run: sequence 0's token of step k arrives right after step
/// k's forward, so the gaps between those callbacks are the steps; r.tokens = its tokens.
void time_decode_steps(LlmRun& r, const GenerateFn& generate) {
  std::vector<Clock::time_point> at;
  std::vector<double> cpu;
  auto res = generate([&](std::int64_t seq, std::int64_t) {
    if (seq != 0) return;
    at.push_back(Clock::now());
    cpu.push_back(process_cpu_ms());
  });
  for (std::size_t k = 1; k < at.size(); ++k) {
    r.samples_ms.push_back(std::chrono::duration<double, std::milli>(at[k] - at[k - 1]).count());
    r.cpu_ms += cpu[k] - cpu[k - 1];
  }
  r.tokens = res.tokens;
}

class LlmWorker {
 public:
  explicit LlmWorker(std::string mode) : mode_(std::move(mode)) {}
  virtual ~LlmWorker() = default;
  const std::string& mode() const { return mode_; }
  /// `iters` prefills of prompt 0 at batch 1.
  virtual LlmRun prefill(int iters) = 0;
  /// `iters` greedy runs of decode_tokens tokens for prompts 0..batch-1; every step timed.
  virtual LlmRun decode(std::int64_t batch, int iters) = 0;
  virtual json info() { return json::object(); }

 private:
  std::string mode_;
};

/// devpipe: LlamaForCausalLM compiled for the largest batch (batch buckets = the batches, one
/// context bucket = the prompt length, the cache = prompt + decode tokens rounded up to a power
/// of two), timed through generate()'s per-token callback.
class DevpipeLlmWorker : public LlmWorker {
 public:
  DevpipeLlmWorker(const LlmShape& s, DType dtype, const std::string& artifact)
      : LlmWorker("devpipe"), s_(s), app_(s.model_dir, config_for(s, dtype)) {
    app_.compile(artifact);
    app_.load(artifact);
  }
  LlmRun prefill(int iters) override {
    LlmRun r;
    for (int i = 0; i < iters; ++i) {
      time_to_first_token(r, [&](const models::TokenCallback& cb) {
        return app_.generate({s_.prompts[0]}, greedy(1), cb);
      });
    }
    return r;
  }
  LlmRun decode(std::int64_t batch, int iters) override {
    LlmRun r;
    const std::vector<std::vector<std::int64_t>> prompts(s_.prompts.begin(), s_.prompts.begin() + batch);
    for (int i = 0; i < iters; ++i) {
      time_decode_steps(r, [&](const models::TokenCallback& cb) {
        return app_.generate(prompts, greedy(s_.decode_tokens), cb);
      });
    }
    return r;
  }
  json info() override {
    return {{"threads", std::thread::hardware_concurrency()}, {"version", devpipe_version()}};
  }

 private:
  static InferenceConfig config_for(const LlmShape& s, DType dtype) {
    RuntimeConfig rc;
    rc.batch_size = *std::max_element(s.batches.begin(), s.batches.end());
    rc.buckets = s.batches;
    rc.dtype = dtype;
    models::LlamaOptions o;
    std::int64_t len = 1;
    while (len < s.prompt_len + s.decode_tokens) len *= 2;
    o.max_length = len;
    o.context_buckets = {s.prompt_len};
    return models::llama_config(s.model_dir, rc, o);
  }
  const LlmShape& s_;
  models::LlamaForCausalLM app_;
};

/// A reply of an llm-protocol peer as an LlmRun ({"samples_ms", "cpu_ms", "tokens"}; without
/// `with_tokens` the tokens are not read); StateError naming the peer and the reply otherwise.
LlmRun parse_llm_run(const std::string& peer, const json& r, bool with_tokens = true) {
  try {
    LlmRun run{r.at("samples_ms").get<std::vector<double>>(), r.at("cpu_ms").get<double>(), {}};
    if (with_tokens) run.tokens = r.at("tokens").get<std::vector<std::vector<std::int64_t>>>();
    return run;
  } catch (const json::exception& e) {
    throw StateError("bench: peer " + peer + " answered " + r.dump().substr(0, 300) + ": " +
                     e.what());
  }
}

/// What the report says about a peer worker: its threads and version from its ready line.
json peer_info(const bench::ChildWorker& child) {
  return {{"threads", child.hello().value("threads", 0)},
          {"version", child.hello().value("version", std::string("?"))}};
}

/// pytorch_mkldnn / pytorch_eager / llama_cpp: a child process on the llm worker protocol.
class PeerLlmWorker : public LlmWorker {
 public:
  PeerLlmWorker(const std::string& mode, const std::vector<std::string>& argv, const std::string& log)
      : LlmWorker(mode), child_(mode, argv, log) {}
  LlmRun prefill(int iters) override {
    return parse_llm_run(mode(), child_.request({{"cmd", "prefill"}, {"iters", iters}}));
  }
  LlmRun decode(std::int64_t batch, int iters) override {
    return parse_llm_run(mode(),
                         child_.request({{"cmd", "decode"}, {"batch", batch}, {"iters", iters}}));
  }
  json info() override { return peer_info(child_); }

 private:
  bench::ChildWorker child_;
};

/// Greedy ids of a peer against devpipe's: position by position over every sequence.
json token_check(const std::vector<std::vector<std::int64_t>>& want, const std::vector<std::vector<std::int64_t>>& got,
                 const std::string& what, std::string& first_mismatch) {
  std::int64_t same = 0, total = 0;
  for (std::size_t s = 0; s < want.size(); ++s) {
    for (std::size_t i = 0; i < want[s].size(); ++i) {
      ++total;
      const bool have = s < got.size() && i < got[s].size();
      if (have && got[s][i] == want[s][i]) {
        ++same;
      } else if (first_mismatch.empty()) {
        first_mismatch = what + ": sequence " + std::to_string(s) + " token " + std::to_string(i) + ": " +
                         (have ? std::to_string(got[s][i]) : std::string("missing")) + " != devpipe's " +
                         std::to_string(want[s][i]);
      }
    }
  }
  for (std::size_t s = 0; s < got.size(); ++s) {  // ids devpipe did not produce count as different
    const std::size_t mine = s < want.size() ? want[s].size() : 0;
    const std::size_t extra = got[s].size() > mine ? got[s].size() - mine : 0;
    total += static_cast<std::int64_t>(extra);
    if (extra > 0 && first_mismatch.empty()) first_mismatch = what + ": sequence " + std::to_string(s) + " has extra tokens";
  }
  return {{"matching", same}, {"total", total}};
}

/// Where the llama.cpp peer is installed, or why it is not.
struct LlamaCppInstall {
  std::string dir;
  std::string skipped;
};

LlamaCppInstall install_llama_cpp(const std::string& dest) {
  std::string out;
  const std::string script = (fs::path(DEVPIPE_BENCH_DIR) / "llama_cpp" / "install.sh").string();
  std::cerr << "installing llama.cpp (npm node-llama-cpp) into " << dest << " ...\n";
  int rc = run_command("bash " + shell_quote(script) + " " + shell_quote(dest), out);
  if (rc != 0) {
    return {"", "node-llama-cpp is not installed: bench/llama_cpp/install.sh failed (exit " + std::to_string(rc) +
                    "): " + last_line(out)};
  }
  return {dest, ""};
}

/// How the llm-style workloads (llm, vlm) interleave their workers.
struct PhaseSchedule {
  int iters = 4;   // timed runs per phase and worker, split into the rounds
  int warmup = 1;  // untimed runs per phase and worker before the rounds
  int rounds = 4;  // at most iters
};

/// The llm-style schedule: every worker first runs `warmup` untimed runs of every phase; then
/// `iters` runs per phase are split into the rounds, and in each round every phase runs its share
/// on every worker in turn, the order rotating from round to round. The runs accumulate into
/// times[mode][phase] (samples and CPU time; the tokens are the last run's); a worker that throws
/// is recorded in failed[mode] and runs no more.
template <class W>
void interleave_phases(
    const std::vector<std::unique_ptr<W>>& workers, const std::vector<std::string>& phases,
    const std::type_identity_t<std::function<LlmRun(W&, std::size_t, int)>>& run_phase,
    const PhaseSchedule& sched, const std::string& label,
    std::map<std::string, std::map<std::string, LlmRun>>& times,
    std::map<std::string, std::string>& failed) {
  auto safely = [&](W& wk, const std::function<void()>& fn) {
    if (failed.count(wk.mode())) return;
    try {
      fn();
    } catch (const Error& e) {
      failed[wk.mode()] = e.what();
      std::cerr << "  " << label << " " << wk.mode() << " failed: " << e.what() << "\n";
    }
  };
  if (sched.warmup > 0) {
    for (auto& wk : workers) {
      for (std::size_t ph = 0; ph < phases.size(); ++ph)
        safely(*wk, [&] { run_phase(*wk, ph, sched.warmup); });
    }
  }
  const int total = sched.rounds * static_cast<int>(workers.size() * phases.size());
  int done = 0;
  for (int r = 0; r < sched.rounds; ++r) {
    const int n = sched.iters / sched.rounds + (r < sched.iters % sched.rounds ? 1 : 0);
    for (std::size_t ph = 0; ph < phases.size(); ++ph) {
      for (std::size_t k = 0; k < workers.size(); ++k) {
        W& wk = *workers[(k + static_cast<std::size_t>(r)) % workers.size()];
        safely(wk, [&] {
          LlmRun got = run_phase(wk, ph, n);
          LlmRun& acc = times[wk.mode()][phases[ph]];
          acc.samples_ms.insert(acc.samples_ms.end(), got.samples_ms.begin(), got.samples_ms.end());
          acc.cpu_ms += got.cpu_ms;
          acc.tokens = got.tokens;
        });
        print_progress(label, ++done, total,
                       "round " + std::to_string(r + 1) + " " + phases[ph] + " " + wk.mode());
      }
    }
  }
}

/// `get(worker)` of every worker that has not failed, by mode (after interleave_phases: the outputs
/// of the last runs, for the checks); a worker that throws is recorded in failed[mode].
template <class W, class F>
auto last_outputs(const std::vector<std::unique_ptr<W>>& workers, const F& get,
                  std::map<std::string, std::string>& failed) {
  std::map<std::string, std::invoke_result_t<const F&, W&>> outs;
  for (const auto& wk : workers) {
    if (failed.count(wk->mode())) continue;
    try {
      outs[wk->mode()] = get(*wk);
    } catch (const Error& e) {
      failed[wk->mode()] = e.what();
    }
  }
  return outs;
}

json llm_latency_entry(const LlmRun& t, double per_sample_tokens) {
  const double p50 = summarize(t.samples_ms).p50;
  return {{"latency_ms", latency_json(t.samples_ms)},
          {"samples", t.samples_ms.size()},
          {"tokens_per_s", 1000.0 * per_sample_tokens / p50},
          {"cpu_ms_per_sample", t.cpu_ms / static_cast<double>(t.samples_ms.size())}};
}

json run_llm_workload(const Args& a, const std::string& work, const bench::MachineLimits& lim,
                      const LlamaCppInstall& lcpp, std::vector<std::pair<std::string, std::vector<double>>>& plot,
                      std::vector<std::string>& mismatches) {
  const bool small = a.has("llm-small");
  const int iters = static_cast<int>(a.get_int("iters", 4));
  const int warmup = static_cast<int>(a.get_int("warmup", 1));
  const int rounds = std::min(iters, static_cast<int>(a.get_int("rounds", 5)));
  const int threads = static_cast<int>(std::thread::hardware_concurrency());
  const std::string tag = small ? "llm_small" : "llm";
  const fs::path base = fs::path(work) / tag;
  fs::create_directories(base / "logs");
  LlmShape s;
  s.model_dir = (base / "model").string();
  s.decode_tokens = a.get_int("llm-decode-tokens", 16);

  // The weights: llm_peers.py write-model (llama_ref.py, seed 0), once; every mode reads this folder.
  if (!fs::exists(fs::path(s.model_dir) / "config.json") || !fs::exists(fs::path(s.model_dir) / "model.safetensors")) {
    std::cerr << "  writing the " << (small ? "small " : "") << "Llama model into " << s.model_dir << " ...\n";
    std::string out;
    const int rc = run_command(std::string(DEVPIPE_TORCH_PYTHON) + " " +
                                   shell_quote(std::string(DEVPIPE_BENCH_DIR) + "/llm_peers.py") + " write-model " +
                                   shell_quote(s.model_dir) + (small ? " --small" : ""),
                               out);
    if (rc != 0) throw StateError("bench: llm_peers.py write-model " + s.model_dir + " failed (exit " +
                                  std::to_string(rc) + "): " + last_line(out));
  }
  const models::LlamaConfig hf = models::LlamaConfig::from_hf_folder(s.model_dir);
  const std::int64_t max_b = *std::max_element(s.batches.begin(), s.batches.end());
  s.prompts = llm_prompt_ids(max_b, s.prompt_len, hf.vocab_size);

  json report;
  report["config"] = {{"model_dir", s.model_dir},
                      {"small", small},
                      {"hidden_size", hf.hidden_size},
                      {"intermediate_size", hf.intermediate_size},
                      {"num_hidden_layers", hf.num_hidden_layers},
                      {"num_attention_heads", hf.num_attention_heads},
                      {"num_key_value_heads", hf.num_key_value_heads},
                      {"vocab_size", hf.vocab_size},
                      {"tie_word_embeddings", hf.tie_word_embeddings},
                      {"parameters", llm_weight_bytes(hf, 1)},
                      {"prompt_len", s.prompt_len},
                      {"prompt_ids", "ids[b][i] = 3 + ((b * 131 + i) * 2654435761) mod (vocab - 3) (llm_peers.py)"},
                      {"decode_tokens", s.decode_tokens},
                      {"batches", s.batches},
                      {"iterations", iters},
                      {"warmup", warmup},
                      {"rounds", rounds}};

  const auto wanted = a.get_list("modes", "pipeline,roundtrip,kernels_bare,pytorch,onnxruntime,llama_cpp");
  auto want = [&](const std::string& m) { return std::find(wanted.begin(), wanted.end(), m) != wanted.end(); };
  if (!want("pipeline") && !want("roundtrip")) {
    throw UsageError("option --modes: name pipeline or roundtrip too (devpipe, the reference output)");
  }
  const bool pytorch = !a.has("no-pytorch");
  const std::vector<std::string> dtypes = a.get_list("llm-dtypes", "float32,bfloat16");
  report["config"]["dtypes"] = dtypes;
  for (const std::string& dt : dtypes) {
    const DType dtype = dtype_from_name(dt);
    const std::uint64_t elem = dtype == DType::Float32 ? 4 : 2;
    // The bounds: a decode step reads every weight once (weight bytes / triad bandwidth); the
    // prefill's FLOPs (every linear 2 per multiply-add, the causal attention's two matmuls, the
    // lm_head at the last position) at the peak.
    const double wbytes = static_cast<double>(llm_weight_bytes(hf, elem));
    const double bound_ms = wbytes / (lim.triad_gbs * 1e9) * 1e3;
    const double T = static_cast<double>(s.prompt_len), H = static_cast<double>(hf.hidden_size);
    const double linear_params = static_cast<double>(llm_weight_bytes(hf, 1)) -
                                 static_cast<double>(hf.vocab_size) * H * (hf.tie_word_embeddings ? 1 : 2);
    const double prefill_flops =
        2 * T * linear_params +
        static_cast<double>(hf.num_hidden_layers * hf.num_attention_heads) * 4 * static_cast<double>(hf.head_dim) *
            T * (T + 1) / 2 +
        2 * H * static_cast<double>(hf.vocab_size);
    const double prefill_bound_ms = prefill_flops / (lim.peak_gflops * 1e9) * 1e3;
    json kv = json::object();
    for (std::int64_t b : s.batches) {
      // the cache rows a step reads, averaged over the run (prompt + half the new tokens)
      kv[std::to_string(b)] = static_cast<double>(2 * hf.num_hidden_layers * hf.num_key_value_heads * hf.head_dim * b) *
                              static_cast<double>(elem) * (T + static_cast<double>(s.decode_tokens) / 2);
    }
    json run;
    run["bound"] = {{"weight_bytes_per_decode_step", wbytes},
                    {"kv_cache_bytes_per_decode_step", kv},
                    {"decode_step_ms", bound_ms},
                    {"decode_b1_tokens_per_s", 1000.0 / bound_ms},
                    {"prefill_flops", prefill_flops},
                    {"prefill_compute_ms", prefill_bound_ms},
                    {"note", "decode_step_ms = weight bytes / measured triad bandwidth (the KV cache reads, "
                             "listed beside, not included)"}};
    run["modes"] = json::object();

    std::vector<std::unique_ptr<LlmWorker>> workers;
    auto skip = [&](const std::string& mode, const std::string& why) {
      run["modes"][mode] = {{"skipped", why}};
      std::cerr << "  llm " << dt << " " << mode << " skipped: " << why << "\n";
    };
    std::cerr << "  llm " << dt << ": compiling devpipe's LlamaForCausalLM...\n";
    workers.push_back(std::make_unique<DevpipeLlmWorker>(s, dtype, (base / "artifacts" / dt).string()));
    std::string batches_csv;
    for (std::int64_t b : s.batches) batches_csv += (batches_csv.empty() ? "" : ",") + std::to_string(b);
    for (const char* linear : {"mkldnn", "eager"}) {
      const std::string mode = std::string("pytorch_") + linear;
      if (!pytorch || !(want("pytorch") || want(mode))) continue;
      if (dtype == DType::Float32 && std::string(linear) == "eager" && !a.has("llm-eager-float32")) {
        skip(mode, "Debian torch's float32 nn.Linear runs on netlib BLAS (here: 11 s per prefill, 0.5 s per "
                   "batch-1 step); --llm-eager-float32 times it");
        continue;
      }
      std::cerr << "  starting the " << mode << " " << dt << " worker...\n";
      try {
        workers.push_back(std::make_unique<PeerLlmWorker>(
            mode,
            std::vector<std::string>{DEVPIPE_TORCH_PYTHON, std::string(DEVPIPE_BENCH_DIR) + "/llm_peers.py", "serve",
                                     s.model_dir, "--dtype", dt, "--linear", linear, "--prompt-len",
                                     std::to_string(s.prompt_len), "--decode-tokens", std::to_string(s.decode_tokens),
                                     "--batches", batches_csv, "--threads", std::to_string(threads)},
            (base / "logs" / (mode + "." + dt + ".log")).string()));
      } catch (const Error& e) {
        skip(mode, e.what());
      }
    }
    if (want("llama_cpp")) {
      if (dtype != DType::Float32) {
        skip("llama_cpp", "the llama.cpp peer runs the float32 GGUF only");
      } else if (!lcpp.skipped.empty()) {
        skip("llama_cpp", lcpp.skipped);
      } else {
        std::string out;
        const std::string gguf = (fs::path(s.model_dir) / "model-f32.gguf").string();
        int rc = 0;
        if (!fs::exists(gguf) ||
            fs::last_write_time(gguf) < fs::last_write_time(fs::path(s.model_dir) / "model.safetensors")) {
          rc = run_command(std::string(DEVPIPE_TORCH_PYTHON) + " " +
                               shell_quote(std::string(DEVPIPE_BENCH_DIR) + "/llama_cpp/hf_to_gguf.py") + " " +
                               shell_quote(s.model_dir) + " " + shell_quote(gguf),
                           out);
        }
        if (rc != 0) {
          skip("llama_cpp", "bench/llama_cpp/hf_to_gguf.py failed (exit " + std::to_string(rc) + "): " + last_line(out));
        } else {
          std::string prompts;
          for (const auto& p : s.prompts) {
            if (!prompts.empty()) prompts += ";";
            for (std::size_t i = 0; i < p.size(); ++i) prompts += (i ? "," : "") + std::to_string(p[i]);
          }
          std::cerr << "  starting the llama_cpp worker...\n";
          try {
            workers.push_back(std::make_unique<PeerLlmWorker>(
                "llama_cpp",
                std::vector<std::string>{"node", std::string(DEVPIPE_BENCH_DIR) + "/llama_cpp/peer.mjs", "serve",
                                         "--model", gguf, "--prompts", prompts, "--decode-tokens",
                                         std::to_string(s.decode_tokens), "--batches", batches_csv, "--threads",
                                         std::to_string(threads), "--llama-cpp-dir", lcpp.dir},
                (base / "logs" / "llama_cpp.float32.log").string()));
          } catch (const Error& e) {
            skip("llama_cpp", e.what());
          }
        }
      }
    }

    // Warm-up, then the rounds: in each, every phase (prefill, decode at each batch) runs its
    // share on every worker in turn, the order rotating from round to round.
    std::vector<std::string> phases{"prefill"};
    for (std::int64_t b : s.batches) phases.push_back("decode_b" + std::to_string(b));
    std::map<std::string, std::map<std::string, LlmRun>> times;  // mode -> phase -> run
    std::map<std::string, std::string> failed;
    interleave_phases(
        workers, phases,
        [&](LlmWorker& wk, std::size_t ph, int n) {
          return ph == 0 ? wk.prefill(n) : wk.decode(s.batches[ph - 1], n);
        },
        {iters, warmup, rounds}, "llm " + dt, times, failed);

    // Every peer's greedy ids against devpipe's: float32 must be equal (else a correctness
    // failure), bfloat16 rounds differently in every runtime, so its agreement is reported only.
    const auto& ref = times["devpipe"];
    for (auto& wk : workers) {
      json m = wk->info();
      if (failed.count(wk->mode())) {
        m["error"] = failed[wk->mode()];
        if (wk->mode() == "devpipe") mismatches.push_back("llm " + dt + ": devpipe failed: " + failed[wk->mode()]);
        run["modes"][wk->mode()] = m;
        continue;
      }
      const auto& mine = times[wk->mode()];
      for (std::size_t ph = 0; ph < phases.size(); ++ph) {
        const LlmRun& t = mine.at(phases[ph]);
        const double per_sample = ph == 0 ? static_cast<double>(s.prompt_len) : static_cast<double>(s.batches[ph - 1]);
        json e = llm_latency_entry(t, per_sample);
        e["batch"] = ph == 0 ? 1 : s.batches[ph - 1];
        if (ph == 0) {
          e["prompt_len"] = s.prompt_len;
          e["compute_bound_ratio"] = summarize(t.samples_ms).p50 / prefill_bound_ms;
        } else {
          e["bandwidth_bound_ratio"] = summarize(t.samples_ms).p50 / bound_ms;
        }
        m[phases[ph]] = e;
        plot.emplace_back("llm_" + dt + "_" + phases[ph] + " " + wk->mode(), t.samples_ms);
      }
      if (wk->mode() != "devpipe" && !failed.count("devpipe")) {
        std::string first;
        std::int64_t same = 0, all = 0;
        for (const auto& ph : phases) {
          json c = token_check(ref.at(ph).tokens, mine.at(ph).tokens, ph, first);
          same += c["matching"].get<std::int64_t>();
          all += c["total"].get<std::int64_t>();
        }
        const bool ok = same == all;
        std::string msg = "llm " + dt + ": peer " + wk->mode() + ": " + std::to_string(same) + " of " +
                          std::to_string(all) + " greedy ids equal devpipe's" + (ok ? "" : "; first difference: " + first);
        m["token_check"] = {{"against", "devpipe"}, {"ok", ok},      {"matching", same},
                            {"total", all},        {"message", msg}, {"enforced", dtype == DType::Float32}};
        if (!ok && dtype == DType::Float32) mismatches.push_back(msg);
      }
      run["modes"][wk->mode()] = m;
    }
    report["runs"][dt] = run;
  }
  return report;
}

/// Issue 10's targets of the llm workload (float32): the decode step against the bandwidth bound,
/// devpipe's decode tokens/s against llama.cpp's and the PyTorch twin's.
void add_llm_targets(const json& r, json& out) {
  auto get = [&](const std::string& mode, const std::string& phase, const char* key) {
    try {
      return r.at("workloads").at("llm").at("runs").at("float32").at("modes").at(mode).at(phase).at(key).get<double>();
    } catch (const json::exception&) {
      return std::nan("");
    }
  };
  auto add = [&](const std::string& what, double v, double target, bool at_most, const std::string& note = "") {
    std::string status = std::isnan(v) ? "n/a" : ((at_most ? v <= target : v >= target) ? "PASS" : "FAIL");
    out.push_back({{"target", what}, {"measured", std::isnan(v) ? json(nullptr) : json(v)},
                   {"limit", target}, {"at_most", at_most}, {"status", status}, {"note", note}});
  };
  add("llm f32: devpipe decode b1 step p50 / weight-bandwidth bound", get("devpipe", "decode_b1", "bandwidth_bound_ratio"),
      1.5, true);
  for (const char* ph : {"decode_b1", "decode_b8"}) {
    const double dv = get("devpipe", ph, "tokens_per_s");
    add(std::string("llm f32: devpipe ") + ph + " tokens/s / llama_cpp's", dv / get("llama_cpp", ph, "tokens_per_s"),
        1.0, false);
    // the faster of the twin's modes
    const double mk = get("pytorch_mkldnn", ph, "tokens_per_s"), ea = get("pytorch_eager", ph, "tokens_per_s");
    const double best = std::isnan(mk) ? ea : (std::isnan(ea) ? mk : std::max(mk, ea));
    add(std::string("llm f32: devpipe ") + ph + " tokens/s / PyTorch twin's", dv / best, 2.0, false,
        std::isnan(ea) ? "pytorch_mkldnn (pytorch_eager float32 not timed)" : "the faster twin mode");
  }
}

/// The llm rows of the printed table.
void print_llm_rows(const json& llm) {
  const json& c = llm["config"];
  std::printf("\nllm: Llama %.1fM parameters (hidden %lld, %lld layers, vocab %lld), prompt %lld, %lld decode tokens; "
              "tokens/s from the p50 sample\n",
              c["parameters"].get<double>() / 1e6, c["hidden_size"].get<long long>(),
              c["num_hidden_layers"].get<long long>(), c["vocab_size"].get<long long>(),
              c["prompt_len"].get<long long>(), c["decode_tokens"].get<long long>());
  std::printf("%-9s %-15s %12s %11s %11s %11s %10s %10s  %s\n", "dtype", "mode", "prefill t/s", "b1 tok/s", "b8 tok/s",
              "b1 step ms", "b1/bound", "b8/bound", "greedy ids");
  for (const std::string dt : c["dtypes"]) {
    if (!llm["runs"].contains(dt)) continue;
    const json& run = llm["runs"][dt];
    const json& b = run["bound"];
    std::printf("%-9s %-15s %12s %11.1f %11s %11.3f %10s %10s  (weights %.1f MB / triad bandwidth; prefill compute "
                "bound %.1f ms)\n",
                dt.c_str(), "bound", "-", b["decode_b1_tokens_per_s"].get<double>(), "-",
                b["decode_step_ms"].get<double>(), "1.00", "", b["weight_bytes_per_decode_step"].get<double>() / 1e6,
                b["prefill_compute_ms"].get<double>());
    for (const auto& [mode, m] : run["modes"].items()) {
      if (m.contains("skipped")) {
        std::printf("%-9s %-15s skipped: %s\n", dt.c_str(), mode.c_str(), m["skipped"].get<std::string>().c_str());
        continue;
      }
      if (m.contains("error")) {
        std::printf("%-9s %-15s error: %s\n", dt.c_str(), mode.c_str(), m["error"].get<std::string>().c_str());
        continue;
      }
      const json& mj = m;  // a variable, not a structured binding: clang 14 cannot capture those
      auto num = [&](const char* ph, const char* key) {
        return mj.contains(ph) ? fmt_number(mj[ph][key].get<double>()) : std::string("-");
      };
      std::string check = mode == "devpipe" ? "reference" : "not checked";
      if (m.contains("token_check")) {
        const json& t = m["token_check"];
        check = std::to_string(t["matching"].get<long long>()) + "/" + std::to_string(t["total"].get<long long>()) +
                (t["ok"].get<bool>() ? " equal" : (t["enforced"].get<bool>() ? " MISMATCH" : " equal (not enforced)"));
      }
      const std::string b1_ms = m.contains("decode_b1") ? fmt_number(m["decode_b1"]["latency_ms"]["p50"].get<double>()) : "-";
      std::printf("%-9s %-15s %12s %11s %11s %11s %10s %10s  %s\n", dt.c_str(), mode.c_str(),
                  num("prefill", "tokens_per_s").c_str(), num("decode_b1", "tokens_per_s").c_str(),
                  num("decode_b8", "tokens_per_s").c_str(), b1_ms.c_str(),
                  num("decode_b1", "bandwidth_bound_ratio").c_str(), num("decode_b8", "bandwidth_bound_ratio").c_str(),
                  check.c_str());
    }
  }
}

// ---- the vlm workload ------------------------------------------------------------------------
//
// A Pixtral-shaped vision-language model (bench/vlm_peers.py write-model, or --vlm-small): one
// image and a prompt of text tokens around its image tokens, batch 1, float32. Phases: vision
// (the vision encoder + projector alone), prefill (vision + prefill to the first new token) and
// decode_b1 (the greedy steps after it); devpipe's LlavaForConditionalGeneration in this process
// and the PyTorch twin (vlm_peers.py serve) as a persistent child worker, interleaved as the llm
// workload's modes are; the twin's image features and greedy ids checked against devpipe's.

/// `bench/<script> write-model MODEL_DIR --inputs INPUTS [--small]` (vlm_peers.py, dit_peers.py): a twin
/// workload's model folder and inputs file; StateError with the script's last output line on failure.
void write_twin_model(const std::string& script, const std::string& what, const std::string& model_dir,
                      const std::string& inputs, bool small) {
  std::cerr << "  writing the " << what << " into " << model_dir << " ...\n";
  std::string out;
  const int rc = run_command(std::string(DEVPIPE_TORCH_PYTHON) + " " +
                                 shell_quote(std::string(DEVPIPE_BENCH_DIR) + "/" + script) + " write-model " +
                                 shell_quote(model_dir) + " --inputs " + shell_quote(inputs) + (small ? " --small" : ""),
                             out);
  if (rc != 0) {
    throw StateError("bench: " + script + " write-model " + model_dir + " failed (exit " + std::to_string(rc) +
                     "): " + last_line(out));
  }
}

/// The workload's shape and inputs: the same for every mode (the inputs file vlm_peers.py wrote).
struct VlmShape {
  std::string model_dir;
  std::string inputs_path;
  Tensor pixels;                     // float32 [1, C, H, W]
  std::vector<std::int64_t> prompt;  // the text ids with the image's tokens in place
  std::int64_t decode_tokens =
      16;  // generated tokens per decode run (the first comes from the prefill)
};

/// The image features' tolerance against devpipe's: max |diff| <= atol + rtol * max |devpipe's|.
constexpr bench::Tolerance kVlmFeatureTolerance{.atol = 1e-4, .rtol = 1e-3};

class VlmWorker {
 public:
  explicit VlmWorker(std::string mode) : mode_(std::move(mode)) {}
  virtual ~VlmWorker() = default;
  const std::string& mode() const { return mode_; }
  /// `iters` runs of the vision encoder + projector on the image.
  virtual LlmRun vision(int iters) = 0;
  /// `iters` requests from the image to the first new token; tokens [[that id]].
  virtual LlmRun prefill(int iters) = 0;
  /// `iters` greedy runs of decode_tokens tokens; every step after the first token timed;
  /// tokens [[the last run's ids]].
  virtual LlmRun decode(int iters) = 0;
  /// The image features of the last vision run, row-major float32 [1, P, text hidden].
  virtual std::vector<float> features() = 0;
  virtual json info() { return json::object(); }

 private:
  std::string mode_;
};

/// devpipe: LlavaForConditionalGeneration, tp 1, float32, batch 1, one context bucket (the prompt)
/// and one cache bucket (prompt + decode tokens rounded up to a power of two).
class DevpipeVlmWorker : public VlmWorker {
 public:
  DevpipeVlmWorker(const VlmShape& s, const std::string& artifact)
      : VlmWorker("devpipe"), s_(s), app_(s.model_dir, config_for(s)) {
    app_.compile(artifact);
    app_.load(artifact);
  }
  LlmRun vision(int iters) override {
    LlmRun r;
    for (int i = 0; i < iters; ++i) {
      const double c0 = process_cpu_ms();
      const auto t0 = Clock::now();
      // pipeline execution: the features stay on the device, as generate() hands them on
      Output out = app_.vision_encoder().forward({s_.pixels});
      out.ranked().wait();
      r.samples_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      r.cpu_ms += process_cpu_ms() - c0;
      last_ = std::move(out);
    }
    return r;
  }
  LlmRun prefill(int iters) override {
    LlmRun r;
    for (int i = 0; i < iters; ++i) {
      time_to_first_token(r, [&](const models::TokenCallback& cb) {
        return app_.generate({s_.prompt}, s_.pixels, greedy(1), cb);
      });
    }
    return r;
  }
  LlmRun decode(int iters) override {
    LlmRun r;
    for (int i = 0; i < iters; ++i) {
      time_decode_steps(r, [&](const models::TokenCallback& cb) {
        return app_.generate({s_.prompt}, s_.pixels, greedy(s_.decode_tokens), cb);
      });
    }
    return r;
  }
  std::vector<float> features() override {
    if (!last_.is_ranked()) last_ = app_.vision_encoder().forward({s_.pixels});
    return last_.ranked().to_host().at(0).to_float_vector();
  }
  json info() override {
    return {{"threads", std::thread::hardware_concurrency()}, {"version", devpipe_version()}};
  }

 private:
  static InferenceConfig config_for(const VlmShape& s) {
    RuntimeConfig rc;
    rc.batch_size = 1;
    rc.buckets = {1};
    rc.dtype = DType::Float32;
    models::LlavaOptions o;
    const auto prompt_len = static_cast<std::int64_t>(s.prompt.size());
    std::int64_t len = 1;
    while (len < prompt_len + s.decode_tokens) len *= 2;
    o.text.max_length = len;
    o.text.context_buckets = {prompt_len};
    o.text.cache_buckets = {len};
    o.image_height = s.pixels.dim(2);
    o.image_width = s.pixels.dim(3);
    return models::llava_config(s.model_dir, rc, o);
  }
  const VlmShape& s_;
  models::LlavaForConditionalGeneration app_;
  Output last_;
};

/// pytorch_mkldnn: vlm_peers.py serve, the twin on the vlm protocol (bench/README.md).
class PeerVlmWorker : public VlmWorker {
 public:
  PeerVlmWorker(const std::string& mode, const std::vector<std::string>& argv,
                const std::string& log, std::string output_path)
      : VlmWorker(mode), child_(mode, argv, log), output_path_(std::move(output_path)) {}
  LlmRun vision(int iters) override {
    return parse_llm_run(mode(), child_.request({{"cmd", "vision"}, {"iters", iters}}), false);
  }
  LlmRun prefill(int iters) override {
    return parse_llm_run(mode(), child_.request({{"cmd", "prefill"}, {"iters", iters}}));
  }
  LlmRun decode(int iters) override {
    return parse_llm_run(mode(),
                         child_.request({{"cmd", "decode"}, {"batch", 1}, {"iters", iters}}));
  }
  std::vector<float> features() override {
    child_.request({{"cmd", "output"}, {"path", output_path_}});
    auto all = safetensors::load_all(output_path_);
    auto it = all.find("image_features");
    if (it == all.end())
      throw StateError("bench: peer " + mode() + " wrote no tensor 'image_features' to " +
                       output_path_);
    return it->second.to_float_vector();
  }
  json info() override { return peer_info(child_); }

 private:
  bench::ChildWorker child_;
  std::string output_path_;
};

/// Timed runs per phase and mode by default (--iters): a vision run or a prefill takes tens to
/// hundreds of ms here, a decode run 15 steps.
constexpr int kVlmIters = 8;

json run_vlm_workload(const Args& a, const std::string& work,
                      std::vector<std::pair<std::string, std::vector<double>>>& plot,
                      std::vector<std::string>& mismatches) {
  const bool small = a.has("vlm-small");
  const int iters = static_cast<int>(a.get_int("iters", kVlmIters));
  const int warmup = static_cast<int>(a.get_int("warmup", 1));
  const int rounds = std::min(iters, static_cast<int>(a.get_int("rounds", 5)));
  const int threads = static_cast<int>(std::thread::hardware_concurrency());
  const fs::path base = fs::path(work) / (small ? "vlm_small" : "vlm");
  fs::create_directories(base / "logs");
  VlmShape s;
  s.model_dir = (base / "model").string();
  s.inputs_path = (base / "inputs.safetensors").string();
  s.decode_tokens = a.get_int("vlm-decode-tokens", 16);

  // The weights and the inputs: vlm_peers.py write-model (pixtral_ref.py, seed 0), once.
  if (!fs::exists(fs::path(s.model_dir) / "config.json") ||
      !fs::exists(fs::path(s.model_dir) / "model.safetensors") || !fs::exists(s.inputs_path)) {
    write_twin_model("vlm_peers.py", small ? "small VLM" : "VLM", s.model_dir, s.inputs_path, small);
  }
  const models::LlavaConfig hf = models::LlavaConfig::from_hf_folder(s.model_dir);
  {
    auto in = safetensors::load_all(s.inputs_path);
    if (!in.count("pixel_values") || !in.count("input_ids") ||
        in.at("input_ids").dtype() != DType::Int64 || in.at("input_ids").shape().rank() != 2 ||
        in.at("input_ids").dim(0) != 1) {
      throw StateError("bench: " + s.inputs_path +
                       " holds no pixel_values and int64 input_ids [1, T] (vlm_peers.py "
                       "write-model writes them)");
    }
    s.pixels = in.at("pixel_values");
    const Tensor& ids = in.at("input_ids");
    s.prompt.assign(ids.data<std::int64_t>(), ids.data<std::int64_t>() + ids.dim(1));
  }
  const auto image_tokens = std::count(s.prompt.begin(), s.prompt.end(), hf.image_token_index);

  json report;
  report["config"] = {{"model_dir", s.model_dir},
                      {"inputs", s.inputs_path},
                      {"small", small},
                      {"dtype", "float32"},
                      {"batch", 1},
                      {"vision",
                       {{"hidden_size", hf.vision.hidden_size},
                        {"num_hidden_layers", hf.vision.num_hidden_layers},
                        {"num_attention_heads", hf.vision.num_attention_heads},
                        {"intermediate_size", hf.vision.intermediate_size},
                        {"patch_size", hf.vision.patch_size},
                        {"image_size", hf.vision.image_size},
                        {"hidden_act", hf.vision.hidden_act}}},
                      {"text",
                       {{"hidden_size", hf.text.hidden_size},
                        {"num_hidden_layers", hf.text.num_hidden_layers},
                        {"num_attention_heads", hf.text.num_attention_heads},
                        {"num_key_value_heads", hf.text.num_key_value_heads},
                        {"intermediate_size", hf.text.intermediate_size},
                        {"vocab_size", hf.text.vocab_size}}},
                      {"image_hw", {s.pixels.dim(2), s.pixels.dim(3)}},
                      {"image_tokens", image_tokens},
                      {"prompt_len", s.prompt.size()},
                      {"text_tokens", static_cast<std::int64_t>(s.prompt.size()) - image_tokens},
                      {"decode_tokens", s.decode_tokens},
                      {"iterations", iters},
                      {"warmup", warmup},
                      {"rounds", rounds},
                      {"feature_tolerance",
                       {{"atol", kVlmFeatureTolerance.atol}, {"rtol", kVlmFeatureTolerance.rtol}}}};

  const auto wanted =
      a.get_list("modes", "pipeline,roundtrip,kernels_bare,pytorch,onnxruntime,llama_cpp");
  auto want = [&](const std::string& m) {
    return std::find(wanted.begin(), wanted.end(), m) != wanted.end();
  };
  if (!want("pipeline") && !want("roundtrip")) {
    throw UsageError(
        "option --modes: name pipeline or roundtrip too (devpipe, the reference output)");
  }
  report["modes"] = json::object();
  std::vector<std::unique_ptr<VlmWorker>> workers;
  std::cerr << "  vlm: compiling devpipe's LlavaForConditionalGeneration...\n";
  workers.push_back(
      std::make_unique<DevpipeVlmWorker>(s, (base / "artifacts" / "float32").string()));
  if (!a.has("no-pytorch") && (want("pytorch") || want("pytorch_mkldnn"))) {
    std::cerr << "  starting the pytorch_mkldnn vlm worker...\n";
    try {
      workers.push_back(std::make_unique<PeerVlmWorker>(
          "pytorch_mkldnn",
          std::vector<std::string>{
              DEVPIPE_TORCH_PYTHON, std::string(DEVPIPE_BENCH_DIR) + "/vlm_peers.py", "serve",
              s.model_dir, "--inputs", s.inputs_path, "--decode-tokens",
              std::to_string(s.decode_tokens), "--threads", std::to_string(threads)},
          (base / "logs" / "pytorch_mkldnn.log").string(),
          (base / "pytorch_mkldnn.features.safetensors").string()));
    } catch (const Error& e) {
      report["modes"]["pytorch_mkldnn"] = {{"skipped", e.what()}};
      std::cerr << "  vlm pytorch_mkldnn skipped: " << e.what() << "\n";
    }
  }

  const std::vector<std::string> phases{"vision", "prefill", "decode_b1"};
  std::map<std::string, std::map<std::string, LlmRun>> times;  // mode -> phase -> run
  std::map<std::string, std::string> failed;
  interleave_phases(
      workers, phases,
      [](VlmWorker& wk, std::size_t ph, int n) {
        return ph == 0 ? wk.vision(n) : ph == 1 ? wk.prefill(n) : wk.decode(n);
      },
      {iters, warmup, rounds}, "vlm", times, failed);

  // The image features of every worker's last vision run (after the rounds, untimed).
  const auto features = last_outputs<VlmWorker>(workers, [](VlmWorker& wk) { return wk.features(); }, failed);
  for (auto& wk : workers) {
    json m = wk->info();
    if (failed.count(wk->mode())) {
      m["error"] = failed[wk->mode()];
      mismatches.push_back("vlm: " + wk->mode() + " failed: " + failed[wk->mode()]);
      report["modes"][wk->mode()] = m;
      continue;
    }
    const auto& mine = times[wk->mode()];
    for (std::size_t ph = 0; ph < phases.size(); ++ph) {
      const LlmRun& t = mine.at(phases[ph]);
      // tokens/s: prefill the prompt's tokens per sample, decode one per step; vision none
      json e = llm_latency_entry(t, ph == 1 ? static_cast<double>(s.prompt.size()) : 1.0);
      if (ph == 0) e.erase("tokens_per_s");
      m[phases[ph]] = e;
      plot.emplace_back("vlm_" + phases[ph] + " " + wk->mode(), t.samples_ms);
    }
    if (wk->mode() != "devpipe" && !failed.count("devpipe")) {
      const auto& ref = times["devpipe"];
      std::string first;
      std::int64_t same = 0, all = 0;
      for (const char* ph : {"prefill", "decode_b1"}) {
        json c = token_check(ref.at(ph).tokens, mine.at(ph).tokens, ph, first);
        same += c["matching"].get<std::int64_t>();
        all += c["total"].get<std::int64_t>();
      }
      const bool ok = same == all && all > 0;
      std::string msg = "vlm: peer " + wk->mode() + ": " + std::to_string(same) + " of " +
                        std::to_string(all) + " greedy ids equal devpipe's" +
                        (ok ? "" : "; first difference: " + first);
      m["token_check"] = {
          {"against", "devpipe"}, {"ok", ok}, {"matching", same}, {"total", all}, {"message", msg}};
      if (!ok) mismatches.push_back(msg);
      const bench::OutputCheck c =
          bench::check_output(wk->mode(), "vlm image features", features.at("devpipe"),
                              features.at(wk->mode()), kVlmFeatureTolerance);
      m["feature_check"] = {{"against", "devpipe"},
                            {"ok", c.ok},
                            {"max_abs_diff", c.max_abs},
                            {"max_rel_diff", c.max_rel},
                            {"elements", features.at("devpipe").size()},
                            {"message", c.message}};
      if (!c.ok) mismatches.push_back(c.message);
    }
    report["modes"][wk->mode()] = m;
  }
  return report;
}

/// The informational targets of a workload with a PyTorch twin (vlm, dit): devpipe's p50 over the
/// twin's (pytorch_mkldnn), one line per phase; no threshold.
void add_twin_targets(const json& r, const std::string& wl, std::initializer_list<const char*> phases, json& out) {
  for (const char* ph : phases) {
    double v = std::nan("");
    try {
      const json& m = r.at("workloads").at(wl).at("modes");
      v = m.at("devpipe").at(ph).at("latency_ms").at("p50").get<double>() /
          m.at("pytorch_mkldnn").at(ph).at("latency_ms").at("p50").get<double>();
    } catch (const json::exception&) {
    }
    out.push_back({{"target", wl + ": devpipe " + ph + " p50 / pytorch " + ph + " p50"},
                   {"measured", std::isnan(v) ? json(nullptr) : json(v)},
                   {"limit", nullptr},
                   {"at_most", true},
                   {"status", std::isnan(v) ? "n/a" : "info"},
                   {"note", "informational: no threshold (the PyTorch twin on oneDNN Linears)"}});
  }
}

/// The vlm rows of the printed table.
void print_vlm_rows(const json& vlm) {
  const json& c = vlm["config"];
  std::printf(
      "\nvlm: Pixtral-shaped LLaVA (vision hidden %lld, %lld layers; text hidden %lld, %lld "
      "layers, vocab %lld), "
      "image %lldx%lld = %lld image tokens, prompt %lld, %lld decode tokens, float32, batch 1\n",
      c["vision"]["hidden_size"].get<long long>(),
      c["vision"]["num_hidden_layers"].get<long long>(), c["text"]["hidden_size"].get<long long>(),
      c["text"]["num_hidden_layers"].get<long long>(), c["text"]["vocab_size"].get<long long>(),
      c["image_hw"][0].get<long long>(), c["image_hw"][1].get<long long>(),
      c["image_tokens"].get<long long>(), c["prompt_len"].get<long long>(),
      c["decode_tokens"].get<long long>());
  std::printf("%-15s %11s %11s %12s %12s %12s %10s %18s  %s\n", "mode", "vision p50", "vision p90",
              "prefill p50", "prefill p90", "b1 step p50", "b1 tok/s", "cpu ms v/p/step", "checks");
  for (const auto& [mode, m] : vlm["modes"].items()) {
    if (m.contains("skipped") || m.contains("error")) {
      const bool skipped = m.contains("skipped");
      std::printf("%-15s %s: %s\n", mode.c_str(), skipped ? "skipped" : "error",
                  m[skipped ? "skipped" : "error"].get<std::string>().c_str());
      continue;
    }
    std::string check = mode == "devpipe" ? "reference" : "not checked";
    if (m.contains("token_check")) {
      const json& t = m["token_check"];
      const json& f = m["feature_check"];
      char buf[160];
      std::snprintf(buf, sizeof buf, "features %s (max |diff| %.2g), ids %lld/%lld %s",
                    f["ok"].get<bool>() ? "match" : "MISMATCH", f["max_abs_diff"].get<double>(),
                    t["matching"].get<long long>(), t["total"].get<long long>(),
                    t["ok"].get<bool>() ? "equal" : "MISMATCH");
      check = buf;
    }
    const std::string cpu = fmt_number(m["vision"]["cpu_ms_per_sample"].get<double>()) + "/" +
                            fmt_number(m["prefill"]["cpu_ms_per_sample"].get<double>()) + "/" +
                            fmt_number(m["decode_b1"]["cpu_ms_per_sample"].get<double>());
    std::printf("%-15s %s  %s   %s   %s   %s %10s %18s  %s\n", mode.c_str(),
                fmt_ms(m["vision"]["latency_ms"]["p50"].get<double>()).c_str(),
                fmt_ms(m["vision"]["latency_ms"]["p90"].get<double>()).c_str(),
                fmt_ms(m["prefill"]["latency_ms"]["p50"].get<double>()).c_str(),
                fmt_ms(m["prefill"]["latency_ms"]["p90"].get<double>()).c_str(),
                fmt_ms(m["decode_b1"]["latency_ms"]["p50"].get<double>()).c_str(),
                fmt_number(m["decode_b1"]["tokens_per_s"].get<double>()).c_str(), cpu.c_str(),
                check.c_str());
  }
}

// ---- the dit workload ------------------------------------------------------------------------
//
// diffusers' DiTPipeline (bench/dit_peers.py write-model, or --dit-small): the class-conditional
// DiT transformer with DDIM and classifier-free guidance, batch 2 at guidance 4 (the transformer
// sees the doubled batch of 4), float32. Phases: step (one denoising step: devpipe's denoiser
// stage once) and generate (a whole generate() of --dit-steps steps); devpipe's DiTPipeline in this
// process and the PyTorch twin (dit_peers.py serve) as a persistent child worker, interleaved as
// the llm workload's modes are; the twin's step output and final latents checked against devpipe's.

/// The workload's inputs: the same for every mode (the inputs file dit_peers.py wrote).
struct DitShape {
  std::string model_dir;
  std::string inputs_path;
  Tensor latents;                          // float32 [B, C, S, S]
  std::vector<std::int64_t> class_labels;  // B
  std::int64_t steps = 10;
  double guidance = 4.0;
};

/// The twin's step output against devpipe's: float32 kernels summing in other orders, one step.
constexpr bench::Tolerance kDitStepTolerance{.atol = 1e-5, .rtol = 1e-4};
/// The final latents after --dit-steps steps: DDIM at guidance 4 amplifies the rounding differences
/// step after step (bench/README.md, "The dit workload", gives the measurement behind this).
constexpr bench::Tolerance kDitLatentsTolerance{.atol = 1e-4, .rtol = 1e-3};

class DitWorker {
 public:
  explicit DitWorker(std::string mode) : mode_(std::move(mode)) {}
  virtual ~DitWorker() = default;
  const std::string& mode() const { return mode_; }
  /// `iters` denoising steps, each from the inputs' latents at the first (noisiest) timestep.
  virtual LlmRun step(int iters) = 0;
  /// `iters` whole generations of `steps` steps from the inputs' latents.
  virtual LlmRun generate(int iters) = 0;
  /// The last step's output and the last generation's final latents, row-major float32 [B, C, S, S].
  virtual std::pair<std::vector<float>, std::vector<float>> outputs() = 0;
  virtual json info() { return json::object(); }

 private:
  std::string mode_;
};

/// devpipe: DiTPipeline, tp 1, float32, one batch bucket (the batch), guidance compiled in.
class DevpipeDitWorker : public DitWorker {
 public:
  DevpipeDitWorker(const DitShape& s, const std::string& artifact)
      : DitWorker("devpipe"), s_(s), app_(s.model_dir, config_for(s)) {
    app_.compile(artifact);
    app_.load(artifact);
    // The step's inputs, as generate() builds them for its first step: the timestep and DDIM's
    // coefficients (1 / sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev)) per image.
    const models::DDIMSchedulerConfig& sc = app_.scheduler_config();
    const std::int64_t t = sc.timesteps(s.steps).at(0);
    const std::array<float, 4> k = sc.step_coefficients(sc.alphas_cumprod(), t, s.steps);
    const auto n = static_cast<std::int64_t>(s.class_labels.size());
    coeffs_ = Tensor::zeros({n, 4});
    for (std::int64_t i = 0; i < n; ++i) std::copy(k.begin(), k.end(), coeffs_.data<float>() + 4 * i);
    labels_ = Tensor::from_vector_i64(s.class_labels, {n});
    timestep_ = Tensor::full({n}, static_cast<double>(t), DType::Int64);
    scale_ = Tensor::full({n}, s.guidance);
  }
  LlmRun step(int iters) override {
    LlmRun r;
    for (int i = 0; i < iters; ++i) {
      const double c0 = process_cpu_ms();
      const auto t0 = Clock::now();
      // pipeline execution: the next latents stay on the device, as generate() feeds them on
      Output out = app_.denoiser().forward({s_.latents, labels_, timestep_, coeffs_, scale_});
      out.ranked().wait();
      r.samples_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      r.cpu_ms += process_cpu_ms() - c0;
      last_step_ = std::move(out);
    }
    return r;
  }
  LlmRun generate(int iters) override {
    LlmRun r;
    for (int i = 0; i < iters; ++i) {
      const double c0 = process_cpu_ms();
      const auto t0 = Clock::now();
      models::DiffusionResult res = app_.generate(s_.class_labels, s_.latents, s_.steps, s_.guidance);
      r.samples_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      r.cpu_ms += process_cpu_ms() - c0;
      last_latents_ = std::move(res.latents);
    }
    return r;
  }
  std::pair<std::vector<float>, std::vector<float>> outputs() override {
    if (!last_step_.is_ranked()) step(1);
    if (last_latents_.numel() == 0) generate(1);
    return {last_step_.ranked().to_host().at(0).to_float_vector(), last_latents_.to_float_vector()};
  }
  json info() override { return {{"threads", std::thread::hardware_concurrency()}, {"version", devpipe_version()}}; }
  const models::DiTPipeline& app() const { return app_; }

 private:
  static InferenceConfig config_for(const DitShape& s) {
    RuntimeConfig rc;
    rc.batch_size = static_cast<std::int64_t>(s.class_labels.size());
    rc.buckets = {rc.batch_size};
    rc.dtype = DType::Float32;
    return models::dit_config(s.model_dir, rc, /*guidance=*/true);
  }
  const DitShape& s_;
  models::DiTPipeline app_;
  Tensor coeffs_, labels_, timestep_, scale_;
  Output last_step_;
  Tensor last_latents_;
};

/// pytorch_mkldnn: dit_peers.py serve, the twin on the dit protocol (bench/README.md).
class PeerDitWorker : public DitWorker {
 public:
  PeerDitWorker(const std::string& mode, const std::vector<std::string>& argv, const std::string& log,
                std::string output_path)
      : DitWorker(mode), child_(mode, argv, log), output_path_(std::move(output_path)) {}
  LlmRun step(int iters) override {
    return parse_llm_run(mode(), child_.request({{"cmd", "step"}, {"iters", iters}}), false);
  }
  LlmRun generate(int iters) override {
    return parse_llm_run(mode(), child_.request({{"cmd", "generate"}, {"iters", iters}}), false);
  }
  std::pair<std::vector<float>, std::vector<float>> outputs() override {
    child_.request({{"cmd", "output"}, {"path", output_path_}});
    auto all = safetensors::load_all(output_path_);
    for (const char* key : {"step", "latents"}) {
      if (!all.count(key))
        throw StateError("bench: peer " + mode() + " wrote no tensor '" + key + "' to " + output_path_);
    }
    return {all.at("step").to_float_vector(), all.at("latents").to_float_vector()};
  }
  json info() override { return peer_info(child_); }
  const json& hello() const { return child_.hello(); }

 private:
  bench::ChildWorker child_;
  std::string output_path_;
};

/// Timed runs per phase and mode by default (--iters).
constexpr int kDitIters = 4;

json dit_check_json(const bench::OutputCheck& c, std::size_t elements, const bench::Tolerance& tol) {
  return {{"against", "devpipe"},
          {"ok", c.ok},
          {"max_abs_diff", c.max_abs},
          {"max_rel_diff", c.max_rel},
          {"elements", elements},
          {"tolerance", {{"atol", tol.atol}, {"rtol", tol.rtol}}},
          {"message", c.message}};
}

json run_dit_workload(const Args& a, const std::string& work,
                      std::vector<std::pair<std::string, std::vector<double>>>& plot,
                      std::vector<std::string>& mismatches) {
  const bool small = a.has("dit-small");
  const int iters = static_cast<int>(a.get_int("iters", kDitIters));
  const int warmup = static_cast<int>(a.get_int("warmup", 1));
  const int rounds = std::min(iters, static_cast<int>(a.get_int("rounds", 5)));
  const int threads = static_cast<int>(std::thread::hardware_concurrency());
  const fs::path base = fs::path(work) / (small ? "dit_small" : "dit");
  fs::create_directories(base / "logs");
  DitShape s;
  s.model_dir = (base / "model").string();
  s.inputs_path = (base / "inputs.safetensors").string();
  s.steps = a.get_int("dit-steps", 10);

  // The weights and the inputs: dit_peers.py write-model (dit_ref.py, seed 0), once.
  const fs::path weights = fs::path(s.model_dir) / "transformer" / "diffusion_pytorch_model.safetensors";
  if (!fs::exists(fs::path(s.model_dir) / "model_index.json") || !fs::exists(weights) || !fs::exists(s.inputs_path)) {
    write_twin_model("dit_peers.py", small ? "small DiT pipeline" : "DiT pipeline", s.model_dir, s.inputs_path,
                     small);
  }
  {
    auto in = safetensors::load_all(s.inputs_path);
    if (!in.count("latents") || !in.count("class_labels") || in.at("class_labels").dtype() != DType::Int64 ||
        in.at("class_labels").shape().rank() != 1 || in.at("latents").dtype() != DType::Float32) {
      throw StateError("bench: " + s.inputs_path +
                       " holds no float32 latents and int64 class_labels [B] (dit_peers.py write-model writes them)");
    }
    s.latents = in.at("latents");
    const Tensor& y = in.at("class_labels");
    s.class_labels.assign(y.data<std::int64_t>(), y.data<std::int64_t>() + y.dim(0));
  }

  const auto wanted = a.get_list("modes", "pipeline,roundtrip,kernels_bare,pytorch,onnxruntime,llama_cpp");
  auto want = [&](const std::string& m) { return std::find(wanted.begin(), wanted.end(), m) != wanted.end(); };
  if (!want("pipeline") && !want("roundtrip")) {
    throw UsageError("option --modes: name pipeline or roundtrip too (devpipe, the reference output)");
  }
  json report;
  report["modes"] = json::object();
  std::vector<std::unique_ptr<DitWorker>> workers;
  std::cerr << "  dit: compiling devpipe's DiTPipeline...\n";
  auto dev = std::make_unique<DevpipeDitWorker>(s, (base / "artifacts" / "float32").string());
  const models::DiTConfig& tc = dev->app().transformer_config();
  const models::DDIMSchedulerConfig& sc = dev->app().scheduler_config();
  const std::vector<std::int64_t> timesteps = sc.timesteps(s.steps);
  const std::int64_t batch = static_cast<std::int64_t>(s.class_labels.size());
  const std::int64_t grid = tc.sample_size / tc.patch_size;
  report["config"] = {{"model_dir", s.model_dir},
                      {"inputs", s.inputs_path},
                      {"small", small},
                      {"dtype", "float32"},
                      {"batch", batch},
                      {"guidance_scale", s.guidance},
                      {"transformer_batch", 2 * batch},
                      {"class_labels", s.class_labels},
                      {"transformer",
                       {{"num_attention_heads", tc.num_attention_heads},
                        {"attention_head_dim", tc.attention_head_dim},
                        {"inner_dim", tc.inner_dim()},
                        {"num_layers", tc.num_layers},
                        {"in_channels", tc.in_channels},
                        {"out_channels", tc.out_channels},
                        {"sample_size", tc.sample_size},
                        {"patch_size", tc.patch_size},
                        {"tokens", grid * grid},
                        {"num_embeds_ada_norm", tc.num_embeds_ada_norm}}},
                      {"scheduler",
                       {{"num_train_timesteps", sc.num_train_timesteps},
                        {"beta_schedule", sc.beta_schedule},
                        {"timestep_spacing", sc.timestep_spacing},
                        {"clip_sample", sc.clip_sample}}},
                      {"steps", s.steps},
                      {"timesteps", timesteps},
                      {"step_timestep", timesteps.at(0)},
                      {"iterations", iters},
                      {"warmup", warmup},
                      {"rounds", rounds},
                      {"step_tolerance", {{"atol", kDitStepTolerance.atol}, {"rtol", kDitStepTolerance.rtol}}},
                      {"latents_tolerance", {{"atol", kDitLatentsTolerance.atol}, {"rtol", kDitLatentsTolerance.rtol}}}};
  workers.push_back(std::move(dev));
  if (!a.has("no-pytorch") && (want("pytorch") || want("pytorch_mkldnn"))) {
    std::cerr << "  starting the pytorch_mkldnn dit worker...\n";
    try {
      auto peer = std::make_unique<PeerDitWorker>(
          "pytorch_mkldnn",
          std::vector<std::string>{DEVPIPE_TORCH_PYTHON, std::string(DEVPIPE_BENCH_DIR) + "/dit_peers.py", "serve",
                                   s.model_dir, "--inputs", s.inputs_path, "--steps", std::to_string(s.steps),
                                   "--guidance", fmt_number(s.guidance), "--linear", "mkldnn", "--threads",
                                   std::to_string(threads)},
          (base / "logs" / "pytorch_mkldnn.log").string(), (base / "pytorch_mkldnn.outputs.safetensors").string());
      const json got = peer->hello().value("timesteps", json::array());
      if (got != json(timesteps)) {
        throw StateError("bench: dit peer pytorch_mkldnn runs the timesteps " + got.dump() + ", devpipe " +
                         json(timesteps).dump());
      }
      workers.push_back(std::move(peer));
    } catch (const Error& e) {
      report["modes"]["pytorch_mkldnn"] = {{"skipped", e.what()}};
      std::cerr << "  dit pytorch_mkldnn skipped: " << e.what() << "\n";
    }
  }

  const std::vector<std::string> phases{"step", "generate"};
  std::map<std::string, std::map<std::string, LlmRun>> times;  // mode -> phase -> run
  std::map<std::string, std::string> failed;
  interleave_phases(
      workers, phases, [](DitWorker& wk, std::size_t ph, int n) { return ph == 0 ? wk.step(n) : wk.generate(n); },
      {iters, warmup, rounds}, "dit", times, failed);

  // The step output and the final latents of every worker's last runs (after the rounds, untimed).
  const auto outs = last_outputs<DitWorker>(workers, [](DitWorker& wk) { return wk.outputs(); }, failed);
  for (auto& wk : workers) {
    json m = wk->info();
    if (failed.count(wk->mode())) {
      m["error"] = failed[wk->mode()];
      mismatches.push_back("dit: " + wk->mode() + " failed: " + failed[wk->mode()]);
      report["modes"][wk->mode()] = m;
      continue;
    }
    for (std::size_t ph = 0; ph < phases.size(); ++ph) {
      // steps/s: a step sample is one step, a generate sample `steps` of them
      json e = llm_latency_entry(times[wk->mode()].at(phases[ph]), ph == 0 ? 1.0 : static_cast<double>(s.steps));
      e["steps_per_s"] = e["tokens_per_s"];
      e.erase("tokens_per_s");
      m[phases[ph]] = e;
      plot.emplace_back("dit_" + phases[ph] + " " + wk->mode(), times[wk->mode()].at(phases[ph]).samples_ms);
    }
    if (wk->mode() != "devpipe" && outs.count("devpipe")) {
      const auto& [ref_step, ref_latents] = outs.at("devpipe");
      const auto& [got_step, got_latents] = outs.at(wk->mode());
      const bench::OutputCheck cs =
          bench::check_output(wk->mode(), "dit step (timestep " + std::to_string(timesteps.at(0)) + ")", ref_step,
                              got_step, kDitStepTolerance);
      const bench::OutputCheck cl =
          bench::check_output(wk->mode(), "dit final latents (" + std::to_string(s.steps) + " steps)", ref_latents,
                              got_latents, kDitLatentsTolerance);
      m["output_check"] = {{"step", dit_check_json(cs, ref_step.size(), kDitStepTolerance)},
                           {"latents", dit_check_json(cl, ref_latents.size(), kDitLatentsTolerance)},
                           {"ok", cs.ok && cl.ok}};
      if (!cs.ok) mismatches.push_back(cs.message);
      if (!cl.ok) mismatches.push_back(cl.message);
    }
    report["modes"][wk->mode()] = m;
  }
  return report;
}

/// The dit rows of the printed table.
void print_dit_rows(const json& dit) {
  const json& c = dit["config"];
  const json& t = c["transformer"];
  std::printf(
      "\ndit: DiTPipeline (DiT %lld heads x %lld, %lld layers, latents %lld x %lld x %lld, patch %lld = %lld tokens, "
      "%lld classes), DDIM %lld steps, batch %lld at guidance %s (transformer batch %lld), float32\n",
      t["num_attention_heads"].get<long long>(), t["attention_head_dim"].get<long long>(),
      t["num_layers"].get<long long>(), t["in_channels"].get<long long>(), t["sample_size"].get<long long>(),
      t["sample_size"].get<long long>(), t["patch_size"].get<long long>(), t["tokens"].get<long long>(),
      t["num_embeds_ada_norm"].get<long long>(), c["steps"].get<long long>(), c["batch"].get<long long>(),
      fmt_number(c["guidance_scale"].get<double>()).c_str(), c["transformer_batch"].get<long long>());
  std::printf("%-15s %11s %11s %9s %13s %13s %9s %14s  %s\n", "mode", "step p50", "step p90", "steps/s", "generate p50",
              "generate p90", "steps/s", "cpu ms st/gen", "checks");
  for (const auto& [mode, m] : dit["modes"].items()) {
    if (m.contains("skipped") || m.contains("error")) {
      const bool skipped = m.contains("skipped");
      std::printf("%-15s %s: %s\n", mode.c_str(), skipped ? "skipped" : "error",
                  m[skipped ? "skipped" : "error"].get<std::string>().c_str());
      continue;
    }
    std::string check = mode == "devpipe" ? "reference" : "not checked";
    if (m.contains("output_check")) {
      const json& st = m["output_check"]["step"];
      const json& lt = m["output_check"]["latents"];
      char buf[160];
      std::snprintf(buf, sizeof buf, "step %s (max |diff| %.2g), latents %s (max |diff| %.2g)",
                    st["ok"].get<bool>() ? "match" : "MISMATCH", st["max_abs_diff"].get<double>(),
                    lt["ok"].get<bool>() ? "match" : "MISMATCH", lt["max_abs_diff"].get<double>());
      check = buf;
    }
    const std::string cpu = fmt_number(m["step"]["cpu_ms_per_sample"].get<double>()) + "/" +
                            fmt_number(m["generate"]["cpu_ms_per_sample"].get<double>());
    std::printf("%-15s %s  %s %9s    %s    %s %9s %14s  %s\n", mode.c_str(),
                fmt_ms(m["step"]["latency_ms"]["p50"].get<double>()).c_str(),
                fmt_ms(m["step"]["latency_ms"]["p90"].get<double>()).c_str(),
                fmt_number(m["step"]["steps_per_s"].get<double>()).c_str(),
                fmt_ms(m["generate"]["latency_ms"]["p50"].get<double>()).c_str(),
                fmt_ms(m["generate"]["latency_ms"]["p90"].get<double>()).c_str(),
                fmt_number(m["generate"]["steps_per_s"].get<double>()).c_str(), cpu.c_str(), check.c_str());
  }
}

// ---- the targets -----------------------------------------------------------------------------

double p50_of(const json& r, const std::string& wl, const std::string& mode) {
  try {
    return r.at("workloads").at(wl).at("modes").at(mode).at("latency_ms").at("p50").get<double>();
  } catch (const json::exception&) {
    return std::nan("");
  }
}

/// Issue 12's "Done when" list, measured: one entry per target with measured, target, status
/// (PASS, FAIL or "n/a" when a figure is missing).
json evaluate_targets(const json& r) {
  json out = json::array();
  auto add = [&](const std::string& what, double v, double target, bool at_most, const std::string& note = "") {
    std::string status = std::isnan(v) ? "n/a" : ((at_most ? v <= target : v >= target) ? "PASS" : "FAIL");
    out.push_back({{"target", what}, {"measured", std::isnan(v) ? json(nullptr) : json(v)},
                   {"limit", target}, {"at_most", at_most}, {"status", status}, {"note", note}});
  };
  auto roof = [&](const std::string& wl) {
    try {
      return r.at("workloads").at(wl).at("modes").at("pipeline").at("roofline_ratio").get<double>();
    } catch (const json::exception&) {
      return std::nan("");
    }
  };
  auto cpu_note = [&](const std::string& wl) -> std::string {
    try {
      const double v = r.at("workloads").at(wl).at("modes").at("pipeline").at("roofline_ratio_cpu").get<double>();
      const bool loaded = r.at("machine").at("limits").at("contended").get<bool>();
      const bool moved = r.at("machine").value("limits_moved", false);
      return (loaded ? "machine loaded; " : "") + std::string(moved ? "limits moved during the run; " : "") +
             "CPU time / (threads x roofline) = " + fmt_number(v);
    } catch (const json::exception&) {
      return "";
    }
  };
  add("seed_tp1: pipeline p50 / roofline", roof("seed_tp1"), 1.15, true, cpu_note("seed_tp1"));
  add("large: pipeline p50 / roofline", roof("large"), 1.5, true, cpu_note("large"));
  // The ranks of seed_tp2 each run the vision stage on half the batch: how far apart their compute
  // times are on this machine, and how much of it went to the other rank's bands (a rank that
  // finishes first runs them while it waits at the all-gather).
  auto rank_spread_note = [&]() -> std::string {
    try {
      const json& per = r.at("workloads").at("seed_tp2").at("modes").at("pipeline").at("rank_own_compute_ms");
      const auto [lo, hi] = std::minmax_element(per.begin(), per.end());
      if (lo->get<double>() <= 0) return "";
      std::string note = "the ranks' compute per forward: " + fmt_number(lo->get<double>()) + " to " +
                         fmt_number(hi->get<double>()) + " ms";
      const json& help = r.at("workloads").at("seed_tp2").at("modes").at("pipeline").at("rank_help_ms");
      const auto [hlo, hhi] = std::minmax_element(help.begin(), help.end());
      return note + ", of which a peer's bands " + fmt_number(hlo->get<double>()) + " to " +
             fmt_number(hhi->get<double>()) + " ms";
    } catch (const json::exception&) {
      return "";
    }
  };
  // tp 1 from seed_tp2's own rounds (pipeline_tp1, interleaved with tp 2), else seed_tp1's.
  const double tp1_interleaved = p50_of(r, "seed_tp2", "pipeline_tp1");
  const bool interleaved = !std::isnan(tp1_interleaved);
  const std::string spread = rank_spread_note();
  add("seed: tp2 pipeline p50 / tp1 pipeline p50",
      p50_of(r, "seed_tp2", "pipeline") / (interleaved ? tp1_interleaved : p50_of(r, "seed_tp1", "pipeline")), 1.1, true,
      std::string(interleaved ? "tp 1 timed in seed_tp2's rounds (pipeline_tp1)" : "tp 1 from seed_tp1's rounds") +
          (spread.empty() ? "" : "; " + spread));
  add("chain8: pipeline p50 / kernels_bare p50", p50_of(r, "chain8", "pipeline") / p50_of(r, "chain8", "kernels_bare"),
      1.3, true);
  add("chain8: pipeline p50 / executables_bare p50",
      p50_of(r, "chain8", "pipeline") / p50_of(r, "chain8", "executables_bare"), 1.3, true,
      "informational: the runtime around the same executables");
  for (const char* peer : {"onnxruntime", "pytorch_eager"}) {
    for (const char* wl : {"seed_tp1", "large", "chain8"}) {
      add(std::string(wl) + ": " + peer + " p50 / pipeline p50 (devpipe faster)",
          p50_of(r, wl, peer) / p50_of(r, wl, "pipeline"), 1.0, false);
    }
  }
  // Every peer's output checked and matching.
  int checked = 0, expected = 0;
  std::string missing;
  if (r.contains("workloads")) {
    for (const auto& [wl, wj] : r["workloads"].items()) {
      if (wl == "llm" || wl == "vlm" || wl == "dit") continue;  // their own checks (tokens, features, latents)
      for (const auto& [mode, mj] : wj["modes"].items()) {
        if (mode == "pipeline") continue;
        ++expected;
        if (mj.contains("output_check") && mj["output_check"].value("ok", false)) {
          ++checked;
        } else {
          missing += (missing.empty() ? "" : ", ") + wl + " " + mode;
        }
      }
    }
  }
  add("every peer's output checked against devpipe's (fraction matching)",
      expected ? static_cast<double>(checked) / expected : std::nan(""), 1.0, false,
      missing.empty() ? "" : "not checked or not matching: " + missing);
  if (r.contains("workloads") && r["workloads"].contains("llm")) add_llm_targets(r, out);
  if (r.contains("workloads") && r["workloads"].contains("vlm")) add_twin_targets(r, "vlm", {"vision", "prefill"}, out);
  if (r.contains("workloads") && r["workloads"].contains("dit")) add_twin_targets(r, "dit", {"step", "generate"}, out);
  return out;
}

void print_targets(const json& targets) {
  std::printf("\n%-66s %10s %8s  %s\n", "target (issues 12, 10; vlm, dit informational)", "measured",
              "target", "status");
  for (const auto& t : targets) {
    const std::string lim = t["limit"].is_null() ? std::string("-")
                                                 : (t["at_most"].get<bool>() ? "<= " : ">= ") +
                                                       fmt_number(t["limit"].get<double>());
    std::printf("%-66s %10s %8s  %s%s\n", t["target"].get<std::string>().c_str(),
                t["measured"].is_null() ? "-" : fmt_number(t["measured"].get<double>()).c_str(), lim.c_str(),
                t["status"].get<std::string>().c_str(),
                t["note"].get<std::string>().empty() ? "" : ("  (" + t["note"].get<std::string>() + ")").c_str());
  }
}

}  // namespace

const Command& bench_command() {
  static const Command c{
      .name = "bench",
      .summary = "run the benchmark workloads against the machine's limits and their peers; write a JSON report and a latency plot",
      .options =
          {{.name = "all", .help = "all workloads (the default without --workload)"},
           {.name = "workload", .kind = OptionKind::ChoiceList, .value = "W,...",
            .help = "workloads to run ('seed' is seed_tp1 and seed_tp2)",
            .choices = {"seed", "seed_tp1", "seed_tp2", "large", "chain8", "llm", "vlm", "dit"}},
           {.name = "modes", .kind = OptionKind::ChoiceList, .value = "M,...",
            .help = "modes to run (default all; llm: pipeline or roundtrip is devpipe, pytorch is both twin modes)",
            .choices = {"pipeline", "roundtrip", "folded", "kernels_bare", "executables_bare", "pytorch", "onnxruntime",
                        "pytorch_mkldnn", "pytorch_eager", "llama_cpp"}},
           {.name = "iters", .kind = OptionKind::Int, .value = "N",
            .help = "timed iterations per mode (default 20; chain8 200; llm 4 prefills and 4 decode runs per batch; "
                    "vlm 8 per phase; dit 4 per phase)",
            .min = 1, .max = 1000000},
           {.name = "warmup", .kind = OptionKind::Int, .value = "N",
            .help = "untimed iterations per mode before (default 3; chain8 20; llm, vlm and dit 1)", .min = 0, .max = 1000000},
           {.name = "rounds", .kind = OptionKind::Int, .value = "N",
            .help = "alternating rounds the iterations are split into (default 5)", .min = 1, .max = 100000},
           {.name = "out", .kind = OptionKind::String, .value = "FILE",
            .help = "the JSON report (default build/bench/report.json)"},
           {.name = "plot", .kind = OptionKind::String, .value = "FILE",
            .help = "the latency plot, SVG (default latency.svg beside --out)"},
           {.name = "trace", .kind = OptionKind::String, .value = "FILE",
            .help = "also write one forward of the first workload as a Chrome trace"},
           {.name = "work", .kind = OptionKind::String, .value = "DIR",
            .help = "weights, inputs, outputs, models and logs (default work/ beside --out)"},
           {.name = "ort-dir", .kind = OptionKind::String, .value = "DIR",
            .help = "where bench/ort/install.sh installs onnxruntime-node (default ort/ beside --out)"},
           {.name = "no-pytorch", .help = "skip the PyTorch peer"},
           {.name = "llm-small", .help = "llm: the small model (hidden 64, 2 layers, vocab 300) instead of the 100M one"},
           {.name = "llm-decode-tokens", .kind = OptionKind::Int, .value = "N",
            .help = "llm: tokens per decode run (default 16)", .min = 2, .max = 1024},
           {.name = "llm-dtypes", .kind = OptionKind::ChoiceList, .value = "D,...",
            .help = "llm: dtypes to run (default float32,bfloat16)", .choices = {"float32", "bfloat16"}},
           {.name = "llm-eager-float32", .help = "llm: also time pytorch_eager in float32 (minutes here)"},
           {.name = "vlm-small", .help = "vlm: the tiny VLM (vision hidden 32, text hidden 64, image 16x16) for tests"},
           {.name = "vlm-decode-tokens", .kind = OptionKind::Int, .value = "N",
            .help = "vlm: tokens per decode run (default 16)", .min = 2, .max = 256},
           {.name = "dit-small", .help = "dit: the tiny DiT (2 heads x 16, 2 layers, latents 4x8x8) for tests"},
           {.name = "dit-steps", .kind = OptionKind::Int, .value = "N",
            .help = "dit: DDIM steps per generate (default 10)", .min = 1, .max = 1000},
           {.name = "llama-cpp-dir", .kind = OptionKind::String, .value = "DIR",
            .help = "where bench/llama_cpp/install.sh installs node-llama-cpp (default $DEVPIPE_LLAMA_CPP_DIR, "
                    "else llama_cpp/ beside --out)"}},
      .notes = "Exits 1 when a peer's output differs from devpipe's beyond the tolerance; missed speed\n"
               "targets are reported (FAIL) but do not change the exit status.\n"
               "See bench/README.md for the workloads, the modes, the worker protocol and the report.\n"};
  return c;
}

int bench_main(const Args& a) {
  if (a.has("all") && a.has("workload")) {
    throw UsageError("options --all and --workload exclude each other");
  }
  std::vector<std::string> names;
  for (const std::string& item : a.get_list("workload", "seed,large,chain8,llm,vlm,dit")) {
    for (const std::string& n : item == "seed" ? std::vector<std::string>{"seed_tp1", "seed_tp2"}
                                               : std::vector<std::string>{item}) {
      if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
    }
  }
  // llm, vlm and dit are not stage pipelines of bench/workloads.h: own workers, checks and tables
  auto own_kind = [](const std::string& n) { return n == "llm" || n == "vlm" || n == "dit"; };
  if (a.has("trace") && std::all_of(names.begin(), names.end(), own_kind)) {
    throw UsageError(
        "option --trace traces a workload other than llm, vlm and dit (seed_tp1, seed_tp2, large, "
        "chain8)");
  }
  std::string out = a.get("out", "build/bench/report.json");
  const fs::path out_dir = fs::path(out).parent_path().empty() ? fs::path(".") : fs::path(out).parent_path();
  std::string work = a.get("work", (out_dir / "work").string());
  fs::create_directories(out_dir);
  const int threads = static_cast<int>(std::thread::hardware_concurrency());

  json report;
  report["run"] = run_json(threads);
  std::cerr << "measuring the machine's limits on " << threads << " threads...\n";
  const bench::MachineLimits lim = bench::measure_machine_limits(threads);
  report["machine"] = machine_json(lim);
  std::printf("machine: %s, %d threads: peak fp32 FMA %.1f GFLOP/s (%s loop), triad %.1f GB/s; load average %s\n",
              report["machine"]["cpu"].get<std::string>().c_str(), threads, lim.peak_gflops, lim.fma_isa.c_str(),
              lim.triad_gbs, report["run"]["load_average_start"].dump().c_str());
  if (lim.contended()) {
    std::printf("machine: LOADED: by wall clock only %.1f GFLOP/s and %.1f GB/s; other processes share the cores,\n"
                "         so every wall-clock figure of this run (and its ratio to the roofline) is inflated\n",
                lim.peak_gflops_wall, lim.triad_gbs_wall);
  }
  std::fflush(stdout);

  const auto modes = a.get_list("modes", "pipeline,roundtrip,kernels_bare,pytorch,onnxruntime,llama_cpp");
  const bool llm = std::find(names.begin(), names.end(), "llm") != names.end();
  const bool vlm = std::find(names.begin(), names.end(), "vlm") != names.end();
  const bool dit = std::find(names.begin(), names.end(), "dit") != names.end();
  const bool others = !std::all_of(names.begin(), names.end(), own_kind);
  OrtInstall ort{"", "not requested (--modes)"};
  if (others && std::find(modes.begin(), modes.end(), "onnxruntime") != modes.end()) {
    ort = install_ort(fs::absolute(a.get("ort-dir", (out_dir / "ort").string())).lexically_normal().string());
  }
  LlamaCppInstall lcpp{"", "not requested (--modes)"};
  if (llm && std::find(modes.begin(), modes.end(), "llama_cpp") != modes.end()) {
    const char* env = std::getenv("DEVPIPE_LLAMA_CPP_DIR");
    const std::string fallback = env && *env ? std::string(env) : (out_dir / "llama_cpp").string();
    lcpp = install_llama_cpp(fs::absolute(a.get("llama-cpp-dir", fallback)).lexically_normal().string());
  }

  std::vector<std::pair<std::string, std::vector<double>>> plot;
  std::vector<std::string> mismatches;
  for (const auto& n : names) {
    std::cerr << "workload " << n << "\n";
    report["workloads"][n] = n == "llm"   ? run_llm_workload(a, work, lim, lcpp, plot, mismatches)
                             : n == "vlm" ? run_vlm_workload(a, work, plot, mismatches)
                             : n == "dit" ? run_dit_workload(a, work, plot, mismatches)
                                          : run_workload(n, a, work, lim, ort, plot, mismatches);
  }
  report["run"]["load_average_end"] = bench::load_average_json();
  {
    // The limits again: on a shared host they move (another guest on the cores' siblings), and
    // a roofline from limits that did not hold for the run is no floor.
    const bench::MachineLimits end = bench::measure_machine_limits(threads);
    const double moved = std::max(std::fabs(end.peak_gflops / lim.peak_gflops - 1),
                                  std::fabs(end.triad_gbs / lim.triad_gbs - 1));
    report["machine"]["limits_at_end"] = machine_json(end)["limits"];
    report["machine"]["limits_moved"] = moved > kLimitsMoved;
    std::printf("machine at the end: peak fp32 FMA %.1f GFLOP/s, triad %.1f GB/s (%+.0f%% and %+.0f%% against the start)\n",
                end.peak_gflops, end.triad_gbs, (end.peak_gflops / lim.peak_gflops - 1) * 100,
                (end.triad_gbs / lim.triad_gbs - 1) * 100);
    if (moved > kLimitsMoved) {
      std::printf("machine: the limits MOVED by more than %.0f%% during the run: its roofline ratios are not trustworthy\n",
                  kLimitsMoved * 100);
    }
  }
  report["targets"] = evaluate_targets(report);
  report["correctness_failures"] = mismatches;
  {
    const std::string tmp = out + ".tmp";
    std::ofstream f(tmp);
    f << report.dump(2) << "\n";
    f.close();
    if (!f) throw IoError("cannot write report '" + tmp + "'");
    fs::rename(tmp, out);
  }
  std::cout << "wrote " << out << "\n";

  if (others) {
    std::printf("\n%-10s %-16s %10s %10s %10s %12s %10s %9s  %s\n", "workload", "mode", "p50 ms", "p90 ms", "mean ms",
                "cpu ms/fwd", "/roofline", "cpu/roof", "output");
  }
  for (const auto& [wl, wj] : report["workloads"].items()) {
    if (own_kind(wl)) continue;  // their own tables below
    std::printf("%-10s %-16s %s %34s  (%s-bound: compute %.3f ms, memory %.3f ms)\n", wl.c_str(), "roofline",
                fmt_ms(wj["roofline"]["time_ms"].get<double>()).c_str(), "", wj["roofline"]["bound"].get<std::string>().c_str(),
                wj["roofline"]["compute_ms"].get<double>(), wj["roofline"]["memory_ms"].get<double>());
    for (const auto& [mode, mj] : wj["modes"].items()) {
      std::string check = mode == "pipeline" ? "reference"
                          : mj.contains("output_check")
                              ? (mj["output_check"]["ok"].get<bool>() ? "matches" : "MISMATCH")
                              : "not checked";
      if (mj.contains("skipped")) {
        std::printf("%-10s %-16s skipped: %s\n", wl.c_str(), mode.c_str(), mj["skipped"].get<std::string>().c_str());
      } else if (mj.contains("error")) {
        std::printf("%-10s %-16s error: %s\n", wl.c_str(), mode.c_str(), mj["error"].get<std::string>().c_str());
      } else if (mj.contains("latency_ms")) {
        std::printf("%-10s %-16s %s %s %s   %s %10.2f %9.2f  %s\n", wl.c_str(), mode.c_str(),
                    fmt_ms(mj["latency_ms"]["p50"].get<double>()).c_str(),
                    fmt_ms(mj["latency_ms"]["p90"].get<double>()).c_str(),
                    fmt_ms(mj["latency_ms"]["mean"].get<double>()).c_str(),
                    fmt_ms(mj["cpu_ms_per_forward"].get<double>()).c_str(),
                    mj["roofline_ratio"].get<double>(), mj["roofline_ratio_cpu"].get<double>(), check.c_str());
      } else {
        std::printf("%-10s %-16s %10s %10s %10s %12s %10s  %s (not timed here)\n", wl.c_str(), mode.c_str(), "-", "-",
                    "-", "-", "-", check.c_str());
      }
      if (mj.contains("boundary_overhead_us")) {
        std::printf("%-10s %-16s boundary overhead vs kernels_bare: %.2f us per boundary\n", "", "",
                    mj["boundary_overhead_us"].get<double>());
      }
      if (mj.contains("boundary_overhead_vs_executables_us")) {
        std::printf("%-10s %-16s boundary overhead vs executables_bare: %.2f us per boundary\n", "", "",
                    mj["boundary_overhead_vs_executables_us"].get<double>());
      }
    }
  }
  if (llm) print_llm_rows(report["workloads"]["llm"]);
  if (vlm) print_vlm_rows(report["workloads"]["vlm"]);
  if (dit) print_dit_rows(report["workloads"]["dit"]);
  print_targets(report["targets"]);

  std::string plot_path = a.get("plot", (out_dir / "latency.svg").string());
  std::ofstream(plot_path) << bench::latency_svg("devpipe bench: latency per workload and mode (ms)", plot);
  std::cout << "wrote " << plot_path << "\n";

  if (a.has("trace")) {
    // One traced forward of the first workload (other than llm, vlm and dit) in pipeline mode, kernels
    // included.
    Workload w = make_workload(*std::find_if(names.begin(), names.end(),
                                             [&](const std::string& n) { return !own_kind(n); }));
    auto ws = build_stages(w, /*pipeline=*/true, work, "trace", "");
    for (int i = 0; i < 3; ++i) run_chain(ws, w);  // warm, as the timed loops are
    write_trace_of([&] { run_chain(ws, w); }, a.get("trace", ""));
  }
  if (!mismatches.empty()) {
    std::cerr << "\ndevpipe bench: " << mismatches.size() << " output mismatch(es):\n";
    for (const auto& m : mismatches) std::cerr << "  " << m << "\n";
    return 1;
  }
  return 0;
}

}  // namespace devpipe::cli
