// The benchmark's own arithmetic and checks: the FLOP/byte count of a graph (against a hand
// count), the peer-output check (fails on a perturbed output), the worker protocol's error
// paths, the two floors' outputs on given weights (the bare oneDNN kernels, and the compiled
// executables without the runtime on small chain8, large and seed stages: against float64
// references and the pipeline's output), chain8 through `devpipe bench` with both floors, and
// the llm workload end to end on a small Llama (devpipe, the PyTorch twin, llama.cpp when
// installed), the vlm workload end to end on a tiny VLM (devpipe and its PyTorch twin), and the
// dit workload end to end on a tiny DiT pipeline (likewise).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "devpipe/devpipe.h"
#include "compiler/fuse.h"
#include "executables_bare.h"
#include "graph/cost.h"
#include "kernels_bare.h"
#include "peers.h"
#include "runtime/rank_group.h"
#include "test_util.h"
#include "vision_text/models.h"
#include "workloads.h"

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

// ---- executables_bare: the compiled stages without the runtime ------------------------------

/// A stage for the executables_bare tests: random weights (seed `seed`) saved as its checkpoint,
/// compiled with the bench's pipeline-mode options into dir/<tag> and loaded; its weights by
/// key in float64 for the references.
struct TestStage {
  std::string dir;
  std::unique_ptr<ModelWrapper> wrapper;
  std::map<std::string, std::vector<double>> w;
};

template <class M>
TestStage make_stage(const testing::TempDir& t, const InferenceConfig& c, const std::string& tag,
                     std::vector<Tensor> example, std::uint64_t seed, bool last) {
  TestStage s;
  const auto sd = nn::random_state_dict(*model_cls<M>().create(c), seed);
  const std::string ckpt = t.str(tag + ".safetensors");
  safetensors::save(ckpt, sd);
  for (const auto& [key, v] : sd) {
    const std::vector<float> f = v.to_float_vector();
    s.w[key].assign(f.begin(), f.end());
  }
  s.wrapper = std::make_unique<bench::BenchWrapper<M>>(
      c, WrapperOptions{.pipeline_execution = true, .return_ranked_to_cpu = last, .tag = tag}, std::move(example));
  s.dir = t.str(tag);
  s.wrapper->compile(ckpt, s.dir);
  s.wrapper->load(s.dir);
  return s;
}

std::vector<std::string> dirs_of(const std::vector<TestStage>& stages) {
  std::vector<std::string> d;
  for (const auto& s : stages) d.push_back(s.dir);
  return d;
}

/// The pipeline's output through the loaded wrappers: stage i gets the previous output, then extra[i].
std::vector<float> pipeline_output(std::vector<TestStage>& stages, const std::vector<std::vector<Tensor>>& extra) {
  Output prev;
  for (std::size_t i = 0; i < stages.size(); ++i) {
    std::vector<Input> args;
    if (i > 0) args.push_back(prev);
    for (const Tensor& x : extra[i]) args.emplace_back(x);
    prev = stages[i].wrapper->forward(args);
  }
  return prev.tensor().to_float_vector();
}

/// y[r][o] = b[o] + sum_k W[o][k] x[r][k] over `rows` rows (W stored [out, in] as PyTorch does).
std::vector<double> ref_linear(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b,
                               std::size_t rows) {
  const std::size_t out = b.size(), in = w.size() / out;
  std::vector<double> y(rows * out);
  for (std::size_t r = 0; r < rows; ++r) {
    for (std::size_t o = 0; o < out; ++o) {
      double acc = b[o];
      for (std::size_t k = 0; k < in; ++k) acc += w[o * in + k] * x[r * in + k];
      y[r * out + o] = acc;
    }
  }
  return y;
}

std::vector<double> doubles(const Tensor& t) {
  const std::vector<float> f = t.to_float_vector();
  return {f.begin(), f.end()};
}

