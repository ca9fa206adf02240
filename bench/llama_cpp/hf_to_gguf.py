"""Writes a Hugging Face Llama folder (config.json + model.safetensors or a sharded index, as
tests/reference/llama_ref.py writes it) as a GGUF v3 file with float32 tensors, for llama.cpp.

  /usr/bin/python3 bench/llama_cpp/hf_to_gguf.py HF_DIR OUT.gguf
  /usr/bin/python3 bench/llama_cpp/hf_to_gguf.py --check OUT.gguf   # parse it back, print a summary
  /usr/bin/python3 bench/llama_cpp/hf_to_gguf.py --selftest          # asserts below; exit 0 = ok

Written from the GGUF documentation (ggml docs/gguf.md) without the gguf package:
  header     "GGUF", u32 version 3, u64 tensor count, u64 metadata count
  metadata   key (u64 length + UTF-8), u32 value type, value (arrays: u32 type, u64 count, items)
  tensors    name, u32 n_dims, u64 dims innermost first (a [rows, cols] matrix is {cols, rows}),
             u32 ggml type (0 = F32), u64 offset from the data section (aligned)
  data       starts at the next multiple of general.alignment (32), each tensor aligned to 32
Metadata: general.architecture "llama", llama.{context_length, embedding_length, block_count,
feed_forward_length, rope.dimension_count, rope.freq_base, attention.head_count,
attention.head_count_kv, attention.layer_norm_rms_epsilon, vocab_size}, general.file_type 0
(all F32), and a SentencePiece ("llama") vocabulary of vocab_size tokens: <unk> <s> </s>, the 256
byte tokens <0x00>..<0xFF>, then placeholders; scores and token types (2 unknown, 3 control,
6 byte, 1 normal); bos/eos from config.json. Hence vocab_size >= 259.
Tensor names: token_embd, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
ffn_gate, ffn_up, ffn_down}, output_norm, output (absent when tie_word_embeddings: llama.cpp then
uses token_embd). llama.cpp's rotary embedding rotates adjacent pairs (x[2i], x[2i+1]) while HF
rotates (x[i], x[i + d/2]); so the rows of q_proj and k_proj are permuted within each head:
w.reshape(n_head, 2, d/2, in).swapaxes(1, 2) (the inverse of HF's conversion from Meta's layout).
"""
import argparse
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "reference"))
import llama_ref  # noqa: E402

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32
GGML_TYPE_F32 = 0

# GGUF metadata value types
T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = 4, 5, 6, 7, 8, 9
T_UINT64, T_FLOAT64 = 10, 12

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype, v):
    if vtype == T_UINT32:
        return struct.pack("<I", v)
    if vtype == T_INT32:
        return struct.pack("<i", v)
    if vtype == T_FLOAT32:
        return struct.pack("<f", v)
    if vtype == T_BOOL:
        return struct.pack("<?", bool(v))
    if vtype == T_STRING:
        return _str(v)
    if vtype == T_UINT64:
        return struct.pack("<Q", v)
    if vtype == T_FLOAT64:
        return struct.pack("<d", v)
    raise ValueError(f"unsupported GGUF value type {vtype}")


def _kv(key, vtype, v, item_type=None):
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == T_ARRAY:
        out += struct.pack("<IQ", item_type, len(v))
        if item_type == T_FLOAT32:
            out += struct.pack(f"<{len(v)}f", *v)
        elif item_type == T_INT32:
            out += struct.pack(f"<{len(v)}i", *v)
        else:
            out += b"".join(_value(item_type, x) for x in v)
        return out
    return out + _value(vtype, v)


