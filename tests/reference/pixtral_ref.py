"""Plain-PyTorch twin of Hugging Face's LlavaForConditionalGeneration with a Pixtral vision tower
(the architecture of mistral-community/pixtral-12b; tests/reference, Debian has no transformers).
The language model is llama_ref's LlamaForCausalLM twin (HF's MistralForCausalLM computes the
same with sliding_window null).

State-dict names, layout `hub` (mistral-community/pixtral-12b on the Hub; the default):
  vision_tower.patch_conv.weight                                  [vh, 3, ps, ps]   (no bias)
  vision_tower.ln_pre.weight                                      [vh]              RMSNorm
  vision_tower.transformer.layers.N.attention_norm.weight         [vh]              RMSNorm
  vision_tower.transformer.layers.N.attention.{q,k,v,o}_proj.weight [vh, vh]        (no biases)
  vision_tower.transformer.layers.N.ffn_norm.weight               [vh]              RMSNorm
  vision_tower.transformer.layers.N.feed_forward.{gate,up}_proj.weight [vi, vh]
  vision_tower.transformer.layers.N.feed_forward.down_proj.weight [vh, vi]
  multi_modal_projector.linear_1.{weight,bias}                    [th, vh], [th]
  multi_modal_projector.linear_2.{weight,bias}                    [th, th], [th]
  language_model.model.<llama_ref's names>                        e.g. language_model.model.layers.0.mlp.up_proj.weight
  language_model.lm_head.weight                                   [V, th]  (absent when text tie_word_embeddings)
Layout `new` (transformers >= 4.52 save_pretrained): model.vision_tower.*, model.multi_modal_projector.*,
  model.language_model.<llama names without "model.">, e.g. model.language_model.embed_tokens.weight,
  model.language_model.layers.0.mlp.up_proj.weight, model.language_model.norm.weight; lm_head.weight.
Loading detects the layout from the names (model.vision_tower.* -> new).

config.json: {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
  "image_token_index", "projector_hidden_act": "gelu", "vision_feature_layer",
  "vision_feature_select_strategy": "full"|"default", "multimodal_projector_bias": true, "torch_dtype",
  "text_config": llama_ref.make_config(...) with model_type "mistral", architectures
  ["MistralForCausalLM"], sliding_window null,
  "vision_config": {"model_type": "pixtral", "hidden_size", "intermediate_size", "num_hidden_layers",
  "num_attention_heads", "num_channels": 3, "image_size", "patch_size", "hidden_act", "rope_theta",
  "head_dim", "attention_dropout": 0.0}}

Semantics (as HF's modeling_pixtral.py / modeling_llava.py):
  Vision tower. All norms RMSNorm with eps 1e-5 (HF hard-codes it), computed as llama_ref's. Each
  image [3, H, W] (H, W multiples of patch_size ps, <= image_size) -> patch_conv (stride ps) ->
  [h*w, vh] row-major patches (patch (i, j) is row i*w + j). HF's form (vision_forward_hf): all
  images' patches concatenated into one sequence [1, sum P_k, vh], ln_pre, then layers
  x = x + attn(attention_norm(x)); x = x + ffn(ffn_norm(x)), ffn = down(act(gate(x)) * up(x)),
  act = hidden_act ("gelu": exact erf GELU, "silu"), with a block-diagonal additive mask (finfo.min
  outside a patch's own image). Attention: heads of head_dim = vh / heads, 2D rope on q and k in the
  rotate-half convention (q*cos + rotate_half(q)*sin), scores q@k^T * head_dim^-0.5 + mask, softmax
  in float32, o_proj. 2D rope: M = image_size // ps, freqs[k] = rope_theta^(-2k/head_dim)
  (k < head_dim/2); the rotate-half pair k of patch (i, j) has angle i*freqs[2k] for
  k < n_h = ceil(head_dim/4) and j*freqs[2(k-n_h)+1] otherwise; cos/sin of cat(angle, angle) in
  float32, cast to the activation dtype. HF builds this as a table indexed by position id i*M + j;
  vision_forward_batched computes the same from the angles directly, per image, without a mask.
  hidden_states[0] = after ln_pre, hidden_states[l] = after layer l.
  Features. selected = hidden_states[vision_feature_layer] (python indexing; -1 = last layer's
  output), split per image; "full" keeps every patch, "default" drops the first patch of EACH
  image (note: HF's LlavaModel applies [:, 1:] to the concatenated list-form sequence, which drops
  only image 0's first patch and then fails to split; pixtral-12b uses "full"). image_features =
  linear_2(gelu(linear_1(selected))) (biases; gelu exact), one row per kept patch.
  Merge. inputs_embeds = embed_tokens(ids); the positions where ids == image_token_index are
  replaced in row-major order over [B, T] by the image features (masked_scatter), images in prompt
  order. Then llama_ref's causal LM on inputs_embeds (positions 0.. per sequence, right-padded batch,
  llama_ref's prefill masking), its KV cache, and llama_ref.generate()'s greedy/sampled decode
  (decode steps embed the new token ids).

Subcommands (run with the interpreter that has torch: /usr/bin/python3):

  write-model DIR [text: --hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2 --vocab 300
                   --max-pos 256 --eps 1e-5 --rope-theta 10000 --tie]
                  [vision: --vision-hidden 32 --vision-intermediate 64 --vision-layers 2 --vision-heads 2
                   --patch 4 --image-size 32 --vision-act gelu|silu --vision-rope-theta 10000]
                  [--image-token 10 --feature-layer -1 --strategy full|default --layout hub|new
                   --dtype float32|bfloat16 --seed 0]
      Writes DIR/config.json and DIR/model.safetensors (atomically: written beside, renamed) with
      random weights: the text model by llama_ref's "wide" init (logits std ~1), the vision tower
      and projector with projections normal(0, 1/sqrt(fan_in)) (patch_conv: fan_in = 3*ps*ps),
      norm weights uniform(0.8, 1.2), biases normal(0, 0.1), so image features are O(1).

  run DIR --prompts "1,img,17,42;1,5,img,9" --image-hw 16x24 --max-new-tokens N --out PREFIX
          [--greedy | --temperature T --top-k K --top-p P --seed S] [--image-seed 0] [--ignore-eos]
          [--threads N] [--dtype float32|bfloat16]
      One image per prompt, all H x W: pixel_values = torch.randn(B, 3, H, W) from a torch.Generator
      seeded by --image-seed (float32; cast to the model dtype at patch_conv). Each prompt holds
      exactly one "img" item (and no literal image_token_index), expanded to P' copies of
      image_token_index, P' = (H/ps)*(W/ps) ("full") or that minus 1 ("default"). The vision tower
      runs in HF's list form (one list entry per image), then the projector, the merge and
      llama_ref's generation (sampling as llama_ref run). Writes PREFIX.safetensors:
        pixel_values        F32 [B, 3, H, W]
        prompt_ids          I64 [B, Tmax]      expanded ids, right-padded with -1
        prompt_lengths      I64 [B]            expanded lengths
        image_features      F32 [B, P', th]    projector output, image b's rows
        prefill_logits      F32 [B, Tmax, V]   rows >= length are 0
        prefill_last_logits F32 [B, V]
        decode_logits       F32 [S, B, V]      S = N - 1; as llama_ref run
        decode_active       I64 [S, B]
        generated           I64 [B, N]         -1 after a sequence stopped
      and PREFIX.json {"generated", "prompt_lengths", "image_tokens_per_image": P', "image_hw",
      "image_seed", "dtype", "sampling", "stop_at_eos", "config"}. Computed in --dtype (default:
      the config's torch_dtype), stored as float32.

  selftest
      float32, atol 1e-4: (1) the batched vision form (images as a batch [B, P, vh], no mask, cos/sin
      from the 2D angles: devpipe's form) equals HF's list form per image in every hidden state, and
      two images of different sizes in one list equal each run alone; (2) the merged prefill plus
      cached decode logits equal a full recompute without cache of each merged sequence (image
      features from that image alone); (3) replacing one image changes its prompt's logits by
      > 1e-2; (4) hub and new layouts (tied and untied) hold exactly the documented names with the
      same tensors, and both load to the same outputs; --strategy default gives P-1 features per
      image; the run command's files hold the documented keys and shapes; (5) greedy ids are not
      degenerate.

Also importable: make_config(...), write_model(DIR, cfg, seed, layout), load_model(DIR, dtype) ->
LlavaForConditionalGeneration, run_batch(model, prompts_with_img, pixel_values, ...).
"""
import argparse
import json
import math
import os
import sys
import tempfile

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref  # noqa: E402
import st  # noqa: E402

