// A diffusion model end to end: writes a small random DiT pipeline as a diffusers folder
// (transformer/config.json and diffusion_pytorch_model.safetensors with DiTTransformer2DModel's
// names, scheduler/scheduler_config.json for DDIM), compiles it at tp_degree 2, and denoises two
// images of classes 3 and 7 over 10 steps with classifier-free guidance. Each step's latents go
// to the next step on the ranks' devices; only the last step's come back to the host.
//
//   diffusion_example [OUT_DIR]   (default: diffusion_example)
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "devpipe/devpipe.h"
#include "devpipe/models/dit.h"

using namespace devpipe;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  try {
    const fs::path out = argc > 1 ? argv[1] : "diffusion_example";
    const fs::path model = out / "model";
    fs::create_directories(model / "transformer");
    fs::create_directories(model / "scheduler");
    // 1. The diffusers folder: DiT-XL/2-256's layout at a toy size (2 heads of 16, 2 blocks,
    //    4 x 8 x 8 latents in patches of 2, learned sigma, 10 classes) and DDIM's settings.
    nlohmann::json transformer = {{"_class_name", "DiTTransformer2DModel"}, {"num_attention_heads", 2},
                                  {"attention_head_dim", 16}, {"in_channels", 4}, {"out_channels", 8},
                                  {"num_layers", 2}, {"sample_size", 8}, {"patch_size", 2},
                                  {"activation_fn", "gelu-approximate"}, {"num_embeds_ada_norm", 10},
                                  {"norm_type", "ada_norm_zero"}, {"norm_elementwise_affine", false},
                                  {"norm_eps", 1e-5}, {"attention_bias", true}};
    nlohmann::json scheduler = {{"_class_name", "DDIMScheduler"}, {"num_train_timesteps", 1000},
                                {"beta_start", 0.0001}, {"beta_end", 0.02}, {"beta_schedule", "linear"},
                                {"clip_sample", true}, {"set_alpha_to_one", true}, {"steps_offset", 0},
                                {"prediction_type", "epsilon"}, {"timestep_spacing", "leading"}};
    std::ofstream(model / "transformer" / "config.json") << transformer.dump(2) << "\n";
    std::ofstream(model / "scheduler" / "scheduler_config.json") << scheduler.dump(2) << "\n";
    RuntimeConfig rc{.batch_size = 2, .dtype = DType::Float32, .tp_degree = 2};
    InferenceConfig config = models::dit_config(model.string(), rc);
    {
      auto weights = models::dit_random_state_dict(config, 7);
      safetensors::save((model / "transformer" / "diffusion_pytorch_model.safetensors").string(), weights,
                        {{"format", "pt"}});
      std::cout << "wrote " << weights.size() << " tensors to " << (model / "transformer").string() << "\n";
    }
    // 2. Compile and load the denoiser stage.
    models::DiTPipeline pipe(model.string(), config);
    pipe.compile((out / "compiled").string());
    pipe.load((out / "compiled").string());
    // 3. Denoise: noise in, latents out; a line per step.
    const Tensor noise = Tensor::randn({2, 4, 8, 8}, 3);
    reset_transfer_stats();
    auto r = pipe.generate({3, 7}, noise, 10, 4.0, [](std::int64_t step, std::int64_t steps, std::int64_t t, const RankedTensors&) {
      std::cout << "step " << step << "/" << steps << " t=" << t << "\n";
    });
    const TransferStats st = transfer_stats();
    // What came down was the last latents only; what went up, the first latents and each step's
    // labels, timesteps and coefficients (on the cpu backend these are read in place).
    std::cout << "latents moved between steps: "
              << st.device_to_host_bytes - static_cast<std::uint64_t>(r.latents.numel()) * 4 << " bytes\n";
    double sum = 0, sq = 0;
    const std::vector<float> v = r.latents.to_float_vector();
    for (float x : v) {
      sum += x;
      sq += static_cast<double>(x) * x;
    }
    const double mean = sum / static_cast<double>(v.size());
    std::cout << "latents " << r.latents.shape().to_string() << ": mean " << mean << ", std "
              << std::sqrt(sq / static_cast<double>(v.size()) - mean * mean) << ", " << r.timesteps.size()
              << " steps in " << r.seconds << " s\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "diffusion_example: " << e.what() << "\n";
    return 1;
  }
}
