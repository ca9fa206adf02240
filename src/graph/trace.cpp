#include "devpipe/trace.h"

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {

namespace {
thread_local Tracer* t_current = nullptr;
}

const Shape& Var::shape() const {
  if (!tracer_) throw StateError("use of an empty Var");
  return tracer_->graph().value(id_).shape;
}

DType Var::dtype() const {
  if (!tracer_) throw StateError("use of an empty Var");
  return tracer_->graph().value(id_).dtype;
}

Tracer::Tracer(TraceOptions options) : options_(std::move(options)), previous_(t_current) {
  if (options_.tp_degree < 1) {
    throw ConfigError("tp_degree must be >= 1, got " + std::to_string(options_.tp_degree));
  }
  graph_.tp_degree = options_.tp_degree;
  t_current = this;
}

Tracer::~Tracer() { t_current = previous_; }

Tracer& Tracer::current() {
  if (!t_current) {
    throw StateError("model code ran outside a trace: devpipe modules and F:: functions only "
                     "record graphs (use a ModelWrapper or trace_function)");
  }
  return *t_current;
}

Var Tracer::input(const std::string& name, const Shape& shape, DType dtype) {
  int id = graph_.add_value({shape, dtype});
  graph_.inputs.push_back({id, name});
  return Var(this, id);
}

std::string Tracer::where() const {
  std::string s;
  if (!options_.tag.empty()) s += "[" + options_.tag + "] ";
  if (!scopes_.empty()) {
    const auto& [path, type] = scopes_.back();
    s += (path.empty() ? std::string("<root>") : path) + " (" + type + "): ";
  }
  return s;
}

Var Tracer::emit(OpKind op, const std::vector<Var>& inputs, Attrs attrs) {
  if (finished_) throw StateError("trace already finished");
  std::vector<ValueInfo> infos;
  infos.reserve(inputs.size());
  for (const Var& v : inputs) {
    if (v.tracer_ != this) {
      throw InvalidArgument(where() + std::string(op_name(op)) +
                            ": an input Var belongs to another (or no) trace");
    }
    infos.push_back(graph_.value(v.id_));
  }
  std::vector<ValueInfo> outs;
  try {
    outs = infer_op(op, infos, attrs);
  } catch (const ShapeError& e) {
    throw ShapeError(where() + e.what());
  } catch (const DTypeError& e) {
    throw DTypeError(where() + e.what());
  } catch (const FormatError& e) {
    throw InvalidArgument(where() + std::string(op_name(op)) + ": " + e.what());
  } catch (const InvalidArgument& e) {
    throw InvalidArgument(where() + e.what());
  }
  Node node;
  node.op = op;
  for (const Var& v : inputs) node.inputs.push_back(v.id_);
  for (auto& o : outs) node.outputs.push_back(graph_.add_value(std::move(o)));
  node.attrs = std::move(attrs);
  if (!scopes_.empty()) node.scope = scopes_.back().first;
  int out = node.outputs.front();
  graph_.nodes.push_back(std::move(node));
  return Var(this, out);
}

Var Tracer::parameter(const std::string& key, const Shape& full_shape, int shard_dim) {
  auto it = params_.find(key);
  if (it != params_.end()) return Var(this, it->second);
  Shape local = full_shape;
  if (shard_dim >= 0) {
    std::int64_t n = full_shape[static_cast<std::size_t>(shard_dim)];
    if (n % options_.tp_degree != 0) {
      throw ConfigError(where() + "parameter '" + key + "' of shape " + full_shape.to_string() +
                        " cannot be split into tp_degree=" + std::to_string(options_.tp_degree) +
                        " equal parts along dim " + std::to_string(shard_dim) + " (" +
                        std::to_string(n) + " is not divisible by " +
                        std::to_string(options_.tp_degree) + ")");
    }
    local[static_cast<std::size_t>(shard_dim)] = n / options_.tp_degree;
  }
  int id = graph_.add_value({local, options_.dtype});
  graph_.params.push_back({id, key, full_shape, shard_dim});
  params_[key] = id;
  return Var(this, id);
}

Var Tracer::constant(const std::string& key, const Tensor& value) {
  auto it = params_.find(key);
  if (it != params_.end()) return Var(this, it->second);
  if (!value.defined()) throw InvalidArgument(where() + "constant '" + key + "' is an undefined tensor");
  const DType dt = value.dtype() == DType::Int64 ? DType::Int64 : options_.dtype;
  int id = graph_.add_value({value.shape(), dt});
  graph_.params.push_back({id, key, value.shape(), -1, true});
  graph_.constants[key] = value.to_host().to_dtype(dt).clone();
  params_[key] = id;
  return Var(this, id);
}

Graph Tracer::finish(const std::vector<Var>& outputs) {
  if (outputs.empty()) throw InvalidArgument(where() + "a traced model must return at least one output");
  graph_.outputs.clear();
  for (const Var& v : outputs) {
    if (v.tracer_ != this) throw InvalidArgument(where() + "an output Var belongs to another trace");
    graph_.outputs.push_back(v.id_);
  }
  finished_ = true;
  return graph_;
}

void Tracer::push_scope(std::string path, std::string type) {
  scopes_.emplace_back(std::move(path), std::move(type));
}
void Tracer::pop_scope() {
  if (!scopes_.empty()) scopes_.pop_back();
}

Graph trace_function(const TraceOptions& options,
                     const std::vector<std::pair<std::string, ValueInfo>>& inputs,
                     const std::function<std::vector<Var>(const std::vector<Var>&)>& fn) {
  Tracer tracer(options);
  std::vector<Var> vars;
  for (const auto& [name, info] : inputs) vars.push_back(tracer.input(name, info.shape, info.dtype));
  return tracer.finish(fn(vars));
}

}  // namespace devpipe
