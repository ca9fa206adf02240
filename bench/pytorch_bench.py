"""PyTorch peer of `devpipe bench`: a persistent worker speaking the bench's pipe protocol.

Builds one benchmark workload (seed, large, chain8) as torch.nn modules on the weights devpipe
wrote (safetensors, PyTorch state-dict keys) and the inputs devpipe wrote (safetensors, keys
input0, input1, ... in the order the whole pipeline takes them), tuned as a user would
(`torch.set_num_threads(os.cpu_count())`, `eval()`, `torch.inference_mode()`), then serves
requests, one JSON object per line on stdin, one reply per line on stdout (bench/README.md,
"The worker protocol"):

  start                          -> {"ready": true, "peer": "pytorch_eager", "version": ..., "threads": N}
  {"cmd": "run", "iters": N}     -> {"samples_ms": [...], "cpu_ms": total CPU time of the N, "checksum": ...}
  {"cmd": "output", "path": P}   -> writes the last output to P (safetensors, key "output"); {"ok": true}
  {"cmd": "quit"} or end of input -> exits 0

Any failure is answered {"error": "..."} and the worker exits 1. Run it with the interpreter that
has PyTorch (/usr/bin/python3):
  /usr/bin/python3 bench/pytorch_bench.py --workload seed --weights W --inputs I
(add --device cuda [--cuda-graphs] on a GPU machine). Without --serve it answers one
{"cmd": "run", "iters": --iters} after --warmup untimed iterations and exits.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import st  # noqa: E402
from vision_text_ref import TextModel, VisionModel  # noqa: E402  (the seed's models, shared with the tests)


# --- models (same structure and state-dict keys as the devpipe workloads) -----------------
# The seed's VisionModel and TextModel come from tests/reference/vision_text_ref.py.

class Proj(nn.Module):
    """One `large` stage: keys proj.weight, proj.bias."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.proj = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.proj(x)


class Chain8Stage(nn.Module):
    """One `chain8` stage: keys fc.weight, fc.bias; Linear then exact GELU."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x))


class Pipeline(nn.Module):
    """The whole workload as one module: forward(input0, input1, ...) -> final output."""

    def __init__(self, workload, stages):
        super().__init__()
        self.workload = workload
        self.stages = nn.ModuleList(stages)

    def forward(self, *inputs):
        if self.workload == "seed":
            vision, text = self.stages
            return text(vision(inputs[0]), inputs[1])
        x = inputs[0]
        for s in self.stages:
            x = s(x)
        return x


def _load(module, path):
    if not os.path.isfile(path):
        raise SystemExit(f"pytorch_bench: missing weights file {path}")
    module.load_state_dict(st.load(path), strict=True)
    return module.eval()


def build_pipeline(workload, weights):
    """The workload's Pipeline module on the weights in directory `weights`."""
    if workload == "seed":
        stages = [_load(VisionModel(512), os.path.join(weights, "vision.safetensors")),
                  _load(TextModel(512, 256, 512, 1024), os.path.join(weights, "text.safetensors"))]
    elif workload == "large":
        stages = [_load(Proj(8, 1280), os.path.join(weights, "expand.safetensors")),
                  _load(Proj(1280, 8), os.path.join(weights, "reduce.safetensors"))]
    elif workload == "chain8":
        stages = [_load(Chain8Stage(), os.path.join(weights, f"stage{i}.safetensors")) for i in range(8)]
    else:
        raise SystemExit(f"pytorch_bench: unknown workload {workload!r} (seed, large, chain8)")
    return Pipeline(workload, stages).eval()


def load_inputs(path):
    """The inputs devpipe wrote: tensors input0, input1, ... in order."""
    if not os.path.isfile(path):
        raise SystemExit(f"pytorch_bench: missing inputs file {path}")
    d = st.load(path)
    out = []
    while f"input{len(out)}" in d:
        out.append(d[f"input{len(out)}"])
    if not out or len(out) != len(d):
        raise SystemExit(f"pytorch_bench: {path} must hold input0..inputN-1, has {sorted(d)}")
    return out


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, choices=["seed", "large", "chain8"])
    ap.add_argument("--weights", required=True, help="directory holding the workload's .safetensors")
    ap.add_argument("--inputs", required=True, help="the inputs' safetensors (input0, input1, ...)")
    ap.add_argument("--serve", action="store_true", help="serve requests on stdin (the bench's protocol)")
    ap.add_argument("--iters", type=int, default=20, help="without --serve: timed iterations")
    ap.add_argument("--warmup", type=int, default=3, help="without --serve: untimed iterations first")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cuda-graphs", action="store_true", help="capture once, replay (cuda only)")
    args = ap.parse_args()
    if args.iters < 1 or args.warmup < 0:
        raise SystemExit("pytorch_bench: --iters must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("pytorch_bench: --device cuda but torch.cuda is not available")
    if args.cuda_graphs and args.device != "cuda":
        raise SystemExit("pytorch_bench: --cuda-graphs needs --device cuda")

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    device = torch.device(args.device)
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    with torch.inference_mode():
        model = build_pipeline(args.workload, args.weights).to(device)
        inputs = [t.to(device) for t in load_inputs(args.inputs)]
        if args.cuda_graphs:
            s = torch.cuda.Stream()  # warm up on a side stream (required before capture)
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    model(*inputs)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = model(*inputs)
            run = lambda: (graph.replay(), static_out)[1]  # noqa: E731
        else:
            run = lambda: model(*inputs)  # noqa: E731
        mode = "pytorch_cuda_graphs" if args.cuda_graphs else "pytorch_eager"
        last = [None]

        def timed(n):
            samples = []
            c0 = time.process_time()
            for _ in range(n):
                t0 = time.perf_counter()
                last[0] = run()
                sync()
                samples.append((time.perf_counter() - t0) * 1e3)
            cpu_ms = (time.process_time() - c0) * 1e3
            return {"samples_ms": samples, "cpu_ms": cpu_ms, "checksum": float(last[0].double().sum().item())}

        hello = {"ready": True, "peer": mode, "version": f"PyTorch {torch.__version__}",
                 "threads": torch.get_num_threads(), "device": args.device}
        if not args.serve:
            for _ in range(args.warmup):
                run()
            out = timed(args.iters)
            out.update(hello)
            reply(out)
            return
        reply(hello)
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            cmd = req.get("cmd")
            if cmd == "run":
                reply(timed(int(req["iters"])))
            elif cmd == "output":
                if last[0] is None:
                    raise RuntimeError("output requested before any run")
                st.save(req["path"], {"output": last[0].float().cpu()})
                reply({"ok": True})
            elif cmd == "quit":
                break
            else:
                raise RuntimeError(f"unknown command {cmd!r} (run, output, quit)")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        if e.code not in (None, 0):
            reply({"error": str(e.code)})
        raise
    except Exception as e:  # noqa: BLE001  (every failure is answered, then the worker exits)
        reply({"error": f"pytorch_bench: {type(e).__name__}: {e}"})
        sys.exit(1)
