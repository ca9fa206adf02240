// Process-wide settings a user of the library sees: devpipe::version(), the log levels of
// DEVPIPE_LOG_LEVEL, and the kernels' thread count (RuntimeConfig::num_threads, else
// OMP_NUM_THREADS, else the cores), checked on the rank threads that run the kernels.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <thread>

#include "backends/cpu/executor.h"
#include "compiler/artifact.h"
#include "core/log.h"
#include "pipeline_util.h"
#include "runtime/rank_group.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

/// Sets (or with nullopt unsets) an environment variable for a scope, restoring it after.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value) {
      setenv(name, value->c_str(), 1);
    } else {
      unsetenv(name);
    }
    log::reload_level();
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
    log::reload_level();
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

/// A compiled and loaded tensor-parallel MLP (tests/pipeline_util.h) at batch `batch`.
std::unique_ptr<TestWrapper<ParallelMlp>> load_mlp(const TempDir& dir, RuntimeConfig rc,
                                                   const std::string& tag, std::int64_t batch = 2) {
  rc.batch_size = batch;
  auto w = std::make_unique<TestWrapper<ParallelMlp>>(
      InferenceConfig(rc), WrapperOptions{.tag = tag},
      std::vector<std::vector<Tensor>>{{Tensor::zeros({batch, 16})}});
  safetensors::save(dir.str("mlp.safetensors"), nn::random_state_dict(ParallelMlp(), 5));
  w->compile(dir.str("mlp.safetensors"), dir.str(tag));
  w->load(dir.str(tag));
  return w;
}

/// The OpenMP thread count each rank thread of `tp` ranks ran its kernels with, read on the
/// rank threads themselves after the stage ran there (load() warms every bucket up). The MLP
/// must be loaded at a batch with enough work that no rank's task runs on the calling thread
/// (a light stage's first rank does): kHeavyBatch.
constexpr std::int64_t kHeavyBatch = 8192;  // per rank at tp 2: 8 MFLOP, 8 times kLightFlops
std::vector<int> rank_omp_threads(int tp) {
  auto group = RankGroup::get(DeviceKind::Cpu, tp);
  std::vector<int> seen(static_cast<std::size_t>(tp), -1);
  group->submit(
      [](void* ctx, int rank) {
        (*static_cast<std::vector<int>*>(ctx))[rank] = cpu::last_run_threads();
      },
      &seen);
  for (int r = 0; r < tp; ++r) group->stream(r).synchronize();
  return seen;
}

int cores() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

}  // namespace

// ------------------------------------------------------------------------------- version

TEST(Version, IsTheProjectVersion) {
  // devpipe.h includes devpipe/version.h.
  std::string v = devpipe::version();
  EXPECT_EQ(v, DEVPIPE_VERSION_STRING);
  EXPECT_EQ(v, std::to_string(DEVPIPE_VERSION_MAJOR) + "." + std::to_string(DEVPIPE_VERSION_MINOR) +
                   "." + std::to_string(DEVPIPE_VERSION_PATCH));
  // The version artifacts record is the same.
  EXPECT_EQ(v, devpipe_version());
}

// ---------------------------------------------------------------------------------- logs

TEST(Log, DefaultIsWarnSoCompileAndLoadAreQuiet) {
  ScopedEnv env("DEVPIPE_LOG_LEVEL", std::nullopt);
  EXPECT_EQ(log::level(), log::Level::Warn);
  TempDir dir;
  ::testing::internal::CaptureStderr();
  auto w = load_mlp(dir, {.tp_degree = 2}, "quiet");
  log::warn("a warning");
  log::info("an info line");
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(err, "devpipe warning: a warning\n");
}

TEST(Log, InfoSaysWhatCompileAndLoadDid) {
  ScopedEnv env("DEVPIPE_LOG_LEVEL", "info");
  TempDir dir;
  ::testing::internal::CaptureStderr();
  auto w = load_mlp(dir, {.tp_degree = 2, .num_threads = 2}, "logged");
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("devpipe info: [logged] compiled 1 bucket(s) [2], tp_degree 2, float32, 5 "
                     "parameter(s) from '" +
                     dir.str("mlp.safetensors") + "' into '" + dir.str("logged") + "' in "),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("devpipe info: [logged] loaded '" + dir.str("logged") +
                     "': bucket(s) [2], tp_degree 2 on cpu, 1 thread(s) per rank, in "),
            std::string::npos)
      << err;
  EXPECT_EQ(err.find("devpipe debug:"), std::string::npos) << err;
}

