"""The PyTorch twin of `devpipe bench`'s `vlm` workload (bench/README.md, "The vlm workload"): a
Pixtral-shaped LlavaForConditionalGeneration with random weights (tests/reference/pixtral_ref.py),
one image and one prompt at batch 1, float32.

The workload (WORKLOAD; SMALL with --small, for tests):
  vision tower: hidden 256, 4 layers, 4 heads, intermediate 1024, patch 16, image_size 512, gelu;
  text model (Mistral-style, untied): hidden 512, 4 layers, 8 heads, 4 KV heads, intermediate
  1536, vocab 8000; image 256 x 256 (16 x 16 patches = 256 image tokens); the prompt: 4 text
  tokens, the image's tokens, 4 text tokens.

The inputs, written once by write-model and read by every mode (devpipe and this twin):
  pixel_values  F32 [1, 3, H, W]   pixtral_ref.image_pixels(1, H, W, seed 0) (torch.randn)
  input_ids     I64 [1, 8 + P]     text ids llm_peers.prompt_ids(1, 8, vocab)[0] (an id equal to
                                   image_token_index becomes the next id), ids[:4] + [image
                                   token] * P + ids[4:]

Subcommands (each prints ONE JSON object on stdout; non-zero exit with a message on error):

  write-model DIR --inputs PATH [--small]
      DIR/config.json + DIR/model.safetensors (pixtral_ref.write_model, seed 0, hub layout) and
      PATH (the inputs above).
  serve DIR --inputs PATH [--decode-tokens 16] [--threads N (default: all cores)]
      The twin as a persistent worker: torch.set_num_threads(N), inference_mode(), every
      nn.Linear of the vision tower, the projector and the text model converted by
      torch.utils.mkldnn.to_mkldnn (oneDNN inner product; Debian's torch 1.13 does float32
      nn.Linear on netlib BLAS otherwise, see llm_peers.py), the vision tower in pixtral_ref's
      batched form (image_features_batched: the image as a batch of one, no mask, the 2D rope
      from the angles; the form devpipe computes). Prints {"ready": true, "peer", "version",
      "threads", "image_tokens"}, then answers one JSON line per request line:
        {"cmd": "vision", "iters": N}  -> {"samples_ms", "cpu_ms"}: vision tower + projector
        {"cmd": "prefill", "iters": N} -> {"samples_ms", "cpu_ms", "tokens": [[next id]]}: vision,
                                          merge, prefill (lm_head at the last position), argmax
        {"cmd": "decode", "batch": 1, "iters": N} -> {"samples_ms" (each of the N runs' decode
                                          tokens - 1 greedy steps), "cpu_ms", "tokens": [[the
                                          last run's decode tokens ids]]}; each run from a copy
                                          of a cache prefilled once (untimed)
        {"cmd": "output", "path": P}   -> writes the image features [1, P, text hidden] to P as
                                          safetensors, key "image_features"; {"ok": true}
        {"cmd": "quit"}
      A failure is answered {"error": ...} and the worker exits 1.

  /usr/bin/python3 bench/vlm_peers.py write-model build/bench/work/vlm/model --inputs build/bench/work/vlm/inputs.safetensors
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
sys.path.insert(0, HERE)
import llama_ref  # noqa: E402
import llm_peers  # noqa: E402
import pixtral_ref  # noqa: E402
import st  # noqa: E402

WORKLOAD = dict(text=dict(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, vocab=8000, max_pos=1024),
                vision=dict(vision_hidden=256, vision_intermediate=1024, vision_layers=4, vision_heads=4, patch=16,
                            image_size=512),
                image_hw=(256, 256))
SMALL = dict(text=dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, max_pos=256),
             vision=dict(vision_hidden=32, vision_intermediate=64, vision_layers=2, vision_heads=2, patch=4,
                         image_size=32),
             image_hw=(16, 16))
TEXT_TOKENS = 8  # around the image: TEXT_TOKENS // 2 before, the rest after


def fail(msg):
    raise SystemExit(f"vlm_peers: {msg}")


def prompt_ids(cfg, n_image_tokens):
    tok = cfg["image_token_index"]
    text = [t + 1 if t == tok else t for t in llm_peers.prompt_ids(1, TEXT_TOKENS, cfg["text_config"]["vocab_size"])[0]]
    half = TEXT_TOKENS // 2
    return text[:half] + [tok] * n_image_tokens + text[half:]


def write_model(folder, inputs, small=False):
    w = SMALL if small else WORKLOAD
    t = w["text"]
    text = llama_ref.make_config(t["hidden"], t["intermediate"], t["layers"], t["heads"], t["kv_heads"], t["vocab"],
                                 t["max_pos"])
    cfg = pixtral_ref.make_config(text, vision_act="gelu", feature_layer=-1, strategy="full", **w["vision"])
    model = pixtral_ref.write_model(folder, cfg, seed=0, layout="hub")
    h, wd = w["image_hw"]
    ids = prompt_ids(cfg, model.tokens_per_image(h, wd))
    tensors = {"pixel_values": pixtral_ref.image_pixels(1, h, wd, seed=0),
               "input_ids": torch.tensor([ids], dtype=torch.int64)}
    os.makedirs(os.path.dirname(os.path.abspath(inputs)), exist_ok=True)
    st.save(inputs + ".tmp", tensors)
    os.replace(inputs + ".tmp", inputs)
    n_params = sum(p.numel() for p in model.state_dict_hub().values())
    return {"dir": folder, "inputs": inputs, "parameters": n_params, "prompt_len": len(ids),
            "image_tokens": model.tokens_per_image(h, wd), "config": cfg}


class VlmTwin:
    """The twin loaded once, its Linears on oneDNN: vision(iters), prefill(iters), decode(iters)."""

    def __init__(self, a):
        if a.decode_tokens < 2 or a.threads < 1:
            fail(f"--decode-tokens {a.decode_tokens} must be >= 2, --threads {a.threads} >= 1")
        if not os.path.isfile(os.path.join(a.dir, "config.json")):
            fail(f"{a.dir}/config.json missing: run `vlm_peers.py write-model {a.dir} --inputs PATH` first")
        torch.set_num_threads(a.threads)
        self.a = a
        self.model = pixtral_ref.load_model(a.dir, "float32")
        inputs = st.load(a.inputs)
        self.pixels, self.ids = inputs["pixel_values"], inputs["input_ids"]
        cfg = self.model.cfg
        n_img = int((self.ids == cfg["image_token_index"]).sum())
        want = self.model.tokens_per_image(*self.pixels.shape[2:])
        if self.ids.shape[0] != 1 or n_img != want:
            fail(f"{a.inputs}: input_ids {list(self.ids.shape)} with {n_img} image tokens; expected [1, T] with "
                 f"{want} (pixel_values {list(self.pixels.shape)})")
        self.text_cfg = cfg["text_config"]
        self.dt = torch.float32
        from torch.utils import mkldnn as torch_mkldnn
        with torch.inference_mode():
            torch_mkldnn.to_mkldnn(self.model.vision_tower.transformer, self.dt)
            torch_mkldnn.to_mkldnn(self.model.multi_modal_projector, self.dt)
        llm_peers.mkldnn_linears(self.model.language_model, self.dt)
        self.prompt_len = int(self.ids.shape[1])
        self.cache0 = None  # (cache after one prefill, first greedy id)
        self.last_features = None

    def features(self):
        return self.model.image_features_batched(self.pixels)  # [1, P, text hidden]

    def _prefill(self, max_len):
        feats = self.features()
        emb = self.model.merge(self.ids, feats.reshape(-1, feats.shape[-1]))
        cache = llama_ref.KVCache(self.text_cfg, 1, max_len, self.dt)
        logits = self.model.language_model.prefill(cache, self.ids, torch.tensor([self.prompt_len]), last_only=True,
                                                   inputs_embeds=emb)
        return cache, torch.argmax(logits[:, -1], dim=-1), feats

    def vision(self, iters):
        samples, cpu = [], 0.0
        with torch.inference_mode():
            for it in range(iters):
                c0, t0 = time.process_time(), time.perf_counter()
                self.last_features = self.features()
                samples.append((time.perf_counter() - t0) * 1e3)
                cpu += (time.process_time() - c0) * 1e3
                llm_peers.progress(f"vlm pytorch vision {it}: {samples[-1]:.1f} ms")
        return samples, cpu

    def prefill(self, iters):
        samples, cpu, nxt = [], 0.0, None
        with torch.inference_mode():
            for it in range(iters):
                c0, t0 = time.process_time(), time.perf_counter()
                _, nxt, _ = self._prefill(self.prompt_len)
                nxt = int(nxt[0])
                samples.append((time.perf_counter() - t0) * 1e3)
                cpu += (time.process_time() - c0) * 1e3
                llm_peers.progress(f"vlm pytorch prefill {it}: {samples[-1]:.1f} ms")
        return samples, cpu, nxt

    def decode(self, iters):
        a = self.a
        max_len = self.prompt_len + a.decode_tokens
        samples, cpu, gen = [], 0.0, []
        with torch.inference_mode():
            if self.cache0 is None:
                cache0, first, _ = self._prefill(max_len)
                self.cache0 = (cache0, first)
            cache0, first = self.cache0
            for it in range(iters):
                cache = llama_ref.KVCache(self.text_cfg, 1, max_len, self.dt)
                cache.layers = [(k.clone(), v.clone()) for k, v in cache0.layers]
                cache.lengths = cache0.lengths.clone()
                nxt = first
                gen = [int(nxt[0])]
                for _ in range(a.decode_tokens - 1):
                    c0, t0 = time.process_time(), time.perf_counter()
                    nxt = torch.argmax(self.model.language_model.decode(cache, nxt), dim=-1)
                    gen.append(int(nxt[0]))
                    samples.append((time.perf_counter() - t0) * 1e3)
                    cpu += (time.process_time() - c0) * 1e3
                llm_peers.progress(f"vlm pytorch decode_b1 {it}: median step {llm_peers.median(samples):.2f} ms")
        return samples, cpu, [gen]

    def output(self, path):
        with torch.inference_mode():
            feats = self.last_features if self.last_features is not None else self.features()
        st.save(path + ".tmp", {"image_features": feats.to(torch.float32).contiguous()})
        os.replace(path + ".tmp", path)


def serve(a):
    twin = VlmTwin(a)
    llm_peers.reply({"ready": True, "peer": "pytorch_mkldnn", "version": f"torch {torch.__version__}",
                     "threads": torch.get_num_threads(),
                     "image_tokens": twin.model.tokens_per_image(*twin.pixels.shape[2:])})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.get("cmd")
        if cmd == "vision":
            samples, cpu = twin.vision(int(req["iters"]))
            llm_peers.reply({"samples_ms": samples, "cpu_ms": cpu})
        elif cmd == "prefill":
            samples, cpu, nxt = twin.prefill(int(req["iters"]))
            llm_peers.reply({"samples_ms": samples, "cpu_ms": cpu, "tokens": [[nxt]]})
        elif cmd == "decode":
            if int(req.get("batch", 1)) != 1:
                fail(f"decode batch {req['batch']}: the vlm workload decodes at batch 1 only")
            samples, cpu, gen = twin.decode(int(req["iters"]))
            llm_peers.reply({"samples_ms": samples, "cpu_ms": cpu, "tokens": gen})
        elif cmd == "output":
            twin.output(req["path"])
            llm_peers.reply({"ok": True})
        elif cmd == "quit":
            break
        else:
            fail(f"unknown command {cmd!r} (vision, prefill, decode, output, quit)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-model")
    w.add_argument("dir")
    w.add_argument("--inputs", required=True)
    w.add_argument("--small", action="store_true")
    s = sub.add_parser("serve")
    s.add_argument("dir")
    s.add_argument("--inputs", required=True)
    s.add_argument("--decode-tokens", type=int, default=16)
    s.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: all cores")
    a = ap.parse_args()
    if a.cmd == "write-model":
        print(json.dumps(write_model(a.dir, a.inputs, a.small)))
    else:
        serve(a)


if __name__ == "__main__":
    llm_peers.run_main(main, "vlm_peers")
