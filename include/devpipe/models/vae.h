// devpipe — the VAE decoder of a latent diffusion pipeline: diffusers' AutoencoderKL.decode (its
// post_quant_conv, then its Decoder), as one stage:
//
//   vae_decoder   latents [B, latent_channels, S, S] -> images [B, out_channels, S', S'] float32 in
//                 [0, 1], S' = S * 2^(len(block_out_channels) - 1). In one graph, as diffusers'
//                 DiTPipeline does after its loop: 1 / scaling_factor * latents, post_quant_conv,
//                 the decoder (conv_in, the mid block — a resnet, a one-head attention over the
//                 S x S pixels, a resnet —, the up blocks over the reversed channel list, each
//                 layers_per_block + 1 resnets and, but in the last, a nearest x2 upsampling and a
//                 conv; GroupNorm, SiLU, conv_out), then / 2 + 0.5 and clamp(0, 1).
//
// Its checkpoint is a diffusers vae/ folder (config.json, diffusion_pytorch_model.safetensors with
// diffusers' names): only decoder.* and post_quant_conv.* are compiled; the encoder.* and
// quant_conv.* tensors of a full AutoencoderKL checkpoint are dropped, and the mid-block attention's
// pre-0.14 names (query, key, value, proj_attn) are read as to_q, to_k, to_v, to_out.0.
//
// Tensor parallel: the stage is replicated (every rank runs the whole decoder on its copy of the
// latents; its convolutions are not split), so it takes the previous stage's ranked latents in
// place on each rank and returns the images of rank 0 to the host.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "devpipe/config.h"
#include "devpipe/model_wrapper.h"

namespace devpipe::models {

/// The fields of a diffusers AutoencoderKL config.json the decoder uses.
struct AutoencoderKLConfig {
  std::int64_t in_channels = 3;
  std::int64_t out_channels = 3;
  std::int64_t latent_channels = 4;
  std::vector<std::int64_t> block_out_channels{64};
  std::int64_t layers_per_block = 1;
  std::int64_t norm_num_groups = 32;
  double scaling_factor = 0.18215;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;

  /// Reads <dir>/config.json; ConfigError naming the file and the key that is missing, mistyped,
  /// out of range or not implemented: a _class_name other than "AutoencoderKL", an act_fn other
  /// than "silu" (or its alias "swish"), up_block_types other than one "UpDecoderBlock2D" per
  /// block_out_channels entry, a norm_num_groups that does not divide every channel count.
  /// (force_upcast, shift_factor, latents_mean/std and the encoder's keys do not change the decode
  /// diffusers' DiTPipeline runs and are not read.)
  static AutoencoderKLConfig from_hf_folder(const std::string& dir);
  /// The images' side over the latents' side: 2^(len(block_out_channels) - 1).
  std::int64_t upscale() const { return std::int64_t{1} << (block_out_channels.size() - 1); }
};

/// Records `vae` in `config` (attributes "vae_*"; "vae" true) for vae_decoder_wrapper().
void set_vae_attributes(InferenceConfig& config, const AutoencoderKLConfig& vae);
/// The AutoencoderKLConfig set_vae_attributes() recorded in `config`.
AutoencoderKLConfig vae_from_attributes(const InferenceConfig& config);

/// The vae_decoder stage (tag "vae_decoder") for `config` (with set_vae_attributes; batch
/// buckets, dtype and tp_degree from its runtime config; latents of sample_size x sample_size),
/// compiled from the checkpoint at `vae_dir` (ApplicationBase::compile gives it that path).
std::shared_ptr<ModelWrapper> vae_decoder_wrapper(const InferenceConfig& config, const std::string& vae_dir);

}  // namespace devpipe::models
