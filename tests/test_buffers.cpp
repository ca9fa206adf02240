// Module buffers (nn::Module::register_buffer): non-persistent buffers are graph constants
// baked into the artifact (never checkpoint keys), persistent ones are checkpoint keys.
// Compiled and loaded end to end on the cpu backend and compared with the same computation
// written as plain loops over the checkpoint's tensors.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

constexpr std::int64_t kBatch = 3, kDim = 6;

const std::vector<float> kScale{0.5f, -1.f, 2.f, 0.25f, 3.f, -0.125f};
const std::vector<std::int64_t> kPerm{5, 0, 0, 3, 1, 2};  // a gather with a repeated row

/// y = index_select(fc(x) * scale + offset, 1, perm): scale (float) and perm (int64) are
/// non-persistent buffers, offset is a persistent one (a checkpoint key).
struct BufferModel : nn::Module {
  nn::Linear& fc;
  explicit BufferModel(const InferenceConfig&)
      : fc(register_module("fc", std::make_unique<nn::Linear>(kDim, kDim))) {
    register_buffer("scale", Tensor::from_vector(kScale, {kDim}));
    register_buffer("perm", Tensor::from_vector_i64(kPerm, {kDim}));
    register_buffer("offset", Tensor::zeros({kDim}), /*persistent=*/true);
  }
  std::string type_name() const override { return "BufferModel"; }
  Var forward(Var x) const {
    Scope s(*this);
    Var h = fc(x) * buffer("scale") + buffer("offset");
    return F::index_select(h, 1, buffer("perm"));
  }
};

InferenceConfig config(int tp, DType dtype = DType::Float32) {
  return InferenceConfig(RuntimeConfig{.batch_size = kBatch, .dtype = dtype, .tp_degree = tp}, {});
}

std::unique_ptr<TestWrapper<BufferModel>> wrapper(const InferenceConfig& c) {
  return std::make_unique<TestWrapper<BufferModel>>(
      c, WrapperOptions{.pipeline_execution = false, .return_ranked_to_cpu = true, .tag = "buffers"},
      std::vector<std::vector<Tensor>>{{Tensor::zeros({kBatch, kDim})}});
}

/// The checkpoint: fc.weight, fc.bias and offset (random), nothing else unless `extra`.
std::map<std::string, Tensor> write_ckpt(const TempDir& dir,
                                         std::vector<std::pair<std::string, Tensor>> extra = {},
                                         bool drop_offset = false) {
  std::vector<std::pair<std::string, Tensor>> sd{
      {"fc.weight", Tensor::uniform({kDim, kDim}, -0.4, 0.4, 5)},
      {"fc.bias", Tensor::randn({kDim}, 6)},
      {"offset", Tensor::randn({kDim}, 7)}};
  if (drop_offset) sd.pop_back();
  for (auto& kv : extra) sd.push_back(kv);
  std::filesystem::create_directories(dir.str("ckpt"));
  safetensors::save(dir.str("ckpt/model.safetensors"), sd);
  return {sd.begin(), sd.end()};
}

/// The model by hand, in double.
Tensor expected(const Tensor& x, const std::map<std::string, Tensor>& sd) {
  const auto xv = x.to_float_vector(), w = sd.at("fc.weight").to_float_vector(),
             b = sd.at("fc.bias").to_float_vector(), off = sd.at("offset").to_float_vector();
  std::vector<float> y(static_cast<std::size_t>(kBatch * kDim));
  for (std::int64_t r = 0; r < kBatch; ++r) {
    for (std::int64_t j = 0; j < kDim; ++j) {
      const auto src = static_cast<std::size_t>(kPerm[static_cast<std::size_t>(j)]);
      double h = b[src];
      for (std::int64_t k = 0; k < kDim; ++k) {
        h += static_cast<double>(xv[static_cast<std::size_t>(r * kDim + k)]) * w[src * kDim + static_cast<std::size_t>(k)];
      }
      y[static_cast<std::size_t>(r * kDim + j)] = static_cast<float>(h * kScale[src] + off[src]);
    }
  }
  return Tensor::from_vector(y, {kBatch, kDim});
}

}  // namespace

