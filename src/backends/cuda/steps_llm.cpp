// Steps of the decoder-LLM ops (kernels_llm.cu): exp/tanh/sigmoid, neg/add_scalar/mul_scalar,
// full/arange, where/masked_fill, index_select/gather, argmax, sum/mean, rotary embedding and
// attention (scaled_dot_product_attention, masked_attention).
#include <algorithm>
#include <cstring>

#include "backends/cuda/executor.h"
#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe::cuda {

namespace {

void check_rank(const BuildContext& cx, const Shape& s) {
  if (s.rank() > kMaxDims) {
    throw Unsupported("cuda backend: " + cx.where + ": rank above " + std::to_string(kMaxDims));
  }
}

/// Raw bits of one element of `dtype` holding `value`.
unsigned long long element_bits(DType dtype, double value) {
  unsigned long long bits = 0;
  switch (dtype) {
    case DType::Float32: {
      const float f = static_cast<float>(value);
      std::memcpy(&bits, &f, 4);
      break;
    }
    case DType::BFloat16:
      bits = float_to_bf16(static_cast<float>(value));
      break;
    case DType::Float16:
      bits = float_to_fp16(static_cast<float>(value));
      break;
    case DType::Int64: {
      const auto i = static_cast<std::int64_t>(value);
      std::memcpy(&bits, &i, 8);
      break;
    }
  }
  return bits;
}

class UnaryStep final : public Step {
 public:
  explicit UnaryStep(const BuildContext& cx)
      : dt_(cx.out().dtype), x_(cx.in_id(0)), y_(cx.out_id()), n_(cx.out().shape.numel()) {
    switch (cx.node.op) {
      case OpKind::Exp:
        op_ = UnaryOp::Exp;
        break;
      case OpKind::Tanh:
        op_ = UnaryOp::Tanh;
        break;
      case OpKind::Sigmoid:
        op_ = UnaryOp::Sigmoid;
        break;
      case OpKind::Neg:
        a_ = -1.0;
        break;
      case OpKind::AddScalar:
        b_ = cx.node.attrs.f("value");
        break;
      case OpKind::MulScalar:
        a_ = cx.node.attrs.f("value");
        break;
      default:
        throw Unsupported("cuda backend: not a unary op: " + cx.where);
    }
  }
  void launch(const LaunchContext& cx) override {
    launch_unary(op_, dt_, cx.at(x_), cx.at(y_), n_, a_, b_, cx.stream);
  }

 private:
  UnaryOp op_ = UnaryOp::Affine;
  DType dt_;
  int x_, y_;
  std::int64_t n_;
  double a_ = 1.0, b_ = 0.0;
};

class ConstantStep final : public Step {
 public:
  explicit ConstantStep(const BuildContext& cx)
      : dt_(cx.out().dtype),
        y_(cx.out_id()),
        n_(cx.out().shape.numel()),
        arange_(cx.node.op == OpKind::Arange),
        bits_(arange_ ? 0 : element_bits(dt_, cx.node.attrs.f("value"))) {}
  void launch(const LaunchContext& cx) override {
    if (arange_) {
      launch_arange(dt_, cx.at(y_), n_, cx.stream);
    } else {
      launch_fill(dtype_size(dt_), bits_, cx.at(y_), n_, cx.stream);
    }
  }

 private:
  DType dt_;
  int y_;
  std::int64_t n_;
  bool arange_;
  unsigned long long bits_;
};

class SelectStep final : public Step {
 public:
  explicit SelectStep(const BuildContext& cx)
      : where_(cx.node.op == OpKind::Where), es_(dtype_size(cx.out().dtype)), y_(cx.out_id()) {
    const Shape& os = cx.out().shape;
    check_rank(cx, os);
    const std::size_t ci = where_ ? 0 : 1, bi = where_ ? 2 : 0;
    cond_ = cx.in_id(ci);
    b_ = cx.in_id(bi);
    const auto sc = broadcast_strides(cx.in(ci).shape, os);
    const auto sb = broadcast_strides(cx.in(bi).shape, os);
    std::vector<std::int64_t> sa(static_cast<std::size_t>(os.rank()), 0);
    if (where_) {
      a_ = cx.in_id(1);
      sa = broadcast_strides(cx.in(1).shape, os);
    } else {
      fill_ = element_bits(cx.out().dtype, cx.node.attrs.f("value"));
    }
    d_.ndim = std::max(os.rank(), 1);
    d_.size[0] = 1;
    for (int k = 0; k < os.rank(); ++k) {
      const auto u = static_cast<std::size_t>(k);
      d_.size[k] = os[u];
      d_.sc[k] = sc[u];
      d_.sa[k] = sa[u];
      d_.sb[k] = sb[u];
    }
  }
  void launch(const LaunchContext& cx) override {
    launch_select(es_, reinterpret_cast<const std::int64_t*>(cx.at(cond_)),
                  where_ ? cx.at(a_) : nullptr, fill_, cx.at(b_), cx.at(y_), d_, cx.stream);
  }

