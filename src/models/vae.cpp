#include "devpipe/models/vae.h"

#include <filesystem>
#include <optional>

#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "models/hf_config.h"

namespace devpipe::models {

namespace fs = std::filesystem;

// ------------------------------------------------------------------------------ config

AutoencoderKLConfig AutoencoderKLConfig::from_hf_folder(const std::string& dir) {
  const std::string where = "'" + (fs::path(dir) / "config.json").string() + "'";
  const nlohmann::json j = read_hf_config_json(dir);
  const HfFields f{j, where};
  const std::string klass = f.text("_class_name", "AutoencoderKL");
  if (klass != "AutoencoderKL") {
    throw ConfigError(where + ": \"_class_name\" \"" + klass + "\" is not supported (\"AutoencoderKL\" only)");
  }
  AutoencoderKLConfig c;
  c.in_channels = f.integer("in_channels", c.in_channels);
  c.out_channels = f.integer("out_channels", c.out_channels);
  c.latent_channels = f.integer("latent_channels", c.latent_channels);
  c.block_out_channels = f.integers("block_out_channels", c.block_out_channels);
  c.layers_per_block = f.integer("layers_per_block", c.layers_per_block);
  c.norm_num_groups = f.integer("norm_num_groups", c.norm_num_groups);
  c.scaling_factor = f.number("scaling_factor", c.scaling_factor);
  c.use_post_quant_conv = f.flag("use_post_quant_conv", c.use_post_quant_conv);
  c.mid_block_add_attention = f.flag("mid_block_add_attention", c.mid_block_add_attention);
  const std::string act = f.text("act_fn", "silu");
  if (act != "silu" && act != "swish") {
    throw ConfigError(where + ": \"act_fn\" \"" + act + "\" is not supported (\"silu\" only)");
  }
  require_positive(where, {{"in_channels", c.in_channels}, {"out_channels", c.out_channels},
                        {"latent_channels", c.latent_channels}, {"norm_num_groups", c.norm_num_groups}});
  if (c.layers_per_block < 0) {
    throw ConfigError(where + ": \"layers_per_block\" must be >= 0, got " + std::to_string(c.layers_per_block));
  }
  if (c.block_out_channels.size() > 16) {
    throw ConfigError(where + ": \"block_out_channels\" has " + std::to_string(c.block_out_channels.size()) +
                      " entries (at most 16)");
  }
  for (std::int64_t ch : c.block_out_channels) {
    if (ch < 1 || ch % c.norm_num_groups != 0) {
      throw ConfigError(where + ": \"block_out_channels\" " + j["block_out_channels"].dump() + ": " + std::to_string(ch) +
                        " is not a positive multiple of norm_num_groups " + std::to_string(c.norm_num_groups));
    }
  }
  const std::vector<std::string> ups = f.texts("up_block_types", {"UpDecoderBlock2D"});
  if (ups.size() != c.block_out_channels.size()) {
    throw ConfigError(where + ": \"up_block_types\" has " + std::to_string(ups.size()) + " entries, block_out_channels " +
                      std::to_string(c.block_out_channels.size()));
  }
  for (const std::string& t : ups) {
    if (t != "UpDecoderBlock2D") {
      throw ConfigError(where + ": \"up_block_types\" \"" + t + "\" is not supported (\"UpDecoderBlock2D\" only)");
    }
  }
  if (!(c.scaling_factor > 0)) {
    throw ConfigError(where + ": \"scaling_factor\" must be > 0, got " + std::to_string(c.scaling_factor));
  }
  return c;
}

void set_vae_attributes(InferenceConfig& config, const AutoencoderKLConfig& vae) {
  config.set("vae", true);
  config.set("vae_out_channels", vae.out_channels);
  config.set("vae_latent_channels", vae.latent_channels);
  config.set("vae_block_out_channels", vae.block_out_channels);
  config.set("vae_layers_per_block", vae.layers_per_block);
  config.set("vae_norm_num_groups", vae.norm_num_groups);
  config.set("vae_scaling_factor", vae.scaling_factor);
  config.set("vae_use_post_quant_conv", vae.use_post_quant_conv);
  config.set("vae_mid_block_add_attention", vae.mid_block_add_attention);
}

AutoencoderKLConfig vae_from_attributes(const InferenceConfig& config) {
  AutoencoderKLConfig c;
  c.out_channels = config.get_int("vae_out_channels");
  c.latent_channels = config.get_int("vae_latent_channels");
  c.block_out_channels = config.get_ints("vae_block_out_channels");
  c.layers_per_block = config.get_int("vae_layers_per_block");
  c.norm_num_groups = config.get_int("vae_norm_num_groups");
  c.scaling_factor = config.get_float("vae_scaling_factor");
  c.use_post_quant_conv = config.get_bool("vae_use_post_quant_conv");
  c.mid_block_add_attention = config.get_bool("vae_mid_block_add_attention");
  return c;
}

namespace {

// ------------------------------------------------------------------------------ layers

constexpr double kEps = 1e-6;  // every GroupNorm of diffusers' Decoder (resnet_eps, conv_norm_out, attention)

nn::Conv2dOptions same_padding() { return nn::Conv2dOptions{.padding = nn::Size2(1)}; }

/// torch.nn.GroupNorm(groups, channels, eps, affine) on [B, C, ...]: each row of
/// [B, groups, C / groups * ...] normalised (layer_norm without weights), then times weight[c]
/// plus bias[c].
struct GroupNorm : nn::Module {
  std::int64_t groups, channels;
  GroupNorm(std::int64_t g, std::int64_t c) : groups(g), channels(c) {
    register_parameter("weight", Shape{c});
    register_parameter("bias", Shape{c});
  }
  std::string type_name() const override { return "GroupNorm"; }
  Var operator()(Var x) const {
    Scope s(*this);
    const std::vector<std::int64_t> dims(x.shape().dims().begin(), x.shape().dims().end());
    Var y = F::reshape(x, {dims[0], groups, -1});
    y = F::reshape(F::layer_norm(y, {y.dim(2)}, std::nullopt, std::nullopt, kEps), dims);
    std::vector<std::int64_t> per_channel(dims.size(), 1);
    per_channel[1] = channels;
    return y * F::reshape(param("weight"), per_channel) + F::reshape(param("bias"), per_channel);
  }
};

/// resnet.ResnetBlock2D without a time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x)))))),
/// x through the 1x1 conv_shortcut when the channels change (output_scale_factor 1, dropout 0).
struct ResnetBlock2D : nn::Module {
  GroupNorm& norm1;
  nn::Conv2d& conv1;
  GroupNorm& norm2;
  nn::Conv2d& conv2;
  nn::Conv2d* conv_shortcut = nullptr;
  ResnetBlock2D(std::int64_t in, std::int64_t out, std::int64_t groups)
      : norm1(register_module("norm1", std::make_unique<GroupNorm>(groups, in))),
        conv1(register_module("conv1", std::make_unique<nn::Conv2d>(in, out, nn::Size2(3), same_padding()))),
        norm2(register_module("norm2", std::make_unique<GroupNorm>(groups, out))),
        conv2(register_module("conv2", std::make_unique<nn::Conv2d>(out, out, nn::Size2(3), same_padding()))) {
    if (in != out) conv_shortcut = &register_module("conv_shortcut", std::make_unique<nn::Conv2d>(in, out, nn::Size2(1)));
  }
  std::string type_name() const override { return "ResnetBlock2D"; }
  Var operator()(Var x) const {
    Var h = conv2(F::silu(norm2(conv1(F::silu(norm1(x))))));
    return (conv_shortcut ? (*conv_shortcut)(x) : x) + h;
  }
};

/// attention_processor.Attention as UNetMidBlock2D builds it: one head of all C channels over the
/// H * W pixels as tokens, group_norm first, biases everywhere, the input added back (rescale 1).
struct VaeAttention : nn::Module {
  GroupNorm& group_norm;
  nn::Linear& to_q;
  nn::Linear& to_k;
  nn::Linear& to_v;
  nn::Module& to_out;
  nn::Linear& out0;
  VaeAttention(std::int64_t c, std::int64_t groups)
      : group_norm(register_module("group_norm", std::make_unique<GroupNorm>(groups, c))),
        to_q(register_module("to_q", std::make_unique<nn::Linear>(c, c))),
        to_k(register_module("to_k", std::make_unique<nn::Linear>(c, c))),
        to_v(register_module("to_v", std::make_unique<nn::Linear>(c, c))),
        to_out(register_module("to_out", std::make_unique<nn::Module>())),
        out0(to_out.register_module("0", std::make_unique<nn::Linear>(c, c))) {}
  std::string type_name() const override { return "Attention"; }
  Var operator()(Var x) const {
    const std::int64_t B = x.dim(0), C = x.dim(1), H = x.dim(2), W = x.dim(3);
    Var t = F::transpose(F::reshape(group_norm(x), {B, C, H * W}), 1, 2);  // [B, HW, C]
    auto head = [&](Var y) { return F::reshape(y, {B, 1, H * W, C}); };
    Var a = F::scaled_dot_product_attention(head(to_q(t)), head(to_k(t)), head(to_v(t)));
    a = out0(F::reshape(a, {B, H * W, C}));
    return F::reshape(F::transpose(a, 1, 2), {B, C, H, W}) + x;
  }
};

/// unet_2d_blocks.UNetMidBlock2D (one layer): resnets.0, attentions.0 (unless
/// mid_block_add_attention is false), resnets.1.
struct MidBlock : nn::Module {
  nn::ModuleList<VaeAttention>& attentions;
  nn::ModuleList<ResnetBlock2D>& resnets;
  MidBlock(std::int64_t c, std::int64_t groups, bool attention)
      : attentions(register_module("attentions", std::make_unique<nn::ModuleList<VaeAttention>>())),
        resnets(register_module("resnets", std::make_unique<nn::ModuleList<ResnetBlock2D>>())) {
    if (attention) attentions.push_back(std::make_unique<VaeAttention>(c, groups));
    for (int i = 0; i < 2; ++i) resnets.push_back(std::make_unique<ResnetBlock2D>(c, c, groups));
  }
  std::string type_name() const override { return "UNetMidBlock2D"; }
  Var operator()(Var x) {
    x = resnets[0](x);
    if (attentions.size() > 0) x = attentions[0](x);
    return resnets[1](x);
  }
};

/// F.interpolate(x, scale_factor=2, mode="nearest") for x [B, C, H, W]: out[2i + a, 2j + b] =
/// x[i, j], as x viewed [B, C, H, 1, W, 1], concatenated with itself on dims 3 and 5.
Var upsample_nearest2x(Var x) {
  const std::int64_t B = x.dim(0), C = x.dim(1), H = x.dim(2), W = x.dim(3);
  Var y = F::reshape(x, {B, C, H, 1, W, 1});
  y = F::concat({y, y}, 3);
  y = F::concat({y, y}, 5);
  return F::reshape(y, {B, C, 2 * H, 2 * W});
}

/// upsampling.Upsample2D(use_conv=True): nearest x2, then a 3x3 conv.
struct Upsample2D : nn::Module {
  nn::Conv2d& conv;
  explicit Upsample2D(std::int64_t c)
      : conv(register_module("conv", std::make_unique<nn::Conv2d>(c, c, nn::Size2(3), same_padding()))) {}
  std::string type_name() const override { return "Upsample2D"; }
  Var operator()(Var x) const { return conv(upsample_nearest2x(x)); }
};

/// unet_2d_blocks.UpDecoderBlock2D: `layers` resnets (in -> out, then out -> out), then an
/// Upsample2D unless it is the decoder's last block.
struct UpDecoderBlock2D : nn::Module {
  nn::ModuleList<ResnetBlock2D>& resnets;
  nn::ModuleList<Upsample2D>* upsamplers = nullptr;
  UpDecoderBlock2D(std::int64_t in, std::int64_t out, std::int64_t layers, std::int64_t groups, bool upsample)
      : resnets(register_module("resnets", std::make_unique<nn::ModuleList<ResnetBlock2D>>())) {
    for (std::int64_t i = 0; i < layers; ++i) resnets.push_back(std::make_unique<ResnetBlock2D>(i == 0 ? in : out, out, groups));
    if (upsample) {
      upsamplers = &register_module("upsamplers", std::make_unique<nn::ModuleList<Upsample2D>>());
      upsamplers->push_back(std::make_unique<Upsample2D>(out));
    }
  }
  std::string type_name() const override { return "UpDecoderBlock2D"; }
  Var operator()(Var x) {
    for (ResnetBlock2D* r : resnets) x = (*r)(x);
    if (upsamplers) x = (*upsamplers)[0](x);
    return x;
  }
};

/// vae.Decoder: conv_in, mid_block, the up blocks over the reversed block_out_channels (block i
/// takes the previous block's channels, layers_per_block + 1 resnets), conv_norm_out, SiLU,
/// conv_out.
struct Decoder : nn::Module {
  nn::Conv2d& conv_in;
  nn::ModuleList<UpDecoderBlock2D>& up_blocks;
  MidBlock& mid_block;
  GroupNorm& conv_norm_out;
  nn::Conv2d& conv_out;
  explicit Decoder(const AutoencoderKLConfig& c)
      : conv_in(register_module("conv_in", std::make_unique<nn::Conv2d>(c.latent_channels, c.block_out_channels.back(),
                                                                        nn::Size2(3), same_padding()))),
        up_blocks(register_module("up_blocks", std::make_unique<nn::ModuleList<UpDecoderBlock2D>>())),
        mid_block(register_module("mid_block", std::make_unique<MidBlock>(c.block_out_channels.back(), c.norm_num_groups,
                                                                          c.mid_block_add_attention))),
        conv_norm_out(register_module("conv_norm_out", std::make_unique<GroupNorm>(c.norm_num_groups, c.block_out_channels[0]))),
        conv_out(register_module("conv_out", std::make_unique<nn::Conv2d>(c.block_out_channels[0], c.out_channels,
                                                                          nn::Size2(3), same_padding()))) {
    const std::vector<std::int64_t> rev(c.block_out_channels.rbegin(), c.block_out_channels.rend());
    std::int64_t out = rev[0];
    for (std::size_t i = 0; i < rev.size(); ++i) {
      const std::int64_t prev = out;
      out = rev[i];
      up_blocks.push_back(std::make_unique<UpDecoderBlock2D>(prev, out, c.layers_per_block + 1, c.norm_num_groups,
                                                             i + 1 < rev.size()));
    }
  }
  std::string type_name() const override { return "Decoder"; }
  Var operator()(Var z) {
    Var x = mid_block(conv_in(z));
    for (UpDecoderBlock2D* b : up_blocks) x = (*b)(x);
    return conv_out(F::silu(conv_norm_out(x)));
  }
};

/// The vae_decoder stage (see vae.h); its children are AutoencoderKL's decoder and
/// post_quant_conv, so the checkpoint's names are the model's.
struct VaeDecoderStage : nn::Module {
  AutoencoderKLConfig cfg;
  Decoder& decoder;
  nn::Conv2d* post_quant_conv = nullptr;
  explicit VaeDecoderStage(const InferenceConfig& config)
      : cfg(vae_from_attributes(config)), decoder(register_module("decoder", std::make_unique<Decoder>(cfg))) {
    if (cfg.use_post_quant_conv) {
      post_quant_conv = &register_module(
          "post_quant_conv", std::make_unique<nn::Conv2d>(cfg.latent_channels, cfg.latent_channels, nn::Size2(1)));
    }
  }
  std::string type_name() const override { return "AutoencoderKL"; }

