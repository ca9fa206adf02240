// The timeline: a traced forward writes a valid Chrome trace (JSON object format) with a track
// per rank, a span per stage and per kernel, collectives and hand-offs marked.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "devpipe/timeline.h"
#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;
using nlohmann::json;

namespace {

struct Producer : nn::Module {
  nn::ColumnParallelLinear fc{8, 16, true, /*gather_output=*/true};
  Producer() { register_module("fc", fc); }
  Var forward(Var x) const { return F::relu(fc(x)); }
};

struct Consumer : nn::Module {
  nn::RowParallelLinear fc{16, 4, true, /*input_is_parallel=*/false};
  Consumer() { register_module("fc", fc); }
  Var forward(Var x) const { return fc(x); }
};

}  // namespace

TEST(Timeline, ChromeTraceOfATwoStagePipeline) {
  TempDir dir;
  InferenceConfig c(RuntimeConfig{.batch_size = 4, .tp_degree = 2});
  TestWrapper<Producer> a(c, {.pipeline_execution = true, .return_ranked_to_cpu = false, .tag = "producer"},
                          {{Tensor::zeros({4, 8})}});
  TestWrapper<Consumer> b(c, {.pipeline_execution = true, .return_ranked_to_cpu = true, .tag = "consumer"},
                          {{Tensor::zeros({4, 16})}});
  std::filesystem::create_directories(dir.str("ck"));
  safetensors::save(dir.str("ck/a.safetensors"), nn::random_state_dict(Producer(), 1));
  safetensors::save(dir.str("ck/b.safetensors"), nn::random_state_dict(Consumer(), 2));
  a.compile(dir.str("ck/a.safetensors"), dir.str("a"));
  b.compile(dir.str("ck/b.safetensors"), dir.str("b"));
  a.load(dir.str("a"));
  b.load(dir.str("b"));

  timeline::start(/*kernels=*/true);
  Tensor out = b.forward({a.forward({Tensor::randn({4, 8}, 3)})}).tensor();
  timeline::stop();
  EXPECT_EQ(out.shape(), (Shape{4, 4}));
  std::string path = dir.str("trace.json");
  timeline::write_chrome_trace(path);

  json j;
  std::ifstream(path) >> j;  // throws (fails the test) if not valid JSON
  ASSERT_TRUE(j.contains("traceEvents"));
  ASSERT_TRUE(j["traceEvents"].is_array());
  std::set<std::string> names, cats;
  std::set<int> tids;
  std::map<std::string, std::string> track_names;
  for (const auto& e : j["traceEvents"]) {
    std::string ph = e.at("ph");
    ASSERT_TRUE(ph == "X" || ph == "i" || ph == "M") << e.dump();
    ASSERT_TRUE(e.at("pid").is_number_integer());
    if (ph == "M") {
      if (e.at("name") == "thread_name") track_names[std::to_string(e.at("tid").get<int>())] = e["args"]["name"];
      continue;
    }
    ASSERT_TRUE(e.at("ts").is_number()) << e.dump();
    ASSERT_TRUE(e.at("tid").is_number_integer());
    if (ph == "X") {
      ASSERT_TRUE(e.at("dur").is_number());
      EXPECT_GE(e.at("dur").get<double>(), 0.0);
    }
    names.insert(e.at("name"));
    cats.insert(e.at("cat"));
    tids.insert(e.at("tid").get<int>());
  }
  EXPECT_EQ(track_names["1"], "rank 0");
  EXPECT_EQ(track_names["2"], "rank 1");
  EXPECT_TRUE(tids.count(1) && tids.count(2)) << "a track per rank";
  for (const char* n : {"producer", "consumer", "linear", "relu", "all_gather", "all_reduce"}) {
    EXPECT_TRUE(names.count(n)) << "missing span " << n;
  }
  for (const char* cat : {"stage", "kernel", "collective", "handoff", "host", "compute"}) {
    EXPECT_TRUE(cats.count(cat)) << "missing category " << cat;
  }
}

TEST(Timeline, NothingRecordedWhenOff) {
  timeline::stop();
  timeline::clear();
  timeline::record("x", "stage", 1, 0, 1);
  EXPECT_TRUE(timeline::events().empty());
}
