"""Plain-PyTorch twin of diffusers' DiTPipeline: DiTTransformer2DModel (adaLN-Zero DiT) + DDIMScheduler
(eta 0) with classifier-free guidance (tests/reference; Debian has no diffusers). Same computation as
diffusers' source (each formula below names the diffusers function it comes from), the same folder layout
and state-dict names; no diffusers code.

Folder (the Hub's DiTPipeline layout, e.g. facebook/DiT-XL-2-256; vae/ only with write-model --vae):
  DIR/model_index.json   {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                          "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"]}
  DIR/transformer/config.json  {"_class_name": "DiTTransformer2DModel", "num_attention_heads" H,
      "attention_head_dim" hd, "in_channels" C, "out_channels" OC (2C with learned sigma, else C),
      "num_layers" L, "dropout" 0.0, "norm_num_groups" 32 (unused), "attention_bias" true, "sample_size" S,
      "patch_size" p, "activation_fn" "gelu-approximate", "num_embeds_ada_norm" K (the number of classes),
      "upcast_attention" false, "norm_type" "ada_norm_zero", "norm_elementwise_affine" false, "norm_eps"}
      (reading also accepts "_class_name" "Transformer2DModel", the Hub's DiT-XL-2 name, with norm_type
      "ada_norm_zero"; a missing norm_eps means diffusers' default 1e-5, a missing out_channels means C)
  DIR/transformer/diffusion_pytorch_model.safetensors (float32), D = H * hd, G = S / p, F = 4 * D:
      pos_embed.proj.weight                                        [D, C, p, p]  Conv2d stride p
      pos_embed.proj.bias                                          [D]
      transformer_blocks.N.norm1.emb.timestep_embedder.linear_1.{weight,bias}   [D, 256], [D]
      transformer_blocks.N.norm1.emb.timestep_embedder.linear_2.{weight,bias}   [D, D], [D]
      transformer_blocks.N.norm1.emb.class_embedder.embedding_table.weight      [K + 1, D]
      transformer_blocks.N.norm1.linear.{weight,bias}              [6D, D], [6D]
      transformer_blocks.N.attn1.to_{q,k,v}.{weight,bias}          [D, D], [D]
      transformer_blocks.N.attn1.to_out.0.{weight,bias}            [D, D], [D]
      transformer_blocks.N.ff.net.0.proj.{weight,bias}             [F, D], [F]
      transformer_blocks.N.ff.net.2.{weight,bias}                  [D, F], [D]
      proj_out_1.{weight,bias}                                     [2D, D], [2D]
      proj_out_2.{weight,bias}                                     [p*p*OC, D], [p*p*OC]
      (no norm weights: every LayerNorm has elementwise_affine false; the pos embed is a non-persistent
      buffer; each block has its own timestep and class embedders)
  DIR/scheduler/scheduler_config.json  {"_class_name": "DDIMScheduler", "num_train_timesteps" T, "beta_start",
      "beta_end", "beta_schedule" "linear"|"scaled_linear", "clip_sample", "clip_sample_range",
      "set_alpha_to_one", "steps_offset", "prediction_type" "epsilon", "timestep_spacing"
      "leading"|"trailing"|"linspace", "trained_betas" null, "thresholding" false,
      "dynamic_thresholding_ratio" 0.995, "sample_max_value" 1.0, "rescale_betas_zero_snr" false}
      (reading refuses trained_betas, thresholding, rescale_betas_zero_snr and other prediction types)

Transformer (DiTTransformer2DModel.forward; x [N, C, S, S], timestep t int64 [N], class y int64 [N]):
  1. Patch embed (embeddings.PatchEmbed): h = conv2d(x, pos_embed.proj, stride p) [N, D, G, G], flattened
     to tokens [N, G*G, D], token n = i*G + j for patch row i, column j (flatten(2).transpose(1, 2));
     h = h + pos (pos added in float32, the sum cast to the activation dtype).
  2. 2D sincos pos embed (embeddings.get_2d_sincos_pos_embed, base_size = S // p = G, interpolation_scale 1,
     so the grid coordinates are exactly i and j; get_2d_sincos_pos_embed_from_grid +
     get_1d_sincos_pos_embed_from_grid), Q = D / 4, omega_k = 1 / 10000^(k / Q), k = 0 .. Q-1:
       pos[n, k]      = sin(j * omega_k)      pos[n, Q + k]  = cos(j * omega_k)      (first half: COLUMN j)
       pos[n, 2Q + k] = sin(i * omega_k)      pos[n, 3Q + k] = cos(i * omega_k)      (second half: ROW i)
     (diffusers' meshgrid(grid_w, grid_h, indexing="xy") puts w first), computed in float64, cast to float32.
  3. Conditioning, per block b (normalization.AdaLayerNormZero.emb = embeddings.CombinedTimestepLabelEmbeddings
     with class_dropout_prob 0.1, so the class table has K + 1 rows, row K = the null class):
       tproj = timestep embedding (embeddings.Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1) ->
               get_timestep_embedding), float32: half = 128, f_k = exp(-ln(10000) * k / (half - 1)),
               k = 0 .. 127, a_k = float(t) * f_k; tproj = [cos(a_0..a_127), sin(a_0..a_127)] (COS FIRST)
       temb  = linear_2(silu(linear_1(tproj.to(dtype))))            (embeddings.TimestepEmbedding, act silu)
       c_b   = temb + embedding_table[y]                            (embeddings.LabelEmbedding, no dropout
                                                                     at inference)
  4. Block b (attention.BasicTransformerBlock, norm_type "ada_norm_zero", no cross attention, no norm2):
       m = norm1.linear(silu(c_b)) [N, 6D]; shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp =
           m.chunk(6, dim=1)  (IN THIS ORDER: m[:, 0:D] = shift_msa, ..., m[:, 5D:6D] = gate_mlp)
       u = LN(h, eps 1e-6) * (1 + scale_msa) + shift_msa            (AdaLayerNormZero.norm, eps fixed 1e-6)
       h = h + gate_msa * attn1(u)
       u = LN(h, eps norm_eps) * (1 + scale_mlp) + shift_mlp        (norm3 = LayerNorm(D, norm_eps), no affine)
       h = h + gate_mlp * ff(u),  ff(u) = net.2(gelu_tanh(net.0.proj(u)))   (attention.FeedForward with
           activation_fn "gelu-approximate" = activations.GELU(approximate="tanh"), inner dim 4D, biases)
     LN = LayerNorm over the last dim without weight or bias: (h - mean) / sqrt(var_biased + eps).
     attn1 (attention_processor.Attention + AttnProcessor2_0, bias = attention_bias): q, k, v = to_q/k/v(u)
       (with biases), split into H heads of hd (head h = features h*hd .. h*hd+hd-1), softmax(q k^T / sqrt(hd))
       v over all G*G tokens (no mask), heads concatenated, to_out.0 (with bias).
  5. Output (DiTTransformer2DModel.forward "3. Output"): uses BLOCK 0's embedders:
       shift, scale = proj_out_1(silu(c_0)).chunk(2, dim=1)   (shift = first D, scale = second D)
       h = LN(h, eps 1e-6) * (1 + scale) + shift;  o = proj_out_2(h) [N, G*G, p*p*OC]
  6. Unpatchify: o.reshape(N, G, G, p, p, OC), einsum "nhwpqc->nchpwq", reshape [N, OC, G*p, G*p]:
       out[n, c, i*p + a, j*p + b] = o[n, i*G + j, (a*p + b)*OC + c]
  dtype bfloat16 (run --dtype): weights and activations in bfloat16 (each Linear/Conv in bfloat16), the
  timestep embedding and the pos embed in float32 then rounded as above, LayerNorm and the attention core
  (scores, softmax, probs @ v) computed in float32 from the bfloat16 values and rounded back; the output
  is returned in float32.

DDIM (schedulers.scheduling_ddim.DDIMScheduler, eta 0, prediction_type "epsilon"), all in float32:
  betas = linspace(beta_start, beta_end, T) ("linear") or linspace(sqrt(beta_start), sqrt(beta_end), T)^2
  ("scaled_linear"), float32; alphas_cumprod = cumprod(1 - betas) (float32, torch.cumprod);
  final_alpha_cumprod = 1.0 if set_alpha_to_one else alphas_cumprod[0].
  set_timesteps(n) (n <= T, numpy int64, descending):
    "leading":  r = T // n;  ts = [(n-1)*r, ..., r, 0] + steps_offset
    "trailing": r = T / n (float);  ts = round(np.arange(T, 0, -r)) - 1  (e.g. T=1000 n=4: 999 749 499 249)
    "linspace": ts = round(np.linspace(0, T - 1, n)) reversed (numpy round: half to even)
    (steps_offset is used by "leading" only.)
  step(eps, t, x): prev = t - T // n (for EVERY spacing); a_t = alphas_cumprod[t];
    a_prev = alphas_cumprod[prev] if prev >= 0 else final_alpha_cumprod;
    x0 = (x - sqrt(1 - a_t) * eps) / sqrt(a_t);  x0 = clamp(x0, -clip_sample_range, clip_sample_range)
    when clip_sample;  x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps.

Pipeline (pipelines.dit.pipeline_dit.DiTPipeline.__call__, up to the VAE decode):
  latents = torch.randn(B, C, S, S, generator=torch.Generator().manual_seed(seed)) (float32; the same as
  diffusers' randn_tensor with that CPU generator). cfg = guidance > 1.
  cfg: x = cat([latents, latents]), labels = cat([y, null]) with null = K (num_embeds_ada_norm) for each
  image (diffusers hard-codes 1000, which is K for its ImageNet checkpoints; the twin uses K so that toy
  models with fewer classes work). For each t in timesteps: (cfg) x = cat([x[:B], x[:B]]);
  out = transformer(x, t expanded to x's batch, labels) [2B or B, OC, S, S];
  (cfg) eps = out[:, :C], rest = out[:, C:]; cond, uncond = eps[:B], eps[B:];
        g_eps = uncond + guidance * (cond - uncond); out = cat([cat([g_eps, g_eps]), rest], dim=1);
  model_output = out[:, :C] if OC // 2 == C (learned sigma: the variance channels are dropped) else out;
  x = step(model_output, t, x). Output latents = x[:B] (x.chunk(2)[0]) with cfg, else x.
  The twin keeps the latents, the guidance combine and the DDIM step in float32 also with --dtype bfloat16
  (diffusers would keep them in the pipeline dtype).
  With DIR/vae: images = (vae.decode(1 / scaling_factor * latents).sample / 2 + 0.5).clamp(0, 1), in
  float32, [B, 3, H, W] (diffusers returns them permuted to [B, H, W, 3]).

VAE (DIR/vae: autoencoder_kl.AutoencoderKL; only its decode runs):
  DIR/vae/config.json {"_class_name": "AutoencoderKL", "in_channels" 3, "out_channels" 3, "down_block_types"
      n x "DownEncoderBlock2D", "up_block_types" n x "UpDecoderBlock2D", "block_out_channels" [c_0 .. c_n-1],
      "layers_per_block" L, "act_fn" "silu", "latent_channels" C, "norm_num_groups" G, "sample_size",
      "scaling_factor" 0.18215, "force_upcast", "use_quant_conv" true, "use_post_quant_conv" true,
      "mid_block_add_attention" true}
  DIR/vae/diffusion_pytorch_model.safetensors: diffusers' names (expected_vae_names): encoder.* and quant_conv
      (written, never run), decoder.*, post_quant_conv.{weight,bias} [C, C, 1, 1].
  decode(z) = decoder(post_quant_conv(z)); decoder (vae.Decoder): conv_in (C -> c_n-1, 3x3 pad 1), mid_block,
      up_blocks i = 0 .. n-1 over the reversed channels r = [c_n-1 .. c_0] (block i: r[i-1] -> r[i], r[-1] read
      as r[0]; L + 1 resnets; upsamplers.0 = nearest x2 (F.interpolate) then a 3x3 conv, in all but the last),
      conv_norm_out (GroupNorm(G, c_0, eps 1e-6)), SiLU, conv_out (c_0 -> 3, 3x3 pad 1). Images are
      S * 2^(n-1) pixels on a side.
  resnets (resnet.ResnetBlock2D, temb None): h = conv1(silu(norm1(x))); h = conv2(silu(norm2(h))) (dropout 0);
      x + h, x through conv_shortcut (1x1, bias) when the channels change; every GroupNorm G groups, eps 1e-6,
      affine; output_scale_factor 1.
  mid_block (UNetMidBlock2D): resnets.0, attentions.0, resnets.1; attentions.0 = attention_processor.Attention
      with one head of c_n-1 (attention_head_dim = the channels): t = group_norm(x) as [B, H*W, c] tokens,
      softmax(to_q(t) to_k(t)^T / sqrt(c)) to_v(t), to_out.0 (all with biases), back to [B, c, H, W], + x.

Subcommands (run with the interpreter that has torch: /usr/bin/python3):

  write-model DIR [--heads 2 --head-dim 16 --in-channels 4 --learned-sigma|--no-learned-sigma (default on)
                   --layers 2 --sample-size 8 --patch 2 --classes 10 --norm-eps 1e-5 --seed 0
                   --num-train-timesteps 1000 --beta-start 0.0001 --beta-end 0.02
                   --beta-schedule linear|scaled_linear --clip-sample|--no-clip-sample (default on)
                   --clip-sample-range 1.0 --timestep-spacing leading|trailing|linspace --steps-offset 0
                   --set-alpha-to-one|--no-set-alpha-to-one (default on)
                   --vae [--vae-block-out-channels 32,64 --vae-layers-per-block 1 --vae-norm-num-groups 8
                   --vae-scaling-factor 0.18215 --vae-mid-attention|--no-vae-mid-attention --vae-seed 0]]
      Writes the folder above (each file written beside and renamed) with random weights: every Linear and
      Conv weight normal(0, 1/sqrt(fan_in)), biases normal(0, 0.1), class tables normal(0, 1), so that the
      output is O(1) and depends visibly on the timestep and the class (diffusers' training init zeroes
      norm1.linear and proj_out, which would make every output trivial). --vae: also vae/ (latent_channels =
      --in-channels), convs and linears normal(0, 1/sqrt(fan_in)), biases normal(0, 0.1), GroupNorm weights
      1 + normal(0, 0.1) and biases normal(0, 0.1).

  run DIR --classes 3,7 --steps 4 --guidance 4.0 --seed 0 --out PREFIX [--dtype float32|bfloat16]
          [--threads N]
      The pipeline above. Writes PREFIX.safetensors:
        latents_init     F32 [B, C, S, S]           the initial latents
        timesteps        I64 [steps]
        class_labels     I64 [B]
        latents_step     F32 [steps, B, C, S, S]    the latents after each step (first half with cfg);
                                                    latents_step[-1] is the pipeline's output latents
        eps_step0        F32 [B, C, S, S]           step 0's guided epsilon (after the learned-sigma split
                                                    and the guidance combine; the first half with cfg)
        model_out_step0  F32 [2B or B, OC, S, S]    step 0's raw transformer output (the cfg-doubled batch:
                                                    rows 0..B-1 conditional, B..2B-1 the null class)
        images           F32 [B, 3, S', S']         only with DIR/vae: the decoded latents_step[-1], / 2 + 0.5,
                                                    clamped to [0, 1] (S' = S * 2^(n-1))
        decoded          F32 [B, 3, S', S']         only with DIR/vae: vae.decode(...).sample (before both)
      and PREFIX.json {"timesteps": [...], "alphas_cumprod_t": [a_t per step], "alphas_cumprod_prev":
        [a_prev per step], "prev_timesteps": [...], "config": {"transformer": {...}, "scheduler": {...},
        "run": {"classes", "steps", "guidance", "seed", "dtype", "cfg", "null_class"}, "vae": {...} (with vae/)}}.

  selftest
      Checks the pos embed and the timestep embedding against a direct loop computation, the DDIM step
      against its closed form (float64 alphas, clipping active and not, both set_alpha_to_one settings),
      the timestep lists against hand-computed ones, the state-dict names against the list above, that the
      output depends on the class and the timestep, and that cfg at guidance 1.0 equals the conditional run;
      the VAE: devpipe's GroupNorm (layer_norm over [B, G, C/G*H*W], then weight and bias) against
      F.group_norm, its nearest x2 by concatenation against F.interpolate, the relu clamp against clamp,
      the mid-block attention against a float64 computation from its weights, the names against
      diffusers' (with and without the mid attention), that some but not most samples are clamped, and that
      each image follows its own latents.
"""
import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402
import st  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
kTimestepChannels = 256   # CombinedTimestepLabelEmbeddings: Timesteps(num_channels=256, ...)
kAdaNormEps = 1e-6        # AdaLayerNormZero.norm and norm_out
kTransformerFile = "diffusion_pytorch_model.safetensors"


