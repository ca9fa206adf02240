// devpipe — PyTorch/Hugging Face style checkpoints made of safetensors files (internal API).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "devpipe/safetensors.h"
#include "devpipe/tensor.h"

namespace devpipe {

/// A PyTorch-style checkpoint folder: model.safetensors, or model.safetensors.index.json
/// ({"weight_map": {key: shard_file}}) plus its shards (diffusers' folders name them
/// diffusion_pytorch_model.safetensors and diffusion_pytorch_model.safetensors.index.json). A path to a single .safetensors file
/// also works. Every file is opened (and validated) by open(); tensors are views of the
/// memory-mapped files. Copies share the mappings; thread-safe for reads.
class Checkpoint {
 public:
  /// Opens `path` (a .safetensors file or a folder). When the folder has both
  /// model.safetensors and the index, model.safetensors wins. Throws IoError when a file cannot
  /// be found or opened (for a folder with neither file, the message lists what it looked for)
  /// and FormatError when a file or the index is malformed or inconsistent (the index names a
  /// shard that does not exist, or a key its shard does not hold); messages name the path.
  /// PyTorch pickles (pytorch_model.bin, its index, or a path to a .bin file) are not read:
  /// Unsupported, with the command that converts them to safetensors.
  static Checkpoint open(const std::string& path);

  /// All tensor keys, sorted.
  std::vector<std::string> keys() const;
  bool contains(const std::string& key) const;
  /// A host view of the tensor; throws InvalidArgument naming the key and the checkpoint path
  /// when absent.
  Tensor get(const std::string& key) const;
  /// The path given to open().
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::vector<safetensors::File> files_;
  std::map<std::string, std::size_t> key_to_file_;  // key -> index into files_
};

}  // namespace devpipe
