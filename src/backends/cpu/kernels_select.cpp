// Loop kernels (OpenMP over rows) for constants (full, arange), argmax, element selection
// (index_select, gather, where, masked_fill), int64 neg/add_scalar/mul_scalar, and the rotary
// position embedding.
#include <array>
#include <cmath>
#include <cstring>

#include "backends/cpu/kernel.h"
#include "graph/op_def.h"

namespace devpipe::cpu {

namespace {

constexpr int kMaxRank = 12;

/// [outer, n, inner] around `dim` of `s`.
struct Around {
  std::int64_t outer = 1, n = 1, inner = 1;
};
Around around(const Shape& s, std::int64_t dim) {
  Around a;
  const auto d = static_cast<std::size_t>(dim);
  for (std::size_t i = 0; i < d; ++i) a.outer *= s[i];
  for (std::size_t i = d + 1; i < s.dims().size(); ++i) a.inner *= s[i];
  a.n = s[d];
  return a;
}

/// Element strides of an operand of shape `s` broadcast to `out` (0 along broadcast dims).
std::array<std::int64_t, kMaxRank> broadcast_strides(const Shape& s, const Shape& out) {
  std::array<std::int64_t, kMaxRank> st{};
  std::int64_t stride = 1;
  for (int i = out.rank() - 1, j = s.rank() - 1; i >= 0; --i, --j) {
    const std::int64_t d = j >= 0 ? s[static_cast<std::size_t>(j)] : 1;
    st[static_cast<std::size_t>(i)] = d == 1 ? 0 : stride;
    stride *= d;
  }
  return st;
}

void check_rank(const BuildContext& cx, const Shape& s) {
  if (s.rank() > kMaxRank) {
    throw Unsupported("cpu backend: " + cx.where + ": rank above " + std::to_string(kMaxRank));
  }
}

/// One element of `dtype` holding `value` (rounded like a store of that dtype).
std::array<std::byte, 8> element_bytes(DType dtype, double value) {
  std::array<std::byte, 8> b{};
  switch (dtype) {
    case DType::Float32: {
      const float f = static_cast<float>(value);
      std::memcpy(b.data(), &f, 4);
      break;
    }
    case DType::BFloat16: {
      const std::uint16_t h = float_to_bf16_bits(static_cast<float>(value));
      std::memcpy(b.data(), &h, 2);
      break;
    }
    case DType::Float16: {
      const std::uint16_t h = float_to_fp16(static_cast<float>(value));
      std::memcpy(b.data(), &h, 2);
      break;
    }
    case DType::Int64: {
      const auto i = static_cast<std::int64_t>(value);
      std::memcpy(b.data(), &i, 8);
      break;
    }
  }
  return b;
}

// ---- Full, Arange ----

/// Writes the constant on every run (the arena may reuse its memory between runs).
class ConstantKernel : public Kernel {
 public:
  explicit ConstantKernel(const BuildContext& cx)
      : out_(cx.out_id()),
        dtype_(cx.out().dtype),
        es_(dtype_size(dtype_)),
        n_(cx.out().shape.numel()),
        arange_(cx.node.op == OpKind::Arange),
        fill_(element_bytes(dtype_, arange_ ? 0.0 : cx.node.attrs.f("value"))) {}

  void run(const RunContext& cx) override {
    std::byte* y = cx.values[out_];
    if (arange_) {
      for (std::int64_t i = 0; i < n_; ++i) {
        const auto e = element_bytes(dtype_, static_cast<double>(i));
        std::memcpy(y + static_cast<std::size_t>(i) * es_, e.data(), es_);
      }
      return;
    }
    for (std::int64_t i = 0; i < n_; ++i) std::memcpy(y + static_cast<std::size_t>(i) * es_, fill_.data(), es_);
  }

 private:
  int out_;
  DType dtype_;
  std::size_t es_;
  std::int64_t n_;
  bool arange_;
  std::array<std::byte, 8> fill_;
};

// ---- ArgMax ----

template <DType D>
class ArgMaxKernel : public Kernel {
  using E = Elem<D>;
  using T = typename E::T;

 public:
  explicit ArgMaxKernel(const BuildContext& cx)
      : x_(cx.in_id(0)), out_(cx.out_id()), a_(around(cx.in(0).shape, cx.node.attrs.i("dim"))) {}

