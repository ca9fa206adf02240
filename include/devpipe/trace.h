// devpipe — tracing model code into a graph.
//
// Model code runs on symbolic values (Var): each call records a node in the graph of the
// thread's current Tracer and infers the output shape and dtype immediately, so a mismatch is
// reported at the line that causes it, with the module path. Nothing is computed while tracing.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "devpipe/graph.h"

namespace devpipe {

namespace nn {
class Module;
}

class Tracer;

/// A symbolic tensor inside a trace. Cheap to copy. Valid only while its Tracer lives.
class Var {
 public:
  Var() = default;
  bool valid() const { return tracer_ != nullptr; }
  int id() const { return id_; }
  const Shape& shape() const;
  DType dtype() const;
  int rank() const { return shape().rank(); }
  std::int64_t dim(int i) const { return shape().dim(i); }

 private:
  friend class Tracer;
  Var(Tracer* t, int id) : tracer_(t), id_(id) {}
  Tracer* tracer_ = nullptr;
  int id_ = -1;
};

/// Settings of one trace.
struct TraceOptions {
  int tp_degree = 1;                  // ranks the parameters are sharded over
  DType dtype = DType::Float32;       // dtype of floating parameters
  std::string tag;                    // stage tag, prefixed to error messages
};

/// Records a graph. Constructing one makes it the calling thread's current tracer until it is
/// destroyed; tracers nest. Not thread-safe; one trace per thread at a time.
class Tracer {
 public:
  explicit Tracer(TraceOptions options);
  ~Tracer();
  Tracer(const Tracer&) = delete;
  Tracer& operator=(const Tracer&) = delete;

  /// The calling thread's current tracer; throws StateError outside a trace.
  static Tracer& current();

  const TraceOptions& options() const { return options_; }
  /// Adds a graph input.
  Var input(const std::string& name, const Shape& shape, DType dtype);
  /// Records `op` applied to `inputs`; returns its single output. Inference errors are rethrown
  /// with the tag and the current module path prefixed.
  Var emit(OpKind op, const std::vector<Var>& inputs, Attrs attrs = {});
  /// The Var of parameter `key` (created on first use with the per-rank shape).
  Var parameter(const std::string& key, const Shape& full_shape, int shard_dim);
  /// The Var of constant `key` holding `value` (created on first use): a replicated graph
  /// param marked constant, in the trace's dtype (int64 values stay int64), whose value is kept
  /// in Graph::constants.
  Var constant(const std::string& key, const Tensor& value);
  /// Ends the trace: sets the graph outputs and returns the graph.
  Graph finish(const std::vector<Var>& outputs);

  const Graph& graph() const { return graph_; }
  /// Error prefix for the current scope: "[tag] path (Type): ".
  std::string where() const;

  // Scope stack (module paths) for messages; see nn::Module::Scope.
  void push_scope(std::string path, std::string type);
  void pop_scope();

 private:
  TraceOptions options_;
  Graph graph_;
  std::map<std::string, int> params_;
  std::vector<std::pair<std::string, std::string>> scopes_;
  Tracer* previous_ = nullptr;
  bool finished_ = false;
};

/// Traces `fn` on inputs of the given names, shapes and dtypes (tests, tools).
Graph trace_function(const TraceOptions& options,
                     const std::vector<std::pair<std::string, ValueInfo>>& inputs,
                     const std::function<std::vector<Var>(const std::vector<Var>&)>& fn);

}  // namespace devpipe
