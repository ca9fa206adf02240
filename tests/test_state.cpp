// State on the device (a buffer per rank that lives across forward() calls, shared by name
// between the stages of an application) and buckets over named dims.
//
// The expected values are built independently in the test: a state is a plain table whose
// rows are written at given positions (a position outside the table writes nothing), and the
// projection stage is x @ W^T, computed here with loops in double.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "devpipe/devpipe.h"
#include "devpipe/functional.h"
#include "compiler/memory_plan.h"
#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

constexpr std::int64_t kRows = 4;  // state rows (sequences)
constexpr std::int64_t kSlots = 6;  // positions per row
constexpr std::int64_t kWidth = 3;

/// Writes values [b, T, 3] into the state "table" [4, 6, 3] at positions [b, T]; returns the
/// first b rows of the updated state (a copy made on the device).
struct Writer : nn::Module {
  Writer() = default;
  explicit Writer(const InferenceConfig& c) : name_(c.has("state_name") ? c.get_string("state_name") : "table") {
    rows_ = c.has("state_rows") ? c.get_int("state_rows") : kRows;
  }
  Var forward(Var values, Var positions) const {
    Var table = F::state(name_, {rows_, kSlots, kWidth}, values.dtype());
    Var updated = F::state_write(table, values, positions, 1);
    return F::slice(updated, 0, 0, values.dim(0));
  }
  std::string name_ = "table";
  std::int64_t rows_ = kRows;
};

/// Reads the first b rows of the state "table" (x only gives the batch).
struct Reader : nn::Module {
  Var forward(Var x) const {
    Var table = F::state("table", {kRows, kSlots, kWidth}, DType::Float32);
    return F::slice(table, 0, 0, x.dim(0));
  }
};

InferenceConfig config(int tp, std::vector<std::int64_t> buckets = {2, kRows}) {
  InferenceConfig c(RuntimeConfig{.batch_size = kRows, .dtype = DType::Float32, .tp_degree = tp});
  c.mutable_runtime_config().buckets = std::move(buckets);
  return c;
}

std::string empty_checkpoint(const TempDir& dir) {
  std::string path = dir.str("empty.safetensors");
  safetensors::save(path, {}, {});
  return path;
}

template <class M>
std::shared_ptr<ModelWrapper> stage(const InferenceConfig& c, const std::string& tag, std::vector<Tensor> example) {
  return std::make_shared<TestWrapper<M>>(c, WrapperOptions{.tag = tag}, std::vector<std::vector<Tensor>>{example});
}

std::shared_ptr<ModelWrapper> writer(const InferenceConfig& c, const std::string& tag = "writer") {
  return stage<Writer>(c, tag, {Tensor::zeros({kRows, 2, kWidth}), Tensor::zeros({kRows, 2}, DType::Int64)});
}
std::shared_ptr<ModelWrapper> reader(const InferenceConfig& c) {
  return stage<Reader>(c, "reader", {Tensor::zeros({kRows, 1})});
}

/// The host model of the state: table[i][p] = values[i][t] where 0 <= p < kSlots.
void write_expected(std::vector<float>& table, const Tensor& values, const std::vector<std::int64_t>& pos) {
  const auto v = values.to_float_vector();
  const std::int64_t b = values.dim(0), T = values.dim(1);
  for (std::int64_t i = 0; i < b; ++i) {
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t p = pos[static_cast<std::size_t>(i * T + t)];
      if (p < 0 || p >= kSlots) continue;
      for (std::int64_t k = 0; k < kWidth; ++k) {
        table[static_cast<std::size_t>((i * kSlots + p) * kWidth + k)] = v[static_cast<std::size_t>((i * T + t) * kWidth + k)];
      }
    }
  }
}

Tensor table_tensor(const std::vector<float>& table) { return Tensor::from_vector(table, {kRows, kSlots, kWidth}); }

}  // namespace

class StateTp : public ::testing::TestWithParam<int> {};

