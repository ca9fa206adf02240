// A causal LM end to end: writes a small random Llama model as a Hugging Face folder
// (config.json + model.safetensors with LlamaForCausalLM's names), compiles it as devpipe's
// two-stage application (context encoding + token generation sharing a KV cache on the
// device) at tp_degree 2, and generates greedily for a batch of two prompts, streaming the
// tokens as they come.
//
//   causal_lm_example [OUT_DIR]   (default: causal_lm_example)
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "devpipe/devpipe.h"
#include "devpipe/models/llama.h"

using namespace devpipe;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  try {
    const fs::path out = argc > 1 ? argv[1] : "causal_lm_example";
    const fs::path model = out / "model";
    fs::create_directories(model);
    // 1. The HF folder: config.json with HF's keys, then random weights named as HF names them.
    nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
                          {"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 2},
                          {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"hidden_act", "silu"},
                          {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0}, {"vocab_size", 300},
                          {"max_position_embeddings", 256}, {"tie_word_embeddings", false},
                          {"bos_token_id", 1}, {"eos_token_id", 2}, {"torch_dtype", "float32"}};
    std::ofstream(model / "config.json") << cfg.dump(2) << "\n";
    RuntimeConfig rc{.batch_size = 2, .dtype = DType::Float32, .tp_degree = 2};
    models::LlamaOptions opts;
    opts.context_buckets = {16, 32};
    opts.max_length = 64;
    InferenceConfig config = models::llama_config(model.string(), rc, opts);
    {
      models::LlamaModel shapes(config, false);  // declares every parameter with its HF key
      auto weights = nn::random_state_dict(shapes, 7);
      safetensors::save((model / "model.safetensors").string(), weights, {{"format", "pt"}});
      std::cout << "wrote " << weights.size() << " tensors and config.json to " << model.string() << "\n";
    }
    // 2. Compile and load the application (both stages; the KV cache is allocated at load).
    models::LlamaForCausalLM app(model.string(), config);
    app.compile((out / "compiled").string());
    app.load((out / "compiled").string());
    std::cout << "KV cache: " << app.state_store()->entries().size() << " states, "
              << app.state_store()->bytes_per_rank() << " bytes per rank\n";
    // 3. Generate: tokens streamed as they come, then each sequence's ids.
    models::GenerationConfig gen;
    gen.max_new_tokens = 8;
    gen.stop_at_eos = false;
    auto r = app.generate({{1, 17, 42}, {1, 150, 3, 3, 8}}, gen,
                          [](std::int64_t s, std::int64_t id) { std::cout << s << ":" << id << " " << std::flush; });
    std::cout << "\n";
    for (std::size_t s = 0; s < r.tokens.size(); ++s) {
      std::cout << "sequence " << s << ":";
      for (auto id : r.tokens[s]) std::cout << " " << id;
      std::cout << "\n";
    }
    std::cout << r.generated << " tokens in " << r.seconds << " s\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "causal_lm_example: " << e.what() << "\n";
    return 1;
  }
}