/// `got` within 1e-5 x max |want| (+ 1e-7) of the float64 reference `want`, and within the
/// bench's peer tolerance of the pipeline's output `pipe`.
void expect_matches(const std::vector<float>& got, const std::vector<double>& want, const std::vector<float>& pipe,
                    const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double max_diff = 0, scale = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    max_diff = std::max(max_diff, std::fabs(got[i] - want[i]));
    scale = std::max(scale, std::fabs(want[i]));
  }
  EXPECT_GT(scale, 1e-3) << what;
  EXPECT_LE(max_diff, 1e-5 * scale + 1e-7) << what << ": max |got - float64 reference| of max |reference| " << scale;
  const bench::OutputCheck c = bench::check_output("executables_bare", what, pipe, got);
  EXPECT_TRUE(c.ok) << c.message;
}

TEST(ExecutablesBare, Chain8AtTp2RunsRank0OfTheReplicatedStagesWithThePipelinesThreads) {
  testing::TempDir t;
  const InferenceConfig c(RuntimeConfig{.batch_size = 1, .tp_degree = 2});
  const Tensor x = Tensor::randn({1, 64}, 45);
  std::vector<TestStage> st;
  std::vector<std::vector<Tensor>> extra;
  for (int i = 0; i < 8; ++i) {
    st.push_back(make_stage<bench::ChainStage>(t, c, "stage" + std::to_string(i), {x}, 300 + i, i == 7));
    extra.push_back(i == 0 ? std::vector<Tensor>{x} : std::vector<Tensor>{});
  }
  // Batch 1 is not split over the 2 ranks: every stage is replicated, so rank 0 runs it alone.
  for (const auto& s : st) EXPECT_EQ(bench::ExecutablesBare::why_not_alone(s.dir, 1), "") << s.dir;
  std::vector<double> h = doubles(x);
  for (int i = 0; i < 8; ++i) {
    h = ref_linear(h, st[i].w["fc.weight"], st[i].w["fc.bias"], 1);
    for (double& v : h) v = 0.5 * v * (1 + std::erf(v / std::sqrt(2.0)));
  }
  const std::vector<float> pipe = pipeline_output(st, extra);
  bench::ExecutablesBare bare(dirs_of(st), 1, extra);
  EXPECT_EQ(bare.threads(), threads_per_rank(c.runtime_config()));
  EXPECT_NE(bare.what().find("rank 0 of tp 2"), std::string::npos) << bare.what();
  for (int run = 0; run < 2; ++run) {  // every run computes from the input again
    const std::vector<double> samples = bare.run(3);
    ASSERT_EQ(samples.size(), 3u);
    for (double ms : samples) EXPECT_GT(ms, 0);
    expect_matches(bare.output(), h, pipe, "chain8 run " + std::to_string(run));
  }
}

TEST(ExecutablesBare, LargeAtReducedSizeMatchesTheReferenceAndNamesBadInputs) {
  testing::TempDir t;
  const InferenceConfig c(RuntimeConfig{.batch_size = 2, .tp_degree = 1});
  const Tensor x = Tensor::randn({2, 16, 8}, 44);  // large's [32, 1440, 8] at batch 2, 16 rows
  std::vector<TestStage> st;
  st.push_back(make_stage<bench::Expand>(t, c, "expand", {x}, 100, false));
  st.push_back(make_stage<bench::Reduce>(t, c, "reduce", {Tensor::zeros({2, 16, 1280})}, 101, true));
  const std::vector<std::vector<Tensor>> extra{{x}, {}};
  const std::vector<double> hid = ref_linear(doubles(x), st[0].w["proj.weight"], st[0].w["proj.bias"], 32);
  const std::vector<double> want = ref_linear(hid, st[1].w["proj.weight"], st[1].w["proj.bias"], 32);
  bench::ExecutablesBare bare(dirs_of(st), 2, extra);
  EXPECT_EQ(bare.threads(), threads_per_rank(c.runtime_config()));
  bare.run(2);
  expect_matches(bare.output(), want, pipeline_output(st, extra), "large [2, 16, 8]");

  try {
    bench::ExecutablesBare bad(dirs_of(st), 2, {{Tensor::zeros({2, 16, 9})}, {}});
    ADD_FAILURE() << "a host input of the wrong shape was taken";
  } catch (const ShapeError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("'expand'"), std::string::npos) << m;
    EXPECT_NE(m.find("[2, 16, 9]"), std::string::npos) << m;
    EXPECT_NE(m.find("[2, 16, 8]"), std::string::npos) << m;
  }
  EXPECT_THROW(bench::ExecutablesBare(dirs_of(st), 2, {{x}, {x}}), InvalidArgument);  // reduce takes one input
  EXPECT_THROW(bench::ExecutablesBare(dirs_of(st), 4, extra), InvalidArgument);       // no bucket of batch 4
}