def fail(msg):
    raise SystemExit(f"dit_ref: {msg}")


# --- configs ---------------------------------------------------------------------------------

def make_transformer_config(heads=2, head_dim=16, in_channels=4, learned_sigma=True, layers=2, sample_size=8,
                            patch=2, classes=10, norm_eps=1e-5):
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": heads, "attention_head_dim": head_dim,
            "in_channels": in_channels, "out_channels": 2 * in_channels if learned_sigma else in_channels,
            "num_layers": layers, "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True,
            "sample_size": sample_size, "patch_size": patch, "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": norm_eps}


def make_scheduler_config(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing="leading"):
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": num_train_timesteps, "beta_start": beta_start,
            "beta_end": beta_end, "beta_schedule": beta_schedule, "clip_sample": clip_sample,
            "clip_sample_range": clip_sample_range, "set_alpha_to_one": set_alpha_to_one,
            "steps_offset": steps_offset, "prediction_type": "epsilon", "timestep_spacing": timestep_spacing,
            "trained_betas": None, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0, "rescale_betas_zero_snr": False}


def check_transformer_config(cfg, where):
    name = cfg.get("_class_name")
    if name not in ("DiTTransformer2DModel", "Transformer2DModel"):
        fail(f"{where}: _class_name {name!r}, expected DiTTransformer2DModel")
    for k in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
              "patch_size", "num_embeds_ada_norm"):
        if not isinstance(cfg.get(k), int) or cfg[k] <= 0:
            fail(f"{where}: {k} must be a positive integer, got {cfg.get(k)!r}")
    want = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False}
    for k, v in want.items():
        if cfg.get(k, v) != v:
            fail(f"{where}: {k} {cfg.get(k)!r} is not supported (the twin implements {v!r})")
    c = dict(cfg)
    c.setdefault("norm_eps", 1e-5)
    c.setdefault("attention_bias", True)
    if c.get("out_channels") is None:
        c["out_channels"] = c["in_channels"]
    if c["out_channels"] not in (c["in_channels"], 2 * c["in_channels"]):
        fail(f"{where}: out_channels {c['out_channels']} must be in_channels ({c['in_channels']}) or twice it")
    if c["sample_size"] % c["patch_size"]:
        fail(f"{where}: sample_size {c['sample_size']} is not a multiple of patch_size {c['patch_size']}")
    d = c["num_attention_heads"] * c["attention_head_dim"]
    if d % 4:
        fail(f"{where}: inner dim {d} (heads x head dim) must be a multiple of 4 for the 2D sincos pos embed")
    return c


