// devpipe generate: token ids from a Hugging Face Llama folder.
//
//   devpipe generate --model DIR --prompt-ids 1,17,42 [--prompt-ids 1,150 ...]
//                    [--max-new-tokens 32] [--tp N] [--dtype float32|bfloat16] [--json]
//                    [--work DIR] [--temperature T --top-k K --top-p P --seed S]
//                    [--cache-buckets 128,256,512]
//
// The folder is compiled on first use into DIR/devpipe_compiled/<tp, dtype, batch, cache
// length, cache buckets> (or under --work) and loaded from there afterwards. One --prompt-ids
// per sequence.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "cli_common.h"
#include "devpipe/devpipe.h"
#include "devpipe/models/llama.h"
#include "options.h"

namespace fs = std::filesystem;

namespace devpipe::cli {

namespace {

double parse_number(const Args& a, const std::string& name, double fallback, double lo, double hi) {
  if (!a.has(name)) return fallback;
  const std::string text = a.get(name, "");
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || !(v >= lo && v <= hi)) {
    throw UsageError("option --" + name + " expects a number in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "], got '" + text + "'");
  }
  return v;
}

std::int64_t round_up_pow2(std::int64_t n) {
  std::int64_t p = 1;
  while (p < n) p *= 2;
  return p;
}

}  // namespace

const Command& generate_command() {
  static const Command c{
      .name = "generate",
      .summary = "generate token ids from a Hugging Face Llama folder (compiled on first use)",
      .options = {{.name = "model", .kind = OptionKind::String, .value = "DIR",
                   .help = "the HF folder: config.json and model.safetensors (or an index)"},
                  {.name = "prompt-ids", .kind = OptionKind::IntList, .value = "1,17,42",
                   .help = "one sequence's prompt token ids; repeat for a batch", .min = 0,
                   .repeatable = true},
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
               "with --json only the JSON object is printed on stdout."};
  return c;
}

int generate_main(const Args& a) {
  if (!a.has("model")) throw UsageError("missing option --model DIR");
  const std::string model = a.get("model", "");
  std::vector<std::vector<std::int64_t>> prompts;
  for (const std::string& text : a.get_all("prompt-ids")) {
    std::vector<std::int64_t> p;  // the parser checked the items are integers >= 0
    std::stringstream items(text);
    for (std::string item; std::getline(items, item, ',');) p.push_back(std::stoll(item));
    prompts.push_back(std::move(p));
  }
  if (prompts.empty()) throw UsageError("missing option --prompt-ids (one per sequence)");
  const bool json_out = a.has("json");
  models::GenerationConfig gen;
  gen.max_new_tokens = a.get_int("max-new-tokens", 32);
  gen.temperature = parse_number(a, "temperature", 0.0, 0.0, 1e6);
  gen.top_k = a.get_int("top-k", 0);
  gen.top_p = parse_number(a, "top-p", 1.0, 0.0, 1.0);
  gen.seed = static_cast<std::uint64_t>(a.get_int("seed", 0));
  gen.stop_at_eos = !a.has("no-eos");

  models::LlamaConfig hf = models::LlamaConfig::from_hf_folder(model);
  std::int64_t longest = 0;
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
  std::vector<std::int64_t> ctx;
  for (std::int64_t b : {16, 32, 64, 128}) {
    if (b <= opts.max_length) ctx.push_back(b);
  }
  if (ctx.empty() || ctx.back() < longest) ctx.push_back(std::min(opts.max_length, round_up_pow2(longest)));
  opts.context_buckets = ctx;
  InferenceConfig config = models::llama_config(model, rc, opts);

  std::string key = "tp" + std::to_string(rc.tp_degree) + "_" + std::string(dtype_name(rc.dtype)) + "_b" +
                    std::to_string(rc.batch_size) + "_len" + std::to_string(opts.max_length) + "_cache";
  for (std::int64_t b : config.get_ints("cache_buckets")) key += "-" + std::to_string(b);
  const fs::path art = fs::path(a.has("work") ? a.get("work", "") : (fs::path(model) / "devpipe_compiled").string()) / key;
  models::LlamaForCausalLM app(model, config);
  app.check_request(prompts, gen);  // before compiling anything
  app.set_progress(print_progress);
  bool loaded = false;
  if (fs::exists(art / "context_encoding" / "manifest.json") && fs::exists(art / "token_generation" / "manifest.json")) {
    try {
      app.load(art.string());
      loaded = true;
    } catch (const ArtifactMismatch& e) {
      std::cerr << "recompiling: " << e.what() << "\n";
    }
  }
  if (!loaded) {
    std::cerr << "compiling " << model << " into " << art.string() << "\n";
    app.compile(art.string());
    app.load(art.string());
  }

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
  models::GenerationResult r = app.generate(prompts, gen, stream);
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