TEST_P(StateTp, PersistsAcrossForwardsAndIsSharedByTwoStages) {
  const int tp = GetParam();
  TempDir dir;
  InferenceConfig c = config(tp);
  ApplicationBase app(empty_checkpoint(dir), c);
  app.models = {writer(c), reader(c)};
  app.compile(dir.str("art"));
  app.load(dir.str("art"));

  auto entries = app.state_store()->entries();
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0].name, "table");
  EXPECT_EQ(entries[0].shape, (Shape{kRows, kSlots, kWidth}));
  EXPECT_EQ(entries[0].tp_degree, tp);
  EXPECT_EQ(app.state_store()->bytes_per_rank(), static_cast<std::size_t>(kRows * kSlots * kWidth * 4));

  std::vector<float> table(static_cast<std::size_t>(kRows * kSlots * kWidth), 0.0f);
  // Warm-up wrote nothing: the state starts at zero.
  EXPECT_TRUE(tensors_close(app.models[1]->forward({Tensor::zeros({kRows, 1})}).tensor(), table_tensor(table), 0, 0));

  // Step 1: rows 0..3 at two positions each; -1 (padding) and 6 (past the end) write nothing.
  Tensor v1 = Tensor::randn({kRows, 2, kWidth}, 1);
  std::vector<std::int64_t> p1{0, 1, 2, 3, -1, 4, 5, 6};
  Tensor out1 = app.models[0]->forward({v1, Tensor::from_vector_i64(p1, {kRows, 2})}).tensor();
  write_expected(table, v1, p1);
  EXPECT_TRUE(tensors_close(out1, table_tensor(table), 0, 0));

  // Step 2 adds to what step 1 left (persistence), through a batch-2 call (bucket 2): it
  // writes rows 0 and 1 of the 4-row state only.
  Tensor v2 = Tensor::randn({2, 2, kWidth}, 2);
  std::vector<std::int64_t> p2{2, 5, 0, -1};
  Tensor out2 = app.models[0]->forward({v2, Tensor::from_vector_i64(p2, {2, 2})}).tensor();
  write_expected(table, v2, p2);
  EXPECT_EQ(out2.shape(), (Shape{2, kSlots, kWidth}));
  EXPECT_TRUE(tensors_close(out2, table_tensor(table).narrow_rows(0, 2), 0, 0));

  // The other stage sees the same buffers.
  Tensor seen = app.models[1]->forward({Tensor::zeros({kRows, 1})}).tensor();
  EXPECT_TRUE(tensors_close(seen, table_tensor(table), 0, 0));
}

INSTANTIATE_TEST_SUITE_P(Tp, StateTp, ::testing::Values(1, 2));

TEST(State, WarmUpOfALaterStageLeavesTheStateUntouched) {
  // A writer whose zero-input warm-up, on the real state, would write zeros at position 0 of
  // every row (positions 0 are in range). Loading it after the state holds values must not
  // change them.
  TempDir dir;
  InferenceConfig c = config(1);
  ApplicationBase app(empty_checkpoint(dir), c);
  auto w = writer(c);
  auto r = reader(c);
  auto late = writer(c, "late_writer");
  app.models = {w, r, late};
  app.compile(dir.str("art"));
  w->set_state_store(app.state_store());
  r->set_state_store(app.state_store());
  w->load(dir.str("art/writer"));
  r->load(dir.str("art/reader"));

  Tensor v = Tensor::randn({kRows, 2, kWidth}, 3);
  std::vector<std::int64_t> p{0, 1, 0, 1, 0, 1, 0, 1};
  w->forward({v, Tensor::from_vector_i64(p, {kRows, 2})});
  std::vector<float> table(static_cast<std::size_t>(kRows * kSlots * kWidth), 0.0f);
  write_expected(table, v, p);

  late->set_state_store(app.state_store());
  late->load(dir.str("art/late_writer"));
  EXPECT_TRUE(tensors_close(r->forward({Tensor::zeros({kRows, 1})}).tensor(), table_tensor(table), 0, 0));
}