  Var forward(Var latents) {
    Var z = latents * (1.0 / cfg.scaling_factor);
    if (post_quant_conv) z = (*post_quant_conv)(z);
    Var x = decoder(z) * 0.5 + 0.5;
    // clamp(x, 0, 1); exact for |x| < 2^24 (x - 1 is then exact, and x - (x - 1) is 1).
    return F::relu(x) - F::relu(x - 1.0);
  }
};

/// Checkpoint key -> the stage's key: the encoder's and quant_conv's tensors are dropped, the
/// deprecated attention names renamed (diffusers' _convert_deprecated_attention_blocks).
std::string vae_key(const std::string& key) {
  if (key.rfind("encoder.", 0) == 0 || key.rfind("quant_conv.", 0) == 0) return "";
  static const std::string kAttn = "decoder.mid_block.attentions.";
  if (key.rfind(kAttn, 0) != 0) return key;
  const std::size_t dot = key.find('.', kAttn.size());  // after the attention's index
  if (dot == std::string::npos) return key;
  const std::string head = key.substr(0, dot + 1), rest = key.substr(dot + 1);
  for (auto [old_name, new_name] : {std::pair{"query.", "to_q."}, {"key.", "to_k."}, {"value.", "to_v."}, {"proj_attn.", "to_out.0."}}) {
    const std::string o = old_name;
    if (rest.rfind(o, 0) == 0) return head + new_name + rest.substr(o.size());
  }
  return key;
}

class VaeDecoderWrapper : public ModelWrapper {
 public:
  VaeDecoderWrapper(const InferenceConfig& c, const std::string& vae_dir)
      : ModelWrapper(c, model_cls<VaeDecoderStage>(), options(vae_dir)),
        channels_(c.get_int("vae_latent_channels")),
        size_(c.get_int("sample_size")) {}
  std::vector<std::vector<Tensor>> input_generator() const override { return {{Tensor::zeros({1, channels_, size_, size_})}}; }
  std::vector<std::string> input_names() const override { return {"latents"}; }

 private:
  static WrapperOptions options(const std::string& vae_dir) {
    WrapperOptions o;
    o.pipeline_execution = true;
    o.return_ranked_to_cpu = true;
    o.tag = "vae_decoder";
    o.checkpoint_key_map = vae_key;
    o.checkpoint_path = vae_dir;
    return o;
  }
  std::int64_t channels_, size_;
};

}  // namespace

std::shared_ptr<ModelWrapper> vae_decoder_wrapper(const InferenceConfig& config, const std::string& vae_dir) {
  return std::make_shared<VaeDecoderWrapper>(config, vae_dir);
}

}  // namespace devpipe::models
