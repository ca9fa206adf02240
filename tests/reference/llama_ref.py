"""Plain-PyTorch twin of Hugging Face's LlamaForCausalLM (tests/reference; Debian has no
transformers). Same computation and the same state-dict names:

  model.embed_tokens.weight                          [vocab, hidden]
  model.layers.N.input_layernorm.weight              [hidden]           RMSNorm
  model.layers.N.self_attn.q_proj.weight             [heads*head_dim, hidden]     (no biases)
  model.layers.N.self_attn.k_proj.weight             [kv_heads*head_dim, hidden]
  model.layers.N.self_attn.v_proj.weight             [kv_heads*head_dim, hidden]
  model.layers.N.self_attn.o_proj.weight             [hidden, heads*head_dim]
  model.layers.N.post_attention_layernorm.weight     [hidden]
  model.layers.N.mlp.{gate,up}_proj.weight           [intermediate, hidden]  down(silu(gate(x)) * up(x))
  model.layers.N.mlp.down_proj.weight                [hidden, intermediate]
  model.norm.weight                                  [hidden]
  lm_head.weight                                     [vocab, hidden]  (absent when tie_word_embeddings)

Semantics as HF: RMSNorm computed in float32 (x * rsqrt(mean(x^2) + eps), cast back, times
weight); rotary embedding in the rotate-half convention (inv_freq[i] = rope_theta^(-2i/head_dim),
angle = position * inv_freq, cos/sin of cat(angle, angle) computed in float32 and cast to the
activation dtype, q*cos + rotate_half(q)*sin); grouped-query attention (kv head h // (heads /
kv_heads) serves query head h), scale 1/sqrt(head_dim), softmax in float32; SwiGLU MLP.

Subcommands (run with the interpreter that has torch: /usr/bin/python3):

  write-model DIR [--hidden 64 --intermediate 128 --layers 2 --heads 4 --kv-heads 2
                   --vocab 300 --max-pos 256 --rope-theta 10000 --eps 1e-5 --tie
                   --dtype float32|bfloat16 --shards 1 --seed 0 --init hf|wide]
      Writes a random HF model folder: config.json (HF keys, architectures ["LlamaForCausalLM"],
      bos_token_id 1, eos_token_id 2) and model.safetensors, or with --shards N > 1
      model-0000i-of-0000N.safetensors plus model.safetensors.index.json ({"metadata":
      {"total_size"}, "weight_map": {name: file}}). --init hf: normal(0, 0.02) weights and
      norms 1 (HF's initializer_range; logits nearly flat, tied models repeat one token);
      --init wide (default): projections normal(0, 1/sqrt(fan_in)), norm weights
      uniform(0.8, 1.2), embeddings normal(0, 1) (tied: normal(0, 0.25/sqrt(hidden)) with the
      final norm weight x4); logits have std ~1, so greedy sequences vary and top-1/top-2
      margins are far above float32 rounding.

  run DIR --prompts "1,17,42;5,6" --max-new-tokens N --out PREFIX
          [--greedy | --temperature T --top-k K --top-p P --seed S] [--dtype float32|bfloat16]
          [--ignore-eos] [--threads N]
      Runs the batch of prompts (';' separates sequences, ',' token ids; lengths may differ) with
      the twin's own KV cache: one batched prefill (prompts right-padded, padded keys masked),
      then one token per sequence per step (each sequence at its own position). A sequence
      stops after emitting eos_token_id unless --ignore-eos. Writes PREFIX.safetensors:
        prompt_ids       I64 [B, Tmax]   prompts right-padded with -1
        prompt_lengths   I64 [B]
        prefill_logits   F32 [B, Tmax, V] logits at every prompt position (rows >= length are 0)
        prefill_last_logits F32 [B, V]   logits at each prompt's last position (-> new token 0)
        decode_logits    F32 [S, B, V]   step s feeds new token s at position len+s and gives the
                                         logits of new token s+1; S = max_new_tokens - 1
        decode_active    I64 [S, B]      1 where sequence b was still generating at step s
                                         (inactive rows of decode_logits are 0)
        generated        I64 [B, N]      new tokens, -1 after a sequence stopped
      and PREFIX.json: {"generated": [[ids of seq 0], ...] (without the -1 padding),
      "prompt_lengths", "dtype", "sampling": {...}, "config": {...}}.
      Logits are computed in --dtype (default: config's torch_dtype) and stored as float32.
      Sampling (non-greedy): logits / T; top-k keeps the k largest; top-p keeps the smallest
      prefix of the descending-sorted distribution whose mass reaches p (the token crossing p
      is kept); then torch.multinomial with a torch.Generator seeded by --seed, one draw per
      active sequence per step in batch order. Greedy: argmax, first index on ties.

  selftest [--dtype float32]
      Writes a random folder (2 layers, GQA, vocab 300, tied and untied, one sharded), runs a
      batch of 3 prompts of different lengths, and asserts that every prefill and decode logit
      row equals a full recompute of that sequence without cache (float32: atol 1e-4), that the
      eos stops a sequence (padding -1, zero logits rows), and that the greedy ids of the batch are
      not degenerate (at least max_new_tokens distinct ids).

Also importable: load_model(DIR, dtype) -> LlamaForCausalLM, generate(model, prompts, ...).
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
import st  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --- config --------------------------------------------------------------------------------

def make_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, max_pos=256,
                rope_theta=10000.0, eps=1e-5, tie=False, dtype="float32"):
    if hidden % heads != 0:
        raise ValueError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if heads % kv_heads != 0:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if (hidden // heads) % 2 != 0:
        raise ValueError(f"head_dim {hidden // heads} must be even for rotary embedding")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": float(rope_theta),
        "vocab_size": vocab,
        "max_position_embeddings": max_pos,
        "tie_word_embeddings": bool(tie),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# --- modules -------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        dt = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dt)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope_cos_sin(positions, dim, theta, dtype):
    """positions [B, T] int64 -> cos, sin [B, 1, T, dim] in dtype (computed in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    ang = positions.to(torch.float32)[:, :, None] * inv_freq[None, None, :]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.d = head_dim(cfg)
        hid = cfg["hidden_size"]
        self.q_proj = nn.Linear(hid, self.heads * self.d, bias=False)
        self.k_proj = nn.Linear(hid, self.kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(hid, self.kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(self.heads * self.d, hid, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        """x [B, T, hidden]; mask bool [B, 1, T, S] (true = attend). With cache = (k_cache, v_cache)
        [B, kv_heads, L, d], the new keys/values are written at `positions` [B, T] and attention
        runs over the first S positions of the cache; without, over the T new keys."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.d).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            kc, vc = cache
            idx = positions.clamp(min=0)[:, None, :, None].expand(b, self.kv_heads, t, self.d)
            kc.scatter_(2, idx, k)
            vc.scatter_(2, idx, v)
            s = mask.shape[-1]
            k, v = kc[:, :, :s], vc[:, :, :s]
        rep = self.heads // self.kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        w = torch.matmul(q, k.transpose(2, 3)) * self.d**-0.5  # as HF: times scaling = head_dim^-0.5
        w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, v).transpose(1, 2).reshape(b, t, self.heads * self.d)
        return self.o_proj(o)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hid, inter = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj = nn.Linear(hid, inter, bias=False)
        self.up_proj = nn.Linear(hid, inter, bias=False)
        self.down_proj = nn.Linear(inter, hid, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])


class KVCache:
    """Per layer (k, v) [B, kv_heads, max_len, head_dim] plus each sequence's filled length."""

    def __init__(self, cfg, batch, max_len, dtype):
        shape = (batch, cfg["num_key_value_heads"], max_len, head_dim(cfg))
        self.layers = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                       for _ in range(cfg["num_hidden_layers"])]
        self.lengths = torch.zeros(batch, dtype=torch.int64)
        self.max_len = max_len


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        if cfg["tie_word_embeddings"]:
            self.lm_head.weight = self.model.embed_tokens.weight

    def state_dict_hf(self):
        sd = {k: v for k, v in self.state_dict().items()}
        if self.cfg["tie_word_embeddings"]:
            sd.pop("lm_head.weight")
        return sd

    def _run(self, ids, positions, mask, cache=None, rows=None, inputs_embeds=None):
        """rows [B] (optional): the lm_head runs only at x[b, rows[b]] -> logits [B, 1, V].
        inputs_embeds [B, T, hidden] (optional) replaces embed_tokens(ids) (a multimodal merge)."""
        x = self.model.embed_tokens(ids.clamp(min=0)) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_cos_sin(positions.clamp(min=0), head_dim(self.cfg), self.cfg["rope_theta"], x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache.layers[i], positions)
        if rows is not None:
            x = x[torch.arange(x.shape[0]), rows][:, None]
        return self.lm_head(self.model.norm(x))

    def forward_full(self, ids, inputs_embeds=None):
        """No cache: ids [B, T] (all real tokens) -> logits [B, T, V], causal attention
        (inputs_embeds [B, T, hidden]: used instead of embed_tokens(ids))."""
        b, t = ids.shape
        pos = torch.arange(t)[None].expand(b, t)
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
        return self._run(ids, pos, mask, inputs_embeds=inputs_embeds)

    def prefill(self, cache, ids, lengths, last_only=False, inputs_embeds=None):
        """ids [B, T] right-padded (pads anything >= 0 or -1), lengths [B]: writes positions
        0..T-1 of the cache (padding rows are overwritten by later decode steps before they are
        ever visible) and returns logits [B, T, V] (last_only: [B, 1, V], each prompt's last
        position only, as a generator needs). inputs_embeds [B, T, hidden]: used instead of
        embed_tokens(ids)."""
        b, t = ids.shape
        if t > cache.max_len:
            raise ValueError(f"prompt length {t} > cache length {cache.max_len}")
        pos = torch.arange(t)[None].expand(b, t)
        j = torch.arange(t)
        mask = (j[None, :] <= j[:, None])[None] & (j[None, None, :] < lengths[:, None, None])
        logits = self._run(ids, pos, mask[:, None], cache, rows=lengths - 1 if last_only else None,
                           inputs_embeds=inputs_embeds)
        cache.lengths = lengths.clone()
        return logits

    def decode(self, cache, ids):
        """ids [B] new token per sequence, written at position cache.lengths[b]; -> logits [B, V]."""
        pos = cache.lengths[:, None].clone()
        if int(pos.max()) >= cache.max_len:
            raise ValueError(f"position {int(pos.max())} >= cache length {cache.max_len}")
        s = int(pos.max()) + 1
        mask = (torch.arange(s)[None, :] <= pos)[:, None, None, :]
        logits = self._run(ids[:, None], pos, mask, cache)
        cache.lengths = cache.lengths + 1
        return logits[:, 0]


# --- I/O -----------------------------------------------------------------------------------

def init_random(model, seed, init):
    g = torch.Generator().manual_seed(seed)
    tied = model.cfg["tie_word_embeddings"]
    with torch.no_grad():
        for name, p in model.state_dict_hf().items():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                if init == "hf":
                    p.fill_(1.0)
                else:
                    p.copy_(torch.rand(p.shape, generator=g) * 0.4 + 0.8)
                    if name == "model.norm.weight" and tied:
                        p.mul_(4.0)  # undoes the small tied embedding's scale in the logits
            elif init == "hf":
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif name == "model.embed_tokens.weight":
                # Untied: normal(0, 1). Tied: small, so that the current token's own embedding does
                # not dominate the final hidden state (a tied random model otherwise repeats it).
                p.copy_(torch.randn(p.shape, generator=g) * (0.25 / math.sqrt(p.shape[1]) if tied else 1.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def _atomic_write_bytes(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_model(out, cfg, seed=0, shards=1, init="wide"):
    """Writes config.json and the safetensors file(s); returns the float32 model."""
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    init_random(model, seed, init)
    dt = _DTYPES[cfg["torch_dtype"]]
    sd = {k: v.to(dt) for k, v in model.state_dict_hf().items()}
    names = list(sd.keys())
    if shards <= 1:
        st.save(os.path.join(out, "model.safetensors.tmp"), sd, {"format": "pt"})
        os.replace(os.path.join(out, "model.safetensors.tmp"), os.path.join(out, "model.safetensors"))
    else:
        per = -(-len(names) // shards)
        weight_map = {}
        total = 0
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in names[i * per:(i + 1) * per]}
            st.save(os.path.join(out, fname + ".tmp"), part, {"format": "pt"})
            os.replace(os.path.join(out, fname + ".tmp"), os.path.join(out, fname))
            for k, v in part.items():
                weight_map[k] = fname
                total += v.numel() * v.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write_bytes(os.path.join(out, "model.safetensors.index.json"),
                            json.dumps(index, indent=2).encode())
    _atomic_write_bytes(os.path.join(out, "config.json"), json.dumps(cfg, indent=2).encode())
    return model


def read_state_dict(folder):
    idx = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for fn in files:
            sd.update(st.load(os.path.join(folder, fn)))
        return sd
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise SystemExit(f"llama_ref: {folder} has neither model.safetensors nor model.safetensors.index.json")
    return st.load(single)


def load_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def load_model(folder, dtype=None):
    cfg = load_config(folder)
    dt = _DTYPES[dtype or cfg.get("torch_dtype", "float32")]
    model = LlamaForCausalLM(cfg)
    sd = read_state_dict(folder)
    if cfg["tie_word_embeddings"]:
        sd = dict(sd)
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.to(dt).eval()


# --- generation ----------------------------------------------------------------------------

def sample(logits, greedy, temperature, top_k, top_p, gen):
    """logits [B, V] -> ids [B]."""
    if greedy:
        return torch.argmax(logits, dim=-1)
    x = logits.to(torch.float32) / temperature
    if top_k and top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sx, si = torch.sort(x, dim=-1, descending=True)
        cum = F.softmax(sx, dim=-1).cumsum(-1)
        drop = (cum - F.softmax(sx, dim=-1)) >= top_p  # mass before this token already reaches p
        sx = sx.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, si, sx)
    return torch.multinomial(F.softmax(x, dim=-1), 1, generator=gen)[:, 0]


def pad_prompts(prompts):
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), -1, dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.int64)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.int64)


def generate(model, prompts, max_new_tokens, greedy=True, temperature=1.0, top_k=0, top_p=1.0, seed=0,
             stop_at_eos=True, record=True, inputs_embeds=None):
    """Returns dict with generated (list of lists) and, when record, the logits tensors (float32).
    inputs_embeds [B, Tmax, hidden] (optional): the prefill's input instead of embed_tokens of the
    right-padded prompts (rows >= a prompt's length are ignored); decode steps embed token ids."""
    cfg = model.cfg
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if t < 0 or t >= cfg["vocab_size"]]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {cfg['vocab_size']})")
        if len(p) + max_new_tokens > cfg["max_position_embeddings"]:
            raise ValueError(f"prompt {i}: length {len(p)} + max_new_tokens {max_new_tokens} > "
                             f"max_position_embeddings {cfg['max_position_embeddings']}")
    ids, lengths = pad_prompts(prompts)
    b, t = ids.shape
    dt = model.lm_head.weight.dtype
    if inputs_embeds is not None and tuple(inputs_embeds.shape) != (b, t, cfg["hidden_size"]):
        raise ValueError(f"inputs_embeds shape {tuple(inputs_embeds.shape)} != (batch {b}, "
                         f"longest prompt {t}, hidden_size {cfg['hidden_size']})")
    cache = KVCache(cfg, b, t + max_new_tokens, dt)
    gen = torch.Generator().manual_seed(seed)
    eos = cfg.get("eos_token_id")
    out = {"generated": [[] for _ in range(b)]}
    with torch.inference_mode():
        logits = model.prefill(cache, ids, lengths, inputs_embeds=inputs_embeds)
        last = logits[torch.arange(b), lengths - 1]
        if record:
            pl = logits.to(torch.float32).clone()
            pl[torch.arange(t)[None, :].expand(b, t) >= lengths[:, None]] = 0
            out["prefill_logits"] = pl
            out["prefill_last_logits"] = last.to(torch.float32).clone()
            dec, act = [], []
        active = torch.ones(b, dtype=torch.bool)
        gen_t = torch.full((b, max_new_tokens), -1, dtype=torch.int64)
        cur = last
        for step in range(max_new_tokens):
            if step > 0:
                cur = model.decode(cache, nxt)
                if record:
                    a = active.clone()
                    row = cur.to(torch.float32).clone()
                    row[~a] = 0
                    dec.append(row)
                    act.append(a.to(torch.int64))
            nxt = sample(cur, greedy, temperature, top_k, top_p, gen)
            nxt = torch.where(active, nxt, torch.zeros_like(nxt))
            gen_t[active, step] = nxt[active]
            for i in range(b):
                if active[i]:
                    out["generated"][i].append(int(nxt[i]))
            if stop_at_eos and eos is not None:
                active = active & (nxt != eos)
            if not bool(active.any()):
                # remaining steps: nothing active; record zero rows so shapes stay [S, B, V]
                if record:
                    for _ in range(step + 1, max_new_tokens):
                        dec.append(torch.zeros(b, cfg["vocab_size"]))
                        act.append(torch.zeros(b, dtype=torch.int64))
                break
    out["generated_tensor"] = gen_t
    if record:
        s = max_new_tokens - 1
        out["decode_logits"] = torch.stack(dec) if dec else torch.zeros(s, b, cfg["vocab_size"])
        out["decode_active"] = torch.stack(act) if act else torch.zeros(s, b, dtype=torch.int64)
        out["prompt_ids"] = ids
        out["prompt_lengths"] = lengths
    return out


