// devpipe — checkpoints: a single safetensors file, or an index plus shards.
#include "io/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "devpipe/error.h"

namespace devpipe {

namespace {

namespace fs = std::filesystem;

constexpr const char* kSingleFile = "model.safetensors";
constexpr const char* kIndexFile = "model.safetensors.index.json";
// diffusers' names for the same two files (a pipeline's transformer/, unet/, vae/ folders).
constexpr const char* kDiffusersFile = "diffusion_pytorch_model.safetensors";
constexpr const char* kDiffusersIndexFile = "diffusion_pytorch_model.safetensors.index.json";
constexpr const char* kPickleFile = "pytorch_model.bin";
constexpr const char* kPickleIndexFile = "pytorch_model.bin.index.json";

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

bool is_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec);
}

/// Reads and parses the index; returns its weight_map as key -> shard file name.
std::map<std::string, std::string> read_index(const fs::path& index_path) {
  const std::string where = "checkpoint index " + in_quotes(index_path.string());
  std::ifstream in(index_path, std::ios::binary);
  if (!in) throw IoError("cannot open " + where);
  std::stringstream buf;
  buf << in.rdbuf();
  if (in.bad()) throw IoError("cannot read " + where);

  nlohmann::json index;
  try {
    index = nlohmann::json::parse(buf.str());
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(where + " is not valid JSON: " + e.what());
  }
  if (!index.is_object()) throw FormatError(where + " is not a JSON object");
  auto it = index.find("weight_map");
  if (it == index.end()) throw FormatError(where + " has no \"weight_map\"");
  if (!it->is_object()) throw FormatError(where + ": \"weight_map\" is not a JSON object");

  std::map<std::string, std::string> map;
  for (const auto& [key, shard] : it->items()) {
    if (!shard.is_string()) {
      throw FormatError(where + ": \"weight_map\" entry " + in_quotes(key) +
                        " is not a file name but " + shard.dump());
    }
    const auto& name = shard.get_ref<const std::string&>();
    // Shards live in the checkpoint folder: refuse absolute paths and escapes via "..".
    fs::path rel(name);
    bool escapes = name.empty() || rel.is_absolute();
    for (const auto& part : rel) escapes = escapes || part == "..";
    if (escapes) {
      throw FormatError(where + ": \"weight_map\" entry " + in_quotes(key) + " names shard " +
                        in_quotes(name) + ", which is not a file inside the checkpoint folder");
    }
    map.emplace(key, name);
  }
  return map;
}

/// `s` as one shell word.
std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// The Unsupported error for a PyTorch pickle checkpoint at `path` (a folder holding
/// pytorch_model.bin or its index, or a .bin file): what to run to convert it to safetensors.
[[noreturn]] void throw_pickle_checkpoint(const fs::path& path, bool is_folder) {
  const fs::path folder = is_folder ? path : path.parent_path();
  // One python3 line for both layouts: a single pickle, or an index naming pickle shards; the
  // tensors are made contiguous and unshared (safetensors refuses tied or strided tensors).
  const std::string files =
      is_folder ? "i = os.path.join(p, '" + std::string(kPickleIndexFile) +
                      "'); fs = [os.path.join(p, f) for f in sorted(set(json.load(open(i))['weight_map']"
                      ".values()))] if os.path.exists(i) else [os.path.join(p, '" + kPickleFile + "')]; "
                      "out = os.path.join(p, '" + kSingleFile + "')"
                : "fs = [p]; out = os.path.join(os.path.dirname(p) or '.', '" + std::string(kSingleFile) + "')";
  const std::string cmd =
      "python3 -c \"import sys, os, json, torch; from safetensors.torch import save_file; p = sys.argv[1]; " +
      files +
      "; sd = {}; [sd.update(torch.load(f, map_location='cpu')) for f in fs]; "
      "save_file({k: v.contiguous().clone() for k, v in sd.items()}, out)\" " +
      shell_quote(path.string());
  std::string what = "checkpoint " + in_quotes(path.string()) + " is";
  if (is_folder) {
    what = "checkpoint folder " + in_quotes(path.string()) + " holds only " +
           (is_file(path / kPickleIndexFile) ? in_quotes(kPickleIndexFile) + " and its shards, which are"
                                              : in_quotes(kPickleFile) + ", which is");
  }
  throw Unsupported(what + " a PyTorch pickle; devpipe reads safetensors only. Convert it to " +
                    in_quotes((folder / kSingleFile).string()) +
                    " (needs `pip install torch safetensors`), for example with `" + cmd +
                    "`, then use " + in_quotes(folder.string()) + " again");
}

}  // namespace

