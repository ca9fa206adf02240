"""Unsharded PyTorch twin of the tensor-parallel test model (tests/test_pipeline.cpp).

  embed: Embedding(64, 32)            <- ParallelEmbedding in devpipe
  up:    Linear(32, 48)               <- ColumnParallelLinear(gather_output=False)
  gelu
  down:  Linear(48, 32)               <- RowParallelLinear(input_is_parallel=True)
  head:  Linear(32, 24)               <- ColumnParallelLinear(gather_output=True)
  side:  Linear(32, 16)               <- RowParallelLinear(input_is_parallel=False)
  outputs: head(x) and side(x) where x = down(gelu(up(embed(ids))))  (two outputs)
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402


class TpMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 32)
        self.head = nn.Linear(32, 24)
        self.side = nn.Linear(32, 16)

    def forward(self, ids):
        x = self.embed(ids)
        x = self.down(torch.nn.functional.gelu(self.up(x)))
        return self.head(x), self.side(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(7)
    m = TpMlp().eval()
    ids = torch.randint(0, 64, (args.batch, 5))
    with torch.inference_mode():
        a, b = m(ids)
    os.makedirs(os.path.join(args.out, "ckpt"), exist_ok=True)
    st.save(os.path.join(args.out, "ckpt", "model.safetensors"), m.state_dict())
    st.save(os.path.join(args.out, "io.safetensors"), {"ids": ids, "head": a, "side": b})


if __name__ == "__main__":
    main()