TEST(State, ManifestStateMismatchIsRefused) {
  TempDir dir;
  InferenceConfig c = config(1);
  auto w = writer(c);
  w->compile(empty_checkpoint(dir), dir.str("art"));
  std::string path = dir.str("art/manifest.json");
  nlohmann::json j;
  {
    std::ifstream f(path);
    f >> j;
  }
  ASSERT_EQ(j["states"].size(), 1u);
  EXPECT_EQ(j["states"][0]["name"], "table");
  j["states"][0]["shape"] = {kRows, kSlots + 1, kWidth};
  {
    std::ofstream f(path);
    f << j.dump();
  }
  try {
    writer(c)->load(dir.str("art"));
    FAIL() << "a manifest whose state spec differs from its graphs loaded";
  } catch (const FormatError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("'table'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[4, 7, 3]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[4, 6, 3]"), std::string::npos) << msg;
  }
}

TEST(State, StagesDeclaringOneStateDifferentlyAreRefused) {
  TempDir dir;
  InferenceConfig c = config(1);
  InferenceConfig c2 = config(1, {2});
  c2.set("state_rows", std::int64_t{2});
  c2.mutable_runtime_config().batch_size = 2;
  auto w = writer(c);
  auto w2 = stage<Writer>(c2, "small_writer", {Tensor::zeros({2, 2, kWidth}), Tensor::zeros({2, 2}, DType::Int64)});
  std::string ckpt = empty_checkpoint(dir);
  w->compile(ckpt, dir.str("a"));
  w2->compile(ckpt, dir.str("b"));
  auto store = std::make_shared<StateStore>();
  w->set_state_store(store);
  w2->set_state_store(store);
  w->load(dir.str("a"));
  try {
    w2->load(dir.str("b"));
    FAIL() << "a second stage declaring 'table' with another shape loaded";
  } catch (const ArtifactMismatch& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("'table'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[2, 6, 3]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[4, 6, 3]"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'writer'"), std::string::npos) << msg;
  }
}

TEST(State, StateWithABatchBeyondItsBucketsIsRefused) {
  TempDir dir;
  InferenceConfig c = config(1);
  auto w = writer(c);
  w->compile(empty_checkpoint(dir), dir.str("art"));
  w->load(dir.str("art"));
  try {
    w->forward({Tensor::zeros({kRows + 1, 2, kWidth}), Tensor::zeros({kRows + 1, 2}, DType::Int64)});
    FAIL() << "a stage with state ran a batch in chunks";
  } catch (const InvalidArgument& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("batch 5"), std::string::npos) << msg;
    EXPECT_NE(msg.find("'table'"), std::string::npos) << msg;
  }
}

TEST(State, PlannerRefusesWritingANonStateAndReadingAStaleState) {
  TraceOptions opts;
  Graph not_state = trace_function(
      opts, {{"x", {Shape{2, 4, 3}, DType::Float32}}, {"v", {Shape{2, 1, 3}, DType::Float32}}, {"p", {Shape{2, 1}, DType::Int64}}},
      [](const std::vector<Var>& in) { return std::vector<Var>{F::state_write(in[0], in[1], in[2], 1)}; });
  EXPECT_THROW(plan_views(not_state, "test"), FormatError);

  Graph stale;
  {
    Tracer tr(opts);
    Var v = tr.input("v", {2, 1, 3}, DType::Float32);
    Var p = tr.input("p", {2, 1}, DType::Int64);
    Var s = tr.state("s", {2, 4, 3}, DType::Float32);
    Var updated = F::state_write(s, v, p, 1);
    Var old_read = F::slice(s, 1, 0, 2);  // reads the state after the write updated it
    stale = tr.finish({updated, old_read});
  }
  try {
    plan_views(stale, "test");
    FAIL() << "a read of a state older than its update was planned";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("state 's'"), std::string::npos) << e.what();
  }
  // The update's result aliases the state's buffer.
  Graph fine;
  {
    Tracer tr(opts);
    Var v = tr.input("v", {2, 1, 3}, DType::Float32);
    Var p = tr.input("p", {2, 1}, DType::Int64);
    Var s = tr.state("s", {2, 4, 3}, DType::Float32);
    Var before = F::slice(s, 1, 0, 2);  // before the write: fine
    Var updated = F::state_write(s, v, p, 1);
    fine = tr.finish({before, F::slice(updated, 1, 0, 2)});
  }
  MemoryPlan plan = plan_views(fine, "test");
  const int updated_id = fine.nodes[1].outputs[0];
  EXPECT_EQ(plan.root[static_cast<std::size_t>(updated_id)], fine.inputs[2].value);
  EXPECT_EQ(plan.kind[static_cast<std::size_t>(fine.inputs[2].value)], MemoryPlan::Kind::State);
}