_DTYPES = llama_ref._DTYPES
_VISION_EPS = 1e-5  # HF's Pixtral hard-codes the RMSNorm eps
_ACTS = {"gelu": F.gelu, "silu": F.silu}  # gelu: exact (erf), as HF's ACT2FN["gelu"]
_STRATEGIES = ("full", "default")
_LAYOUTS = ("hub", "new")
IMG = "img"


class PixtralError(ValueError):
    pass


# --- config --------------------------------------------------------------------------------

def make_config(text=None, vision_hidden=32, vision_intermediate=64, vision_layers=2, vision_heads=2,
                patch=4, image_size=32, vision_act="gelu", vision_rope_theta=10000.0, image_token=10,
                feature_layer=-1, strategy="full", dtype="float32"):
    text = dict(text or llama_ref.make_config(dtype=dtype))
    text.update({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None,
                 "torch_dtype": dtype})
    cfg = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_token,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": feature_layer,
        "vision_feature_select_strategy": strategy,
        "multimodal_projector_bias": True,
        "torch_dtype": dtype,
        "text_config": text,
        "vision_config": {
            "model_type": "pixtral",
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": vision_heads,
            "num_channels": 3,
            "image_size": image_size,
            "patch_size": patch,
            "hidden_act": vision_act,
            "rope_theta": float(vision_rope_theta),
            "head_dim": vision_hidden // vision_heads if vision_heads > 0 else 0,
            "attention_dropout": 0.0,
        },
    }
    check_config(cfg)
    return cfg


