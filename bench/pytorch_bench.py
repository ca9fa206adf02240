"""PyTorch baseline for `devpipe bench`.

Builds one benchmark workload (seed, large, chain8) as torch.nn modules, loads the weights the
devpipe tool wrote (safetensors, PyTorch state-dict keys), runs `--warmup` untimed and `--iters`
timed iterations of the whole pipeline, and prints ONE JSON object on stdout:

  {"mode": "pytorch_eager" | "pytorch_cuda_graphs", "device": ..., "threads": ...,
   "torch_version": ..., "samples_ms": [...], "output_checksum": ...}

Run it with the system interpreter that has PyTorch (/usr/bin/python3), e.g.
  /usr/bin/python3 bench/pytorch_bench.py --workload seed --weights W --iters 20 --warmup 3
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


def _load(module, path, device):
    if not os.path.isfile(path):
        raise SystemExit(f"pytorch_bench: missing weights file {path}")
    module.load_state_dict(st.load(path), strict=True)
    return module.to(device).eval()


def build(workload, weights, device):
    """Returns (inputs: tuple of tensors, fn: callable(*inputs) -> output tensor)."""
    gen = torch.Generator().manual_seed(0)
    if workload == "seed":
        vision = _load(VisionModel(512), os.path.join(weights, "vision.safetensors"), device)
        text = _load(TextModel(512, 256, 512, 1024), os.path.join(weights, "text.safetensors"), device)
        image = torch.randn(32, 3, 224, 224, generator=gen).to(device)
        text_in = torch.randn(32, 256, generator=gen).to(device)

        def fn(image, text_in):
            return text(vision(image), text_in)

        return (image, text_in), fn
    if workload == "large":
        expand = _load(Proj(8, 1280), os.path.join(weights, "expand.safetensors"), device)
        reduce = _load(Proj(1280, 8), os.path.join(weights, "reduce.safetensors"), device)
        x = torch.randn(32, 1440, 8, generator=gen).to(device)

        def fn(x):
            return reduce(expand(x))

        return (x,), fn
    if workload == "chain8":
        stages = [_load(Chain8Stage(), os.path.join(weights, f"stage{i}.safetensors"), device)
                  for i in range(8)]
        x = torch.randn(1, 64, generator=gen).to(device)

        def fn(x):
            for s in stages:
                x = s(x)
            return x

        return (x,), fn
    raise SystemExit(f"pytorch_bench: unknown workload {workload!r} (seed, large, chain8)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, choices=["seed", "large", "chain8"])
    ap.add_argument("--weights", required=True, help="directory holding the workload's .safetensors")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
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
    torch.manual_seed(0)
    device = torch.device(args.device)
    cuda = args.device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    samples = []
    with torch.inference_mode():
        inputs, fn = build(args.workload, args.weights, device)
        if args.cuda_graphs:
            # Warm up on a side stream (required before capture), then capture once.
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(max(args.warmup, 3)):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = fn(*inputs)
            run = lambda: (graph.replay(), static_out)[1]  # noqa: E731
            for _ in range(args.warmup):
                run()
        else:
            run = lambda: fn(*inputs)  # noqa: E731
            for _ in range(args.warmup):
                run()
        sync()
        out = None
        for _ in range(args.iters):
            t0 = time.perf_counter()
            out = run()
            sync()
            samples.append((time.perf_counter() - t0) * 1e3)
        checksum = float(out.double().sum().item())

    print(json.dumps({
        "mode": "pytorch_cuda_graphs" if args.cuda_graphs else "pytorch_eager",
        "device": args.device,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "workload": args.workload,
        "iters": args.iters,
        "warmup": args.warmup,
        "samples_ms": samples,
        "output_checksum": checksum,
    }))


if __name__ == "__main__":
    main()
