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


INT_RESULT_OPS = ("argmax", "sample")  # floating inputs, int64 result


def add_case(op, dtype, inputs, fn, attrs=None):
    """fn receives the inputs widened to float64 (int64 stays int64)."""
    i = len(cases)
    expected = fn(*[wide(t) for t in inputs])
    if dtype in FLOAT_DTYPES and not expected.is_floating_point() and op not in INT_RESULT_OPS:
        raise ValueError(f"{op}: expected an integer result only from {INT_RESULT_OPS}")
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

    # ---- conv2d_global_avg_pool: conv2d, then adaptive_avg_pool2d to (1, 1) ----
    for xs, o, k, stride, pad, dil, groups, bias in [
        ([2, 3, 20, 23], 64, [3, 3], [1, 1], [1, 1], [1, 1], 1, True),   # the seed's conv, smaller
        ([1, 4, 9, 11], 20, [3, 3], [2, 2], [1, 1], [2, 2], 2, False),   # stride, dilation, groups
        ([2, 16, 6, 4], 80, [1, 1], [1, 1], [0, 0], [1, 1], 1, True),    # 1x1, 80 channels
        ([2, 4, 5, 30], 33, [3, 2], [1, 3], [0, 2], [1, 2], 1, True),    # asymmetric
    ]:
        cg = xs[1] // groups
        fan_in = cg * k[0] * k[1]
        ins = [randn(xs, dt), randn([o, cg] + k, dt, 1 / math.sqrt(fan_in))]
        if bias:
            ins.append(randn([o], dt, 0.5))
        add_case("conv2d_global_avg_pool", name, ins,
                 lambda x, w, b=None, s=stride, p=pad, d=dil, g=groups:
                 F.adaptive_avg_pool2d(F.conv2d(x, w, b, stride=s, padding=p, dilation=d,
                                                groups=g), [1, 1]),
                 {"stride": stride, "padding": pad, "dilation": dil, "groups": groups})

    # ---- conv_patch_mean: each filter tap's input window averaged over the conv's output
    # positions (what folding makes of conv2d + adaptive_avg_pool2d((1, 1))): F.unfold's
    # columns [N, C * kh * kw, L], averaged over L ----
    for xs, k, stride, pad, dil in [
        ([2, 3, 20, 23], [3, 3], [1, 1], [1, 1], [1, 1]),   # the seed's conv, smaller
        ([1, 4, 9, 11], [3, 3], [2, 2], [1, 1], [2, 2]),    # stride, dilation
        ([3, 5, 7, 10], [3, 2], [1, 3], [2, 0], [1, 2]),    # asymmetric, padding > reach
        ([2, 16, 6, 4], [1, 1], [1, 1], [0, 0], [1, 1]),    # 1x1
    ]:
        add_case("conv_patch_mean", name, [randn(xs, dt)],
                 lambda x, k=k, s=stride, p=pad, d=dil:
                 F.unfold(x, k, dilation=d, padding=p, stride=s).mean(dim=2),
                 {"kernel_size": k, "stride": stride, "padding": pad, "dilation": dil})

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

# ---- ops of decoder LLMs (issue 10) ----


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rope(x, pos, theta):
    """Hugging Face's rotate-half rotary embedding with inv_freq rounded to float32 and the
    angle as one float32 multiply (how LlamaRotaryEmbedding computes them), cos/sin in float64."""
    d = x.shape[-1]
    inv = (1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)).float()
    angle = pos.float()[..., None] * inv          # [B, T, D/2], float32
    emb = torch.cat((angle, angle), dim=-1).double()[:, None]   # [B, 1, T, D]
    return x * emb.cos() + rotate_half(x) * emb.sin()