TEST(ExecutablesBare, SeedStagesWireThePreviousOutputBeforeTheHostInput) {
  testing::TempDir t;
  const InferenceConfig c(RuntimeConfig{.batch_size = 2, .tp_degree = 1},
                          {{"vision_embedding_size", 5}, {"text_input_size", 6}, {"text_embedding_size", 4},
                           {"output_size", 7}});
  const Tensor image = Tensor::randn({2, 3, 8, 8}, 42), text = Tensor::randn({2, 6}, 43);
  std::vector<TestStage> st;
  st.push_back(make_stage<vision_text::VisionModel>(t, c, "vision_model", {image}, 100, false));
  st.push_back(make_stage<vision_text::TextModel>(t, c, "text_model", {Tensor::zeros({2, 5}), text}, 101, true));
  const std::vector<std::vector<Tensor>> extra{{image}, {text}};
  // conv(3->64, 3x3, pad 1) averaged over the 8x8 positions, fc; embedding; cat; fusion.
  const std::vector<double> img = doubles(image);
  const std::vector<double>& cw = st[0].w["conv.weight"];
  std::vector<double> pooled(2 * 64);
  for (int n = 0; n < 2; ++n) {
    for (int o = 0; o < 64; ++o) {
      double acc = 0;
      for (int y = 0; y < 8; ++y) {
        for (int xx = 0; xx < 8; ++xx) {
          for (int ci = 0; ci < 3; ++ci) {
            for (int ky = 0; ky < 3; ++ky) {
              for (int kx = 0; kx < 3; ++kx) {
                const int iy = y + ky - 1, ix = xx + kx - 1;
                if (iy < 0 || iy >= 8 || ix < 0 || ix >= 8) continue;
                acc += cw[((o * 3 + ci) * 3 + ky) * 3 + kx] * img[((n * 3 + ci) * 8 + iy) * 8 + ix];
              }
            }
          }
        }
      }
      pooled[n * 64 + o] = st[0].w["conv.bias"][o] + acc / 64;
    }
  }
  const std::vector<double> vis = ref_linear(pooled, st[0].w["fc.weight"], st[0].w["fc.bias"], 2);
  const std::vector<double> emb = ref_linear(doubles(text), st[1].w["embedding.weight"], st[1].w["embedding.bias"], 2);
  std::vector<double> cat;
  for (int n = 0; n < 2; ++n) {
    cat.insert(cat.end(), vis.begin() + n * 5, vis.begin() + n * 5 + 5);
    cat.insert(cat.end(), emb.begin() + n * 4, emb.begin() + n * 4 + 4);
  }
  const std::vector<double> want = ref_linear(cat, st[1].w["fusion.weight"], st[1].w["fusion.bias"], 2);
  bench::ExecutablesBare bare(dirs_of(st), 2, extra);
  bare.run(1);
  expect_matches(bare.output(), want, pipeline_output(st, extra), "seed at batch 2, 8x8 images");
}

