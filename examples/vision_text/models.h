// The seed's vision-text pipeline (steps 1 to 3), in C++.
//
//   Stage 1: VisionModel  (Conv2d + AdaptiveAvgPool2d + Linear)  -> vision embeddings
//   Stage 2: TextModel    (Linear embedding + concat + Linear fusion) -> final output
//
// The vision wrapper keeps its output on the device as ranked tensors; the text wrapper
// returns its output to the host.
#pragma once

#include <devpipe/devpipe.h>

#include <filesystem>
#include <string>

namespace vision_text {

using devpipe::InferenceConfig;
using devpipe::Tensor;
using devpipe::Var;
namespace nn = devpipe::nn;
namespace F = devpipe::F;

// 1: model classes -------------------------------------------------------------------

// Vision Model Definition
class VisionModel : public nn::Module {
 public:
  explicit VisionModel(const InferenceConfig& config)
      : conv(3, 64, /*kernel_size=*/3, {.padding = 1}),
        pool({1, 1}),
        fc(64, config.get_int("vision_embedding_size")) {
    register_module("conv", conv);
    register_module("pool", pool);
    register_module("fc", fc);
  }

  Var forward(Var x) const {
    x = conv(x);
    x = pool(x);
    x = F::flatten(x, 1);
    return fc(x);
  }

  nn::Conv2d conv;
  nn::AdaptiveAvgPool2d pool;
  nn::Linear fc;
};

// Text Model Definition
class TextModel : public nn::Module {
 public:
  explicit TextModel(const InferenceConfig& config)
      : embedding(config.get_int("text_input_size"), config.get_int("text_embedding_size")),
        fusion(config.get_int("vision_embedding_size") + config.get_int("text_embedding_size"),
               config.get_int("output_size")) {
    register_module("embedding", embedding);
    register_module("fusion", fusion);
  }

  Var forward(Var vision_features, Var text_input) const {
    Var text_features = embedding(text_input);
    Var combined = F::cat({vision_features, text_features}, /*dim=*/1);
    return fusion(combined);
  }

  nn::Linear embedding;
  nn::Linear fusion;
};

// 2: model wrappers with the pipeline execution flags ------------------------------------

// Vision Model Wrapper - keeps output on device
class VisionModelWrapper : public devpipe::ModelWrapper {
 public:
  explicit VisionModelWrapper(const InferenceConfig& config)
      : ModelWrapper(config, devpipe::model_cls<VisionModel>(),
                     {.pipeline_execution = true,
                      .return_ranked_to_cpu = false,  // Keep output ranked for efficient pipeline
                      .tag = "vision_model"}) {}

  std::vector<std::vector<Tensor>> input_generator() const override {
    // Generate sample input for compilation (224x224 as in the seed; "image_size" overrides)
    std::int64_t hw = config().has("image_size") ? config().get_int("image_size") : 224;
    auto x = Tensor::randn({neuron_config().batch_size, 3, hw, hw}, /*seed=*/0);
    return {{x}};
  }
  std::vector<std::string> input_names() const override { return {"x"}; }
};

// Text Model Wrapper - returns final output to CPU
class TextModelWrapper : public devpipe::ModelWrapper {
 public:
  explicit TextModelWrapper(const InferenceConfig& config)
      : ModelWrapper(config, devpipe::model_cls<TextModel>(),
                     {.pipeline_execution = true,
                      .return_ranked_to_cpu = true,  // Return final output to CPU
                      .tag = "text_model"}) {}

  std::vector<std::vector<Tensor>> input_generator() const override {
    // Generate sample inputs for compilation
    auto vision_features =
        Tensor::randn({neuron_config().batch_size, config().get_int("vision_embedding_size")}, 1);
    auto text_input =
        Tensor::randn({neuron_config().batch_size, config().get_int("text_input_size")}, 2);
    return {{vision_features, text_input}};
  }
  std::vector<std::string> input_names() const override {
    return {"vision_features", "text_input"};
  }
};

// 3: application classes -----------------------------------------------------------------

class VisionModelApp : public devpipe::ApplicationBase {
 public:
  VisionModelApp(const std::string& model_path, const InferenceConfig& config)
      : ApplicationBase(model_path, config) {
    model = std::make_shared<VisionModelWrapper>(config);
    models.push_back(model);
  }

  devpipe::Output forward(devpipe::Input x) { return models[0]->forward({x}); }

  std::shared_ptr<VisionModelWrapper> model;
};

class TextModelApp : public devpipe::ApplicationBase {
 public:
  TextModelApp(const std::string& model_path, const InferenceConfig& config)
      : ApplicationBase(model_path, config) {
    model = std::make_shared<TextModelWrapper>(config);
    models.push_back(model);
  }

  devpipe::Output forward(devpipe::Input vision_features, devpipe::Input text_input) {
    return models[0]->forward({vision_features, text_input});
  }

  std::shared_ptr<TextModelWrapper> model;
};

/// Writes `dir`/model.safetensors with `model`'s parameters drawn like PyTorch's default
/// initialisation (nn::random_state_dict, deterministic for `seed`); returns `dir`.
inline std::string write_random_checkpoint(const nn::Module& model, const std::string& dir,
                                           std::uint64_t seed) {
  std::filesystem::create_directories(dir);
  devpipe::safetensors::save((std::filesystem::path(dir) / "model.safetensors").string(),
                             nn::random_state_dict(model, seed));
  return dir;
}

/// The seed's config: batch 32, float32, tp_degree 2, sizes 512/256/512/1024.
inline InferenceConfig seed_config(std::int64_t batch_size = 32, int tp_degree = 2,
                                   devpipe::DType dtype = devpipe::DType::Float32) {
  return InferenceConfig(devpipe::RuntimeConfig{.batch_size = batch_size,
                                                .dtype = dtype,
                                                .tp_degree = tp_degree},
                         {{"vision_embedding_size", 512},
                          {"text_input_size", 256},
                          {"text_embedding_size", 512},
                          {"output_size", 1024}});
}

}  // namespace vision_text