def check_config(cfg):
    v, t = cfg["vision_config"], cfg["text_config"]
    hid, heads = v["hidden_size"], v["num_attention_heads"]
    if heads <= 0 or hid % heads != 0:
        raise PixtralError(f"vision hidden_size {hid} is not a multiple of num_attention_heads {heads}")
    hd = v.get("head_dim") or hid // heads
    if hd != hid // heads:
        raise PixtralError(f"vision head_dim {hd} != hidden_size // num_attention_heads = {hid // heads} "
                           f"(HF's PixtralAttention uses the latter, its rope the former)")
    if hd % 2 != 0:
        raise PixtralError(f"vision head_dim {hd} must be even for the 2D rotary embedding")
    if v["hidden_act"] not in _ACTS:
        raise PixtralError(f"vision hidden_act {v['hidden_act']!r} is not one of {sorted(_ACTS)}")
    if cfg["projector_hidden_act"] not in _ACTS:
        raise PixtralError(f"projector_hidden_act {cfg['projector_hidden_act']!r} is not one of {sorted(_ACTS)}")
    if v["patch_size"] <= 0 or v["image_size"] % v["patch_size"] != 0:
        raise PixtralError(f"vision image_size {v['image_size']} is not a multiple of patch_size {v['patch_size']}")
    if cfg["vision_feature_select_strategy"] not in _STRATEGIES:
        raise PixtralError(f"vision_feature_select_strategy {cfg['vision_feature_select_strategy']!r} is not "
                           f"one of {list(_STRATEGIES)}")
    n = v["num_hidden_layers"]
    fl = cfg["vision_feature_layer"]
    if not isinstance(fl, int) or not -(n + 1) <= fl <= n:
        raise PixtralError(f"vision_feature_layer {fl!r} outside [-{n + 1}, {n}] (hidden states of "
                           f"{n} layers plus ln_pre)")
    if not 0 <= cfg["image_token_index"] < t["vocab_size"]:
        raise PixtralError(f"image_token_index {cfg['image_token_index']} outside the vocabulary "
                           f"[0, {t['vocab_size']})")


# --- vision tower --------------------------------------------------------------------------

def vision_freqs(vcfg):
    hd = vcfg.get("head_dim") or vcfg["hidden_size"] // vcfg["num_attention_heads"]
    return hd, 1.0 / (vcfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))


