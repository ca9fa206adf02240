// The program test_mpi runs both as threads (./mpi_worker ...) and as processes
// (mpirun -np N ./mpi_worker ...): the same code either way, as a user's program would be.
//
//   mpi_worker SCENARIO WORK OUT TP
//
// SCENARIO:
//   seed      the seed's vision-text pipeline (examples/vision_text, batch 8, 32x32 images)
//   mlp       a column/row-parallel MLP (tests/pipeline_util.h), ranked output to the host
//   bcast     mlp with its inputs given on process 0 only (World::broadcast_from_process0)
//   llama     a small random Llama (HF folder) generating 12 greedy tokens for 3 prompts
//   llava     a small random Pixtral-style Llava (HF folder): the vision stage's features (its
//             ranked output read back) and 8 greedy tokens for 2 prompts about 2 images
//   dit       a small random DiT pipeline (diffusers folder): 6 DDIM steps with guidance for 2
//             images, the latents after each step
//   two       two mlp stages, at TP and at 2*TP, each forwarded 16 times from a thread of its
//             own, both at once (their rank groups' collectives run concurrently)
//   hang      mlp, but process 1 stops before its forward (sleeps): the others must fail
//   kill      mlp, but process 1 is killed (SIGKILL) before its forward
//   mismatch  process 1 asks for another batch size than the others at compile
//
// Results go to OUT.p<process>.safetensors (outputs) or OUT.p<process>.json ({"error": message,
// "seconds": time from the failing call to its error}); the checkpoints and artifacts under WORK
// are written by process 0 (checkpoints) and by compile (artifacts).
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <thread>

#include "devpipe/devpipe.h"
#include "devpipe/models/llama.h"
#include "devpipe/models/dit.h"
#include "devpipe/models/llava.h"
#include "devpipe/world.h"
#include "pipeline_util.h"
#include "vision_text/models.h"

using namespace devpipe;
namespace fs = std::filesystem;

