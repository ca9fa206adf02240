"""Peers of `devpipe bench`'s `llm` workload: the PyTorch twin (tests/reference/llama_ref.py) and
llama.cpp (bench/llama_cpp: GGUF writer + node-llama-cpp script).

The workload: a Llama-shaped causal LM of about 100M parameters with random weights
(hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate 2048, vocab 32000, tied embeddings:
100.1M parameters; llama_ref.py's default "wide" init, seed 0), prefill at prompt 128 (batch 1)
and greedy decode at batch 1 and 8 after a prompt of 128 tokens per sequence.

Prompt token ids, the same for every peer (and for devpipe), without an RNG:
  ids[b][i] = 3 + ((b * 131 + i) * 2654435761 + seed * 97) mod (vocab - 3)
for sequence b, position i (b = 0 is the prefill prompt; decode at batch B uses sequences 0..B-1).

Subcommands (each prints ONE JSON object on stdout, like bench/pytorch_bench.py; non-zero exit
with a message on error):

  write-model DIR [--small]      the workload's HF folder (config.json + model.safetensors);
                                 --small: hidden 64, 2 layers, vocab 300 (for quick checks)
  pytorch DIR --dtype float32|bfloat16 [--prompt-len 128 --decode-tokens 32 --batches 1,8
                                 --iters 3 --warmup 1 --prompt-seed 0]
                                 [--linear eager|mkldnn] [--threads N (default: all cores)]
      The twin, torch.set_num_threads(os.cpu_count()), inference_mode(), its own KV cache.
      prefill: samples_ms of whole 128-token prefills (batch 1); decode: for each batch B, one
      untimed prefill of B prompts, then per iteration --decode-tokens greedy steps from a copy
      of that cache, each step timed. --linear eager (mode pytorch_eager): nn.Linear as is;
      Debian's torch 1.13 does float32 matmuls with its generic BLAS (netlib libblas3: slow, about
      50x below oneDNN here). --linear mkldnn (mode pytorch_mkldnn): every nn.Linear converted by
      torch.utils.mkldnn.to_mkldnn (oneDNN inner product, the library devpipe's cpu backend uses).
      prefill times the lm_head at the prompt's last position only (what a generator needs).
  serve DIR --dtype D --linear eager|mkldnn [the options of pytorch]
      The twin as a persistent worker of `devpipe bench --workload llm` (bench/README.md, "The
      llm workload"): prints {"ready": true, "peer", "version", "threads", ...}, then answers one
      JSON line per request line: {"cmd": "prefill", "iters": N} -> {"samples_ms", "cpu_ms",
      "tokens": [[next id]]}; {"cmd": "decode", "batch": B, "iters": N} -> {"samples_ms" (every
      step of the N runs), "cpu_ms", "tokens": [[ids of sequence b] for b < B] (the last run)};
      {"cmd": "quit"}. A failure is answered {"error": ...} and the worker exits 1.
  llama-cpp DIR [same options; --kv-type F32|F16, default F32]
      Writes DIR/model-f32.gguf once (bench/llama_cpp/hf_to_gguf.py) and runs
      bench/llama_cpp/peer.mjs bench on the same prompt ids. float32 weights only.
  check [--new-tokens 32] [--skip-if-not-installed]   (exit 77 when node-llama-cpp is absent)
                                 writes small random folders (vocab 300; untied and tied) and
                                 asserts llama.cpp's greedy ids equal the twin's for a batch of 3
                                 prompts of different lengths, --new-tokens each.
  all DIR [--iters 3 ...]        write-model if DIR has no config.json, then llama-cpp, pytorch
                                 mkldnn float32 / bfloat16, eager bfloat16 / float32; prints
                                 {"llama_cpp_float32": ..., "pytorch_mkldnn_float32": ..., ...,
                                 "summary": {...}}

Output of pytorch / llama-cpp: {"mode": "pytorch_eager" | "pytorch_mkldnn" | "llama_cpp", "workload": "llm",
"dtype", "threads", "device_name", "prompt_len", "decode_tokens", "iters", "warmup",
"weight_bytes", "prefill": {"batch": 1, "samples_ms": [...], "tokens_per_s"},
"decode": {"1": {"samples_ms": [per step], "tokens_per_s", "generated_seq0": [...]}, "8": ...}}
tokens_per_s = tokens per sample / median sample. generated_seq0: sequence 0's greedy ids of the
last timed iteration (a cross-check between peers; float32 ids should agree).

  /usr/bin/python3 bench/llm_peers.py all build/bench/work/llm
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
sys.path.insert(0, os.path.join(HERE, "llama_cpp"))
import llama_ref  # noqa: E402
import hf_to_gguf  # noqa: E402

WORKLOAD = dict(hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=4, vocab=32000, max_pos=2048,
                tie=True)
SMALL = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, max_pos=512, tie=False)


def fail(msg):
    raise SystemExit(f"llm_peers: {msg}")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def prompt_ids(n_seq, length, vocab, seed=0):
    return [[3 + ((b * 131 + i) * 2654435761 + seed * 97) % (vocab - 3) for i in range(length)]
            for b in range(n_seq)]


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def write_model(folder, small=False, seed=0):
    w = SMALL if small else WORKLOAD
    cfg = llama_ref.make_config(w["hidden"], w["intermediate"], w["layers"], w["heads"], w["kv_heads"], w["vocab"],
                                w["max_pos"], tie=w["tie"])
    llama_ref.write_model(folder, cfg, seed=seed)
    return cfg


def weight_bytes(cfg, elem):
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    d = llama_ref.head_dim(cfg)
    per_layer = h * d * (cfg["num_attention_heads"] * 2 + cfg["num_key_value_heads"] * 2) + 3 * h * i + 2 * h
    emb = cfg["vocab_size"] * h
    return elem * (n * per_layer + emb * (1 if cfg["tie_word_embeddings"] else 2) + h)


def check_args(a):
    if a.prompt_len < 1 or a.decode_tokens < 2 or a.iters < 1 or a.warmup < 0:
        fail(f"--prompt-len {a.prompt_len} must be >= 1, --decode-tokens {a.decode_tokens} >= 2, "
             f"--iters {a.iters} >= 1, --warmup {a.warmup} >= 0")
    if a.threads < 1:
        fail(f"--threads must be >= 1, got {a.threads}")
    batches = [int(b) for b in a.batches.split(",")]
    if any(b < 1 for b in batches):
        fail(f"--batches {a.batches}: each batch must be >= 1")
    if not os.path.isfile(os.path.join(a.dir, "config.json")):
        fail(f"{a.dir}/config.json missing: run `llm_peers.py write-model {a.dir}` first")
    return batches


# --- PyTorch twin ------------------------------------------------------------------------

def mkldnn_linears(lm, dt):
    """Every nn.Linear of llama_ref's LlamaForCausalLM `lm` becomes torch.utils.mkldnn.MkldnnLinear
    (oneDNN inner product), in place; the embedding, norms, rope and attention stay as they are.
    (Also used by vlm_peers.py for the VLM's text model.)"""
    from torch.utils import mkldnn as torch_mkldnn
    with torch.inference_mode():
        for layer in lm.model.layers:
            torch_mkldnn.to_mkldnn(layer.self_attn, dt)
            torch_mkldnn.to_mkldnn(layer.mlp, dt)
        lm.lm_head = torch_mkldnn.to_mkldnn(torch.nn.Sequential(lm.lm_head), dt)[0]


class Twin:
    """The PyTorch twin of one (dtype, linear) mode, loaded once: prefill(iters) and decode(b, iters)
    as the bench times them (see the module docstring)."""

    def __init__(self, a):
        self.batches = check_args(a)
        self.a = a
        torch.set_num_threads(a.threads)
        self.model = llama_ref.load_model(a.dir, a.dtype)
        self.cfg = cfg = self.model.cfg
        if a.prompt_len + a.decode_tokens > cfg["max_position_embeddings"]:
            fail(f"--prompt-len {a.prompt_len} + --decode-tokens {a.decode_tokens} > max_position_embeddings "
                 f"{cfg['max_position_embeddings']}")
        self.dt = self.model.lm_head.weight.dtype
        self.prompts = prompt_ids(max(self.batches), a.prompt_len, cfg["vocab_size"], a.prompt_seed)
        self.mode = "pytorch_eager" if a.linear == "eager" else "pytorch_mkldnn"
        self.caches = {}  # batch -> (cache after the prompts' prefill, first greedy ids)
        if a.linear == "mkldnn":
            mkldnn_linears(self.model, self.dt)

    def prefill(self, iters, log=True):
        """iters whole prefills of prompt 0 (batch 1, a fresh cache each, the lm_head at the last
        position only): (samples_ms, cpu_ms of the samples, the next greedy id)."""
        a = self.a
        ids = torch.tensor(self.prompts[:1])
        lengths = torch.tensor([a.prompt_len])
        samples, cpu = [], 0.0
        with torch.inference_mode():
            for it in range(iters):
                cache = llama_ref.KVCache(self.cfg, 1, a.prompt_len, self.dt)
                c0, t0 = time.process_time(), time.perf_counter()
                logits = self.model.prefill(cache, ids, lengths, last_only=True)
                nxt = int(torch.argmax(logits[0, -1]))
                samples.append((time.perf_counter() - t0) * 1e3)
                cpu += (time.process_time() - c0) * 1e3
                if log:
                    progress(f"{self.mode} {a.dtype} prefill {it}: {samples[-1]:.1f} ms")
        return samples, cpu, nxt

    def decode(self, b, iters, log=True):
        """iters runs of --decode-tokens greedy tokens for sequences 0..b-1, each from a copy of
        the cache after one (untimed, cached) prefill of their prompts; each step timed:
        (samples_ms, cpu_ms of the steps, every sequence's ids of the last run)."""
        a = self.a
        with torch.inference_mode():
            if b not in self.caches:
                ids = torch.tensor(self.prompts[:b])
                lengths = torch.full((b,), a.prompt_len, dtype=torch.int64)
                cache0 = llama_ref.KVCache(self.cfg, b, a.prompt_len + a.decode_tokens, self.dt)
                first = torch.argmax(self.model.prefill(cache0, ids, lengths, last_only=True)[:, -1], dim=-1)
                self.caches[b] = (cache0, first)
            cache0, first = self.caches[b]
            samples, cpu, gen = [], 0.0, []
            for it in range(iters):
                cache = llama_ref.KVCache(self.cfg, b, a.prompt_len + a.decode_tokens, self.dt)
                cache.layers = [(k.clone(), v.clone()) for k, v in cache0.layers]
                cache.lengths = cache0.lengths.clone()
                nxt = first
                gen = [[int(t)] for t in nxt]
                for _ in range(a.decode_tokens - 1):
                    c0, t0 = time.process_time(), time.perf_counter()
                    nxt = torch.argmax(self.model.decode(cache, nxt), dim=-1)
                    ids = nxt.tolist()
                    samples.append((time.perf_counter() - t0) * 1e3)
                    cpu += (time.process_time() - c0) * 1e3
                    for s, t in enumerate(ids):
                        gen[s].append(int(t))
                if log:
                    progress(f"{self.mode} {a.dtype} decode b{b} iteration {it}: median step {median(samples):.1f} ms")
        return samples, cpu, gen


def run_pytorch(a):
    twin = Twin(a)
    out = {"mode": twin.mode, "workload": "llm", "dtype": a.dtype, "threads": torch.get_num_threads(),
           "device": "cpu", "device_name": cpu_name(), "torch_version": torch.__version__,
           "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens, "iters": a.iters, "warmup": a.warmup,
           "weight_bytes": weight_bytes(twin.cfg, 4 if a.dtype == "float32" else 2), "decode": {}}
    if a.warmup:
        twin.prefill(a.warmup)
    samples, _, nxt = twin.prefill(a.iters)
    out["prefill"] = {"batch": 1, "samples_ms": samples, "tokens_per_s": a.prompt_len / (median(samples) / 1e3),
                      "next_id": nxt}
    for b in twin.batches:
        if a.warmup:
            twin.decode(b, a.warmup)
        samples, _, gen = twin.decode(b, a.iters)
        out["decode"][str(b)] = {"samples_ms": samples, "tokens_per_s": b / (median(samples) / 1e3),
                                 "generated_seq0": gen[0]}
    return out


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve_pytorch(a):
    """The twin as a persistent worker of `devpipe bench` (bench/README.md, the llm protocol):
    one JSON request per line on stdin, one reply per line on stdout."""
    twin = Twin(a)
    reply({"ready": True, "peer": twin.mode, "version": f"torch {torch.__version__}",
           "threads": torch.get_num_threads(), "dtype": a.dtype,
           "weight_bytes": weight_bytes(twin.cfg, 4 if a.dtype == "float32" else 2)})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.get("cmd")
        if cmd == "prefill":
            samples, cpu, nxt = twin.prefill(int(req["iters"]))
            reply({"samples_ms": samples, "cpu_ms": cpu, "tokens": [[nxt]]})
        elif cmd == "decode":
            b = int(req["batch"])
            if b not in twin.batches:
                fail(f"decode batch {b} is not among --batches {a.batches}")
            samples, cpu, gen = twin.decode(b, int(req["iters"]))
            reply({"samples_ms": samples, "cpu_ms": cpu, "tokens": gen})
        elif cmd == "quit":
            break
        else:
            fail(f"unknown command {cmd!r} (prefill, decode, quit)")


# --- llama.cpp ---------------------------------------------------------------------------

def node_peer(args, what):
    cmd = ["node", os.path.join(HERE, "llama_cpp", "peer.mjs")] + args
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        fail("node not found (apt-get install nodejs npm), needed for the llama.cpp peer")
    if p.returncode != 0:
        fail(f"{what}: peer.mjs exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        fail(f"{what}: peer.mjs printed no JSON: {p.stdout[-500:]!r} {p.stderr[-1000:]!r}")


def gguf_for(folder):
    path = os.path.join(folder, "model-f32.gguf")
    src = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors") or f == "config.json"]
    if not os.path.isfile(path) or os.path.getmtime(path) < max(os.path.getmtime(f) for f in src):
        hf_to_gguf.write_gguf(folder, path)
    return path


def run_llama_cpp(a):
    batches = check_args(a)
    if a.dtype != "float32":
        fail(f"--dtype {a.dtype}: the llama.cpp peer runs the float32 GGUF only")
    cfg = llama_ref.load_config(a.dir)
    prompts = prompt_ids(max(batches), a.prompt_len, cfg["vocab_size"], a.prompt_seed)
    r = node_peer(["bench", "--model", gguf_for(a.dir), "--prompts", ";".join(",".join(map(str, p)) for p in prompts),
                   "--decode-tokens", str(a.decode_tokens), "--batches", a.batches, "--iters", str(a.iters),
                   "--warmup", str(a.warmup), "--threads", str(a.threads), "--kv-type", a.kv_type],
                  "llama-cpp bench")
    out = {"mode": "llama_cpp", "workload": "llm", "dtype": "float32", "threads": r["threads"], "device": "cpu",
           "device_name": cpu_name(), "node_llama_cpp": r["node_llama_cpp"], "kv_cache_type": r["kv_cache_type"],
           "prompt_len": a.prompt_len, "decode_tokens": a.decode_tokens, "iters": a.iters, "warmup": a.warmup,
           "weight_bytes": weight_bytes(cfg, 4),
           "prefill": {"batch": 1, "samples_ms": r["prefill_ms"], "tokens_per_s": r["prefill_tokens_per_s"]},
           "decode": {b: {"samples_ms": d["step_ms"], "tokens_per_s": d["tokens_per_s"],
                          "generated_seq0": d["generated_seq0"]} for b, d in r["decode"].items()}}
    return out


# --- check -------------------------------------------------------------------------------

def llama_cpp_installed():
    pkg = os.environ.get("DEVPIPE_LLAMA_CPP_DIR") or os.path.join(HERE, "..", "build", "llama_cpp")
    node = any(os.access(os.path.join(d, "node"), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep))
    return node and os.path.isdir(os.path.join(pkg, "node_modules", "node-llama-cpp"))


def run_check(a):
    if a.skip_if_not_installed and not llama_cpp_installed():
        print("llm_peers check: SKIPPED: node-llama-cpp is not installed (bash bench/llama_cpp/install.sh)")
        sys.exit(77)
    prompts = [[1, 17, 42, 7, 99], [5, 6], [3, 250, 11, 12, 13, 14, 15, 200, 201, 202, 11]]
    report = {"new_tokens": a.new_tokens, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for tie in (False, True):
            folder = os.path.join(tmp, f"tie{int(tie)}")
            w = dict(SMALL, tie=tie)
            cfg = llama_ref.make_config(w["hidden"], w["intermediate"], w["layers"], w["heads"], w["kv_heads"],
                                        w["vocab"], w["max_pos"], tie=tie)
            llama_ref.write_model(folder, cfg, seed=5)
            model = llama_ref.load_model(folder, "float32")
            twin = llama_ref.generate(model, prompts, a.new_tokens, stop_at_eos=False, record=False)["generated"]
            lc = node_peer(["generate", "--model", gguf_for(folder), "--prompts",
                            ";".join(",".join(map(str, p)) for p in prompts), "--max-new-tokens", str(a.new_tokens)],
                           "llama-cpp generate")["generated"]
            same = [i for i in range(len(prompts)) if twin[i] == lc[i]]
            report["models"].append({"tie_word_embeddings": tie, "vocab_size": cfg["vocab_size"], "twin": twin,
                                     "llama_cpp": lc, "equal": len(same) == len(prompts)})
            if len(same) != len(prompts):
                bad = next(i for i in range(len(prompts)) if i not in same)
                first = next(j for j in range(a.new_tokens) if twin[bad][j] != lc[bad][j])
                print(json.dumps(report))
                fail(f"tie_word_embeddings={tie}: prompt {bad}: llama.cpp greedy id {lc[bad][first]} != twin's "
                     f"{twin[bad][first]} at new token {first}")
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-model")
    w.add_argument("dir")
    w.add_argument("--small", action="store_true")
    w.add_argument("--seed", type=int, default=0)
    for name in ("pytorch", "llama-cpp", "all", "serve"):
        p = sub.add_parser(name)
        p.add_argument("dir")
        if name != "all":
            p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
        p.add_argument("--prompt-len", type=int, default=128)
        p.add_argument("--decode-tokens", type=int, default=32)
        p.add_argument("--batches", default="1,8")
        p.add_argument("--iters", type=int, default=3)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--prompt-seed", type=int, default=0)
        p.add_argument("--kv-type", choices=["F32", "F16"], default="F32")
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: all cores")
        if name not in ("llama-cpp", "all"):
            p.add_argument("--linear", choices=["eager", "mkldnn"], default="eager")
    c = sub.add_parser("check")
    c.add_argument("--new-tokens", type=int, default=32)
    c.add_argument("--skip-if-not-installed", action="store_true",
                   help="exit 77 (ctest's skip) when node or node-llama-cpp is missing")
    a = ap.parse_args()
    if a.cmd == "write-model":
        cfg = write_model(a.dir, a.small, a.seed)
        res = {"dir": a.dir, "parameters": weight_bytes(cfg, 1), "config": cfg}
    elif a.cmd == "pytorch":
        res = run_pytorch(a)
    elif a.cmd == "llama-cpp":
        res = run_llama_cpp(a)
    elif a.cmd == "check":
        res = run_check(a)
    elif a.cmd == "serve":
        serve_pytorch(a)
        return
    else:
        if not os.path.isfile(os.path.join(a.dir, "config.json")):
            write_model(a.dir)
        res = {}
        for key, runner, dtype, linear in (("llama_cpp_float32", run_llama_cpp, "float32", None),
                                           ("pytorch_mkldnn_float32", run_pytorch, "float32", "mkldnn"),
                                           ("pytorch_mkldnn_bfloat16", run_pytorch, "bfloat16", "mkldnn"),
                                           ("pytorch_eager_bfloat16", run_pytorch, "bfloat16", "eager"),
                                           ("pytorch_eager_float32", run_pytorch, "float32", "eager")):
            a.dtype, a.linear = dtype, linear
            res[key] = runner(a)
        res["summary"] = {k: {"prefill_tokens_per_s": round(v["prefill"]["tokens_per_s"], 1),
                              **{f"decode_b{b}_tokens_per_s": round(d["tokens_per_s"], 1)
                                 for b, d in v["decode"].items()}}
                          for k, v in res.items()}
        res["summary"]["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count()}
    print(json.dumps(res))


def run_main(main, name):
    """Runs `main`; a `serve` worker answers any failure as {"error": ...} on stdout before it exits
    non-zero (the bench reads that line instead of a silent end). Also used by vlm_peers.py and
    dit_peers.py."""
    try:
        main()
    except SystemExit as e:
        if e.code not in (None, 0) and sys.argv[1:2] == ["serve"]:
            reply({"error": str(e.code)})
        raise
    except Exception as e:  # noqa: BLE001  (a serving worker answers every failure, then exits)
        if sys.argv[1:2] == ["serve"]:
            reply({"error": f"{name}: {type(e).__name__}: {e}"})
            sys.exit(1)
        raise


if __name__ == "__main__":
    run_main(main, "llm_peers")