def parse_prompts(text):
    prompts = []
    for i, part in enumerate(text.split(";")):
        part = part.strip()
        if not part:
            raise SystemExit(f"llama_ref: --prompts: sequence {i} is empty in {text!r}")
        try:
            prompts.append([int(x) for x in part.split(",")])
        except ValueError:
            raise SystemExit(f"llama_ref: --prompts: sequence {i} ({part!r}) is not comma-separated integers")
    return prompts


# --- subcommands ---------------------------------------------------------------------------

def cmd_write_model(a):
    cfg = make_config(a.hidden, a.intermediate, a.layers, a.heads, a.kv_heads, a.vocab, a.max_pos,
                      a.rope_theta, a.eps, a.tie, a.dtype)
    write_model(a.dir, cfg, a.seed, a.shards, a.init)
    print(json.dumps({"dir": a.dir, "config": cfg}))


def sampling_from_args(a):
    """The run command's sampling flags (add_sampling_args) -> {"greedy", "temperature", "top_k",
    "top_p", "seed"}; greedy when none of --temperature/--top-k/--top-p is given."""
    greedy = a.greedy or (a.temperature is None and a.top_k is None and a.top_p is None)
    if not greedy and a.temperature is not None and a.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {a.temperature}")
    return {"greedy": greedy, "temperature": a.temperature or 1.0, "top_k": a.top_k or 0,
            "top_p": 1.0 if a.top_p is None else a.top_p, "seed": a.seed}


