// devpipe diffuse: class-conditional latents from a diffusers DiTPipeline folder (the DiT
// transformer, DDIM, classifier-free guidance; devpipe/models/dit.h).
//
//   devpipe diffuse --model DIR --class-labels 3,7 [--steps 50] [--guidance 4.0]
//                   [--seed 0 | --latents FILE] [--out FILE.safetensors] [--tp N]
//                   [--work DIR] [--json]
//
// The folder is compiled on first use into DIR/devpipe_compiled/<tp, dtype, batch, guidance on
// or off> (or under --work) and loaded from there afterwards. The batch is one image per class
// label; the steps and the guidance scale are inputs of the compiled stage, so other values
// reuse the artifact (only crossing guidance 1 compiles the other variant).
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_common.h"
#include "devpipe/devpipe.h"
#include "devpipe/models/dit.h"
#include "options.h"

namespace fs = std::filesystem;

namespace devpipe::cli {

namespace {

std::string joined(const std::vector<std::int64_t>& v) {
  std::string s;
  for (std::int64_t x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

/// The initial latents of `--latents FILE`: float32 "latents" [images, in_channels, S, S];
/// InvalidArgument naming the file and the values otherwise.
Tensor read_latents(const std::string& path, std::int64_t images, const models::DiTConfig& cfg) {
  Tensor x = read_float32_nchw("latents", path, "latents", "[images, channels, height, width]");
  const Shape want{images, cfg.in_channels, cfg.sample_size, cfg.sample_size};
  if (x.shape() != want) {
    throw InvalidArgument(
        "--latents '" + path + "': \"latents\" is " + x.shape().to_string() + ", expected " +
        want.to_string() + ": one per --class-labels (" + std::to_string(images) +
        ") of in_channels " + std::to_string(cfg.in_channels) + " x sample_size " +
        std::to_string(cfg.sample_size) + " x " + std::to_string(cfg.sample_size));
  }
  return x;
}

}  // namespace

const Command& diffuse_command() {
  static const Command c{
      .name = "diffuse",
      .summary = "denoise latents with a diffusers DiTPipeline folder (compiled on first use)",
      .options =
          {{.name = "model",
            .kind = OptionKind::String,
            .value = "DIR",
            .help = "the diffusers folder: transformer/ (config.json, safetensors) and scheduler/"},
           {.name = "class-labels",
            .kind = OptionKind::IntList,
            .value = "3,7",
            .help = "one ImageNet-style class id per image (in [0, num_embeds_ada_norm))",
            .min = 0},
           {.name = "steps",
            .kind = OptionKind::Int,
            .value = "N",
            .help = "DDIM steps (default 50)",
            .min = 1,
            .max = 1 << 20},
           {.name = "guidance",
            .kind = OptionKind::String,
            .value = "G",
            .help =
                "classifier-free guidance scale (default 4.0); <= 1 compiles the pipeline without"},
           {.name = "seed",
            .kind = OptionKind::Int,
            .value = "S",
            .help = "seed of the initial noise (default 0; devpipe's Tensor::randn, not torch's "
                    "generator)",
            .min = 0},
           {.name = "latents",
            .kind = OptionKind::String,
            .value = "FILE",
            .help = "initial latents instead: a safetensors file with float32 \"latents\" [images, "
                    "C, S, S]"},
           {.name = "out",
            .kind = OptionKind::String,
            .value = "FILE",
            .help = "write the final latents there (safetensors, float32 \"latents\" [images, C, "
                    "S, S])"},
           {.name = "tp",
            .kind = OptionKind::Int,
            .value = "N",
            .help = "tp_degree (default 1)",
            .min = 1,
            .max = 64},
           {.name = "work",
            .kind = OptionKind::String,
            .value = "DIR",
            .help = "where compiled artifacts are kept (default MODEL/devpipe_compiled)"},
           {.name = "json",
            .kind = OptionKind::Flag,
            .help = "print one JSON object {\"timesteps\": [...], \"seconds\": ..., "
                    "\"steps_per_s\": ..., "
                    "\"out\": ...}"}},
      .notes =
          "A progress line per finished step goes to stderr; stdout gets the timesteps run, the "
          "seconds\n"
          "and steps/s (with --json only the JSON object; \"out\" is null without --out).\n"
          "The initial noise of --seed is standard normal from devpipe's own generator, not "
          "torch's:\n"
          "to reproduce a diffusers run exactly, save its initial latents and pass them with "
          "--latents.\n"
          "The output holds the latents (key latents) and, when the folder has a vae/, the\n"
          "decoded images in [0, 1] (key images, [n, 3, H, W]); it is replaced atomically.\n"};
  return c;
}

int diffuse_main(const Args& a) {
  if (!a.has("model")) throw UsageError("missing option --model DIR");
  if (!a.has("class-labels"))
    throw UsageError("missing option --class-labels (one class id per image)");
  if (a.has("seed") && a.has("latents"))
    throw UsageError("options --seed and --latents exclude each other");
  const std::string model = a.get("model", "");
  std::vector<std::int64_t> labels;
  for (long long c : a.get_ints("class-labels")) labels.push_back(c);
  const auto images = static_cast<std::int64_t>(labels.size());
  const std::int64_t steps = a.get_int("steps", 50);
  const double guidance = parse_number(a, "guidance", 4.0, 0.0, 1e6);
  const bool guided = guidance > 1;  // as diffusers: guidance_scale <= 1 runs the classes alone
  const bool json_out = a.has("json");
  const std::string out = a.get("out", "");
  if (!out.empty()) {  // before hours of denoising, not after
    const fs::path parent = fs::path(out).parent_path();
    if (!parent.empty() && !fs::is_directory(parent))
      throw InvalidArgument("--out '" + out + "': the folder '" + parent.string() +
                            "' does not exist");
  }

  RuntimeConfig rc;
  rc.batch_size = images;
  rc.tp_degree = static_cast<int>(a.get_int("tp", 1));
  rc.dtype =
      DType::Float32;  // DiTPipeline's denoiser does not compile in bfloat16 yet (a float32 mul)
  const InferenceConfig config = models::dit_config(model, rc, guided);
  models::DiTPipeline pipe(model, config);
  const models::DiTConfig& cfg = pipe.transformer_config();
  const Tensor latents =
      a.has("latents") ? read_latents(a.get("latents", ""), images, cfg)
                       : Tensor::randn({images, cfg.in_channels, cfg.sample_size, cfg.sample_size},
                                       static_cast<std::uint64_t>(a.get_int("seed", 0)));
  pipe.check_request(labels, latents, steps, guidance);  // before compiling anything

  const std::string key = "tp" + std::to_string(rc.tp_degree) + "_" +
                          std::string(dtype_name(rc.dtype)) + "_b" + std::to_string(images) +
                          (guided ? "_guidance" : "_noguidance") + (pipe.has_vae() ? "_vae" : "");
  const fs::path art = compiled_dir(a, model, key);
  pipe.set_progress(print_progress);
  load_or_compile(pipe, art, model);

  // A line per step once it has run (waiting for a step's latents leaves them on the devices).
  const models::DiffusionResult r = pipe.generate(
      labels, latents, steps, guidance,
      [](std::int64_t step, std::int64_t total, std::int64_t t, const RankedTensors& x) {
        x.wait();
        print_progress("denoise", static_cast<int>(step), static_cast<int>(total),
                       "step " + std::to_string(step) + "/" + std::to_string(total) +
                           " t=" + std::to_string(t));
      });
  if (!out.empty()) {
    std::vector<std::pair<std::string, Tensor>> saved{{"latents", r.latents}};
    if (r.images.defined()) saved.emplace_back("images", r.images);  // the folder's vae decoded them
    safetensors::save(out, saved,
                      {{"class_labels", joined(labels)},
                       {"timesteps", joined(r.timesteps)},
                       {"guidance_scale", std::to_string(guidance)}});
  }
  const double sps = r.seconds > 0 ? static_cast<double>(r.timesteps.size()) / r.seconds : 0.0;
  if (json_out) {
    const nlohmann::json j = {{"timesteps", r.timesteps},
                              {"seconds", r.seconds},
                              {"steps_per_s", sps},
                              {"images", r.images.defined() ? nlohmann::json(r.images.shape().dims()) : nlohmann::json(nullptr)},
                              {"out", out.empty() ? nlohmann::json(nullptr) : nlohmann::json(out)}};
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << "timesteps:";
  for (std::int64_t t : r.timesteps) std::cout << " " << t;
  std::cout << "\n";
  std::printf("%lld steps of %lld images in %.3f s: %.2f steps/s (tp_degree %d, %s, guidance %s)\n",
              static_cast<long long>(r.timesteps.size()), static_cast<long long>(images), r.seconds,
              sps, rc.tp_degree, std::string(dtype_name(rc.dtype)).c_str(),
              guided ? a.get("guidance", "4.0").c_str() : "off");
  if (!out.empty())
    std::cout << "wrote latents " << r.latents.shape().to_string() << " to " << out << "\n";
  return 0;
}

}  // namespace devpipe::cli
