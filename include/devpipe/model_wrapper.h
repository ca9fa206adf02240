// devpipe — ModelWrapper: one compiled, sharded, loaded stage of a multi-stage model.
//
// Like the seed's NxD ModelWrapper: a wrapper takes the config, the model class, the
// pipeline flags and a tag, and supplies example inputs for compilation. compile() traces the
// model per batch bucket, shards the checkpoint over tp_degree ranks and writes an artifact;
// load() reads it back, checks it against this wrapper and warms every bucket up; forward()
// runs it. forward() may be called from several threads at once; load() while a forward() runs
// on the same wrapper is refused with a StateError, as is a forward() that starts while load()
// replaces the loaded artifact.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "devpipe/config.h"
#include "devpipe/nn.h"
#include "devpipe/ranked.h"
#include "devpipe/state.h"
#include "devpipe/tensor.h"

namespace devpipe {

/// Progress of long work: stage tag, step done (1-based), steps in all, and what it was.
using ProgressFn =
    std::function<void(const std::string& tag, int done, int total, const std::string& what)>;

/// A ProgressFn that draws a progress bar on stderr (redrawn in place on a terminal, one line
/// per step otherwise). Thread-safe; pass it to ApplicationBase::set_progress or compile/load.
void print_progress(const std::string& tag, int done, int total, const std::string& what);

/// How to build a model and call its forward() on traced values (see model_cls<M>()).
class ModelFactory {
 public:
  using Create = std::function<std::unique_ptr<nn::Module>(const InferenceConfig&)>;
  using Call = std::function<std::vector<Var>(nn::Module&, const std::vector<Var>&)>;
  ModelFactory(Create create, Call call, int arity)
      : create_(std::move(create)), call_(std::move(call)), arity_(arity) {}
  std::unique_ptr<nn::Module> create(const InferenceConfig& config) const { return create_(config); }
  std::vector<Var> call(nn::Module& m, const std::vector<Var>& in) const { return call_(m, in); }
  /// Number of arguments forward() takes.
  int arity() const { return arity_; }

 private:
  Create create_;
  Call call_;
  int arity_;
};

namespace detail {
template <class T>
struct ForwardTraits;
template <class C, class R, class... A>
struct ForwardTraits<R (C::*)(A...)> {
  static constexpr int arity = sizeof...(A);
};
template <class C, class R, class... A>
struct ForwardTraits<R (C::*)(A...) const> {
  static constexpr int arity = sizeof...(A);
};

inline std::vector<Var> as_vars(Var v) { return {v}; }
inline std::vector<Var> as_vars(std::vector<Var> v) { return v; }
template <class... T>
std::vector<Var> as_vars(const std::tuple<T...>& t) {
  return std::apply([](const auto&... v) { return std::vector<Var>{v...}; }, t);
}
template <class A, class B>
std::vector<Var> as_vars(const std::pair<A, B>& p) {
  return {p.first, p.second};
}

template <class M, std::size_t... I>
std::vector<Var> call_forward(M& m, const std::vector<Var>& in, std::index_sequence<I...>) {
  return as_vars(m.forward(in[I]...));
}
}  // namespace detail

/// The seed's `model_cls=VisionModel`: M is an nn::Module constructible from
/// `const InferenceConfig&` (or default-constructible) whose `forward` takes Vars and returns a
/// Var, a std::vector<Var>, a std::pair or a std::tuple of Vars.
template <class M>
ModelFactory model_cls() {
  constexpr int arity = detail::ForwardTraits<decltype(&M::forward)>::arity;
  return ModelFactory(
      [](const InferenceConfig& config) -> std::unique_ptr<nn::Module> {
        if constexpr (std::is_constructible_v<M, const InferenceConfig&>) {
          return std::make_unique<M>(config);
        } else {
          return std::make_unique<M>();
        }
      },
      [](nn::Module& m, const std::vector<Var>& in) {
        return detail::call_forward(static_cast<M&>(m), in, std::make_index_sequence<arity>{});
      },
      arity);
}

/// The pipeline flags of a wrapper (the seed's keyword arguments).
struct WrapperOptions {
  /// Keep outputs on the devices as ranked tensors for the next stage.
  bool pipeline_execution = false;
  /// With pipeline_execution: return host tensors anyway (true for the last stage).
  bool return_ranked_to_cpu = true;
  /// Names the stage in artifacts and messages.
  std::string tag = "model";
  /// compile() is strict: a checkpoint tensor the model does not use is an error, unless its
  /// key (as stored, or as checkpoint_key_map gives it) matches one of these regular
  /// expressions (ECMAScript, matched anywhere in the key, like Hugging Face's
  /// `_keys_to_ignore_on_load_unexpected`), e.g. R"(\.rotary_emb\.inv_freq$)". A tensor the
  /// model uses is never ignored; a missing one stays an error.
  std::vector<std::string> ignore_checkpoint_keys;
  /// Maps each checkpoint key to the model's key (like NxD's convert_hf_to_neuron_state_dict,
  /// one key at a time); returning "" drops that tensor. Unset: keys are used as stored.
  std::function<std::string(const std::string& checkpoint_key)> checkpoint_key_map;
  /// The checkpoint ApplicationBase::compile() compiles this stage from: "" (the default) the
  /// application's model path; else this path, for a stage whose weights lie elsewhere (e.g. a
  /// diffusers pipeline's vae/ beside its transformer/).
  std::string checkpoint_path;
};

class ModelWrapper {
 public:
  ModelWrapper(const InferenceConfig& config, ModelFactory model_cls, WrapperOptions options);
  virtual ~ModelWrapper();
  ModelWrapper(const ModelWrapper&) = delete;
  ModelWrapper& operator=(const ModelWrapper&) = delete;

