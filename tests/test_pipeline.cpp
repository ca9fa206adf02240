// The seed's two-stage pipeline end to end on the cpu backend, against PyTorch.
//
// tests/reference/vision_text_ref.py builds the same two models in PyTorch, writes their
// checkpoints and the expected outputs for a batch of 40 (20x20 images, so the suite stays
// fast; the seed's 224x224 shape runs in `make demo` and test_seed_example). Rows are
// independent, so the expected output of a smaller batch is the first rows of the large one.
//
// Tolerance: float32, rtol 1e-4 / atol 1e-5. devpipe and PyTorch sum in different orders
// (oneDNN's blocked convolution and GEMM vs PyTorch's), over up to 27 * 400 terms before
// the pool and 1024 in the fusion layer; the observed error is ~1e-6 relative.
#include <gtest/gtest.h>

#include "compiler/artifact.h"
#include "pipeline_util.h"
#include "test_util.h"
#include "vision_text/models.h"

using namespace devpipe;
using namespace devpipe::testing;
using vision_text::TextModel;
using vision_text::VisionModel;

namespace {

constexpr double kRtol = 1e-4;
constexpr double kAtol = 1e-5;
constexpr int kImage = 20;

class PipelineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    ASSERT_TRUE(run_torch_script("vision_text_ref.py",
                                 "--out " + dir_->str() + " --batch 40 --image " + std::to_string(kImage)));
    io_ = new std::map<std::string, Tensor>(safetensors::load_all(dir_->str("io.safetensors")));
  }
  static void TearDownTestSuite() {
    delete io_;
    delete dir_;
  }

  static InferenceConfig config(int tp, std::vector<std::int64_t> buckets = {}, std::int64_t batch = 32) {
    InferenceConfig c = vision_text::seed_config(batch, tp);
    c.set("image_size", kImage);
    c.mutable_runtime_config().buckets = std::move(buckets);
    return c;
  }

  static Tensor io(const std::string& name, std::int64_t rows) { return io_->at(name).narrow_rows(0, rows); }

  struct Stages {
    std::unique_ptr<ModelWrapper> vision, text;
  };

  /// Compiles and loads both stages; `pipeline` selects ranked hand-off vs host round trip.
  static Stages make(const InferenceConfig& c, bool pipeline, const std::string& name) {
    std::int64_t b = c.runtime_config().batch_size;
    Stages s;
    s.vision = std::make_unique<TestWrapper<VisionModel>>(
        c, WrapperOptions{.pipeline_execution = pipeline, .return_ranked_to_cpu = false, .tag = "vision_model"},
        std::vector<std::vector<Tensor>>{{Tensor::zeros({b, 3, kImage, kImage})}});
    s.text = std::make_unique<TestWrapper<TextModel>>(
        c, WrapperOptions{.pipeline_execution = pipeline, .return_ranked_to_cpu = true, .tag = "text_model"},
        std::vector<std::vector<Tensor>>{{Tensor::zeros({b, 512}), Tensor::zeros({b, 256})}});
    std::string out = dir_->str(name);
    s.vision->compile(dir_->str("vision"), out + "/vision");
    s.text->compile(dir_->str("text"), out + "/text");
    s.vision->load(out + "/vision");
    s.text->load(out + "/text");
    return s;
  }

  static TempDir* dir_;
  static std::map<std::string, Tensor>* io_;
};

TempDir* PipelineTest::dir_ = nullptr;
std::map<std::string, Tensor>* PipelineTest::io_ = nullptr;

}  // namespace

class PipelineTp : public PipelineTest, public ::testing::WithParamInterface<int> {};

