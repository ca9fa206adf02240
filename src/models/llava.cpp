#include "devpipe/models/llava.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>

#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "models/llama_parts.h"

namespace devpipe::models {

using nlohmann::json;

// ------------------------------------------------------------------------------ config

namespace {

void check_activation(const std::string& where, const char* key, const std::string& act) {
  if (act != "gelu" && act != "silu") {
    throw ConfigError(where + ": \"" + key + "\" \"" + act + "\" is not supported (\"gelu\" or \"silu\")");
  }
}

PixtralVisionConfig parse_pixtral_config(const json& j, const std::string& where) {
  const HfFields f{j, where};
  const std::string type = f.text("model_type", "pixtral");
  if (type != "pixtral") {
    throw ConfigError(where + ": vision tower model_type \"" + type + "\" is not supported (\"pixtral\" only)");
  }
  PixtralVisionConfig c;
  c.hidden_size = f.integer("hidden_size", c.hidden_size);
  c.intermediate_size = f.integer("intermediate_size", c.intermediate_size);
  c.num_hidden_layers = f.integer("num_hidden_layers", c.num_hidden_layers);
  c.num_attention_heads = f.integer("num_attention_heads", c.num_attention_heads);
  c.num_channels = f.integer("num_channels", c.num_channels);
  c.image_size = f.integer("image_size", c.image_size);
  c.patch_size = f.integer("patch_size", c.patch_size);
  c.hidden_act = f.text("hidden_act", c.hidden_act);
  c.rope_theta = f.number("rope_theta", c.rope_theta);
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {  // transformers >= 5
    const HfFields rp{j["rope_parameters"], where + " rope_parameters"};
    if (rp.text("rope_type", "default") != "default") {
      throw ConfigError(where + ": rope_parameters " + j["rope_parameters"].dump() + " is not supported (default rope only)");
    }
    c.rope_theta = rp.number("rope_theta", c.rope_theta);
  }
  check_activation(where, "hidden_act", c.hidden_act);
  require_positive(where, {{"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
                        {"num_hidden_layers", c.num_hidden_layers}, {"num_attention_heads", c.num_attention_heads},
                        {"num_channels", c.num_channels}, {"image_size", c.image_size}, {"patch_size", c.patch_size}});
  if (c.hidden_size % c.num_attention_heads != 0) {
    throw ConfigError(where + ": hidden_size " + std::to_string(c.hidden_size) + " is not a multiple of num_attention_heads " +
                      std::to_string(c.num_attention_heads));
  }
  // HF's attention splits hidden_size into heads; its rotary uses head_dim: they must agree.
  c.head_dim = f.integer("head_dim", c.hidden_size / c.num_attention_heads);
  if (c.head_dim != c.hidden_size / c.num_attention_heads) {
    throw ConfigError(where + ": head_dim " + std::to_string(c.head_dim) + " differs from hidden_size / num_attention_heads = " +
                      std::to_string(c.hidden_size / c.num_attention_heads));
  }
  if (c.head_dim % 4 != 0) {
    throw ConfigError(where + ": head_dim " + std::to_string(c.head_dim) +
                      " must be a multiple of 4 (the 2D rotary embedding gives a quarter of it to each axis and half)");
  }
  if (c.image_size < c.patch_size) {
    throw ConfigError(where + ": image_size " + std::to_string(c.image_size) + " is smaller than patch_size " +
                      std::to_string(c.patch_size));
  }
  return c;
}

// InferenceConfig attributes of the vision side (the text side is llama's).
void vision_to_attributes(const LlavaConfig& c, std::int64_t height, std::int64_t width, InferenceConfig& config) {
  const PixtralVisionConfig& v = c.vision;
  config.set("vision_hidden_size", v.hidden_size);
  config.set("vision_intermediate_size", v.intermediate_size);
  config.set("vision_num_hidden_layers", v.num_hidden_layers);
  config.set("vision_num_attention_heads", v.num_attention_heads);
  config.set("vision_head_dim", v.head_dim);
  config.set("vision_num_channels", v.num_channels);
  config.set("vision_image_size", v.image_size);
  config.set("vision_patch_size", v.patch_size);
  config.set("vision_hidden_act", v.hidden_act);
  config.set("vision_rope_theta", v.rope_theta);
  config.set("image_token_index", c.image_token_index);
  config.set("projector_hidden_act", c.projector_hidden_act);
  config.set("vision_feature_layer", c.vision_feature_layer);
  config.set("vision_feature_select_strategy", c.vision_feature_select_strategy);
  config.set("multimodal_projector_bias", c.multimodal_projector_bias);
  config.set("image_height", height);
  config.set("image_width", width);
}

LlavaConfig llava_from_attributes(const InferenceConfig& config) {
  LlavaConfig c;
  c.text = LlamaConfig::from_attributes(config);
  PixtralVisionConfig& v = c.vision;
  v.hidden_size = config.get_int("vision_hidden_size");
  v.intermediate_size = config.get_int("vision_intermediate_size");
  v.num_hidden_layers = config.get_int("vision_num_hidden_layers");
  v.num_attention_heads = config.get_int("vision_num_attention_heads");
  v.head_dim = config.get_int("vision_head_dim");
  v.num_channels = config.get_int("vision_num_channels");
  v.image_size = config.get_int("vision_image_size");
  v.patch_size = config.get_int("vision_patch_size");
  v.hidden_act = config.get_string("vision_hidden_act");
  v.rope_theta = config.get_float("vision_rope_theta");
  c.image_token_index = config.get_int("image_token_index");
  c.projector_hidden_act = config.get_string("projector_hidden_act");
  c.vision_feature_layer = config.get_int("vision_feature_layer");
  c.vision_feature_select_strategy = config.get_string("vision_feature_select_strategy");
  c.multimodal_projector_bias = config.get_bool("multimodal_projector_bias");
  return c;
}

}  // namespace

LlavaConfig LlavaConfig::from_hf_folder(const std::string& model_dir) {
  const std::string path = (std::filesystem::path(model_dir) / "config.json").string();
  const json j = read_hf_config_json(model_dir);
  const HfFields f{j, "'" + path + "'"};
  LlavaConfig c;
  c.text = parse_llama_config(f.object("text_config"), "'" + path + "' text_config");
  c.vision = parse_pixtral_config(f.object("vision_config"), "'" + path + "' vision_config");
  // transformers names it image_token_index in LlavaConfig (image_token_id in newer files).
  c.image_token_index = f.integer("image_token_index", f.integer("image_token_id", c.image_token_index));
  c.projector_hidden_act = f.text("projector_hidden_act", c.projector_hidden_act);
  check_activation(f.where, "projector_hidden_act", c.projector_hidden_act);
  if (j.contains("vision_feature_layer") && j["vision_feature_layer"].is_array()) {
    throw ConfigError(f.where + ": \"vision_feature_layer\" " + j["vision_feature_layer"].dump() +
                      " is not supported (one layer, an integer)");
  }
  c.vision_feature_layer = f.integer("vision_feature_layer", c.vision_feature_layer);
  c.vision_feature_select_strategy = f.text("vision_feature_select_strategy", c.vision_feature_select_strategy);
  if (c.vision_feature_select_strategy != "full" && c.vision_feature_select_strategy != "default") {
    throw ConfigError(f.where + ": \"vision_feature_select_strategy\" \"" + c.vision_feature_select_strategy +
                      "\" is not supported (\"full\" or \"default\")");
  }
  c.multimodal_projector_bias = f.flag("multimodal_projector_bias", c.multimodal_projector_bias);
  const std::int64_t states = c.vision.num_hidden_layers + 1;
  if (c.vision_feature_layer < -states || c.vision_feature_layer >= states) {
    throw ConfigError(f.where + ": \"vision_feature_layer\" " + std::to_string(c.vision_feature_layer) +
                      " is outside the vision tower's " + std::to_string(states) + " hidden states [" +
                      std::to_string(-states) + ", " + std::to_string(states - 1) + "]");
  }
  if (c.image_token_index < 0 || c.image_token_index >= c.text.vocab_size) {
    throw ConfigError(f.where + ": \"image_token_index\" " + std::to_string(c.image_token_index) +
                      " is outside the text model's vocabulary [0, " + std::to_string(c.text.vocab_size) + ")");
  }
  return c;
}

std::int64_t LlavaConfig::image_tokens(std::int64_t height, std::int64_t width) const {
  const std::int64_t patches = (height / vision.patch_size) * (width / vision.patch_size);
  return vision_feature_select_strategy == "default" ? patches - 1 : patches;
}

std::int64_t LlavaConfig::vision_layers_used() const {
  return vision_feature_layer >= 0 ? vision_feature_layer : vision.num_hidden_layers + 1 + vision_feature_layer;
}

InferenceConfig llava_config(const std::string& model_dir, RuntimeConfig runtime, const LlavaOptions& options) {
  const LlavaConfig c = LlavaConfig::from_hf_folder(model_dir);
  const std::int64_t h = options.image_height > 0 ? options.image_height : c.vision.image_size;
  const std::int64_t w = options.image_width > 0 ? options.image_width : c.vision.image_size;
  const std::int64_t ps = c.vision.patch_size;
  for (auto [name, v] : {std::pair{"image_height", h}, {"image_width", w}}) {
    if (v % ps != 0 || v > c.vision.image_size) {
      throw ConfigError(std::string("llava: ") + name + " " + std::to_string(v) + " must be a multiple of patch_size " +
                        std::to_string(ps) + " and at most the vision image_size " + std::to_string(c.vision.image_size) +
                        " of '" + model_dir + "'");
    }
  }
  if (c.image_tokens(h, w) < 1) {
    throw ConfigError("llava: an image of " + std::to_string(h) + " x " + std::to_string(w) +
                      " pixels leaves no features with vision_feature_select_strategy \"default\" (it drops the first patch)");
  }
  const int tp = runtime.tp_degree;
  for (auto [name, v] : {std::pair{"vision num_attention_heads", c.vision.num_attention_heads},
                         {"vision intermediate_size", c.vision.intermediate_size},
                         {"text hidden_size (the projector's linear_1 outputs)", c.text.hidden_size}}) {
    if (v % tp != 0) {
      throw ConfigError("llava: " + std::string(name) + " " + std::to_string(v) + " cannot be split over tp_degree " +
                        std::to_string(tp));
    }
  }
  InferenceConfig config = llama_inference_config(c.text, model_dir, std::move(runtime), options.text);
  vision_to_attributes(c, h, w, config);
  return config;
}

// ------------------------------------------------------------------------------ vision stage

namespace {

Var activate(Var x, const std::string& act) { return act == "silu" ? F::silu(x) : F::gelu(x, "none"); }

struct PixtralAttention : nn::Module {
  nn::ColumnParallelLinear& q_proj;
  nn::ColumnParallelLinear& k_proj;
  nn::ColumnParallelLinear& v_proj;
  nn::RowParallelLinear& o_proj;
  explicit PixtralAttention(std::int64_t hidden)
      : q_proj(register_module("q_proj", std::make_unique<nn::ColumnParallelLinear>(hidden, hidden, false, false))),
        k_proj(register_module("k_proj", std::make_unique<nn::ColumnParallelLinear>(hidden, hidden, false, false))),
        v_proj(register_module("v_proj", std::make_unique<nn::ColumnParallelLinear>(hidden, hidden, false, false))),
        o_proj(register_module("o_proj", std::make_unique<nn::RowParallelLinear>(hidden, hidden, false, true))) {}
  std::string type_name() const override { return "PixtralAttention"; }
};

struct PixtralMlp : nn::Module {
  nn::ColumnParallelLinear& gate_proj;
  nn::ColumnParallelLinear& up_proj;
  nn::RowParallelLinear& down_proj;
  std::string act;
  PixtralMlp(std::int64_t hidden, std::int64_t inter, std::string activation)
      : gate_proj(register_module("gate_proj", std::make_unique<nn::ColumnParallelLinear>(hidden, inter, false, false))),
        up_proj(register_module("up_proj", std::make_unique<nn::ColumnParallelLinear>(hidden, inter, false, false))),
        down_proj(register_module("down_proj", std::make_unique<nn::RowParallelLinear>(inter, hidden, false, true))),
        act(std::move(activation)) {}
  std::string type_name() const override { return "PixtralMLP"; }
  Var operator()(Var x) const { return down_proj(activate(gate_proj(x), act) * up_proj(x)); }
};

// HF's Pixtral norms are RMSNorm with eps 1e-5, whatever the config says.
constexpr double kPixtralEps = 1e-5;

struct PixtralLayer : nn::Module {
  nn::RMSNorm& attention_norm;
  PixtralAttention& attention;
  nn::RMSNorm& ffn_norm;
  PixtralMlp& feed_forward;
  explicit PixtralLayer(const PixtralVisionConfig& c)
      : attention_norm(register_module("attention_norm", std::make_unique<nn::RMSNorm>(std::vector<std::int64_t>{c.hidden_size}, kPixtralEps))),
        attention(register_module("attention", std::make_unique<PixtralAttention>(c.hidden_size))),
        ffn_norm(register_module("ffn_norm", std::make_unique<nn::RMSNorm>(std::vector<std::int64_t>{c.hidden_size}, kPixtralEps))),
        feed_forward(register_module("feed_forward", std::make_unique<PixtralMlp>(c.hidden_size, c.intermediate_size, c.hidden_act))) {}
  std::string type_name() const override { return "PixtralAttentionLayer"; }
};

struct PixtralTransformer : nn::Module {
  nn::ModuleList<PixtralLayer>& layers;
  PixtralTransformer(const PixtralVisionConfig& c, std::int64_t used)
      : layers(register_module("layers", std::make_unique<nn::ModuleList<PixtralLayer>>())) {
    for (std::int64_t i = 0; i < used; ++i) layers.push_back(std::make_unique<PixtralLayer>(c));
  }
  std::string type_name() const override { return "PixtralTransformer"; }
};

struct PixtralVisionModel : nn::Module {
  nn::Conv2d& patch_conv;
  nn::RMSNorm& ln_pre;
  PixtralTransformer& transformer;
  PixtralVisionModel(const PixtralVisionConfig& c, std::int64_t used)
      : patch_conv(register_module("patch_conv", std::make_unique<nn::Conv2d>(c.num_channels, c.hidden_size, nn::Size2(c.patch_size),
                                                                              nn::Conv2dOptions{.stride = nn::Size2(c.patch_size), .bias = false}))),
        ln_pre(register_module("ln_pre", std::make_unique<nn::RMSNorm>(std::vector<std::int64_t>{c.hidden_size}, kPixtralEps))),
        transformer(register_module("transformer", std::make_unique<PixtralTransformer>(c, used))) {}
  std::string type_name() const override { return "PixtralVisionModel"; }
};

struct LlavaProjector : nn::Module {
  nn::ColumnParallelLinear& linear_1;
  nn::RowParallelLinear& linear_2;
  std::string act;
  LlavaProjector(std::int64_t vision_hidden, std::int64_t text_hidden, bool bias, std::string activation)
      : linear_1(register_module("linear_1", std::make_unique<nn::ColumnParallelLinear>(vision_hidden, text_hidden, bias, false))),
        linear_2(register_module("linear_2", std::make_unique<nn::RowParallelLinear>(text_hidden, text_hidden, bias, true))),
        act(std::move(activation)) {}
  std::string type_name() const override { return "LlavaMultiModalProjector"; }
  Var operator()(Var x) const { return linear_2(activate(linear_1(x), act)); }
};

/// cos and sin [P, head_dim] of Pixtral's 2D rotary embedding for an h x w-patch image, in
/// float32 as HF computes them: freqs[k] = 1 / theta^(2k / D); rotate-half pair k (channels k
/// and k + D/2) of patch (i, j) turns by i * freqs[2k] for k < D/4 and by
/// j * freqs[2(k - D/4) + 1] otherwise (HF indexes its [grid x grid] table at i * grid + j, which
/// gives the same rows).
std::pair<Tensor, Tensor> pixtral_rope_tables(const PixtralVisionConfig& c, std::int64_t h, std::int64_t w) {
  const std::int64_t D = c.head_dim, P = h * w;
  std::vector<float> freqs(static_cast<std::size_t>(D / 2));
  for (std::int64_t k = 0; k < D / 2; ++k) {
    const float e = static_cast<float>(2 * k) / static_cast<float>(D);
    freqs[static_cast<std::size_t>(k)] = 1.0f / std::pow(static_cast<float>(c.rope_theta), e);
  }
  std::vector<float> cos_v(static_cast<std::size_t>(P * D)), sin_v(cos_v.size());
  for (std::int64_t i = 0; i < h; ++i) {
    for (std::int64_t j = 0; j < w; ++j) {
      const std::int64_t p = i * w + j;
      for (std::int64_t k = 0; k < D / 2; ++k) {
        const float angle = k < D / 4 ? static_cast<float>(i) * freqs[static_cast<std::size_t>(2 * k)]
                                      : static_cast<float>(j) * freqs[static_cast<std::size_t>(2 * (k - D / 4) + 1)];
        for (std::int64_t half : {k, k + D / 2}) {
          cos_v[static_cast<std::size_t>(p * D + half)] = std::cos(angle);
          sin_v[static_cast<std::size_t>(p * D + half)] = std::sin(angle);
        }
      }
    }
  }
  return {Tensor::from_vector(cos_v, {P, D}), Tensor::from_vector(sin_v, {P, D})};
}

/// x * cos + rotate_half(x) * sin for x [B, H, P, D], cos/sin [P, D].
Var apply_rotary(Var x, Var cos, Var sin) {
  const std::int64_t D = x.dim(3);
  Var rotated = F::concat({-F::slice(x, 3, D / 2, D), F::slice(x, 3, 0, D / 2)}, 3);
  return x * cos + rotated * sin;
}

/// The vision_encoder stage: pixel_values [B, C, H, W] -> image features [B, P, text hidden].
struct VisionEncoder : nn::Module {
  LlavaConfig cfg;
  std::int64_t height, width, used;
  int tp;
  PixtralVisionModel* vision_tower = nullptr;
  LlavaProjector* projector = nullptr;