def check_scheduler_config(cfg, where):
    if cfg.get("_class_name") != "DDIMScheduler":
        fail(f"{where}: _class_name {cfg.get('_class_name')!r}, expected DDIMScheduler")
    c = make_scheduler_config()
    c.update(cfg)
    if c["beta_schedule"] not in ("linear", "scaled_linear"):
        fail(f"{where}: beta_schedule {c['beta_schedule']!r} is not supported (linear, scaled_linear)")
    if c["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        fail(f"{where}: timestep_spacing {c['timestep_spacing']!r} is not leading, trailing or linspace")
    if c["prediction_type"] != "epsilon":
        fail(f"{where}: prediction_type {c['prediction_type']!r} is not supported (epsilon)")
    for k in ("thresholding", "rescale_betas_zero_snr"):
        if c[k]:
            fail(f"{where}: {k} true is not supported")
    if c["trained_betas"] is not None:
        fail(f"{where}: trained_betas is not supported (null expected)")
    return c


# --- embeddings ------------------------------------------------------------------------------

def timestep_embedding(t, channels=kTimestepChannels):
    """get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1), float32 [N, 256]."""
    half = channels // 2
    freqs = torch.exp((-math.log(10000.0) * torch.arange(half, dtype=torch.float32)) / (half - 1))
    arg = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=1)


def sincos_pos_embed_2d(dim, grid):
    """[grid*grid, dim] float32; token n = i*grid + j; first half encodes the column j, second the row i."""
    q = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(q, dtype=torch.float64) / q)
    coord = torch.arange(grid, dtype=torch.float64)
    row = coord.repeat_interleave(grid)   # i of token n
    col = coord.repeat(grid)              # j of token n
    a_col = col[:, None] * omega[None, :]
    a_row = row[:, None] * omega[None, :]
    return torch.cat([a_col.sin(), a_col.cos(), a_row.sin(), a_row.cos()], dim=1).to(torch.float32)


# --- model (module tree mirrors diffusers' names) ----------------------------------------------

class _Node(nn.Module):
    """A named container (its children give the state-dict names)."""


def _linear(i, o):
    return nn.Linear(i, o, bias=True)


class DiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        c, p, oc, k = cfg["in_channels"], cfg["patch_size"], cfg["out_channels"], cfg["num_embeds_ada_norm"]
        self.dim = d
        self.pos_embed = _Node()
        self.pos_embed.proj = nn.Conv2d(c, d, kernel_size=p, stride=p, bias=True)
        self.transformer_blocks = nn.ModuleList()
        for _ in range(cfg["num_layers"]):
            b = _Node()
            b.norm1 = _Node()
            b.norm1.emb = _Node()
            b.norm1.emb.timestep_embedder = _Node()
            b.norm1.emb.timestep_embedder.linear_1 = _linear(kTimestepChannels, d)
            b.norm1.emb.timestep_embedder.linear_2 = _linear(d, d)
            b.norm1.emb.class_embedder = _Node()
            b.norm1.emb.class_embedder.embedding_table = nn.Embedding(k + 1, d)  # + the null class (cfg)
            b.norm1.linear = _linear(d, 6 * d)
            b.attn1 = _Node()
            ab = bool(cfg["attention_bias"])
            b.attn1.to_q = nn.Linear(d, d, bias=ab)
            b.attn1.to_k = nn.Linear(d, d, bias=ab)
            b.attn1.to_v = nn.Linear(d, d, bias=ab)
            b.attn1.to_out = nn.ModuleList([_linear(d, d)])
            b.ff = _Node()
            proj_in = _Node()
            proj_in.proj = _linear(d, 4 * d)
            b.ff.net = nn.ModuleList([proj_in, nn.Identity(), _linear(4 * d, d)])
            self.transformer_blocks.append(b)
        self.proj_out_1 = _linear(d, 2 * d)
        self.proj_out_2 = _linear(d, p * p * oc)
        grid = cfg["sample_size"] // p
        self.register_buffer("pos", sincos_pos_embed_2d(d, grid), persistent=False)

    @property
    def dtype(self):
        return self.proj_out_2.weight.dtype

    def conditioning(self, block, t, y):
        """CombinedTimestepLabelEmbeddings of one block: [N, D]."""
        e = block.norm1.emb
        tproj = timestep_embedding(t).to(self.dtype)
        temb = e.timestep_embedder.linear_2(F.silu(e.timestep_embedder.linear_1(tproj)))
        return temb + e.class_embedder.embedding_table(y)

    def _ln(self, h, eps):
        return F.layer_norm(h.to(torch.float32), (h.shape[-1],), eps=eps).to(h.dtype)

    def _attention(self, a, u):
        n, l, d = u.shape
        heads, hd = self.cfg["num_attention_heads"], self.cfg["attention_head_dim"]
        q, k, v = (m(u).to(torch.float32).view(n, l, heads, hd).transpose(1, 2) for m in (a.to_q, a.to_k, a.to_v))
        probs = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        o = (probs @ v).transpose(1, 2).reshape(n, l, d).to(u.dtype)
        return a.to_out[0](o)

    def forward(self, x, t, y):
        """x [N, C, S, S], t int64 [N], y int64 [N] -> float32 [N, OC, S, S]."""
        cfg = self.cfg
        dt = self.dtype
        p, oc = cfg["patch_size"], cfg["out_channels"]
        n = x.shape[0]
        g = x.shape[-1] // p
        h = self.pos_embed.proj(x.to(dt)).flatten(2).transpose(1, 2)
        h = (h.to(torch.float32) + self.pos[None]).to(dt)
        for b in self.transformer_blocks:
            c = self.conditioning(b, t, y)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = b.norm1.linear(F.silu(c)).chunk(6, dim=1)
            u = self._ln(h, kAdaNormEps) * (1 + scale_msa[:, None]) + shift_msa[:, None]
            h = h + gate_msa[:, None] * self._attention(b.attn1, u)
            u = self._ln(h, cfg["norm_eps"]) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            f = b.ff.net[2](F.gelu(b.ff.net[0].proj(u), approximate="tanh"))
            h = h + gate_mlp[:, None] * f
        c0 = self.conditioning(self.transformer_blocks[0], t, y)
        shift, scale = self.proj_out_1(F.silu(c0)).chunk(2, dim=1)
        h = self._ln(h, kAdaNormEps) * (1 + scale[:, None]) + shift[:, None]
        o = self.proj_out_2(h)
        o = o.reshape(n, g, g, p, p, oc).permute(0, 5, 1, 3, 2, 4).reshape(n, oc, g * p, g * p)
        return o.to(torch.float32)


def expected_names(cfg):
    names = ["pos_embed.proj.weight", "pos_embed.proj.bias"]
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        for m in ("norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2"):
            names += [b + m + ".weight", b + m + ".bias"]
        names.append(b + "norm1.emb.class_embedder.embedding_table.weight")
        for m in ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj",
                  "ff.net.2"):
            names += [b + m + ".weight", b + m + ".bias"]
    names += ["proj_out_1.weight", "proj_out_1.bias", "proj_out_2.weight", "proj_out_2.bias"]
    return names