TEST(Buffers, NonPersistentAreConstantsPersistentComeFromTheCheckpoint) {
  for (int tp : {1, 2}) {
    SCOPED_TRACE("tp " + std::to_string(tp));
    TempDir dir;
    const auto sd = write_ckpt(dir);
    auto w = wrapper(config(tp));
    w->compile(dir.str("ckpt"), dir.str("art"));
    w->load(dir.str("art"));
    const Tensor x = Tensor::randn({kBatch, kDim}, 9);
    Output o = w->forward({x});
    EXPECT_TRUE(tensors_close(o.tensor(), expected(x, sd), 1e-5, 1e-5));

    // The manifest marks the two buffers constant; each rank's weight file holds their values.
    std::ifstream mf(dir.str("art/manifest.json"));
    const nlohmann::json manifest = nlohmann::json::parse(mf);
    std::set<std::string> constants;
    for (const auto& p : manifest.at("buckets").at(0).at("graph").at("params")) {
      if (p.value("constant", false)) constants.insert(p.at("key").get<std::string>());
    }
    EXPECT_EQ(constants, (std::set<std::string>{"perm", "scale"}));  // not offset
    for (int r = 0; r < tp; ++r) {
      auto f = safetensors::File::open(dir.str("art/weights/rank" + std::to_string(r) + ".safetensors"));
      ASSERT_TRUE(f.contains("perm"));
      ASSERT_TRUE(f.contains("scale"));
      Tensor perm = f.get("perm");
      EXPECT_EQ(perm.dtype(), DType::Int64);
      for (std::size_t i = 0; i < kPerm.size(); ++i) EXPECT_EQ(perm.data<std::int64_t>()[i], kPerm[i]);
      EXPECT_TRUE(tensors_close(f.get("scale"), Tensor::from_vector(kScale, {kDim}), 0, 0));
    }
  }
}

TEST(Buffers, FloatBuffersTakeTheModelDtypeInt64StaysInt64) {
  TempDir dir;
  const auto sd = write_ckpt(dir);
  auto w = wrapper(config(1, DType::BFloat16));
  w->compile(dir.str("ckpt"), dir.str("art"));
  w->load(dir.str("art"));
  auto f = safetensors::File::open(dir.str("art/weights/rank0.safetensors"));
  EXPECT_EQ(f.get("scale").dtype(), DType::BFloat16);
  EXPECT_EQ(f.get("perm").dtype(), DType::Int64);
  const Tensor x = Tensor::randn({kBatch, kDim}, 9);
  Output o = w->forward({x.to_dtype(DType::BFloat16)});
  // bfloat16 weights and activations: 8 significant bits per rounding, O(1) values.
  EXPECT_TRUE(tensors_close(o.tensor().to_dtype(DType::Float32), expected(x, sd), 5e-2, 5e-2));
}

TEST(Buffers, ANonPersistentBufferInTheCheckpointIsAnUnusedKey) {
  TempDir dir;
  write_ckpt(dir, {{"scale", Tensor::zeros({kDim})}});
  auto w = wrapper(config(1));
  auto msg = message_of<InvalidArgument>([&] { w->compile(dir.str("ckpt"), dir.str("art")); });
  EXPECT_NE(msg.find("unused 1 tensor(s): scale"), std::string::npos) << msg;
}

TEST(Buffers, AMissingPersistentBufferIsNamed) {
  TempDir dir;
  write_ckpt(dir, {}, /*drop_offset=*/true);
  auto w = wrapper(config(1));
  auto msg = message_of<InvalidArgument>([&] { w->compile(dir.str("ckpt"), dir.str("art")); });
  EXPECT_NE(msg.find("missing 1 tensor(s): offset"), std::string::npos) << msg;
}

TEST(Buffers, RegistrationErrorsNameTheBuffer) {
  struct M : nn::Module {};
  M m;
  m.register_buffer("a", Tensor::zeros({2}));
  auto twice = message_of<InvalidArgument>([&] { m.register_buffer("a", Tensor::zeros({2})); });
  EXPECT_NE(twice.find("buffer 'a'"), std::string::npos) << twice;
  auto int_persistent = message_of<DTypeError>(
      [&] { m.register_buffer("i", Tensor::from_vector_i64({1}, {1}), true); });
  EXPECT_NE(int_persistent.find("persistent buffer 'i'"), std::string::npos) << int_persistent;
  auto missing = message_of<InvalidArgument>([&] {
    Tracer t({});
    m.buffer("nope");
  });
  EXPECT_NE(missing.find("no buffer 'nope'"), std::string::npos) << missing;
  // random_state_dict lists persistent buffers (with their values) after the parameters.
  BufferModel bm(config(1));
  auto sd = nn::random_state_dict(bm, 1);
  ASSERT_EQ(sd.size(), 3u);
  EXPECT_EQ(sd.back().first, "offset");
}