def attention(q, k, v, visible=None, bias=None, scale=None):
    """softmax(q k^T * scale + bias) v over the visible keys, by hand (PyTorch 1.13 has no
    F.scaled_dot_product_attention); GQA by repeat_interleave; a row with no visible key -> 0."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows that see nothing
    return p @ v


def positions_visible(pos, lens, s):
    j = torch.arange(s)
    return (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < lens[:, None, None])


for name, dt in FLOAT_DTYPES.items():
    for a_s, b_s in [([3, 1, 5], [4, 1]), ([3, 7, 10], [3, 7, 10]), ([2, 3, 4], [4]),
                     ([1], [7, 3])]:
        add_case("sub", name, [randn(a_s, dt), randn(b_s, dt)], torch.sub)
        den = randn(b_s, dt)
        den = (den.sign() + (den == 0).to(dt)) * (den.abs() + 0.5)   # |den| >= 0.5
        add_case("div", name, [randn(a_s, dt), den], torch.div)
    for xs in [[3, 7, 10], [1, 13]]:
        add_case("exp", name, [randn(xs, dt, 2.0)], torch.exp)
        add_case("tanh", name, [randn(xs, dt, 3.0)], torch.tanh)
        add_case("sigmoid", name, [randn(xs, dt, 4.0)], torch.sigmoid)
        add_case("neg", name, [randn(xs, dt)], torch.neg)
    for value in [0.5, -3.25, 1e-3]:
        add_case("add_scalar", name, [randn([4, 9], dt)], lambda x, v=value: x + v, {"value": value})
        add_case("mul_scalar", name, [randn([4, 9], dt)], lambda x, v=value: x * v, {"value": value})
    for shape, value in [([3, 4], 1.5), ([2, 1, 5], -0.125), ([7], 0.0)]:
        add_case("full", name, [], lambda s=shape, v=value: torch.full(s, v, dtype=torch.float64),
                 {"shape": shape, "value": value, "dtype": name})
    for n in [1, 17, 256]:
        add_case("arange", name, [], lambda n=n: torch.arange(n, dtype=torch.float64),
                 {"n": n, "dtype": name})
    for xs, dims, keep in [([3, 7, 10], [2], False), ([3, 7, 10], [0, 2], True),
                           ([4, 300], [1], False), ([2, 3, 4, 5], [1, 2, 3], False),
                           ([5, 6], [0], True)]:
        add_case("sum", name, [randn(xs, dt)],
                 lambda x, d=dims, k=keep: torch.sum(x, d, keepdim=k), {"dims": dims, "keepdim": int(keep)})
        add_case("mean", name, [randn(xs, dt)],
                 lambda x, d=dims, k=keep: torch.mean(x, d, keepdim=k), {"dims": dims, "keepdim": int(keep)})
    for xs, dim, keep in [([3, 7, 10], 2, False), ([3, 7, 10], 0, True), ([2, 32000], 1, False),
                          ([6, 5], 1, True)]:
        add_case("argmax", name, [randn(xs, dt)],
                 lambda x, d=dim, k=keep: torch.argmax(x, d, keepdim=k), {"dim": dim, "keepdim": int(keep)})
    ties = torch.tensor([[1.0, 3.0, 3.0, -2.0], [5.0, 5.0, 5.0, 5.0]], dtype=dt)  # first max wins
    add_case("argmax", name, [ties], lambda x: torch.argmax(x, 1), {"dim": 1, "keepdim": 0})
    for xs, dim, idx in [([5, 7], 0, [4, 0, 0, 2]), ([3, 6, 4], 1, [5, 1]), ([2, 3, 8], 2, [7])]:
        add_case("index_select", name, [randn(xs, dt), torch.tensor(idx, dtype=torch.int64)],
                 lambda x, i, d=dim: torch.index_select(x, d, i), {"dim": dim})
    for xs, dim, ishape in [([4, 6], 1, [4, 3]), ([4, 6], 0, [2, 6]), ([2, 3, 5], 2, [2, 2, 7]),
                            ([3, 9], 1, [3, 1])]:
        idx = torch.randint(0, xs[dim], ishape, dtype=torch.int64)
        add_case("gather", name, [randn(xs, dt), idx],
                 lambda x, i, d=dim: torch.gather(x, d, i), {"dim": dim})
    for cs, a_s, b_s in [([3, 4], [3, 4], [3, 4]), ([1, 4], [3, 1], [4]), ([2, 1, 5], [5], [2, 3, 1])]:
        cond = torch.randint(-1, 2, cs, dtype=torch.int64)  # -1, 0, 1: nonzero is true
        add_case("where", name, [cond, randn(a_s, dt), randn(b_s, dt)],
                 lambda c, a, b: torch.where(c != 0, a, b))
    for xs, ms, value in [([3, 4, 5], [3, 4, 5], -1.5), ([2, 3, 4], [4], float("-inf")),
                          ([2, 3, 4], [2, 1, 4], 7.0)]:
        mask = torch.randint(0, 2, ms, dtype=torch.int64)
        add_case("masked_fill", name, [randn(xs, dt), mask],
                 lambda x, m, v=value: x.masked_fill(m != 0, v),
                 {"value": value if math.isfinite(value) else str(value)})  # JSON has no inf

    # ---- rotary_embedding ----
    for b, h, t, d, theta, pos in [
        (2, 3, 5, 8, 10000.0, None),
        (1, 4, 7, 64, 500000.0, None),
        (3, 2, 1, 16, 10000.0, [[0], [1000], [4095]]),   # decode steps, large positions
        (2, 1, 4, 128, 10000.0, [[-1, -1, 0, 1], [0, 1, 2, 3]]),  # left padding (-1)
    ]:
        p = torch.randint(0, 50, [b, t], dtype=torch.int64) if pos is None else torch.tensor(pos)
        add_case("rotary_embedding", name, [randn([b, h, t, d], dt), p],
                 lambda x, p, th=theta: rope(x, p, th), {"theta": theta})

    # ---- scaled_dot_product_attention ----
    def sdpa_case(qs, ks, dv, mask=None, causal=False, scale=None):
        b, hq, t, d = qs
        hkv, s = ks
        ins = [randn(qs, dt), randn([b, hkv, s, d], dt), randn([b, hkv, s, dv], dt)]
        attrs = {"is_causal": int(causal)}
        if scale is not None:
            attrs["scale"] = scale
        if mask is None:
            vis = torch.ones(t, s, dtype=torch.bool).tril() if causal else None
            add_case("scaled_dot_product_attention", name, ins,
                     lambda q, k, v: attention(q, k, v, visible=vis, scale=scale), attrs)
            return
        kind, mshape = mask
        if kind == "int":
            m = torch.randint(0, 2, mshape, dtype=torch.int64)
            m[..., 0] = 1  # every row sees a key (PyTorch would give NaN otherwise)
            add_case("scaled_dot_product_attention", name, ins + [m],
                     lambda q, k, v, m: attention(q, k, v, visible=m != 0, scale=scale), attrs)
        else:
            m = randn(mshape, dt)
            m = m.masked_fill(torch.rand(mshape) < 0.2, float("-inf"))
            m[..., 0] = 0.0
            add_case("scaled_dot_product_attention", name, ins + [m],
                     lambda q, k, v, m: attention(q, k, v, bias=m, scale=scale), attrs)

    sdpa_case([2, 4, 5, 8], [4, 5], 8)
    sdpa_case([2, 4, 5, 8], [4, 5], 8, causal=True)
    sdpa_case([1, 6, 3, 16], [2, 9], 16, causal=True)              # GQA, T < S (top-left)
    sdpa_case([2, 4, 7, 8], [2, 7], 12, mask=("int", [2, 1, 7, 7]))  # Dv != D
    sdpa_case([1, 4, 6, 32], [1, 10], 32, mask=("int", [6, 10]))   # multi-query
    sdpa_case([2, 2, 5, 8], [2, 6], 8, mask=("float", [2, 2, 5, 6]))
    sdpa_case([1, 3, 4, 8], [3, 40], 8, mask=("float", [1, 3, 1, 40]), scale=0.3)
    sdpa_case([1, 2, 70, 16], [2, 70], 16, causal=True)            # several key blocks

    # ---- masked_attention ----
    def masked_case(b, hq, hkv, t, s, d, pos, lens, scale=None):
        ins = [randn([b, hq, t, d], dt), randn([b, hkv, s, d], dt), randn([b, hkv, s, d], dt),
               torch.tensor(pos, dtype=torch.int64), torch.tensor(lens, dtype=torch.int64)]
        attrs = {} if scale is None else {"scale": scale}
        add_case("masked_attention", name, ins,
                 lambda q, k, v, p, n: attention(q, k, v, visible=positions_visible(p, n, s)[:, None],
                                                 scale=scale), attrs)

    # prefill of 3 prompts of lengths 5, 3, 1 right-padded to 5 (padding rows at position -1)
    masked_case(3, 4, 2, 5, 8, 16, [[0, 1, 2, 3, 4], [0, 1, 2, -1, -1], [0, -1, -1, -1, -1]],
                [5, 3, 1])
    # decode: one token per sequence at positions 6, 2, 40 of a 48-slot cache
    masked_case(3, 6, 2, 1, 48, 32, [[6], [2], [40]], [7, 3, 41])
    # decode with a padded batch slot (kv length 0) and an explicit scale
    masked_case(2, 2, 2, 1, 16, 8, [[-1], [9]], [0, 10], scale=0.25)
    # chunked prefill: queries at positions 4..7 over a cache already holding 4 tokens
    masked_case(1, 4, 4, 4, 12, 16, [[4, 5, 6, 7]], [8])
    # long sequence: T = S = 512, half of the second sequence padding
    long_pos = [list(range(512)), list(range(256)) + [-1] * 256]
    masked_case(2, 4, 2, 512, 512, 64, long_pos, [512, 256])

# ---- int64 arithmetic of the new ops ----
big = lambda s: torch.randint(-(1 << 40), 1 << 40, s, dtype=torch.int64)  # noqa: E731
add_case("sub", "int64", [big([3, 4]), big([4])], torch.sub)
add_case("neg", "int64", [big([2, 5])], torch.neg)
add_case("add_scalar", "int64", [big([2, 5])], lambda x: x + 7, {"value": 7.0})
add_case("mul_scalar", "int64", [big([2, 5])], lambda x: x * -3, {"value": -3.0})
add_case("full", "int64", [], lambda: torch.full([2, 3], -4, dtype=torch.int64),
         {"shape": [2, 3], "value": -4.0, "dtype": "int64"})
add_case("arange", "int64", [], lambda: torch.arange(9), {"n": 9, "dtype": "int64"})
add_case("index_select", "int64", [big([4, 3]), torch.tensor([3, 3, 0])],
         lambda x, i: torch.index_select(x, 0, i), {"dim": 0})
add_case("gather", "int64", [big([3, 5]), torch.randint(0, 5, [3, 2])],
         lambda x, i: torch.gather(x, 1, i), {"dim": 1})
add_case("where", "int64", [torch.randint(0, 2, [3, 4]), big([3, 4]), big([4])],
         lambda c, a, b: torch.where(c != 0, a, b))
add_case("masked_fill", "int64", [big([3, 4]), torch.randint(0, 2, [3, 1])],
         lambda x, m: x.masked_fill(m != 0, -1), {"value": -1.0})

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