// ------------------------------------------------------------------------- named buckets

namespace {

constexpr std::int64_t kIn = 4, kOut = 3;

/// y = x @ W^T over [batch, seq, 4].
struct Proj : nn::Module {
  nn::Linear& fc;
  Proj() : fc(register_module("fc", std::make_unique<nn::Linear>(kIn, kOut, false))) {}
  Var forward(Var x) const { return fc(x); }
};

class SeqWrapper : public ModelWrapper {
 public:
  SeqWrapper(const InferenceConfig& c, WrapperOptions o) : ModelWrapper(c, model_cls<Proj>(), std::move(o)) {}
  std::vector<std::vector<Tensor>> input_generator() const override { return {{Tensor::zeros({1, 1, kIn})}}; }
  std::vector<std::vector<std::string>> input_dims() const override { return {{"batch", "seq", ""}}; }
  std::vector<std::vector<std::string>> output_dims() const override { return {{"batch", "seq", ""}}; }
};

Tensor project(const Tensor& x, const Tensor& w) {
  const auto xv = x.to_float_vector(), wv = w.to_float_vector();
  const std::int64_t n = x.dim(0) * x.dim(1);
  std::vector<float> y(static_cast<std::size_t>(n * kOut));
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t o = 0; o < kOut; ++o) {
      double s = 0;
      for (std::int64_t k = 0; k < kIn; ++k) s += double(xv[static_cast<std::size_t>(i * kIn + k)]) * wv[static_cast<std::size_t>(o * kIn + k)];
      y[static_cast<std::size_t>(i * kOut + o)] = static_cast<float>(s);
    }
  }
  return Tensor::from_vector(y, {x.dim(0), x.dim(1), kOut});
}

struct SeqSetup {
  TempDir dir;
  Tensor w = Tensor::randn({kOut, kIn}, 7);
  InferenceConfig config(int tp) const {
    InferenceConfig c(RuntimeConfig{.batch_size = 4, .dtype = DType::Float32, .tp_degree = tp});
    c.mutable_runtime_config().buckets = {2, 4};
    c.mutable_runtime_config().dim_buckets = {{"seq", {4, 8}}};
    return c;
  }
  std::unique_ptr<SeqWrapper> make(int tp, WrapperOptions o) {
    std::string ckpt = dir.str("proj.safetensors");
    safetensors::save(ckpt, {{"fc.weight", w}}, {});
    auto s = std::make_unique<SeqWrapper>(config(tp), std::move(o));
    std::string art = dir.str(o.tag + std::to_string(tp));
    s->compile(ckpt, art);
    s->load(art);
    return s;
  }
};

}  // namespace

