// Kernels written as plain loops (OpenMP over rows): embedding, RMS norm, adaptive average
// pooling with uneven windows, int64 add/mul/sub, and the collectives.
#include <omp.h>

#include <array>
#include <cmath>
#include <cstring>

#include "backends/cpu/kernel.h"
#include "runtime/communicator.h"

namespace devpipe::cpu {

namespace {

// ---- Embedding ----

/// Gathers rows of the (possibly vocabulary-sharded) table.
class EmbeddingKernel : public Kernel {
 public:
  EmbeddingKernel(const BuildContext& cx)
      : idx_(cx.in_id(0)),
        table_(cx.in_id(1)),
        out_(cx.out_id()),
        count_(cx.in(0).shape.numel()),
        rows_(cx.in(1).shape[0]),
        row_bytes_(static_cast<std::size_t>(cx.in(1).shape[1]) * dtype_size(cx.in(1).dtype)),
        vocab_per_rank_(cx.node.attrs.i("vocab_per_rank", 0)),
        first_(vocab_per_rank_ > 0 ? cx.rank.rank * vocab_per_rank_ : 0) {}

  void run(const RunContext& cx) override {
    const auto* idx = reinterpret_cast<const std::int64_t*>(cx.values[idx_]);
    const std::byte* table = cx.values[table_];
    std::byte* out = cx.values[out_];
    if (vocab_per_rank_ == 0) {
      for (std::int64_t i = 0; i < count_; ++i) {
        if (idx[i] < 0 || idx[i] >= rows_) {
          throw InvalidArgument("cpu backend: " + where + ": index " + std::to_string(idx[i]) +
                                " is out of range for vocabulary size " + std::to_string(rows_));
        }
      }
    }
    parallel_for(count_, static_cast<std::int64_t>(row_bytes_) / 4, [&](std::int64_t i) {
      const std::int64_t local = idx[i] - first_;
      std::byte* dst = out + static_cast<std::size_t>(i) * row_bytes_;
      if (local < 0 || local >= rows_) {
        std::memset(dst, 0, row_bytes_);
      } else {
        std::memcpy(dst, table + static_cast<std::size_t>(local) * row_bytes_, row_bytes_);
      }
    });
  }

 private:
  int idx_, table_, out_;
  std::int64_t count_, rows_;
  std::size_t row_bytes_;
  std::int64_t vocab_per_rank_, first_;
};

// ---- RmsNorm ----

/// y = x / sqrt(mean(x^2) + eps) * w over the trailing normalized dims (f32 accumulation).
template <DType D>
class RmsNormKernel : public Kernel {
  using E = Elem<D>;
  using T = typename E::T;

 public:
  RmsNormKernel(const BuildContext& cx, std::int64_t rows, std::int64_t cols)
      : x_(cx.in_id(0)),
        w_(cx.num_inputs() > 1 ? cx.in_id(1) : -1),
        out_(cx.out_id()),
        rows_(rows),
        cols_(cols),
        eps_(static_cast<float>(cx.node.attrs.f("eps"))) {}

  void run(const RunContext& cx) override {
    const T* x = reinterpret_cast<const T*>(cx.values[x_]);
    const T* w = w_ >= 0 ? reinterpret_cast<const T*>(cx.values[w_]) : nullptr;
    T* y = reinterpret_cast<T*>(cx.values[out_]);
    const std::int64_t c = cols_;
    const float eps = eps_;
    parallel_for(rows_, c, [&](std::int64_t r) {
      const T* xr = x + r * c;
      T* yr = y + r * c;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (std::int64_t j = 0; j < c; ++j) {
        float v = E::load(xr[j]);
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(c) + eps);
      if (w) {
        for (std::int64_t j = 0; j < c; ++j) yr[j] = E::store(E::load(xr[j]) * inv * E::load(w[j]));
      } else {
        for (std::int64_t j = 0; j < c; ++j) yr[j] = E::store(E::load(xr[j]) * inv);
      }
    });
  }