def init_random(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.state_dict().items():
            if name.endswith("embedding_table.weight"):
                prm.copy_(torch.randn(prm.shape, generator=g))
            elif name.endswith(".bias"):
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
            else:
                fan_in = prm[0].numel()  # Linear [out, in]; Conv [out, C, p, p]
                prm.copy_(torch.randn(prm.shape, generator=g) / math.sqrt(fan_in))


# --- DDIM ------------------------------------------------------------------------------------

class DDIM:
    def __init__(self, cfg):
        self.cfg = cfg
        t = cfg["num_train_timesteps"]
        if cfg["beta_schedule"] == "linear":
            betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], t, dtype=torch.float32)
        else:
            betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, t, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps = None
        self.timesteps = None

    def set_timesteps(self, n):
        big_t = self.cfg["num_train_timesteps"]
        if not 1 <= n <= big_t:
            fail(f"steps {n} must be in [1, num_train_timesteps {big_t}]")
        self.num_inference_steps = n
        spacing = self.cfg["timestep_spacing"]
        if spacing == "leading":
            r = big_t // n
            ts = (np.arange(0, n) * r).round()[::-1].copy().astype(np.int64) + self.cfg["steps_offset"]
        elif spacing == "trailing":
            ts = np.round(np.arange(big_t, 0, -big_t / n)).astype(np.int64) - 1
        else:
            ts = np.linspace(0, big_t - 1, n).round()[::-1].copy().astype(np.int64)
        self.timesteps = torch.from_numpy(ts)
        return self.timesteps

    def prev_timestep(self, t):
        return int(t) - self.cfg["num_train_timesteps"] // self.num_inference_steps

    def alphas(self, t):
        prev = self.prev_timestep(t)
        a_t = self.alphas_cumprod[int(t)]
        a_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return a_t, a_prev

    def step(self, eps, t, x):
        a_t, a_prev = self.alphas(t)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if self.cfg["clip_sample"]:
            r = self.cfg["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


# --- pipeline --------------------------------------------------------------------------------

def run_pipeline(model, sched, classes, steps, guidance, seed, force_cfg=False):
    cfg = model.cfg
    c, s, k = cfg["in_channels"], cfg["sample_size"], cfg["num_embeds_ada_norm"]
    for y in classes:
        if not 0 <= y < k:
            fail(f"class {y} is out of range [0, {k}) (num_embeds_ada_norm {k})")
    b = len(classes)
    latents = torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    use_cfg = guidance > 1 or force_cfg
    labels = torch.tensor(classes, dtype=torch.int64)
    labels_in = torch.cat([labels, torch.full((b,), k, dtype=torch.int64)]) if use_cfg else labels
    x = torch.cat([latents, latents]) if use_cfg else latents
    timesteps = sched.set_timesteps(steps)
    out_steps, eps0, raw0 = [], None, None
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            if use_cfg:
                x = torch.cat([x[:b], x[:b]])
            out = model(x, t.expand(x.shape[0]), labels_in)
            if i == 0:
                raw0 = out.clone()
            if use_cfg:
                eps, rest = out[:, :c], out[:, c:]
                cond, uncond = eps[:b], eps[b:]
                g_eps = uncond + guidance * (cond - uncond)
                out = torch.cat([torch.cat([g_eps, g_eps]), rest], dim=1)
            model_output = out[:, :c] if cfg["out_channels"] // 2 == c else out
            if i == 0:
                eps0 = model_output[:b].clone()
            x = sched.step(model_output, t, x)
            out_steps.append(x[:b].clone())
    alphas = [sched.alphas(t) for t in timesteps]
    return {"latents_init": latents, "timesteps": timesteps.clone(), "class_labels": labels,
            "latents_step": torch.stack(out_steps), "eps_step0": eps0, "model_out_step0": raw0,
            "alphas_cumprod_t": [float(a) for a, _ in alphas], "alphas_cumprod_prev": [float(p) for _, p in alphas],
            "prev_timesteps": [sched.prev_timestep(t) for t in timesteps], "cfg": use_cfg, "null_class": k}


# --- VAE (AutoencoderKL; only the decoder runs, the encoder is written for the checkpoint's names) --

kVaeFile = "diffusion_pytorch_model.safetensors"
kVaeEps = 1e-6  # every GroupNorm of the encoder and decoder (resnet_eps, conv_norm_out, attention)


def make_vae_config(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                    scaling_factor=0.18215, sample_size=16, mid_block_add_attention=True, use_post_quant_conv=True):
    n = len(block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": list(block_out_channels), "layers_per_block": layers_per_block, "act_fn": "silu",
            "latent_channels": latent_channels, "norm_num_groups": norm_num_groups, "sample_size": sample_size,
            "scaling_factor": scaling_factor, "force_upcast": True, "use_quant_conv": True,
            "use_post_quant_conv": use_post_quant_conv, "mid_block_add_attention": mid_block_add_attention}


def check_vae_config(cfg, where):
    if cfg.get("_class_name") != "AutoencoderKL":
        fail(f"{where}: _class_name {cfg.get('_class_name')!r}, expected AutoencoderKL")
    c = make_vae_config()
    c.update(cfg)
    if c["act_fn"] not in ("silu", "swish"):
        fail(f"{where}: act_fn {c['act_fn']!r} is not supported (silu)")
    n = len(c["block_out_channels"])
    if any(t != "UpDecoderBlock2D" for t in c["up_block_types"]) or len(c["up_block_types"]) != n:
        fail(f"{where}: up_block_types {c['up_block_types']} must be {n} UpDecoderBlock2D")
    if any(t != "DownEncoderBlock2D" for t in c["down_block_types"]) or len(c["down_block_types"]) != n:
        fail(f"{where}: down_block_types {c['down_block_types']} must be {n} DownEncoderBlock2D")
    if any(ch % c["norm_num_groups"] for ch in c["block_out_channels"]):
        fail(f"{where}: norm_num_groups {c['norm_num_groups']} does not divide block_out_channels "
             f"{c['block_out_channels']}")
    return c


class _Resnet(nn.Module):
    """resnet.ResnetBlock2D with temb_channels None, time_embedding_norm "default", output_scale_factor 1:
    x + conv2(dropout(silu(norm2(conv1(silu(norm1(x))))))), x through conv_shortcut (1x1) when the
    channels change."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=kVaeEps, affine=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=kVaeEps, affine=True)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / 1.0


class _VaeAttention(nn.Module):
    """attention_processor.Attention as UNetMidBlock2D builds it (heads = C // attention_head_dim with
    attention_head_dim = C: one head; GroupNorm eps 1e-6; biases; residual_connection; rescale 1) run by
    AttnProcessor: the pixels as H*W tokens of C channels, group_norm over the channels, to_q/to_k/to_v,
    softmax(q k^T / sqrt(head dim)) (upcast to float32) v, to_out.0 (+ to_out.1 dropout), back to
    [B, C, H, W], plus the input."""

    def __init__(self, c, groups, head_dim):
        super().__init__()
        self.heads = c // head_dim
        self.head_dim = head_dim
        self.group_norm = nn.GroupNorm(groups, c, eps=kVaeEps, affine=True)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x):
        residual = x
        b, c, h, w = x.shape
        s = x.view(b, c, h * w).transpose(1, 2)
        s = self.group_norm(s.transpose(1, 2)).transpose(1, 2)
        split = lambda t: t.view(b, h * w, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(s)), split(self.to_k(s)), split(self.to_v(s))
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * self.head_dim ** -0.5, dim=-1)
        o = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, h * w, c)
        o = self.to_out[1](self.to_out[0](o))
        o = o.transpose(-1, -2).reshape(b, c, h, w)
        return (o + residual) / 1.0


class _MidBlock(nn.Module):
    """unet_2d_blocks.UNetMidBlock2D (num_layers 1): resnets.0, attentions.0 (unless add_attention is
    false), resnets.1."""

    def __init__(self, c, groups, add_attention):
        super().__init__()
        self.attentions = nn.ModuleList([_VaeAttention(c, groups, c)] if add_attention else [])
        self.resnets = nn.ModuleList([_Resnet(c, c, groups), _Resnet(c, c, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class _Upsample(nn.Module):
    """upsampling.Upsample2D(use_conv=True): nearest x2 (F.interpolate), then a 3x3 conv."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Downsample(nn.Module):
    """Downsample2D(use_conv=True, padding=0, name="op") (encoder only; not run)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)


class _Block(nn.Module):
    """UpDecoderBlock2D (resnets, upsamplers.0) or DownEncoderBlock2D (resnets, downsamplers.0)."""

    def __init__(self, cin, cout, layers, groups, resample):
        super().__init__()
        self.resnets = nn.ModuleList([_Resnet(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        if resample == "up":
            self.upsamplers = nn.ModuleList([_Upsample(cout)])
        elif resample == "down":
            self.downsamplers = nn.ModuleList([_Downsample(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for u in getattr(self, "upsamplers", []):
            x = u(x)
        return x


class _Encoder(nn.Module):
    """vae.Encoder (its weights only: devpipe's stage skips them)."""

    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg["block_out_channels"], cfg["norm_num_groups"]
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        out = ch[0]
        for i in range(len(ch)):
            cin, out = out, ch[i]
            self.down_blocks.append(_Block(cin, out, cfg["layers_per_block"], g,
                                           "down" if i < len(ch) - 1 else None))
        self.mid_block = _MidBlock(ch[-1], g, cfg["mid_block_add_attention"])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=kVaeEps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg["latent_channels"], 3, padding=1)


class _Decoder(nn.Module):
    """vae.Decoder: conv_in (latent -> block_out_channels[-1]), mid_block, up_blocks over the REVERSED
    channel list (block i: reversed[i-1] -> reversed[i], layers_per_block + 1 resnets, an upsampler but
    in the last), conv_norm_out (GroupNorm eps 1e-6), SiLU, conv_out (-> out_channels)."""

    def __init__(self, cfg):
        super().__init__()
        ch, g = cfg["block_out_channels"], cfg["norm_num_groups"]
        rev = list(reversed(ch))
        self.conv_in = nn.Conv2d(cfg["latent_channels"], ch[-1], 3, padding=1)
        self.up_blocks = nn.ModuleList()
        self.mid_block = _MidBlock(ch[-1], g, cfg["mid_block_add_attention"])
        out = rev[0]
        for i in range(len(rev)):
            prev, out = out, rev[i]
            self.up_blocks.append(_Block(prev, out, cfg["layers_per_block"] + 1, g,
                                         "up" if i < len(ch) - 1 else None))
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=kVaeEps)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """autoencoder_kl.AutoencoderKL's modules in its order (encoder, decoder, quant_conv, post_quant_conv)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        lc = cfg["latent_channels"]
        if cfg["use_quant_conv"]:
            self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1)
        if cfg["use_post_quant_conv"]:
            self.post_quant_conv = nn.Conv2d(lc, lc, 1)

    def decode(self, z):
        """AutoencoderKL.decode(z).sample (no tiling, no slicing): post_quant_conv, then the decoder."""
        if self.cfg["use_post_quant_conv"]:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def init_vae_random(vae, seed):
    """Convs and linears normal(0, 1/sqrt(fan_in)), biases normal(0, 0.1), GroupNorm weights 1 + normal(0, 0.1)
    and biases normal(0, 0.1) (diffusers' init would give norms exactly 1 and 0, hiding their parameters)."""
    g = torch.Generator().manual_seed(seed)
    norms = {n for n, m in vae.named_modules() if isinstance(m, nn.GroupNorm)}
    with torch.no_grad():
        for name, prm in vae.state_dict().items():
            owner, leaf = name.rsplit(".", 1)
            if owner in norms:
                prm.copy_((1.0 if leaf == "weight" else 0.0) + 0.1 * torch.randn(prm.shape, generator=g))
            elif leaf == "bias":
                prm.copy_(torch.randn(prm.shape, generator=g) * 0.1)
            else:
                prm.copy_(torch.randn(prm.shape, generator=g) / math.sqrt(prm[0].numel()))


def expected_vae_names(cfg):
    """The state-dict names of diffusers' AutoencoderKL for `cfg`, from its constructors."""
    ch, n, lpb = cfg["block_out_channels"], len(cfg["block_out_channels"]), cfg["layers_per_block"]
    wb = lambda p: [p + ".weight", p + ".bias"]  # noqa: E731

    def resnet(p, cin, cout):
        r = wb(p + ".norm1") + wb(p + ".conv1") + wb(p + ".norm2") + wb(p + ".conv2")
        return r + (wb(p + ".conv_shortcut") if cin != cout else [])

    def mid(p, c):
        out = []
        if cfg["mid_block_add_attention"]:
            a = p + ".attentions.0"
            out += wb(a + ".group_norm") + wb(a + ".to_q") + wb(a + ".to_k") + wb(a + ".to_v") + wb(a + ".to_out.0")
        return out + resnet(p + ".resnets.0", c, c) + resnet(p + ".resnets.1", c, c)

    names = wb("encoder.conv_in")
    out = ch[0]
    for i in range(n):
        cin, out = out, ch[i]
        for j in range(lpb):
            names += resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else out, out)
        if i < n - 1:
            names += wb(f"encoder.down_blocks.{i}.downsamplers.0.conv")
    names += mid("encoder.mid_block", ch[-1]) + wb("encoder.conv_norm_out") + wb("encoder.conv_out")
    names += wb("decoder.conv_in")
    rev = list(reversed(ch))
    dec_blocks = []
    out = rev[0]
    for i in range(n):
        prev, out = out, rev[i]
        for j in range(lpb + 1):
            dec_blocks += resnet(f"decoder.up_blocks.{i}.resnets.{j}", prev if j == 0 else out, out)
        if i < n - 1:
            dec_blocks += wb(f"decoder.up_blocks.{i}.upsamplers.0.conv")
    names += dec_blocks + mid("decoder.mid_block", ch[-1])  # registered before the mid block, listed after
    names += wb("decoder.conv_norm_out") + wb("decoder.conv_out")
    if cfg["use_quant_conv"]:
        names += wb("quant_conv")
    if cfg["use_post_quant_conv"]:
        names += wb("post_quant_conv")
    return names