TEST(NamedBuckets, PadsAlongSeqAndCutsTheOutputBack) {
  SeqSetup setup;
  auto s = setup.make(1, {.tag = "proj"});
  EXPECT_EQ(s->loaded_buckets(), (std::vector<std::int64_t>{2, 2, 4, 4}));  // batch x seq {4, 8}
  Tensor x = Tensor::randn({3, 5, kIn}, 11);
  reset_transfer_stats();
  Tensor y = s->forward({x}).tensor();
  EXPECT_EQ(y.shape(), (Shape{3, 5, kOut}));
  EXPECT_TRUE(tensors_close(y, project(x, setup.w), 1e-5, 1e-6));
  // Only the real rows and positions moved: 3 x 5 x 4 floats in, 3 x 5 x 3 out.
  EXPECT_EQ(transfer_stats().host_to_device_bytes, 3u * 5 * kIn * 4);
  EXPECT_EQ(transfer_stats().device_to_host_bytes, 3u * 5 * kOut * 4);

  // An exact fit is read in place on the cpu backend.
  Tensor x4 = Tensor::randn({4, 8, kIn}, 12);
  reset_transfer_stats();
  EXPECT_TRUE(tensors_close(s->forward({x4}).tensor(), project(x4, setup.w), 1e-5, 1e-6));
  EXPECT_EQ(transfer_stats().host_to_device_bytes, 0u);
  EXPECT_EQ(transfer_stats().host_inputs_in_place, 1u);

  // Batch beyond the largest batch bucket: chunks of 4 and 2, seq still padded to 8.
  Tensor x6 = Tensor::randn({6, 7, kIn}, 13);
  Tensor y6 = s->forward({x6}).tensor();
  EXPECT_EQ(y6.shape(), (Shape{6, 7, kOut}));
  EXPECT_TRUE(tensors_close(y6, project(x6, setup.w), 1e-5, 1e-6));
}

TEST(NamedBuckets, RankedOutputsKeepTheBucketAndItsZeroPadding) {
  SeqSetup setup;
  auto s = setup.make(2, {.pipeline_execution = true, .return_ranked_to_cpu = false, .tag = "proj"});
  Tensor x = Tensor::randn({2, 3, kIn}, 21);
  Output out = s->forward({x});
  ASSERT_TRUE(out.is_ranked());
  Tensor y = out.ranked().to_host()[0];
  ASSERT_EQ(y.shape(), (Shape{2, 4, kOut}));  // seq padded to its bucket, 4
  Tensor want = project(x, setup.w);
  const auto yv = y.to_float_vector(), wv = want.to_float_vector();
  for (std::int64_t b = 0; b < 2; ++b) {
    for (std::int64_t t = 0; t < 4; ++t) {
      for (std::int64_t o = 0; o < kOut; ++o) {
        float got = yv[static_cast<std::size_t>((b * 4 + t) * kOut + o)];
        float e = t < 3 ? wv[static_cast<std::size_t>((b * 3 + t) * kOut + o)] : 0.0f;
        EXPECT_NEAR(got, e, 1e-5) << "b " << b << " t " << t << " o " << o;
      }
    }
  }
}

TEST(NamedBuckets, TooLongForEveryBucketNamesTheDimAndSizes) {
  SeqSetup setup;
  auto s = setup.make(1, {.tag = "proj"});
  try {
    s->forward({Tensor::zeros({1, 9, kIn})});
    FAIL() << "seq 9 ran with buckets up to 8";
  } catch (const ShapeError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("seq 9 exceeds the largest compiled seq bucket 8"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[proj]"), std::string::npos) << msg;
  }
}

TEST(NamedBuckets, UnknownDimNameIsAConfigError) {
  SeqSetup setup;
  InferenceConfig c = setup.config(1);
  c.mutable_runtime_config().dim_buckets = {{"tokens", {4}}};
  SeqWrapper s(c, {.tag = "proj"});
  std::string ckpt = setup.dir.str("proj.safetensors");
  safetensors::save(ckpt, {{"fc.weight", setup.w}}, {});
  try {
    s.compile(ckpt, setup.dir.str("bad"));
    FAIL() << "compiled a dim with no buckets";
  } catch (const ConfigError& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("'seq'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("tokens"), std::string::npos) << msg;
  }
}
