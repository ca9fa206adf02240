// devpipe_mpi_bench — the process mode of the benchmark (issue 11): tensor parallel at tp 2 as
// two threads of one process against two MPI processes, and devpipe's MPI collectives against
// the MPI library's own on the same sizes. Run under the launcher:
//
//   mpirun -np 2 build/tools/devpipe_mpi_bench --out report.json
//
// Part 1, the workloads: large, chain8 (bench/workloads.h) and mlp (column/row-parallel blocks,
// real all-reduces) at tp 2, with the same weights and inputs, in alternating rounds: N forwards
// in thread mode (a persistent child process, DEVPIPE_WORLD=threads, on the bench's line-JSON
// worker protocol), then N forwards as the 2 MPI processes (both run them, process 0 times).
// The outputs must be equal bit for bit (exit 1 otherwise). Part 2, the collectives: for the
// sizes the workloads use plus a sweep, MPI_Allreduce / MPI_Allgather (the floor) and devpipe's
// MPI communicator, in alternating rounds, each call timed. See bench/README.md.
#include <mpi.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "cli_common.h"
#include "devpipe/devpipe.h"
#include "devpipe/timeline.h"
#include "devpipe/world.h"
#include "peers.h"
#include "run_info.h"
#include "runtime/communicator.h"
#include "runtime/mpi.h"
#include "workloads.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace devpipe::bench {
namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double process_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) / 1e6;
}

// ---- options ---------------------------------------------------------------------------------

struct Options {
  std::string out = "build/bench/mpi_report.json";
  std::string work;  // default: mpi_work/ beside --out
  std::vector<std::string> workloads = {"large", "chain8", "mlp"};
  std::vector<std::size_t> sizes = {256, 4096, 65536, 1 << 20, 16 << 20};  // bytes, float32
  int iters = 0;   // 0: per workload (large 20, chain8 200, mlp 50)
  int rounds = 5;
  int calls = 0;   // per size and mode; 0: by size (2000 at 256 B down to 40 at 16 MiB)
  bool threads_worker = false;
  bool perturb = false;  // --perturb-threads-output: the check must then fail (its test)
};

[[noreturn]] void usage(const std::string& why) {
  throw cli::UsageError(why +
                   "\nusage: mpirun -np 2 devpipe_mpi_bench [--out FILE] [--work DIR] "
                   "[--workloads large,chain8,mlp] [--sizes BYTES,...] [--iters N] [--rounds N] "
                   "[--calls N]\n  (--perturb-threads-output: changes one value of thread mode's outputs by one ulp, for the test that "
                   "the check fails)");
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> v;
  std::size_t p = 0;
  while (p <= s.size()) {
    const auto c = s.find(',', p);
    const std::string item = s.substr(p, c == std::string::npos ? std::string::npos : c - p);
    if (!item.empty()) v.push_back(item);
    if (c == std::string::npos) break;
    p = c + 1;
  }
  return v;
}

long to_long(const std::string& flag, const std::string& v, long lo, long hi) {
  char* end = nullptr;
  const long n = std::strtol(v.c_str(), &end, 10);
  if (v.empty() || !end || *end != '\0' || n < lo || n > hi) {
    usage("option " + flag + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
          "], got '" + v + "'");
  }
  return n;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("option " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--out") {
      o.out = value();
    } else if (a == "--work") {
      o.work = value();
    } else if (a == "--workloads") {
      o.workloads = split(value());
      if (o.workloads == std::vector<std::string>{"none"}) o.workloads.clear();  // collectives only
      for (const auto& w : o.workloads) {
        if (w != "large" && w != "chain8" && w != "mlp") usage("--workloads: unknown workload '" + w + "'");
      }
    } else if (a == "--sizes") {
      o.sizes.clear();
      for (const auto& s : split(value())) {
        const long b = to_long("--sizes", s, 8, 1L << 30);
        if (b % 8 != 0) usage("--sizes: " + s + " bytes is not a multiple of 8 (2 ranks x float32)");
        o.sizes.push_back(static_cast<std::size_t>(b));
      }
    } else if (a == "--iters") {
      o.iters = static_cast<int>(to_long(a, value(), 1, 1000000));
    } else if (a == "--rounds") {
      o.rounds = static_cast<int>(to_long(a, value(), 1, 100000));
    } else if (a == "--calls") {
      o.calls = static_cast<int>(to_long(a, value(), 1, 10000000));
    } else if (a == "--threads-worker") {
      o.threads_worker = true;
    } else if (a == "--perturb-threads-output") {
      o.perturb = true;
    } else {
      usage("unknown option '" + a + "'");
    }
  }
  if (o.work.empty()) {
    const fs::path dir = fs::path(o.out).parent_path().empty() ? fs::path(".") : fs::path(o.out).parent_path();
    o.work = (dir / "mpi_work").string();
  }
  return o;
}

