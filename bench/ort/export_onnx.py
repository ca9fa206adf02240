"""Exports a `devpipe bench` workload to ONNX for the ONNX Runtime peer, from the same weights.

  /usr/bin/python3 bench/ort/export_onnx.py --workload seed --weights W --inputs I --out M.onnx

Builds the workload with bench/pytorch_bench.py's modules on the weights devpipe wrote, traces it
on the inputs devpipe wrote (input0, input1, ...; their shapes are the model's static shapes) and
writes the model with torch.onnx.export (opset 13), inputs named input0..., output "output".
The file is written beside and renamed into place. Exits non-zero with a message on failure.
"""
import argparse
import os
import sys

import torch

here = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(here, ".."))
import pytorch_bench  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", required=True, choices=["seed", "large", "chain8"])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = pytorch_bench.build_pipeline(args.workload, args.weights)
    inputs = tuple(pytorch_bench.load_inputs(args.inputs))
    names = [f"input{i}" for i in range(len(inputs))]
    tmp = args.out + ".tmp"
    with torch.no_grad():
        torch.onnx.export(model, inputs, tmp, input_names=names, output_names=["output"],
                          opset_version=13, do_constant_folding=True)
    os.replace(tmp, args.out)
    print(args.out)


if __name__ == "__main__":
    main()