  /// Example inputs for compilation: one set per batch bucket, or a single set whose first dim
  /// is replaced by each bucket size. Only shapes and dtypes are used; floating inputs are
  /// compiled in the config's dtype.
  virtual std::vector<std::vector<Tensor>> input_generator() const = 0;
  /// Names of forward()'s arguments for messages (default "input0", "input1", ...).
  virtual std::vector<std::string> input_names() const;
  /// Names of each input's dims, outermost first: "batch" for dim 0, a name listed in the
  /// config's dim_buckets (e.g. "seq") for a dim compiled per bucket, "" for a fixed dim; dim 0
  /// must be "batch". Default (empty): every input is [batch, fixed...].
  /// A bucketed dim is padded with zeros to the bucket's size, so inputs that tell the model
  /// which entries are real (lengths, positions) must make zero mean "padding".
  virtual std::vector<std::vector<std::string>> input_dims() const { return {}; }
  /// The same for the outputs. Host outputs are cut back along every named dim to the real
  /// size of the inputs' dim of that name. Default (empty): every output is [batch, fixed...].
  virtual std::vector<std::vector<std::string>> output_dims() const { return {}; }
  /// Inputs that keep their example's floating dtype instead of the config's (e.g. float32
  /// sampling parameters of a bfloat16 model): one flag per input, or empty (none).
  virtual std::vector<bool> keep_input_dtype() const { return {}; }

  const std::string& tag() const { return options_.tag; }
  const InferenceConfig& config() const { return config_; }
  const RuntimeConfig& neuron_config() const { return config_.runtime_config(); }
  bool pipeline_execution() const { return options_.pipeline_execution; }
  bool return_ranked_to_cpu() const { return options_.return_ranked_to_cpu; }
  const WrapperOptions& options() const { return options_; }

