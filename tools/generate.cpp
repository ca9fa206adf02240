// devpipe generate: token ids from a Hugging Face Llama folder, or a vision-language one
// (LlavaForConditionalGeneration with a Pixtral vision tower) with one image per prompt.
//
//   devpipe generate --model DIR --prompt-ids 1,17,42 [--prompt-ids 1,150 ...]
//                    [--pixel-values FILE] (a Llava folder: float32 "pixel_values" [n, C, H, W])
//                    [--max-new-tokens 32] [--tp N] [--dtype float32|bfloat16] [--json]
//                    [--work DIR] [--temperature T --top-k K --top-p P --seed S]
//                    [--cache-buckets 128,256,512]
//
// The folder is compiled on first use into DIR/devpipe_compiled/<tp, dtype, batch, cache
// length, cache buckets, context buckets[, image size]> (or under --work) and loaded from there
// afterwards. One --prompt-ids per sequence; in a Llava folder's prompts the item `img` stands
// for the image's run of image tokens.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "cli_common.h"
#include "devpipe/devpipe.h"
#include "devpipe/models/llama.h"
#include "devpipe/models/llava.h"
#include "options.h"

namespace fs = std::filesystem;

namespace devpipe::cli {

namespace {

std::int64_t round_up_pow2(std::int64_t n) {
  std::int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

constexpr const char* kImageWord = "img";  // a --prompt-ids item: the image's run of image tokens

/// Whether config.json describes a LlavaForConditionalGeneration (its architectures name it, or
/// it has a "vision_config" object). A folder without a readable config.json counts as a Llama
/// one, whose loading names the problem.
bool is_llava_folder(const std::string& model) {
  std::ifstream f(fs::path(model) / "config.json");
  if (!f) return false;
  const nlohmann::json j = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return false;
  if (j.contains("vision_config") && j["vision_config"].is_object()) return true;
  if (!j.contains("architectures") || !j["architectures"].is_array()) return false;
  for (const auto& a : j["architectures"]) {
    if (a == "LlavaForConditionalGeneration") return true;
  }
  return false;
}

/// The float32 tensor "pixel_values" [prompts, C, H, W] of the safetensors file `path`;
/// InvalidArgument naming the file and the values otherwise.
Tensor read_pixel_values(const std::string& path, std::int64_t prompts, std::int64_t channels) {
  Tensor pv = read_float32_nchw("pixel-values", path, "pixel_values", "[images, channels, height, width]");
  if (pv.dim(0) != prompts || pv.dim(1) != channels) {
    throw InvalidArgument(
        "--pixel-values '" + path + "': \"pixel_values\" " + pv.shape().to_string() + " holds " +
        std::to_string(pv.dim(0)) + " images of " + std::to_string(pv.dim(1)) +
        " channels, expected one image per --prompt-ids (" + std::to_string(prompts) + ") of " +
        std::to_string(channels) + " channels (the vision config's num_channels)");
  }
  return pv;
}

/// The --prompt-ids lists, each `img` item (Llava folders only) expanded to `image_tokens`
/// copies of `image_token`.
std::vector<std::vector<std::int64_t>> read_prompts(const Args& a, bool llava,
                                                    std::int64_t image_token,
                                                    std::int64_t image_tokens) {
  std::vector<std::vector<std::int64_t>> prompts;
  for (const std::string& text : a.get_all("prompt-ids")) {
    std::vector<std::int64_t> p;  // the parser checked the items are integers >= 0 or `img`
    std::stringstream items(text);
    for (std::string item; std::getline(items, item, ',');) {
      if (item != kImageWord) {
        p.push_back(std::stoll(item));
      } else if (llava) {
        p.insert(p.end(), static_cast<std::size_t>(image_tokens), image_token);
      } else {  // as the parser refuses any other word: a Llama folder's prompts are integers
        refuse_value(*a.command().find("prompt-ids"), text);
      }
    }
    prompts.push_back(std::move(p));
  }
  return prompts;
}

}  // namespace

const Command& generate_command() {
  static const Command c{
      .name = "generate",
      .summary = "generate token ids from a Hugging Face Llama or Llava folder (compiled on first use)",
      .options = {{.name = "model", .kind = OptionKind::String, .value = "DIR",
                   .help = "the HF folder: config.json and model.safetensors (or an index)"},
                  {.name = "prompt-ids", .kind = OptionKind::IntList, .value = "1,17,42",
                   .help = "one sequence's prompt token ids; repeat for a batch (Llava: `img` = the image's tokens)",
                   .min = 0, .words = {kImageWord}, .repeatable = true},
                  {.name = "pixel-values", .kind = OptionKind::String, .value = "FILE",
                   .help = "Llava folders: a safetensors file with float32 \"pixel_values\" [prompts, C, H, W]"},
                  {.name = "max-new-tokens", .kind = OptionKind::Int, .value = "N",
                   .help = "tokens to generate per sequence (default 32)", .min = 1, .max = 1 << 20},
                  {.name = "tp", .kind = OptionKind::Int, .value = "N", .help = "tp_degree (default 1)", .min = 1,
                   .max = 64},
                  {.name = "dtype", .kind = OptionKind::Choice, .value = "D",
                   .help = "float32 (default) or bfloat16", .choices = {"float32", "bfloat16"}},
                  {.name = "work", .kind = OptionKind::String, .value = "DIR",
                   .help = "where compiled artifacts are kept (default MODEL/devpipe_compiled)"},
                  {.name = "temperature", .kind = OptionKind::String, .value = "T",
                   .help = "sample with this temperature (default 0: greedy)"},
                  {.name = "top-k", .kind = OptionKind::Int, .value = "K", .help = "keep the K best tokens (default all)",
                   .min = 0, .max = 1 << 30},
                  {.name = "top-p", .kind = OptionKind::String, .value = "P",
                   .help = "keep the smallest set of tokens with probability >= P (default 1)"},
                  {.name = "seed", .kind = OptionKind::Int, .value = "S", .help = "sampling seed (default 0)", .min = 0},
                  {.name = "cache-buckets", .kind = OptionKind::IntList, .value = "128,256,512",
                   .help = "token-generation cache-length buckets (default 128, 256, ... up to the cache length); "
                           "the cache is at least as long as the largest",
                   .min = 1, .max = 1 << 30},
                  {.name = "no-eos", .kind = OptionKind::Flag, .help = "do not stop at eos_token_id"},
                  {.name = "json", .kind = OptionKind::Flag,
                   .help = "print one JSON object {\"generated\": [[...], ...], \"tokens_per_s\": ...}"}},
      .notes = "Tokens are streamed as they come (\"<sequence>:<id>\"), then each sequence's ids and tokens/s;\n"
               "with --json only the JSON object is printed on stdout.\n"
               "A vision-language folder (config.json: LlavaForConditionalGeneration, a Pixtral vision_config)\n"
               "needs --pixel-values: image b (as HF's processor returns it) goes with --prompt-ids b, which\n"
               "holds its image tokens, expanded (image_token_index repeated once per feature) or as `img`.\n"
               "The images' H x W is compiled in (a multiple of the patch size, at most the image_size)."};
  return c;
}

int generate_main(const Args& a) {
  if (!a.has("model")) throw UsageError("missing option --model DIR");
  const std::string model = a.get("model", "");
  if (a.get_all("prompt-ids").empty())
    throw UsageError("missing option --prompt-ids (one per sequence)");
  // A Llava folder: its text model's config, its images and the run of image tokens an `img`
  // item stands for.
  const bool llava = is_llava_folder(model);
  std::optional<models::LlavaConfig> vlm;
  Tensor pixel_values;
  std::int64_t image_tokens = 0;
  if (llava) {
    vlm = models::LlavaConfig::from_hf_folder(model);
    if (!a.has("pixel-values")) {
      throw UsageError("missing option --pixel-values FILE (" + model +
                       " is a vision-language folder: LlavaForConditionalGeneration)");
    }
    pixel_values = read_pixel_values(a.get("pixel-values", ""),
                                     static_cast<std::int64_t>(a.get_all("prompt-ids").size()),
                                     vlm->vision.num_channels);
    image_tokens = std::max<std::int64_t>(0, vlm->image_tokens(pixel_values.dim(2), pixel_values.dim(3)));
  } else if (a.has("pixel-values")) {
    throw UsageError("option --pixel-values is for vision-language folders; " + model +
                     " is a Llama folder (config.json names no LlavaForConditionalGeneration nor a "
                     "vision_config)");
  }
  const std::vector<std::vector<std::int64_t>> prompts =
      read_prompts(a, llava, vlm ? vlm->image_token_index : 0, image_tokens);
  const bool json_out = a.has("json");
  models::GenerationConfig gen;
  gen.max_new_tokens = a.get_int("max-new-tokens", 32);
  gen.temperature = parse_number(a, "temperature", 0.0, 0.0, 1e6);
  gen.top_k = a.get_int("top-k", 0);
  gen.top_p = parse_number(a, "top-p", 1.0, 0.0, 1.0);
  gen.seed = static_cast<std::uint64_t>(a.get_int("seed", 0));
  gen.stop_at_eos = !a.has("no-eos");

  const models::LlamaConfig hf = vlm ? vlm->text : models::LlamaConfig::from_hf_folder(model);
  std::int64_t longest = 0;  // image tokens included
  for (const auto& p : prompts) longest = std::max<std::int64_t>(longest, static_cast<std::int64_t>(p.size()));
  RuntimeConfig rc;
  rc.batch_size = static_cast<std::int64_t>(prompts.size());
  rc.tp_degree = static_cast<int>(a.get_int("tp", 1));
  rc.dtype = dtype_from_name(a.get("dtype", "float32"));
  models::LlamaOptions opts;
  // The cache holds the longest prompt and its new tokens (a power of two, at most the model's
  // positions); context buckets up to it.
  opts.max_length = std::min(hf.max_position_embeddings, round_up_pow2(longest + gen.max_new_tokens));
  for (long long b : a.get_ints("cache-buckets")) opts.cache_buckets.push_back(b);
  if (!opts.cache_buckets.empty()) {  // the cache holds the largest bucket (llama_config refuses one past the model)
    const std::int64_t largest = *std::max_element(opts.cache_buckets.begin(), opts.cache_buckets.end());
    opts.max_length = std::max(opts.max_length, std::min(largest, hf.max_position_embeddings));
  }
  // A Llava prompt holds at least its image's tokens: shorter context buckets would never run.
  std::vector<std::int64_t> ctx;
  for (std::int64_t b : {16, 32, 64, 128}) {
    if (b <= opts.max_length && b >= image_tokens) ctx.push_back(b);
  }
  if (ctx.empty() || ctx.back() < longest) ctx.push_back(std::min(opts.max_length, round_up_pow2(longest)));
  opts.context_buckets = ctx;
  const InferenceConfig config =
      vlm ? models::llava_config(model, rc,
                                 models::LlavaOptions{.text = opts,
                                                      .image_height = pixel_values.dim(2),
                                                      .image_width = pixel_values.dim(3)})
          : models::llama_config(model, rc, opts);

  std::string key = "tp" + std::to_string(rc.tp_degree) + "_" + std::string(dtype_name(rc.dtype)) + "_b" +
                    std::to_string(rc.batch_size) + "_len" + std::to_string(opts.max_length) + "_cache";
  for (std::int64_t b : config.get_ints("cache_buckets")) key += "-" + std::to_string(b);
  key += "_ctx";  // they follow the longest prompt: another set is another artifact, not a recompile
  for (std::int64_t b : config.get_ints("context_buckets")) key += "-" + std::to_string(b);
  if (vlm)
    key += "_img" + std::to_string(pixel_values.dim(2)) + "x" + std::to_string(pixel_values.dim(3));
  const fs::path art = compiled_dir(a, model, key);
  // The application and its generate() call; the request is checked before compiling anything.
  std::unique_ptr<ApplicationBase> app;
  std::function<models::GenerationResult(const models::TokenCallback&)> generate;
  if (vlm) {
    auto llava_app = std::make_unique<models::LlavaForConditionalGeneration>(model, config);
    llava_app->check_request(prompts, pixel_values, gen);
    generate = [&, m = llava_app.get()](const models::TokenCallback& on_token) {
      return m->generate(prompts, pixel_values, gen, on_token);
    };
    app = std::move(llava_app);
  } else {
    auto llama_app = std::make_unique<models::LlamaForCausalLM>(model, config);
    llama_app->check_request(prompts, gen);
    generate = [&, m = llama_app.get()](const models::TokenCallback& on_token) {
      return m->generate(prompts, gen, on_token);
    };
    app = std::move(llama_app);
  }
  app->set_progress(print_progress);
  load_or_compile(*app, art, model);

  std::int64_t printed_step = -1;
  models::TokenCallback stream;
  std::vector<std::int64_t> seen(prompts.size(), 0);
  if (!json_out) {
    stream = [&](std::int64_t s, std::int64_t id) {
      const std::int64_t step = seen[static_cast<std::size_t>(s)]++;
      if (step != printed_step) {
        if (printed_step >= 0) std::cout << "\n";
        printed_step = step;
      }
      std::cout << s << ":" << id << " " << std::flush;
    };
  }
  models::GenerationResult r = generate(stream);
  const double tps = r.seconds > 0 ? static_cast<double>(r.generated) / r.seconds : 0.0;
  if (json_out) {
    nlohmann::json j = {{"generated", r.tokens}, {"tokens_per_s", tps}};
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << "\n";
  for (std::size_t s = 0; s < r.tokens.size(); ++s) {
    std::cout << "sequence " << s << ":";
    for (std::int64_t id : r.tokens[s]) std::cout << " " << id;
    std::cout << "\n";
  }
  std::printf("%lld tokens in %.3f s: %.1f tokens/s (tp_degree %d, %s)\n", static_cast<long long>(r.generated),
              r.seconds, tps, rc.tp_degree, std::string(dtype_name(rc.dtype)).c_str());
  return 0;
}

}  // namespace devpipe::cli
