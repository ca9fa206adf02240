"""Writes a PyTorch pickle checkpoint (what `torch.save(model.state_dict())` gives, as Hugging
Face's pytorch_model.bin) for tests/test_checkpoint.cpp, plus the same tensors as
expected.safetensors (st.py) to compare a conversion against.

  --out DIR            pytorch_model.bin in DIR
  --out DIR --sharded  pytorch_model-0000{1,2}-of-00002.bin and pytorch_model.bin.index.json

The state dict has what real ones have and safetensors refuses as is: two keys sharing one
tensor (tied weights) and a non-contiguous tensor (a transposed view).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sharded", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(3)
    embed = torch.randn(5, 4)
    sd = {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: the same tensor
        "proj.weight": torch.randn(3, 4).t(),  # non-contiguous view
        "proj.bias": torch.randn(3),
    }
    os.makedirs(args.out, exist_ok=True)
    if args.sharded:
        shards = {"pytorch_model-00001-of-00002.bin": ["embed.weight", "lm_head.weight"],
                  "pytorch_model-00002-of-00002.bin": ["proj.weight", "proj.bias"]}
        weight_map = {}
        for name, keys in shards.items():
            torch.save({k: sd[k] for k in keys}, os.path.join(args.out, name))
            weight_map.update({k: name for k in keys})
        with open(os.path.join(args.out, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    else:
        torch.save(sd, os.path.join(args.out, "pytorch_model.bin"))
    st.save(os.path.join(args.out, "expected.safetensors"), {k: v.contiguous() for k, v in sd.items()})


if __name__ == "__main__":
    main()
