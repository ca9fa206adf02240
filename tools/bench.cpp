// devpipe bench — the benchmark workloads in pipeline and round-trip mode, side by side with
// PyTorch and with bare oneDNN kernels, in one run; writes a JSON report.
#include <omp.h>
#include <sys/utsname.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "cli_common.h"
#include "compiler/artifact.h"
#include "devpipe/devpipe.h"
#include "devpipe/timeline.h"
#include "kernels_bare.h"
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
};

struct Workload {
  std::string name;        // report key
  std::string torch_name;  // pytorch_bench.py --workload
  InferenceConfig config;
  std::vector<Stage> stages;
  std::vector<std::vector<Tensor>> extra;  // host inputs of each stage (stage i>0 also gets stage i-1's output)
  bool boundary_overhead = false;
};

template <class M>
Stage stage(const std::string& tag, const std::string& file, std::vector<Tensor> example_fn_inputs) {
  return Stage{tag, file,
               [](const InferenceConfig& c) { return model_cls<M>().create(c); },
               [example_fn_inputs](const InferenceConfig& c, WrapperOptions o) -> std::unique_ptr<ModelWrapper> {
                 return std::make_unique<bench::BenchWrapper<M>>(c, std::move(o), example_fn_inputs);
               }};
}

Workload make_workload(const std::string& name) {
  if (name == "seed_tp1" || name == "seed_tp2") {
    int tp = name == "seed_tp1" ? 1 : 2;
    Workload w{name, "seed", vision_text::seed_config(32, tp), {}, {}, false};
    Tensor image = Tensor::randn({32, 3, 224, 224}, 42), text = Tensor::randn({32, 256}, 43);
    w.stages.push_back(stage<vision_text::VisionModel>("vision_model", "vision.safetensors", {image}));
    w.stages.push_back(stage<vision_text::TextModel>("text_model", "text.safetensors",
                                                     {Tensor::zeros({32, 512}), text}));
    w.extra = {{image}, {text}};
    return w;
  }
  if (name == "large") {
    Workload w{name, "large", InferenceConfig(RuntimeConfig{.batch_size = 32, .tp_degree = 1}), {}, {}, false};
    Tensor x = Tensor::randn({32, 1440, 8}, 44);
    w.stages.push_back(stage<bench::Expand>("expand", "expand.safetensors", {x}));
    w.stages.push_back(stage<bench::Reduce>("reduce", "reduce.safetensors", {Tensor::zeros({32, 1440, 1280})}));
    w.extra = {{x}, {}};
    return w;
  }
  if (name == "chain8") {
    Workload w{name, "chain8", InferenceConfig(RuntimeConfig{.batch_size = 1, .tp_degree = 2}), {}, {}, true};
    Tensor x = Tensor::randn({1, 64}, 45);
    for (int i = 0; i < 8; ++i) {
      w.stages.push_back(stage<bench::ChainStage>("stage" + std::to_string(i), "stage" + std::to_string(i) + ".safetensors", {x}));
      w.extra.push_back(i == 0 ? std::vector<Tensor>{x} : std::vector<Tensor>{});
    }
    return w;
  }
  throw InvalidArgument("unknown workload '" + name + "' (seed_tp1, seed_tp2, large, chain8; 'seed' means both seed ones)");
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
  for (std::size_t i = 0; i < ws.size(); ++i) {
    std::vector<Input> args;
    if (i > 0) args.push_back(prev);
    for (const Tensor& t : w.extra[i]) args.emplace_back(t);
    const std::uint64_t d2h = transfer_stats().device_to_host_bytes;
    prev = ws[i]->forward(args);
    if (between && i + 1 < ws.size()) *between += transfer_stats().device_to_host_bytes - d2h;
  }
  Tensor out = prev.tensor();
  if (between) *between += transfer_stats().device_to_device_bytes - start.device_to_device_bytes;
  return out;
}

/// Compiles and loads every stage of `w` from the checkpoints under work/weights/<workload>:
/// with `pipeline`, stages hand ranked outputs on; without, every stage returns to the host.
/// Tags get `tag_suffix`; artifacts go to work/artifacts/<workload>/<label>/<stage>.
std::vector<std::unique_ptr<ModelWrapper>> build_stages(const Workload& w, bool pipeline, const std::string& work,
                                                        const std::string& label, const std::string& tag_suffix) {
  const std::string wdir = (fs::path(work) / "weights" / w.name).string();
  std::vector<std::unique_ptr<ModelWrapper>> ws;
  for (std::size_t i = 0; i < w.stages.size(); ++i) {
    const bool last = i + 1 == w.stages.size();
    auto wr = w.stages[i].wrapper(w.config, {.pipeline_execution = pipeline, .return_ranked_to_cpu = last,
                                             .tag = w.stages[i].tag + tag_suffix});
    std::string art = (fs::path(work) / "artifacts" / w.name / label / w.stages[i].tag).string();
    wr->compile(wdir + "/" + w.stages[i].weights_file, art);
    wr->load(art);
    ws.push_back(std::move(wr));
  }
  return ws;
}

