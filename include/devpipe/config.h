// devpipe — configuration: a device-neutral runtime config plus named model attributes.
//
// The seed's `InferenceConfig(NeuronConfig(batch_size=32, torch_dtype=torch.float32,
// tp_degree=2), vision_embedding_size=512, ...)` reads in C++ as
//   InferenceConfig config(RuntimeConfig{.batch_size = 32, .dtype = DType::Float32,
//                                        .tp_degree = 2},
//                          {{"vision_embedding_size", 512}, ...});
#pragma once

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "devpipe/device.h"
#include "devpipe/dtype.h"

namespace devpipe {

/// How a model is compiled and run, independent of the device (the seed's NeuronConfig).
struct RuntimeConfig {
  std::int64_t batch_size = 1;
  DType dtype = DType::Float32;           // the seed's torch_dtype
  int tp_degree = 1;                      // tensor-parallel ranks
  std::vector<std::int64_t> buckets;      // compiled batch sizes; empty: {batch_size}
  DeviceKind device = DeviceKind::Cpu;
  /// Compiled sizes of named dims other than the batch, e.g. {{"seq", {16, 32, 64, 128}}}: a
  /// wrapper whose input_dims() names a dim "seq" is compiled for every combination of these
  /// with the batch buckets. Empty: the batch is the only bucketed dim.
  std::map<std::string, std::vector<std::int64_t>> dim_buckets;
  /// Host threads for the kernels of all ranks together (each rank gets num_threads /
  /// tp_degree, at least 1). 0: OMP_NUM_THREADS if set, else the cores. Not part of the
  /// compiled artifact: it can differ between compile and load.
  int num_threads = 0;
  static constexpr int kMaxThreads = 4096;
  /// Compile option, off by default: fold chains with nothing nonlinear between them (a
  /// Conv2d followed by a global average pool becomes per-tap input means and a Linear; two
  /// Linears in a row become one) into fewer, cheaper ops with weights computed at compile
  /// time. Results change by rounding only (the sums run in another order). Recorded in the
  /// artifact; loading with another setting is an ArtifactMismatch.
  bool fold_linear_chains = false;

  /// Sorted, de-duplicated buckets (or {batch_size}); throws ConfigError on a non-positive size.
  std::vector<std::int64_t> batch_buckets() const;
  /// dim_buckets with each list sorted and de-duplicated; throws ConfigError naming the dim for
  /// an empty list, a size < 1, or a dim named "batch" or "".
  std::map<std::string, std::vector<std::int64_t>> named_buckets() const;
  /// Throws ConfigError naming the field when a value is out of range.
  void validate() const;
  friend bool operator==(const RuntimeConfig&, const RuntimeConfig&) = default;
};

/// Seed vocabulary.
using NeuronConfig = RuntimeConfig;

/// A model attribute value: integer, number, string or a list of integers or numbers.
class ConfigValue {
 public:
  using Storage = std::variant<std::int64_t, double, std::string, std::vector<std::int64_t>,
                               std::vector<double>, bool>;
  ConfigValue(int v) : v_(static_cast<std::int64_t>(v)) {}             // NOLINT
  ConfigValue(std::int64_t v) : v_(v) {}                               // NOLINT
  ConfigValue(double v) : v_(v) {}                                     // NOLINT
  ConfigValue(bool v) : v_(v) {}                                       // NOLINT
  ConfigValue(const char* v) : v_(std::string(v)) {}                   // NOLINT
  ConfigValue(std::string v) : v_(std::move(v)) {}                     // NOLINT
  ConfigValue(std::vector<std::int64_t> v) : v_(std::move(v)) {}      // NOLINT
  ConfigValue(std::vector<double> v) : v_(std::move(v)) {}            // NOLINT
  ConfigValue(std::initializer_list<std::int64_t> v) : v_(std::vector<std::int64_t>(v)) {}  // NOLINT
  const Storage& storage() const { return v_; }
  /// "int", "float", "string", "int list", "float list", "bool".
  std::string type_name() const;
  friend bool operator==(const ConfigValue&, const ConfigValue&) = default;

 private:
  Storage v_;
};

/// A runtime config plus named model attributes, saved to and loaded from JSON.
class InferenceConfig {
 public:
  InferenceConfig() = default;
  explicit InferenceConfig(RuntimeConfig runtime,
                           std::initializer_list<std::pair<const std::string, ConfigValue>> attrs = {});

  const RuntimeConfig& runtime_config() const { return runtime_; }
  /// Seed vocabulary for runtime_config().
  const RuntimeConfig& neuron_config() const { return runtime_; }
  RuntimeConfig& mutable_runtime_config() { return runtime_; }

  bool has(const std::string& name) const { return attrs_.count(name) != 0; }
  void set(const std::string& name, ConfigValue value) { attrs_.insert_or_assign(name, std::move(value)); }
  /// Typed getters; a missing attribute or one of another type throws ConfigError naming it,
  /// its type and the attributes that exist.
  std::int64_t get_int(const std::string& name) const;
  double get_float(const std::string& name) const;  // ints convert
  bool get_bool(const std::string& name) const;
  const std::string& get_string(const std::string& name) const;
  const std::vector<std::int64_t>& get_ints(const std::string& name) const;
  const std::map<std::string, ConfigValue>& attributes() const { return attrs_; }

  /// JSON text: {"runtime": {...}, "attributes": {...}}.
  std::string to_json() const;
  /// Parses to_json()'s format; throws ConfigError naming the bad field.
  static InferenceConfig from_json(const std::string& text);
  void save(const std::string& path) const;
  static InferenceConfig load(const std::string& path);

  friend bool operator==(const InferenceConfig&, const InferenceConfig&) = default;

 private:
  const ConfigValue& get(const std::string& name, const char* want) const;
  RuntimeConfig runtime_;
  std::map<std::string, ConfigValue> attrs_;
};

}  // namespace devpipe