 private:
  int x_, w_, out_;
  std::int64_t rows_, cols_;
  float eps_;
};

// ---- AdaptiveAvgPool2d with uneven windows ----

/// PyTorch's adaptive average pooling: window [floor(i*H/oh), ceil((i+1)*H/oh)).
template <DType D>
class AdaptiveAvgPoolKernel : public Kernel {
  using E = Elem<D>;
  using T = typename E::T;

 public:
  explicit AdaptiveAvgPoolKernel(const BuildContext& cx)
      : x_(cx.in_id(0)),
        out_(cx.out_id()),
        planes_(cx.in(0).shape[0] * cx.in(0).shape[1]),
        h_(cx.in(0).shape[2]),
        w_(cx.in(0).shape[3]),
        oh_(cx.out().shape[2]),
        ow_(cx.out().shape[3]) {}

  void run(const RunContext& cx) override {
    const T* x = reinterpret_cast<const T*>(cx.values[x_]);
    T* y = reinterpret_cast<T*>(cx.values[out_]);
    parallel_for(planes_, h_ * w_, [&](std::int64_t p) {
      const T* xp = x + p * h_ * w_;
      T* yp = y + p * oh_ * ow_;
      for (std::int64_t i = 0; i < oh_; ++i) {
        const std::int64_t hs = i * h_ / oh_, he = ((i + 1) * h_ + oh_ - 1) / oh_;
        for (std::int64_t j = 0; j < ow_; ++j) {
          const std::int64_t ws = j * w_ / ow_, we = ((j + 1) * w_ + ow_ - 1) / ow_;
          double sum = 0;
          for (std::int64_t a = hs; a < he; ++a) {
            for (std::int64_t b = ws; b < we; ++b) sum += E::load(xp[a * w_ + b]);
          }
          yp[i * ow_ + j] =
              E::store(static_cast<float>(sum / static_cast<double>((he - hs) * (we - ws))));
        }
      }
    });
  }

 private:
  int x_, out_;
  std::int64_t planes_, h_, w_, oh_, ow_;
};

// ---- int64 Add/Mul/Sub ----

constexpr int kMaxRank = 12;

/// Broadcasting add/mul/sub on int64 (wrapping like PyTorch).
class BinaryI64Kernel : public Kernel {
 public:
  explicit BinaryI64Kernel(const BuildContext& cx)
      : a_(cx.in_id(0)), b_(cx.in_id(1)), out_(cx.out_id()), op_(cx.node.op) {
    const Shape& out = cx.out().shape;
    rank_ = out.rank();
    if (rank_ > kMaxRank) {
      throw Unsupported("cpu backend: " + cx.where + ": rank above " + std::to_string(kMaxRank));
    }
    numel_ = out.numel();
    auto fill = [&](const Shape& s, std::array<std::int64_t, kMaxRank>& strides) {
      std::int64_t st = 1;
      for (int i = rank_ - 1, j = s.rank() - 1; i >= 0; --i, --j) {
        std::int64_t d = j >= 0 ? s[static_cast<std::size_t>(j)] : 1;
        strides[static_cast<std::size_t>(i)] = d == 1 ? 0 : st;
        st *= d;
      }
    };
    fill(cx.in(0).shape, sa_);
    fill(cx.in(1).shape, sb_);
    for (int i = 0; i < rank_; ++i)
      dims_[static_cast<std::size_t>(i)] = out[static_cast<std::size_t>(i)];
  }

  void run(const RunContext& cx) override {
    const auto* a = reinterpret_cast<const std::int64_t*>(cx.values[a_]);
    const auto* b = reinterpret_cast<const std::int64_t*>(cx.values[b_]);
    auto* y = reinterpret_cast<std::int64_t*>(cx.values[out_]);
    for (std::int64_t i = 0; i < numel_; ++i) {
      std::int64_t rem = i, ia = 0, ib = 0;
      for (int d = rank_ - 1; d >= 0; --d) {
        const auto u = static_cast<std::size_t>(d);
        const std::int64_t c = rem % dims_[u];
        rem /= dims_[u];
        ia += c * sa_[u];
        ib += c * sb_[u];
      }
      const auto ua = static_cast<std::uint64_t>(a[ia]), ub = static_cast<std::uint64_t>(b[ib]);
      y[i] = static_cast<std::int64_t>(op_ == OpKind::Mul ? ua * ub
                                       : op_ == OpKind::Sub ? ua - ub
                                                            : ua + ub);
    }
  }

