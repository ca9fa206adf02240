// Fuzzes an artifact folder through ModelWrapper::load(), the path every user's load takes:
// read_manifest (manifest.json: specs, graphs, weight entries), the per-rank weight files
// (checksum, safetensors, parameter shapes), building every bucket on every rank and the
// warm-up forward.
//
// Input: manifest.json, then weights/rank0.safetensors, weights/rank1.safetensors, ... packed
// with fuzz::pack_files. A mutated weight file almost never matches the checksum its manifest
// records, which would stop every input at the checksum; so, unless the manifest part starts
// with "raw:", the harness first rewrites the checksum of each weights entry that names one of
// the packed files to that file's real checksum (the JSON is re-serialised for that). With
// "raw:" the manifest's bytes are used as they are.
//
// A manifest that read_manifest accepts must say what its JSON says: the integers it reads
// (format_version, tp_degree, each bucket's batch and graph tp_degree, each weight's rank and
// bytes, each parameter's shard_dim) must equal the JSON values, else a bad value was silently
// wrapped or truncated (format_version 2^32+1 read as 1): a finding.
//
// The wrapper is built to match the manifest's tag, dtype, tp_degree and buckets (read with
// read_manifest, as load() reads them), so that mutations reach past the mismatch checks;
// manifests beyond a small resource bound (tp_degree <= 4, at most 4 buckets of at most 64)
// are skipped after read_manifest: a huge model is not a bad file, just a slow input.
#include <devpipe/devpipe.h>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "compiler/artifact.h"
#include "fuzz_util.h"

using namespace devpipe;
namespace fs = std::filesystem;

namespace {

/// load() never calls the model: any module class will do.
struct Unused : nn::Module {
  Var forward(Var x) const { return x; }
};

class FuzzWrapper : public ModelWrapper {
 public:
  FuzzWrapper(const InferenceConfig& config, WrapperOptions options)
      : ModelWrapper(config, model_cls<Unused>(), std::move(options)) {}
  std::vector<std::vector<Tensor>> input_generator() const override { return {}; }
};

/// Rewrites the checksums of the weight entries that name a packed file (see the top).
std::string fix_checksums(std::string_view manifest, const fs::path& dir, std::size_t weight_files) {
  auto j = nlohmann::json::parse(manifest, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object() || !j.contains("weights") || !j["weights"].is_array()) {
    return std::string(manifest);
  }
  for (auto& w : j["weights"]) {
    if (!w.is_object() || !w.contains("file") || !w["file"].is_string()) continue;
    const std::string file = w["file"].get<std::string>();
    for (std::size_t r = 0; r < weight_files; ++r) {
      if (file == "weights/rank" + std::to_string(r) + ".safetensors") {
        w["checksum"] = file_checksum((dir / file).string());
      }
    }
  }
  return j.dump(1, ' ', false, nlohmann::json::error_handler_t::replace);
}

/// Aborts when `read` (what read_manifest made of a field) differs from the JSON value.
void same(const nlohmann::json& value, const nlohmann::json& read, const std::string& field) {
  // nlohmann compares a negative integer and an unsigned one after a cast (-1 == 2^64-1).
  const bool sign_lost = value.is_number_integer() && !value.is_number_unsigned() && value.get<std::int64_t>() < 0 &&
                         read.is_number_unsigned();
  if (sign_lost || !(value == read)) {
    std::fprintf(stderr, "read_manifest accepted %s = %s but read %s\n", field.c_str(), value.dump().c_str(),
                 read.dump().c_str());
    std::abort();
  }
}

void check_read_as_written(const Manifest& m, const fs::path& manifest_path) {
  const auto j = nlohmann::json::parse(fuzz::read_file(manifest_path));
  same(j.at("format_version"), m.format_version, "format_version");
  same(j.at("tp_degree"), m.tp_degree, "tp_degree");
  for (std::size_t b = 0; b < m.buckets.size(); ++b) {
    const auto& jb = j.at("buckets").at(b);
    const std::string at = "buckets[" + std::to_string(b) + "]";
    same(jb.at("batch"), m.buckets[b].batch, at + ".batch");
    same(jb.at("graph").at("tp_degree"), m.buckets[b].graph.tp_degree, at + ".graph.tp_degree");
    for (std::size_t p = 0; p < m.buckets[b].graph.params.size(); ++p) {
      same(jb.at("graph").at("params").at(p).at("shard_dim"), m.buckets[b].graph.params[p].shard_dim,
           at + ".graph.params[" + std::to_string(p) + "].shard_dim");
    }
  }
  for (std::size_t w = 0; w < m.weights.size(); ++w) {
    same(j.at("weights").at(w).at("rank"), m.weights[w].rank, "weights[" + std::to_string(w) + "].rank");
    same(j.at("weights").at(w).at("bytes"), m.weights[w].bytes, "weights[" + std::to_string(w) + "].bytes");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const fs::path dir = fuzz::scratch_dir() / "artifact";
  fs::remove_all(dir);
  fs::create_directories(dir / "weights");
  auto parts = fuzz::split_files(std::string_view(reinterpret_cast<const char*>(data), size));
  for (std::size_t r = 1; r < parts.size(); ++r) {
    fuzz::write_file(dir / ("weights/rank" + std::to_string(r - 1) + ".safetensors"), parts[r]);
  }
  std::string_view manifest = parts[0];
  constexpr std::string_view kRaw = "raw:";
  const bool raw = manifest.substr(0, kRaw.size()) == kRaw;
  if (raw) manifest.remove_prefix(kRaw.size());
  fuzz::write_file(dir / "manifest.json", raw ? std::string(manifest) : fix_checksums(manifest, dir, parts.size() - 1));

  fuzz::expect_only_devpipe_errors("ModelWrapper::load", [&] {
    Manifest m = read_manifest(dir.string());
    check_read_as_written(m, dir / "manifest.json");
    if (m.tp_degree < 1 || m.tp_degree > 4 || m.buckets.size() > 4 || m.tag.empty()) return;
    std::vector<std::int64_t> buckets;
    for (const auto& b : m.buckets) {
      if (b.batch < 1 || b.batch > 64) return;
      buckets.push_back(b.batch);
    }
    RuntimeConfig rc{.batch_size = buckets.front(), .dtype = m.dtype, .tp_degree = m.tp_degree, .buckets = buckets};
    FuzzWrapper w(InferenceConfig(rc), {.pipeline_execution = m.pipeline_execution,
                                        .return_ranked_to_cpu = m.return_ranked_to_cpu,
                                        .tag = m.tag});
    w.load(dir.string());
    for (std::int64_t b : w.loaded_buckets()) (void)w.graph_text(b);
  });
  return 0;
}