TEST_P(PipelineTp, MatchesPyTorchAndHandsOffInPlace) {
  int tp = GetParam();
  auto s = make(config(tp), true, "tp" + std::to_string(tp));
  reset_transfer_stats();
  Output feats = s.vision->forward({io("image", 32)});
  ASSERT_TRUE(feats.is_ranked());
  EXPECT_EQ(feats.ranked().num_ranks(), tp);
  EXPECT_EQ(feats.ranked().num_outputs(), 1);
  Output out = s.text->forward({feats, io("text", 32)});
  ASSERT_FALSE(out.is_ranked());
  EXPECT_EQ(out.shape(), (Shape{32, 1024}));
  EXPECT_TRUE(out.device().is_host());
  EXPECT_TRUE(tensors_close(out.tensor(), io("output", 32), kRtol, kAtol));
  EXPECT_TRUE(tensors_close(feats.ranked().to_host()[0], io("vision_features", 32), kRtol, kAtol));

  // The ranked hand-off copied nothing: each rank used its vision output in place.
  TransferStats st = transfer_stats();
  EXPECT_EQ(st.ranked_inputs_in_place, static_cast<std::uint64_t>(tp));
  EXPECT_EQ(st.ranked_inputs_copied, 0u);
  EXPECT_EQ(st.device_to_device_bytes, 0u);
  // Host inputs: the cpu backend's device memory is host memory and batch 32 fills bucket 32,
  // so each rank reads the image and the text input in place; nothing is copied at all.
  EXPECT_EQ(st.host_to_device_bytes, 0u);
  EXPECT_EQ(st.host_inputs_in_place, 2u * static_cast<std::uint64_t>(tp));

  // The same, per forward (no reset needed): the vision forward read its image in place on
  // every rank and moved nothing; the text forward used the ranked features and read its text
  // input in place on every rank, and copied its [32, 1024] float32 output to the host.
  const auto tpu = static_cast<std::uint64_t>(tp);
  TransferStats v = feats.transfer_stats(), t = out.transfer_stats();
  EXPECT_EQ(v, (TransferStats{.host_inputs_in_place = tpu, .forwards = 1}));
  EXPECT_EQ(t, (TransferStats{.device_to_host_bytes = 32 * 1024 * 4,
                              .ranked_inputs_in_place = tpu,
                              .host_inputs_in_place = tpu,
                              .forwards = 1}));
  // A later forward has its own counts; the earlier results keep theirs.
  Output out2 = s.text->forward({feats, io("text", 32)});
  EXPECT_EQ(out2.transfer_stats(), t);
  EXPECT_EQ(feats.transfer_stats(), v);
}

INSTANTIATE_TEST_SUITE_P(Tp, PipelineTp, ::testing::Values(1, 2, 4));

// Both seed stages have no parallel layers: at tp 2 each rank runs half of a bucket that tp
// divides (slice by rank, all-gather the outputs) instead of the whole, with the outputs of tp 1
// and PyTorch; a bucket tp does not divide stays replicated.
TEST_F(PipelineTest, ReplicatedStagesSplitTheBatchAtTp2) {
  auto one = make(config(1, {3, 32}), true, "split_tp1");
  auto two = make(config(2, {3, 32}), true, "split_tp2");
  for (const char* stage : {"vision", "text"}) {
    Manifest m = read_manifest(dir_->str(std::string("split_tp2/") + stage));
    ASSERT_EQ(m.buckets.size(), 2u);
    for (const auto& bucket : m.buckets) {
      int slices = 0, gathers = 0;
      for (const Node& n : bucket.graph.nodes) {
        slices += n.op == OpKind::Slice && n.attrs.i("rank_stride", 0) == bucket.batch / 2;
        gathers += n.op == OpKind::AllGather;
      }
      const bool split = bucket.batch == 32;
      EXPECT_EQ(slices, split ? static_cast<int>(bucket.graph.inputs.size()) : 0)
          << stage << " bucket " << bucket.batch;
      EXPECT_EQ(gathers, split ? 1 : 0) << stage << " bucket " << bucket.batch;
    }
  }
  for (std::int64_t rows : {32, 3}) {
    Output f1 = one.vision->forward({io("image", rows)});
    Tensor a = one.text->forward({f1, io("text", rows)}).tensor();
    Output f2 = two.vision->forward({io("image", rows)});
    ASSERT_EQ(f2.ranked().num_ranks(), 2);
    f2.ranked().wait();
    // Every rank holds the whole gathered batch.
    EXPECT_EQ(max_abs_diff(f2.ranked()[0][0].to_host(), f2.ranked()[1][0].to_host()), 0.0);
    Tensor b = two.text->forward({f2, io("text", rows)}).tensor();
    // The conv's sums are banded by image count and threads: the same terms, rounded apart.
    EXPECT_TRUE(tensors_close(b, a, 1e-5, 1e-6)) << rows << " rows";
    EXPECT_TRUE(tensors_close(b, io("output", rows), kRtol, kAtol)) << rows << " rows";
    EXPECT_TRUE(tensors_close(f2.ranked().to_host()[0], io("vision_features", rows), kRtol, kAtol));
  }
}

