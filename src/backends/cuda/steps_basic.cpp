// Steps built on the backend's own kernels and on async memcpy: elementwise ops, activations,
// softmax, norms, pooling, embedding, and data movement (concat, slice, permute).
#include <algorithm>

#include "backends/cuda/executor.h"
#include "devpipe/error.h"

namespace devpipe::cuda {

namespace {

// ---- elementwise ----

class BinaryStep final : public Step {
 public:
  explicit BinaryStep(const BuildContext& cx)
      : op_(cx.node.op == OpKind::Mul   ? BinOp::Mul
            : cx.node.op == OpKind::Sub ? BinOp::Sub
            : cx.node.op == OpKind::Div ? BinOp::Div
                                        : BinOp::Add),
        dt_(cx.out().dtype),
        a_(cx.in_id(0)),
        b_(cx.in_id(1)),
        y_(cx.out_id()) {
    const Shape& os = cx.out().shape;
    dims_ = collapse_dims(os.dims(), broadcast_strides(cx.in(0).shape, os),
                          broadcast_strides(cx.in(1).shape, os));
  }
  void launch(const LaunchContext& cx) override {
    launch_binary(op_, dt_, cx.at(a_), cx.at(b_), cx.at(y_), dims_, cx.stream);
  }

 private:
  BinOp op_;
  DType dt_;
  int a_, b_, y_;
  StridedDims dims_;
};

class ActivationStep final : public Step {
 public:
  ActivationStep(const BuildContext& cx, Act act)
      : act_(act),
        dt_(cx.out().dtype),
        x_(cx.in_id(0)),
        y_(cx.out_id()),
        n_(cx.out().shape.numel()) {}
  void launch(const LaunchContext& cx) override {
    launch_bias_act(dt_, cx.at(x_), nullptr, cx.at(y_), 1, n_, act_, cx.stream);
  }

 private:
  Act act_;
  DType dt_;
  int x_, y_;
  std::int64_t n_;
};

/// [outer, n, inner] around `dim`.
void split_at(const Shape& s, std::size_t dim, std::int64_t& outer, std::int64_t& n,
              std::int64_t& inner) {
  outer = 1;
  inner = 1;
  for (std::size_t i = 0; i < dim; ++i) outer *= s[i];
  for (std::size_t i = dim + 1; i < s.dims().size(); ++i) inner *= s[i];
  n = s[dim];
}

class SoftmaxStep final : public Step {
 public:
  explicit SoftmaxStep(const BuildContext& cx)
      : dt_(cx.out().dtype), x_(cx.in_id(0)), y_(cx.out_id()) {
    split_at(cx.in(0).shape, static_cast<std::size_t>(cx.node.attrs.i("dim")), outer_, n_, inner_);
  }
  void launch(const LaunchContext& cx) override {
    launch_softmax(dt_, cx.at(x_), cx.at(y_), outer_, n_, inner_, cx.stream);
  }

 private:
  DType dt_;
  int x_, y_;
  std::int64_t outer_, n_, inner_;
};

class NormStep final : public Step {
 public:
  explicit NormStep(const BuildContext& cx)
      : rms_(cx.node.op == OpKind::RmsNorm),
        dt_(cx.out().dtype),
        x_(cx.in_id(0)),
        w_(cx.num_inputs() >= 2 ? cx.in_id(1) : -1),
        b_(!rms_ && cx.num_inputs() >= 3 ? cx.in_id(2) : -1),
        y_(cx.out_id()),
        eps_(static_cast<float>(cx.node.attrs.f("eps"))) {
    d_ = Shape(cx.node.attrs.ints("normalized_shape")).numel();
    rows_ = d_ ? cx.in(0).shape.numel() / d_ : 0;
  }
  void launch(const LaunchContext& cx) override {
    launch_norm(dt_, rms_, cx.at(x_), w_ >= 0 ? cx.at(w_) : nullptr, b_ >= 0 ? cx.at(b_) : nullptr,
                cx.at(y_), rows_, d_, eps_, cx.stream);
  }

 private:
  bool rms_;
  DType dt_;
  int x_, w_, b_, y_;
  float eps_;
  std::int64_t d_ = 0, rows_ = 0;
};

// ---- pooling ----

class PoolStep final : public Step {
 public:
  explicit PoolStep(const BuildContext& cx)
      : max_(cx.node.op == OpKind::MaxPool2d),
        dt_(cx.out().dtype),
        x_(cx.in_id(0)),
        y_(cx.out_id()) {
    const Shape& xs = cx.in(0).shape;
    const Shape& ys = cx.out().shape;
    p_.planes = xs[0] * xs[1];
    p_.h = xs[2];
    p_.w = xs[3];
    p_.oh = ys[2];
    p_.ow = ys[3];
    if (max_) {
      const auto& k = cx.node.attrs.ints("kernel_size");
      const auto& s = cx.node.attrs.ints("stride");
      const auto& pd = cx.node.attrs.ints("padding");
      const auto& d = cx.node.attrs.ints("dilation");
      p_.kh = static_cast<int>(k[0]);
      p_.kw = static_cast<int>(k[1]);
      p_.sh = static_cast<int>(s[0]);
      p_.sw = static_cast<int>(s[1]);
      p_.ph = static_cast<int>(pd[0]);
      p_.pw = static_cast<int>(pd[1]);
      p_.dh = static_cast<int>(d[0]);
      p_.dw = static_cast<int>(d[1]);
    }
  }
  void launch(const LaunchContext& cx) override {
    if (max_) {
      launch_max_pool(dt_, cx.at(x_), cx.at(y_), p_, cx.stream);
    } else {
      launch_adaptive_avg_pool(dt_, cx.at(x_), cx.at(y_), p_, cx.stream);
    }
  }

