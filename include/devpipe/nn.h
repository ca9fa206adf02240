// devpipe — model code: modules and layers with PyTorch's names and state-dict keys.
//
// A model is a tree of nn::Module. Parameters are declared with their full (checkpoint) shape
// and key ("conv.weight", "encoder.layers.0.mlp.fc1.weight"); tensor-parallel layers also say
// which dim is split over the ranks. Modules never hold data: weights are bound when a compiled
// artifact is loaded. Modules must not move once children are registered (they keep pointers).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "devpipe/functional.h"
#include "devpipe/tensor.h"

namespace devpipe::nn {

/// A pair of sizes given as one number or two, like PyTorch's `kernel_size=3` / `(3, 5)`.
struct Size2 {
  Size2(std::int64_t v) : h(v), w(v) {}  // NOLINT: implicit like PyTorch's int arguments
  Size2(std::int64_t h_, std::int64_t w_) : h(h_), w(w_) {}
  std::int64_t h, w;
  std::vector<std::int64_t> vec() const { return {h, w}; }
};

/// A registered buffer, as named_buffers() lists it.
struct NamedBuffer {
  std::string key;  // full dotted key ("model.rotary_emb.inv_freq")
  Tensor value;
  bool persistent = false;
};

/// A declared parameter, as named_parameters() lists it.
struct NamedParameter {
  std::string key;     // full state-dict key
  Shape full_shape;    // shape in the checkpoint
  int shard_dim = -1;  // -1 replicated, else split over tp ranks along this dim
};

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  /// Class name for messages ("Linear").
  virtual std::string type_name() const { return "Module"; }
  /// Dotted path from the root ("encoder.layers.0.fc1"); "" for the root.
  std::string path() const;

  /// Registers a member submodule under `name` (not owned); returns it.
  template <class M>
  M& register_module(const std::string& name, M& module) {
    add_child(name, &module);
    return module;
  }
  /// Registers and owns a submodule; returns a reference to it.
  template <class M>
  M& register_module(const std::string& name, std::unique_ptr<M> module) {
    M& ref = *module;
    add_child(name, module.get());
    owned_.push_back(std::move(module));
    return ref;
  }
  /// Declares a parameter with its full checkpoint shape.
  void register_parameter(const std::string& name, Shape full_shape, int shard_dim = -1);

  /// The parameter's value in the current trace (throws StateError outside a trace).
  Var param(const std::string& name) const;
  bool has_param(const std::string& name) const;
  /// Every parameter of this module and its descendants, PyTorch's order (own first).
  std::vector<NamedParameter> named_parameters() const;

  /// Registers a buffer (torch's register_buffer) holding `value`. Not persistent (the
  /// default, as Hugging Face's rotary inv_freq): the traced graph uses it as a constant whose
  /// values are baked into the compiled artifact; it is never a checkpoint key. Persistent: a
  /// checkpoint key like a parameter (floating point only; the checkpoint's value is used, and
  /// random_state_dict() gives `value`).
  void register_buffer(const std::string& name, Tensor value, bool persistent = false);
  /// The buffer's value in the current trace (throws StateError outside a trace).
  Var buffer(const std::string& name) const;
  bool has_buffer(const std::string& name) const;
  /// Every buffer of this module and its descendants, own first.
  std::vector<NamedBuffer> named_buffers() const;

 protected:
  /// While alive, names this module in trace error messages. Layers open one in forward().
  class Scope {
   public:
    explicit Scope(const Module& m);
    ~Scope();
    Scope(const Scope&) = delete;
    Scope& operator=(const Scope&) = delete;

   private:
    Tracer* tracer_;
  };

 private:
  void add_child(const std::string& name, Module* child);
  void collect(const std::string& prefix, std::vector<NamedParameter>& out) const;
  void collect_buffers(const std::string& prefix, std::vector<NamedBuffer>& out) const;

  const Module* parent_ = nullptr;
  std::string name_;
  std::vector<std::pair<std::string, Module*>> children_;
  std::vector<std::unique_ptr<Module>> owned_;
  std::vector<NamedParameter> params_;  // key = local name here
  std::vector<NamedBuffer> buffers_;    // key = local name here
};

/// A list of submodules named "0", "1", ... (torch.nn.ModuleList).
template <class M>
class ModuleList : public Module {
 public:
  std::string type_name() const override { return "ModuleList"; }
  M& push_back(std::unique_ptr<M> m) {
    M& ref = register_module(std::to_string(items_.size()), std::move(m));
    items_.push_back(&ref);
    return ref;
  }
  std::size_t size() const { return items_.size(); }
  M& operator[](std::size_t i) { return *items_.at(i); }
  auto begin() { return items_.begin(); }
  auto end() { return items_.end(); }

 private:
  std::vector<M*> items_;
};

/// A state dict with every parameter of `module` (full, unsharded shapes) drawn like PyTorch's
/// default initialisation: uniform in [-1/sqrt(fan_in), 1/sqrt(fan_in)] where fan_in is the
/// product of a weight's dims after the first (biases use their weight's fan_in); norm weights
/// are 1 and norm biases 0. Deterministic for a given seed. Host float32 tensors. Persistent
/// buffers follow with their registered values.
std::vector<std::pair<std::string, Tensor>> random_state_dict(const Module& module,
                                                              std::uint64_t seed);

