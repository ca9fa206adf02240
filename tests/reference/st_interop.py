"""Safetensors interop between devpipe and PyTorch (via st.py).

  st_interop.py write PATH   writes the known tensors below to PATH (devpipe reads and checks)
  st_interop.py verify PATH  reads PATH (written by devpipe) and checks it holds exactly the
                             same tensors and metadata; exits non-zero on any mismatch

The values must match tests/test_safetensors.cpp (expected_tensors()).
"""
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

METADATA = {"format": "pt", "note": "interop ünïcode"}


def expected():
    f32 = [(i - 12) * 0.25 for i in range(24)]
    f32[0] = float("inf")
    f32[1] = float("-inf")
    f32[2] = -0.0
    f32[3] = 1.0 / 3.0
    f32[4] = 1e-40  # subnormal
    f32[5] = 3.0e38
    bf16 = [(i - 7) * 0.5 for i in range(15)]
    bf16[0] = float("inf")
    bf16[1] = -0.0
    bf16[2] = 2.0 ** -130  # subnormal, exact in bfloat16
    f16 = [(i - 3) * 0.125 for i in range(7)]
    f16[0] = 65504.0
    f16[1] = 2.0 ** -24  # smallest subnormal
    i64 = [-(2 ** 63), 2 ** 63 - 1, 0, -1]
    return {
        "f32": torch.tensor(f32, dtype=torch.float32).reshape(2, 3, 4),
        "bf16": torch.tensor(bf16, dtype=torch.bfloat16).reshape(5, 3),
        "f16": torch.tensor(f16, dtype=torch.float16),
        "i64": torch.tensor(i64, dtype=torch.int64).reshape(2, 2),
        "scalar": torch.tensor(-2.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
    }


def bits(t):
    """The raw bits, so that -0.0, inf and NaN compare exactly."""
    if t.dtype == torch.float32:
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def verify(path):
    got = st.load(path)
    want = expected()
    ok = True
    if set(got) != set(want):
        print(f"names differ: got {sorted(got)}, want {sorted(want)}")
        ok = False
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            continue
        if g.dtype != w.dtype or list(g.shape) != list(w.shape):
            print(f"{name}: got {g.dtype} {list(g.shape)}, want {w.dtype} {list(w.shape)}")
            ok = False
        elif not torch.equal(bits(g), bits(w)):
            print(f"{name}: values differ:\n got {g}\nwant {w}")
            ok = False
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    if n % 8 != 0:
        print(f"header length {n} is not a multiple of 8")
        ok = False
    if header.get("__metadata__") != METADATA:
        print(f"metadata: got {header.get('__metadata__')}, want {METADATA}")
        ok = False
    return ok


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "verify"):
        print(__doc__)
        return 2
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "write":
        st.save(path, expected(), METADATA)
        return 0
    return 0 if verify(path) else 1


if __name__ == "__main__":
    sys.exit(main())