def decode_latents(vae, latents):
    """pipeline_dit.DiTPipeline.__call__ after the loop: 1 / scaling_factor * latents, vae.decode(...).sample,
    (samples / 2 + 0.5).clamp(0, 1), kept [B, 3, H, W] (diffusers then permutes to numpy [B, H, W, 3]).
    Returns (images, decoded before the / 2 + 0.5 and the clamp)."""
    with torch.inference_mode():
        decoded = vae.decode(1 / vae.cfg["scaling_factor"] * latents)
        return (decoded / 2 + 0.5).clamp(0, 1), decoded


def groupnorm_as_layer_norm(x, groups, weight, bias, eps):
    """devpipe's GroupNorm: [B, G, C/G * H * W] normalised over the last dim, back to [B, C, H, W], times
    weight[C, 1, 1] plus bias."""
    b, c = x.shape[:2]
    y = F.layer_norm(x.reshape(b, groups, -1), (x[0].numel() // groups,), eps=eps).reshape(x.shape)
    return y * weight.reshape(c, 1, 1) + bias.reshape(c, 1, 1)


def upsample_as_concat(x):
    """devpipe's nearest x2: [B, C, H, 1, W, 1], concatenated with itself on dims 3 and 5, [B, C, 2H, 2W]."""
    b, c, h, w = x.shape
    y = x.reshape(b, c, h, 1, w, 1)
    y = torch.cat([y, y], dim=3)
    y = torch.cat([y, y], dim=5)
    return y.reshape(b, c, 2 * h, 2 * w)


def load_vae(folder):
    """DIR/vae as an AutoencoderKL, or None when the folder has no vae/."""
    vdir = os.path.join(folder, "vae")
    if not os.path.isdir(vdir):
        return None
    cpath = os.path.join(vdir, "config.json")
    cfg = check_vae_config(_read_json(cpath), cpath)
    wpath = os.path.join(vdir, kVaeFile)
    if not os.path.isfile(wpath):
        fail(f"{wpath} not found")
    sd = st.load(wpath)
    vae = AutoencoderKL(cfg)
    want = vae.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        fail(f"{wpath}: missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            fail(f"{wpath}: {k} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
    vae.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
    return vae.eval()


def write_vae(out, vcfg, seed):
    vcfg = check_vae_config(vcfg, "write-model --vae")
    vdir = os.path.join(out, "vae")
    os.makedirs(vdir, exist_ok=True)
    vae = AutoencoderKL(vcfg).eval()
    init_vae_random(vae, seed)
    wpath = os.path.join(vdir, kVaeFile)
    st.save(wpath + ".tmp", vae.state_dict(), {"format": "pt"})
    os.replace(wpath + ".tmp", wpath)
    _atomic_json(os.path.join(vdir, "config.json"), vcfg)
    return vae


# --- I/O -------------------------------------------------------------------------------------

_atomic_write_bytes = llama_ref._atomic_write_bytes  # written beside (path.tmp), renamed


def _atomic_json(path, obj):
    _atomic_write_bytes(path, json.dumps(obj, indent=2).encode())


def write_model(out, tcfg, scfg, seed=0, vcfg=None, vae_seed=0):
    """Writes the pipeline folder (with vae/ when vcfg is given: its latent_channels are the transformer's
    in_channels); returns the float32 model."""
    tcfg = check_transformer_config(tcfg, "write-model")
    scfg = check_scheduler_config(scfg, "write-model")
    os.makedirs(os.path.join(out, "transformer"), exist_ok=True)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    model = DiT(tcfg).eval()
    init_random(model, seed)
    wpath = os.path.join(out, "transformer", kTransformerFile)
    st.save(wpath + ".tmp", model.state_dict(), {"format": "pt"})
    os.replace(wpath + ".tmp", wpath)
    _atomic_json(os.path.join(out, "transformer", "config.json"), tcfg)
    _atomic_json(os.path.join(out, "scheduler", "scheduler_config.json"), scfg)
    if vcfg is not None:
        write_vae(out, dict(vcfg, latent_channels=tcfg["in_channels"]), vae_seed)
    _atomic_json(os.path.join(out, "model_index.json"),
                 {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
                  "scheduler": ["diffusers", "DDIMScheduler"], "vae": ["diffusers", "AutoencoderKL"]})
    return model


def _read_json(path):
    if not os.path.isfile(path):
        fail(f"{path} not found")
    with open(path) as f:
        return json.load(f)


def load_pipeline(folder, dtype="float32"):
    index = _read_json(os.path.join(folder, "model_index.json"))
    if index.get("_class_name") != "DiTPipeline":
        fail(f"{folder}/model_index.json: _class_name {index.get('_class_name')!r}, expected DiTPipeline")
    tpath = os.path.join(folder, "transformer", "config.json")
    spath = os.path.join(folder, "scheduler", "scheduler_config.json")
    tcfg = check_transformer_config(_read_json(tpath), tpath)
    scfg = check_scheduler_config(_read_json(spath), spath)
    wpath = os.path.join(folder, "transformer", kTransformerFile)
    if not os.path.isfile(wpath):
        fail(f"{wpath} not found")
    sd = st.load(wpath)
    model = DiT(tcfg)
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        fail(f"{wpath}: missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            fail(f"{wpath}: {k} has shape {list(sd[k].shape)}, expected {list(v.shape)}")
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=False)
    model = model.to(_DTYPES[dtype]).eval()
    model.pos = model.pos.to(torch.float32)
    return model, DDIM(scfg)


# --- commands --------------------------------------------------------------------------------

def cmd_write_model(a):
    tcfg = make_transformer_config(a.heads, a.head_dim, a.in_channels, a.learned_sigma, a.layers, a.sample_size,
                                   a.patch, a.classes, a.norm_eps)
    scfg = make_scheduler_config(a.num_train_timesteps, a.beta_start, a.beta_end, a.beta_schedule, a.clip_sample,
                                 a.clip_sample_range, a.set_alpha_to_one, a.steps_offset, a.timestep_spacing)
    vcfg = None
    if a.vae:
        vcfg = make_vae_config(parse_ints(a.vae_block_out_channels, "--vae-block-out-channels"),
                               a.vae_layers_per_block, a.vae_norm_num_groups, a.in_channels, a.vae_scaling_factor,
                               mid_block_add_attention=a.vae_mid_attention)
    write_model(a.dir, tcfg, scfg, a.seed, vcfg, a.vae_seed)
    print(json.dumps({"dir": a.dir, "transformer": tcfg, "scheduler": scfg, "vae": vcfg}))


def parse_ints(text, flag):
    try:
        vals = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        fail(f"{flag} must be comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        fail(f"{flag} must list positive integers, got {text!r}")
    return vals


def parse_classes(text):
    try:
        vals = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        fail(f"--classes must be comma-separated integers, got {text!r}")
    if not vals:
        fail(f"--classes is empty ({text!r})")
    return vals


def cmd_run(a):
    if a.steps < 1:
        fail(f"--steps must be >= 1, got {a.steps}")
    model, sched = load_pipeline(a.dir, a.dtype)
    r = run_pipeline(model, sched, parse_classes(a.classes), a.steps, a.guidance, a.seed)
    tensors = {k: r[k] for k in ("latents_init", "timesteps", "class_labels", "latents_step", "eps_step0",
                                 "model_out_step0")}
    vae = load_vae(a.dir)
    if vae is not None:
        tensors["images"], tensors["decoded"] = decode_latents(vae, r["latents_step"][-1])
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    st.save(a.out + ".safetensors.tmp", tensors)
    os.replace(a.out + ".safetensors.tmp", a.out + ".safetensors")
    meta = {"timesteps": [int(t) for t in r["timesteps"]], "alphas_cumprod_t": r["alphas_cumprod_t"],
            "alphas_cumprod_prev": r["alphas_cumprod_prev"], "prev_timesteps": r["prev_timesteps"],
            "config": {"transformer": model.cfg, "scheduler": sched.cfg,
                       "run": {"classes": [int(c) for c in r["class_labels"]], "steps": a.steps,
                               "guidance": a.guidance, "seed": a.seed, "dtype": a.dtype, "cfg": r["cfg"],
                               "null_class": r["null_class"]}}}
    if vae is not None:
        meta["config"]["vae"] = vae.cfg
    _atomic_write_bytes(a.out + ".json", json.dumps(meta).encode())
    print(json.dumps({"timesteps": meta["timesteps"], "shapes": {k: list(v.shape) for k, v in tensors.items()},
                      "latents_out_std": float(r["latents_step"][-1].std())}))


def _check(cond, msg):
    if not cond:
        raise AssertionError(msg)


def cmd_selftest(a):
    # (1) embeddings against direct loops (math in float64)
    dim, grid = 32, 4
    pos = sincos_pos_embed_2d(dim, grid)
    q = dim // 4
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            for kk in range(q):
                w = 1.0 / 10000.0 ** (kk / q)
                ref = (math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w))
                got = [float(pos[i * grid + j, s * q + kk]) for s in range(4)]
                worst = max(worst, max(abs(x - y) for x, y in zip(got, ref)))
    _check(worst < 1e-6, f"pos embed vs loops: max |diff| {worst}")
    ts = torch.tensor([0, 1, 37, 500, 999], dtype=torch.int64)
    te = timestep_embedding(ts)
    worst_t = 0.0
    for r, t in enumerate(ts.tolist()):
        for kk in range(128):
            f = math.exp(-math.log(10000.0) * kk / 127)
            worst_t = max(worst_t, abs(float(te[r, kk]) - math.cos(t * f)), abs(float(te[r, 128 + kk]) - math.sin(t * f)))
    _check(worst_t < 5e-4, f"timestep embedding vs loops: max |diff| {worst_t}")
    print(f"(1) pos embed max |diff| {worst:.2g}, timestep embedding max |diff| {worst_t:.2g}")

    # (2) DDIM step against the closed form with float64 alphas
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    eps = torch.randn(2, 4, 8, 8, generator=gen) * 2.0
    worst_d = 0.0
    clipped_any = False
    for one in (True, False):
        for clip, rng in ((True, 1.0), (True, 2.5), (False, 1.0)):
            scfg = make_scheduler_config(clip_sample=clip, clip_sample_range=rng, set_alpha_to_one=one)
            s = DDIM(scfg)
            s.set_timesteps(4)
            big_t = 1000
            ac = []
            prod = 1.0
            for n in range(big_t):
                prod *= 1.0 - (0.0001 + (0.02 - 0.0001) * n / (big_t - 1))
                ac.append(prod)
            rel = max(abs(float(s.alphas_cumprod[n]) - ac[n]) / ac[n] for n in range(big_t))
            _check(rel < 2e-5, f"alphas_cumprod vs float64 product: max rel diff {rel}")
            for t in s.timesteps.tolist():
                prev = t - big_t // 4
                a_t = ac[t]
                a_p = ac[prev] if prev >= 0 else (1.0 if one else ac[0])
                xd, ed = x.double(), eps.double()
                x0 = (xd - math.sqrt(1 - a_t) * ed) / math.sqrt(a_t)
                if clip:
                    clipped_any = clipped_any or bool((x0.abs() > rng).any())
                    x0 = x0.clamp(-rng, rng)
                ref = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * ed
                got = s.step(eps, torch.tensor(t), x)
                worst_d = max(worst_d, float((got.double() - ref).abs().max()))
    _check(clipped_any, "DDIM check never exercised clipping")
    _check(worst_d < 1e-4, f"DDIM step vs closed form: max |diff| {worst_d}")
    print(f"(2) DDIM step vs closed form max |diff| {worst_d:.2g}")

    # (3) timestep lists, hand-computed (T = 1000)
    def ts_of(spacing, n, offset=0):
        return DDIM(make_scheduler_config(timestep_spacing=spacing, steps_offset=offset)).set_timesteps(n).tolist()
    cases = [
        (("leading", 4), [750, 500, 250, 0]),
        (("leading", 4, 1), [751, 501, 251, 1]),
        (("trailing", 4), [999, 749, 499, 249]),
        (("linspace", 4), [999, 666, 333, 0]),
        (("trailing", 3), [999, 666, 332]),   # round(1000 - 333.33 k) - 1
        (("leading", 50), list(range(980, -1, -20))),
        (("trailing", 50), list(range(999, 18, -20))),
        (("linspace", 50), [(2 * 999 * kk + 49) // 98 for kk in range(49, -1, -1)]),  # round(999 k / 49)
    ]
    for args, want in cases:
        got = ts_of(*args)
        _check(got == want, f"timesteps {args}: got {got}, expected {want}")
    lin50 = ts_of("linspace", 50)
    _check(lin50[:3] == [999, 979, 958] and lin50[-3:] == [41, 20, 0], f"linspace 50 ends: {lin50}")
    s = DDIM(make_scheduler_config(timestep_spacing="trailing"))
    s.set_timesteps(4)
    _check([s.prev_timestep(t) for t in s.timesteps] == [749, 499, 249, -1], "trailing prev timesteps")
    print("(3) timestep lists ok")

    # (4)/(5) the model
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = make_transformer_config()
        write_model(tmp, tcfg, make_scheduler_config(), seed=0)
        model, sched = load_pipeline(tmp)
        names = list(model.state_dict().keys())
        _check(names == expected_names(model.cfg), f"state-dict names differ: {names}")
        saved = st.load(os.path.join(tmp, "transformer", kTransformerFile))
        _check(sorted(saved) == sorted(expected_names(model.cfg)), "saved names differ")
        xin = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            base = model(xin, torch.tensor([999, 999, 999]), torch.tensor([3, 3, 3]))
            by_class = model(xin, torch.tensor([999, 999, 999]), torch.tensor([7, 7, 10]))
            by_time = model(xin, torch.tensor([500, 0, 250]), torch.tensor([3, 3, 3]))
        dcs = [float((base[i] - by_class[i]).abs().max()) for i in range(3)]
        dts = [float((base[i] - by_time[i]).abs().max()) for i in range(3)]
        std = float(base.std())
        _check(min(dcs) > 1e-2, f"output barely depends on the class: max |diff| per row {dcs}")
        _check(min(dts) > 1e-2, f"output barely depends on the timestep: max |diff| per row {dts}")
        _check(0.1 < std < 10, f"output std {std} is not O(1)")
        print(f"(4) class changes {[round(v, 3) for v in dcs]}, timestep changes {[round(v, 3) for v in dts]}, "
              f"output std {std:.3g}")
        plain = run_pipeline(model, sched, [3, 7], 4, 1.0, 0)
        forced = run_pipeline(model, sched, [3, 7], 4, 1.0, 0, force_cfg=True)
        _check(not plain["cfg"] and forced["cfg"], "cfg flags")
        d5 = float((plain["latents_step"] - forced["latents_step"]).abs().max())
        _check(d5 < 1e-5, f"cfg at guidance 1 vs the conditional run: max |diff| {d5}")
        guided = run_pipeline(model, sched, [3, 7], 4, 4.0, 0)
        dg = float((guided["latents_step"][-1] - plain["latents_step"][-1]).abs().max())
        _check(dg > 1e-2, f"guidance 4 barely changes the output: max |diff| {dg}")
        _check(tuple(guided["model_out_step0"].shape) == (4, 8, 8, 8), "model_out_step0 shape")
        print(f"(5) cfg at guidance 1 vs conditional max |diff| {d5:.2g}; guidance 4 vs 1 differs by {dg:.3g}")
        _check(load_vae(tmp) is None, "a folder without vae/ has no VAE (run writes no images)")

    # (6) the VAE decoder: devpipe's formulations against torch's own ops, the names, the decode
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 16, 5, 6, generator=gen) * 3 + 1
    w, b = 1 + 0.1 * torch.randn(16, generator=gen), 0.1 * torch.randn(16, generator=gen)
    dgn = float((groupnorm_as_layer_norm(x, 4, w, b, kVaeEps) - F.group_norm(x, 4, w, b, kVaeEps)).abs().max())
    _check(dgn < 1e-5, f"GroupNorm as layer_norm vs F.group_norm: max |diff| {dgn}")
    _check(torch.equal(upsample_as_concat(x), F.interpolate(x, scale_factor=2.0, mode="nearest")),
           "nearest x2 by concatenation differs from F.interpolate")
    with tempfile.TemporaryDirectory() as tmp:
        vcfg = make_vae_config(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8)
        write_model(tmp, make_transformer_config(), make_scheduler_config(), 0, vcfg, vae_seed=3)
        vae = load_vae(tmp)
        saved = st.load(os.path.join(tmp, "vae", kVaeFile))
        _check(list(saved) == expected_vae_names(vae.cfg), f"VAE names differ from diffusers': {list(saved)}")
        no_attn = AutoencoderKL(check_vae_config(dict(vcfg, mid_block_add_attention=False), "selftest"))
        _check(list(no_attn.state_dict()) == expected_vae_names(no_attn.cfg), "VAE names without attention")
        # the mid-block attention against a direct float64 computation from its weights
        a = vae.decoder.mid_block.attentions[0]
        h = torch.randn(2, 64, 3, 4, generator=gen)
        hd = h.double()
        t = F.group_norm(hd, 8, a.group_norm.weight.double(), a.group_norm.bias.double(), kVaeEps)
        t = t.flatten(2).transpose(1, 2)
        lin = lambda m, v: v @ m.weight.double().T + m.bias.double()  # noqa: E731
        probs = torch.softmax(lin(a.to_q, t) @ lin(a.to_k, t).transpose(1, 2) / math.sqrt(64), dim=-1)
        ref = lin(a.to_out[0], probs @ lin(a.to_v, t)).transpose(1, 2).reshape(h.shape) + hd
        with torch.inference_mode():
            da = float((a(h).double() - ref).abs().max())
        _check(da < 1e-4, f"mid-block attention vs direct: max |diff| {da}")
        z = torch.randn(3, 4, 8, 8, generator=gen)
        images, decoded = decode_latents(vae, z)
        _check(tuple(images.shape) == (3, 3, 32, 32), f"images shape {tuple(images.shape)}")
        outside = float(((decoded / 2 + 0.5 < 0) | (decoded / 2 + 0.5 > 1)).float().mean())
        _check(0.01 < outside < 0.5, f"{outside:.3f} of the samples are clamped (want some, not most)")
        relu_clamp = F.relu(decoded / 2 + 0.5) - F.relu(decoded / 2 + 0.5 - 1)
        _check(torch.equal(relu_clamp, images), "relu(x) - relu(x - 1) differs from clamp(x, 0, 1)")
        other, _ = decode_latents(vae, z.flip(0))
        dz = float((other - images.flip(0)).abs().max())
        _check(dz < 1e-6 and float((other - images).abs().max()) > 0.1, "images do not follow their latents")
        std = float(decoded.std())
        _check(0.2 < std < 5, f"decoded std {std} is not O(1)")
        print(f"(6) GroupNorm max |diff| {dgn:.2g}, upsample exact, attention max |diff| {da:.2g}, decoded std "
              f"{std:.3g}, {100 * outside:.1f}% clamped")
    print("selftest ok")


def main():
    ap = argparse.ArgumentParser(description="Plain-PyTorch twin of diffusers' DiTPipeline (DiT + DDIM)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-model")
    w.add_argument("dir")
    w.add_argument("--heads", type=int, default=2)
    w.add_argument("--head-dim", type=int, default=16)
    w.add_argument("--in-channels", type=int, default=4)
    w.add_argument("--learned-sigma", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument("--layers", type=int, default=2)
    w.add_argument("--sample-size", type=int, default=8)
    w.add_argument("--patch", type=int, default=2)
    w.add_argument("--classes", type=int, default=10)
    w.add_argument("--norm-eps", type=float, default=1e-5)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--num-train-timesteps", type=int, default=1000)
    w.add_argument("--beta-start", type=float, default=0.0001)
    w.add_argument("--beta-end", type=float, default=0.02)
    w.add_argument("--beta-schedule", choices=["linear", "scaled_linear"], default="linear")
    w.add_argument("--clip-sample", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument("--clip-sample-range", type=float, default=1.0)
    w.add_argument("--timestep-spacing", choices=["leading", "trailing", "linspace"], default="leading")
    w.add_argument("--steps-offset", type=int, default=0)
    w.add_argument("--set-alpha-to-one", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument("--vae", action="store_true", help="also write vae/ (an AutoencoderKL)")
    w.add_argument("--vae-block-out-channels", default="32,64")
    w.add_argument("--vae-layers-per-block", type=int, default=1)
    w.add_argument("--vae-norm-num-groups", type=int, default=8)
    w.add_argument("--vae-scaling-factor", type=float, default=0.18215)
    w.add_argument("--vae-mid-attention", action=argparse.BooleanOptionalAction, default=True)
    w.add_argument("--vae-seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--classes", required=True, help="comma-separated class ids, e.g. 3,7")
    r.add_argument("--steps", type=int, required=True)
    r.add_argument("--guidance", type=float, default=4.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True, help="output prefix: PREFIX.safetensors and PREFIX.json")
    r.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    sub.add_parser("selftest")
    a = ap.parse_args()
    torch.set_num_threads(getattr(a, "threads", None) or os.cpu_count() or 1)
    if a.cmd == "write-model":
        cmd_write_model(a)
    elif a.cmd == "run":
        cmd_run(a)
    else:
        cmd_selftest(a)


if __name__ == "__main__":
    main()
