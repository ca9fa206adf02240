// devpipe — safetensors files, as the format is published: an 8-byte little-endian header
// length N, N bytes of JSON header ({name: {dtype, shape, data_offsets: [begin, end]}, and an
// optional "__metadata__": {string: string}}), then the raw little-endian tensor data.
//
// Reading memory-maps the file and validates every offset, size and dtype before handing out a
// tensor: a truncated, overlapping or malformed file throws FormatError saying what is wrong.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "devpipe/tensor.h"

namespace devpipe::safetensors {

/// One entry of the header.
struct TensorInfo {
  std::string name;
  DType dtype = DType::Float32;
  Shape shape;
  std::size_t begin = 0;  // byte offsets relative to the start of the data section
  std::size_t end = 0;
};

/// A memory-mapped, validated safetensors file. Copies share the mapping; tensors returned by
/// get() are views that keep the mapping alive. Thread-safe for reads.
class File {
 public:
  /// Opens and validates `path`; throws IoError (cannot open/map) or FormatError (bad content),
  /// each naming the path and the problem.
  static File open(const std::string& path);

  const std::string& path() const;
  /// Tensor names in data-offset order.
  const std::vector<std::string>& names() const;
  bool contains(const std::string& name) const;
  /// Throws InvalidArgument naming the file and the name when absent.
  const TensorInfo& info(const std::string& name) const;
  /// A read-only host view of the tensor's bytes (no copy).
  Tensor get(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const;
  /// Size of the whole file in bytes.
  std::size_t file_size() const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

/// Writes tensors (host tensors of any supported dtype) and metadata to `path`, atomically
/// (a temporary file renamed into place). Names must be unique and non-empty.
void save(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
          const std::map<std::string, std::string>& metadata = {});

/// Reads every tensor (views of the mapping).
std::map<std::string, Tensor> load_all(const std::string& path);

}  // namespace devpipe::safetensors