 private:
  bool max_;
  DType dt_;
  int x_, y_;
  PoolParams p_;
};

// ---- embedding ----

/// Gathers rows of the (possibly vocabulary-sharded) table. Unsharded, an index outside the
/// table gives a zero row and is recorded on the device; the next blocking copy (or
/// cuda_check_device_errors) throws InvalidArgument naming it.
class EmbeddingStep final : public Step {
 public:
  explicit EmbeddingStep(const BuildContext& cx)
      : idx_(cx.in_id(0)),
        table_(cx.in_id(1)),
        y_(cx.out_id()),
        elem_(dtype_size(cx.in(1).dtype)),
        count_(cx.in(0).shape.numel()),
        rows_(cx.in(1).shape[0]),
        dim_(cx.in(1).shape[1]) {
    const std::int64_t vpr = cx.node.attrs.i("vocab_per_rank", 0);
    first_ = vpr > 0 ? static_cast<std::int64_t>(cx.rank.rank) * vpr : 0;
    report_ = vpr == 0;
    if (report_) {
      err_ = cx.ctx.device_state().error_record();
      tag_ = register_error_tag(cx.where);
    }
  }
  void launch(const LaunchContext& cx) override {
    launch_embedding(elem_, reinterpret_cast<const std::int64_t*>(cx.at(idx_)), cx.at(table_),
                     cx.at(y_), count_, rows_, dim_, first_, report_, err_, tag_, cx.stream);
  }

 private:
  int idx_, table_, y_;
  std::size_t elem_;
  std::int64_t count_, rows_, dim_, first_ = 0;
  bool report_ = false;
  DeviceErrorRecord* err_ = nullptr;
  int tag_ = 0;
};

// ---- data movement ----

/// Each input fills its band of the output: `outer` rows, copied with one 2-D memcpy.
class ConcatStep final : public Step {
 public:
  explicit ConcatStep(const BuildContext& cx) : y_(cx.out_id()) {
    const auto dim = static_cast<std::size_t>(cx.node.attrs.i("dim"));
    const Shape& os = cx.out().shape;
    const std::size_t es = dtype_size(cx.out().dtype);
    std::int64_t outer = 1, inner = 1;
    for (std::size_t i = 0; i < dim; ++i) outer *= os[i];
    for (std::size_t i = dim + 1; i < os.dims().size(); ++i) inner *= os[i];
    outer_ = static_cast<std::size_t>(outer);
    out_row_ = static_cast<std::size_t>(os[dim] * inner) * es;
    std::size_t band = 0;
    for (std::size_t k = 0; k < cx.num_inputs(); ++k) {
      const std::size_t row = static_cast<std::size_t>(cx.in(k).shape[dim] * inner) * es;
      parts_.push_back({cx.in_id(k), band, row});
      band += row;
    }
  }
  void launch(const LaunchContext& cx) override {
    std::byte* y = cx.at(y_);
    for (const Part& p : parts_) {
      if (p.row == 0 || outer_ == 0) continue;
      if (outer_ == 1) {
        DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(y + p.band, cx.at(p.value), p.row,
                                           cudaMemcpyDeviceToDevice, cx.stream));
      } else {
        DEVPIPE_CUDA_CHECK(cudaMemcpy2DAsync(y + p.band, out_row_, cx.at(p.value), p.row, p.row,
                                             outer_, cudaMemcpyDeviceToDevice, cx.stream));
      }
    }
  }