TEST(Log, DebugAddsEachStep) {
  ScopedEnv env("DEVPIPE_LOG_LEVEL", "DEBUG");  // case-insensitive
  TempDir dir;
  ::testing::internal::CaptureStderr();
  auto w = load_mlp(dir, {.tp_degree = 2}, "steps");
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("devpipe debug: [steps] compile: traced bucket 2"), std::string::npos) << err;
  EXPECT_NE(err.find("devpipe debug: [steps] load: verified weights of rank 1"), std::string::npos)
      << err;
  EXPECT_NE(err.find("devpipe info: [steps] loaded"), std::string::npos) << err;
}

TEST(Log, ErrorLevelHidesWarnings) {
  ScopedEnv env("DEVPIPE_LOG_LEVEL", "error");
  ::testing::internal::CaptureStderr();
  log::warn("hidden");
  log::error("shown");
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "devpipe error: shown\n");
}

TEST(Log, UnknownLevelWarnsAndKeepsWarn) {
  ::testing::internal::CaptureStderr();
  {
    ScopedEnv env("DEVPIPE_LOG_LEVEL", "loud");
    EXPECT_EQ(log::level(), log::Level::Warn);
  }
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("devpipe warning: DEVPIPE_LOG_LEVEL='loud' is not one of error, warn, info, "
                     "debug; using warn"),
            std::string::npos)
      << err;
}

TEST(Log, IgnoredAndDroppedCheckpointKeysAreInfoLines) {
  ScopedEnv env("DEVPIPE_LOG_LEVEL", "info");
  TempDir dir;
  auto sd = nn::random_state_dict(ParallelMlp(), 5);
  sd.emplace_back("up.inv_freq", Tensor::ones({4}));
  sd.emplace_back("optimizer.step", Tensor::ones({1}));
  safetensors::save(dir.str("ckpt.safetensors"), sd);
  TestWrapper<ParallelMlp> w(
      InferenceConfig(RuntimeConfig{.batch_size = 2}),
      {.tag = "keys",
       .ignore_checkpoint_keys = {"inv_freq$"},
       .checkpoint_key_map =
           [](const std::string& k) { return k.rfind("optimizer.", 0) == 0 ? "" : k; }},
      {{Tensor::zeros({2, 16})}});
  ::testing::internal::CaptureStderr();
  w.compile(dir.str("ckpt.safetensors"), dir.str("art"));
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("devpipe info: [keys] checkpoint_key_map dropped 1 tensor(s): optimizer.step"),
            std::string::npos)
      << err;
  EXPECT_NE(
      err.find(
          "devpipe info: [keys] ignored 1 unused tensor(s) (ignore_checkpoint_keys): up.inv_freq"),
      std::string::npos)
      << err;
}

// ------------------------------------------------------------------------------ threads

TEST(Threads, NumThreadsIsSplitOverTheRanks) {
  TempDir dir;
  auto w = load_mlp(dir, {.tp_degree = 2, .num_threads = 6}, "six", kHeavyBatch);
  EXPECT_EQ(rank_omp_threads(2), (std::vector<int>{3, 3}));
}

TEST(Threads, OmpNumThreadsIsHonouredByDefault) {
  ScopedEnv env("OMP_NUM_THREADS", "10");
  TempDir dir;
  auto w = load_mlp(dir, {.tp_degree = 2}, "omp", kHeavyBatch);
  EXPECT_EQ(rank_omp_threads(2), (std::vector<int>{5, 5}));
}

TEST(Threads, NumThreadsWinsOverOmpNumThreads) {
  ScopedEnv env("OMP_NUM_THREADS", "10");
  TempDir dir;
  auto w = load_mlp(dir, {.tp_degree = 1, .num_threads = 3}, "three", kHeavyBatch);
  EXPECT_EQ(rank_omp_threads(1), (std::vector<int>{3}));
}

TEST(Threads, DefaultIsTheCores) {
  ScopedEnv env("OMP_NUM_THREADS", std::nullopt);
  TempDir dir;
  auto w = load_mlp(dir, {.tp_degree = 2}, "cores", kHeavyBatch);
  int each = std::max(1, cores() / 2);
  EXPECT_EQ(rank_omp_threads(2), (std::vector<int>{each, each}));
}