TEST(ExecutablesBare, AStageSplitOverTheRanksIsRefusedNamingItsArtifact) {
  testing::TempDir t;
  // Batch 2 at tp 2: each rank computes one row and the ranks all-gather the output.
  const InferenceConfig c(RuntimeConfig{.batch_size = 2, .tp_degree = 2});
  const Tensor x = Tensor::randn({2, 16, 8}, 44);
  std::vector<TestStage> st;
  st.push_back(make_stage<bench::Expand>(t, c, "expand", {x}, 100, true));
  const std::string why = bench::ExecutablesBare::why_not_alone(st[0].dir, 2);
  EXPECT_NE(why.find(st[0].dir), std::string::npos) << why;
  EXPECT_NE(why.find("needs every rank"), std::string::npos) << why;
  try {
    bench::ExecutablesBare bad(dirs_of(st), 2, {{x}});
    ADD_FAILURE() << "rank 0 was let run a split stage alone";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
  }
}

// ---- the llm workload, end to end through `devpipe bench` on the small model -----------------

struct BenchRun {
  int code = -1;
  std::string log;
  nlohmann::json report;
};

/// `devpipe bench ARGS --out dir/report.json`, run in `dir`.
BenchRun run_bench(const testing::TempDir& dir, const std::string& args) {
  const std::string cmd = "cd " + dir.str() + " && '" + DEVPIPE_CLI + "' bench " + args + " --out " +
                          dir.str("report.json") + " >" + dir.str("log") + " 2>&1 </dev/null";
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

/// `devpipe bench --workload llm --llm-small` with 1 iteration, 4 decode tokens, in `dir`.
BenchRun run_llm_bench(const testing::TempDir& dir, const std::string& extra) {
  return run_bench(dir, "--workload llm --llm-small --iters 1 --warmup 0 --llm-decode-tokens 4 " + extra);
}

TEST(BenchFloors, Chain8HasBothFloorsCheckedAndTheBoundaryOverheadAgainstEach) {
  testing::TempDir t;
  const BenchRun r = run_bench(t, "--workload chain8 --modes pipeline,kernels_bare,executables_bare --no-pytorch "
                                  "--iters 20 --warmup 2 --rounds 2");
  ASSERT_EQ(r.code, 0) << r.log;
  const nlohmann::json& modes = r.report["workloads"]["chain8"]["modes"];
  const double pipe = modes["pipeline"]["latency_ms"]["p50"].get<double>();
  for (const char* floor : {"kernels_bare", "executables_bare"}) {
    const nlohmann::json& m = modes[floor];
    ASSERT_TRUE(m.contains("latency_ms")) << floor << ": " << m.dump();
    EXPECT_TRUE(m["output_check"]["ok"].get<bool>()) << m["output_check"].dump();
    EXPECT_GT(m["latency_ms"]["p50"].get<double>(), 0) << floor;
    EXPECT_TRUE(std::filesystem::exists(t.path() / "work" / "outputs" / (std::string("chain8.") + floor + ".safetensors")))
        << floor;
  }
  const nlohmann::json& exe = modes["executables_bare"];
  // chain8 is tp 2: rank 0 of the replicated stages, with the pipeline's threads per rank.
  EXPECT_EQ(exe["threads"].get<int>(), threads_per_rank(RuntimeConfig{.batch_size = 1, .tp_degree = 2}));
  EXPECT_NE(exe["what"].get<std::string>().find("rank 0 of tp 2"), std::string::npos) << exe["what"];
  EXPECT_FALSE(exe.contains("note")) << exe["note"];
  const double exe_p50 = exe["latency_ms"]["p50"].get<double>();
  const double bare_p50 = modes["kernels_bare"]["latency_ms"]["p50"].get<double>();
  EXPECT_NEAR(modes["pipeline"]["boundary_overhead_us"].get<double>(), (pipe - bare_p50) * 1000 / 7, 1e-9);
  EXPECT_NEAR(modes["pipeline"]["boundary_overhead_vs_executables_us"].get<double>(), (pipe - exe_p50) * 1000 / 7,
              1e-9);
  EXPECT_NE(r.log.find("boundary overhead vs executables_bare:"), std::string::npos) << r.log;
  bool found = false;
  for (const auto& target : r.report["targets"]) {
    if (target["target"] != "chain8: pipeline p50 / executables_bare p50") continue;
    found = true;
    EXPECT_NEAR(target["measured"].get<double>(), pipe / exe_p50, 1e-12);
    EXPECT_EQ(target["limit"].get<double>(), 1.3);
    EXPECT_NE(target["status"], "n/a");
  }
  EXPECT_TRUE(found) << r.report["targets"].dump();
  EXPECT_TRUE(r.report["correctness_failures"].empty()) << r.report["correctness_failures"].dump();
}

// seed_tp2's ranks each run half the batch: the report gives each rank's compute (its stage
// spans less its collectives' waits, plus the peer's bands it ran while waiting there) and that
// help alone, and the tp2 / tp1 line names both ranges.
TEST(BenchRanks, SeedTp2ReportsEachRanksOwnComputeBesideTheStageTimes) {
  testing::TempDir t;
  const BenchRun r = run_bench(t, "--workload seed --modes pipeline --no-pytorch --iters 2 --warmup 1 --rounds 1");
  ASSERT_EQ(r.code, 0) << r.log;
  const nlohmann::json& tp2 = r.report["workloads"]["seed_tp2"]["modes"]["pipeline"];
  ASSERT_TRUE(tp2.contains("rank_own_compute_ms")) << tp2.dump();
  const nlohmann::json& own = tp2["rank_own_compute_ms"];
  ASSERT_EQ(own.size(), 2u) << own.dump();
  double stages = 0;  // rank 0's stage spans, collectives' waits included
  for (const auto& [tag, ms] : tp2["stage_compute_ms"].items()) stages += ms.get<double>();
  for (const auto& ms : own) {
    // Most of a stage is the rank's own convolution; its own time cannot exceed the spans by
    // more than the other rank's may (a few percent on this machine, bounded loosely here).
    EXPECT_GT(ms.get<double>(), 0.5 * stages) << own.dump() << " vs " << stages;
    EXPECT_LT(ms.get<double>(), 1.5 * stages) << own.dump() << " vs " << stages;
  }
  // Rank 0's own compute is its stage spans less its collectives' time in them (the all_gathers
  // of both stages take some): below the spans.
  EXPECT_LT(own[0].get<double>(), stages) << own.dump() << " vs " << stages;
  // The help is part of the rank's compute, and runs inside its collectives' spans.
  ASSERT_TRUE(tp2.contains("rank_help_ms")) << tp2.dump();
  const nlohmann::json& help = tp2["rank_help_ms"];
  ASSERT_EQ(help.size(), 2u) << help.dump();
  for (std::size_t i = 0; i < 2; ++i) {
    EXPECT_GE(help[i].get<double>(), 0.0) << help.dump();
    EXPECT_LT(help[i].get<double>(), own[i].get<double>()) << help.dump() << " vs " << own.dump();
  }
  // tp 1 timed in seed_tp2's own rounds, its output checked against tp 2's, and the target
  // taken from it.
  const nlohmann::json& tp1_beside = r.report["workloads"]["seed_tp2"]["modes"]["pipeline_tp1"];
  ASSERT_TRUE(tp1_beside.contains("latency_ms")) << r.report["workloads"]["seed_tp2"]["modes"].dump();
  EXPECT_TRUE(tp1_beside["output_check"]["ok"].get<bool>()) << tp1_beside.dump();
  EXPECT_FALSE(tp1_beside.contains("rank_own_compute_ms"));
  // tp 1 has one rank: no per-rank figure.
  EXPECT_FALSE(r.report["workloads"]["seed_tp1"]["modes"]["pipeline"].contains("rank_own_compute_ms"));
  EXPECT_FALSE(r.report["workloads"]["seed_tp1"]["modes"]["pipeline"].contains("rank_help_ms"));
  bool found = false;
  for (const auto& target : r.report["targets"]) {
    if (target["target"] != "seed: tp2 pipeline p50 / tp1 pipeline p50") continue;
    found = true;
    const std::string note = target["note"].get<std::string>();
    EXPECT_NE(note.find("tp 1 timed in seed_tp2's rounds (pipeline_tp1)"), std::string::npos) << target.dump();
    const double want_ratio = tp2["latency_ms"]["p50"].get<double>() / tp1_beside["latency_ms"]["p50"].get<double>();
    EXPECT_NEAR(target["measured"].get<double>(), want_ratio, 1e-6 * want_ratio) << target.dump();
    EXPECT_NE(note.find("the ranks' compute per forward: "), std::string::npos) << target.dump();
    EXPECT_NE(note.find(" ms, of which a peer's bands "), std::string::npos) << target.dump();
  }
  EXPECT_TRUE(found) << r.report["targets"].dump();
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

// ---- the vlm workload, end to end through `devpipe bench` on the tiny VLM ----------------------

/// The informational targets of a workload with a PyTorch twin: one per phase, "WL: devpipe PH p50 /
/// pytorch PH p50", no limit, status info, measured = devpipe's p50 over pytorch_mkldnn's.
void expect_twin_targets(const nlohmann::json& report, const std::string& wl, std::initializer_list<const char*> phases) {
  const nlohmann::json& modes = report["workloads"][wl]["modes"];
  for (const char* ph : phases) {
    const std::string name = wl + ": devpipe " + ph + " p50 / pytorch " + ph + " p50";
    bool found = false;
    for (const auto& tg : report["targets"]) {
      if (tg["target"] != name) continue;
      found = true;
      EXPECT_EQ(tg["status"], "info") << tg.dump();
      EXPECT_TRUE(tg["limit"].is_null()) << tg.dump();
      EXPECT_DOUBLE_EQ(tg["measured"].get<double>(), modes["devpipe"][ph]["latency_ms"]["p50"].get<double>() /
                                                         modes["pytorch_mkldnn"][ph]["latency_ms"]["p50"].get<double>());
    }
    EXPECT_TRUE(found) << name << " not in " << report["targets"].dump();
  }
}

// vlm_peers.py write-model --small: image 16 x 16 at patch 4 (16 image tokens), text hidden 64;
// the prompt 8 text tokens around them. 2 timed runs per phase (2 rounds of 1), 4 decode tokens.
constexpr long long kVlmImageTokens = 16, kVlmTextHidden = 64, kVlmDecodeTokens = 4;

TEST(BenchVlm, SmallModelReportsEveryPhaseChecksTheTwinAndTheRatiosAreTheP50s) {
  testing::TempDir t;
  const BenchRun r = run_bench(
      t, "--workload vlm --vlm-small --iters 2 --warmup 1 --rounds 2 --vlm-decode-tokens " +
             std::to_string(kVlmDecodeTokens) + " --modes pipeline,pytorch");
  ASSERT_EQ(r.code, 0) << r.log;
  const nlohmann::json& vlm = r.report["workloads"]["vlm"];
  const nlohmann::json& c = vlm["config"];
  EXPECT_EQ(c["image_tokens"].get<long long>(), kVlmImageTokens);
  EXPECT_EQ(c["prompt_len"].get<long long>(), kVlmImageTokens + 8);
  EXPECT_EQ(c["text_tokens"].get<long long>(), 8);
  EXPECT_EQ(c["image_hw"], nlohmann::json::array({16, 16}));
  EXPECT_EQ(c["text"]["hidden_size"].get<long long>(), kVlmTextHidden);
  EXPECT_EQ(c["iterations"].get<int>(), 2);
  EXPECT_EQ(c["rounds"].get<int>(), 2);
  for (const char* mode : {"devpipe", "pytorch_mkldnn"}) {
    ASSERT_TRUE(vlm["modes"].contains(mode)) << vlm["modes"].dump();
    const nlohmann::json& m = vlm["modes"][mode];
    ASSERT_FALSE(m.contains("error")) << m.dump();
    // 2 vision runs, 2 prefills, 2 decode runs of 3 timed steps (the first token is the prefill's)
    const std::map<std::string, int> samples{
        {"vision", 2}, {"prefill", 2}, {"decode_b1", 2 * (kVlmDecodeTokens - 1)}};
    for (const auto& [ph, n] : samples) {
      ASSERT_TRUE(m.contains(ph)) << mode << " has no " << ph << ": " << m.dump();
      EXPECT_EQ(m[ph]["samples"].get<int>(), n) << mode << " " << ph;
      const double p50 = m[ph]["latency_ms"]["p50"].get<double>();
      EXPECT_GT(p50, 0) << mode << " " << ph;
      EXPECT_LE(m[ph]["latency_ms"]["min"].get<double>(), p50) << mode << " " << ph;
      EXPECT_GT(m[ph]["cpu_ms_per_sample"].get<double>(), 0) << mode << " " << ph;
    }
    EXPECT_NEAR(m["decode_b1"]["tokens_per_s"].get<double>(),
                1000.0 / m["decode_b1"]["latency_ms"]["p50"].get<double>(),
                1e-9 * m["decode_b1"]["tokens_per_s"].get<double>());
    EXPECT_NEAR(m["prefill"]["tokens_per_s"].get<double>(),
                1000.0 * (kVlmImageTokens + 8) / m["prefill"]["latency_ms"]["p50"].get<double>(),
                1e-9 * m["prefill"]["tokens_per_s"].get<double>());
  }
  // The twin's checks ran against devpipe and matched: the prefill's next id + 4 decode ids, and
  // every image feature within the tolerance.
  const nlohmann::json& twin = vlm["modes"]["pytorch_mkldnn"];
  EXPECT_TRUE(twin["token_check"]["ok"].get<bool>()) << twin["token_check"].dump();
  EXPECT_EQ(twin["token_check"]["matching"].get<long long>(), 1 + kVlmDecodeTokens)
      << twin["token_check"].dump();
  EXPECT_EQ(twin["token_check"]["total"].get<long long>(), 1 + kVlmDecodeTokens)
      << twin["token_check"].dump();
  const nlohmann::json& f = twin["feature_check"];
  EXPECT_TRUE(f["ok"].get<bool>()) << f.dump();
  EXPECT_EQ(f["elements"].get<long long>(), kVlmImageTokens * kVlmTextHidden) << f.dump();
  EXPECT_LE(f["max_abs_diff"].get<double>(), 1e-4) << f.dump();
  EXPECT_TRUE(r.report["correctness_failures"].empty()) << r.report["correctness_failures"].dump();
  // The informational targets: devpipe's p50 over the twin's, per phase.
  expect_twin_targets(r.report, "vlm", {"vision", "prefill"});
  EXPECT_NE(r.log.find("vlm: Pixtral-shaped LLaVA"), std::string::npos) << r.log;
  std::ifstream svg(t.str("latency.svg"));
  std::stringstream ss;
  ss << svg.rdbuf();
  EXPECT_NE(ss.str().find("vlm_decode_b1 pytorch_mkldnn"), std::string::npos);
}

// ---- the dit workload, end to end through `devpipe bench` on the tiny DiT ----------------------

// dit_peers.py write-model --small: 2 heads x 16, 2 layers, latents 4 x 8 x 8, 10 classes; batch 2
// (labels 207 and 360 modulo 10) at guidance 4. 2 timed runs per phase (2 rounds of 1), 3 DDIM
// steps: leading spacing over 1000 train steps, 1000 // 3 = 333 apart.
constexpr long long kDitSteps = 3, kDitLatentElements = 2 * 4 * 8 * 8;

TEST(BenchDit, SmallModelReportsBothPhasesChecksTheTwinAndTheRatiosAreTheP50s) {
  testing::TempDir t;
  const BenchRun r = run_bench(t, "--workload dit --dit-small --iters 2 --warmup 1 --rounds 2 --dit-steps " +
                                      std::to_string(kDitSteps) + " --modes pipeline,pytorch");
  ASSERT_EQ(r.code, 0) << r.log;
  const nlohmann::json& dit = r.report["workloads"]["dit"];
  const nlohmann::json& c = dit["config"];
  EXPECT_EQ(c["batch"].get<int>(), 2);
  EXPECT_EQ(c["transformer_batch"].get<int>(), 4);
  EXPECT_EQ(c["guidance_scale"].get<double>(), 4.0);
  EXPECT_EQ(c["class_labels"], nlohmann::json::array({7, 0}));
  EXPECT_EQ(c["transformer"]["tokens"].get<int>(), 16);
  EXPECT_EQ(c["transformer"]["out_channels"].get<int>(), 8);  // learned sigma
  EXPECT_EQ(c["steps"].get<int>(), kDitSteps);
  EXPECT_EQ(c["timesteps"], nlohmann::json::array({666, 333, 0}));
  EXPECT_EQ(c["step_timestep"].get<int>(), 666);
  EXPECT_EQ(c["iterations"].get<int>(), 2);
  EXPECT_EQ(c["rounds"].get<int>(), 2);
  for (const char* mode : {"devpipe", "pytorch_mkldnn"}) {
    ASSERT_TRUE(dit["modes"].contains(mode)) << dit["modes"].dump();
    const nlohmann::json& m = dit["modes"][mode];
    ASSERT_FALSE(m.contains("error")) << m.dump();
    // steps/s: a step sample is one step, a generate sample kDitSteps of them
    for (const auto& [ph, per_sample] : std::map<std::string, double>{{"step", 1.0}, {"generate", kDitSteps}}) {
      ASSERT_TRUE(m.contains(ph)) << mode << " has no " << ph << ": " << m.dump();
      EXPECT_EQ(m[ph]["samples"].get<int>(), 2) << mode << " " << ph;
      const double p50 = m[ph]["latency_ms"]["p50"].get<double>();
      EXPECT_GT(p50, 0) << mode << " " << ph;
      EXPECT_LE(m[ph]["latency_ms"]["min"].get<double>(), p50) << mode << " " << ph;
      EXPECT_LE(p50, m[ph]["latency_ms"]["p90"].get<double>()) << mode << " " << ph;
      EXPECT_GT(m[ph]["cpu_ms_per_sample"].get<double>(), 0) << mode << " " << ph;
      EXPECT_NEAR(m[ph]["steps_per_s"].get<double>(), 1000.0 * per_sample / p50,
                  1e-9 * m[ph]["steps_per_s"].get<double>())
          << mode << " " << ph;
    }
  }
  // The twin's step output and final latents were compared with devpipe's, element by element, and
  // matched within the stated tolerances.
  const nlohmann::json& twin = dit["modes"]["pytorch_mkldnn"];
  ASSERT_TRUE(twin.contains("output_check")) << twin.dump();
  EXPECT_TRUE(twin["output_check"]["ok"].get<bool>()) << twin["output_check"].dump();
  for (const char* what : {"step", "latents"}) {
    const nlohmann::json& ck = twin["output_check"][what];
    EXPECT_TRUE(ck["ok"].get<bool>()) << ck.dump();
    EXPECT_EQ(ck["elements"].get<long long>(), kDitLatentElements) << ck.dump();
    EXPECT_GT(ck["max_abs_diff"].get<double>(), 0) << "two float32 runtimes rounding alike everywhere: " << ck.dump();
    EXPECT_LE(ck["max_abs_diff"].get<double>(), 1e-3) << ck.dump();
  }
  EXPECT_TRUE(r.report["correctness_failures"].empty()) << r.report["correctness_failures"].dump();
  // The informational targets: devpipe's p50 over the twin's, per phase.
  expect_twin_targets(r.report, "dit", {"step", "generate"});
  EXPECT_NE(r.log.find("dit: DiTPipeline"), std::string::npos) << r.log;
  std::ifstream svg(t.str("latency.svg"));
  std::stringstream ss;
  ss << svg.rdbuf();
  EXPECT_NE(ss.str().find("dit_generate pytorch_mkldnn"), std::string::npos);
}

}  // namespace
}  // namespace devpipe
