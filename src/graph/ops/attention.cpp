// RotaryEmbedding, ScaledDotProductAttention and MaskedAttention (the attention of a decoder
// with a KV cache, optionally over the cache's first C keys with a key mask [B, C]).
#include <cmath>
#include <optional>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {

float rope_inv_freq(std::int64_t i, std::int64_t dim, double theta) {
  return static_cast<float>(1.0 / std::pow(theta, static_cast<double>(2 * i) / static_cast<double>(dim)));
}

double attention_scale(const Attrs& attrs, std::int64_t head_dim) {
  return attrs.has("scale") ? attrs.f("scale") : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

std::array<std::int64_t, 4> attention_mask_strides(const Shape& mask) {
  std::array<std::int64_t, 4> st{};
  std::int64_t stride = 1;
  for (int d = 3, md = mask.rank() - 1; d >= 0 && md >= 0; --d, --md) {
    const std::int64_t n = mask[static_cast<std::size_t>(md)];
    st[static_cast<std::size_t>(d)] = n == 1 ? 0 : stride;
    stride *= n;
  }
  return st;
}

namespace {

std::vector<ValueInfo> infer_rotary(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  const Shape& p = in[1].shape;
  if (!is_floating(in[0].dtype)) throw DTypeError("rotary_embedding: needs a floating-point input");
  if (in[1].dtype != DType::Int64) {
    throw DTypeError("rotary_embedding: positions must be int64, got " +
                     std::string(dtype_name(in[1].dtype)));
  }
  if (x.rank() != 4 || x[3] % 2 != 0) {
    throw ShapeError("rotary_embedding: x must be [B, H, T, D] with D even, got " + x.to_string());
  }
  if (p.rank() != 2 || p[0] != x[0] || p[1] != x[2]) {
    throw ShapeError("rotary_embedding: positions " + p.to_string() + " must be [B, T] = [" +
                     std::to_string(x[0]) + ", " + std::to_string(x[2]) + "] for x " + x.to_string());
  }
  if (!(attrs.f("theta") > 0)) {
    throw ShapeError("rotary_embedding: theta must be positive, got " + std::to_string(attrs.f("theta")));
  }
  return {in[0]};
}

// q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] -> [B, Hq, T, Dv].
ValueInfo infer_qkv(const char* op, const std::vector<ValueInfo>& in) {
  const Shape &q = in[0].shape, &k = in[1].shape, &v = in[2].shape;
  if (!is_floating(in[0].dtype) || in[1].dtype != in[0].dtype || in[2].dtype != in[0].dtype) {
    throw DTypeError(std::string(op) + ": q, k and v must share one floating dtype, got " +
                     std::string(dtype_name(in[0].dtype)) + ", " +
                     std::string(dtype_name(in[1].dtype)) + ", " +
                     std::string(dtype_name(in[2].dtype)));
  }
  if (q.rank() != 4 || k.rank() != 4 || v.rank() != 4) {
    throw ShapeError(std::string(op) + ": q, k, v must be [B, H, T, D], got " + shapes_to_string(in));
  }
  if (k[0] != q[0] || v[0] != q[0] || k[3] != q[3] || v[1] != k[1] || v[2] != k[2]) {
    throw ShapeError(std::string(op) + ": q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv] "
                     "do not fit: " + shapes_to_string({in[0], in[1], in[2]}));
  }
  if (k[1] == 0 || q[1] % k[1] != 0) {
    throw ShapeError(std::string(op) + ": the " + std::to_string(q[1]) +
                     " query heads are not a multiple of the " + std::to_string(k[1]) +
                     " key/value heads");
  }
  return {Shape({q[0], q[1], q[2], v[3]}), in[0].dtype};
}

void check_scale(const char* op, const Attrs& attrs) {
  if (attrs.has("scale") && !std::isfinite(attrs.f("scale"))) {
    throw ShapeError(std::string(op) + ": scale must be finite, got " + std::to_string(attrs.f("scale")));
  }
}

std::vector<ValueInfo> infer_sdpa(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const char* op = "scaled_dot_product_attention";
  ValueInfo out = infer_qkv(op, in);
  check_scale(op, attrs);
  const bool causal = attrs.i("is_causal", 0) != 0;
  if (in.size() == 4) {
    if (causal) {
      throw InvalidArgument(std::string(op) + ": give either attn_mask or is_causal, not both");
    }
    const ValueInfo& m = in[3];
    if (m.dtype != DType::Int64 && m.dtype != in[0].dtype) {
      throw DTypeError(std::string(op) + ": attn_mask must be int64 (nonzero: attend) or " +
                       std::string(dtype_name(in[0].dtype)) + " (added to the scores), got " +
                       std::string(dtype_name(m.dtype)));
    }
    const Shape full({in[0].shape[0], in[0].shape[1], in[0].shape[2], in[1].shape[2]});
    bool fits = m.shape.rank() <= 4;
    for (int i = 0; fits && i < m.shape.rank(); ++i) {
      const std::int64_t d = m.shape[static_cast<std::size_t>(m.shape.rank() - 1 - i)];
      fits = d == 1 || d == full[static_cast<std::size_t>(3 - i)];
    }
    if (!fits) {
      throw ShapeError(std::string(op) + ": attn_mask " + m.shape.to_string() +
                       " does not broadcast to the scores " + full.to_string());
    }
  }
  return {out};
}

std::vector<ValueInfo> infer_masked_attention(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const char* op = "masked_attention";
  ValueInfo out = infer_qkv(op, in);
  check_scale(op, attrs);
  const Shape& q = in[0].shape;
  if (in[3].dtype != DType::Int64 || in[4].dtype != DType::Int64) {
    throw DTypeError(std::string(op) + ": q_positions and kv_lengths must be int64");
  }
  if (!(in[3].shape == Shape({q[0], q[2]})) || !(in[4].shape == Shape({q[0]}))) {
    throw ShapeError(std::string(op) + ": q_positions " + in[3].shape.to_string() +
                     " must be [B, T] = [" + std::to_string(q[0]) + ", " + std::to_string(q[2]) +
                     "] and kv_lengths " + in[4].shape.to_string() + " must be [B] = [" +
                     std::to_string(q[0]) + "]");
  }
  if (in.size() == 6) {
    const ValueInfo& m = in[5];
    const std::int64_t S = in[1].shape[2];
    if (m.dtype != DType::Int64) {
      throw DTypeError(std::string(op) + ": key_mask must be int64 (nonzero: attend), got " +
                       std::string(dtype_name(m.dtype)));
    }
    if (m.shape.rank() != 2 || m.shape[0] != q[0] || m.shape[1] < 1 || m.shape[1] > S) {
      throw ShapeError(std::string(op) + ": key_mask " + m.shape.to_string() + " must be [B, C] with B = " +
                       std::to_string(q[0]) + " and 1 <= C <= " + std::to_string(S) + " (the cache length)");
    }
  }
  return {out};
}


// ---- reference ----

void ref_rotary(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                const RefContext&) {
  const Shape& xs = in[0].shape();
  const std::int64_t B = xs[0], H = xs[1], T = xs[2], D = xs[3], half = D / 2;
  const double theta = attrs.f("theta");
  const auto x = in[0].to_float_vector();
  const std::int64_t* pos = in[1].data<std::int64_t>();
  std::vector<float> y(x.size());
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t t = 0; t < T; ++t) {
        const std::size_t row = static_cast<std::size_t>(((b * H + h) * T + t) * D);
        for (std::int64_t i = 0; i < half; ++i) {
          // The angle as float32 (one multiply, as Hugging Face computes it); cos/sin in double.
          const float angle = static_cast<float>(pos[b * T + t]) * rope_inv_freq(i, D, theta);
          const double c = std::cos(static_cast<double>(angle)), s = std::sin(static_cast<double>(angle));
          const double x1 = x[row + static_cast<std::size_t>(i)];
          const double x2 = x[row + static_cast<std::size_t>(i + half)];
          y[row + static_cast<std::size_t>(i)] = static_cast<float>(x1 * c - x2 * s);
          y[row + static_cast<std::size_t>(i + half)] = static_cast<float>(x2 * c + x1 * s);
        }
      }
    }
  }
  out[0].copy_from(Tensor::from_vector(y, out[0].shape(), out[0].dtype()));
}