Checkpoint Checkpoint::open(const std::string& path) {
  Checkpoint ck;
  ck.path_ = path;
  std::error_code ec;
  fs::path root(path);
  if (!fs::exists(root, ec)) {
    throw IoError("checkpoint " + in_quotes(path) + " does not exist");
  }

  auto add_whole_file = [&](const fs::path& file) {
    ck.files_.push_back(safetensors::File::open(file.string()));
    for (const auto& name : ck.files_.back().names()) ck.key_to_file_.emplace(name, 0);
  };

  if (!fs::is_directory(root, ec)) {
    if (root.extension() == ".bin") throw_pickle_checkpoint(root, false);
    add_whole_file(root);
    return ck;
  }
  for (const char* single : {kSingleFile, kDiffusersFile}) {
    if (is_file(root / single)) {
      add_whole_file(root / single);
      return ck;
    }
  }
  const fs::path index_path = is_file(root / kIndexFile) || !is_file(root / kDiffusersIndexFile)
                                  ? root / kIndexFile
                                  : root / kDiffusersIndexFile;
  if (!is_file(index_path)) {
    if (is_file(root / kPickleFile) || is_file(root / kPickleIndexFile)) throw_pickle_checkpoint(root, true);
    throw IoError("checkpoint folder " + in_quotes(path) + " has neither " + in_quotes(kSingleFile) +
                  " nor " + in_quotes(kIndexFile) + " (nor diffusers' " + in_quotes(kDiffusersFile) +
                  " or its index)");
  }

  std::map<std::string, std::size_t> shard_ids;  // shard file name -> index into files_
  for (const auto& [key, shard] : read_index(index_path)) {
    auto [it, inserted] = shard_ids.emplace(shard, ck.files_.size());
    if (inserted) {
      const fs::path shard_path = root / shard;
      if (!is_file(shard_path)) {
        throw FormatError("checkpoint index " + in_quotes(index_path.string()) + " maps " +
                          in_quotes(key) + " to shard " + in_quotes(shard) + ", but " +
                          in_quotes(shard_path.string()) + " does not exist");
      }
      ck.files_.push_back(safetensors::File::open(shard_path.string()));
    }
    const safetensors::File& file = ck.files_[it->second];
    if (!file.contains(key)) {
      throw FormatError("checkpoint index " + in_quotes(index_path.string()) + " maps " +
                        in_quotes(key) + " to shard " + in_quotes(file.path()) +
                        ", but that shard has no tensor " + in_quotes(key));
    }
    ck.key_to_file_.emplace(key, it->second);
  }
  return ck;
}

std::vector<std::string> Checkpoint::keys() const {
  std::vector<std::string> out;
  out.reserve(key_to_file_.size());
  for (const auto& kv : key_to_file_) out.push_back(kv.first);
  return out;
}

bool Checkpoint::contains(const std::string& key) const { return key_to_file_.count(key) != 0; }

Tensor Checkpoint::get(const std::string& key) const {
  auto it = key_to_file_.find(key);
  if (it == key_to_file_.end()) {
    throw InvalidArgument("checkpoint " + in_quotes(path_) + " has no tensor " + in_quotes(key) +
                          " (it has " + std::to_string(key_to_file_.size()) + " tensors)");
  }
  return files_[it->second].get(key);
}

}  // namespace devpipe
