#include "devpipe/models/llama.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>

#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "models/llama_parts.h"

namespace devpipe::models {

using nlohmann::json;

// ------------------------------------------------------------------------------ config


LlamaConfig LlamaConfig::from_hf_folder(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  return parse_llama_config(read_hf_config_json(model_dir), "'" + path + "'");
}

LlamaConfig parse_llama_config(const json& j, const std::string& where) {
  const HfFields f{j, where};
  LlamaConfig c;
  c.hidden_size = f.integer("hidden_size", std::nullopt);
  c.intermediate_size = f.integer("intermediate_size", std::nullopt);
  c.num_hidden_layers = f.integer("num_hidden_layers", std::nullopt);
  c.num_attention_heads = f.integer("num_attention_heads", std::nullopt);
  c.num_key_value_heads = f.integer("num_key_value_heads", c.num_attention_heads);
  c.vocab_size = f.integer("vocab_size", std::nullopt);
  c.max_position_embeddings = f.integer("max_position_embeddings", std::nullopt);
  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  c.rope_theta = f.number("rope_theta", 10000.0);
  if (j.contains("tie_word_embeddings") && !j["tie_word_embeddings"].is_null()) {
    if (!j["tie_word_embeddings"].is_boolean()) throw ConfigError(where + ": \"tie_word_embeddings\" must be true or false");
    c.tie_word_embeddings = j["tie_word_embeddings"].get<bool>();
  }
  if (j.contains("eos_token_id") && !j["eos_token_id"].is_null()) {
    const json& e = j["eos_token_id"];
    if (e.is_number_integer()) {
      c.eos_token_ids = {e.get<std::int64_t>()};
    } else if (e.is_array() && std::all_of(e.begin(), e.end(), [](const json& x) { return x.is_number_integer(); })) {
      c.eos_token_ids = e.get<std::vector<std::int64_t>>();
    } else {
      throw ConfigError(where + ": \"eos_token_id\" is " + e.dump() + ", expected an integer or a list of them");
    }
  }
  if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
    throw ConfigError(where + ": \"rope_scaling\" " + j["rope_scaling"].dump() +
                      " is not supported (plain rotary embedding with rope_theta only)");
  }
  if (j.contains("sliding_window") && !j["sliding_window"].is_null()) {
    if (!j["sliding_window"].is_number_integer() || j["sliding_window"].get<std::int64_t>() < 1) {
      throw ConfigError(where + ": \"sliding_window\" is " + j["sliding_window"].dump() +
                        ", expected a positive integer or null");
    }
    c.sliding_window = j["sliding_window"].get<std::int64_t>();
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    throw ConfigError(where + ": \"hidden_act\" " + j["hidden_act"].dump() + " is not supported (silu only)");
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (j.contains(key) && j[key].is_boolean() && j[key].get<bool>()) {
      throw ConfigError(where + ": \"" + std::string(key) + "\": true is not supported");
    }
  }
  require_positive(where, {{"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
                        {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
                        {"num_key_value_heads", c.num_key_value_heads}, {"vocab_size", c.vocab_size},
                        {"max_position_embeddings", c.max_position_embeddings}});
  c.head_dim = f.integer("head_dim", c.hidden_size / c.num_attention_heads);
  if (!j.contains("head_dim") && c.hidden_size % c.num_attention_heads != 0) {
    throw ConfigError(where + ": hidden_size " + std::to_string(c.hidden_size) +
                      " is not a multiple of num_attention_heads " + std::to_string(c.num_attention_heads));
  }
  if (c.head_dim < 2 || c.head_dim % 2 != 0) {
    throw ConfigError(where + ": head_dim " + std::to_string(c.head_dim) + " must be even (rotary embedding)");
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    throw ConfigError(where + ": num_attention_heads " + std::to_string(c.num_attention_heads) +
                      " is not a multiple of num_key_value_heads " + std::to_string(c.num_key_value_heads));
  }
  return c;
}

void LlamaConfig::to_attributes(InferenceConfig& config) const {
  config.set("hidden_size", hidden_size);
  config.set("intermediate_size", intermediate_size);
  config.set("num_hidden_layers", num_hidden_layers);
  config.set("num_attention_heads", num_attention_heads);
  config.set("num_key_value_heads", num_key_value_heads);
  config.set("head_dim", head_dim);
  config.set("rms_norm_eps", rms_norm_eps);
  config.set("rope_theta", rope_theta);
  config.set("vocab_size", vocab_size);
  config.set("max_position_embeddings", max_position_embeddings);
  config.set("tie_word_embeddings", tie_word_embeddings);
  config.set("eos_token_id", eos_token_ids);
  config.set("sliding_window", sliding_window);
}

LlamaConfig LlamaConfig::from_attributes(const InferenceConfig& config) {
  LlamaConfig c;
  c.hidden_size = config.get_int("hidden_size");
  c.intermediate_size = config.get_int("intermediate_size");
  c.num_hidden_layers = config.get_int("num_hidden_layers");
  c.num_attention_heads = config.get_int("num_attention_heads");
  c.num_key_value_heads = config.get_int("num_key_value_heads");
  c.head_dim = config.get_int("head_dim");
  c.rms_norm_eps = config.get_float("rms_norm_eps");
  c.rope_theta = config.get_float("rope_theta");
  c.vocab_size = config.get_int("vocab_size");
  c.max_position_embeddings = config.get_int("max_position_embeddings");
  c.tie_word_embeddings = config.get_bool("tie_word_embeddings");
  c.eos_token_ids = config.get_ints("eos_token_id");
  c.sliding_window = config.get_int("sliding_window");
  return c;
}

LlamaOptions llama_options_of(const InferenceConfig& config) {
  LlamaOptions o;
  o.context_buckets = config.get_ints("context_buckets");
  o.cache_buckets = config.get_ints("cache_buckets");
  o.max_length = config.get_int("max_length");
  o.output_logits = config.get_bool("output_logits");
  return o;
}

std::vector<std::int64_t> resolve_cache_buckets(std::vector<std::int64_t> buckets, std::int64_t max_length) {
  if (max_length < 1) throw ConfigError("llama: max_length must be >= 1, got " + std::to_string(max_length));
  if (buckets.empty()) {
    for (std::int64_t b = kFirstCacheBucket; b < max_length; b *= 2) buckets.push_back(b);
  }
  std::sort(buckets.begin(), buckets.end());
  buckets.erase(std::unique(buckets.begin(), buckets.end()), buckets.end());
  if (!buckets.empty() && (buckets.front() < 1 || buckets.back() > max_length)) {
    throw ConfigError("llama: cache buckets " + Shape(buckets).to_string() + " must lie in [1, max_length " +
                      std::to_string(max_length) + "]");
  }
  if (buckets.empty() || buckets.back() != max_length) buckets.push_back(max_length);
  return buckets;
}

InferenceConfig llama_config(const std::string& model_dir, RuntimeConfig runtime, const LlamaOptions& options) {
  return llama_inference_config(LlamaConfig::from_hf_folder(model_dir), model_dir, std::move(runtime), options);
}

InferenceConfig llama_inference_config(const LlamaConfig& cfg, const std::string& model_dir, RuntimeConfig runtime,
                                       const LlamaOptions& options) {
  std::vector<std::int64_t> ctx = options.context_buckets;
  if (ctx.empty()) throw ConfigError("llama: context_buckets is empty");
  std::sort(ctx.begin(), ctx.end());
  ctx.erase(std::unique(ctx.begin(), ctx.end()), ctx.end());
  const std::int64_t max_length = options.max_length > 0 ? options.max_length : cfg.max_position_embeddings;
  if (max_length > cfg.max_position_embeddings) {
    throw ConfigError("llama: max_length " + std::to_string(max_length) + " exceeds max_position_embeddings " +
                      std::to_string(cfg.max_position_embeddings) + " of '" + model_dir + "'");
  }
  if (cfg.sliding_window > 0 && cfg.sliding_window < max_length) {
    // Mistral's sliding-window attention is not implemented: refused rather than attending
    // further back than the model was trained to. A window covering the cache is plain
    // causal attention.
    throw ConfigError("llama: sliding_window " + std::to_string(cfg.sliding_window) + " of '" + model_dir +
                      "' is shorter than max_length " + std::to_string(max_length) +
                      " (sliding-window attention is not supported: set max_length <= " +
                      std::to_string(cfg.sliding_window) + ")");
  }
  if (ctx.front() < 1 || ctx.back() > max_length) {
    throw ConfigError("llama: context buckets " + Shape(ctx).to_string() + " must lie in [1, max_length " +
                      std::to_string(max_length) + "]");
  }
  const int tp = runtime.tp_degree;
  if (cfg.num_attention_heads % tp != 0) {
    throw ConfigError("llama: num_attention_heads " + std::to_string(cfg.num_attention_heads) +
                      " cannot be split over tp_degree " + std::to_string(tp));
  }
  if (cfg.num_key_value_heads % tp != 0 && tp % cfg.num_key_value_heads != 0) {
    throw ConfigError("llama: num_key_value_heads " + std::to_string(cfg.num_key_value_heads) +
                      " neither divides nor is divided by tp_degree " + std::to_string(tp) +
                      " (KV heads are split when tp divides them, replicated when they divide tp)");
  }
  if (cfg.intermediate_size % tp != 0) {
    throw ConfigError("llama: intermediate_size " + std::to_string(cfg.intermediate_size) +
                      " cannot be split over tp_degree " + std::to_string(tp));
  }
  const std::vector<std::int64_t> cache = resolve_cache_buckets(options.cache_buckets, max_length);
  runtime.dim_buckets["seq"] = ctx;
  runtime.dim_buckets["cache"] = cache;
  InferenceConfig c(runtime);
  cfg.to_attributes(c);
  c.set("context_buckets", ctx);
  c.set("cache_buckets", cache);
  c.set("max_length", max_length);
  c.set("output_logits", options.output_logits);
  return c;
}

// ------------------------------------------------------------------------------ model

namespace {

/// q/k/v/o projections of one layer; k and v split over the ranks or replicated.
struct Attention : nn::Module {
  nn::ColumnParallelLinear& q_proj;
  std::unique_ptr<nn::Module> k_owner, v_owner;
  nn::Module* k_proj = nullptr;
  nn::Module* v_proj = nullptr;
  nn::RowParallelLinear& o_proj;
  bool kv_split;

  Attention(const LlamaConfig& c, bool split)
      : q_proj(register_module("q_proj", std::make_unique<nn::ColumnParallelLinear>(
                                             c.hidden_size, c.num_attention_heads * c.head_dim, false,
                                             /*gather_output=*/false))),
        o_proj(register_module("o_proj", std::make_unique<nn::RowParallelLinear>(
                                             c.num_attention_heads * c.head_dim, c.hidden_size, false,
                                             /*input_is_parallel=*/true))),
        kv_split(split) {
    const std::int64_t kv = c.num_key_value_heads * c.head_dim;
    if (split) {
      k_proj = &register_module("k_proj", std::make_unique<nn::ColumnParallelLinear>(c.hidden_size, kv, false, false));
      v_proj = &register_module("v_proj", std::make_unique<nn::ColumnParallelLinear>(c.hidden_size, kv, false, false));
    } else {
      k_proj = &register_module("k_proj", std::make_unique<nn::Linear>(c.hidden_size, kv, false));
      v_proj = &register_module("v_proj", std::make_unique<nn::Linear>(c.hidden_size, kv, false));
    }
  }
  std::string type_name() const override { return "LlamaAttention"; }
  Var project(const nn::Module* m, Var h) const {
    if (kv_split) return (*static_cast<const nn::ColumnParallelLinear*>(m))(h);
    return (*static_cast<const nn::Linear*>(m))(h);
  }
};

struct Mlp : nn::Module {
  nn::ColumnParallelLinear& gate_proj;
  nn::ColumnParallelLinear& up_proj;
  nn::RowParallelLinear& down_proj;
  explicit Mlp(const LlamaConfig& c)
      : gate_proj(register_module("gate_proj", std::make_unique<nn::ColumnParallelLinear>(
                                                   c.hidden_size, c.intermediate_size, false, /*gather_output=*/false))),
        up_proj(register_module("up_proj", std::make_unique<nn::ColumnParallelLinear>(
                                               c.hidden_size, c.intermediate_size, false, /*gather_output=*/false))),
        down_proj(register_module("down_proj", std::make_unique<nn::RowParallelLinear>(
                                                   c.intermediate_size, c.hidden_size, false, /*input_is_parallel=*/true))) {}
  std::string type_name() const override { return "LlamaMLP"; }
  Var operator()(Var h) const { return down_proj(F::silu(gate_proj(h)) * up_proj(h)); }
};

struct DecoderLayer : nn::Module {
  nn::RMSNorm& input_layernorm;
  Attention& self_attn;
  nn::RMSNorm& post_attention_layernorm;
  Mlp& mlp;
  DecoderLayer(const LlamaConfig& c, bool split)
      : input_layernorm(register_module("input_layernorm", std::make_unique<nn::RMSNorm>(
                                                               std::vector<std::int64_t>{c.hidden_size}, c.rms_norm_eps))),
        self_attn(register_module("self_attn", std::make_unique<Attention>(c, split))),
        post_attention_layernorm(register_module(
            "post_attention_layernorm",
            std::make_unique<nn::RMSNorm>(std::vector<std::int64_t>{c.hidden_size}, c.rms_norm_eps))),
        mlp(register_module("mlp", std::make_unique<Mlp>(c))) {}
  std::string type_name() const override { return "LlamaDecoderLayer"; }
};

struct Backbone : nn::Module {
  std::unique_ptr<nn::Module> embed_owner;
  nn::Module* embed_tokens = nullptr;
  bool vocab_split;
  nn::ModuleList<DecoderLayer>& layers;
  nn::RMSNorm& norm;
  Backbone(const LlamaConfig& c, bool kv_split, bool vsplit)
      : vocab_split(vsplit),
        layers(register_module("layers", std::make_unique<nn::ModuleList<DecoderLayer>>())),
        norm(register_module("norm", std::make_unique<nn::RMSNorm>(std::vector<std::int64_t>{c.hidden_size}, c.rms_norm_eps))) {
    if (vsplit) {
      embed_tokens = &register_module("embed_tokens", std::make_unique<nn::ParallelEmbedding>(c.vocab_size, c.hidden_size));
    } else {
      embed_tokens = &register_module("embed_tokens", std::make_unique<nn::Embedding>(c.vocab_size, c.hidden_size));
    }
    for (std::int64_t i = 0; i < c.num_hidden_layers; ++i) layers.push_back(std::make_unique<DecoderLayer>(c, kv_split));
  }
  std::string type_name() const override { return "LlamaModel"; }
  Var embed(Var ids) const {
    if (vocab_split) return (*static_cast<const nn::ParallelEmbedding*>(embed_tokens))(ids);
    return (*static_cast<const nn::Embedding*>(embed_tokens))(ids);
  }
};

/// x[:, rank's head] of a KV tensor [B, kv, T, D] whose heads are replicated: the rank's query
/// heads all use kv head rank / (tp / kv).
Var rank_kv_head(Var x, int tp) {
  const std::int64_t kv = x.dim(1);
  const std::int64_t per = tp / kv;
  std::vector<Var> parts;
  for (int r = 0; r < tp; ++r) parts.push_back(F::slice(x, 1, r / per, r / per + 1));
  Var all = F::concat(parts, 1);  // [B, tp, T, D]: rank r's head at r
  Attrs a;
  a.set("dim", std::int64_t{1}).set("start", std::int64_t{0}).set("end", std::int64_t{1})
      .set("step", std::int64_t{1}).set("rank_stride", std::int64_t{1});
  return Tracer::current().emit(OpKind::Slice, {all}, a);
}

}  // namespace

struct LlamaModel::Layers {
  Backbone* model = nullptr;
  std::unique_ptr<nn::Module> lm_head_owner;
  nn::ColumnParallelLinear* lm_head_split = nullptr;
  nn::Linear* lm_head_full = nullptr;
  bool kv_split = true;
  bool vocab_split = true;
  bool decode = false;
};

LlamaModel::LlamaModel(const InferenceConfig& config, bool decode)
    : cfg_(LlamaConfig::from_attributes(config)),
      opts_(llama_options_of(config)),
      rows_(config.runtime_config().batch_size),
      tp_(config.runtime_config().tp_degree),
      layers_(std::make_unique<Layers>()) {
  layers_->decode = decode;
  layers_->kv_split = cfg_.num_key_value_heads % tp_ == 0;
  layers_->vocab_split = cfg_.vocab_size % tp_ == 0;
  layers_->model = &register_module("model", std::make_unique<Backbone>(cfg_, layers_->kv_split, layers_->vocab_split));
  if (!cfg_.tie_word_embeddings) {
    if (layers_->vocab_split) {
      layers_->lm_head_split = &register_module(
          "lm_head", std::make_unique<nn::ColumnParallelLinear>(cfg_.hidden_size, cfg_.vocab_size, false,
                                                                /*gather_output=*/true));
    } else {
      layers_->lm_head_full = &register_module("lm_head", std::make_unique<nn::Linear>(cfg_.hidden_size, cfg_.vocab_size, false));
    }
  }
}

LlamaModel::~LlamaModel() = default;

Var LlamaModel::lm_head(Var h) {
  Layers& L = *layers_;
  if (cfg_.tie_word_embeddings) {
    // The embedding table is the head: vocabulary-split like the embedding, then gathered.
    Var w = L.model->embed_tokens->param("weight");
    return L.vocab_split ? F::all_gather(F::linear(h, w), -1) : F::linear(h, w);
  }
  return L.lm_head_split ? (*L.lm_head_split)(h) : (*L.lm_head_full)(h);
}

Var LlamaModel::embed(Var input_ids) { return layers_->model->embed(input_ids); }

Var LlamaModel::hidden(Var x, Var positions, Var kv_lengths, std::optional<Var> attention_mask) {
  const bool prefill = !attention_mask.has_value();
  Layers& L = *layers_;
  const std::int64_t B = x.dim(0), T = x.dim(1), hd = cfg_.head_dim;
  const std::int64_t heads = cfg_.num_attention_heads / tp_;
  const std::int64_t kv_heads = L.kv_split ? cfg_.num_key_value_heads / tp_ : 1;
  const DType dt = Tracer::current().options().dtype;
  for (std::size_t i = 0; i < L.model->layers.size(); ++i) {
    DecoderLayer& layer = L.model->layers[i];
    Attention& at = layer.self_attn;
    Var h = layer.input_layernorm(x);
    auto heads_of = [&](Var y, std::int64_t n) { return F::transpose(F::reshape(y, {B, T, n, hd}), 1, 2); };
    Var q = heads_of(at.q_proj(h), heads);
    Var k = heads_of(at.project(at.k_proj, h), L.kv_split ? kv_heads : cfg_.num_key_value_heads);
    Var v = heads_of(at.project(at.v_proj, h), L.kv_split ? kv_heads : cfg_.num_key_value_heads);
    q = F::rotary_embedding(q, positions, cfg_.rope_theta);
    k = F::rotary_embedding(k, positions, cfg_.rope_theta);
    if (!L.kv_split) {
      k = rank_kv_head(k, tp_);
      v = rank_kv_head(v, tp_);
    }
    const std::string prefix = "layers." + std::to_string(i) + ".self_attn.";
    const Shape cache{rows_, kv_heads, opts_.max_length, hd};
    Var kc = F::cache_write(F::state(prefix + "k_cache", cache, dt), k, positions);
    Var vc = F::cache_write(F::state(prefix + "v_cache", cache, dt), v, positions);
    Var a;
    if (prefill) {
      // Prompts start at position 0: the fresh keys are the cache's first T rows.
      a = F::masked_attention(q, k, v, positions, kv_lengths);
    } else {
      // The cache's first B rows (a view of the state: nothing writes it after this layer's
      // cache_write), attended over its first C positions in place: the mask [B, C] of this
      // cache bucket bounds the keys the kernel reads.
      if (B < rows_) {
        kc = F::slice(kc, 0, 0, B);
        vc = F::slice(vc, 0, 0, B);
      }
      a = F::masked_attention(q, kc, vc, positions, kv_lengths, *attention_mask);
    }
    a = F::reshape(F::transpose(a, 1, 2), {B, T, heads * hd});
    x = x + at.o_proj(a);
    x = x + layer.mlp(layer.post_attention_layernorm(x));
  }
  return L.model->norm(x);
}

std::vector<Var> LlamaModel::encode(Var input_ids, Var positions1, Var last_index, Var sampling, Var u) {
  return encode_embeds(embed(input_ids), positions1, last_index, sampling, u);
}

std::vector<Var> LlamaModel::encode_embeds(Var embeds, Var positions1, Var last_index, Var sampling, Var u) {
  const std::int64_t B = embeds.dim(0);
  Var positions = positions1 - 1.0;  // padding (0) becomes -1: nothing written, nothing seen
  Var kv_lengths = last_index + 1.0;
  Var h = hidden(embeds, positions, kv_lengths, std::nullopt);
  auto last_rows = [&](Var y) {  // y[b, last_index[b], :]
    const std::int64_t n = y.dim(2);
    Var idx = F::reshape(last_index, {B, 1, 1}) + F::full({1, 1, n}, 0, DType::Int64);
    return F::reshape(F::gather(y, 1, idx), {B, n});
  };
  if (opts_.output_logits) {
    Var logits = lm_head(h);  // [B, T, V]
    return {F::sample(last_rows(logits), sampling, u), logits};
  }
  return {F::sample(lm_head(last_rows(h)), sampling, u)};
}

std::vector<Var> LlamaModel::decode(Var input_ids, Var positions1, Var attention_mask, Var sampling, Var u) {
  const std::int64_t B = input_ids.dim(0);
  Var positions = positions1 - 1.0;
  Var kv_lengths = F::reshape(positions1, {B});  // the cache holds positions 0..p after this step
  Var h = hidden(embed(input_ids), positions, kv_lengths, attention_mask);
  Var logits = F::reshape(lm_head(h), {B, cfg_.vocab_size});
  Var next = F::sample(logits, sampling, u);
  if (opts_.output_logits) return {next, logits};
  return {next};
}

// ------------------------------------------------------------------------ application

namespace {

struct ContextEncoding : LlamaModel {
  explicit ContextEncoding(const InferenceConfig& c) : LlamaModel(c, false) {}
  std::vector<Var> forward(Var ids, Var positions1, Var last_index, Var sampling, Var u) {
    return encode(ids, positions1, last_index, sampling, u);
  }
};

struct TokenGeneration : LlamaModel {
  explicit TokenGeneration(const InferenceConfig& c) : LlamaModel(c, true) {}
  std::vector<Var> forward(Var ids, Var positions1, Var attention_mask, Var sampling, Var u) {
    return decode(ids, positions1, attention_mask, sampling, u);
  }
};

class ContextWrapper : public ModelWrapper {
 public:
  explicit ContextWrapper(const InferenceConfig& c)
      : ModelWrapper(c, model_cls<ContextEncoding>(),
                     {.pipeline_execution = false, .return_ranked_to_cpu = true, .tag = "context_encoding"}),
        logits_(c.get_bool("output_logits")) {}
  std::vector<std::vector<Tensor>> input_generator() const override {
    return {{Tensor::zeros({1, 1}, DType::Int64), Tensor::zeros({1, 1}, DType::Int64), Tensor::zeros({1}, DType::Int64),
             Tensor::zeros({1, 3}), Tensor::zeros({1})}};
  }
  std::vector<std::string> input_names() const override {
    return {"input_ids", "positions1", "last_index", "sampling", "u"};
  }
  std::vector<std::vector<std::string>> input_dims() const override {
    return {{"batch", "seq"}, {"batch", "seq"}, {"batch"}, {"batch", ""}, {"batch"}};
  }
  std::vector<std::vector<std::string>> output_dims() const override {
    if (logits_) return {{"batch"}, {"batch", "seq", ""}};
    return {{"batch"}};
  }
  std::vector<bool> keep_input_dtype() const override { return {false, false, false, true, true}; }

 private:
  bool logits_;
};

class TokenWrapper : public ModelWrapper {
 public:
  TokenWrapper(const InferenceConfig& c, std::function<std::string(const std::string&)> key_map)
      : ModelWrapper(c, model_cls<TokenGeneration>(),
                     {.pipeline_execution = false,
                      .return_ranked_to_cpu = true,
                      .tag = "token_generation",
                      .ignore_checkpoint_keys = {},
                      .checkpoint_key_map = std::move(key_map),
                      .checkpoint_path = {}}) {}
  std::vector<std::vector<Tensor>> input_generator() const override {
    return {{Tensor::zeros({1, 1}, DType::Int64), Tensor::zeros({1, 1}, DType::Int64),
             Tensor::zeros({1, 1}, DType::Int64), Tensor::zeros({1, 3}), Tensor::zeros({1})}};
  }
  std::vector<std::string> input_names() const override {
    return {"input_ids", "positions1", "attention_mask", "sampling", "u"};
  }
  /// Bucketed on the batch and on the cache length ("cache", carried by attention_mask).
  std::vector<std::vector<std::string>> input_dims() const override {
    return {{"batch", ""}, {"batch", ""}, {"batch", "cache"}, {"batch", ""}, {"batch"}};
  }
  std::vector<bool> keep_input_dtype() const override { return {false, false, false, true, true}; }
};

}  // namespace

std::shared_ptr<ModelWrapper> make_token_generation(const InferenceConfig& config,
                                                    std::function<std::string(const std::string&)> checkpoint_key_map) {
  return std::make_shared<TokenWrapper>(config, std::move(checkpoint_key_map));
}

LlamaForCausalLM::LlamaForCausalLM(const std::string& model_dir, const InferenceConfig& config)
    : ApplicationBase(model_dir, config),
      cfg_(LlamaConfig::from_attributes(config)),
      opts_(llama_options_of(config)),
      rows_(config.runtime_config().batch_size) {
  models.push_back(std::make_shared<ContextWrapper>(config));
  models.push_back(make_token_generation(config));
}

void LlamaForCausalLM::check_request(const std::vector<std::vector<std::int64_t>>& prompts,
                                     const GenerationConfig& gen) const {
  check_generation_request(cfg_, opts_, rows_, prompts, gen);
}

void check_generation_request(const LlamaConfig& cfg, const LlamaOptions& opts, std::int64_t rows,
                              const std::vector<std::vector<std::int64_t>>& prompts, const GenerationConfig& gen) {
  const auto n = static_cast<std::int64_t>(prompts.size());
  // ---- every request checked before anything runs
  if (n < 1) throw InvalidArgument("generate: no prompts");
  if (n > rows) {
    throw InvalidArgument("generate: " + std::to_string(n) + " prompts, but the model was compiled for batch_size " +
                          std::to_string(rows) + " sequences");
  }
  if (gen.max_new_tokens < 1) {
    throw InvalidArgument("generate: max_new_tokens must be >= 1, got " + std::to_string(gen.max_new_tokens));
  }
  const std::int64_t largest = opts.context_buckets.back();
  for (std::int64_t s = 0; s < n; ++s) {
    const auto& p = prompts[static_cast<std::size_t>(s)];
    const auto len = static_cast<std::int64_t>(p.size());
    const std::string seq = "generate: sequence " + std::to_string(s) + ": ";
    if (len < 1) throw InvalidArgument(seq + "the prompt is empty");
    if (len > largest) {
      throw InvalidArgument(seq + "the prompt has " + std::to_string(len) +
                            " tokens, more than the largest context bucket " + std::to_string(largest));
    }
    for (std::int64_t t = 0; t < len; ++t) {
      const std::int64_t id = p[static_cast<std::size_t>(t)];
      if (id < 0 || id >= cfg.vocab_size) {
        throw InvalidArgument(seq + "token id " + std::to_string(id) + " at position " + std::to_string(t) +
                              " is outside the vocabulary [0, " + std::to_string(cfg.vocab_size) + ")");
      }
    }
    if (len + gen.max_new_tokens > cfg.max_position_embeddings) {
      throw InvalidArgument(seq + "prompt length " + std::to_string(len) + " + max_new_tokens " +
                            std::to_string(gen.max_new_tokens) + " = " + std::to_string(len + gen.max_new_tokens) +
                            " exceeds max_position_embeddings " + std::to_string(cfg.max_position_embeddings));
    }
    if (len + gen.max_new_tokens > opts.max_length) {
      throw InvalidArgument(seq + "prompt length " + std::to_string(len) + " + max_new_tokens " +
                            std::to_string(gen.max_new_tokens) + " = " + std::to_string(len + gen.max_new_tokens) +
                            " exceeds the KV cache length (max_length) " + std::to_string(opts.max_length));
    }
  }

}

GenerationResult LlamaForCausalLM::generate(const std::vector<std::vector<std::int64_t>>& prompts,
                                            const GenerationConfig& gen, const TokenCallback& on_token) {
  check_request(prompts, gen);
  return run_generation(
      cfg_, opts_, prompts, gen, on_token,
      [this](const Tensor& ids, const Tensor& pos1, const Tensor& last_index, const Tensor& sampling, const Tensor& u) {
        return context_encoding().forward({ids, pos1, last_index, sampling, u});
      },
      token_generation());
}

GenerationResult run_generation(const LlamaConfig& cfg, const LlamaOptions& opts,
                                const std::vector<std::vector<std::int64_t>>& prompts, const GenerationConfig& gen,
                                const TokenCallback& on_token, const PrefillFn& prefill,
                                ModelWrapper& token_generation) {
  const auto start = std::chrono::steady_clock::now();
  const auto n = static_cast<std::int64_t>(prompts.size());
  std::int64_t tmax = 0;
  for (const auto& p : prompts) tmax = std::max(tmax, static_cast<std::int64_t>(p.size()));

  GenerationResult res;
  res.tokens.assign(static_cast<std::size_t>(n), {});
  std::mt19937_64 rng(gen.seed);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  Tensor sampling = Tensor::zeros({n, 3});
  for (std::int64_t s = 0; s < n; ++s) {
    sampling.data<float>()[3 * s] = static_cast<float>(gen.temperature);
    sampling.data<float>()[3 * s + 1] = static_cast<float>(gen.top_k);
    sampling.data<float>()[3 * s + 2] = static_cast<float>(gen.top_p);
  }
  auto draw = [&] {
    Tensor u = Tensor::zeros({n});
    for (std::int64_t s = 0; s < n; ++s) u.data<float>()[s] = std::min(uniform(rng), 0.99999994f);
    return u;
  };
  const std::set<std::int64_t> eos(cfg.eos_token_ids.begin(), cfg.eos_token_ids.end());
  std::vector<bool> done(static_cast<std::size_t>(n), false);
  std::vector<std::int64_t> last(static_cast<std::size_t>(n), 0);
  auto take = [&](const Tensor& ids) {
    for (std::int64_t s = 0; s < n; ++s) {
      if (done[static_cast<std::size_t>(s)]) continue;
      const std::int64_t id = ids.data<std::int64_t>()[s];
      res.tokens[static_cast<std::size_t>(s)].push_back(id);
      last[static_cast<std::size_t>(s)] = id;
      ++res.generated;
      if (on_token) on_token(s, id);
      if (gen.stop_at_eos && eos.count(id)) done[static_cast<std::size_t>(s)] = true;
    }
  };

  // ---- prefill: the prompts right-padded to the longest (the runtime pads to the bucket)
  {
    Tensor ids = Tensor::zeros({n, tmax}, DType::Int64);
    Tensor pos1 = Tensor::zeros({n, tmax}, DType::Int64);
    Tensor last_index = Tensor::zeros({n}, DType::Int64);
    for (std::int64_t s = 0; s < n; ++s) {
      const auto& p = prompts[static_cast<std::size_t>(s)];
      for (std::size_t t = 0; t < p.size(); ++t) {
        ids.data<std::int64_t>()[s * tmax + static_cast<std::int64_t>(t)] = p[t];
        pos1.data<std::int64_t>()[s * tmax + static_cast<std::int64_t>(t)] = static_cast<std::int64_t>(t) + 1;
      }
      last_index.data<std::int64_t>()[s] = static_cast<std::int64_t>(p.size()) - 1;
    }
    Output out = prefill(ids, pos1, last_index, sampling, draw());
    if (opts.output_logits) res.prefill_logits = out.tensor(1).clone();
    take(out.tensor(0));
  }
  // ---- one token per sequence per step; finished sequences ride along as padding rows. The
  // attention mask [n, current length] has a 1 for every cache position a live sequence holds
  // after this step; the runtime pads it with zeros to the smallest cache bucket that fits.
  Tensor ids = Tensor::zeros({n, 1}, DType::Int64);
  Tensor pos1 = Tensor::zeros({n, 1}, DType::Int64);
  for (std::int64_t step = 1; step < gen.max_new_tokens; ++step) {
    if (std::all_of(done.begin(), done.end(), [](bool d) { return d; })) break;
    std::int64_t length = 1;
    for (std::int64_t s = 0; s < n; ++s) {
      const bool live = !done[static_cast<std::size_t>(s)];
      ids.data<std::int64_t>()[s] = live ? last[static_cast<std::size_t>(s)] : 0;
      // new token step-1 sits at position len + step - 1; stored + 1 (0 = padding)
      const std::int64_t p1 = live ? static_cast<std::int64_t>(prompts[static_cast<std::size_t>(s)].size()) + step : 0;
      pos1.data<std::int64_t>()[s] = p1;
      length = std::max(length, p1);
    }
    Tensor mask = Tensor::zeros({n, length}, DType::Int64);
    for (std::int64_t s = 0; s < n; ++s) {
      std::fill_n(mask.data<std::int64_t>() + s * length, pos1.data<std::int64_t>()[s], std::int64_t{1});
    }
    Output out = token_generation.forward({ids, pos1, mask, sampling, draw()});
    res.decode_cache_buckets.push_back(out.bucket().size("cache"));
    if (opts.output_logits) res.decode_logits.push_back(out.tensor(1).clone());
    take(out.tensor(0));
  }
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return res;
}

}  // namespace devpipe::models
