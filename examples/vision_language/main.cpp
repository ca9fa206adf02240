// A vision-language model end to end: writes a small random Pixtral-style Llava model as a
// Hugging Face folder (config.json with text_config and vision_config, model.safetensors with
// the Hub's names), compiles it as devpipe's three-stage application (vision encoder ->
// context encoding -> token generation) at tp_degree 2, and generates greedily for two prompts,
// each about its own image. The vision encoder's features go to the prefill on the ranks'
// devices: the host sends pixels and token ids and gets token ids back.
//
//   vision_language_example [OUT_DIR]   (default: vision_language_example)
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "devpipe/devpipe.h"
#include "devpipe/models/llava.h"

using namespace devpipe;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  try {
    const fs::path out = argc > 1 ? argv[1] : "vision_language_example";
    const fs::path model = out / "model";
    fs::create_directories(model);
    // 1. The HF folder: LlavaForConditionalGeneration's config.json (Pixtral 12B's layout at a
    //    toy size), then random weights named as the Hub's checkpoint names them.
    const std::int64_t image_token = 10;
    nlohmann::json text = {{"architectures", {"MistralForCausalLM"}}, {"model_type", "mistral"},
                           {"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 2},
                           {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"hidden_act", "silu"},
                           {"rms_norm_eps", 1e-5}, {"rope_theta", 1000000.0}, {"vocab_size", 300},
                           {"max_position_embeddings", 256}, {"tie_word_embeddings", false},
                           {"sliding_window", nullptr}, {"bos_token_id", 1}, {"eos_token_id", 2}};
    nlohmann::json vision = {{"model_type", "pixtral"}, {"hidden_size", 32}, {"intermediate_size", 64},
                             {"num_hidden_layers", 2}, {"num_attention_heads", 2}, {"head_dim", 16},
                             {"num_channels", 3}, {"image_size", 64}, {"patch_size", 8},
                             {"hidden_act", "silu"}, {"rope_theta", 10000.0}};
    nlohmann::json cfg = {{"architectures", {"LlavaForConditionalGeneration"}}, {"model_type", "llava"},
                          {"image_token_index", image_token}, {"projector_hidden_act", "gelu"},
                          {"vision_feature_layer", -1}, {"vision_feature_select_strategy", "full"},
                          {"multimodal_projector_bias", true}, {"text_config", text}, {"vision_config", vision}};
    std::ofstream(model / "config.json") << cfg.dump(2) << "\n";
    RuntimeConfig rc{.batch_size = 2, .dtype = DType::Float32, .tp_degree = 2};
    models::LlavaOptions opts;
    opts.text.context_buckets = {32, 64};
    opts.text.max_length = 128;
    opts.image_height = 32;  // 4 x 4 patches of 8 pixels: 16 image tokens per prompt
    opts.image_width = 32;
    InferenceConfig config = models::llava_config(model.string(), rc, opts);
    {
      auto weights = models::llava_random_state_dict(config, 7);
      safetensors::save((model / "model.safetensors").string(), weights, {{"format", "pt"}});
      std::cout << "wrote " << weights.size() << " tensors and config.json to " << model.string() << "\n";
    }
    // 2. Compile and load the three stages (the KV cache is allocated at load).
    models::LlavaForConditionalGeneration app(model.string(), config);
    app.compile((out / "compiled").string());
    app.load((out / "compiled").string());
    const std::int64_t n_img = app.image_tokens();
    std::cout << "stages:";
    for (const auto& m : app.models) std::cout << " " << m->tag();
    std::cout << "; " << n_img << " image tokens per image\n";
    // 3. Two prompts, each with its image's run of image tokens (what Pixtral's processor writes
    //    for [IMG]), and two images (random pixels standing for normalised images).
    auto with_image = [&](std::vector<std::int64_t> before, std::vector<std::int64_t> after) {
      before.insert(before.end(), static_cast<std::size_t>(n_img), image_token);
      before.insert(before.end(), after.begin(), after.end());
      return before;
    };
    const std::vector<std::vector<std::int64_t>> prompts = {with_image({1}, {17, 42}), with_image({1, 150}, {3})};
    const Tensor pixels = Tensor::randn({2, 3, 32, 32}, 3);
    models::GenerationConfig gen;
    gen.max_new_tokens = 8;
    gen.stop_at_eos = false;
    reset_transfer_stats();
    auto r = app.generate(prompts, pixels, gen,
                          [](std::int64_t s, std::int64_t id) { std::cout << s << ":" << id << " " << std::flush; });
    const TransferStats st = transfer_stats();
    std::cout << "\n";
    // Everything that came down was token ids (8 bytes each): the features stayed on the devices.
    std::cout << "image features moved to the host: "
              << st.device_to_host_bytes - static_cast<std::uint64_t>(r.generated) * 8 << " bytes\n";
    for (std::size_t s = 0; s < r.tokens.size(); ++s) {
      std::cout << "sequence " << s << ":";
      for (auto id : r.tokens[s]) std::cout << " " << id;
      std::cout << "\n";
    }
    std::cout << r.generated << " tokens in " << r.seconds << " s\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "vision_language_example: " << e.what() << "\n";
    return 1;
  }
}
