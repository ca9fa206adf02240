// The seed's example exactly: batch 32, float32, tp_degree 2, 224x224 images, sizes
// 512/256/512/1024, through the example's own applications (examples/vision_text/models.h),
// against the same models in PyTorch (tests/reference/vision_text_ref.py).
//
// Tolerance: float32 rtol 1e-4 / atol 1e-5 (summation order differs: the pool averages
// 224*224 conv outputs, each a 27-term sum).
#include <gtest/gtest.h>

#include "test_util.h"
#include "vision_text/models.h"

using namespace devpipe;
using namespace devpipe::testing;
using namespace vision_text;

TEST(SeedExample, VisionTextPipelineMatchesPyTorch) {
  TempDir dir;
  ASSERT_TRUE(run_torch_script("vision_text_ref.py", "--out " + dir.str() + " --batch 32 --image 224"));
  auto io = safetensors::load_all(dir.str("io.safetensors"));

  InferenceConfig config = seed_config();  // batch 32, float32, tp_degree 2
  VisionModelApp vision_app(dir.str("vision"), config);
  TextModelApp text_app(dir.str("text"), config);
  vision_app.compile(dir.str("compiled/vision"));
  text_app.compile(dir.str("compiled/text"));
  vision_app.load(dir.str("compiled/vision"));
  text_app.load(dir.str("compiled/text"));

  reset_transfer_stats();
  Output vision_features = vision_app.forward(io.at("image"));
  Output final_output = text_app.forward(vision_features, io.at("text"));

  // The seed's "Confirm your work".
  ASSERT_TRUE(vision_features.is_ranked());
  EXPECT_EQ(vision_features.ranked().num_ranks(), 2);
  EXPECT_EQ(vision_features.ranked().num_outputs(), 1);
  EXPECT_EQ(final_output.shape(), (Shape{32, 1024}));
  EXPECT_EQ(final_output.device(), Device::cpu());
  EXPECT_TRUE(tensors_close(final_output.tensor(), io.at("output"), 1e-4, 1e-5));
  EXPECT_EQ(transfer_stats().ranked_inputs_in_place, 2u);
  EXPECT_EQ(transfer_stats().device_to_device_bytes, 0u);
}