struct ModeRun {
  std::vector<std::unique_ptr<ModelWrapper>> wrappers;
  std::vector<double> samples_ms;
  TransferStats bytes{};
  std::map<std::string, double> compute_us;  // stage tag -> summed "compute" span time on rank 0
  std::uint64_t between = 0;                 // bytes copied at stage boundaries (all iterations)
  std::string suffix;
};

void add_bytes(TransferStats& acc, const TransferStats& a, const TransferStats& b) {
  acc.host_to_device_bytes += b.host_to_device_bytes - a.host_to_device_bytes;
  acc.device_to_host_bytes += b.device_to_host_bytes - a.device_to_host_bytes;
  acc.device_to_device_bytes += b.device_to_device_bytes - a.device_to_device_bytes;
}

json machine_json() {
  utsname u{};
  uname(&u);
  std::string cpu = "?";
  std::ifstream ci("/proc/cpuinfo");
  for (std::string line; std::getline(ci, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  return {{"cores", std::thread::hardware_concurrency()}, {"cpu", cpu}, {"kernel", u.release},
          {"devpipe_version", devpipe_version()}};
}

json run_pytorch(const Workload& w, const std::string& weights, int iters, int warmup) {
  std::string cmd = std::string(DEVPIPE_TORCH_PYTHON) + " " + DEVPIPE_BENCH_DIR + "/pytorch_bench.py --workload " +
                    w.torch_name + " --weights " + weights + " --iters " + std::to_string(iters) + " --warmup " +
                    std::to_string(warmup) + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return {{"error", "cannot start " + cmd}};
  std::string out;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  int rc = ::pclose(p);
  auto brace = out.rfind("\n{");
  std::string js = brace == std::string::npos ? out : out.substr(brace + 1);
  try {
    if (rc != 0) throw std::runtime_error("exit code " + std::to_string(rc));
    return json::parse(js);
  } catch (const std::exception& e) {
    return {{"error", std::string("pytorch_bench.py failed: ") + e.what() + ": " + out.substr(0, 2000)}};
  }
}

json run_workload(const std::string& name, const Args& a, const std::string& work,
                  std::vector<std::pair<std::string, std::vector<double>>>& plot) {
  Workload w = make_workload(name);
  int iters = static_cast<int>(a.get_int("iters", name == "chain8" ? 200 : 20));
  int warmup = static_cast<int>(a.get_int("warmup", name == "chain8" ? 20 : 3));
  std::string wdir = (fs::path(work) / "weights" / name).string();
  fs::create_directories(wdir);
  for (std::size_t i = 0; i < w.stages.size(); ++i) {
    auto m = w.stages[i].model(w.config);
    safetensors::save(wdir + "/" + w.stages[i].weights_file, nn::random_state_dict(*m, 100 + i));
  }

  // Both modes: compiled from the same checkpoints, differing only in the pipeline flags.
  std::map<std::string, ModeRun> modes;
  std::vector<std::string> mode_names;
  for (const std::string& m : a.get_list("modes", "pipeline,roundtrip")) {
    if (std::find(mode_names.begin(), mode_names.end(), m) == mode_names.end()) mode_names.push_back(m);
  }
  for (const std::string& mode : mode_names) {
    ModeRun& mr = modes[mode];
    mr.wrappers = build_stages(w, mode == "pipeline", work, mode, "@" + mode);
  }

  // Warm-up, then interleaved timed iterations (pipeline, roundtrip, pipeline, ...).
  for (int i = 0; i < warmup; ++i) {
    for (auto& [mode, mr] : modes) run_chain(mr.wrappers, w);
  }
  Tensor ref_out = run_chain(modes.begin()->second.wrappers, w);
  double max_mode_diff = max_abs_diff(ref_out, run_chain(modes.rbegin()->second.wrappers, w));
  timeline::start(false);
  int total = iters * static_cast<int>(modes.size());
  int done = 0;
  for (int i = 0; i < iters; ++i) {
    for (auto& [mode, mr] : modes) {
      TransferStats before = transfer_stats();
      auto t0 = Clock::now();
      run_chain(mr.wrappers, w, &mr.between);
      mr.samples_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
      add_bytes(mr.bytes, before, transfer_stats());
      if (++done % std::max(1, total / 20) == 0 || done == total) {
        print_progress(name, done, total, mode);
      }
    }
  }
  timeline::stop();
  for (const auto& e : timeline::events()) {
    if (e.category != "compute" || e.track != 1) continue;
    auto at = e.name.find('@');
    modes[e.name.substr(at + 1)].compute_us[e.name.substr(0, at)] += e.dur_us;
  }

  json report;
  report["config"] = json::parse(w.config.to_json());
  report["config"]["iterations"] = iters;
  report["config"]["warmup"] = warmup;
  report["config"]["stages"] = json::array();
  for (const auto& s : w.stages) report["config"]["stages"].push_back(s.tag);
  report["config"]["max_abs_diff_pipeline_vs_roundtrip"] = max_mode_diff;

  for (auto& [mode, mr] : modes) {
    double n = static_cast<double>(iters);
    json m;
    m["latency_ms"] = latency_json(mr.samples_ms);
    m["throughput_per_s"] = 1000.0 * static_cast<double>(w.config.runtime_config().batch_size) / summarize(mr.samples_ms).p50;
    json stage_ms;
    double compute_total_us = 0;
    for (const auto& [tag, us] : mr.compute_us) {
      stage_ms[tag] = us / n / 1000.0;
      compute_total_us += us / n;
    }
    m["stage_ms"] = stage_ms;
    m["bytes_host_device"] =
        (mr.bytes.host_to_device_bytes + mr.bytes.device_to_host_bytes) / static_cast<std::uint64_t>(iters);
    m["bytes_between_stages"] = mr.between / static_cast<std::uint64_t>(iters);
    if (w.boundary_overhead) {
      double boundaries = static_cast<double>(w.stages.size() - 1);
      m["boundary_overhead_us"] = (summarize(mr.samples_ms).p50 * 1000.0 - compute_total_us) / boundaries;
      m["compute_us_per_forward"] = compute_total_us;
    }
    report["modes"][mode] = m;
    plot.emplace_back(name + " " + mode, mr.samples_ms);
  }
  modes.clear();  // free the artifacts' memory before the peers run

  if (!a.has("no-pytorch")) {
    std::cerr << "  running PyTorch on the same weights...\n";
    json pt = run_pytorch(w, wdir, iters, warmup);
    if (pt.contains("samples_ms")) {
      auto samples = pt["samples_ms"].get<std::vector<double>>();
      json m{{"latency_ms", latency_json(samples)},
             {"throughput_per_s", 1000.0 * static_cast<double>(w.config.runtime_config().batch_size) / summarize(samples).p50},
             {"threads", pt.value("threads", 0)},
             {"torch_version", pt.value("torch_version", std::string("?"))}};
      report["modes"][pt.value("mode", std::string("pytorch_eager"))] = m;
      plot.emplace_back(name + " pytorch", samples);
    } else {
      report["modes"]["pytorch_eager"] = {{"error", pt.value("error", std::string("unknown"))}};
    }
  }
  if (name != "seed_tp2") {
    std::string bare_name = name == "seed_tp1" ? "seed" : name;
    auto bare = bench::run_kernels_bare(bare_name, iters, warmup, static_cast<int>(std::thread::hardware_concurrency()));
    report["modes"]["kernels_bare"] = {{"latency_ms", latency_json(bare.samples_ms)}, {"what", bare.what}};
    plot.emplace_back(name + " kernels_bare", bare.samples_ms);
  }
  return report;
}

double p50_of(const json& r, const std::string& wl, const std::string& mode) {
  try {
    return r.at("workloads").at(wl).at("modes").at(mode).at("latency_ms").at("p50").get<double>();
  } catch (const json::exception&) {
    return std::nan("");
  }
}

void print_targets(const json& r) {
  std::printf("\n%-44s %10s %10s  %s\n", "target (issue 4)", "measured", "limit", "holds");
  auto row = [](const char* what, double v, double lim, bool ok) {
    std::printf("%-44s %10.3f %10.3f  %s\n", what, v, lim, std::isnan(v) ? "n/a" : (ok ? "yes" : "NO"));
  };
  double pipe = p50_of(r, "seed_tp1", "pipeline"), bare = p50_of(r, "seed_tp1", "kernels_bare");
  double torch = p50_of(r, "seed_tp1", "pytorch_eager");
  row("seed tp1: pipeline p50 / kernels_bare p50", pipe / bare, 1.10, pipe / bare <= 1.10);
  row("seed tp1: pytorch_eager p50 / pipeline p50", torch / pipe, 2.5, torch / pipe >= 2.5);
  double lp = p50_of(r, "large", "pipeline"), lr = p50_of(r, "large", "roundtrip");
  row("large: roundtrip p50 / pipeline p50", lr / lp, 1.3, lr / lp >= 1.3);
  double bo = std::nan("");
  try {
    bo = r.at("workloads").at("chain8").at("modes").at("pipeline").at("boundary_overhead_us").get<double>();
  } catch (const json::exception&) {
  }
  row("chain8 tp2: pipeline boundary_overhead_us", bo, 20.0, bo <= 20.0);
}

}  // namespace

const Command& bench_command() {
  static const Command c{
      .name = "bench",
      .summary = "run the benchmark workloads and write a JSON report and a latency plot",
      .options =
          {{.name = "all", .help = "all workloads (the default without --workload)"},
           {.name = "workload", .kind = OptionKind::ChoiceList, .value = "W,...",
            .help = "workloads to run ('seed' is seed_tp1 and seed_tp2)",
            .choices = {"seed", "seed_tp1", "seed_tp2", "large", "chain8"}},
           {.name = "modes", .kind = OptionKind::ChoiceList, .value = "M,...",
            .help = "devpipe modes to time (default both)", .choices = {"pipeline", "roundtrip"}},
           {.name = "iters", .kind = OptionKind::Int, .value = "N",
            .help = "timed iterations per mode (default 20; chain8 200)", .min = 1, .max = 1000000},
           {.name = "warmup", .kind = OptionKind::Int, .value = "N",
            .help = "untimed iterations before (default 3; chain8 20)", .min = 0, .max = 1000000},
           {.name = "out", .kind = OptionKind::String, .value = "FILE",
            .help = "the JSON report (default build/bench/report.json)"},
           {.name = "plot", .kind = OptionKind::String, .value = "FILE",
            .help = "the latency plot, SVG (default latency.svg beside --out)"},
           {.name = "trace", .kind = OptionKind::String, .value = "FILE",
            .help = "also write one forward of the first workload as a Chrome trace"},
           {.name = "work", .kind = OptionKind::String, .value = "DIR",
            .help = "weights and artifacts (default work/ beside --out)"},
           {.name = "no-pytorch", .help = "skip the PyTorch baseline"}},
      .notes = "See bench/README.md for the workloads, the modes and the report's fields.\n"};
  return c;
}

int bench_main(const Args& a) {
  if (a.has("all") && a.has("workload")) {
    throw UsageError("options --all and --workload exclude each other");
  }
  std::vector<std::string> names;
  for (const std::string& item : a.get_list("workload", "seed,large,chain8")) {
    for (const std::string& n : item == "seed" ? std::vector<std::string>{"seed_tp1", "seed_tp2"}
                                               : std::vector<std::string>{item}) {
      if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
    }
  }
  std::string out = a.get("out", "build/bench/report.json");
  std::string work = a.get("work", (fs::path(out).parent_path() / "work").string());
  fs::create_directories(fs::path(out).parent_path().empty() ? fs::path(".") : fs::path(out).parent_path());
  json report;
  report["machine"] = machine_json();
  std::vector<std::pair<std::string, std::vector<double>>> plot;
  for (const auto& n : names) {
    std::cerr << "workload " << n << "\n";
    report["workloads"][n] = run_workload(n, a, work, plot);
  }
  std::ofstream f(out);
  f << report.dump(2) << "\n";
  if (!f) throw IoError("cannot write report '" + out + "'");
  std::cout << "wrote " << out << "\n";

  std::printf("\n%-10s %-14s %10s %10s %10s\n", "workload", "mode", "p50 ms", "p90 ms", "mean ms");
  for (const auto& [wl, wj] : report["workloads"].items()) {
    for (const auto& [mode, mj] : wj["modes"].items()) {
      if (!mj.contains("latency_ms")) continue;
      std::printf("%-10s %-14s %10.3f %10.3f %10.3f\n", wl.c_str(), mode.c_str(), mj["latency_ms"]["p50"].get<double>(),
                  mj["latency_ms"]["p90"].get<double>(), mj["latency_ms"]["mean"].get<double>());
    }
  }
  print_targets(report);

  std::string plot_path = a.get("plot", (fs::path(out).parent_path() / "latency.svg").string());
  std::ofstream(plot_path) << bench::latency_svg("devpipe bench: latency per workload and mode (ms)", plot);
  std::cout << "wrote " << plot_path << "\n";

  if (a.has("trace")) {
    // One traced forward of the first workload in pipeline mode, kernels included.
    Workload w = make_workload(names.front());
    auto ws = build_stages(w, /*pipeline=*/true, work, "trace", "");
    run_chain(ws, w);
    write_trace_of([&] { run_chain(ws, w); }, a.get("trace", ""));
  }
  return 0;
}

}  // namespace devpipe::cli