namespace {

std::string suffix() { return ".p" + std::to_string(World::get().process()); }

void save_outputs(const std::string& out,
                  const std::vector<std::pair<std::string, Tensor>>& tensors) {
  safetensors::save(out + suffix() + ".safetensors", tensors, {{"world", World::get().describe()}});
}

/// Checkpoints are written once (process 0), then every process waits for the file.
void wait_for(const fs::path& path) {
  for (int i = 0; i < 600 && !fs::exists(path); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
}

void run_seed(const std::string& work, const std::string& out, int tp) {
  InferenceConfig config = vision_text::seed_config(8, tp);
  config.set("image_size", std::int64_t{32});
  const std::string vision_ckpt = work + "/checkpoints/vision",
                    text_ckpt = work + "/checkpoints/text";
  if (World::get().process() == 0) {
    vision_text::write_random_checkpoint(vision_text::VisionModel(config), vision_ckpt, 1234);
    vision_text::write_random_checkpoint(vision_text::TextModel(config), text_ckpt, 1235);
  }
  wait_for(text_ckpt + "/model.safetensors");
  vision_text::VisionModelApp vision_app(vision_ckpt, config);
  vision_text::TextModelApp text_app(text_ckpt, config);
  vision_app.compile(work + "/compiled/vision");
  text_app.compile(work + "/compiled/text");
  vision_app.load(work + "/compiled/vision");
  text_app.load(work + "/compiled/text");
  Tensor image = Tensor::randn({8, 3, 32, 32}, 42);
  Tensor text = Tensor::randn({8, 256}, 43);
  Output features = vision_app.forward(image);
  Output final_output = text_app.forward(features, text);
  save_outputs(out,
               {{"output", final_output.tensor()}, {"features", features.ranked().to_host()[0]}});
  std::cout << "seed: " << World::get().describe() << ", vision features "
            << features.ranked().describe() << ", local ranks "
            << features.ranked().local_ranks().size() << "\n";
}

/// The MLP stage; `before_forward` runs between load and forward.
void run_mlp(const std::string& work, const std::string& out, int tp, std::int64_t batch,
             const std::function<void()>& before_forward = {}, bool broadcast_inputs = false) {
  InferenceConfig config(RuntimeConfig{.batch_size = batch, .tp_degree = tp});
  testing::TestWrapper<testing::ParallelMlp> mlp(config, {.tag = "mlp"},
                                                 {{Tensor::randn({batch, 16}, 1)}});
  const std::string ckpt = work + "/checkpoints/mlp.safetensors";
  fs::create_directories(work + "/checkpoints");
  if (World::get().process() == 0)
    safetensors::save(ckpt, nn::random_state_dict(testing::ParallelMlp(), 5));
  wait_for(ckpt);
  mlp.compile(ckpt, work + "/compiled/mlp");
  mlp.load(work + "/compiled/mlp");
  if (before_forward) before_forward();
  Tensor x = Tensor::randn({batch, 16}, 2), x2 = Tensor::randn({batch, 16}, 3);
  if (broadcast_inputs) {
    // Only process 0 has the inputs (the others' stand-ins are zeros of another shape: ignored).
    const bool has = World::get().process() == 0;
    x = World::get().broadcast_from_process0(has ? x : Tensor::zeros({1, 2}));
    x2 = World::get().broadcast_from_process0(has ? x2 : Tensor());
  }
  Output y = mlp.forward({x});
  Output y2 = mlp.forward({x2});  // a second forward: the ranks stay in step
  save_outputs(out, {{"output", y.tensor()}, {"output2", y2.tensor()}});
}

/// Two MLP stages of different tp degrees (two rank groups, two communicators), forwarded at
/// once from two threads.
void run_two_groups(const std::string& work, const std::string& out, int tp) {
  constexpr std::int64_t kBatch = 4;
  constexpr int kForwards = 16;
  const std::string ckpt = work + "/checkpoints/mlp.safetensors";
  fs::create_directories(work + "/checkpoints");
  if (World::get().process() == 0)
    safetensors::save(ckpt, nn::random_state_dict(testing::ParallelMlp(), 5));
  wait_for(ckpt);
  std::vector<std::unique_ptr<testing::TestWrapper<testing::ParallelMlp>>> stages;
  for (int degree : {tp, 2 * tp}) {
    const std::string tag = "mlp_tp" + std::to_string(degree);
    stages.push_back(std::make_unique<testing::TestWrapper<testing::ParallelMlp>>(
        InferenceConfig(RuntimeConfig{.batch_size = kBatch, .tp_degree = degree}), WrapperOptions{.tag = tag},
        std::vector<std::vector<Tensor>>{{Tensor::randn({kBatch, 16}, 1)}}));
    stages.back()->compile(ckpt, work + "/compiled/" + tag);
    stages.back()->load(work + "/compiled/" + tag);
  }
  std::vector<std::pair<std::string, Tensor>> results(2 * kForwards);
  std::vector<std::string> errors(2);
  std::vector<std::thread> threads;
  for (std::size_t s = 0; s < 2; ++s) {
    threads.emplace_back([&, s] {
      try {
        for (int i = 0; i < kForwards; ++i) {
          Tensor x = Tensor::randn({kBatch, 16}, static_cast<std::uint64_t>(100 + 50 * s + i));
          results[s * kForwards + i] = {"stage" + std::to_string(s) + "_" + std::to_string(i),
                                        stages[s]->forward({x}).tensor()};
        }
      } catch (const std::exception& e) {
        errors[s] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (std::size_t s = 0; s < 2; ++s) {
    if (!errors[s].empty()) throw StateError("stage " + std::to_string(s) + ": " + errors[s]);
  }
  save_outputs(out, results);
}

void run_llama(const std::string& work, const std::string& out, int tp) {
  const fs::path model = fs::path(work) / "llama";
  if (World::get().process() == 0) {
    fs::create_directories(model);
    nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}},
                          {"model_type", "llama"},
                          {"hidden_size", 64},
                          {"intermediate_size", 128},
                          {"num_hidden_layers", 2},
                          {"num_attention_heads", 4},
                          {"num_key_value_heads", 2},
                          {"hidden_act", "silu"},
                          {"rms_norm_eps", 1e-5},
                          {"rope_theta", 10000.0},
                          {"vocab_size", 300},
                          {"max_position_embeddings", 256},
                          {"tie_word_embeddings", false},
                          {"bos_token_id", 1},
                          {"eos_token_id", 2},
                          {"torch_dtype", "float32"}};
    std::ofstream(model / "config.json.tmp") << cfg.dump(2) << "\n";
    fs::rename(model / "config.json.tmp", model / "config.json");
  }
  wait_for(model / "config.json");
  RuntimeConfig rc{.batch_size = 4, .dtype = DType::Float32, .tp_degree = tp};
  models::LlamaOptions opts;
  opts.context_buckets = {16, 32};
  opts.max_length = 64;
  InferenceConfig config = models::llama_config(model.string(), rc, opts);
  if (World::get().process() == 0) {
    models::LlamaModel shapes(config, false);
    safetensors::save((model / "model.safetensors").string(), nn::random_state_dict(shapes, 7),
                      {{"format", "pt"}});
  }
  wait_for(model / "model.safetensors");
  models::LlamaForCausalLM app(model.string(), config);
  app.compile(work + "/compiled/llama");
  app.load(work + "/compiled/llama");
  models::GenerationConfig gen;
  gen.max_new_tokens = 12;
  gen.stop_at_eos = false;
  auto r = app.generate(
      {{1, 17, 42}, {1, 150, 3, 3, 8, 21, 250}, {1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45}},
      gen);
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (std::size_t s = 0; s < r.tokens.size(); ++s) {
    tensors.emplace_back(
        "tokens" + std::to_string(s),
        Tensor::from_vector_i64(r.tokens[s], {static_cast<std::int64_t>(r.tokens[s].size())}));
  }
  save_outputs(out, tensors);
}

void run_llava(const std::string& work, const std::string& out, int tp) {
  const fs::path model = fs::path(work) / "llava";
  const std::int64_t image_token = 10;
  if (World::get().process() == 0) {
    fs::create_directories(model);
    nlohmann::json text = {{"model_type", "mistral"}, {"hidden_size", 64}, {"intermediate_size", 128},
                           {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                           {"hidden_act", "silu"}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
                           {"vocab_size", 300}, {"max_position_embeddings", 256}, {"tie_word_embeddings", false},
                           {"eos_token_id", 2}};
    nlohmann::json vision = {{"model_type", "pixtral"}, {"hidden_size", 32}, {"intermediate_size", 64},
                             {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_channels", 3},
                             {"image_size", 32}, {"patch_size", 8}, {"hidden_act", "gelu"}};
    nlohmann::json cfg = {{"architectures", {"LlavaForConditionalGeneration"}}, {"image_token_index", image_token},
                          {"vision_feature_layer", -1}, {"vision_feature_select_strategy", "full"},
                          {"text_config", text}, {"vision_config", vision}};
    std::ofstream(model / "config.json.tmp") << cfg.dump(2) << "\n";
    fs::rename(model / "config.json.tmp", model / "config.json");
  }
  wait_for(model / "config.json");
  RuntimeConfig rc{.batch_size = 2, .dtype = DType::Float32, .tp_degree = tp};
  models::LlavaOptions opts;
  opts.text.context_buckets = {32};
  opts.text.max_length = 64;
  opts.image_height = 32;  // 4 x 4 patches
  opts.image_width = 24;   // 4 x 3
  InferenceConfig config = models::llava_config(model.string(), rc, opts);
  if (World::get().process() == 0) {
    safetensors::save((model / "model.safetensors").string(), models::llava_random_state_dict(config, 7),
                      {{"format", "pt"}});
  }
  wait_for(model / "model.safetensors");
  models::LlavaForConditionalGeneration app(model.string(), config);
  app.compile(work + "/compiled/llava");
  app.load(work + "/compiled/llava");
  const Tensor pixels = Tensor::randn({2, 3, 32, 24}, 5);
  std::vector<std::vector<std::int64_t>> prompts = {{1}, {1, 150}};
  for (auto& p : prompts) {
    p.insert(p.end(), static_cast<std::size_t>(app.image_tokens()), image_token);
    p.push_back(17);
  }
  const Tensor features = app.vision_encoder().forward({pixels}).ranked().to_host().at(0);
  models::GenerationConfig gen;
  gen.max_new_tokens = 8;
  gen.stop_at_eos = false;
  auto r = app.generate(prompts, pixels, gen);
  std::vector<std::pair<std::string, Tensor>> tensors{{"features", features}};
  for (std::size_t s = 0; s < r.tokens.size(); ++s) {
    tensors.emplace_back("tokens" + std::to_string(s),
                         Tensor::from_vector_i64(r.tokens[s], {static_cast<std::int64_t>(r.tokens[s].size())}));
  }
  save_outputs(out, tensors);
}

void run_dit(const std::string& work, const std::string& out, int tp) {
  const fs::path model = fs::path(work) / "dit";
  if (World::get().process() == 0) {
    fs::create_directories(model / "transformer");
    fs::create_directories(model / "scheduler");
    nlohmann::json transformer = {{"num_attention_heads", 4}, {"attention_head_dim", 8}, {"in_channels", 4},
                                  {"out_channels", 8}, {"num_layers", 2}, {"sample_size", 8}, {"patch_size", 2},
                                  {"num_embeds_ada_norm", 10}};
    nlohmann::json scheduler = {{"_class_name", "DDIMScheduler"}, {"clip_sample", true}};
    std::ofstream(model / "scheduler" / "scheduler_config.json.tmp") << scheduler.dump(2) << "\n";
    fs::rename(model / "scheduler" / "scheduler_config.json.tmp", model / "scheduler" / "scheduler_config.json");
    std::ofstream(model / "transformer" / "config.json.tmp") << transformer.dump(2) << "\n";
    fs::rename(model / "transformer" / "config.json.tmp", model / "transformer" / "config.json");
  }
  wait_for(model / "transformer" / "config.json");
  RuntimeConfig rc{.batch_size = 2, .dtype = DType::Float32, .tp_degree = tp};
  InferenceConfig config = models::dit_config(model.string(), rc);
  const fs::path weights = model / "transformer" / "diffusion_pytorch_model.safetensors";
  if (World::get().process() == 0) safetensors::save(weights.string(), models::dit_random_state_dict(config, 7), {{"format", "pt"}});
  wait_for(weights);
  models::DiTPipeline pipe(model.string(), config);
  pipe.compile(work + "/compiled/dit");
  pipe.load(work + "/compiled/dit");
  std::vector<std::pair<std::string, Tensor>> tensors;
  pipe.generate({3, 7}, Tensor::randn({2, 4, 8, 8}, 5), 6, 4.0,
                [&](std::int64_t step, std::int64_t, std::int64_t, const RankedTensors& latents) {
                  tensors.emplace_back("latents" + std::to_string(step), latents.to_host().at(0));
                });
  save_outputs(out, tensors);
}

/// Runs `f`; a devpipe error is written to OUT.p<process>.json with the seconds since `since`.
int record_error(const std::string& out, const std::function<void()>& f,
                 const std::chrono::steady_clock::time_point* since) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    double s =
        since ? std::chrono::duration<double>(std::chrono::steady_clock::now() - *since).count()
              : 0;
    std::ofstream(out + suffix() + ".json")
        << nlohmann::json{{"error", e.what()}, {"seconds", s}}.dump() << "\n";
    std::cerr << "mpi_worker" << suffix() << ": " << e.what() << "\n";
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: mpi_worker seed|mlp|bcast|two|llama|llava|dit|hang|kill|mismatch WORK OUT TP\n";
    return 2;
  }
  const std::string scenario = argv[1], work = argv[2], out = argv[3];
  const int tp = std::stoi(argv[4]);
  try {
    fs::create_directories(work);
    if (scenario == "seed") {
      run_seed(work, out, tp);
    } else if (scenario == "mlp") {
      run_mlp(work, out, tp, 4);
    } else if (scenario == "bcast") {
      run_mlp(work, out, tp, 4, {}, /*broadcast_inputs=*/true);
    } else if (scenario == "two") {
      run_two_groups(work, out, tp);
    } else if (scenario == "llama") {
      run_llama(work, out, tp);
    } else if (scenario == "llava") {
      run_llava(work, out, tp);
    } else if (scenario == "dit") {
      run_dit(work, out, tp);
    } else if (scenario == "hang" || scenario == "kill") {
      std::chrono::steady_clock::time_point start;
      return record_error(
          out,
          [&] {
            run_mlp(work, out, tp, 4, [&] {
              if (World::get().process() == 1) {
                if (scenario == "kill") ::raise(SIGKILL);
                std::this_thread::sleep_for(std::chrono::hours(1));
              }
              start = std::chrono::steady_clock::now();
            });
          },
          &start);
    } else if (scenario == "mismatch") {
      return record_error(
          out, [&] { run_mlp(work, out, tp, World::get().process() == 1 ? 8 : 4); }, nullptr);
    } else {
      std::cerr << "mpi_worker: unknown scenario '" << scenario << "'\n";
      return 2;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "mpi_worker" << suffix() << ": " << e.what() << "\n";
    return 1;
  }
}
