"""The PyTorch twin of `devpipe bench`'s `dit` workload (bench/README.md, "The dit workload"): diffusers'
DiTPipeline (a class-conditional DiT transformer, DDIM, classifier-free guidance) as
tests/reference/dit_ref.py writes and computes it, random weights, batch 2 at guidance 4 (the transformer
sees the doubled batch of 4), float32.

The workload (WORKLOAD; SMALL with --small, for tests): DiT-S/2-256's transformer at a third of its depth —
6 heads x 64 (inner 384), 4 layers (DiT-S has 12), latents 4 x 32 x 32, patch 2 (256 tokens), learned sigma
(8 output channels), 1000 classes; 13.5M parameters (each block has its own timestep and class embedders, as
diffusers' DiTTransformer2DModel) — with dit_ref's default DDIMScheduler (1000 train steps, linear betas,
leading spacing, clip_sample). The depth keeps a whole `devpipe bench --workload dit` within about 3 minutes
on this 2-vCPU machine (bench/README.md, "The dit workload").
SMALL: dit_ref's default toy (2 heads x 16, 2 layers, latents 4 x 8 x 8, 10 classes).

The inputs, written once by write-model and read by every mode (devpipe and this twin):
  latents       F32 [2, 4, S, S]   torch.randn with torch.Generator().manual_seed(0) (as dit_ref run --seed 0)
  class_labels  I64 [2]            LABELS (207, 360) modulo the classes

Subcommands (each prints ONE JSON object on stdout; non-zero exit with a message on error):

  write-model DIR --inputs PATH [--small]
      DIR (dit_ref.write_model, seed 0: model_index.json, transformer/, scheduler/) and PATH (the inputs).
  serve DIR --inputs PATH [--steps 10] [--guidance 4.0] [--linear mkldnn|eager] [--threads N (all cores)]
      The twin as a persistent worker: torch.set_num_threads(N), inference_mode(), dit_ref's DiT and DDIM;
      --linear mkldnn (the default, mode pytorch_mkldnn): every nn.Linear of the transformer converted by
      torch.utils.mkldnn.to_mkldnn (oneDNN inner product; Debian's torch 1.13 does float32 nn.Linear on
      netlib BLAS otherwise, see llm_peers.py); the attention's two matmuls stay torch's (netlib too).
      One denoising step is dit_ref.run_pipeline's loop body: the batch doubled (the classes, then the null
      class), the transformer, the learned-sigma split, the guidance combine, DDIM's step. Prints
      {"ready": true, "peer", "version", "threads", "timesteps"}, then answers one JSON line per request line:
        {"cmd": "step", "iters": N}      -> {"samples_ms", "cpu_ms"}: one step from the inputs' latents at
                                            the first timestep of --steps (the noisiest)
        {"cmd": "generate", "iters": N}  -> {"samples_ms", "cpu_ms"}: the --steps steps from the inputs'
                                            latents to the final ones
        {"cmd": "output", "path": P}     -> writes the last step's output ("step") and the last generate's
                                            final latents ("latents"), F32 [2, 4, S, S], to P; {"ok": true}
        {"cmd": "quit"}
      A failure is answered {"error": ...} and the worker exits 1.

  /usr/bin/python3 bench/dit_peers.py write-model build/bench/work/dit/model --inputs build/bench/work/dit/inputs.safetensors
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
import dit_ref  # noqa: E402
import llm_peers  # noqa: E402
import st  # noqa: E402

WORKLOAD = dict(heads=6, head_dim=64, in_channels=4, learned_sigma=True, layers=4, sample_size=32, patch=2,
                classes=1000)
SMALL = dict(heads=2, head_dim=16, in_channels=4, learned_sigma=True, layers=2, sample_size=8, patch=2, classes=10)
LABELS = (207, 360)  # modulo the classes: the batch of 2
SEED = 0


def fail(msg):
    raise SystemExit(f"dit_peers: {msg}")


def write_model(folder, inputs, small=False):
    tcfg = dit_ref.make_transformer_config(**(SMALL if small else WORKLOAD))
    model = dit_ref.write_model(folder, tcfg, dit_ref.make_scheduler_config(), seed=SEED)
    c, s, k = tcfg["in_channels"], tcfg["sample_size"], tcfg["num_embeds_ada_norm"]
    tensors = {"latents": torch.randn(len(LABELS), c, s, s, generator=torch.Generator().manual_seed(SEED),
                                      dtype=torch.float32),
               "class_labels": torch.tensor([y % k for y in LABELS], dtype=torch.int64)}
    os.makedirs(os.path.dirname(os.path.abspath(inputs)), exist_ok=True)
    st.save(inputs + ".tmp", tensors)
    os.replace(inputs + ".tmp", inputs)
    return {"dir": folder, "inputs": inputs, "parameters": sum(p.numel() for p in model.state_dict().values()),
            "class_labels": tensors["class_labels"].tolist(), "transformer": tcfg}


class DitTwin:
    """The twin loaded once: step(iters), generate(iters), output(path)."""

    def __init__(self, a):
        if a.steps < 1 or a.threads < 1 or not a.guidance > 1:
            fail(f"--steps {a.steps} and --threads {a.threads} must be >= 1, --guidance {a.guidance} > 1")
        torch.set_num_threads(a.threads)
        self.model, self.sched = dit_ref.load_pipeline(a.dir, "float32")
        cfg = self.model.cfg
        inputs = st.load(a.inputs)
        self.latents, self.labels = inputs["latents"], inputs["class_labels"]
        c, s, k = cfg["in_channels"], cfg["sample_size"], cfg["num_embeds_ada_norm"]
        b = self.labels.shape[0]
        if tuple(self.latents.shape) != (b, c, s, s) or self.labels.dtype != torch.int64:
            fail(f"{a.inputs}: latents {list(self.latents.shape)}, class_labels {self.labels.dtype} "
                 f"{list(self.labels.shape)}; expected [{b}, {c}, {s}, {s}] and int64 [{b}]")
        self.labels_in = torch.cat([self.labels, torch.full((b,), k, dtype=torch.int64)])  # + the null class
        self.guidance = a.guidance
        self.timesteps = self.sched.set_timesteps(a.steps)
        self.mode = "pytorch_mkldnn" if a.linear == "mkldnn" else "pytorch_eager"
        if a.linear == "mkldnn":
            from torch.utils import mkldnn as torch_mkldnn
            with torch.inference_mode():
                for i, blk in enumerate(self.model.transformer_blocks):
                    self.model.transformer_blocks[i] = torch_mkldnn.to_mkldnn(blk)  # its Linears; not the table
                self.model.proj_out_1 = torch_mkldnn.to_mkldnn(self.model.proj_out_1)
                self.model.proj_out_2 = torch_mkldnn.to_mkldnn(self.model.proj_out_2)
        self.last_step = None
        self.last_latents = None

    def denoise(self, x, t):
        """One step of dit_ref.run_pipeline with guidance (x: the batch's latents [B, C, S, S])."""
        b, c = x.shape[0], self.model.cfg["in_channels"]
        out = self.model(torch.cat([x, x]), t.expand(2 * b), self.labels_in)
        eps = out[:, :c]  # learned sigma: the variance channels are dropped
        cond, uncond = eps[:b], eps[b:]
        return self.sched.step(uncond + self.guidance * (cond - uncond), t, x)

    def _timed(self, iters, what, fn):
        samples, cpu = [], 0.0
        with torch.inference_mode():
            for it in range(iters):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1e3)
                cpu += (time.process_time() - c0) * 1e3
                llm_peers.progress(f"dit {self.mode} {what} {it}: {samples[-1]:.1f} ms")
        return samples, cpu

    def step(self, iters):
        def one():
            self.last_step = self.denoise(self.latents, self.timesteps[0])
        return self._timed(iters, "step", one)

    def generate(self, iters):
        def one():
            x = self.latents
            for t in self.timesteps:
                x = self.denoise(x, t)
            self.last_latents = x
        return self._timed(iters, "generate", one)

    def output(self, path):
        if self.last_step is None:
            self.step(1)
        if self.last_latents is None:
            self.generate(1)
        st.save(path + ".tmp", {"step": self.last_step.contiguous(), "latents": self.last_latents.contiguous()})
        os.replace(path + ".tmp", path)


def serve(a):
    twin = DitTwin(a)
    llm_peers.reply({"ready": True, "peer": twin.mode, "version": f"torch {torch.__version__}",
                     "threads": torch.get_num_threads(), "timesteps": [int(t) for t in twin.timesteps]})
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        cmd = req.get("cmd")
        if cmd in ("step", "generate"):
            samples, cpu = getattr(twin, cmd)(int(req["iters"]))
            llm_peers.reply({"samples_ms": samples, "cpu_ms": cpu})
        elif cmd == "output":
            twin.output(req["path"])
            llm_peers.reply({"ok": True})
        elif cmd == "quit":
            break
        else:
            fail(f"unknown command {cmd!r} (step, generate, output, quit)")


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
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--guidance", type=float, default=4.0)
    s.add_argument("--linear", choices=["mkldnn", "eager"], default="mkldnn")
    s.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="default: all cores")
    a = ap.parse_args()
    if a.cmd == "write-model":
        print(json.dumps(write_model(a.dir, a.inputs, a.small)))
    else:
        serve(a)


if __name__ == "__main__":
    llm_peers.run_main(main, "dit_peers")