 private:
  struct Part {
    int value;
    std::size_t band, row;
  };
  int y_;
  std::size_t outer_ = 0, out_row_ = 0;
  std::vector<Part> parts_;
};

/// x[..., start:end:step, ...] with start shifted by rank * rank_stride: a 2-D memcpy when
/// step is 1, else a strided-copy kernel.
class SliceStep final : public Step {
 public:
  explicit SliceStep(const BuildContext& cx)
      : x_(cx.in_id(0)), y_(cx.out_id()), es_(dtype_size(cx.out().dtype)) {
    const auto dim = static_cast<std::size_t>(cx.node.attrs.i("dim"));
    const std::int64_t shift =
        static_cast<std::int64_t>(cx.rank.rank) * cx.node.attrs.i("rank_stride", 0);
    const std::int64_t start = cx.node.attrs.i("start") + shift;
    const std::int64_t end = cx.node.attrs.i("end") + shift;
    const std::int64_t step = cx.node.attrs.i("step", 1);
    const Shape& xs = cx.in(0).shape;
    std::int64_t outer, n, inner;
    split_at(xs, dim, outer, n, inner);
    if (start < 0 || end > n) {
      throw ShapeError("cuda backend: " + cx.where + ": rank " + std::to_string(cx.rank.rank) +
                       " range [" + std::to_string(start) + ":" + std::to_string(end) +
                       "] is outside dim " + std::to_string(dim) + " of " + xs.to_string());
    }
    const std::int64_t m = cx.out().shape[dim];
    offset_ = static_cast<std::size_t>(start * inner) * es_;
    if (step == 1) {
      memcpy_ = true;
      height_ = static_cast<std::size_t>(outer);
      width_ = static_cast<std::size_t>(m * inner) * es_;
      src_pitch_ = static_cast<std::size_t>(n * inner) * es_;
    } else {
      dims_ = collapse_dims({outer, m, inner}, {n * inner, step * inner, 1}, {0, 0, 0});
    }
  }
  void launch(const LaunchContext& cx) override {
    const std::byte* x = cx.at(x_) + offset_;
    if (!memcpy_) {
      launch_strided_copy(es_, x, cx.at(y_), dims_, cx.stream);
    } else if (width_ != 0 && height_ != 0) {
      DEVPIPE_CUDA_CHECK(cudaMemcpy2DAsync(cx.at(y_), width_, x, src_pitch_, width_, height_,
                                           cudaMemcpyDeviceToDevice, cx.stream));
    }
  }

 private:
  int x_, y_;
  std::size_t es_, offset_ = 0;
  bool memcpy_ = false;
  std::size_t width_ = 0, height_ = 0, src_pitch_ = 0;
  StridedDims dims_;
};

class PermuteStep final : public Step {
 public:
  explicit PermuteStep(const BuildContext& cx)
      : x_(cx.in_id(0)), y_(cx.out_id()), es_(dtype_size(cx.out().dtype)) {
    const auto& perm = cx.node.attrs.ints("dims");
    const auto xst = row_major_strides(cx.in(0).shape);
    std::vector<std::int64_t> st;
    for (auto d : perm) st.push_back(xst[static_cast<std::size_t>(d)]);
    dims_ = collapse_dims(cx.out().shape.dims(), st, std::vector<std::int64_t>(st.size(), 0));
    bytes_ = static_cast<std::size_t>(cx.out().shape.numel()) * es_;
    identity_ = dims_.ndim == 1 && dims_.stride0[0] == 1;
  }
  void launch(const LaunchContext& cx) override {
    if (identity_) {
      if (bytes_)
        DEVPIPE_CUDA_CHECK(
            cudaMemcpyAsync(cx.at(y_), cx.at(x_), bytes_, cudaMemcpyDeviceToDevice, cx.stream));
      return;
    }
    launch_strided_copy(es_, cx.at(x_), cx.at(y_), dims_, cx.stream);
  }

 private:
  int x_, y_;
  std::size_t es_, bytes_ = 0;
  bool identity_ = false;
  StridedDims dims_;
};

void require_float(const BuildContext& cx, DType dt) {
  if (!is_floating(dt)) {
    throw Unsupported("cuda backend: " + cx.where + ": no " + std::string(dtype_name(dt)) +
                      " kernel");
  }
}

}  // namespace

std::unique_ptr<Step> make_basic_step(const BuildContext& cx) {
  switch (cx.node.op) {
    case OpKind::Add:
    case OpKind::Mul:
    case OpKind::Sub:
    case OpKind::Div:
      return std::make_unique<BinaryStep>(cx);
    case OpKind::Gelu:
      require_float(cx, cx.out().dtype);
      return std::make_unique<ActivationStep>(
          cx, cx.node.attrs.s("approximate", "none") == "tanh" ? Act::GeluTanh : Act::Gelu);
    case OpKind::Silu:
      require_float(cx, cx.out().dtype);
      return std::make_unique<ActivationStep>(cx, Act::Silu);
    case OpKind::Relu:
      require_float(cx, cx.out().dtype);
      return std::make_unique<ActivationStep>(cx, Act::Relu);
    case OpKind::Softmax:
      require_float(cx, cx.out().dtype);
      return std::make_unique<SoftmaxStep>(cx);
    case OpKind::LayerNorm:
    case OpKind::RmsNorm:
      require_float(cx, cx.out().dtype);
      return std::make_unique<NormStep>(cx);
    case OpKind::AdaptiveAvgPool2d:
    case OpKind::MaxPool2d:
      require_float(cx, cx.out().dtype);
      return std::make_unique<PoolStep>(cx);
    case OpKind::Embedding:
      return std::make_unique<EmbeddingStep>(cx);
    case OpKind::Concat:
      return std::make_unique<ConcatStep>(cx);
    case OpKind::Slice:
      return std::make_unique<SliceStep>(cx);
    case OpKind::Permute:
      return std::make_unique<PermuteStep>(cx);
    default:
      break;
  }
  throw Unsupported("cuda backend: no kernel for " + cx.where);
}

}  // namespace devpipe::cuda