// ---- the workloads ---------------------------------------------------------------------------

/// `mlp` stage: 4 blocks of column-parallel Linear(512, 2048) -> GELU -> row-parallel
/// Linear(2048, 512) (an all-reduce of the [32, 512] activations) -> RMSNorm, then a
/// column-parallel Linear(512, 512) gathering its output (an all-gather): the tensor-parallel
/// pattern of a transformer's MLP.
struct MlpBlock : nn::Module {
  nn::ColumnParallelLinear& up;
  nn::RowParallelLinear& down;
  nn::RMSNorm& norm;
  MlpBlock()
      : up(register_module("up", std::make_unique<nn::ColumnParallelLinear>(512, 2048, true, false))),
        down(register_module("down", std::make_unique<nn::RowParallelLinear>(2048, 512, true, true))),
        norm(register_module("norm", std::make_unique<nn::RMSNorm>(std::vector<std::int64_t>{512}))) {}
  Var forward(Var x) const { return norm(down(F::gelu(up(x)))); }
};

struct ParallelMlp : nn::Module {
  static constexpr int kBlocks = 4;
  nn::ModuleList<MlpBlock>& blocks;
  nn::ColumnParallelLinear& head;
  std::vector<const MlpBlock*> list;
  ParallelMlp()
      : blocks(register_module("blocks", std::make_unique<nn::ModuleList<MlpBlock>>())),
        head(register_module("head", std::make_unique<nn::ColumnParallelLinear>(512, 512, true, true))) {
    for (int i = 0; i < kBlocks; ++i) list.push_back(&blocks.push_back(std::make_unique<MlpBlock>()));
  }
  Var forward(Var x) const {
    for (const MlpBlock* b : list) x = b->forward(x);
    return head(x);
  }
};

struct Stage {
  std::string tag;
  std::function<std::unique_ptr<nn::Module>(const InferenceConfig&)> model;
  std::function<std::unique_ptr<ModelWrapper>(const InferenceConfig&, WrapperOptions)> wrapper;
};

struct Workload {
  std::string name;
  InferenceConfig config;
  std::vector<Stage> stages;
  std::vector<std::vector<Tensor>> extra;  // host inputs per stage (stage i > 0 also gets i-1's output)
  int default_iters;
};

template <class M>
Stage stage(const std::string& tag, std::vector<Tensor> example) {
  return Stage{tag, [](const InferenceConfig& c) { return model_cls<M>().create(c); },
               [example](const InferenceConfig& c, WrapperOptions o) -> std::unique_ptr<ModelWrapper> {
                 return std::make_unique<BenchWrapper<M>>(c, std::move(o), example);
               }};
}

/// The workloads at tp 2; the same seeds as `devpipe bench` for large and chain8.
Workload make_workload(const std::string& name) {
  if (name == "large") {
    Workload w{name, InferenceConfig(RuntimeConfig{.batch_size = 32, .tp_degree = 2}), {}, {}, 20};
    Tensor x = Tensor::randn({32, 1440, 8}, 44);
    w.stages.push_back(stage<Expand>("expand", {x}));
    w.stages.push_back(stage<Reduce>("reduce", {Tensor::zeros({32, 1440, 1280})}));
    w.extra = {{x}, {}};
    return w;
  }
  if (name == "chain8") {
    Workload w{name, InferenceConfig(RuntimeConfig{.batch_size = 1, .tp_degree = 2}), {}, {}, 200};
    Tensor x = Tensor::randn({1, 64}, 45);
    for (int i = 0; i < 8; ++i) {
      w.stages.push_back(stage<ChainStage>("stage" + std::to_string(i), {x}));
      w.extra.push_back(i == 0 ? std::vector<Tensor>{x} : std::vector<Tensor>{});
    }
    return w;
  }
  if (name == "mlp") {
    Workload w{name, InferenceConfig(RuntimeConfig{.batch_size = 32, .tp_degree = 2}), {}, {}, 50};
    Tensor x = Tensor::randn({32, 512}, 46);
    w.stages.push_back(stage<ParallelMlp>("mlp", {x}));
    w.extra = {{x}};
    return w;
  }
  throw InvalidArgument("unknown workload '" + name + "' (large, chain8, mlp)");
}