  /// `all_layers`: every layer of the checkpoint, also those past vision_feature_layer (to
  /// declare a whole checkpoint's names; the stage itself builds the layers it uses).
  explicit VisionEncoder(const InferenceConfig& config, bool all_layers = false)
      : cfg(llava_from_attributes(config)),
        height(config.get_int("image_height")),
        width(config.get_int("image_width")),
        used(all_layers ? cfg.vision.num_hidden_layers : cfg.vision_layers_used()),
        tp(config.runtime_config().tp_degree) {
    vision_tower = &register_module("vision_tower", std::make_unique<PixtralVisionModel>(cfg.vision, used));
    projector = &register_module("multi_modal_projector",
                                 std::make_unique<LlavaProjector>(cfg.vision.hidden_size, cfg.text.hidden_size,
                                                                  cfg.multimodal_projector_bias, cfg.projector_hidden_act));
    auto [cos, sin] = pixtral_rope_tables(cfg.vision, height / cfg.vision.patch_size, width / cfg.vision.patch_size);
    register_buffer("rope_cos", cos);
    register_buffer("rope_sin", sin);
  }
  std::string type_name() const override { return "LlavaVisionEncoder"; }

  Var forward(Var pixel_values) {
    const PixtralVisionConfig& v = cfg.vision;
    const std::int64_t B = pixel_values.dim(0);
    const std::int64_t P = (height / v.patch_size) * (width / v.patch_size);
    const std::int64_t heads = v.num_attention_heads / tp, hd = v.head_dim;
    Var cos = buffer("rope_cos"), sin = buffer("rope_sin");
    // Row-major patches, as HF's flatten(1).T: [B, hidden, h, w] -> [B, P, hidden].
    Var x = F::transpose(F::reshape(vision_tower->patch_conv(pixel_values), {B, v.hidden_size, P}), 1, 2);
    x = vision_tower->ln_pre(x);
    for (std::size_t i = 0; i < vision_tower->transformer.layers.size(); ++i) {
      PixtralLayer& layer = vision_tower->transformer.layers[i];
      PixtralAttention& at = layer.attention;
      Var h = layer.attention_norm(x);
      auto heads_of = [&](Var y) { return F::transpose(F::reshape(y, {B, P, heads, hd}), 1, 2); };
      Var q = apply_rotary(heads_of(at.q_proj(h)), cos, sin);
      Var k = apply_rotary(heads_of(at.k_proj(h)), cos, sin);
      // One image per row of the batch: a patch attends to every patch of its own image (HF's
      // block-diagonal mask over its concatenated images is this, per image).
      Var a = F::scaled_dot_product_attention(q, k, heads_of(at.v_proj(h)));
      x = x + at.o_proj(F::reshape(F::transpose(a, 1, 2), {B, P, heads * hd}));
      x = x + layer.feed_forward(layer.ffn_norm(x));
    }
    if (cfg.vision_feature_select_strategy == "default") x = F::slice(x, 1, 1, P);
    return (*projector)(x);
  }
};

// Checkpoint keys of either layout to each stage's module names ("" drops the key).
bool starts_with(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

std::string vision_key(const std::string& key, std::int64_t used) {
  std::string k = key;
  if (starts_with(k, "model.vision_tower.") || starts_with(k, "model.multi_modal_projector.")) k = k.substr(6);
  if (!starts_with(k, "vision_tower.") && !starts_with(k, "multi_modal_projector.")) {
    // The text model's tensors belong to the other stages; anything else stays, so that the
    // strict compile names a key nobody uses.
    const bool text = starts_with(k, "language_model.") || starts_with(k, "model.language_model.") || k == "lm_head.weight";
    return text ? "" : k;
  }
  const std::string layers = "vision_tower.transformer.layers.";
  if (starts_with(k, layers)) {
    const std::size_t dot = k.find('.', layers.size());
    const std::string index = k.substr(layers.size(), dot - layers.size());
    if (!index.empty() && std::all_of(index.begin(), index.end(), [](char ch) { return ch >= '0' && ch <= '9'; }) &&
        std::stoll(index) >= used) {
      return "";  // past vision_feature_layer: not compiled
    }
  }
  return k;
}

std::string text_key(const std::string& key) {
  if (starts_with(key, "language_model.")) return key.substr(15);                  // Hub: language_model.model.*, .lm_head
  if (starts_with(key, "model.language_model.")) return "model." + key.substr(21);  // transformers >= 4.52
  if (starts_with(key, "vision_tower.") || starts_with(key, "multi_modal_projector.") ||
      starts_with(key, "model.vision_tower.") || starts_with(key, "model.multi_modal_projector.")) {
    return "";
  }
  return key;  // lm_head.weight (>= 4.52), or a key the strict compile will name
}

class VisionWrapper : public ModelWrapper {
 public:
  explicit VisionWrapper(const InferenceConfig& c)
      : ModelWrapper(c, model_cls<VisionEncoder>(), options(c)),
        channels_(c.get_int("vision_num_channels")),
        height_(c.get_int("image_height")),
        width_(c.get_int("image_width")) {}
  std::vector<std::vector<Tensor>> input_generator() const override {
    return {{Tensor::zeros({1, channels_, height_, width_})}};
  }
  std::vector<std::string> input_names() const override { return {"pixel_values"}; }

 private:
  static WrapperOptions options(const InferenceConfig& c) {
    const std::int64_t used = llava_from_attributes(c).vision_layers_used();
    WrapperOptions o;
    o.pipeline_execution = true;
    o.return_ranked_to_cpu = false;
    o.tag = "vision_encoder";
    o.checkpoint_key_map = [used](const std::string& key) { return vision_key(key, used); };
    return o;
  }
  std::int64_t channels_, height_, width_;
};

/// context_encoding: the Llama prefill on the token embeddings with image features in place of
/// the image tokens. image_pos1 [B, T]: k + 1 at the k-th image token of the row, 0 elsewhere.
struct LlavaContextEncoding : LlamaModel {
  explicit LlavaContextEncoding(const InferenceConfig& c) : LlamaModel(c, false) {}
  std::vector<Var> forward(Var ids, Var positions1, Var last_index, Var sampling, Var u, Var image_features,
                           Var image_pos1) {
    Var tokens = embed(ids);  // [B, T, D]
    const std::int64_t B = tokens.dim(0), T = tokens.dim(1), D = tokens.dim(2), P = image_features.dim(1);
    // Row b * P + k of the features [B * P, D] for the k-th image token of row b (text tokens
    // read their row's feature 0, then keep their embedding): whole rows are copied.
    Var k = F::where(image_pos1, image_pos1 - 1.0, F::full({1, 1}, 0, DType::Int64));
    Var rows = F::reshape(k + F::reshape(F::arange(B) * static_cast<double>(P), {B, 1}), {B * T});
    Var image = F::reshape(F::index_select(F::reshape(image_features, {B * P, D}), 0, rows), {B, T, D});
    return encode_embeds(F::where(F::reshape(image_pos1, {B, T, 1}), image, tokens), positions1, last_index, sampling, u);
  }
};

class LlavaContextWrapper : public ModelWrapper {
 public:
  LlavaContextWrapper(const InferenceConfig& c, std::int64_t image_tokens)
      : ModelWrapper(c, model_cls<LlavaContextEncoding>(), options()),
        logits_(c.get_bool("output_logits")),
        image_tokens_(image_tokens),
        hidden_(c.get_int("hidden_size")) {}
  std::vector<std::vector<Tensor>> input_generator() const override {
    return {{Tensor::zeros({1, 1}, DType::Int64), Tensor::zeros({1, 1}, DType::Int64), Tensor::zeros({1}, DType::Int64),
             Tensor::zeros({1, 3}), Tensor::zeros({1}), Tensor::zeros({1, image_tokens_, hidden_}),
             Tensor::zeros({1, 1}, DType::Int64)}};
  }
  std::vector<std::string> input_names() const override {
    return {"input_ids", "positions1", "last_index", "sampling", "u", "image_features", "image_pos1"};
  }
  std::vector<std::vector<std::string>> input_dims() const override {
    return {{"batch", "seq"}, {"batch", "seq"}, {"batch"}, {"batch", ""}, {"batch"}, {"batch", "", ""}, {"batch", "seq"}};
  }
  std::vector<std::vector<std::string>> output_dims() const override {
    if (logits_) return {{"batch"}, {"batch", "seq", ""}};
    return {{"batch"}};
  }
  std::vector<bool> keep_input_dtype() const override { return {false, false, false, true, true, false, false}; }

 private:
  static WrapperOptions options() {
    WrapperOptions o;
    o.tag = "context_encoding";
    o.checkpoint_key_map = text_key;
    return o;
  }
  bool logits_;
  std::int64_t image_tokens_, hidden_;
};

}  // namespace

std::vector<std::pair<std::string, Tensor>> llava_random_state_dict(const InferenceConfig& config, std::uint64_t seed) {
  const VisionEncoder vision(config, /*all_layers=*/true);
  const LlamaModel text(config, false);
  std::vector<std::pair<std::string, Tensor>> out = nn::random_state_dict(vision, seed);
  for (auto& [key, value] : nn::random_state_dict(text, seed + 1)) out.emplace_back("language_model." + key, std::move(value));
  return out;
}

// ------------------------------------------------------------------------ application

LlavaForConditionalGeneration::LlavaForConditionalGeneration(const std::string& model_dir, const InferenceConfig& config)
    : ApplicationBase(model_dir, config),
      cfg_(llava_from_attributes(config)),
      text_opts_(llama_options_of(config)),
      rows_(config.runtime_config().batch_size),
      image_height_(config.get_int("image_height")),
      image_width_(config.get_int("image_width")),
      image_tokens_(cfg_.image_tokens(image_height_, image_width_)) {
  models.push_back(std::make_shared<VisionWrapper>(config));
  models.push_back(std::make_shared<LlavaContextWrapper>(config, image_tokens_));
  models.push_back(make_token_generation(config, text_key));
}

void LlavaForConditionalGeneration::check_request(const std::vector<std::vector<std::int64_t>>& prompts,
                                                  const Tensor& pixel_values, const GenerationConfig& gen) const {
  check_generation_request(cfg_.text, text_opts_, rows_, prompts, gen);
  const auto n = static_cast<std::int64_t>(prompts.size());
  const Shape want{n, cfg_.vision.num_channels, image_height_, image_width_};
  if (pixel_values.dtype() != DType::Float32 || pixel_values.shape() != want) {
    throw InvalidArgument("generate: pixel_values is " + std::string(dtype_name(pixel_values.dtype())) + " " +
                          pixel_values.shape().to_string() + ", expected float32 " + want.to_string() +
                          " (one image per prompt, at the compiled image size)");
  }
  for (std::int64_t s = 0; s < n; ++s) {
    const auto& p = prompts[static_cast<std::size_t>(s)];
    const auto count = std::count(p.begin(), p.end(), cfg_.image_token_index);
    if (count != image_tokens_) {
      throw InvalidArgument("generate: sequence " + std::to_string(s) + ": the prompt holds " + std::to_string(count) +
                            " image tokens (id " + std::to_string(cfg_.image_token_index) + "), but its image gives " +
                            std::to_string(image_tokens_) + " features (" + std::to_string(image_height_) + " x " +
                            std::to_string(image_width_) + " pixels, patch " + std::to_string(cfg_.vision.patch_size) + ")");
    }
  }
}

GenerationResult LlavaForConditionalGeneration::generate(const std::vector<std::vector<std::int64_t>>& prompts,
                                                         const Tensor& pixel_values, const GenerationConfig& gen,
                                                         const TokenCallback& on_token) {
  check_request(prompts, pixel_values, gen);
  const auto n = static_cast<std::int64_t>(prompts.size());
  // The features stay on the ranks' devices: the prefill takes them as ranked tensors.
  const Output features = vision_encoder().forward({pixel_values});
  return run_generation(
      cfg_.text, text_opts_, prompts, gen, on_token,
      [&](const Tensor& ids, const Tensor& pos1, const Tensor& last_index, const Tensor& sampling, const Tensor& u) {
        Tensor image_pos1 = Tensor::zeros(ids.shape(), DType::Int64);
        const std::int64_t tmax = ids.dim(1);
        for (std::int64_t s = 0; s < n; ++s) {
          std::int64_t k = 0;
          const auto& p = prompts[static_cast<std::size_t>(s)];
          for (std::size_t t = 0; t < p.size(); ++t) {
            if (p[t] == cfg_.image_token_index) image_pos1.data<std::int64_t>()[s * tmax + static_cast<std::int64_t>(t)] = ++k;
          }
        }
        return context_encoding().forward({ids, pos1, last_index, sampling, u, features, image_pos1});
      },
      token_generation());
}

}  // namespace devpipe::models