 private:
  bool where_;
  std::size_t es_;
  int cond_ = -1, a_ = -1, b_ = -1, y_;
  unsigned long long fill_ = 0;
  SelectDims d_;
};

/// [outer, n, inner] around dim.
void around(const Shape& s, std::int64_t dim, std::int64_t& outer, std::int64_t& n,
            std::int64_t& inner) {
  outer = inner = 1;
  const auto d = static_cast<std::size_t>(dim);
  for (std::size_t i = 0; i < d; ++i) outer *= s[i];
  for (std::size_t i = d + 1; i < s.dims().size(); ++i) inner *= s[i];
  n = s[d];
}

class IndexStep final : public Step {
 public:
  explicit IndexStep(const BuildContext& cx)
      : gather_(cx.node.op == OpKind::Gather),
        es_(dtype_size(cx.in(0).dtype)),
        x_(cx.in_id(0)),
        idx_(cx.in_id(1)),
        y_(cx.out_id()),
        err_(cx.ctx.device_state().error_record()),
        tag_(register_error_tag(cx.where)) {
    const std::int64_t dim = cx.node.attrs.i("dim");
    around(cx.in(0).shape, dim, outer_, n_, inner_);
    m_ = cx.in(1).shape.numel();
    if (gather_) {
      const Shape& is = cx.in(1).shape;
      check_rank(cx, is);
      const auto xs = row_major_strides(cx.in(0).shape);
      d_.ndim = is.rank();
      for (int k = 0; k < is.rank(); ++k) {
        d_.size[k] = is[static_cast<std::size_t>(k)];
        d_.stride0[k] = xs[static_cast<std::size_t>(k)];
      }
      dim_ = static_cast<int>(dim);
    }
  }
  void launch(const LaunchContext& cx) override {
    const auto* idx = reinterpret_cast<const std::int64_t*>(cx.at(idx_));
    if (gather_) {
      launch_gather(es_, cx.at(x_), idx, cx.at(y_), d_, dim_, n_, err_, tag_, cx.stream);
    } else {
      launch_index_select(es_, cx.at(x_), idx, cx.at(y_), outer_, n_, inner_, m_, err_, tag_,
                          cx.stream);
    }
  }

 private:
  bool gather_;
  std::size_t es_;
  int x_, idx_, y_;
  DeviceErrorRecord* err_;
  int tag_;
  std::int64_t outer_ = 1, n_ = 1, inner_ = 1, m_ = 0;
  StridedDims d_;
  int dim_ = 0;
};

class ArgMaxStep final : public Step {
 public:
  explicit ArgMaxStep(const BuildContext& cx)
      : dt_(cx.in(0).dtype), x_(cx.in_id(0)), y_(cx.out_id()) {
    around(cx.in(0).shape, cx.node.attrs.i("dim"), outer_, n_, inner_);
  }
  void launch(const LaunchContext& cx) override {
    launch_argmax(dt_, cx.at(x_), reinterpret_cast<std::int64_t*>(cx.at(y_)), outer_, n_, inner_,
                  cx.stream);
  }

 private:
  DType dt_;
  int x_, y_;
  std::int64_t outer_, n_, inner_;
};

class ReduceStep final : public Step {
 public:
  explicit ReduceStep(const BuildContext& cx)
      : dt_(cx.out().dtype), x_(cx.in_id(0)), y_(cx.out_id()) {
    const Shape& xs = cx.in(0).shape;
    check_rank(cx, xs);
    const auto st = row_major_strides(xs);
    std::vector<bool> red(static_cast<std::size_t>(xs.rank()), false);
    for (auto d : cx.node.attrs.ints("dims")) red[static_cast<std::size_t>(d)] = true;
    std::int64_t count = 1;
    for (int k = 0; k < xs.rank(); ++k) {
      const auto u = static_cast<std::size_t>(k);
      StridedDims& t = red[u] ? reduced_ : kept_;
      t.size[t.ndim] = xs[u];
      t.stride0[t.ndim] = st[u];
      ++t.ndim;
      if (red[u]) count *= xs[u];
    }
    if (kept_.ndim == 0) kept_ = StridedDims{1, {1}, {0}, {0}};
    scale_ = cx.node.op == OpKind::Mean && count > 0 ? 1.f / static_cast<float>(count) : 1.f;
  }
  void launch(const LaunchContext& cx) override {
    launch_reduce(dt_, cx.at(x_), cx.at(y_), kept_, reduced_, scale_, cx.stream);
  }