std::string weights_path(const std::string& work, const Workload& w, std::size_t i) {
  return (fs::path(work) / "weights" / w.name / (w.stages[i].tag + ".safetensors")).string();
}

/// Writes every stage's random weights (process 0, or the caller in thread mode).
void write_weights(const std::string& work, const Workload& w) {
  fs::create_directories(fs::path(work) / "weights" / w.name);
  for (std::size_t i = 0; i < w.stages.size(); ++i) {
    auto m = w.stages[i].model(w.config);
    const std::string path = weights_path(work, w, i);
    safetensors::save(path + ".tmp", nn::random_state_dict(*m, 100 + i));
    fs::rename(path + ".tmp", path);
  }
}

/// A workload's compiled stages in this process (pipeline mode: ranked hand-offs, the last stage
/// returns to the host), artifacts under work/artifacts/<label>/<workload>/<stage>.
class Chain {
 public:
  Chain(const std::string& name, const std::string& work, const std::string& label) : w_(make_workload(name)) {
    for (std::size_t i = 0; i < w_.stages.size(); ++i) {
      const bool last = i + 1 == w_.stages.size();
      auto wr = w_.stages[i].wrapper(w_.config, {.pipeline_execution = true, .return_ranked_to_cpu = last,
                                                 .tag = w_.stages[i].tag});
      const std::string art = (fs::path(work) / "artifacts" / label / w_.name / w_.stages[i].tag).string();
      wr->compile(weights_path(work, w_, i), art);
      wr->load(art);
      stages_.push_back(std::move(wr));
    }
  }
  const Workload& workload() const { return w_; }
  Tensor run() {
    Output prev;
    for (std::size_t i = 0; i < stages_.size(); ++i) {
      std::vector<Input> args;
      if (i > 0) args.push_back(prev);
      for (const Tensor& t : w_.extra[i]) args.emplace_back(t);
      prev = stages_[i]->forward(args);
    }
    return prev.tensor();
  }
  /// `iters` forwards, each timed.
  std::vector<double> run_timed(int iters) {
    std::vector<double> ms;
    for (int i = 0; i < iters; ++i) {
      const auto t0 = Clock::now();
      last_ = run();
      ms.push_back(ms_since(t0));
    }
    return ms;
  }
  std::vector<float> output() const { return last_.to_float_vector(); }
  /// The collectives of rank `rank` (its timeline track) over `iters` recorded forwards: per
  /// collective, calls per forward and mean microseconds per call; in MPI mode the bytes too.
  json collectives(int iters, int rank) {
    timeline::start(false);
    mpi::clear_recorded_collectives();
    for (int i = 0; i < iters; ++i) run();
    timeline::stop();
    std::map<std::string, std::pair<std::uint64_t, double>> spans;
    for (const auto& e : timeline::events()) {
      if (e.category != "collective" || e.track != rank + 1) continue;
      spans[e.name].first += 1;
      spans[e.name].second += e.dur_us;
    }
    json j = json::object();
    for (const auto& [op, v] : spans) {
      j[op] = {{"calls_per_forward", static_cast<double>(v.first) / iters},
               {"us_per_call", v.second / static_cast<double>(v.first)}};
    }
    for (const auto& c : mpi::recorded_collectives()) {
      j[c.op]["bytes"].push_back({{"bytes", c.bytes}, {"calls_per_forward", static_cast<double>(c.calls) / iters}});
    }
    return j;
  }

 private:
  Workload w_;
  std::vector<std::unique_ptr<ModelWrapper>> stages_;
  Tensor last_;
};

// ---- the thread-mode worker (a child process of process 0) ------------------------------------