// softmax(q k^T * scale + bias) v per (b, h, i) over the keys `visible` admits, in double; a
// query that sees no key (or only -inf scores) gives zeros. kv head h / (Hq / Hkv) serves
// query head h.
template <class Visible, class Bias>
void attend(const std::vector<Tensor>& in, Tensor& out, double scale, Visible&& visible, Bias&& bias) {
  const Shape &qs = in[0].shape(), &ks = in[1].shape(), &vs = in[2].shape();
  const std::int64_t B = qs[0], Hq = qs[1], T = qs[2], D = qs[3], Hkv = ks[1], S = ks[2], Dv = vs[3];
  const std::int64_t group = Hq / Hkv;
  const auto q = in[0].to_float_vector(), k = in[1].to_float_vector(), v = in[2].to_float_vector();
  std::vector<float> y(static_cast<std::size_t>(B * Hq * T * Dv), 0.f);
  std::vector<double> s(static_cast<std::size_t>(S)), o(static_cast<std::size_t>(Dv));
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t hk = h / group;
      for (std::int64_t i = 0; i < T; ++i) {
        const std::size_t qrow = static_cast<std::size_t>(((b * Hq + h) * T + i) * D);
        double mx = -INFINITY;
        for (std::int64_t j = 0; j < S; ++j) {
          double sc = -INFINITY;
          if (visible(b, h, i, j)) {
            const std::size_t krow = static_cast<std::size_t>(((b * Hkv + hk) * S + j) * D);
            double dot = 0;
            for (std::int64_t d = 0; d < D; ++d) {
              dot += static_cast<double>(q[qrow + static_cast<std::size_t>(d)]) * k[krow + static_cast<std::size_t>(d)];
            }
            sc = dot * scale + bias(b, h, i, j);
          }
          s[static_cast<std::size_t>(j)] = sc;
          mx = std::max(mx, sc);
        }
        if (mx == -INFINITY) continue;  // nothing visible: zeros
        double sum = 0;
        std::fill(o.begin(), o.end(), 0.0);
        for (std::int64_t j = 0; j < S; ++j) {
          const double p = std::exp(s[static_cast<std::size_t>(j)] - mx);
          if (p == 0) continue;
          sum += p;
          const std::size_t vrow = static_cast<std::size_t>(((b * Hkv + hk) * S + j) * Dv);
          for (std::int64_t d = 0; d < Dv; ++d) o[static_cast<std::size_t>(d)] += p * v[vrow + static_cast<std::size_t>(d)];
        }
        const std::size_t yrow = static_cast<std::size_t>(((b * Hq + h) * T + i) * Dv);
        for (std::int64_t d = 0; d < Dv; ++d) {
          y[yrow + static_cast<std::size_t>(d)] = static_cast<float>(o[static_cast<std::size_t>(d)] / sum);
        }
      }
    }
  }
  out.copy_from(Tensor::from_vector(y, out.shape(), out.dtype()));
}