 private:
  DType dt_;
  int x_, y_;
  StridedDims kept_, reduced_;
  float scale_ = 1.f;
};

class RotaryStep final : public Step {
 public:
  explicit RotaryStep(const BuildContext& cx)
      : dt_(cx.out().dtype), x_(cx.in_id(0)), pos_(cx.in_id(1)), y_(cx.out_id()) {
    const Shape& s = cx.in(0).shape;
    p_.h = s[1];
    p_.t = s[2];
    p_.half = s[3] / 2;
    p_.rows = s[0] * s[1] * s[2];
    if (p_.half > kMaxRopeHalf) {
      throw Unsupported("cuda backend: " + cx.where + ": head dim above " +
                        std::to_string(2 * kMaxRopeHalf));
    }
    for (std::int64_t i = 0; i < p_.half; ++i) {
      p_.inv_freq[i] = rope_inv_freq(i, s[3], cx.node.attrs.f("theta"));
    }
  }
  void launch(const LaunchContext& cx) override {
    launch_rotary(dt_, cx.at(x_), reinterpret_cast<const std::int64_t*>(cx.at(pos_)), cx.at(y_),
                  p_, cx.stream);
  }

 private:
  DType dt_;
  int x_, pos_, y_;
  RopeParams p_;
};

class AttentionStep final : public Step {
 public:
  explicit AttentionStep(const BuildContext& cx)
      : dt_(cx.out().dtype),
        q_(cx.in_id(0)),
        k_(cx.in_id(1)),
        v_(cx.in_id(2)),
        y_(cx.out_id()),
        err_(cx.ctx.device_state().error_record()),
        tag_(register_error_tag(cx.where)) {
    const Shape &q = cx.in(0).shape, &k = cx.in(1).shape, &v = cx.in(2).shape;
    p_.b = q[0];
    p_.hq = q[1];
    p_.t = q[2];
    p_.d = q[3];
    p_.hkv = k[1];
    p_.s = k[2];
    p_.dv = v[3];
    p_.group = p_.hq / p_.hkv;
    p_.scale = static_cast<float>(attention_scale(cx.node.attrs, p_.d));
    if (p_.d > kMaxAttnHeadDim || p_.dv > kMaxAttnHeadDim) {
      throw Unsupported("cuda backend: " + cx.where + ": head dims above " +
                        std::to_string(kMaxAttnHeadDim));
    }
    if (cx.node.op == OpKind::MaskedAttention) {
      p_.kind = 4;
      pos_ = cx.in_id(3);
      len_ = cx.in_id(4);
      p_.c = p_.s;
      if (cx.num_inputs() == 6) {  // a key mask [B, C]: only the cache's first C keys
        mask_ = cx.in_id(5);
        p_.c = cx.in(5).shape[1];
      }
    } else if (cx.num_inputs() == 4) {
      p_.kind = cx.in(3).dtype == DType::Int64 ? 2 : 3;
      mask_ = cx.in_id(3);
      const auto st = attention_mask_strides(cx.in(3).shape);
      std::copy(st.begin(), st.end(), p_.mst);
    } else {
      p_.kind = cx.node.attrs.i("is_causal", 0) != 0 ? 1 : 0;
    }
  }
  void launch(const LaunchContext& cx) override {
    launch_attention(dt_, cx.at(q_), cx.at(k_), cx.at(v_), cx.at(y_),
                     mask_ >= 0 ? cx.at(mask_) : nullptr,
                     pos_ >= 0 ? reinterpret_cast<const std::int64_t*>(cx.at(pos_)) : nullptr,
                     len_ >= 0 ? reinterpret_cast<const std::int64_t*>(cx.at(len_)) : nullptr, p_,
                     err_, tag_, cx.stream);
  }

 private:
  DType dt_;
  int q_, k_, v_, y_, mask_ = -1, pos_ = -1, len_ = -1;
  DeviceErrorRecord* err_;
  int tag_;
  AttnParams p_;
};

}  // namespace

std::unique_ptr<Step> make_llm_step(const BuildContext& cx) {
  switch (cx.node.op) {
    case OpKind::Exp:
    case OpKind::Tanh:
    case OpKind::Sigmoid:
      if (!is_floating(cx.out().dtype)) break;
      return std::make_unique<UnaryStep>(cx);
    case OpKind::Neg:
    case OpKind::AddScalar:
    case OpKind::MulScalar:
      return std::make_unique<UnaryStep>(cx);
    case OpKind::Full:
    case OpKind::Arange:
      return std::make_unique<ConstantStep>(cx);
    case OpKind::Where:
    case OpKind::MaskedFill:
      return std::make_unique<SelectStep>(cx);
    case OpKind::IndexSelect:
    case OpKind::Gather:
      return std::make_unique<IndexStep>(cx);
    case OpKind::ArgMax:
      return std::make_unique<ArgMaxStep>(cx);
    case OpKind::Sum:
    case OpKind::Mean:
      return std::make_unique<ReduceStep>(cx);
    case OpKind::RotaryEmbedding:
      return std::make_unique<RotaryStep>(cx);
    case OpKind::ScaledDotProductAttention:
    case OpKind::MaskedAttention:
      return std::make_unique<AttentionStep>(cx);
    default:
      break;
  }
  throw Unsupported("cuda backend: no kernel for " + cx.where);
}

}  // namespace devpipe::cuda