  void run(const RunContext& cx) override {
    const T* x = reinterpret_cast<const T*>(cx.values[x_]);
    auto* y = reinterpret_cast<std::int64_t*>(cx.values[out_]);
    const Around a = a_;
    parallel_for(a.outer * a.inner, a.n, [&](std::int64_t r) {
      const std::int64_t o = r / a.inner, j = r % a.inner;
      const T* p = x + o * a.n * a.inner + j;
      std::int64_t best = 0;
      float bv = E::load(p[0]);
      for (std::int64_t k = 1; k < a.n && !std::isnan(bv); ++k) {
        const float v = E::load(p[k * a.inner]);
        if (v > bv || std::isnan(v)) {
          bv = v;
          best = k;
        }
      }
      y[r] = best;
    });
  }

 private:
  int x_, out_;
  Around a_;
};

// ---- IndexSelect, Gather ----

class IndexSelectKernel : public Kernel {
 public:
  explicit IndexSelectKernel(const BuildContext& cx)
      : x_(cx.in_id(0)),
        idx_(cx.in_id(1)),
        out_(cx.out_id()),
        dim_(cx.node.attrs.i("dim")),
        a_(around(cx.in(0).shape, dim_)),
        m_(cx.in(1).shape[0]),
        chunk_(static_cast<std::size_t>(a_.inner) * dtype_size(cx.in(0).dtype)) {}

  void run(const RunContext& cx) override {
    const std::byte* x = cx.values[x_];
    const auto* idx = reinterpret_cast<const std::int64_t*>(cx.values[idx_]);
    std::byte* y = cx.values[out_];
    for (std::int64_t j = 0; j < m_; ++j) {
      if (idx[j] < 0 || idx[j] >= a_.n) {
        throw InvalidArgument("cpu backend: " + where + ": index " + std::to_string(idx[j]) +
                              " at position " + std::to_string(j) + " is outside [0, " +
                              std::to_string(a_.n) + ") of dim " + std::to_string(dim_));
      }
    }
    parallel_for(a_.outer * m_, a_.inner, [&](std::int64_t r) {
      const std::int64_t o = r / m_, j = r % m_;
      std::memcpy(y + static_cast<std::size_t>(r) * chunk_,
                  x + static_cast<std::size_t>(o * a_.n + idx[j]) * chunk_, chunk_);
    });
  }

 private:
  int x_, idx_, out_;
  std::int64_t dim_;
  Around a_;
  std::int64_t m_;
  std::size_t chunk_;
};

/// torch.gather: out has index's shape; x is addressed by the index's coordinates with the
/// gathered dim replaced by the index value.
class GatherKernel : public Kernel {
 public:
  explicit GatherKernel(const BuildContext& cx)
      : x_(cx.in_id(0)),
        idx_(cx.in_id(1)),
        out_(cx.out_id()),
        dim_(static_cast<int>(cx.node.attrs.i("dim"))),
        rank_(cx.in(1).shape.rank()),
        n_(cx.in(1).shape.numel()),
        size_(cx.in(0).shape[static_cast<std::size_t>(dim_)]),
        es_(dtype_size(cx.in(0).dtype)) {
    check_rank(cx, cx.in(0).shape);
    const Shape& xs = cx.in(0).shape;
    std::int64_t st = 1;
    for (int i = rank_ - 1; i >= 0; --i) {
      xstrides_[static_cast<std::size_t>(i)] = st;
      st *= xs[static_cast<std::size_t>(i)];
      dims_[static_cast<std::size_t>(i)] = cx.in(1).shape[static_cast<std::size_t>(i)];
    }
  }

  void run(const RunContext& cx) override {
    const std::byte* x = cx.values[x_];
    const auto* idx = reinterpret_cast<const std::int64_t*>(cx.values[idx_]);
    std::byte* y = cx.values[out_];
    for (std::int64_t e = 0; e < n_; ++e) {
      if (idx[e] < 0 || idx[e] >= size_) {
        throw InvalidArgument("cpu backend: " + where + ": index " + std::to_string(idx[e]) +
                              " at position " + std::to_string(e) + " is outside [0, " +
                              std::to_string(size_) + ") of dim " + std::to_string(dim_));
      }
    }
    parallel_for(n_, 4, [&](std::int64_t e) {
      std::int64_t rem = e, src = 0;
      for (int d = rank_ - 1; d >= 0; --d) {
        const auto u = static_cast<std::size_t>(d);
        const std::int64_t c = rem % dims_[u];
        rem /= dims_[u];
        src += (d == dim_ ? idx[e] : c) * xstrides_[u];
      }
      std::memcpy(y + static_cast<std::size_t>(e) * es_, x + static_cast<std::size_t>(src) * es_, es_);
    });
  }