/// Serves the worker protocol of bench/README.md on stdin/stdout for the chains of `names`,
/// built in this process as threads (DEVPIPE_WORLD=threads).
int threads_worker(const Options& o) {
  std::map<std::string, std::unique_ptr<Chain>> chains;
  try {
    if (World::get().transport() != Transport::Threads) {
      throw StateError("--threads-worker runs in thread mode: start it with DEVPIPE_WORLD=threads");
    }
    for (const auto& n : o.workloads) chains[n] = std::make_unique<Chain>(n, o.work, "threads");
  } catch (const std::exception& e) {
    std::cout << json{{"error", e.what()}}.dump() << std::endl;
    return 1;
  }
  std::cout << json{{"ready", true}, {"peer", "devpipe_threads"}, {"version", devpipe::version()},
                    {"threads", std::thread::hardware_concurrency()}}
                   .dump()
            << std::endl;
  for (std::string line; std::getline(std::cin, line);) {
    json reply;
    try {
      const json req = json::parse(line);
      const std::string cmd = req.at("cmd").get<std::string>();
      if (cmd == "quit") break;
      auto chain = [&]() -> Chain& {
        const std::string n = req.at("workload").get<std::string>();
        auto it = chains.find(n);
        if (it == chains.end()) throw InvalidArgument("workload '" + n + "' was not built in this worker");
        return *it->second;
      };
      if (cmd == "run") {
        Chain& c = chain();
        const double c0 = process_cpu_ms();
        reply["samples_ms"] = c.run_timed(req.at("iters").get<int>());
        reply["cpu_ms"] = process_cpu_ms() - c0;
        double sum = 0;
        for (float v : c.output()) sum += v;
        reply["checksum"] = sum;
      } else if (cmd == "output") {
        std::vector<float> v = chain().output();
        if (o.perturb && !v.empty()) v[v.size() / 2] = std::nextafter(v[v.size() / 2], INFINITY);
        const std::string path = req.at("path").get<std::string>();
        safetensors::save(path + ".tmp", {{"output", Tensor::from_vector(v, Shape{static_cast<std::int64_t>(v.size())})}});
        fs::rename(path + ".tmp", path);
        reply["ok"] = true;
      } else if (cmd == "collectives") {
        reply["collectives"] = chain().collectives(req.at("iters").get<int>(), 0);
      } else {
        throw InvalidArgument("unknown command '" + cmd + "'");
      }
    } catch (const std::exception& e) {
      reply = {{"error", e.what()}};
    }
    std::cout << reply.dump() << std::endl;
  }
  return 0;
}

// ---- the two MPI processes -------------------------------------------------------------------

/// The bench's own control communicator (not devpipe's).
MPI_Comm g_control = MPI_COMM_NULL;