def rope_table_hf(vcfg):
    """HF's PixtralRotaryEmbedding.inv_freq: [M*M, head_dim], row = position id i*M + j."""
    hd, freqs = vision_freqs(vcfg)
    m = vcfg["image_size"] // vcfg["patch_size"]
    fh = torch.outer(torch.arange(m).float(), freqs[::2])
    fw = torch.outer(torch.arange(m).float(), freqs[1::2])
    inv = torch.cat([fh[:, None, :].repeat(1, m, 1), fw[None, :, :].repeat(m, 1, 1)], dim=-1).reshape(-1, hd // 2)
    return torch.cat((inv, inv), dim=-1)


def position_ids_hf(h, w, m):
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (i * m + j).reshape(-1)


def rope_2d_direct(vcfg, h, w, dtype):
    """cos, sin [h*w, head_dim] from the angles: pair k at patch (i, j) turns by i*freqs[2k] for
    k < n_h = ceil(head_dim/4), by j*freqs[2(k-n_h)+1] otherwise (no table, no position ids)."""
    hd, freqs = vision_freqs(vcfg)
    n_h = (hd // 2 + 1) // 2
    i, j = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    i, j = i.reshape(-1, 1), j.reshape(-1, 1)
    k = torch.arange(hd // 2)
    ang = torch.where(k < n_h, i * freqs[(2 * k).clamp(max=hd // 2 - 1)],
                      j * freqs[(2 * (k - n_h) + 1).clamp(min=0, max=hd // 2 - 1)])
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class PixtralAttention(nn.Module):
    def __init__(self, vcfg):
        super().__init__()
        hid = vcfg["hidden_size"]
        self.heads = vcfg["num_attention_heads"]
        self.d = hid // self.heads
        self.q_proj = nn.Linear(hid, hid, bias=False)
        self.k_proj = nn.Linear(hid, hid, bias=False)
        self.v_proj = nn.Linear(hid, hid, bias=False)
        self.o_proj = nn.Linear(hid, hid, bias=False)

    def forward(self, x, cos, sin, mask=None):
        """x [B, P, hid]; cos/sin [P, d] (or [B, 1, P, d]); mask additive [B, 1, P, P] or None."""
        b, p, _ = x.shape
        q = self.q_proj(x).view(b, p, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, p, self.heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, p, self.heads, self.d).transpose(1, 2)
        q = llama_ref.apply_rope(q, cos, sin)
        k = llama_ref.apply_rope(k, cos, sin)
        w = torch.matmul(q, k.transpose(2, 3)) * self.d**-0.5
        if mask is not None:
            w = w + mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).transpose(1, 2).reshape(b, p, self.heads * self.d)
        return self.o_proj(o)


class PixtralMLP(nn.Module):
    def __init__(self, vcfg):
        super().__init__()
        hid, inter = vcfg["hidden_size"], vcfg["intermediate_size"]
        self.gate_proj = nn.Linear(hid, inter, bias=False)
        self.up_proj = nn.Linear(hid, inter, bias=False)
        self.down_proj = nn.Linear(inter, hid, bias=False)
        self.act = _ACTS[vcfg["hidden_act"]]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PixtralLayer(nn.Module):
    def __init__(self, vcfg):
        super().__init__()
        self.attention_norm = llama_ref.RMSNorm(vcfg["hidden_size"], _VISION_EPS)
        self.attention = PixtralAttention(vcfg)
        self.ffn_norm = llama_ref.RMSNorm(vcfg["hidden_size"], _VISION_EPS)
        self.feed_forward = PixtralMLP(vcfg)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, vcfg):
        super().__init__()
        self.layers = nn.ModuleList([PixtralLayer(vcfg) for _ in range(vcfg["num_hidden_layers"])])


class PixtralVisionModel(nn.Module):
    def __init__(self, vcfg):
        super().__init__()
        self.cfg = vcfg
        ps = vcfg["patch_size"]
        self.patch_conv = nn.Conv2d(vcfg["num_channels"], vcfg["hidden_size"], kernel_size=ps, stride=ps, bias=False)
        self.ln_pre = llama_ref.RMSNorm(vcfg["hidden_size"], _VISION_EPS)
        self.transformer = PixtralTransformer(vcfg)

    def _check_image(self, k, img):
        c, ps, size = self.cfg["num_channels"], self.cfg["patch_size"], self.cfg["image_size"]
        if img.dim() != 3 or img.shape[0] != c:
            raise PixtralError(f"image {k}: shape {tuple(img.shape)}, expected [{c}, H, W]")
        h, w = img.shape[1:]
        if h % ps or w % ps or not 0 < h <= size or not 0 < w <= size:
            raise PixtralError(f"image {k}: size {h}x{w} must be multiples of patch_size {ps} in (0, {size}]")

    def _patches(self, img):
        """[C, H, W] -> (patch embeddings [h*w, hid] row-major, h, w)."""
        e = self.patch_conv(img[None].to(self.patch_conv.weight.dtype))[0]
        return e.flatten(1).T, e.shape[1], e.shape[2]

    def vision_forward_hf(self, images):
        """HF's PixtralVisionModel.forward on a LIST of images [C, H_k, W_k]: one sequence
        [1, sum P_k, hid], block-diagonal mask, position ids i*M + j into the rope table.
        Returns (hidden_states list of [1, sum P_k, hid] (num_layers + 1), sizes [P_k])."""
        for k, img in enumerate(images):
            self._check_image(k, img)
        parts = [self._patches(img) for img in images]
        x = self.ln_pre(torch.cat([p[0] for p in parts], dim=0)[None])
        m = self.cfg["image_size"] // self.cfg["patch_size"]
        pos = torch.cat([position_ids_hf(h, w, m) for _, h, w in parts])
        table = rope_table_hf(self.cfg)[pos]
        cos, sin = table.cos().to(x.dtype), table.sin().to(x.dtype)
        sizes = [h * w for _, h, w in parts]
        n = sum(sizes)
        mask = torch.full((n, n), torch.finfo(x.dtype).min, dtype=x.dtype)
        start = 0
        for s in sizes:
            mask[start:start + s, start:start + s] = 0
            start += s
        mask = mask[None, None]
        hs = [x]
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, mask)
            hs.append(x)
        return hs, sizes

    def vision_forward_batched(self, pixel_values):
        """devpipe's form: pixel_values [B, C, H, W] (one size) as a batch [B, P, hid], no mask,
        cos/sin from the 2D angles directly. Returns hidden states list of [B, P, hid]."""
        for k in range(pixel_values.shape[0]):
            self._check_image(k, pixel_values[k])
        e = self.patch_conv(pixel_values.to(self.patch_conv.weight.dtype))
        b, _, h, w = e.shape
        x = self.ln_pre(e.flatten(2).transpose(1, 2))
        cos, sin = rope_2d_direct(self.cfg, h, w, x.dtype)
        hs = [x]
        for layer in self.transformer.layers:
            x = layer(x, cos, sin)
            hs.append(x)
        return hs


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        vh, th = cfg["vision_config"]["hidden_size"], cfg["text_config"]["hidden_size"]
        bias = cfg.get("multimodal_projector_bias", True)
        self.linear_1 = nn.Linear(vh, th, bias=bias)
        self.act = _ACTS[cfg["projector_hidden_act"]]
        self.linear_2 = nn.Linear(th, th, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.vision_tower = PixtralVisionModel(cfg["vision_config"])
        self.multi_modal_projector = LlavaMultiModalProjector(cfg)
        self.language_model = llama_ref.LlamaForCausalLM(cfg["text_config"])

    def state_dict_hub(self):
        sd = dict(self.state_dict())
        if self.cfg["text_config"]["tie_word_embeddings"]:
            sd.pop("language_model.lm_head.weight")
        return sd

    def tokens_per_image(self, h, w):
        ps = self.cfg["vision_config"]["patch_size"]
        p = (h // ps) * (w // ps)
        return p - 1 if self.cfg["vision_feature_select_strategy"] == "default" else p

    def image_features(self, images):
        """images: list of [C, H_k, W_k] -> list of [P'_k, text_hidden] (HF's list form)."""
        hs, sizes = self.vision_tower.vision_forward_hf(images)
        sel = hs[self.cfg["vision_feature_layer"]][0]
        per = list(torch.split(sel, sizes, dim=0))
        if self.cfg["vision_feature_select_strategy"] == "default":
            per = [p[1:] for p in per]
        return [self.multi_modal_projector(p) for p in per]

    def image_features_batched(self, pixel_values):
        """[B, C, H, W] -> [B, P', text_hidden] via the batched (devpipe) vision form."""
        sel = self.vision_tower.vision_forward_batched(pixel_values)[self.cfg["vision_feature_layer"]]
        if self.cfg["vision_feature_select_strategy"] == "default":
            sel = sel[:, 1:]
        return self.multi_modal_projector(sel)

    def merge(self, ids, features):
        """ids [B, T] (pads -1), features [N, th] with N = number of image tokens ->
        inputs_embeds [B, T, th] (HF's masked_scatter: row-major over [B, T])."""
        lm = self.language_model
        emb = lm.model.embed_tokens(ids.clamp(min=0))
        sel = ids == self.cfg["image_token_index"]
        n = int(sel.sum())
        if n != features.shape[0]:
            raise PixtralError(f"{n} image tokens in the prompts but {features.shape[0]} image feature rows")
        return emb.masked_scatter(sel[..., None].expand_as(emb), features.to(emb.dtype))


def hub_to_new(name):
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    if name == "language_model.lm_head.weight":
        return "lm_head.weight"
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "model." + name
    raise PixtralError(f"unexpected state-dict name {name!r}")


def new_to_hub(name):
    if name.startswith("model.language_model."):
        return "language_model.model." + name[len("model.language_model."):]
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
        return name[len("model."):]
    raise PixtralError(f"unexpected state-dict name {name!r} in a 'new'-layout checkpoint")


# --- I/O -----------------------------------------------------------------------------------

def init_random(model, seed):
    """Text model: llama_ref's wide init. Vision tower + projector: projections normal(0,
    1/sqrt(fan_in)), norm weights uniform(0.8, 1.2), biases normal(0, 0.1)."""
    llama_ref.init_random(model.language_model, seed, "wide")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.state_dict_hub().items():
            if name.startswith("language_model."):
                continue
            if name.endswith("norm.weight") or name.endswith("ln_pre.weight"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.8)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def write_model(out, cfg, seed=0, layout="hub"):
    """Writes config.json and model.safetensors (layout hub|new); returns the float32 model."""
    if layout not in _LAYOUTS:
        raise PixtralError(f"layout {layout!r} is not one of {list(_LAYOUTS)}")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    init_random(model, seed)
    dt = _DTYPES[cfg["torch_dtype"]]
    sd = {(k if layout == "hub" else hub_to_new(k)): v.to(dt) for k, v in model.state_dict_hub().items()}
    path = os.path.join(out, "model.safetensors")
    st.save(path + ".tmp", sd, {"format": "pt"})
    os.replace(path + ".tmp", path)
    llama_ref._atomic_write_bytes(os.path.join(out, "config.json"), json.dumps(cfg, indent=2).encode())
    return model


def load_config(folder):
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise PixtralError(f"{folder} has no config.json")
    with open(path) as f:
        return json.load(f)


def read_state_dict_hub(folder):
    """The folder's tensors under hub names (a new-layout checkpoint is renamed), and its layout."""
    sd = llama_ref.read_state_dict(folder)
    if any(k.startswith("model.vision_tower.") for k in sd):
        return {new_to_hub(k): v for k, v in sd.items()}, "new"
    return sd, "hub"


def load_model(folder, dtype=None):
    cfg = load_config(folder)
    dt = _DTYPES[dtype or cfg.get("torch_dtype", "float32")]
    model = LlavaForConditionalGeneration(cfg)
    sd, _ = read_state_dict_hub(folder)
    if cfg["text_config"]["tie_word_embeddings"]:
        sd["language_model.lm_head.weight"] = sd["language_model.model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.to(dt).eval()


# --- running -------------------------------------------------------------------------------

def parse_prompts(text):
    """'1,img,17;5,img' -> lists whose items are ints or IMG."""
    prompts = []
    for i, part in enumerate(text.split(";")):
        part = part.strip()
        if not part:
            raise PixtralError(f"--prompts: sequence {i} is empty in {text!r}")
        items = []
        for x in part.split(","):
            x = x.strip()
            if x == IMG:
                items.append(IMG)
                continue
            try:
                items.append(int(x))
            except ValueError:
                raise PixtralError(f"--prompts: sequence {i} ({part!r}): item {x!r} is neither an integer nor "
                                   f"{IMG!r}")
        prompts.append(items)
    return prompts


def parse_hw(text):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise PixtralError(f"--image-hw {text!r} is not HxW (e.g. 16x24)")
    return h, w


def expand_prompts(cfg, prompts, n_img_tokens):
    tok = cfg["image_token_index"]
    out = []
    for i, p in enumerate(prompts):
        n = sum(1 for x in p if x == IMG)
        if n != 1:
            raise PixtralError(f"prompt {i}: {n} {IMG!r} items, expected exactly 1 (one image per prompt)")
        if tok in p:
            raise PixtralError(f"prompt {i}: holds the image token id {tok} itself; write {IMG!r} instead")
        e = []
        for x in p:
            e.extend([tok] * n_img_tokens if x == IMG else [x])
        out.append(e)
    return out


def run_batch(model, prompts, pixel_values, max_new_tokens, greedy=True, temperature=1.0, top_k=0, top_p=1.0,
              seed=0, stop_at_eos=True):
    """prompts: lists of ints with one IMG each; pixel_values [B, 3, H, W]. Returns llama_ref's
    generate() dict plus image_features [B, P', th] (float32) and the expanded prompts."""
    b = len(prompts)
    if pixel_values.dim() != 4 or pixel_values.shape[0] != b:
        raise PixtralError(f"pixel_values shape {tuple(pixel_values.shape)}, expected [{b}, 3, H, W] "
                           f"(one image per prompt)")
    h, w = pixel_values.shape[2:]
    n_tok = model.tokens_per_image(h, w)
    expanded = expand_prompts(model.cfg, prompts, n_tok)
    ids, _ = llama_ref.pad_prompts(expanded)
    with torch.inference_mode():
        feats = model.image_features([pixel_values[k] for k in range(b)])
        embeds = model.merge(ids, torch.cat(feats, dim=0))
    try:
        r = llama_ref.generate(model.language_model, expanded, max_new_tokens, greedy, temperature, top_k, top_p,
                               seed, stop_at_eos=stop_at_eos, inputs_embeds=embeds)
    except ValueError as e:
        raise PixtralError(str(e))
    r["image_features"] = torch.stack(feats).to(torch.float32)
    r["expanded"] = expanded
    r["image_tokens_per_image"] = n_tok
    return r


def image_pixels(b, h, w, seed):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


_RUN_KEYS = ("pixel_values", "prompt_ids", "prompt_lengths", "image_features", "prefill_logits",
             "prefill_last_logits", "decode_logits", "decode_active", "generated")


def cmd_write_model(a):
    text = llama_ref.make_config(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.vocab, a.max_pos,
                                 a.rope_theta, a.eps, a.tie, a.dtype)
    cfg = make_config(text, a.vision_hidden, a.vision_intermediate, a.vision_layers, a.vision_heads, a.patch,
                      a.image_size, a.vision_act, a.vision_rope_theta, a.image_token, a.feature_layer, a.strategy,
                      a.dtype)
    write_model(a.dir, cfg, a.seed, a.layout)
    print(json.dumps({"dir": a.dir, "layout": a.layout, "config": cfg}))


def cmd_run(a):
    model = load_model(a.dir, a.dtype)
    prompts = parse_prompts(a.prompts)
    h, w = parse_hw(a.image_hw)
    v = model.cfg["vision_config"]
    ps, size = v["patch_size"], v["image_size"]
    if h % ps or w % ps or not 0 < h <= size or not 0 < w <= size:
        raise PixtralError(f"--image-hw {h}x{w}: H and W must be multiples of patch_size {ps} in (0, {size}]")
    try:
        samp = llama_ref.sampling_from_args(a)
    except ValueError as e:
        raise PixtralError(str(e))
    pixels = image_pixels(len(prompts), h, w, a.image_seed)
    r = run_batch(model, prompts, pixels, a.max_new_tokens, samp["greedy"], samp["temperature"], samp["top_k"],
                  samp["top_p"], a.seed, stop_at_eos=not a.ignore_eos)
    tensors = {"pixel_values": pixels}
    tensors.update({k: r[k] for k in _RUN_KEYS[1:-1]})
    tensors["generated"] = r["generated_tensor"]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    st.save(a.out + ".safetensors.tmp", tensors)
    os.replace(a.out + ".safetensors.tmp", a.out + ".safetensors")
    dtype = a.dtype or model.cfg.get("torch_dtype", "float32")
    meta = {"generated": r["generated"], "prompt_lengths": [len(p) for p in r["expanded"]],
            "image_tokens_per_image": r["image_tokens_per_image"], "image_hw": [h, w], "image_seed": a.image_seed,
            "dtype": dtype, "sampling": samp, "stop_at_eos": not a.ignore_eos, "config": model.cfg}
    llama_ref._atomic_write_bytes(a.out + ".json", json.dumps(meta).encode())
    print(json.dumps({"generated": r["generated"], "image_tokens_per_image": r["image_tokens_per_image"],
                      "shapes": {k: list(v.shape) for k, v in tensors.items()}}))


# --- selftest ------------------------------------------------------------------------------

def _maxdiff(a, b):
    return float((a.to(torch.float32) - b.to(torch.float32)).abs().max())


def _expected_names(cfg, layout):
    v, t = cfg["vision_config"], cfg["text_config"]
    names = ["vision_tower.patch_conv.weight", "vision_tower.ln_pre.weight"]
    for n in range(v["num_hidden_layers"]):
        p = f"vision_tower.transformer.layers.{n}."
        names += [p + "attention_norm.weight", p + "ffn_norm.weight"]
        names += [p + f"attention.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"feed_forward.{x}_proj.weight" for x in ("gate", "up", "down")]
    names += [f"multi_modal_projector.linear_{i}.{x}" for i in (1, 2) for x in ("weight", "bias")]
    names += ["language_model.model.embed_tokens.weight", "language_model.model.norm.weight"]
    for n in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{n}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if not t["tie_word_embeddings"]:
        names.append("language_model.lm_head.weight")
    if layout == "new":
        # spelled out, not via hub_to_new, so the test checks the documented names themselves
        ren = []
        for x in names:
            if x.startswith("language_model.model."):
                ren.append("model.language_model." + x[len("language_model.model."):])
            elif x == "language_model.lm_head.weight":
                ren.append("lm_head.weight")
            else:
                ren.append("model." + x)
        names = ren
    return set(names)


def cmd_selftest(a):
    atol = 1e-4
    text = llama_ref.make_config(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=300)
    prompts = [[1, IMG, 17, 42], [1, 5, IMG, 9, 33, 77, 4], [IMG, 250, 11]]
    hw = (16, 24)
    n_new = 10
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(text, vision_hidden=32, vision_intermediate=64, vision_layers=2, vision_heads=2,
                          patch=4, image_size=32, feature_layer=-1, strategy="full")
        d = os.path.join(tmp, "hub")
        write_model(d, cfg, seed=5, layout="hub")
        model = load_model(d)
        vt = model.vision_tower
        pixels = image_pixels(len(prompts), *hw, seed=0)

        # (1) batched (devpipe) vision form == HF list form, per image, every hidden state
        with torch.inference_mode():
            hs_list, sizes = vt.vision_forward_hf([pixels[k] for k in range(len(prompts))])
            hs_b = vt.vision_forward_batched(pixels)
            worst = 0.0
            for li in range(len(hs_list)):
                per = torch.split(hs_list[li][0], sizes, dim=0)
                for k in range(len(prompts)):
                    worst = max(worst, _maxdiff(per[k], hs_b[li][k]))
            spread = float(hs_b[-1].std())
            # two images of different sizes in one list == each alone
            img_a, img_b = torch.randn(3, 8, 32), torch.randn(3, 20, 12)
            hs_ab, sz_ab = vt.vision_forward_hf([img_a, img_b])
            hs_a, _ = vt.vision_forward_hf([img_a])
            hs_bb, _ = vt.vision_forward_hf([img_b])
            worst_mixed = 0.0
            for li in range(len(hs_ab)):
                pa, pb = torch.split(hs_ab[li][0], sz_ab, dim=0)
                worst_mixed = max(worst_mixed, _maxdiff(pa, hs_a[li][0]), _maxdiff(pb, hs_bb[li][0]))
            # the rope table and the direct angles agree, and the mask matters (cross-image leak check)
            m = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
            tab = rope_table_hf(cfg["vision_config"])[position_ids_hf(5, 6, m)]
            c_d, s_d = rope_2d_direct(cfg["vision_config"], 5, 6, torch.float32)
            worst_rope = max(_maxdiff(tab.cos(), c_d), _maxdiff(tab.sin(), s_d))
            feats_b = model.image_features_batched(pixels)
            feats_l = torch.stack(model.image_features([pixels[k] for k in range(len(prompts))]))
        assert worst <= atol, f"(1) batched vs HF list vision form: max |diff| {worst} > {atol}"
        assert worst_mixed <= atol, f"(1) mixed-size list vs each alone: max |diff| {worst_mixed} > {atol}"
        assert worst_rope <= 1e-6, f"(1) rope table vs direct 2D angles: max |diff| {worst_rope}"
        assert _maxdiff(feats_b, feats_l) <= atol, "(1) batched vs list image features differ"
        assert spread > 0.3, f"(1) vision output std {spread}: degenerate random tower"
        print(f"selftest (1) vision: batched vs HF list max |diff| {worst:.3g}, mixed sizes 8x32+20x12 vs alone "
              f"{worst_mixed:.3g}, rope table vs angles {worst_rope:.3g} (<= {atol}); output std {spread:.3g}")

        # (2) merged prefill + cached decode == full recompute of each merged sequence
        r = run_batch(model, prompts, pixels, n_new, stop_at_eos=False)
        n_tok = r["image_tokens_per_image"]
        assert n_tok == (hw[0] // 4) * (hw[1] // 4), n_tok
        worst = 0.0
        with torch.inference_mode():
            for i in range(len(prompts)):
                seq = torch.tensor([r["expanded"][i] + r["generated"][i]])
                f_alone = model.image_features([pixels[i]])[0]
                emb = model.merge(seq, f_alone)
                full = model.language_model.forward_full(seq, inputs_embeds=emb)[0].to(torch.float32)
                n = len(r["expanded"][i])
                worst = max(worst, _maxdiff(full[:n], r["prefill_logits"][i, :n]))
                worst = max(worst, _maxdiff(full[n - 1], r["prefill_last_logits"][i]))
                for s in range(n_new - 1):
                    worst = max(worst, _maxdiff(full[n + s], r["decode_logits"][s, i]))
                assert torch.equal(torch.argmax(full[n - 1:n - 1 + n_new], -1), torch.tensor(r["generated"][i])), \
                    f"(2) greedy ids differ from the recompute's for prompt {i}"
                assert float(r["prefill_logits"][i, n:].abs().sum()) == 0, f"(2) padded rows of prompt {i} not 0"
        assert worst <= atol, f"(2) cache vs recompute: max |diff| {worst} > {atol}"
        print(f"selftest (2) merged prefill + decode vs full recompute: max |diff| {worst:.3g} (<= {atol}); "
              f"{n_tok} image tokens per image, lengths {r['prompt_lengths'].tolist()}")

        # (3) the image matters: replace image 1 by another random image
        other = pixels.clone()
        other[1] = torch.randn(3, *hw, generator=torch.Generator().manual_seed(99))
        r2 = run_batch(model, prompts, other, 1, stop_at_eos=False)
        n1 = len(r["expanded"][1])
        d_img = _maxdiff(r2["prefill_logits"][1, :n1], r["prefill_logits"][1, :n1])
        d_last = _maxdiff(r2["prefill_last_logits"][1], r["prefill_last_logits"][1])
        d_same = _maxdiff(r2["prefill_logits"][0], r["prefill_logits"][0])
        assert d_img > 1e-2 and d_last > 1e-2, f"(3) another image changes the logits only by {d_img} (last {d_last})"
        assert d_same <= atol, f"(3) replacing image 1 changed prompt 0's logits by {d_same} (images leak)"
        print(f"selftest (3) other image: prompt 1 logits change max {d_img:.3g} (last row {d_last:.3g}) > 1e-2; "
              f"prompt 0 unchanged ({d_same:.3g})")

        # (4) layouts: documented names, same tensors, same outputs; strategy default; run's files
        for tie in (False, True):
            tcfg = make_config(dict(text, tie_word_embeddings=tie), vision_layers=2, feature_layer=-2)
            sds = {}
            for layout in _LAYOUTS:
                dl = os.path.join(tmp, f"{layout}_tie{int(tie)}")
                write_model(dl, tcfg, seed=7, layout=layout)
                raw = st.load(os.path.join(dl, "model.safetensors"))
                want = _expected_names(tcfg, layout)
                assert set(raw) == want, (f"(4) layout {layout} tie={tie}: names differ: extra "
                                          f"{sorted(set(raw) - want)}, missing {sorted(want - set(raw))}")
                sd, detected = read_state_dict_hub(dl)
                assert detected == layout, f"(4) layout {layout} detected as {detected}"
                sds[layout] = sd
            for k, v in sds["hub"].items():
                assert torch.equal(v, sds["new"][k]), f"(4) tensor {k} differs between layouts"
            outs = [run_batch(load_model(os.path.join(tmp, f"{lay}_tie{int(tie)}")), prompts[:2], pixels[:2], 3,
                              stop_at_eos=False) for lay in _LAYOUTS]
            assert _maxdiff(outs[0]["decode_logits"], outs[1]["decode_logits"]) == 0
            assert _maxdiff(outs[0]["image_features"], outs[1]["image_features"]) == 0
            assert outs[0]["generated"] == outs[1]["generated"]
        dcfg = make_config(text, strategy="default")
        dd = os.path.join(tmp, "default")
        write_model(dd, dcfg, seed=5, layout="new")
        rd = run_batch(load_model(dd), prompts, pixels, 2, stop_at_eos=False)
        p_full = (hw[0] // 4) * (hw[1] // 4)
        assert rd["image_tokens_per_image"] == p_full - 1
        assert tuple(rd["image_features"].shape) == (len(prompts), p_full - 1, text["hidden_size"])
        assert [len(e) for e in rd["expanded"]] == [len(p) - 1 + p_full - 1 for p in prompts]
        with torch.inference_mode():
            fd = load_model(dd).image_features_batched(pixels)
        assert _maxdiff(fd, rd["image_features"]) <= atol, "(4) default strategy: batched vs list features differ"
        # the run command end to end
        prefix = os.path.join(tmp, "out", "run")
        sys_argv = ["run", d, "--prompts", "1,img,17,42;1,5,img,9", "--image-hw", "16x24", "--max-new-tokens", "4",
                    "--out", prefix]
        cmd_run(_parser().parse_args(sys_argv))
        out = st.load(prefix + ".safetensors")
        with open(prefix + ".json") as f:
            meta = json.load(f)
        b, tmax, v = 2, 3 + p_full, text["vocab_size"]
        shapes = {"pixel_values": (b, 3, 16, 24), "prompt_ids": (b, tmax), "prompt_lengths": (b,),
                  "image_features": (b, p_full, text["hidden_size"]), "prefill_logits": (b, tmax, v),
                  "prefill_last_logits": (b, v), "decode_logits": (3, b, v), "decode_active": (3, b),
                  "generated": (b, 4)}
        assert list(out) == list(_RUN_KEYS), f"(4) run wrote keys {list(out)}"
        for k, s in shapes.items():
            assert tuple(out[k].shape) == s, f"(4) run: {k} shape {tuple(out[k].shape)}, expected {s}"
        assert torch.equal(out["pixel_values"], image_pixels(2, 16, 24, 0))
        assert meta["image_tokens_per_image"] == p_full and meta["prompt_lengths"] == [3 + p_full, 3 + p_full]
        assert int((out["prompt_ids"] == cfg["image_token_index"]).sum()) == 2 * p_full
        print(f"selftest (4) layouts hub/new (tied and untied): documented names, equal tensors and outputs; "
              f"default strategy {p_full - 1} features per image; run files keys/shapes ok")

        # (5) not degenerate
        distinct = len({t for g in r["generated"] for t in g})
        assert distinct >= n_new, f"(5) greedy sequences too repetitive ({distinct} distinct ids): {r['generated']}"
        lspread = float(r["prefill_last_logits"].std())
        assert lspread > 0.5, f"(5) logits std {lspread} too small"
        print(f"selftest (5) greedy {r['generated']} ({distinct} distinct ids), logits std {lspread:.3g}")
    print("selftest ok")


def _parser():
    ap = argparse.ArgumentParser(description="Plain-PyTorch twin of HF LlavaForConditionalGeneration (Pixtral)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-model")
    w.add_argument("dir")
    llama_ref.add_text_model_args(w)
    w.add_argument("--vision-hidden", type=int, default=32)
    w.add_argument("--vision-intermediate", type=int, default=64)
    w.add_argument("--vision-layers", type=int, default=2)
    w.add_argument("--vision-heads", type=int, default=2)
    w.add_argument("--patch", type=int, default=4)
    w.add_argument("--image-size", type=int, default=32)
    w.add_argument("--vision-act", choices=sorted(_ACTS), default="gelu")
    w.add_argument("--vision-rope-theta", type=float, default=10000.0)
    w.add_argument("--image-token", type=int, default=10)
    w.add_argument("--feature-layer", type=int, default=-1)
    w.add_argument("--strategy", choices=list(_STRATEGIES), default="full")
    w.add_argument("--layout", choices=list(_LAYOUTS), default="hub")
    w.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    w.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--prompts", required=True, help="';' between sequences, ',' between items; 'img' = the image")
    r.add_argument("--image-hw", required=True, help="HxW of every image, e.g. 16x24")
    r.add_argument("--max-new-tokens", type=int, required=True)
    r.add_argument("--out", required=True, help="output prefix: PREFIX.safetensors and PREFIX.json")
    llama_ref.add_sampling_args(r)
    r.add_argument("--image-seed", type=int, default=0)
    r.add_argument("--dtype", choices=list(_DTYPES))
    sub.add_parser("selftest")
    return ap


def main():
    a = _parser().parse_args()
    torch.set_num_threads(getattr(a, "threads", None) or os.cpu_count() or 1)
    try:
        if a.cmd == "write-model":
            cmd_write_model(a)
        elif a.cmd == "run":
            if a.max_new_tokens < 1:
                raise PixtralError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
            cmd_run(a)
        else:
            cmd_selftest(a)
    except PixtralError as e:
        raise SystemExit(f"pixtral_ref: {e}")


if __name__ == "__main__":
    main()