def cmd_run(a):
    model = load_model(a.dir, a.dtype)
    prompts = parse_prompts(a.prompts)
    try:
        samp = sampling_from_args(a)
    except ValueError as e:
        raise SystemExit(f"llama_ref: {e}")
    greedy = samp["greedy"]
    try:
        r = generate(model, prompts, a.max_new_tokens, greedy, samp["temperature"], samp["top_k"],
                     samp["top_p"], a.seed, stop_at_eos=not a.ignore_eos)
    except ValueError as e:
        raise SystemExit(f"llama_ref: {e}")
    tensors = {k: r[k] for k in ("prompt_ids", "prompt_lengths", "prefill_logits", "prefill_last_logits",
                                 "decode_logits", "decode_active")}
    tensors["generated"] = r["generated_tensor"]
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    st.save(a.out + ".safetensors.tmp", tensors)
    os.replace(a.out + ".safetensors.tmp", a.out + ".safetensors")
    dtype = a.dtype or model.cfg.get("torch_dtype", "float32")
    meta = {"generated": r["generated"], "prompt_lengths": [len(p) for p in prompts], "dtype": dtype,
            "sampling": samp, "stop_at_eos": not a.ignore_eos, "config": model.cfg}
    _atomic_write_bytes(a.out + ".json", json.dumps(meta).encode())
    print(json.dumps({"generated": r["generated"]}))