// ---------------------------------------------------------------------------------- layers

class Linear : public Module {
 public:
  Linear(std::int64_t in_features, std::int64_t out_features, bool bias = true);
  std::string type_name() const override { return "Linear"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  std::int64_t in_features, out_features;
  bool has_bias;
};

struct Conv2dOptions {
  Size2 stride = 1;
  Size2 padding = 0;
  Size2 dilation = 1;
  std::int64_t groups = 1;
  bool bias = true;
};

class Conv2d : public Module {
 public:
  Conv2d(std::int64_t in_channels, std::int64_t out_channels, Size2 kernel_size,
         Conv2dOptions options = {});
  std::string type_name() const override { return "Conv2d"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  std::int64_t in_channels, out_channels;
  Size2 kernel_size;
  Conv2dOptions options;
};

class AdaptiveAvgPool2d : public Module {
 public:
  explicit AdaptiveAvgPool2d(Size2 output_size) : output_size(output_size) {}
  std::string type_name() const override { return "AdaptiveAvgPool2d"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  Size2 output_size;
};

struct MaxPool2dOptions {
  std::optional<Size2> stride;  // default: kernel_size
  Size2 padding = 0;
  Size2 dilation = 1;
};

class MaxPool2d : public Module {
 public:
  explicit MaxPool2d(Size2 kernel_size, MaxPool2dOptions options = {})
      : kernel_size(kernel_size), options(options) {}
  std::string type_name() const override { return "MaxPool2d"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  Size2 kernel_size;
  MaxPool2dOptions options;
};

class Embedding : public Module {
 public:
  Embedding(std::int64_t num_embeddings, std::int64_t embedding_dim);
  std::string type_name() const override { return "Embedding"; }
  Var forward(Var indices) const;
  Var operator()(Var indices) const { return forward(indices); }
  std::int64_t num_embeddings, embedding_dim;
};

class LayerNorm : public Module {
 public:
  LayerNorm(std::vector<std::int64_t> normalized_shape, double eps = 1e-5,
            bool elementwise_affine = true, bool bias = true);
  std::string type_name() const override { return "LayerNorm"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  std::vector<std::int64_t> normalized_shape;
  double eps;
  bool elementwise_affine, has_bias;
};

class RMSNorm : public Module {
 public:
  RMSNorm(std::vector<std::int64_t> normalized_shape, double eps = 1e-6,
          bool elementwise_affine = true);
  std::string type_name() const override { return "RMSNorm"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  std::vector<std::int64_t> normalized_shape;
  double eps;
  bool elementwise_affine;
};

class GELU : public Module {
 public:
  explicit GELU(std::string approximate = "none") : approximate(std::move(approximate)) {}
  std::string type_name() const override { return "GELU"; }
  Var operator()(Var x) const { return F::gelu(x, approximate); }
  std::string approximate;
};

// ------------------------------------------------------------- tensor-parallel layers
// Checkpoint keys and shapes are those of the unsharded layer; the compiler splits the weights.

/// y = x W^T + b with W split by rows (output features) over the ranks. Each rank computes its
/// slice of the outputs; gather_output=true (the default, as in NxD) all-gathers them so every
/// rank holds all outputs; false leaves each rank its slice (to feed a RowParallelLinear with
/// input_is_parallel=true).
class ColumnParallelLinear : public Module {
 public:
  ColumnParallelLinear(std::int64_t in_features, std::int64_t out_features, bool bias = true,
                       bool gather_output = true);
  std::string type_name() const override { return "ColumnParallelLinear"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  std::int64_t in_features, out_features;
  bool has_bias, gather_output;
};

/// y = x W^T + b with W split by columns (input features) over the ranks; partial products
/// are summed with an all-reduce, then the (replicated) bias is added. input_is_parallel=false
/// (the default, as in NxD) takes the full x and slices it per rank; true expects each rank's
/// slice of x (as a ColumnParallelLinear with gather_output=false produces).
class RowParallelLinear : public Module {
 public:
  RowParallelLinear(std::int64_t in_features, std::int64_t out_features, bool bias = true,
                    bool input_is_parallel = false);
  std::string type_name() const override { return "RowParallelLinear"; }
  Var forward(Var x) const;
  Var operator()(Var x) const { return forward(x); }
  std::int64_t in_features, out_features;
  bool has_bias, input_is_parallel;
};

/// Embedding with the vocabulary split over the ranks; partial lookups are summed.
class ParallelEmbedding : public Module {
 public:
  ParallelEmbedding(std::int64_t num_embeddings, std::int64_t embedding_dim);
  std::string type_name() const override { return "ParallelEmbedding"; }
  Var forward(Var indices) const;
  Var operator()(Var indices) const { return forward(indices); }
  std::int64_t num_embeddings, embedding_dim;
};

}  // namespace devpipe::nn
