#include "devpipe/nn.h"

#include <cmath>
#include <map>

#include "devpipe/error.h"

namespace devpipe::nn {

// ------------------------------------------------------------------------------ Module

std::string Module::path() const {
  if (!parent_) return "";
  std::string p = parent_->path();
  return p.empty() ? name_ : p + "." + name_;
}

void Module::add_child(const std::string& name, Module* child) {
  if (name.empty() || name.find('.') != std::string::npos) {
    throw InvalidArgument("module name '" + name + "' must be non-empty and contain no '.'");
  }
  for (const auto& [n, m] : children_) {
    if (n == name) throw InvalidArgument("submodule '" + name + "' registered twice in '" + path() + "'");
  }
  if (child->parent_) {
    throw InvalidArgument("module '" + child->path() + "' is already registered; cannot register it again as '" + name + "'");
  }
  child->parent_ = this;
  child->name_ = name;
  children_.emplace_back(name, child);
}

void Module::register_parameter(const std::string& name, Shape full_shape, int shard_dim) {
  if (has_param(name)) {
    throw InvalidArgument("parameter '" + name + "' registered twice in '" + path() + "'");
  }
  if (shard_dim >= full_shape.rank()) {
    throw InvalidArgument("parameter '" + name + "': shard_dim " + std::to_string(shard_dim) +
                          " out of range for " + full_shape.to_string());
  }
  params_.push_back({name, std::move(full_shape), shard_dim});
}

bool Module::has_param(const std::string& name) const {
  for (const auto& p : params_) {
    if (p.key == name) return true;
  }
  return false;
}

Var Module::param(const std::string& name) const {
  for (const auto& p : params_) {
    if (p.key == name) {
      std::string base = path();
      return Tracer::current().parameter(base.empty() ? name : base + "." + name, p.full_shape,
                                         p.shard_dim);
    }
  }
  throw InvalidArgument("module '" + path() + "' (" + type_name() + ") has no parameter '" + name + "'");
}

void Module::register_buffer(const std::string& name, Tensor value, bool persistent) {
  if (name.empty() || name.find('.') != std::string::npos) {
    throw InvalidArgument("buffer name '" + name + "' in '" + path() +
                          "' must be non-empty and contain no '.'");
  }
  if (has_buffer(name) || has_param(name)) {
    throw InvalidArgument("buffer '" + name + "' in '" + path() +
                          "' clashes with a buffer or parameter of that name");
  }
  if (!value.defined()) {
    throw InvalidArgument("buffer '" + name + "' in '" + path() + "' is an undefined tensor");
  }
  if (persistent && !is_floating(value.dtype())) {
    throw DTypeError("persistent buffer '" + name + "' in '" + path() + "' is " +
                     std::string(dtype_name(value.dtype())) +
                     "; checkpoint tensors are floating point (register it non-persistent)");
  }
  buffers_.push_back({name, value.to_host().clone(), persistent});
}

bool Module::has_buffer(const std::string& name) const {
  for (const auto& b : buffers_) {
    if (b.key == name) return true;
  }
  return false;
}

Var Module::buffer(const std::string& name) const {
  for (const auto& b : buffers_) {
    if (b.key != name) continue;
    std::string base = path();
    std::string key = base.empty() ? name : base + "." + name;
    if (b.persistent) return Tracer::current().parameter(key, b.value.shape(), -1);
    return Tracer::current().constant(key, b.value);
  }
  throw InvalidArgument("module '" + path() + "' (" + type_name() + ") has no buffer '" + name + "'");
}

void Module::collect_buffers(const std::string& prefix, std::vector<NamedBuffer>& out) const {
  for (const auto& b : buffers_) out.push_back({prefix + b.key, b.value, b.persistent});
  for (const auto& [n, m] : children_) m->collect_buffers(prefix + n + ".", out);
}

std::vector<NamedBuffer> Module::named_buffers() const {
  std::vector<NamedBuffer> out;
  collect_buffers("", out);
  return out;
}

void Module::collect(const std::string& prefix, std::vector<NamedParameter>& out) const {
  for (const auto& p : params_) out.push_back({prefix + p.key, p.full_shape, p.shard_dim});
  for (const auto& [n, m] : children_) m->collect(prefix + n + ".", out);
}

std::vector<NamedParameter> Module::named_parameters() const {
  std::vector<NamedParameter> out;
  collect("", out);
  return out;
}

Module::Scope::Scope(const Module& m) : tracer_(&Tracer::current()) {
  tracer_->push_scope(m.path(), m.type_name());
}
Module::Scope::~Scope() { tracer_->pop_scope(); }

std::vector<std::pair<std::string, Tensor>> random_state_dict(const Module& module,
                                                              std::uint64_t seed) {
  std::vector<std::pair<std::string, Tensor>> out;
  std::map<std::string, std::int64_t> fan_in_of;  // module path -> weight fan_in
  auto params = module.named_parameters();
  for (const auto& p : params) {
    auto dot = p.key.rfind('.');
    std::string owner = dot == std::string::npos ? "" : p.key.substr(0, dot);
    if (p.full_shape.rank() >= 2) {
      fan_in_of[owner] = p.full_shape.numel() / p.full_shape[0];
    }
  }
  std::uint64_t i = 0;
  for (const auto& p : params) {
    auto dot = p.key.rfind('.');
    std::string owner = dot == std::string::npos ? "" : p.key.substr(0, dot);
    std::string leaf = dot == std::string::npos ? p.key : p.key.substr(dot + 1);
    auto it = fan_in_of.find(owner);
    Tensor t;
    if (it == fan_in_of.end()) {  // a norm's (or other 1-D-only module's) parameters
      t = Tensor::full(p.full_shape, leaf == "weight" ? 1.0 : 0.0);
    } else {
      double bound = 1.0 / std::sqrt(static_cast<double>(std::max<std::int64_t>(1, it->second)));
      t = Tensor::uniform(p.full_shape, -bound, bound, seed * 1000003ull + i);
    }
    out.emplace_back(p.key, std::move(t));
    ++i;
  }
  for (const auto& b : module.named_buffers()) {
    if (b.persistent) out.emplace_back(b.key, b.value.to_dtype(DType::Float32));
  }
  return out;
}

// ------------------------------------------------------------------------------ layers

namespace {
void require_positive(const char* layer, const char* what, std::int64_t v) {
  if (v < 1) {
    throw InvalidArgument(std::string(layer) + ": " + what + " must be >= 1, got " + std::to_string(v));
  }
}
}  // namespace

Linear::Linear(std::int64_t in, std::int64_t out, bool bias)
    : in_features(in), out_features(out), has_bias(bias) {
  require_positive("Linear", "in_features", in);
  require_positive("Linear", "out_features", out);
  register_parameter("weight", Shape{out, in});
  if (bias) register_parameter("bias", Shape{out});
}

Var Linear::forward(Var x) const {
  Scope s(*this);
  Var w = param("weight");  // parameters are created in declaration order
  return F::linear(x, w, has_bias ? std::optional<Var>(param("bias")) : std::nullopt);
}

Conv2d::Conv2d(std::int64_t in, std::int64_t out, Size2 k, Conv2dOptions o)
    : in_channels(in), out_channels(out), kernel_size(k), options(o) {
  require_positive("Conv2d", "in_channels", in);
  require_positive("Conv2d", "out_channels", out);
  require_positive("Conv2d", "groups", o.groups);
  if (in % o.groups != 0 || out % o.groups != 0) {
    throw InvalidArgument("Conv2d: groups=" + std::to_string(o.groups) +
                          " must divide in_channels=" + std::to_string(in) +
                          " and out_channels=" + std::to_string(out));
  }
  register_parameter("weight", Shape{out, in / o.groups, k.h, k.w});
  if (o.bias) register_parameter("bias", Shape{out});
}

Var Conv2d::forward(Var x) const {
  Scope s(*this);
  Var w = param("weight");
  return F::conv2d(x, w,
                   options.bias ? std::optional<Var>(param("bias")) : std::nullopt,
                   options.stride.vec(), options.padding.vec(), options.dilation.vec(),
                   options.groups);
}

Var AdaptiveAvgPool2d::forward(Var x) const {
  Scope s(*this);
  return F::adaptive_avg_pool2d(x, output_size.vec());
}

Var MaxPool2d::forward(Var x) const {
  Scope s(*this);
  Size2 stride = options.stride.value_or(kernel_size);
  return F::max_pool2d(x, kernel_size.vec(), stride.vec(), options.padding.vec(),
                       options.dilation.vec());
}

Embedding::Embedding(std::int64_t num, std::int64_t dim) : num_embeddings(num), embedding_dim(dim) {
  require_positive("Embedding", "num_embeddings", num);
  require_positive("Embedding", "embedding_dim", dim);
  register_parameter("weight", Shape{num, dim});
}

Var Embedding::forward(Var indices) const {
  Scope s(*this);
  return F::embedding(indices, param("weight"));
}

LayerNorm::LayerNorm(std::vector<std::int64_t> ns, double e, bool affine, bool bias)
    : normalized_shape(std::move(ns)), eps(e), elementwise_affine(affine), has_bias(bias && affine) {
  if (elementwise_affine) {
    register_parameter("weight", Shape(normalized_shape));
    if (has_bias) register_parameter("bias", Shape(normalized_shape));
  }
}

Var LayerNorm::forward(Var x) const {
  Scope s(*this);
  std::optional<Var> w, b;
  if (elementwise_affine) w = param("weight");
  if (has_bias) b = param("bias");
  return F::layer_norm(x, normalized_shape, w, b, eps);
}

RMSNorm::RMSNorm(std::vector<std::int64_t> ns, double e, bool affine)
    : normalized_shape(std::move(ns)), eps(e), elementwise_affine(affine) {
  if (affine) register_parameter("weight", Shape(normalized_shape));
}

Var RMSNorm::forward(Var x) const {
  Scope s(*this);
  return F::rms_norm(x, normalized_shape,
                     elementwise_affine ? std::optional<Var>(param("weight")) : std::nullopt, eps);
}

// ------------------------------------------------------------- tensor-parallel layers

ColumnParallelLinear::ColumnParallelLinear(std::int64_t in, std::int64_t out, bool bias,
                                           bool gather)
    : in_features(in), out_features(out), has_bias(bias), gather_output(gather) {
  require_positive("ColumnParallelLinear", "in_features", in);
  require_positive("ColumnParallelLinear", "out_features", out);
  register_parameter("weight", Shape{out, in}, 0);
  if (bias) register_parameter("bias", Shape{out}, 0);
}

Var ColumnParallelLinear::forward(Var x) const {
  Scope s(*this);
  Var w = param("weight");
  Var y = F::linear(x, w, has_bias ? std::optional<Var>(param("bias")) : std::nullopt);
  return gather_output ? F::all_gather(y, -1) : y;
}

RowParallelLinear::RowParallelLinear(std::int64_t in, std::int64_t out, bool bias,
                                     bool input_is_parallel)
    : in_features(in), out_features(out), has_bias(bias), input_is_parallel(input_is_parallel) {
  require_positive("RowParallelLinear", "in_features", in);
  require_positive("RowParallelLinear", "out_features", out);
  register_parameter("weight", Shape{out, in}, 1);
  if (bias) register_parameter("bias", Shape{out});
}

Var RowParallelLinear::forward(Var x) const {
  Scope s(*this);
  Var w = param("weight");
  if (!input_is_parallel) {
    int tp = Tracer::current().options().tp_degree;
    if (tp > 1) {
      std::int64_t local = w.dim(1);
      Attrs a;
      a.set("dim", static_cast<std::int64_t>(x.rank() - 1)).set("start", std::int64_t{0})
          .set("end", local).set("step", std::int64_t{1}).set("rank_stride", local);
      x = Tracer::current().emit(OpKind::Slice, {x}, a);
    }
  }
  Var y = F::all_reduce(F::linear(x, w));
  return has_bias ? F::add(y, param("bias")) : y;
}

ParallelEmbedding::ParallelEmbedding(std::int64_t num, std::int64_t dim)
    : num_embeddings(num), embedding_dim(dim) {
  require_positive("ParallelEmbedding", "num_embeddings", num);
  require_positive("ParallelEmbedding", "embedding_dim", dim);
  register_parameter("weight", Shape{num, dim}, 0);
}

Var ParallelEmbedding::forward(Var indices) const {
  Scope s(*this);
  int tp = Tracer::current().options().tp_degree;
  Var w = param("weight");
  if (tp == 1) return F::embedding(indices, w);
  return F::all_reduce(F::embedding(indices, w, w.dim(0)));
}

}  // namespace devpipe::nn