/// Both processes meet here, polling with sleeps: a process waiting while the other runs the
/// thread-mode round must not take a core from it (a blocking MPI_Barrier spins).
void meet(const char* where) {
  MPI_Request req = MPI_REQUEST_NULL;
  MPI_Ibarrier(g_control, &req);
  const auto t0 = Clock::now();
  for (;;) {
    int done = 0;
    MPI_Test(&req, &done, MPI_STATUS_IGNORE);
    if (done) return;
    if (ms_since(t0) > 1800e3) {
      std::fprintf(stderr, "devpipe_mpi_bench: the other process did not reach '%s' within 30 minutes\n", where);
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

json latency_json(const std::vector<double>& samples) {
  cli::LatencyStats s = cli::summarize(samples);
  return {{"min", s.min}, {"p50", s.p50}, {"p90", s.p90}, {"p99", s.p99}, {"max", s.max}, {"mean", s.mean},
          {"samples", samples.size()}};
}

struct Compare {
  bool bit_equal = false;
  double max_abs_diff = 0;
  std::string message;
};

Compare compare(const std::vector<float>& want, const std::vector<float>& got) {
  Compare c;
  if (want.size() != got.size()) {
    c.message = std::to_string(got.size()) + " values, expected " + std::to_string(want.size());
    c.max_abs_diff = INFINITY;
    return c;
  }
  c.bit_equal = std::memcmp(want.data(), got.data(), want.size() * sizeof(float)) == 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    c.max_abs_diff = std::max(c.max_abs_diff, static_cast<double>(std::fabs(want[i] - got[i])));
  }
  if (!c.bit_equal) {
    c.message = "max |processes - threads| = " + std::to_string(c.max_abs_diff) + " over " +
                std::to_string(want.size()) + " values";
  }
  return c;
}

/// Part 1: one workload, threads (the child) against processes, in alternating rounds.
json run_workload(const std::string& name, const Options& o, ChildWorker* child, int me,
                  std::vector<std::string>& failures) {
  Chain chain(name, o.work, "processes");
  const int iters = o.iters > 0 ? o.iters : chain.workload().default_iters;
  const int rounds = std::min(iters, o.rounds);
  const int warmup = std::max(1, iters / 10);
  std::vector<double> threads_ms, procs_ms;
  double threads_cpu = 0, procs_cpu = 0;  // the child's; this process's
  auto child_run = [&](int n) {
    json r = child->request({{"cmd", "run"}, {"workload", name}, {"iters", n}});
    threads_cpu += r.at("cpu_ms").get<double>();
    return r.at("samples_ms").get<std::vector<double>>();
  };
  // Warm-up of both, then the rounds; the order alternates from round to round.
  if (me == 0) child_run(warmup);
  meet("warm-up");
  chain.run_timed(warmup);
  meet("warm-up done");
  threads_cpu = 0;
  for (int r = 0; r < rounds; ++r) {
    const int n = iters / rounds + (r < iters % rounds ? 1 : 0);
    for (int k = 0; k < 2; ++k) {
      const bool threads_turn = (k + r) % 2 == 0;
      if (threads_turn) {
        if (me == 0) {
          auto s = child_run(n);
          threads_ms.insert(threads_ms.end(), s.begin(), s.end());
        }
      } else {
        const double c0 = process_cpu_ms();
        auto s = chain.run_timed(n);
        procs_cpu += process_cpu_ms() - c0;
        procs_ms.insert(procs_ms.end(), s.begin(), s.end());
      }
      meet("round");
    }
  }
  // The outputs: process 1's comes to process 0, the child's through a file.
  std::vector<float> mine = chain.output();
  std::uint64_t n1 = mine.size();
  double procs_cpu_both = 0;
  MPI_Reduce(&procs_cpu, &procs_cpu_both, 1, MPI_DOUBLE, MPI_SUM, 0, g_control);
  json collectives_procs = chain.collectives(std::min(iters, 5), me);
  if (me == 1) {
    MPI_Send(&n1, 1, MPI_UINT64_T, 0, 1, g_control);
    MPI_Send(mine.data(), static_cast<int>(mine.size()), MPI_FLOAT, 0, 2, g_control);
    meet("outputs");
    return nullptr;
  }
  MPI_Recv(&n1, 1, MPI_UINT64_T, 1, 1, g_control, MPI_STATUS_IGNORE);
  std::vector<float> other(n1);
  MPI_Recv(other.data(), static_cast<int>(n1), MPI_FLOAT, 1, 2, g_control, MPI_STATUS_IGNORE);
  const std::string path = (fs::path(o.work) / (name + ".threads.safetensors")).string();
  child->request({{"cmd", "output"}, {"workload", name}, {"path", path}});
  const std::vector<float> want = safetensors::load_all(path).at("output").to_float_vector();
  json collectives_threads = child->request({{"cmd", "collectives"}, {"workload", name}, {"iters", std::min(iters, 5)}})
                                 .at("collectives");
  meet("outputs");

  const Compare c0 = compare(want, mine), c1 = compare(want, other);
  if (!c0.bit_equal) failures.push_back(name + ": process 0's output differs from thread mode's: " + c0.message);
  if (!c1.bit_equal) failures.push_back(name + ": process 1's output differs from thread mode's: " + c1.message);
  json j;
  const auto& rc = chain.workload().config.runtime_config();
  j["config"] = {{"batch_size", rc.batch_size}, {"tp_degree", rc.tp_degree}, {"stages", chain.workload().stages.size()},
                 {"iterations", iters}, {"rounds", rounds}, {"warmup", warmup}};
  j["threads"] = {{"latency_ms", latency_json(threads_ms)},
                  {"cpu_ms_per_forward", threads_cpu / static_cast<double>(threads_ms.size())},
                  {"collectives", collectives_threads}};
  j["processes"] = {{"latency_ms", latency_json(procs_ms)},
                    {"cpu_ms_per_forward", procs_cpu_both / static_cast<double>(procs_ms.size())},
                    {"collectives", collectives_procs}};
  j["ratio_p50_processes_over_threads"] = cli::summarize(procs_ms).p50 / cli::summarize(threads_ms).p50;
  j["output_check"] = {{"values", want.size()},
                       {"process0_bit_equal", c0.bit_equal},
                       {"process1_bit_equal", c1.bit_equal},
                       {"max_abs_diff", std::max(c0.max_abs_diff, c1.max_abs_diff)},
                       {"ok", c0.bit_equal && c1.bit_equal}};
  return j;
}

/// Calls per size and mode by default: enough for stable percentiles, about the same time each.
int default_calls(std::size_t bytes) {
  if (bytes <= 4096) return 2000;
  if (bytes <= 65536) return 1000;
  return bytes <= (1 << 20) ? 200 : 100;
}

/// Part 2: one collective at one size, devpipe's communicator against the MPI library's.
json run_collective(const std::string& op, std::size_t bytes, const std::string& source, const Options& o,
                    Communicator& comm, int me) {
  const std::size_t n = bytes / sizeof(float);
  const int calls = o.calls > 0 ? o.calls : default_calls(bytes);
  const int rounds = std::min(calls, std::max(2, o.rounds * 2));
  std::vector<float> a(n), b(n), in(n / 2), out(n);
  // First the results: both give the same sum / concatenation of rank-distinct values.
  bool equal = true;
  if (op == "all_reduce") {
    for (std::size_t i = 0; i < n; ++i) a[i] = b[i] = 0.001f * static_cast<float>(i % 1000) + 0.37f * (me + 1);
    MPI_Allreduce(MPI_IN_PLACE, a.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, g_control);
    comm.all_reduce_sum(me, b.data(), n, DType::Float32);
    equal = std::memcmp(a.data(), b.data(), bytes) == 0;
    // The timed calls sum zeros: the values stay finite whatever the count.
    std::fill(a.begin(), a.end(), 0.f);
    std::fill(b.begin(), b.end(), 0.f);
  } else {
    for (std::size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i) + 0.5f * me;
    MPI_Allgather(in.data(), static_cast<int>(bytes / 2), MPI_BYTE, a.data(), static_cast<int>(bytes / 2), MPI_BYTE,
                  g_control);
    comm.all_gather(me, in.data(), b.data(), 1, bytes / 2);
    equal = std::memcmp(a.data(), b.data(), bytes) == 0;
  }
  auto floor_call = [&] {
    if (op == "all_reduce") {
      MPI_Allreduce(MPI_IN_PLACE, a.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, g_control);
    } else {
      MPI_Allgather(in.data(), static_cast<int>(bytes / 2), MPI_BYTE, out.data(), static_cast<int>(bytes / 2),
                    MPI_BYTE, g_control);
    }
  };
  auto devpipe_call = [&] {
    if (op == "all_reduce") {
      comm.all_reduce_sum(me, b.data(), n, DType::Float32);
    } else {
      comm.all_gather(me, in.data(), out.data(), 1, bytes / 2);
    }
  };
  std::vector<double> floor_us, devpipe_us;
  auto timed = [&](const std::function<void()>& f, int k, std::vector<double>* into) {
    MPI_Barrier(g_control);
    for (int i = 0; i < k; ++i) {
      const auto t0 = Clock::now();
      f();
      if (into) into->push_back(ms_since(t0) * 1000.0);
    }
  };
  const int warm = std::max(2, calls / 20);
  timed(floor_call, warm, nullptr);
  timed(devpipe_call, warm, nullptr);
  for (int r = 0; r < rounds; ++r) {
    const int k = calls / rounds + (r < calls % rounds ? 1 : 0);
    if (r % 2 == 0) {
      timed(floor_call, k, &floor_us);
      timed(devpipe_call, k, &devpipe_us);
    } else {
      timed(devpipe_call, k, &devpipe_us);
      timed(floor_call, k, &floor_us);
    }
  }
  const auto f = cli::summarize(floor_us), d = cli::summarize(devpipe_us);
  const double ratio = d.p50 / f.p50;
  return {{"op", op},
          {"bytes", bytes},
          {"floats", n},
          {"source", source},
          {"calls", calls},
          {"rounds", rounds},
          {"floor", {{"call", op == "all_reduce" ? "MPI_Allreduce(MPI_IN_PLACE, MPI_FLOAT, MPI_SUM)" : "MPI_Allgather"},
                     {"p50_us", f.p50}, {"p90_us", f.p90}, {"min_us", f.min}, {"mean_us", f.mean}}},
          {"devpipe", {{"p50_us", d.p50}, {"p90_us", d.p90}, {"min_us", d.min}, {"mean_us", d.mean}}},
          {"ratio_p50", ratio},
          {"ratio_p90", d.p90 / f.p90},
          {"ratio_min", d.min / f.min},
          {"within_1_2x", ratio <= 1.2},
          {"results_equal", equal}};
}

json machine_json() {
  char version[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(version, &len);
  std::string lib(version, static_cast<std::size_t>(len));
  if (const auto nl = lib.find_first_of("\n,"); nl != std::string::npos) lib = lib.substr(0, nl);
  json m = bench::host_json();
  m["mpi_library"] = lib;
  return m;
}

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, std::fabs(v) < 10 ? "%.3f" : (std::fabs(v) < 1000 ? "%.1f" : "%.0f"), v);
  return buf;
}

std::string fmt_bytes(std::size_t b) {
  if (b >= (1u << 20) && b % (1u << 20) == 0) return std::to_string(b >> 20) + " MiB";
  if (b >= 1024 && b % 1024 == 0) return std::to_string(b >> 10) + " KiB";
  return std::to_string(b) + " B";
}

void print_report(const json& r) {
  std::printf("\nmachine: %s, %d cores; load average %s at start, %s at end; %s\n",
              r["machine"]["cpu"].get<std::string>().c_str(), r["machine"]["cores"].get<int>(),
              r["run"]["load_average_start"].dump().c_str(), r["run"]["load_average_end"].dump().c_str(),
              r["machine"]["mpi_library"].get<std::string>().c_str());
  std::printf("\n%-8s %-9s %12s %12s %12s %12s %14s  %s\n", "workload", "tp 2 as", "p50 ms", "p90 ms", "cpu ms/fwd",
              "procs/thr", "collectives", "output");
  for (const auto& [name, w] : r["workloads"].items()) {
    for (const char* mode : {"threads", "processes"}) {
      const json& m = w[mode];
      std::string coll;
      for (const auto& [op, c] : m["collectives"].items()) {
        coll += (coll.empty() ? "" : " ") + fmt(c["calls_per_forward"].get<double>()) + "x" + op;
      }
      const bool procs = std::string(mode) == "processes";
      std::printf("%-8s %-9s %12.3f %12.3f %12s %12s %14s  %s\n", name.c_str(), mode,
                  m["latency_ms"]["p50"].get<double>(), m["latency_ms"]["p90"].get<double>(),
                  m.contains("cpu_ms_per_forward") ? fmt(m["cpu_ms_per_forward"].get<double>()).c_str() : "-",
                  procs ? fmt(w["ratio_p50_processes_over_threads"].get<double>()).c_str() : "",
                  coll.empty() ? "none" : coll.c_str(),
                  procs ? (w["output_check"]["ok"].get<bool>() ? "bit-equal" : "DIFFERENT") : "");
    }
  }
  std::printf("\n%-10s %9s %-10s %12s %12s %12s %12s %9s %9s  %s\n", "collective", "bytes", "source", "floor p50 us",
              "devpipe p50", "floor p90", "devpipe p90", "ratio p50", "ratio min", "p50 <= 1.2x");
  for (const auto& c : r["collectives"]) {
    std::printf("%-10s %9s %-10s %12s %12s %12s %12s %9.3f %9.3f  %s%s\n", c["op"].get<std::string>().c_str(),
                fmt_bytes(c["bytes"].get<std::size_t>()).c_str(), c["source"].get<std::string>().c_str(),
                fmt(c["floor"]["p50_us"].get<double>()).c_str(), fmt(c["devpipe"]["p50_us"].get<double>()).c_str(),
                fmt(c["floor"]["p90_us"].get<double>()).c_str(), fmt(c["devpipe"]["p90_us"].get<double>()).c_str(),
                c["ratio_p50"].get<double>(), c["ratio_min"].get<double>(), c["within_1_2x"].get<bool>() ? "yes" : "NO",
                c["results_equal"].get<bool>() ? "" : "  (RESULTS DIFFER)");
  }
}

int run(const Options& o) {
  const World& world = World::get();
  if (world.transport() != Transport::Mpi || world.num_processes() != 2) {
    throw cli::UsageError("devpipe_mpi_bench runs as 2 MPI processes: mpirun -np 2 devpipe_mpi_bench ... (this is " +
                     world.describe() + ")");
  }
  const int me = world.process();
  MPI_Comm_dup(MPI_COMM_WORLD, &g_control);
  json report;
  if (me == 0) {
    fs::create_directories(o.work);
    const std::string src = (fs::path(DEVPIPE_SOURCE_DIR)).string();
    report["machine"] = machine_json();
    report["run"] = bench::run_json(src);
    report["run"]["world"] =
        "2 MPI processes on " + std::to_string(world.local_processes()) + " local";
    for (const auto& n : o.workloads) write_weights(o.work, make_workload(n));
  }
  meet("weights");

  // Part 1: the workloads. The thread-mode child is started once (it builds every workload).
  std::vector<std::string> failures;
  std::unique_ptr<ChildWorker> child;
  if (me == 0 && !o.workloads.empty()) {
    std::string self = fs::read_symlink("/proc/self/exe").string();
    std::string list;
    for (const auto& n : o.workloads) list += (list.empty() ? "" : ",") + n;
    std::cerr << "starting the thread-mode worker (builds " << list << ")...\n";
    child = std::make_unique<ChildWorker>(
        "threads",
        o.perturb ? std::vector<std::string>{"env", "DEVPIPE_WORLD=threads", self, "--threads-worker", "--workloads",
                                             list, "--work", o.work, "--perturb-threads-output"}
                  : std::vector<std::string>{"env", "DEVPIPE_WORLD=threads", self, "--threads-worker", "--workloads",
                                             list, "--work", o.work},
        (fs::path(o.work) / "threads_worker.log").string());
  }
  meet("child");
  report["workloads"] = json::object();
  std::set<std::pair<std::string, std::size_t>> used;  // the workloads' collectives (op, bytes)
  for (const auto& n : o.workloads) {
    if (me == 0) std::cerr << "workload " << n << "\n";
    json j = run_workload(n, o, child.get(), me, failures);
    if (me == 0) {
      for (const auto& [op, c] : j["processes"]["collectives"].items()) {
        if (!c.contains("bytes")) continue;
        for (const auto& b : c["bytes"]) used.insert({op, b["bytes"].get<std::size_t>()});
      }
      report["workloads"][n] = j;
    }
  }
  child.reset();

  // Part 2: the collectives, at the workloads' sizes (both processes learn them) and the sweep.
  std::vector<std::pair<std::string, std::pair<std::size_t, std::string>>> plan;
  {
    std::vector<std::uint64_t> flat;
    for (const auto& [op, b] : used) {
      flat.push_back(op == "all_reduce" ? 0 : 1);
      flat.push_back(b);
    }
    std::uint64_t count = flat.size();
    MPI_Bcast(&count, 1, MPI_UINT64_T, 0, g_control);
    flat.resize(count);
    MPI_Bcast(flat.data(), static_cast<int>(count), MPI_UINT64_T, 0, g_control);
    for (std::size_t i = 0; i + 1 < flat.size(); i += 2) {
      plan.push_back({flat[i] == 0 ? "all_reduce" : "all_gather", {flat[i + 1], "workload"}});
    }
    for (const char* op : {"all_reduce", "all_gather"}) {
      for (std::size_t b : o.sizes) plan.push_back({op, {b, "sweep"}});
    }
  }
  auto comm = mpi::make_communicator(DeviceKind::Cpu, 2, world.collective_timeout_s());
  report["collectives"] = json::array();
  for (const auto& [op, sized] : plan) {
    if (me == 0) std::cerr << "collective " << op << " " << fmt_bytes(sized.first) << "\n";
    json c = run_collective(op, sized.first, sized.second, o, *comm, me);
    if (!c["results_equal"].get<bool>()) {
      failures.push_back(op + " of " + std::to_string(sized.first) + " bytes: devpipe's result differs from MPI's");
    }
    report["collectives"].push_back(c);
  }
  meet("done");
  if (me != 0) return failures.empty() ? 0 : 1;

  report["run"]["load_average_end"] = bench::load_average_json();
  bool all_within = true;
  for (const auto& c : report["collectives"]) all_within = all_within && c["within_1_2x"].get<bool>();
  report["collectives_within_1_2x_of_floor"] = all_within;
  report["outputs_match"] = failures.empty();
  report["failures"] = failures;
  const fs::path out(o.out);
  if (!out.parent_path().empty()) fs::create_directories(out.parent_path());
  {
    std::ofstream f(o.out + ".tmp");
    f << report.dump(2) << "\n";
    f.close();
    if (!f) throw IoError("cannot write report '" + o.out + ".tmp'");
    fs::rename(o.out + ".tmp", o.out);
  }
  print_report(report);
  std::printf("\nwrote %s\n", o.out.c_str());
  if (!failures.empty()) {
    std::fprintf(stderr, "\ndevpipe_mpi_bench: %zu failure(s):\n", failures.size());
    for (const auto& f : failures) std::fprintf(stderr, "  %s\n", f.c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace devpipe::bench

int main(int argc, char** argv) {
  using namespace devpipe;
  bench::Options o;
  try {
    o = bench::parse(argc, argv);
  } catch (const cli::UsageError& e) {
    std::cerr << "devpipe_mpi_bench: " << e.what() << "\n";
    return 2;
  }
  if (o.threads_worker) return bench::threads_worker(o);
  try {
    return bench::run(o);
  } catch (const std::exception& e) {
    std::cerr << "devpipe_mpi_bench: " << e.what() << "\n";
    std::fflush(stderr);
    // The other process may wait in a collective or at a meeting point: end the job.
    if (World::get().transport() == Transport::Mpi) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}