 private:
  int a_, b_, out_;
  OpKind op_;
  int rank_ = 0;
  std::int64_t numel_ = 0;
  std::array<std::int64_t, kMaxRank> dims_{}, sa_{}, sb_{};
};

// ---- strided copies oneDNN cannot describe ----

/// Copies a strided view of the input (dims, element strides, byte offset) to the plain output,
/// for views oneDNN rejects (a stepped slice whose strides interleave).
class StridedCopyKernel : public Kernel {
 public:
  StridedCopyKernel(const BuildContext& cx, const std::vector<std::int64_t>& dims,
                    const std::vector<std::int64_t>& strides, std::size_t offset)
      : in_(cx.in_id(0)),
        out_(cx.out_id()),
        offset_(offset),
        esize_(dtype_size(cx.out().dtype)),
        rank_(static_cast<int>(dims.size())) {
    if (rank_ > kMaxRank || rank_ < 1) {
      throw Unsupported("cpu backend: " + cx.where + ": rank " + std::to_string(rank_));
    }
    for (int i = 0; i < rank_; ++i) {
      dims_[static_cast<std::size_t>(i)] = dims[static_cast<std::size_t>(i)];
      strides_[static_cast<std::size_t>(i)] = strides[static_cast<std::size_t>(i)];
    }
    rows_ = 1;
    for (int i = 0; i + 1 < rank_; ++i) rows_ *= dims_[static_cast<std::size_t>(i)];
  }

  void run(const RunContext& cx) override {
    const std::byte* src = cx.values[in_] + offset_;
    std::byte* dst = cx.values[out_];
    const std::int64_t n = dims_[static_cast<std::size_t>(rank_ - 1)];
    const std::int64_t step = strides_[static_cast<std::size_t>(rank_ - 1)];
    const std::size_t es = esize_;
    parallel_for(rows_, n, [&](std::int64_t row) {
      std::int64_t rem = row, base = 0;
      for (int d = rank_ - 2; d >= 0; --d) {
        const auto u = static_cast<std::size_t>(d);
        base += (rem % dims_[u]) * strides_[u];
        rem /= dims_[u];
      }
      std::byte* out = dst + static_cast<std::size_t>(row * n) * es;
      if (step == 1) {
        std::memcpy(out, src + static_cast<std::size_t>(base) * es,
                    static_cast<std::size_t>(n) * es);
        return;
      }
      for (std::int64_t j = 0; j < n; ++j) {
        std::memcpy(out + static_cast<std::size_t>(j) * es,
                    src + static_cast<std::size_t>(base + j * step) * es, es);
      }
    });
  }

 private:
  int in_, out_;
  std::size_t offset_, esize_;
  int rank_;
  std::int64_t rows_ = 1;
  std::array<std::int64_t, kMaxRank> dims_{}, strides_{};
};

// ---- collectives ----

/// AllReduce (sum) and AllGather through the rank's communicator; a copy at tp_degree 1.
class CollectiveKernel : public Kernel {
 public:
  explicit CollectiveKernel(const BuildContext& cx)
      : in_(cx.in_id(0)),
        out_(cx.out_id()),
        gather_(cx.node.op == OpKind::AllGather),
        dtype_(cx.in(0).dtype),
        count_(static_cast<std::size_t>(cx.in(0).shape.numel())),
        bytes_(count_ * dtype_size(dtype_)) {
    if (gather_) {
      const auto dim = static_cast<std::size_t>(cx.node.attrs.i("dim"));
      const auto& dims = cx.in(0).shape.dims();
      std::int64_t outer = 1;
      for (std::size_t i = 0; i < dim; ++i) outer *= dims[i];
      outer_ = static_cast<std::size_t>(outer);
      inner_bytes_ = outer_ == 0 ? 0 : bytes_ / outer_;
    }
  }