def spm_vocab(n, bos, eos):
    if n < 259:
        raise ValueError(f"vocab_size {n} < 259: an SPM vocabulary needs <unk>, <s>, </s> and 256 byte tokens")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
    tokens += [f"\u2581t{i}" for i in range(len(tokens), n)]
    types += [TOKEN_NORMAL] * (n - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    if bos not in (None, 1) or eos not in (None, 2):
        raise ValueError(f"bos_token_id {bos} / eos_token_id {eos}: this vocabulary puts <s> at 1 and </s> at 2")
    return tokens, scores, types


def permute_rope_rows(w, n_head):
    """HF rotate-half row order -> llama.cpp adjacent-pair order, per head."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(cfg, sd):
    """-> list of (gguf name, float32 tensor in GGUF row order)."""
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"]),
            (f"blk.{i}.attn_q.weight", permute_rope_rows(sd[p + "self_attn.q_proj.weight"], nh)),
            (f"blk.{i}.attn_k.weight", permute_rope_rows(sd[p + "self_attn.k_proj.weight"], nkv)),
            (f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"]),
            (f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"]),
            (f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]),
            (f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]),
            (f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"]),
            (f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"]),
        ]
    out.append(("output_norm.weight", sd["model.norm.weight"]))
    if not cfg["tie_word_embeddings"]:
        out.append(("output.weight", sd["lm_head.weight"]))
    return [(n, t.to(torch.float32).contiguous()) for n, t in out]


def write_gguf(hf_dir, out_path):
    cfg = llama_ref.load_config(hf_dir)
    if cfg.get("architectures", ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        raise SystemExit(f"hf_to_gguf: {hf_dir}: architectures {cfg.get('architectures')} is not LlamaForCausalLM")
    sd = llama_ref.read_state_dict(hf_dir)
    hd = llama_ref.head_dim(cfg)
    tokens, scores, types = spm_vocab(cfg["vocab_size"], cfg.get("bos_token_id"), cfg.get("eos_token_id"))
    kvs = [
        _kv("general.architecture", T_STRING, "llama"),
        _kv("general.name", T_STRING, os.path.basename(os.path.abspath(hf_dir))),
        _kv("general.alignment", T_UINT32, ALIGNMENT),
        _kv("general.file_type", T_UINT32, 0),
        _kv("llama.context_length", T_UINT32, cfg["max_position_embeddings"]),
        _kv("llama.embedding_length", T_UINT32, cfg["hidden_size"]),
        _kv("llama.block_count", T_UINT32, cfg["num_hidden_layers"]),
        _kv("llama.feed_forward_length", T_UINT32, cfg["intermediate_size"]),
        _kv("llama.rope.dimension_count", T_UINT32, hd),
        _kv("llama.rope.freq_base", T_FLOAT32, float(cfg["rope_theta"])),
        _kv("llama.attention.head_count", T_UINT32, cfg["num_attention_heads"]),
        _kv("llama.attention.head_count_kv", T_UINT32, cfg["num_key_value_heads"]),
        _kv("llama.attention.layer_norm_rms_epsilon", T_FLOAT32, float(cfg["rms_norm_eps"])),
        _kv("llama.vocab_size", T_UINT32, cfg["vocab_size"]),
        _kv("tokenizer.ggml.model", T_STRING, "llama"),
        _kv("tokenizer.ggml.tokens", T_ARRAY, tokens, T_STRING),
        _kv("tokenizer.ggml.scores", T_ARRAY, scores, T_FLOAT32),
        _kv("tokenizer.ggml.token_type", T_ARRAY, types, T_INT32),
        _kv("tokenizer.ggml.bos_token_id", T_UINT32, 1),
        _kv("tokenizer.ggml.eos_token_id", T_UINT32, 2),
        _kv("tokenizer.ggml.unknown_token_id", T_UINT32, 0),
        _kv("tokenizer.ggml.add_bos_token", T_BOOL, False),
        _kv("tokenizer.ggml.add_eos_token", T_BOOL, False),
    ]
    tensors = gguf_tensors(cfg, sd)
    infos = []
    offset = 0
    for name, t in tensors:
        dims = list(reversed(t.shape))
        infos.append(_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) +
                     struct.pack("<IQ", GGML_TYPE_F32, offset))
        offset += t.numel() * 4
        offset += (-offset) % ALIGNMENT
    head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(b"\0" * ((-len(head)) % ALIGNMENT))
        for _, t in tensors:
            raw = t.numpy().tobytes()
            f.write(raw)
            f.write(b"\0" * ((-len(raw)) % ALIGNMENT))
    os.replace(tmp, out_path)
    return len(tensors)


# --- reader (for --check and the tests of this writer) -------------------------------------

def read_gguf(path):
    """-> (metadata dict, {name: (dims innermost-first, ggml type, float32 tensor in row order)})."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v if len(v) > 1 else v[0]

    def s():
        nonlocal pos
        n = take("<Q")
        v = data[pos:pos + n].decode("utf-8")
        pos += n
        return v

    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def val(t):
        if t == T_STRING:
            return s()
        if t == T_ARRAY:
            it, n = take("<I"), take("<Q")
            return [val(it) for _ in range(n)]
        return take(scalar[t])

    if data[:4] != GGUF_MAGIC:
        raise SystemExit(f"hf_to_gguf: {path}: magic {data[:4]!r} is not GGUF")
    pos = 4
    version, n_t, n_kv = take("<I"), take("<Q"), take("<Q")
    if version != GGUF_VERSION:
        raise SystemExit(f"hf_to_gguf: {path}: version {version}, expected {GGUF_VERSION}")
    meta = {}
    for _ in range(n_kv):
        k = s()
        meta[k] = val(take("<I"))
    infos = []
    for _ in range(n_t):
        name = s()
        nd = take("<I")
        dims = [take("<Q") for _ in range(nd)]
        infos.append((name, dims, take("<I"), take("<Q")))
    align = meta.get("general.alignment", ALIGNMENT)
    base = pos + (-pos) % align
    out = {}
    for name, dims, ty, off in infos:
        if off % align:
            raise SystemExit(f"hf_to_gguf: {name}: data offset {off} is not a multiple of the alignment {align}")
        if ty != GGML_TYPE_F32:
            raise SystemExit(f"hf_to_gguf: {name}: ggml type {ty}, this reader knows only F32")
        n = 1
        for d in dims:
            n *= d
        buf = bytearray(data[base + off:base + off + 4 * n])
        out[name] = (dims, ty, torch.frombuffer(buf, dtype=torch.float32).reshape(list(reversed(dims))).clone())
    return meta, out


def rope_adjacent(x, positions, theta):
    """llama.cpp's rope (mode 0): rotates (x[2i], x[2i+1]) by position * theta^(-2i/d)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = positions.to(torch.float64)[:, None] * inv[None]
    c, s = ang.cos(), ang.sin()
    e, o = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = e * c - o * s
    out[..., 1::2] = e * s + o * c
    return out


def selftest():
    """Asserts: (1) the file parses back with the metadata and every tensor bit-exact (q/k after
    undoing the permutation), tensor data aligned; (2) the permutation makes llama.cpp's
    adjacent-pair rope on the permuted projection equal HF's rotate-half rope on the original,
    up to the same permutation of the head dims (which q.k and so attention do not see)."""
    import tempfile
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for tie in (False, True):
            cfg = llama_ref.make_config(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=300,
                                        tie=tie, rope_theta=5000.0)
            folder = os.path.join(tmp, f"m{int(tie)}")
            llama_ref.write_model(folder, cfg, seed=2, shards=2)
            path = os.path.join(tmp, f"m{int(tie)}.gguf")
            write_gguf(folder, path)
            meta, tensors = read_gguf(path)
            sd = llama_ref.read_state_dict(folder)
            want = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
                    "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
                    "llama.attention.head_count_kv": 2, "llama.context_length": cfg["max_position_embeddings"],
                    "llama.rope.dimension_count": 16, "llama.rope.freq_base": 5000.0,
                    "tokenizer.ggml.model": "llama", "tokenizer.ggml.eos_token_id": 2}
            for k, v in want.items():
                assert meta[k] == v, f"{k}: {meta[k]!r} != {v!r}"
            assert abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
            toks = meta["tokenizer.ggml.tokens"]
            assert len(toks) == 300 and len(set(toks)) == 300 and toks[3] == "<0x00>" and toks[258] == "<0xFF>"
            assert meta["tokenizer.ggml.token_type"][3:259] == [TOKEN_BYTE] * 256
            assert ("output.weight" in tensors) == (not tie), sorted(tensors)
            assert len(tensors) == 2 + 9 * 2 + (0 if tie else 1)
            for name, (dims, _, t) in tensors.items():
                assert dims == list(reversed(t.shape))
            hd = llama_ref.head_dim(cfg)
            for i in range(2):
                q_hf = sd[f"model.layers.{i}.self_attn.q_proj.weight"]
                q_gg = tensors[f"blk.{i}.attn_q.weight"][2]
                assert torch.equal(q_gg, permute_rope_rows(q_hf, 4))
                k_gg = tensors[f"blk.{i}.attn_k.weight"][2]
                assert torch.equal(k_gg, permute_rope_rows(sd[f"model.layers.{i}.self_attn.k_proj.weight"], 2))
                assert torch.equal(tensors[f"blk.{i}.ffn_down.weight"][2], sd[f"model.layers.{i}.mlp.down_proj.weight"])
            assert torch.equal(tensors["token_embd.weight"][2], sd["model.embed_tokens.weight"])
            # (2) rope equivalence on layer 0's q projection, head by head
            x = torch.randn(7, 64, dtype=torch.float64)
            pos = torch.tensor([0, 1, 2, 5, 9, 100, 1000])
            yh = (x @ sd["model.layers.0.self_attn.q_proj.weight"].double().T).reshape(7, 4, hd).transpose(0, 1)
            yg = (x @ tensors["blk.0.attn_q.weight"][2].double().T).reshape(7, 4, hd).transpose(0, 1)
            inv_f = 1.0 / (5000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
            ang = torch.cat([pos[:, None] * inv_f[None]] * 2, dim=-1)  # HF: cos/sin of cat(angle, angle)
            cos, sin = ang.cos()[None], ang.sin()[None]
            rh = llama_ref.apply_rope(yh, cos[0], sin[0])  # HF rotate-half
            rg = rope_adjacent(yg, pos, 5000.0)
            # within a head, gguf dim 2j holds HF dim j and 2j+1 holds HF dim j + hd/2
            idx = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], 1).reshape(-1)
            err = float((rg - rh[..., idx]).abs().max())
            assert err < 1e-9, f"rope after permutation differs from HF by {err}"
            no_perm = float((rope_adjacent(yh, pos, 5000.0) - rh).abs().max())
            assert no_perm > 1e-3, "rope check cannot tell the layouts apart"
            # attention scores are invariant: q.k with both permuted
            kh = (x @ sd["model.layers.0.self_attn.k_proj.weight"].double().T).reshape(7, 2, hd).transpose(0, 1)
            kg = (x @ tensors["blk.0.attn_k.weight"][2].double().T).reshape(7, 2, hd).transpose(0, 1)
            sh = rh[:2] @ llama_ref.apply_rope(kh, cos[0], sin[0]).transpose(1, 2)
            sg = rg[:2] @ rope_adjacent(kg, pos, 5000.0).transpose(1, 2)
            assert float((sh - sg).abs().max()) < 1e-9
            print(f"hf_to_gguf selftest tie={tie}: {len(tensors)} tensors round-trip, rope |diff| {err:.2g} "
                  f"(unpermuted: {no_perm:.3g})")
    print("hf_to_gguf selftest ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", help="HF_DIR OUT.gguf, or with --check: FILE.gguf")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--selftest", action="store_true")
    a = ap.parse_args()
    if a.selftest:
        selftest()
        return
    if a.check:
        meta, t = read_gguf(a.paths[0])
        print(json.dumps({"tensors": len(t), "metadata": {k: (v if not isinstance(v, list) else f"[{len(v)}]")
                                                           for k, v in meta.items()}}, indent=1))
        return
    if len(a.paths) != 2:
        raise SystemExit("hf_to_gguf: usage: hf_to_gguf.py HF_DIR OUT.gguf")
    n = write_gguf(a.paths[0], a.paths[1])
    print(json.dumps({"gguf": a.paths[1], "tensors": n, "bytes": os.path.getsize(a.paths[1])}))


if __name__ == "__main__":
    main()
