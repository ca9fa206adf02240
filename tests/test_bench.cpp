// The benchmark's own arithmetic and checks: the FLOP/byte count of a graph (against a hand
// count), the peer-output check (fails on a perturbed output), the worker protocol's error
// paths, the bare-kernel floor's output on given weights (against a float64 reference), and the
// llm workload end to end on a small Llama (devpipe, the PyTorch twin, llama.cpp when installed).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "devpipe/devpipe.h"
#include "compiler/fuse.h"
#include "graph/cost.h"
#include "kernels_bare.h"
#include "peers.h"
#include "test_util.h"

namespace devpipe {
namespace {

// conv(3->4, 3x3, pad 1) on [2,3,8,8] -> global avg pool -> flatten -> linear(4->5) -> gelu.
Graph small_vision_graph() {
  return trace_function({1, DType::Float32, "cost"}, {{"image", {Shape{2, 3, 8, 8}, DType::Float32}}},
                        [](const std::vector<Var>& in) {
                          Tracer& t = Tracer::current();
                          Var cw = t.parameter("conv.weight", Shape{4, 3, 3, 3}, -1);
                          Var cb = t.parameter("conv.bias", Shape{4}, -1);
                          Var lw = t.parameter("fc.weight", Shape{5, 4}, -1);
                          Var lb = t.parameter("fc.bias", Shape{5}, -1);
                          Var x = F::conv2d(in[0], cw, cb, {1, 1}, {1, 1});
                          x = F::flatten(F::adaptive_avg_pool2d(x, {1, 1}), 1);
                          return std::vector<Var>{F::gelu(F::linear(x, lw, lb))};
                        });
}

TEST(GraphCost, CountsFlopsAndBytesOfAKnownGraph) {
  const Graph g = small_vision_graph();
  const GraphCost c = graph_cost(g);
  // conv: 2 x (2*4*8*8 outputs) x (3*3*3 taps) + one bias add per output
  const double conv = 2.0 * 512 * 27 + 512;
  const double pool = 2 * 4 * 8 * 8;     // one add per input element
  const double linear = 2.0 * 10 * 4 + 10;  // [2,5] outputs, k = 4, plus bias
  const double gelu = 10;
  EXPECT_DOUBLE_EQ(c.flops, conv + pool + linear + gelu);
  EXPECT_EQ(c.param_bytes, (108u + 4 + 20 + 5) * 4);
  EXPECT_EQ(c.input_bytes, 2u * 3 * 8 * 8 * 4);
  EXPECT_EQ(c.output_bytes, 10u * 4);
  // conv out [2,4,8,8], pool out [2,4,1,1], flatten [2,4], linear [2,5]
  EXPECT_EQ(c.intermediate_bytes, (512u + 8 + 8 + 10) * 4);
  EXPECT_EQ(c.min_bytes(), c.param_bytes + c.input_bytes + c.output_bytes);
}

TEST(GraphCost, FusedConvPoolCountsTheConvsFlopsButNotItsOutputBytes) {
  const GraphCost plain = graph_cost(small_vision_graph());
  Graph fused = small_vision_graph();
  ASSERT_EQ(fuse_conv_global_avg_pool(fused), 1);
  const GraphCost c = graph_cost(fused);
  EXPECT_DOUBLE_EQ(c.flops, plain.flops);
  // the conv's [2,4,8,8] output is never materialised: pooled [2,4,1,1], flatten, linear remain
  EXPECT_EQ(c.intermediate_bytes, (8u + 8 + 10) * 4);
  EXPECT_EQ(c.param_bytes, plain.param_bytes);
}

TEST(GraphCost, CountsAttentionAsItsTwoMatmulsAndSoftmax) {
  const Graph g = trace_function({1, DType::Float32, "attn"},
                                 {{"q", {Shape{1, 2, 3, 4}, DType::Float32}},
                                  {"k", {Shape{1, 2, 5, 4}, DType::Float32}},
                                  {"v", {Shape{1, 2, 5, 6}, DType::Float32}}},
                                 [](const std::vector<Var>& in) {
                                   return std::vector<Var>{F::scaled_dot_product_attention(in[0], in[1], in[2])};
                                 });
  // 2 heads x 3 queries x 5 keys: q.k (2 x 4), p.v (2 x 6) and 5 for the softmax, per pair
  EXPECT_DOUBLE_EQ(graph_cost(g).flops, 2.0 * 3 * 5 * (2 * 4 + 2 * 6 + 5));
}

TEST(GraphCost, SumsOverStages) {
  GraphCost a = graph_cost(small_vision_graph());
  GraphCost total = a;
  total += a;
  EXPECT_DOUBLE_EQ(total.flops, 2 * a.flops);
  EXPECT_EQ(total.min_bytes(), 2 * a.min_bytes());
}

TEST(PeerCheck, MatchingOutputPassesAndAPerturbedOneFailsNamingPeerWorkloadAndDiffs) {
  std::vector<float> want(100);
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = std::sin(static_cast<float>(i)) * 2.0f;
  std::vector<float> close = want;
  close[3] += 1e-5f;  // well inside 1e-5 + 1e-4 * 2
  const bench::OutputCheck ok = bench::check_output("onnxruntime", "large", want, close);
  EXPECT_TRUE(ok.ok) << ok.message;

  std::vector<float> off = want;
  off[42] += 0.01f;
  const bench::OutputCheck bad = bench::check_output("onnxruntime", "large", want, off);
  EXPECT_FALSE(bad.ok);
  EXPECT_EQ(bad.worst, 42u);
  EXPECT_NEAR(bad.max_abs, 0.01, 1e-6);
  double scale = 0;
  for (float v : want) scale = std::max(scale, static_cast<double>(std::fabs(v)));
  EXPECT_NEAR(bad.max_rel, 0.01 / scale, 1e-6);
  for (const char* part : {"peer onnxruntime", "workload large", "differs", "max abs diff 0.0099",
                           "max rel diff", "index 42"}) {
    EXPECT_NE(bad.message.find(part), std::string::npos) << part << " missing from: " << bad.message;
  }
}

TEST(PeerCheck, SizeMismatchAndNonFiniteValuesFail) {
  const std::vector<float> want{1, 2, 3};
  const bench::OutputCheck size = bench::check_output("pytorch_eager", "seed_tp1", want, {1, 2});
  EXPECT_FALSE(size.ok);
  EXPECT_NE(size.message.find("has 2 values, devpipe's has 3"), std::string::npos) << size.message;
  const bench::OutputCheck nan = bench::check_output("pytorch_eager", "seed_tp1", want, {1, NAN, 3});
  EXPECT_FALSE(nan.ok);
  EXPECT_NE(nan.message.find("not finite"), std::string::npos) << nan.message;
}

TEST(PeerWorker, ErrorsNameThePeerAndTheReply) {
  testing::TempDir t;
  const std::string log = (t.path() / "w.log").string();
  {
    bench::ChildWorker w("toy", {"/bin/sh", "-c", "echo '{\"ready\": true, \"threads\": 3}'; read l; "
                                                  "echo '{\"error\": \"boom\"}'; exit 1"},
                         log);
    EXPECT_EQ(w.hello().value("threads", 0), 3);
    try {
      w.request({{"cmd", "run"}, {"iters", 1}});
      FAIL() << "an error reply must throw";
    } catch (const StateError& e) {
      EXPECT_NE(std::string(e.what()).find("peer toy"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("boom"), std::string::npos) << e.what();
    }
    ::usleep(100000);  // the worker has exited: the destructor's quit must not raise SIGPIPE
  }
  try {
    bench::ChildWorker w("quitter", {"/bin/sh", "-c", "echo no torch here >&2; exit 3"}, log);
    FAIL() << "a worker that exits before its ready line must throw";
  } catch (const StateError& e) {
    EXPECT_NE(std::string(e.what()).find("peer quitter"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("exit status 3"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("no torch here"), std::string::npos) << e.what();
  }
}

TEST(KernelsBare, Chain8OnGivenWeightsMatchesAFloat64ReferenceOnEveryRun) {
  bench::BareData data;
  std::vector<std::vector<double>> w(8), b(8);
  std::vector<double> x(64);
  for (int i = 0; i < 64; ++i) x[i] = std::cos(0.37 * i);
  data["input0"] = std::vector<float>(x.begin(), x.end());
  for (int s = 0; s < 8; ++s) {
    std::vector<float> wf(64 * 64), bf(64);
    for (int j = 0; j < 64 * 64; ++j) wf[j] = 0.6f * std::sin(0.11f * static_cast<float>(j + 97 * s));
    for (int j = 0; j < 64; ++j) bf[j] = 0.05f * std::cos(0.3f * static_cast<float>(j + s));
    w[s].assign(wf.begin(), wf.end());
    b[s].assign(bf.begin(), bf.end());
    data["stage" + std::to_string(s) + ".fc.weight"] = wf;
    data["stage" + std::to_string(s) + ".fc.bias"] = bf;
  }
  // Reference: y = gelu(W x + b), W stored [out, in] as PyTorch does, exact (erf) GELU.
  std::vector<double> h = x;
  for (int s = 0; s < 8; ++s) {
    std::vector<double> y(64);
    for (int o = 0; o < 64; ++o) {
      double acc = b[s][o];
      for (int k = 0; k < 64; ++k) acc += w[s][o * 64 + k] * h[k];
      y[o] = 0.5 * acc * (1 + std::erf(acc / std::sqrt(2.0)));
    }
    h = y;
  }
  bench::KernelsBare bare("chain8", 1, data);
  for (int run = 0; run < 2; ++run) {  // the second run must compute on the input again
    bare.run(1);
    const std::vector<float> got = bare.output();
    ASSERT_EQ(got.size(), 64u);
    double max_diff = 0, scale = 0;
    for (int i = 0; i < 64; ++i) {
      max_diff = std::max(max_diff, std::fabs(got[i] - h[i]));
      scale = std::max(scale, std::fabs(h[i]));
    }
    EXPECT_GT(scale, 0.1);
    EXPECT_LT(max_diff, 1e-5 * scale) << "run " << run;
  }
  data.erase("stage5.fc.bias");
  EXPECT_THROW(bench::KernelsBare("chain8", 1, data), std::invalid_argument);
}

// ---- the llm workload, end to end through `devpipe bench` on the small model -----------------

struct BenchRun {
  int code = -1;
  std::string log;
  nlohmann::json report;
};

/// `devpipe bench --workload llm --llm-small` with 1 iteration, 4 decode tokens, in `dir`.
BenchRun run_llm_bench(const testing::TempDir& dir, const std::string& extra) {
  const std::string cmd = "cd " + dir.str() + " && '" + DEVPIPE_CLI +
                          "' bench --workload llm --llm-small --iters 1 --warmup 0 --llm-decode-tokens 4 --out " +
                          dir.str("report.json") + " " + extra + " >" + dir.str("log") + " 2>&1 </dev/null";
  BenchRun r;
  const int status = std::system(cmd.c_str());
  if (status != -1 && WIFEXITED(status)) r.code = WEXITSTATUS(status);
  std::ifstream lf(dir.str("log"));
  std::stringstream ss;
  ss << lf.rdbuf();
  r.log = ss.str();
  std::ifstream rf(dir.str("report.json"));
  if (rf) r.report = nlohmann::json::parse(rf);
  return r;
}

// The small model of `llm_peers.py write-model --small`: hidden 64, intermediate 128, 2 layers,
// 4 heads (head_dim 16), 2 KV heads, vocab 300, untied: per layer q,o 64x64, k,v 64x32, the MLP
// 3 x 64x128, two norms; the embedding and lm_head 300x64 each; the final norm.
constexpr double kSmallParams = 2 * (64.0 * 64 * 2 + 64.0 * 32 * 2 + 3 * 64.0 * 128 + 2 * 64) + 2 * 300.0 * 64 + 64;
// Greedy ids checked per mode: the prefill's next id, 4 at batch 1, 4 for each of 8 sequences.
constexpr long long kSmallIds = 1 + 4 + 4 * 8;

void expect_timed(const nlohmann::json& m, const std::string& what) {
  for (const char* ph : {"prefill", "decode_b1", "decode_b8"}) {
    ASSERT_TRUE(m.contains(ph)) << what << " has no " << ph << ": " << m.dump();
    EXPECT_GT(m[ph]["tokens_per_s"].get<double>(), 0) << what << " " << ph;
    EXPECT_GT(m[ph]["latency_ms"]["p50"].get<double>(), 0) << what << " " << ph;
  }
  // one prefill; 3 timed steps per decode run (the first new token comes from the prefill)
  EXPECT_EQ(m["prefill"]["samples"].get<int>(), 1) << what;
  EXPECT_EQ(m["decode_b1"]["samples"].get<int>(), 3) << what;
  EXPECT_EQ(m["decode_b8"]["samples"].get<int>(), 3) << what;
}

TEST(LlmBench, SmallModelDevpipeAndTwinHaveTokensPerSecondAndEqualGreedyIds) {
  testing::TempDir t;
  const BenchRun r = run_llm_bench(t, "--modes pipeline,pytorch");
  ASSERT_EQ(r.code, 0) << r.log;
  const nlohmann::json& llm = r.report["workloads"]["llm"];
  EXPECT_DOUBLE_EQ(llm["config"]["parameters"].get<double>(), kSmallParams);
  const double triad = r.report["machine"]["limits"]["triad_gb_per_s"].get<double>();
  for (const char* dt : {"float32", "bfloat16"}) {
    const nlohmann::json& run = llm["runs"][dt];
    const double elem = std::string(dt) == "float32" ? 4 : 2;
    // the bound: every weight read once per step, at the measured bandwidth
    EXPECT_DOUBLE_EQ(run["bound"]["weight_bytes_per_decode_step"].get<double>(), elem * kSmallParams);
    EXPECT_NEAR(run["bound"]["decode_step_ms"].get<double>(), elem * kSmallParams / (triad * 1e9) * 1e3, 1e-12);
    const nlohmann::json& dev = run["modes"]["devpipe"];
    expect_timed(dev, std::string(dt) + " devpipe");
    EXPECT_NEAR(dev["decode_b1"]["bandwidth_bound_ratio"].get<double>(),
                dev["decode_b1"]["latency_ms"]["p50"].get<double>() / run["bound"]["decode_step_ms"].get<double>(),
                1e-9);
    std::vector<std::string> twins{"pytorch_mkldnn"};
    if (std::string(dt) == "bfloat16") {
      twins.push_back("pytorch_eager");
    } else {
      EXPECT_NE(run["modes"]["pytorch_eager"].value("skipped", "").find("--llm-eager-float32"), std::string::npos)
          << run["modes"]["pytorch_eager"].dump();
    }
    for (const std::string& mode : twins) {
      const nlohmann::json& m = run["modes"][mode];
      expect_timed(m, std::string(dt) + " " + mode);
      const nlohmann::json& c = m["token_check"];
      EXPECT_EQ(c["total"].get<long long>(), kSmallIds) << c.dump();
      if (std::string(dt) == "float32") {
        EXPECT_TRUE(c["ok"].get<bool>()) << c.dump();
        EXPECT_EQ(c["matching"].get<long long>(), kSmallIds) << c.dump();
      }
    }
  }
  EXPECT_TRUE(r.report["correctness_failures"].empty()) << r.report["correctness_failures"].dump();
}

TEST(LlmBench, SmallModelLlamaCppGreedyIdsEqualDevpipes) {
  const char* env = std::getenv("DEVPIPE_LLAMA_CPP_DIR");
  const std::filesystem::path dir =
      env && *env ? std::filesystem::path(env)
                  : std::filesystem::path(DEVPIPE_REFERENCE_DIR) / ".." / ".." / "build" / "llama_cpp";
  if (!std::filesystem::is_directory(dir / "node_modules" / "node-llama-cpp") ||
      std::system("command -v node >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "node-llama-cpp is not installed in " << dir.string()
                 << " (or node is not on PATH): bash bench/llama_cpp/install.sh";
  }
  testing::TempDir t;
  const BenchRun r = run_llm_bench(t, "--modes pipeline,llama_cpp --llm-dtypes float32 --llama-cpp-dir " +
                                          std::filesystem::absolute(dir).lexically_normal().string());
  ASSERT_EQ(r.code, 0) << r.log;
  const nlohmann::json& run = r.report["workloads"]["llm"]["runs"]["float32"];
  EXPECT_FALSE(r.report["workloads"]["llm"]["runs"].contains("bfloat16"));
  expect_timed(run["modes"]["llama_cpp"], "llama_cpp");
  const nlohmann::json& c = run["modes"]["llama_cpp"]["token_check"];
  EXPECT_TRUE(c["ok"].get<bool>()) << c.dump();
  EXPECT_EQ(c["matching"].get<long long>(), kSmallIds) << c.dump();
}

}  // namespace
}  // namespace devpipe