void ref_sdpa(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
              const RefContext&) {
  const double scale = attention_scale(attrs, in[0].shape()[3]);
  const bool causal = attrs.i("is_causal", 0) != 0;
  if (in.size() < 4) {
    attend(in, out[0], scale,
           [&](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) { return !causal || j <= i; },
           [](std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return 0.0; });
    return;
  }
  // The mask broadcast to [B, Hq, T, S], addressed through its own strides.
  const auto st = attention_mask_strides(in[3].shape());
  auto at = [st](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    return b * st[0] + h * st[1] + i * st[2] + j * st[3];
  };
  if (in[3].dtype() == DType::Int64) {
    const std::int64_t* m = in[3].data<std::int64_t>();
    attend(in, out[0], scale,
           [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) { return m[at(b, h, i, j)] != 0; },
           [](std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return 0.0; });
  } else {
    const auto m = in[3].to_float_vector();
    attend(in, out[0], scale,
           [](std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return true; },
           [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
             return static_cast<double>(m[static_cast<std::size_t>(at(b, h, i, j))]);
           });
  }
}

void ref_masked_attention(const std::vector<Tensor>& in, std::vector<Tensor>& out,
                          const Attrs& attrs, const RefContext&) {
  const std::int64_t B = in[0].shape()[0], T = in[0].shape()[2], S = in[1].shape()[2];
  const std::int64_t* pos = in[3].data<std::int64_t>();
  const std::int64_t* len = in[4].data<std::int64_t>();
  for (std::int64_t b = 0; b < B; ++b) {
    if (len[b] < 0 || len[b] > S) {
      throw InvalidArgument("masked_attention: kv_lengths[" + std::to_string(b) + "] = " +
                            std::to_string(len[b]) + " is outside [0, " + std::to_string(S) +
                            "] (the cache length)");
    }
  }
  // key_mask [B, C]: only keys j < C whose mask is set.
  const std::int64_t C = in.size() == 6 ? in[5].shape()[1] : S;
  const std::int64_t* km = in.size() == 6 ? in[5].data<std::int64_t>() : nullptr;
  attend(in, out[0], attention_scale(attrs, in[0].shape()[3]),
         [&](std::int64_t b, std::int64_t, std::int64_t i, std::int64_t j) {
           return j <= pos[b * T + i] && j < len[b] && j < C && (!km || km[b * C + j] != 0);
         },
         [](std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return 0.0; });
}

}  // namespace

namespace ops {
const OpDef kRotaryEmbedding{OpKind::RotaryEmbedding, "rotary_embedding", 2, 2, infer_rotary,
                             ref_rotary};
const OpDef kScaledDotProductAttention{OpKind::ScaledDotProductAttention,
                                       "scaled_dot_product_attention", 3, 4, infer_sdpa, ref_sdpa};
const OpDef kMaskedAttention{OpKind::MaskedAttention, "masked_attention", 5, 6,
                             infer_masked_attention, ref_masked_attention};
}  // namespace ops
}  // namespace devpipe