  /// Traces the model for every bucket, shards the checkpoint at `checkpoint_path` (a
  /// model.safetensors file or a folder with one, or with an index and shards) over the ranks,
  /// and writes the artifact to `dir` (created; a previous artifact there is replaced).
  /// Checkpoint keys go through the options' checkpoint_key_map and ignore_checkpoint_keys.
  /// Blocking. Errors name the tag and the keys/shapes involved. With ranks as processes
  /// (devpipe/world.h) every process calls it: process 0 writes the artifact, which every
  /// process must then see at `dir` (one machine, or a shared file system).
  void compile(const std::string& checkpoint_path, const std::string& dir,
               const ProgressFn& progress = {});
  /// Reads the artifact in `dir`, refuses one that does not match this wrapper and config,
  /// builds every bucket on every rank, binds the stage's states (from the state store: see
  /// set_state_store) and runs each bucket once (warm-up, on scratch copies of the states, so
  /// the real states are not touched). Blocking. On failure the wrapper keeps what it had
  /// loaded before. StateError while forward() runs in another thread. With ranks as processes
  /// every process calls it and reads only its own ranks' weights; processes that load another
  /// artifact or config than their peers are refused (ArtifactMismatch naming both).
  void load(const std::string& dir, const ProgressFn& progress = {});
  bool is_loaded() const;
  /// The store this wrapper's states live in, used by the next load(): set it to share states
  /// with other stages (ApplicationBase::load does). Without one, load() creates its own.
  void set_state_store(std::shared_ptr<StateStore> store);
  const std::shared_ptr<StateStore>& state_store() const { return states_; }

  /// Runs the stage. Arguments: host tensors and ranked tensors in any mix (a ranked argument
  /// supplies all its outputs as consecutive arguments; use select() for one). Host inputs are
  /// padded to the smallest bucket that fits and replicated to every rank; ranked inputs are
  /// used in place on their rank's device (re-padded there when buckets differ); a batch beyond
  /// the largest bucket runs in chunks. Returns ranked tensors (pipeline_execution and not
  /// return_ranked_to_cpu; asynchronous) or host tensors of the caller's batch (blocking).
  Output forward(const std::vector<Input>& inputs);
  /// The same for a braced list, `forward({prev})` or `forward({features, tokens})`, which then
  /// builds no vector: passing stages' results on (ranked tensors) allocates nothing in steady
  /// state, like forward() itself. (An argument made from a host Tensor copies its Shape.)
  Output forward(std::initializer_list<Input> inputs);

  /// Bucket batch sizes of the loaded artifact (one per bucket: repeated when other dims are
  /// bucketed too).
  std::vector<std::int64_t> loaded_buckets() const;
  /// Text form of the loaded graph for `bucket` (inspection; the first bucket of that batch).
  std::string graph_text(std::int64_t bucket) const;

 private:
  struct Impl;
  // forward(): marks the call in flight (load() refuses meanwhile), checks a load() happened.
  Output forward_loaded(std::span<const Input> inputs);
  Output run_forward(Impl& impl, std::span<const Input> inputs);
  // compile() in this process (every process under MPI calls compile(); process 0 runs this).
  void compile_in_process(const std::string& checkpoint_path, const std::string& dir,
                          const ProgressFn& progress);
  InferenceConfig config_;
  ModelFactory factory_;
  WrapperOptions options_;
  std::shared_ptr<StateStore> states_;
  std::unique_ptr<Impl> impl_;
  // Calls reading impl_ that are running, and whether a load() is replacing impl_ (load()
  // refuses while calls run; calls refuse while it runs).
  mutable std::atomic<int> calls_in_flight_{0};
  std::atomic<bool> loading_{false};
};

/// The seed's NeuronApplicationBase: a checkpoint path, a config and a list of wrappers.
/// compile(path) writes each wrapper's artifact to path/<tag> (from the model path, or the
/// wrapper's WrapperOptions::checkpoint_path); load(path) loads them, all with
/// the application's state store, so stages declaring a state of the same name share it.
class ApplicationBase {
 public:
  ApplicationBase(std::string model_path, InferenceConfig config);
  virtual ~ApplicationBase();

  void compile(const std::string& compiled_model_path);
  void load(const std::string& compiled_model_path);
  const std::string& model_path() const { return model_path_; }
  const InferenceConfig& config() const { return config_; }
  /// Reports compile/load progress (default: none).
  void set_progress(ProgressFn fn) { progress_ = std::move(fn); }
  /// The states of the application's stages (KV caches, ...), shared by name.
  const std::shared_ptr<StateStore>& state_store() const { return states_; }

  /// The seed's self.models.
  std::vector<std::shared_ptr<ModelWrapper>> models;

 private:
  std::string model_path_;
  InferenceConfig config_;
  ProgressFn progress_;
  std::shared_ptr<StateStore> states_;
};

}  // namespace devpipe
