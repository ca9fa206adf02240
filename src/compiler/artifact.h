// Internal: the compiled artifact of one stage on disk.
//
//   <dir>/manifest.json              format version, devpipe version, tag, dtype, tp degree,
//                                    config, input/output specs, state specs, a graph per
//                                    bucket, and a checksum per weight file
//   <dir>/weights/rank<r>.safetensors  rank r's (sharded) weights, keyed by checkpoint key
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "devpipe/graph.h"

namespace devpipe {

/// The artifact format this build writes and reads. Bump on any incompatible change.
inline constexpr int kArtifactFormatVersion = 1;

/// A stage input or output: its name, its shape without the batch dim, and its dtype. `dims`
/// names the sample dims that are bucketed ("seq"; "" for a fixed dim; empty: none is); a named
/// dim's entry in sample_shape is -1, its size is the bucket's.
struct StageIO {
  std::string name;
  Shape sample_shape;
  DType dtype = DType::Float32;
  std::vector<std::string> dims;

  bool has_named_dims() const {
    for (const auto& d : dims) {
      if (!d.empty()) return true;
    }
    return false;
  }
};

/// A state of the stage (GraphInput::Kind::State): its name and per-rank shape and dtype.
struct StateSpec {
  std::string name;
  Shape shape;
  DType dtype = DType::Float32;
  friend bool operator==(const StateSpec&, const StateSpec&) = default;
};

/// One compiled shape: the batch size and the size of every other named dim.
struct ArtifactBucket {
  std::int64_t batch = 0;
  std::map<std::string, std::int64_t> dims;
  Graph graph;
};

/// A StageIO's full shape in `bucket`: [batch, sample...] with named dims at the bucket's size.
Shape bucket_shape(const StageIO& io, const ArtifactBucket& bucket);
/// "4" (the batch only) or "batch 4, seq 32".
std::string bucket_text(std::int64_t batch, const std::map<std::string, std::int64_t>& dims);

struct WeightFileEntry {
  int rank = 0;
  std::string file;       // relative to the artifact dir
  std::string checksum;   // "h64:<16 hex digits>"
  std::uint64_t bytes = 0;
};

struct Manifest {
  int format_version = kArtifactFormatVersion;
  std::string devpipe_version;
  std::string tag;
  DType dtype = DType::Float32;
  int tp_degree = 1;
  bool pipeline_execution = false;
  bool return_ranked_to_cpu = true;
  std::string config_json;  // InferenceConfig::to_json() at compile time
  std::vector<StageIO> inputs;
  std::vector<StageIO> outputs;
  std::vector<StateSpec> states;  // in the graphs' state-input order
  std::vector<ArtifactBucket> buckets;
  std::vector<WeightFileEntry> weights;
};

/// The devpipe version string of this build.
const char* devpipe_version();

/// Graph <-> JSON text.
std::string graph_to_json(const Graph& graph);
Graph graph_from_json(const std::string& text);

/// Writes <dir>/manifest.json atomically.
void write_manifest(const std::string& dir, const Manifest& manifest);
/// Reads and validates <dir>/manifest.json; FormatError names the field, IoError the path.
/// A newer or older format_version is reported as ArtifactMismatch.
Manifest read_manifest(const std::string& dir);

/// Checks the graph of `bucket` read from `m`: values defined before use, every node's recorded
/// outputs equal to its op's inference, the data inputs and outputs equal to the manifest's
/// specs at the bucket's sizes, and the states (after every data input) equal to its state
/// specs. Throws FormatError naming `where`, the node and the shapes.
void validate_stage_graph(const Graph& graph, const ArtifactBucket& bucket, const Manifest& m,
                          const std::string& where);

/// A fast 64-bit checksum of a regular file's bytes: "h64:<hex>". A FIFO or device is refused
/// (FormatError) without waiting on it.
std::string file_checksum(const std::string& path);

/// The path to open for the weight file `file` (relative, as the manifest records it) of the
/// artifact in `dir`. Nothing is opened: a path that leads outside `dir` (absolute, "..", or a
/// symlink pointing out) or that is not a regular file (a FIFO, a device, a folder) is a
/// FormatError naming it; a missing one an IoError.
std::string resolve_artifact_file(const std::string& dir, const std::string& file);

/// Writes an artifact to `dir` atomically: `write` fills a fresh folder beside it (same parent),
/// which then takes `dir`'s place in one rename (an existing artifact is swapped out, then
/// removed). When `write` throws, its folder is removed and `dir` is left as it was. A `dir`
/// holding anything but an artifact (manifest.json, weights/) is refused with InvalidArgument
/// before anything is written, since the whole folder is replaced.
void replace_artifact_dir(const std::string& dir, const std::function<void(const std::string& tmp)>& write);

}  // namespace devpipe