def cmd_selftest(a):
    dt = _DTYPES[a.dtype]
    atol = 1e-4 if dt == torch.float32 else 0.15
    prompts = [[1, 17, 42, 7, 99], [5, 6], [3, 250, 11, 12, 13, 14, 15, 200, 201]]
    n_new = 12
    with tempfile.TemporaryDirectory() as tmp:
        for tie, shards in ((False, 1), (True, 3)):
            d = os.path.join(tmp, f"m_tie{int(tie)}")
            cfg = make_config(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=300, tie=tie)
            write_model(d, cfg, seed=3, shards=shards)
            model = load_model(d, a.dtype)
            r = generate(model, prompts, n_new, stop_at_eos=False)
            worst = 0.0
            with torch.inference_mode():
                for i, p in enumerate(prompts):
                    seq = p + r["generated"][i]
                    full = model.forward_full(torch.tensor([seq]))[0].to(torch.float32)
                    n = len(p)
                    worst = max(worst, float((full[:n] - r["prefill_logits"][i, :n]).abs().max()))
                    worst = max(worst, float((full[n - 1] - r["prefill_last_logits"][i]).abs().max()))
                    for s in range(n_new - 1):
                        worst = max(worst, float((full[n + s] - r["decode_logits"][s, i]).abs().max()))
                    assert dt != torch.float32 or torch.equal(torch.argmax(full[n - 1:n - 1 + n_new], -1),
                                       torch.tensor(r["generated"][i])), f"greedy ids differ for prompt {i}"
            assert worst <= atol, f"cache vs recompute: max |diff| {worst} > {atol} (tie={tie})"
            distinct = len({t for g in r["generated"] for t in g})
            assert distinct >= n_new, f"greedy sequences too repetitive ({distinct} distinct ids): {r['generated']}"
            spread = float(r["prefill_last_logits"].std())
            assert spread > 0.5, f"logits std {spread} too small: random model is degenerate"
            print(f"selftest tie={tie} shards={shards} dtype={a.dtype}: cache vs recompute max |diff| "
                  f"{worst:.3g} (<= {atol}), logits std {spread:.3g}, greedy {r['generated']}")
        # eos handling: make token 2 the greedy choice after the prompt by construction
        model = load_model(d, a.dtype)
        r0 = generate(model, prompts[:1], 4, stop_at_eos=False)
        g0 = r0["generated"][0]
        stop = g0.index(g0[1]) + 1  # first emission of the chosen eos
        model.cfg = dict(model.cfg, eos_token_id=g0[1])
        r1 = generate(model, prompts[:1], 4, stop_at_eos=True)
        assert r1["generated"][0] == g0[:stop], (g0, r1["generated"])
        assert r1["generated_tensor"][0, stop:].eq(-1).all()
        assert int(r1["decode_active"][stop - 1, 0]) == 0
        assert float(r1["decode_logits"][stop - 1].abs().sum()) == 0
    print("selftest ok")


