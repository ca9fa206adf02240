"""Op test cases for tests/test_ops.cpp, computed with PyTorch.

Usage: ops_ref.py OUT.safetensors

Writes one safetensors file holding, for case i, the inputs `case<i>.in<j>` and the expected
output `case<i>.out`, plus the metadata entry "cases": a JSON list with one object per case
{op, dtype, attrs, n_inputs, desc}. Expected values are computed in float64 from the inputs as
stored (float32 inputs for float32 cases, bfloat16 inputs for bfloat16 cases) and stored as
float32; int64 cases (data-movement ops only) store int64 results.
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import st  # noqa: E402

torch.manual_seed(0)
torch.set_num_threads(os.cpu_count() or 1)

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
END = 1 << 40  # "to the end" for slices (clamped like Python's x[a:])

cases = []    # metadata
tensors = {}  # name -> tensor


def randn(shape, dt, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dt)


def wide(t):
    """The float64 view of an input the expected value is computed from."""
    return t.double() if t.is_floating_point() else t


def add_case(op, dtype, inputs, fn, attrs=None):
    """fn receives the inputs widened to float64 (int64 stays int64)."""
    i = len(cases)
    expected = fn(*[wide(t) for t in inputs])
    expected = expected.float() if expected.is_floating_point() else expected
    for j, t in enumerate(inputs):
        tensors[f"case{i}.in{j}"] = t.contiguous()
    tensors[f"case{i}.out"] = expected.contiguous()
    attrs = attrs or {}
    shapes = " ".join(str(list(t.shape)) for t in inputs)
    attr_text = ", ".join(f"{k}={v}" for k, v in attrs.items())
    cases.append({"op": op, "dtype": dtype, "attrs": attrs, "n_inputs": len(inputs),
                  "desc": f"case {i}: {op} {dtype} inputs {shapes}" +
                          (f" {{{attr_text}}}" if attr_text else "")})


ACTS = {
    "none": lambda y: y,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def rms_norm(x, ns, w, eps):
    dims = tuple(range(x.dim() - len(ns), x.dim()))
    y = x / torch.sqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * w if w is not None else y


for name, dt in FLOAT_DTYPES.items():
    # ---- linear: x[..., K] @ w[N, K]^T + b, fused activation ----
    for xs, n, bias, act in [
        ([7, 32], 16, True, "none"),
        ([1, 8], 5, True, "none"),
        ([3, 5, 24], 10, False, "none"),        # 3-D input, no bias
        ([2, 3, 4, 12], 6, True, "none"),       # 4-D input
        ([3, 20], 12, True, "relu"),
        ([3, 20], 12, True, "gelu"),
        ([3, 5, 20], 12, False, "gelu_tanh"),
        ([7, 20], 12, True, "silu"),
        ([3, 256], 64, True, "none"),           # long reduction K=256
        ([5, 300], 7, True, "gelu"),
    ]:
        k = xs[-1]
        ins = [randn(xs, dt), randn([n, k], dt, 1 / math.sqrt(k))]
        if bias:
            ins.append(randn([n], dt, 0.5))
        add_case("linear", name, ins,
                 lambda x, w, b=None, act=act: ACTS[act](F.linear(x, w, b)),
                 {"activation": act})

    # ---- matmul with broadcast batch dims ----
    for a_s, b_s in [
        ([4, 5], [5, 6]),
        ([3, 4, 5], [5, 6]),
        ([2, 1, 4, 8], [3, 8, 5]),    # -> [2, 3, 4, 5]
        ([7, 5, 16], [7, 16, 3]),
        ([1, 3, 9], [4, 9, 2]),       # batch 1 broadcast against 4
        ([2, 256], [256, 3]),         # long reduction K=256
    ]:
        add_case("matmul", name, [randn(a_s, dt), randn(b_s, dt, 1 / math.sqrt(a_s[-1]))],
                 torch.matmul)

    # ---- conv2d ----
    for xs, o, k, stride, pad, dil, groups, bias in [
        ([1, 3, 7, 10], 4, [3, 3], [1, 1], [1, 1], [1, 1], 1, True),
        ([3, 4, 13, 5], 6, [3, 3], [2, 2], [1, 1], [1, 1], 1, False),   # stride 2
        ([2, 4, 9, 11], 4, [3, 3], [1, 1], [2, 2], [2, 2], 2, True),    # groups 2, dilation 2
        ([2, 6, 8, 7], 6, [3, 3], [1, 1], [1, 1], [1, 1], 6, True),     # depthwise
        ([3, 5, 7, 10], 10, [3, 3], [2, 2], [1, 1], [1, 1], 5, False),  # depthwise x2, stride 2
        ([7, 8, 5, 6], 16, [1, 1], [1, 1], [0, 0], [1, 1], 1, True),    # 1x1
        ([1, 3, 13, 10], 5, [5, 5], [2, 2], [2, 2], [1, 1], 1, True),   # 5x5, pad 2
        ([3, 2, 7, 10], 3, [5, 5], [1, 1], [0, 0], [1, 1], 1, False),   # 5x5, no padding
        ([2, 4, 13, 5], 4, [3, 2], [2, 1], [1, 2], [1, 1], 1, True),    # asymmetric
        ([1, 4, 12, 11], 6, [3, 3], [2, 2], [2, 2], [2, 2], 2, False),  # stride+dilation+groups
        ([2, 64, 6, 5], 8, [3, 3], [1, 1], [1, 1], [1, 1], 1, True),    # long reduction 576
    ]:
        cg = xs[1] // groups
        fan_in = cg * k[0] * k[1]
        ins = [randn(xs, dt), randn([o, cg] + k, dt, 1 / math.sqrt(fan_in))]
        if bias:
            ins.append(randn([o], dt, 0.5))
        add_case("conv2d", name, ins,
                 lambda x, w, b=None, s=stride, p=pad, d=dil, g=groups:
                 F.conv2d(x, w, b, stride=s, padding=p, dilation=d, groups=g),
                 {"stride": stride, "padding": pad, "dilation": dil, "groups": groups})

    # ---- adaptive_avg_pool2d ----
    for xs, os_ in [
        ([2, 3, 7, 10], [1, 1]),
        ([2, 3, 7, 10], [2, 3]),   # non-divisible
        ([1, 4, 13, 5], [3, 2]),   # non-divisible
        ([3, 2, 7, 10], [5, 4]),
        ([7, 2, 8, 6], [4, 3]),    # divisible
        ([1, 2, 3, 4], [5, 7]),    # larger than the input (windows overlap)
    ]:
        add_case("adaptive_avg_pool2d", name, [randn(xs, dt)],
                 lambda x, os_=os_: F.adaptive_avg_pool2d(x, os_), {"output_size": os_})

    # ---- max_pool2d ----
    for xs, k, s, p, d in [
        ([2, 3, 7, 10], [3, 3], [2, 2], [1, 1], [1, 1]),
        ([1, 4, 13, 5], [2, 2], [2, 2], [0, 0], [1, 1]),
        ([3, 2, 7, 10], [3, 3], [1, 1], [1, 1], [1, 1]),   # stride 1 < kernel
        ([2, 3, 13, 5], [3, 2], [2, 1], [1, 1], [1, 1]),   # non-square kernel
        ([1, 2, 11, 10], [3, 3], [2, 2], [1, 1], [2, 2]),  # dilation 2
        ([7, 1, 6, 9], [2, 3], [3, 2], [1, 0], [1, 1]),    # stride > kernel
    ]:
        add_case("max_pool2d", name, [randn(xs, dt)],
                 lambda x, k=k, s=s, p=p, d=d: F.max_pool2d(x, k, s, p, d),
                 {"kernel_size": k, "stride": s, "padding": p, "dilation": d})

    # ---- embedding (int64 indices) ----
    for idx_s, v, dim in [([3, 7], 1000, 64), ([1], 10, 4), ([2, 3, 5], 37, 16)]:
        idx = torch.randint(0, v, idx_s, dtype=torch.int64)
        idx.view(-1)[0] = v - 1  # last row
        add_case("embedding", name, [idx, randn([v, dim], dt)], F.embedding,
                 {"vocab_per_rank": 0})
    # vocabulary-sharded table at rank 0: rows >= vocab_per_rank belong to other ranks -> 0
    idx = torch.randint(0, 40, [3, 5], dtype=torch.int64)
    w = randn([16, 8], dt)
    add_case("embedding", name, [idx, w],
             lambda i, w: F.embedding(i.clamp(max=15), w) * (i < 16).unsqueeze(-1),
             {"vocab_per_rank": 16})

    # ---- layer_norm ----
    for xs, ns, affine in [
        ([3, 7, 16], [16], 2),      # weight and bias
        ([3, 7, 16], [7, 16], 0),   # last 2 dims, no affine
        ([1, 10], [10], 1),         # weight only
        ([7, 5, 6], [5, 6], 2),
        ([2, 300], [300], 2),       # long reduction
    ]:
        ins = [randn(xs, dt, 2.0) + 0.5]
        if affine >= 1:
            ins.append(randn(ns, dt))
        if affine >= 2:
            ins.append(randn(ns, dt))
        add_case("layer_norm", name, ins,
                 lambda x, w=None, b=None, ns=ns: F.layer_norm(x, ns, w, b, 1e-5),
                 {"normalized_shape": ns, "eps": 1e-5})

    # ---- rms_norm ----
    for xs, ns, weight, eps in [
        ([3, 5, 32], [32], True, 1e-6),
        ([7, 9], [9], False, 1e-6),
        ([1, 4, 6], [4, 6], True, 1e-5),   # last 2 dims
    ]:
        ins = [randn(xs, dt, 2.0)]
        if weight:
            ins.append(randn(ns, dt))
        add_case("rms_norm", name, ins,
                 lambda x, w=None, ns=ns, eps=eps: rms_norm(x, ns, w, eps),
                 {"normalized_shape": ns, "eps": eps})

    # ---- softmax ----
    for xs, dim, scale in [([3, 7, 10], 0, 1.0), ([3, 7, 10], -1, 1.0), ([3, 7, 10], 1, 1.0),
                           ([1, 13], -1, 30.0),  # large logits: needs max subtraction
                           ([7, 1], 1, 1.0)]:
        add_case("softmax", name, [randn(xs, dt, scale)],
                 lambda x, dim=dim: torch.softmax(x, dim), {"dim": dim})

    # ---- elementwise activations ----
    for xs in [[3, 7, 10], [1, 13], [7, 5, 3]]:
        for approx in ["none", "tanh"]:
            add_case("gelu", name, [randn(xs, dt, 3.0)],
                     lambda x, a=approx: F.gelu(x, approximate=a), {"approximate": approx})
        add_case("silu", name, [randn(xs, dt, 3.0)], F.silu)
        add_case("relu", name, [randn(xs, dt, 3.0)], F.relu)

    # ---- add / mul with broadcasting ----
    for a_s, b_s in [([3, 1, 5], [4, 1]), ([3, 7, 10], [3, 7, 10]), ([2, 3, 4], [4]),
                     ([1], [7, 3]), ([7, 1, 1, 4], [1, 3, 5, 1])]:
        add_case("add", name, [randn(a_s, dt), randn(b_s, dt)], torch.add)
        add_case("mul", name, [randn(a_s, dt), randn(b_s, dt)], torch.mul)

# ---- data-movement ops, float32 / bfloat16 / int64 ----
DATA_DTYPES = dict(FLOAT_DTYPES, int64=torch.int64)


def rand_any(shape, dt):
    if dt == torch.int64:  # values beyond float precision, so a float round trip shows
        return torch.randint(-(1 << 40), 1 << 40, shape, dtype=torch.int64)
    return randn(shape, dt)


for name, dt in DATA_DTYPES.items():
    for xs, shape in [([2, 3, 4, 5], [6, 20]), ([2, 3, 4, 5], [-1, 5]), ([7, 6], [3, 14]),
                      ([1, 12], [2, 2, 3])]:
        add_case("reshape", name, [rand_any(xs, dt)],
                 lambda x, shape=shape: x.reshape(shape), {"shape": shape})
    for xs, dims in [([2, 3, 4, 5], [0, 2, 3, 1]), ([2, 3, 4, 5], [3, 1, 0, 2]),
                     ([3, 7, 5], [2, 0, 1]), ([7, 3], [1, 0])]:
        add_case("permute", name, [rand_any(xs, dt)],
                 lambda x, dims=dims: x.permute(dims), {"dims": dims})
    for shapes, dim in [([[2, 3, 4], [1, 3, 4], [3, 3, 4]], 0),
                        ([[2, 1, 4], [2, 5, 4], [2, 2, 4]], 1),
                        ([[3, 4, 2], [3, 4, 1], [3, 4, 3]], -1),
                        ([[1, 7], [1, 7]], 0)]:
        add_case("concat", name, [rand_any(s, dt) for s in shapes],
                 lambda *xs, dim=dim: torch.cat(xs, dim), {"dim": dim})
    for xs, dim, start, end, step in [
        ([5, 10], 1, 1, 9, 2),         # step 2
        ([5, 10], 1, -5, END, 1),      # negative start
        ([7, 4, 6], 0, -6, -1, 2),     # negative start and end, step 2
        ([3, 13, 5], 1, 0, END, 3),
        ([3, 4, 9], 2, 2, 100, 1),     # end past the size (clamped)
        ([4, 6], 0, 1, 3, 1),
    ]:
        idx = [slice(None)] * len(xs)
        idx[dim] = slice(start, end, step)
        add_case("slice", name, [rand_any(xs, dt)],
                 lambda x, idx=tuple(idx): x[idx],
                 {"dim": dim, "start": start, "end": end, "step": step})


# ---- state_write: rows of values written into the state at positions (out of range: none) ----
def state_write_ref(state, values, positions, dim):
    out = state.clone()
    rows, steps = positions.shape
    for i in range(rows):
        for t in range(steps):
            p = int(positions[i, t])
            if 0 <= p < state.shape[dim]:
                out.select(0, i).select(dim - 1, p).copy_(values.select(0, i).select(dim - 1, t))
    return out


for name, dt in FLOAT_DTYPES.items():
    # KV-cache layout [B, H, S, D] written at dim 2: prefill rows with padding (-1), and a
    # decode step writing one position per row into the first rows of a larger cache.
    for ss, vs, pos, dim in [
        ([3, 2, 8, 4], [3, 2, 5, 4], [[0, 1, 2, 3, 4], [0, 1, 2, -1, -1], [-1, -1, -1, -1, -1]], 2),
        ([4, 2, 8, 4], [2, 2, 1, 4], [[5], [8]], 2),
        ([2, 6, 3], [2, 2, 3], [[4, 1], [-3, 5]], 1),
    ]:
        add_case("state_write", name, [randn(ss, dt), randn(vs, dt), torch.tensor(pos, dtype=torch.int64)],
                 lambda s_, v_, p_, dim=dim: state_write_ref(s_, v_, p_, dim), {"dim": dim})


# ---- sample: greedy argmax, or temperature / top-k / top-p with a given uniform u per row ----
def sample_ref(logits, params, u):
    out = []
    for b in range(logits.shape[0]):
        row = logits[b].float()  # the op computes in float32
        t, k, p = (float(v) for v in params[b])
        if t <= 0:
            out.append(int(torch.argmax(row)))
            continue
        v = row.shape[0]
        k = v if k <= 0 or k > v else int(k)
        order = sorted(range(v), key=lambda j: (-float(row[j]), j))[:k]
        z = torch.tensor([float(row[j]) for j in order], dtype=torch.float64) / t
        w = torch.exp(z - z[0])
        n = k
        if 0 < p < 1:
            cum = torch.cumsum(w, 0)
            n = int((cum >= p * w.sum()).nonzero()[0]) + 1
        w = w[:n]
        cum = torch.cumsum(w, 0)
        hit = (cum > float(u[b]) * w.sum()).nonzero()
        out.append(order[int(hit[0]) if len(hit) else n - 1])
    return torch.tensor(out, dtype=torch.int64)


for name, dt in FLOAT_DTYPES.items():
    logits = randn([6, 50], dt, 2.0)
    params = torch.tensor([[0.0, 0, 1.0], [1.0, 0, 1.0], [0.7, 5, 1.0], [1.3, 0, 0.6], [0.9, 8, 0.8], [2.0, 1, 0.5]],
                          dtype=torch.float32)
    u = torch.tensor([0.5, 0.13, 0.77, 0.31, 0.95, 0.42], dtype=torch.float32)
    add_case("sample", name, [logits, params, u], lambda l_, p_, u_: sample_ref(l_, p_, u_))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: ops_ref.py OUT.safetensors")
    st.save(sys.argv[1], tensors, {"cases": json.dumps(cases)})
