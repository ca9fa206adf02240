// What the language-model tests share about their PyTorch twins' outputs (llama_ref.py and
// pixtral_ref.py `run`): the files, the rows to compare, and the cache of twin folders.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "devpipe/devpipe.h"
#include "devpipe/models/llama.h"
#include "test_util.h"

namespace devpipe::testing {

/// A twin's `run` output: PREFIX.safetensors's tensors and PREFIX.json's generated ids.
struct Twin {
  std::map<std::string, Tensor> t;
  std::vector<std::vector<std::int64_t>> generated;
};

inline Twin load_twin(const std::string& prefix) {
  Twin tw;
  tw.t = safetensors::load_all(prefix + ".safetensors");
  std::ifstream f(prefix + ".json");
  nlohmann::json j = nlohmann::json::parse(f);
  tw.generated = j.at("generated").get<std::vector<std::vector<std::int64_t>>>();
  return tw;
}

/// Step s of a twin's decode logits [S, B, V], as [B, V].
inline Tensor decode_step(const Tensor& dec, std::int64_t s) {
  const std::vector<float> all = dec.to_float_vector();
  const std::int64_t n = dec.dim(1) * dec.dim(2);
  return Tensor::from_vector(std::vector<float>(all.begin() + s * n, all.begin() + (s + 1) * n), {dec.dim(1), dec.dim(2)});
}

/// Rows [b, t < length of prompt b] of logits [B, T, V] (the real prompt positions), as
/// [sum(len), V].
inline Tensor prompt_rows(const Tensor& logits, const std::vector<std::vector<std::int64_t>>& prompts) {
  const std::int64_t V = logits.dim(2), T = logits.dim(1);
  std::vector<float> all = logits.to_float_vector(), out;
  for (std::size_t b = 0; b < prompts.size(); ++b) {
    for (std::size_t t = 0; t < prompts[b].size(); ++t) {
      auto row = all.begin() + static_cast<std::ptrdiff_t>((static_cast<std::int64_t>(b) * T + static_cast<std::int64_t>(t)) * V);
      out.insert(out.end(), row, row + V);
    }
  }
  return Tensor::from_vector(out, {static_cast<std::int64_t>(out.size()) / V, V});
}

/// Every token, every real prefill logit and every decode step's logits of a generate() with
/// LlamaOptions::output_logits and `new_tokens` new tokens per prompt against the twin's.
inline void expect_generation_matches(const models::GenerationResult& r, const Twin& tw,
                                      const std::vector<std::vector<std::int64_t>>& prompts, std::int64_t new_tokens,
                                      double rtol, double atol) {
  ASSERT_EQ(r.tokens.size(), prompts.size());
  EXPECT_EQ(r.tokens, tw.generated);
  const Tensor& want_prefill = tw.t.at("prefill_logits");
  ASSERT_EQ(r.prefill_logits.shape(), want_prefill.shape());
  EXPECT_TRUE(tensors_close(prompt_rows(r.prefill_logits, prompts), prompt_rows(want_prefill, prompts), rtol, atol));
  const Tensor& dec = tw.t.at("decode_logits");
  ASSERT_EQ(static_cast<std::int64_t>(r.decode_logits.size()), new_tokens - 1);
  for (std::int64_t s = 0; s + 1 < new_tokens; ++s) {
    SCOPED_TRACE("decode step " + std::to_string(s));
    EXPECT_TRUE(tensors_close(r.decode_logits[static_cast<std::size_t>(s)], decode_step(dec, s), rtol, atol));
  }
}

/// The folder `<cwd>/<name>_<hash of the reference scripts' text and `args`>` holding what
/// `make(tmp)` writes into a fresh folder: made once per build tree (each gtest case is its own
/// ctest entry, so once per suite would be once per case), written beside and renamed into place
/// (a process that loses the race uses the winner's copy). `make` returns false on failure.
inline std::filesystem::path cached_twin_dir(const std::string& name, const std::vector<std::string>& scripts,
                                             const std::string& args,
                                             const std::function<bool(const std::filesystem::path&)>& make) {
  std::stringstream text;
  for (const auto& s : scripts) text << std::ifstream(std::string(DEVPIPE_REFERENCE_DIR) + "/" + s).rdbuf();
  text << args;
  char key[32];
  std::snprintf(key, sizeof key, "%016zx", std::hash<std::string>{}(text.str()));
  const std::filesystem::path dir = std::filesystem::current_path() / (name + "_" + key);
  if (std::filesystem::exists(dir / "done")) return dir;
  const std::filesystem::path tmp = dir.string() + ".tmp." + std::to_string(::getpid());
  std::filesystem::create_directories(tmp);
  if (!make(tmp)) throw std::runtime_error("the reference scripts failed writing " + tmp.string());
  std::ofstream(tmp / "done") << "ok\n";
  std::error_code ec;
  std::filesystem::rename(tmp, dir, ec);
  if (ec) std::filesystem::remove_all(tmp, ec);
  return dir;
}

}  // namespace devpipe::testing