  void run(const RunContext& cx) override {
    const std::byte* in = cx.values[in_];
    std::byte* out = cx.values[out_];
    Communicator* comm = cx.rank.comm;
    if (cx.rank.tp_degree <= 1 || comm == nullptr) {
      if (out != in) std::memcpy(out, in, bytes_);
      return;
    }
    if (gather_) {
      comm->all_gather(cx.rank.rank, in, out, outer_, inner_bytes_);
    } else {
      if (out != in) std::memcpy(out, in, bytes_);
      comm->all_reduce_sum(cx.rank.rank, out, count_, dtype_);
    }
  }

 private:
  int in_, out_;
  bool gather_;
  DType dtype_;
  std::size_t count_, bytes_;
  std::size_t outer_ = 0, inner_bytes_ = 0;
};

}  // namespace

std::unique_ptr<Kernel> make_embedding_kernel(const BuildContext& cx) {
  if (cx.in(0).dtype != DType::Int64) {
    throw Unsupported("cpu backend: " + cx.where + ": indices must be int64");
  }
  return std::make_unique<EmbeddingKernel>(cx);
}

std::unique_ptr<Kernel> make_rms_norm_kernel(const BuildContext& cx) {
  const auto& ns = cx.node.attrs.ints("normalized_shape");
  std::int64_t cols = 1;
  for (auto d : ns) cols *= d;
  const std::int64_t rows = cols == 0 ? 0 : cx.in(0).shape.numel() / cols;
  return dispatch_float(cx.out().dtype, cx.where, [&](auto e) -> std::unique_ptr<Kernel> {
    constexpr DType d = decltype(e)::kDType;
    return std::make_unique<RmsNormKernel<d>>(cx, rows, cols);
  });
}

std::unique_ptr<Kernel> make_adaptive_avg_pool_loop_kernel(const BuildContext& cx) {
  return dispatch_float(cx.out().dtype, cx.where, [&](auto e) -> std::unique_ptr<Kernel> {
    constexpr DType d = decltype(e)::kDType;
    return std::make_unique<AdaptiveAvgPoolKernel<d>>(cx);
  });
}

std::unique_ptr<Kernel> make_binary_loop_kernel(const BuildContext& cx) {
  if (cx.out().dtype != DType::Int64) {
    throw Unsupported("cpu backend: " + cx.where + ": no loop kernel for dtype " +
                      std::string(dtype_name(cx.out().dtype)));
  }
  return std::make_unique<BinaryI64Kernel>(cx);
}

std::unique_ptr<Kernel> make_strided_copy_loop_kernel(const BuildContext& cx,
                                                      const std::vector<std::int64_t>& dims,
                                                      const std::vector<std::int64_t>& strides,
                                                      std::size_t offset) {
  return std::make_unique<StridedCopyKernel>(cx, dims, strides, offset);
}

std::unique_ptr<Kernel> make_collective_kernel(const BuildContext& cx) {
  const RankInfo& r = cx.rank;
  if (r.tp_degree > 1) {
    if (r.comm == nullptr) {
      throw StateError("cpu backend: " + cx.where + " needs a communicator at tp_degree " +
                       std::to_string(r.tp_degree) + ", but RankInfo.comm is null");
    }
    if (r.comm->size() != r.tp_degree) {
      throw StateError("cpu backend: " + cx.where + ": the communicator has " +
                       std::to_string(r.comm->size()) + " ranks, tp_degree is " +
                       std::to_string(r.tp_degree));
    }
  }
  if (cx.node.op == OpKind::AllGather && cx.node.attrs.i("parts") != std::max(r.tp_degree, 1)) {
    throw InvalidArgument("cpu backend: " + cx.where + " gathers " +
                          std::to_string(cx.node.attrs.i("parts")) +
                          " parts, but the rank runs at tp_degree " + std::to_string(r.tp_degree));
  }
  return std::make_unique<CollectiveKernel>(cx);
}

}  // namespace devpipe::cpu