TEST_F(PipelineTest, PipelineAndRoundTripGiveTheSameOutputs) {
  auto pipe = make(config(2), true, "pipe");
  auto trip = make(config(2), false, "trip");
  Output f1 = pipe.vision->forward({io("image", 32)});
  Tensor a = pipe.text->forward({f1, io("text", 32)}).tensor();
  Output f2 = trip.vision->forward({io("image", 32)});
  ASSERT_FALSE(f2.is_ranked());  // pipeline_execution=false: every stage returns to the host
  reset_transfer_stats();
  Tensor b = trip.text->forward({f2, io("text", 32)}).tensor();
  EXPECT_EQ(transfer_stats().ranked_inputs_in_place, 0u);
  EXPECT_EQ(max_abs_diff(a, b), 0.0);  // same kernels, same order: bitwise equal
  EXPECT_TRUE(tensors_close(b, io("output", 32), kRtol, kAtol));
}

TEST_F(PipelineTest, Bfloat16PipelineMatchesPyTorch) {
  // The whole pipeline in bfloat16 (weights converted at compile, float32 host inputs converted
  // on entry) against PyTorch's float32 result. Tolerance: atol 1e-2 + rtol 1e-2 — bfloat16
  // keeps 8 significant bits (relative step 2^-8 = 0.004) and each of the 5 ops rounds its
  // output once; outputs are O(0.5). Observed here: max abs diff 0.0042.
  InferenceConfig c = config(2);
  c.mutable_runtime_config().dtype = DType::BFloat16;
  auto s = make(c, true, "bf16");
  Output feats = s.vision->forward({io("image", 32)});
  EXPECT_EQ(feats.ranked()[0][0].dtype(), DType::BFloat16);
  Output out = s.text->forward({feats, io("text", 32)});
  EXPECT_EQ(out.tensor().dtype(), DType::BFloat16);
  EXPECT_TRUE(tensors_close(out.tensor(), io("output", 32), 1e-2, 1e-2));
  std::cout << "[ info ] bfloat16 pipeline: max |diff| vs PyTorch float32 = "
            << max_abs_diff(out.tensor(), io("output", 32)) << "\n";
}

TEST_F(PipelineTest, Batch5PadsToBucket8) {
  auto s = make(config(2, {8}, 8), true, "b8");
  reset_transfer_stats();
  Output feats = s.vision->forward({io("image", 5)});
  EXPECT_EQ(feats.ranked().real_batch(), 5);
  EXPECT_EQ(feats.ranked()[0][0].shape(), (Shape{8, 512}));  // padded on the device
  Output out = s.text->forward({feats, io("text", 5)});
  EXPECT_EQ(out.shape(), (Shape{5, 1024}));
  EXPECT_TRUE(tensors_close(out.tensor(), io("output", 5), kRtol, kAtol));
  EXPECT_EQ(transfer_stats().ranked_inputs_in_place, 2u);
  // Host inputs need padding (5 -> 8): copied into a padded buffer on each of the 2 ranks.
  std::uint64_t image_bytes = 5ull * 3 * kImage * kImage * 4, text_bytes = 5ull * 256 * 4;
  EXPECT_EQ(transfer_stats().host_to_device_bytes, 2 * (image_bytes + text_bytes));
  EXPECT_EQ(transfer_stats().host_inputs_in_place, 0u);
}