def add_text_model_args(w):
    """write-model's text-model flags (--hidden .. --tie), shared with pixtral_ref."""
    w.add_argument("--hidden", type=int, default=64)
    w.add_argument("--intermediate", type=int, default=128)
    w.add_argument("--layers", type=int, default=2)
    w.add_argument("--heads", type=int, default=4)
    w.add_argument("--kv-heads", type=int, default=2)
    w.add_argument("--vocab", type=int, default=300)
    w.add_argument("--max-pos", type=int, default=256)
    w.add_argument("--rope-theta", type=float, default=10000.0)
    w.add_argument("--eps", type=float, default=1e-5)
    w.add_argument("--tie", action="store_true")


def add_sampling_args(r):
    """run's sampling and execution flags (see sampling_from_args), shared with pixtral_ref."""
    r.add_argument("--greedy", action="store_true")
    r.add_argument("--temperature", type=float)
    r.add_argument("--top-k", type=int)
    r.add_argument("--top-p", type=float)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--ignore-eos", action="store_true")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)


def main():
    ap = argparse.ArgumentParser(description="Plain-PyTorch twin of HF LlamaForCausalLM")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-model")
    w.add_argument("dir")
    add_text_model_args(w)
    w.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    w.add_argument("--shards", type=int, default=1)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--init", choices=["wide", "hf"], default="wide")
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--prompts", required=True)
    r.add_argument("--max-new-tokens", type=int, required=True)
    r.add_argument("--out", required=True, help="output prefix: PREFIX.safetensors and PREFIX.json")
    add_sampling_args(r)
    r.add_argument("--dtype", choices=list(_DTYPES))
    s = sub.add_parser("selftest")
    s.add_argument("--dtype", choices=list(_DTYPES), default="float32")
    a = ap.parse_args()
    torch.set_num_threads(getattr(a, "threads", None) or os.cpu_count() or 1)
    if a.cmd == "write-model":
        cmd_write_model(a)
    elif a.cmd == "run":
        if a.max_new_tokens < 1:
            raise SystemExit(f"llama_ref: --max-new-tokens must be >= 1, got {a.max_new_tokens}")
        cmd_run(a)
    else:
        cmd_selftest(a)


if __name__ == "__main__":
    main()