TEST(Threads, OmpNumThreadsListAndBadValues) {
  {
    ScopedEnv env("OMP_NUM_THREADS", "8,2");  // one count per nesting level: the first applies
    EXPECT_EQ(threads_per_rank(RuntimeConfig{.tp_degree = 4}), 2);
  }
  ScopedEnv env("OMP_NUM_THREADS", "lots");
  ::testing::internal::CaptureStderr();
  EXPECT_EQ(default_num_threads(), cores());
  std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_NE(err.find("devpipe warning: OMP_NUM_THREADS='lots' is not a thread count"),
            std::string::npos)
      << err;
}

TEST(Threads, NumThreadsIsSavedInTheConfig) {
  InferenceConfig c(RuntimeConfig{.batch_size = 4, .num_threads = 3});
  std::string json = c.to_json();
  EXPECT_NE(json.find("\"num_threads\": 3"), std::string::npos) << json;
  EXPECT_EQ(InferenceConfig::from_json(json).runtime_config().num_threads, 3);
  EXPECT_EQ(InferenceConfig::from_json(json), c);
  // A config written before the field existed reads as the default.
  InferenceConfig old = InferenceConfig::from_json(
      R"({"runtime": {"batch_size": 4, "dtype": "float32", "tp_degree": 1}, "attributes": {}})");
  EXPECT_EQ(old.runtime_config().num_threads, 0);
}

TEST(Threads, BadNumThreadsIsAConfigError) {
  try {
    InferenceConfig(RuntimeConfig{.num_threads = -1});
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("num_threads must be in [0, 4096]"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("got -1"), std::string::npos) << e.what();
  }
  for (const char* bad : {"-1", "2.5", "1e300", "\"4\"", "5000", "18446744073709551615"}) {
    std::string text =
        std::string(
            R"({"runtime": {"batch_size": 4, "dtype": "float32", "tp_degree": 1, "num_threads": )") +
        bad + R"(}, "attributes": {}})";
    try {
      InferenceConfig::from_json(text);
      ADD_FAILURE() << "accepted num_threads " << bad;
    } catch (const ConfigError& e) {
      // The value as nlohmann writes it back (1e300 reads back as 1e+300).
      EXPECT_NE(std::string(e.what()).find("runtime.num_threads is "), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(", expected an integer in [0, 4096]"), std::string::npos)
          << e.what();
    }
  }
}

// Found by fuzz_config: "attributes": [] was read as no attributes (and written back as {}),
// and dim_buckets went through nlohmann's converting get<int64_t> (4.9 read as 4).
TEST(ConfigJson, MistypedContainersAreConfigErrors) {
  const std::string runtime = R"("runtime": {"batch_size": 1, "dtype": "float32", "tp_degree": 1)";
  struct Case {
    std::string text, expect;
  };
  const std::vector<Case> cases = {
      {"{" + runtime + "}, \"attributes\": []}", "'attributes' must be an object of name: value, got []"},
      {"{" + runtime + "}, \"attributes\": 3}", "'attributes' must be an object of name: value, got 3"},
      {R"({"runtime": [1], "attributes": {}})", "'runtime' must be an object, got [1]"},
      {"[1, 2]", "config JSON must be an object with 'runtime' and 'attributes', got [1,2]"},
      {"{" + runtime + R"(, "dim_buckets": {"seq": [16, 4.9]}}, "attributes": {}})",
       "runtime.dim_buckets.seq[1] is 4.9, expected an integer >= 1"},
      {"{" + runtime + R"(, "dim_buckets": {"seq": 16}}, "attributes": {}})",
       "runtime.dim_buckets.seq is 16, expected an array of integers"},
      {"{" + runtime + R"(, "dim_buckets": [16]}, "attributes": {}})",
       "runtime.dim_buckets must be an object of name: [sizes], got [16]"},
  };
  for (const Case& c : cases) {
    try {
      InferenceConfig::from_json(c.text);
      ADD_FAILURE() << "accepted " << c.text;
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find(c.expect), std::string::npos) << e.what();
    }
  }
  // Well-typed dim_buckets still read and round-trip.
  InferenceConfig ok = InferenceConfig::from_json("{" + runtime + R"(, "dim_buckets": {"seq": [16, 64]}}, "attributes": {}})");
  EXPECT_EQ(ok.runtime_config().dim_buckets.at("seq"), (std::vector<std::int64_t>{16, 64}));
  EXPECT_EQ(InferenceConfig::from_json(ok.to_json()), ok);
}