TEST_F(PipelineTest, Batch40RunsInChunksOverBuckets8And32) {
  auto s = make(config(2, {8, 32}, 32), true, "b8_32");
  Output feats = s.vision->forward({io("image", 40)});
  EXPECT_EQ(feats.ranked().real_batch(), 40);
  Output out = s.text->forward({feats, io("text", 40)});
  EXPECT_EQ(out.shape(), (Shape{40, 1024}));
  EXPECT_TRUE(tensors_close(out.tensor(), io("output", 40), kRtol, kAtol));
  // Batch 3 picks bucket 8; batch 20 picks bucket 32.
  for (std::int64_t n : {3, 20}) {
    Output o = s.text->forward({s.vision->forward({io("image", n)}), io("text", n)});
    EXPECT_TRUE(tensors_close(o.tensor(), io("output", n), kRtol, kAtol)) << "batch " << n;
  }
}

TEST_F(PipelineTest, RankedInputRepaddedWhenBucketsDiffer) {
  // Vision compiled for bucket 8 only, text for 32 only: batch 6 -> vision pads to 8, text
  // needs 32 rows and re-pads the ranked features on the device (no host round trip).
  auto v = config(2, {8}, 8);
  auto t = config(2, {32}, 32);
  TestWrapper<VisionModel> vision(v, {.pipeline_execution = true, .return_ranked_to_cpu = false, .tag = "vision_model"},
                                  {{Tensor::zeros({8, 3, kImage, kImage})}});
  TestWrapper<TextModel> text(t, {.pipeline_execution = true, .return_ranked_to_cpu = true, .tag = "text_model"},
                              {{Tensor::zeros({32, 512}), Tensor::zeros({32, 256})}});
  vision.compile(dir_->str("vision"), dir_->str("rp/vision"));
  text.compile(dir_->str("text"), dir_->str("rp/text"));
  vision.load(dir_->str("rp/vision"));
  text.load(dir_->str("rp/text"));
  reset_transfer_stats();
  Output out = text.forward({vision.forward({io("image", 6)}), io("text", 6)});
  EXPECT_TRUE(tensors_close(out.tensor(), io("output", 6), kRtol, kAtol));
  EXPECT_EQ(transfer_stats().ranked_inputs_copied, 2u);
  EXPECT_EQ(transfer_stats().device_to_device_bytes, 2u * 6 * 512 * 4);
  EXPECT_EQ(transfer_stats().ranked_inputs_in_place, 0u);
}

TEST_F(PipelineTest, SmallerBucketReadsALargerRankedBufferInPlace) {
  // Vision bucket 32, text buckets {8, 32}: batch 6 -> text picks 8 and reads the first 8 rows
  // of the vision buffer where they lie.
  auto v = config(2, {32}, 32);
  auto t = config(2, {8, 32}, 32);
  TestWrapper<VisionModel> vision(v, {.pipeline_execution = true, .return_ranked_to_cpu = false, .tag = "vision_model"},
                                  {{Tensor::zeros({32, 3, kImage, kImage})}});
  TestWrapper<TextModel> text(t, {.pipeline_execution = true, .return_ranked_to_cpu = true, .tag = "text_model"},
                              {{Tensor::zeros({32, 512}), Tensor::zeros({32, 256})}});
  vision.compile(dir_->str("vision"), dir_->str("ip/vision"));
  text.compile(dir_->str("text"), dir_->str("ip/text"));
  vision.load(dir_->str("ip/vision"));
  text.load(dir_->str("ip/text"));
  reset_transfer_stats();
  Output out = text.forward({vision.forward({io("image", 6)}), io("text", 6)});
  EXPECT_TRUE(tensors_close(out.tensor(), io("output", 6), kRtol, kAtol));
  EXPECT_EQ(transfer_stats().ranked_inputs_in_place, 2u);
  EXPECT_EQ(transfer_stats().device_to_device_bytes, 0u);
}