 private:
  int x_, idx_, out_, dim_, rank_;
  std::int64_t n_, size_;
  std::size_t es_;
  std::array<std::int64_t, kMaxRank> dims_{}, xstrides_{};
};

// ---- Where, MaskedFill ----

/// y = cond ? a : b (Where) or y = mask ? value : x (MaskedFill), all broadcast to y; elements
/// are copied as bytes.
class SelectKernel : public Kernel {
 public:
  explicit SelectKernel(const BuildContext& cx)
      : out_(cx.out_id()),
        es_(dtype_size(cx.out().dtype)),
        where_op_(cx.node.op == OpKind::Where) {
    const Shape& os = cx.out().shape;
    check_rank(cx, os);
    rank_ = os.rank();
    n_ = os.numel();
    for (int i = 0; i < rank_; ++i) dims_[static_cast<std::size_t>(i)] = os[static_cast<std::size_t>(i)];
    if (where_op_) {
      cond_ = cx.in_id(0);
      a_ = cx.in_id(1);
      b_ = cx.in_id(2);
      sc_ = broadcast_strides(cx.in(0).shape, os);
      sa_ = broadcast_strides(cx.in(1).shape, os);
      sb_ = broadcast_strides(cx.in(2).shape, os);
    } else {
      b_ = cx.in_id(0);
      cond_ = cx.in_id(1);
      sb_ = broadcast_strides(cx.in(0).shape, os);
      sc_ = broadcast_strides(cx.in(1).shape, os);
      fill_ = element_bytes(cx.out().dtype, cx.node.attrs.f("value"));
    }
  }

  void run(const RunContext& cx) override {
    const auto* c = reinterpret_cast<const std::int64_t*>(cx.values[cond_]);
    const std::byte* a = where_op_ ? cx.values[a_] : fill_.data();
    const std::byte* b = cx.values[b_];
    std::byte* y = cx.values[out_];
    const std::int64_t inner = dims_[static_cast<std::size_t>(rank_ > 0 ? rank_ - 1 : 0)];
    const std::int64_t rows = rank_ > 0 && inner > 0 ? n_ / inner : n_;
    const std::int64_t cols = rank_ > 0 ? inner : 1;
    const std::size_t last = static_cast<std::size_t>(rank_ > 0 ? rank_ - 1 : 0);
    parallel_for(rows, cols, [&](std::int64_t r) {
      std::int64_t rem = r, oc = 0, oa = 0, ob = 0;
      for (int d = rank_ - 2; d >= 0; --d) {
        const auto u = static_cast<std::size_t>(d);
        const std::int64_t k = rem % dims_[u];
        rem /= dims_[u];
        oc += k * sc_[u];
        oa += k * sa_[u];
        ob += k * sb_[u];
      }
      for (std::int64_t j = 0; j < cols; ++j) {
        const bool pick = c[oc + j * sc_[last]] != 0;
        const std::byte* src = pick ? a + static_cast<std::size_t>(oa + j * sa_[last]) * es_
                                    : b + static_cast<std::size_t>(ob + j * sb_[last]) * es_;
        std::memcpy(y + static_cast<std::size_t>(r * cols + j) * es_, src, es_);
      }
    });
  }

 private:
  int out_;
  std::size_t es_;
  bool where_op_;
  int cond_ = -1, a_ = -1, b_ = -1, rank_ = 0;
  std::int64_t n_ = 0;
  std::array<std::int64_t, kMaxRank> dims_{}, sc_{}, sa_{}, sb_{};  // sa_ stays 0 for masked_fill
  std::array<std::byte, 8> fill_{};
};

// ---- int64 Neg, AddScalar, MulScalar ----

/// y = x * scale + shift in wrapping int64 arithmetic.
class AffineI64Kernel : public Kernel {
 public:
  explicit AffineI64Kernel(const BuildContext& cx)
      : x_(cx.in_id(0)), out_(cx.out_id()), n_(cx.out().shape.numel()) {
    switch (cx.node.op) {
      case OpKind::Neg:
        scale_ = static_cast<std::uint64_t>(std::int64_t{-1});
        break;
      case OpKind::AddScalar:
        shift_ = static_cast<std::uint64_t>(static_cast<std::int64_t>(cx.node.attrs.f("value")));
        break;
      case OpKind::MulScalar:
        scale_ = static_cast<std::uint64_t>(static_cast<std::int64_t>(cx.node.attrs.f("value")));
        break;
      default:
        throw Unsupported("cpu backend: not an int64 affine op: " + cx.where);
    }
  }

  void run(const RunContext& cx) override {
    const auto* x = reinterpret_cast<const std::uint64_t*>(cx.values[x_]);
    auto* y = reinterpret_cast<std::int64_t*>(cx.values[out_]);
    for (std::int64_t i = 0; i < n_; ++i) y[i] = static_cast<std::int64_t>(x[i] * scale_ + shift_);
  }

 private:
  int x_, out_;
  std::int64_t n_;
  std::uint64_t scale_ = 1, shift_ = 0;
};

// ---- RotaryEmbedding ----

/// Per (b, t): cos/sin of float32(pos) * inv_freq[i] once, applied to every head; float32 math.
template <DType D>
class RotaryKernel : public Kernel {
  using E = Elem<D>;
  using T = typename E::T;

 public:
  explicit RotaryKernel(const BuildContext& cx)
      : x_(cx.in_id(0)), pos_(cx.in_id(1)), out_(cx.out_id()) {
    const Shape& s = cx.in(0).shape;
    b_ = s[0];
    h_ = s[1];
    t_ = s[2];
    half_ = s[3] / 2;
    const double theta = cx.node.attrs.f("theta");
    inv_freq_.resize(static_cast<std::size_t>(half_));
    for (std::int64_t i = 0; i < half_; ++i) {
      inv_freq_[static_cast<std::size_t>(i)] = rope_inv_freq(i, 2 * half_, theta);
    }
  }
  std::size_t scratch_bytes() const override {
    return static_cast<std::size_t>(b_ * t_ * half_) * 2 * sizeof(float);
  }

  void run(const RunContext& cx) override {
    const T* x = reinterpret_cast<const T*>(cx.values[x_]);
    const auto* pos = reinterpret_cast<const std::int64_t*>(cx.values[pos_]);
    T* y = reinterpret_cast<T*>(cx.values[out_]);
    float* cs = reinterpret_cast<float*>(cx.scratch);
    const std::int64_t half = half_, H = h_, Tn = t_;
    const float* inv = inv_freq_.data();
    parallel_for(b_ * Tn, half * 8, [&](std::int64_t r) {
      float* c = cs + r * 2 * half;
      float* s = c + half;
      const float p = static_cast<float>(pos[r]);
      for (std::int64_t i = 0; i < half; ++i) {
        const float angle = p * inv[i];
        c[i] = std::cos(angle);
        s[i] = std::sin(angle);
      }
    });
    parallel_for(b_ * H * Tn, half * 4, [&](std::int64_t row) {
      const std::int64_t b = row / (H * Tn), t = row % Tn;
      const float* c = cs + (b * Tn + t) * 2 * half;
      const float* s = c + half;
      const T* xr = x + row * 2 * half;
      T* yr = y + row * 2 * half;
      for (std::int64_t i = 0; i < half; ++i) {
        const float x1 = E::load(xr[i]), x2 = E::load(xr[i + half]);
        yr[i] = E::store(x1 * c[i] - x2 * s[i]);
        yr[i + half] = E::store(x2 * c[i] + x1 * s[i]);
      }
    });
  }

 private:
  int x_, pos_, out_;
  std::int64_t b_ = 0, h_ = 0, t_ = 0, half_ = 0;
  std::vector<float> inv_freq_;
};

}  // namespace

std::unique_ptr<Kernel> make_constant_kernel(const BuildContext& cx) {
  return std::make_unique<ConstantKernel>(cx);
}

std::unique_ptr<Kernel> make_argmax_kernel(const BuildContext& cx) {
  return dispatch_float(cx.in(0).dtype, cx.where, [&](auto e) -> std::unique_ptr<Kernel> {
    constexpr DType d = decltype(e)::kDType;
    return std::make_unique<ArgMaxKernel<d>>(cx);
  });
}

std::unique_ptr<Kernel> make_index_select_kernel(const BuildContext& cx) {
  return std::make_unique<IndexSelectKernel>(cx);
}

std::unique_ptr<Kernel> make_gather_kernel(const BuildContext& cx) {
  return std::make_unique<GatherKernel>(cx);
}

std::unique_ptr<Kernel> make_where_kernel(const BuildContext& cx) {
  return std::make_unique<SelectKernel>(cx);
}

std::unique_ptr<Kernel> make_masked_fill_kernel(const BuildContext& cx) {
  return std::make_unique<SelectKernel>(cx);
}

std::unique_ptr<Kernel> make_int64_affine_kernel(const BuildContext& cx) {
  return std::make_unique<AffineI64Kernel>(cx);
}

std::unique_ptr<Kernel> make_rotary_kernel(const BuildContext& cx) {
  return dispatch_float(cx.out().dtype, cx.where, [&](auto e) -> std::unique_ptr<Kernel> {
    constexpr DType d = decltype(e)::kDType;
    return std::make_unique<RotaryKernel<d>>(cx);
  });
}

}  // namespace devpipe::cpu
