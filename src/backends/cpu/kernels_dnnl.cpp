// Kernels built from oneDNN primitives: linear, matmul, conv2d, pooling, layer norm, softmax,
// activations, add/mul, and the data-movement ops permute, concat and slice.
#include <omp.h>

#include <algorithm>
#include <numeric>

#include "backends/cpu/kernel.h"
#include "backends/cpu/work_pool.h"
#include "graph/op_def.h"

namespace devpipe::cpu {

namespace {

using dnnl::algorithm;
using dnnl::prop_kind;

std::int64_t product(const std::vector<std::int64_t>& v, std::size_t begin, std::size_t end) {
  std::int64_t p = 1;
  for (std::size_t i = begin; i < end; ++i) p *= v[i];
  return p;
}

/// Eltwise algorithm and alpha of an activation name as the Linear "activation" attr spells it.
struct Activation {
  algorithm alg;
  float alpha;
};
Activation activation_of(const std::string& name, const std::string& where) {
  if (name == "relu") return {algorithm::eltwise_relu, 0.f};
  if (name == "gelu") return {algorithm::eltwise_gelu_erf, 0.f};
  if (name == "gelu_tanh") return {algorithm::eltwise_gelu_tanh, 0.f};
  if (name == "silu") return {algorithm::eltwise_swish, 1.f};
  throw Unsupported("cpu backend: " + where + ": unknown activation '" + name + "'");
}

/// Adds to `kernel` the matmul of Linear cx.node for output columns [n0, n0 + cols) of its
/// [m, n] output: x [m, k] times rows n0 .. of the weight [n, k] (its layout as it lies, or the
/// one the matmul prefers when `reorder_weights`: the weights are then fixed and reordered
/// once), plus the bias and activation, written into those columns of y.
void add_linear_columns(DnnlKernel& kernel, const BuildContext& cx, std::int64_t m, std::int64_t k,
                        std::int64_t n, std::int64_t n0, std::int64_t cols, bool reorder_weights) {
  DType dt = cx.out().dtype;
  const bool has_bias = cx.num_inputs() == 3;
  const std::string act = cx.node.attrs.s("activation", "none");
  const DnnlDims wstrides{1, k}, ystrides{n, 1};
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    dnnl::primitive_attr attr = user_scratch_attr();
    if (act != "none") {
      Activation a = activation_of(act, cx.where);
      dnnl::post_ops po;
      po.append_eltwise(1.f, a.alg, a.alpha, 0.f);
      attr.set_post_ops(po);
    }
    DnnlDesc src = plain_desc({m, k}, t),
             wei = reorder_weights ? DnnlDesc({k, cols}, t, dnnl::memory::format_tag::any)
                                   : strided_desc({k, cols}, t, wstrides),
             dst = strided_desc({m, cols}, t, ystrides);
    if (has_bias) {
      return dnnl::matmul::primitive_desc(
          dnnl::matmul::desc(src, wei, plain_desc({1, cols}, t), dst), attr, cpu_engine());
    }
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, dst), attr, cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  const auto esize = dtype_size(dt);
  const auto at = static_cast<std::size_t>(n0) * esize;
  std::vector<Operand> in{{DNNL_ARG_SRC, cx.in_id(0), plain_desc({m, k}, t)},
                          {DNNL_ARG_WEIGHTS, cx.in_id(1), strided_desc({k, cols}, t, wstrides),
                           at * static_cast<std::size_t>(k)}};
  if (has_bias) in.push_back({DNNL_ARG_BIAS, cx.in_id(2), plain_desc({1, cols}, t), at});
  add_primitive(kernel, cx, pd, in,
                {{DNNL_ARG_DST, cx.out_id(), strided_desc({m, cols}, t, ystrides), at}});
}

/// Rows up to which a Linear with fixed weights runs as column slices on the work pool.
constexpr std::int64_t kSlicedMaxRows = 64;
/// Output columns per slice at least, and slices per thread at most.
constexpr std::int64_t kSliceMinColumns = 64;
constexpr std::int64_t kSlicesPerThread = 4;

/// A Linear over few rows (the seed's [32, 1024] x [1024, 1024]) as column slices, each a
/// oneDNN matmul built for one thread, run on the executable's WorkPool. oneDNN's own parallel
/// matmul is one OpenMP region that splits the columns statically and ends in a barrier: on a
/// machine whose cores other processes share, a team thread that is not running holds the whole
/// Linear up for a time slice (milliseconds, against a fraction of a millisecond of work), and
/// one that has slept since the last region must be woken first. Here whichever threads run
/// claim the slices.
class SlicedLinearKernel final : public Kernel {
 public:
  SlicedLinearKernel(const BuildContext& cx, std::int64_t m, std::int64_t k, std::int64_t n,
                     int threads) {
    const std::int64_t slices =
        std::clamp<std::int64_t>(n / kSliceMinColumns, 1, kSlicesPerThread * threads);
    const std::int64_t cols = (n + slices - 1) / slices;
    OmpThreadsScope one(1);  // each slice runs on one thread
    for (std::int64_t n0 = 0; n0 < n; n0 += cols) {
      Slice s;
      s.kernel = std::make_unique<DnnlKernel>();
      add_linear_columns(*s.kernel, cx, m, k, n, n0, std::min(cols, n - n0), true);
      s.scratch = scratch_;
      scratch_ += (s.kernel->scratch_bytes() + 63) / 64 * 64;
      slices_.push_back(std::move(s));
    }
    for (int i = 0; i < threads; ++i) streams_.emplace_back(cpu_engine());
  }

  std::size_t scratch_bytes() const override { return scratch_; }

  bool wants_pool() const override { return true; }

  void bind(const BindContext& cx) override {
    for (Slice& s : slices_) {
      s.kernel->where = where;
      s.kernel->bind(BindContext{cx.values, cx.scratch ? cx.scratch + s.scratch : nullptr});
    }
  }

  void run(const RunContext& cx) override {
    OmpThreadsScope one(1);  // the caller's share: one thread, as the slices were built
    const int threads =
        cx.pool ? std::min(cx.pool->threads(), static_cast<int>(streams_.size())) : 1;
    auto slice = [&](std::int64_t i, int thread) {
      if (thread != 0) omp_set_num_threads(1);  // a pool worker: its ICV is its own
      const Slice& s = slices_[static_cast<std::size_t>(i)];
      dnnl::stream& stream = streams_[static_cast<std::size_t>(thread)];
      s.kernel->run(RunContext{cx.values, cx.scratch ? cx.scratch + s.scratch : nullptr, stream,
                               cx.rank, nullptr});
      stream.wait();
    };
    const auto count = static_cast<std::int64_t>(slices_.size());
    if (threads <= 1) {
      for (std::int64_t i = 0; i < count; ++i) slice(i, 0);
      return;
    }
    cx.pool->run(count, slice);
  }

 private:
  struct Slice {
    std::unique_ptr<DnnlKernel> kernel;
    std::size_t scratch = 0;  // offset in this kernel's scratch
  };
  std::vector<Slice> slices_;
  std::vector<dnnl::stream> streams_;  // one per pool thread
  std::size_t scratch_ = 0;
};

}  // namespace

bool sliced_linear_applies(std::int64_t m, std::int64_t n, int threads) {
  return threads > 1 && m >= 1 && m <= kSlicedMaxRows && n >= 2 * kSliceMinColumns;
}

std::unique_ptr<Kernel> make_linear_kernel(const BuildContext& cx) {
  if (auto skinny = make_skinny_linear_kernel(cx)) return skinny;
  if (auto rows = make_small_rows_linear_kernel(cx)) return rows;
  const Shape& w = cx.in(1).shape;
  const std::int64_t n = w[0], k = w[1];
  const std::int64_t m = cx.in(0).shape.numel() / k;
  const int threads = omp_get_max_threads();
  if (cx.fixed_input(1) && sliced_linear_applies(m, n, threads)) {
    return std::make_unique<SlicedLinearKernel>(cx, m, k, n, threads);
  }
  auto kernel = std::make_unique<DnnlKernel>();
  add_linear_columns(*kernel, cx, m, k, n, 0, n, false);
  return kernel;
}

std::unique_ptr<Kernel> make_matmul_kernel(const BuildContext& cx) {
  DType dt = cx.out().dtype;
  const int r = cx.out().shape.rank();
  const DnnlDims a = pad_leading(to_dims(cx.in(0).shape), r);
  const DnnlDims b = pad_leading(to_dims(cx.in(1).shape), r);
  const DnnlDims c = to_dims(cx.out().shape);
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    return dnnl::matmul::primitive_desc(
        dnnl::matmul::desc(plain_desc(a, t), plain_desc(b, t), plain_desc(c, t)),
        user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  auto kernel = std::make_unique<DnnlKernel>();
  add_primitive(*kernel, cx, pd,
                {{DNNL_ARG_SRC, cx.in_id(0), plain_desc(a, t)},
                 {DNNL_ARG_WEIGHTS, cx.in_id(1), plain_desc(b, t)}},
                {{DNNL_ARG_DST, cx.out_id(), plain_desc(c, t)}});
  return kernel;
}

std::unique_ptr<Kernel> make_conv2d_kernel(const BuildContext& cx) {
  const Attrs& at = cx.node.attrs;
  DType dt = cx.out().dtype;
  const DnnlDims x = to_dims(cx.in(0).shape);
  const Shape& ws = cx.in(1).shape;
  const DnnlDims y = to_dims(cx.out().shape);
  const std::int64_t groups = at.i("groups");
  const bool has_bias = cx.num_inputs() == 3;
  DnnlDims w = groups > 1 ? DnnlDims{groups, ws[0] / groups, ws[1], ws[2], ws[3]}
                          : DnnlDims{ws[0], ws[1], ws[2], ws[3]};
  const auto& st = at.ints("stride");
  const auto& pad = at.ints("padding");
  const auto& dil = at.ints("dilation");
  const DnnlDims strides{st[0], st[1]}, padding{pad[0], pad[1]}, dilation{dil[0] - 1, dil[1] - 1};
  const DnnlDims bias{ws[0]};
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    using tag = dnnl::memory::format_tag;
    // The source is described as it lies (plain): with `any` oneDNN may pick a layout that
    // costs a full reorder of the input on every run. Weights are reordered once at compile.
    DnnlDesc src = plain_desc(x, t), wei(w, t, tag::any), dst(y, t, tag::any);
    auto desc = has_bias ? dnnl::convolution_forward::desc(
                               prop_kind::forward_inference, algorithm::convolution_direct, src,
                               wei, plain_desc(bias, t), dst, strides, dilation, padding, padding)
                         : dnnl::convolution_forward::desc(
                               prop_kind::forward_inference, algorithm::convolution_direct, src,
                               wei, dst, strides, dilation, padding, padding);
    return dnnl::convolution_forward::primitive_desc(desc, user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  std::vector<Operand> in{{DNNL_ARG_SRC, cx.in_id(0), plain_desc(x, t)},
                          {DNNL_ARG_WEIGHTS, cx.in_id(1), plain_desc(w, t)}};
  if (has_bias) in.push_back({DNNL_ARG_BIAS, cx.in_id(2), plain_desc(bias, t)});
  // Keep the primitive's own (blocked) output layout when a pool is the only reader and the
  // blocked tensor takes no more bytes than the plain one: no per-run reorder.
  DnnlDesc out_md = plain_desc(y, t);
  DnnlDesc preferred = pd.dst_desc();
  if (cx.may_block(cx.out_id()) && preferred.data_type() == t &&
      preferred.get_size() == out_md.get_size()) {
    out_md = preferred;
    cx.set_layout(cx.out_id(), out_md);
  }
  auto kernel = std::make_unique<DnnlKernel>();
  add_primitive(*kernel, cx, pd, in, {{DNNL_ARG_DST, cx.out_id(), out_md}});
  return kernel;
}

namespace {

/// A pooling kernel over plain NCHW tensors (dilation as PyTorch counts it, 1 = none).
std::unique_ptr<Kernel> make_pooling(const BuildContext& cx, algorithm alg, const DnnlDims& kernel,
                                     const DnnlDims& strides, const DnnlDims& padding,
                                     const DnnlDims& dilation) {
  DType dt = cx.out().dtype;
  const DnnlDims x = to_dims(cx.in(0).shape), y = to_dims(cx.out().shape);
  const bool dilated = dilation[0] > 1 || dilation[1] > 1;
  const DnnlDims dil{dilation[0] - 1, dilation[1] - 1};
  // A blocked input (a convolution's preferred layout) is read as it lies; the output then uses
  // the matching layout and is reordered to plain if it differs (small: pooled).
  const DnnlDesc* blocked = cx.layout_of(cx.in_id(0));
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) -> dnnl::primitive_desc {
    bool use_blocked = blocked && blocked->data_type() == t;
    DnnlDesc src = use_blocked ? *blocked : plain_desc(x, t);
    DnnlDesc dst = use_blocked ? DnnlDesc(y, t, dnnl::memory::format_tag::any) : plain_desc(y, t);
    if (dilated) {
      return dnnl::pooling_v2_forward::primitive_desc(
          dnnl::pooling_v2_forward::desc(prop_kind::forward_inference, alg, src, dst, strides,
                                         kernel, dil, padding, padding),
          user_scratch_attr(), cpu_engine());
    }
    return dnnl::pooling_forward::primitive_desc(
        dnnl::pooling_forward::desc(prop_kind::forward_inference, alg, src, dst, strides, kernel,
                                    padding, padding),
        user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  auto k = std::make_unique<DnnlKernel>();
  add_primitive(*k, cx, pd, {{DNNL_ARG_SRC, cx.in_id(0), blocked ? *blocked : plain_desc(x, t)}},
                {{DNNL_ARG_DST, cx.out_id(), plain_desc(y, t)}});
  return k;
}

}  // namespace

std::unique_ptr<Kernel> make_adaptive_avg_pool_loop_kernel(const BuildContext& cx);

std::unique_ptr<Kernel> make_adaptive_avg_pool_kernel(const BuildContext& cx) {
  const Shape& x = cx.in(0).shape;
  const Shape& y = cx.out().shape;
  if (x[2] % y[2] != 0 || x[3] % y[3] != 0) return make_adaptive_avg_pool_loop_kernel(cx);
  const std::int64_t kh = x[2] / y[2], kw = x[3] / y[3];
  return make_pooling(cx, algorithm::pooling_avg_exclude_padding, {kh, kw}, {kh, kw}, {0, 0},
                      {1, 1});
}

std::unique_ptr<Kernel> make_max_pool_kernel(const BuildContext& cx) {
  const Attrs& at = cx.node.attrs;
  const auto& k = at.ints("kernel_size");
  const auto& s = at.ints("stride");
  const auto& p = at.ints("padding");
  const auto& d = at.ints("dilation");
  return make_pooling(cx, algorithm::pooling_max, {k[0], k[1]}, {s[0], s[1]}, {p[0], p[1]},
                      {d[0], d[1]});
}

std::unique_ptr<Kernel> make_layer_norm_kernel(const BuildContext& cx) {
  DType dt = cx.out().dtype;
  const auto& ns = cx.node.attrs.ints("normalized_shape");
  const std::int64_t c = product(ns, 0, ns.size());
  const std::int64_t m = cx.in(0).shape.numel() / c;
  const float eps = static_cast<float>(cx.node.attrs.f("eps"));
  const bool has_w = cx.num_inputs() >= 2, has_b = cx.num_inputs() >= 3;
  auto flags = dnnl::normalization_flags::none;
  if (has_w) flags |= dnnl::normalization_flags::use_scale;
  if (has_b) flags |= dnnl::normalization_flags::use_shift;
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    return dnnl::layer_normalization_forward::primitive_desc(
        dnnl::layer_normalization_forward::desc(prop_kind::forward_inference, plain_desc({m, c}, t),
                                                eps, flags),
        user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  std::vector<Operand> in{{DNNL_ARG_SRC, cx.in_id(0), plain_desc({m, c}, t)}};
  if (has_w) in.push_back({DNNL_ARG_SCALE, cx.in_id(1), plain_desc({c}, t)});
  if (has_b) in.push_back({DNNL_ARG_SHIFT, cx.in_id(2), plain_desc({c}, t)});
  auto k = std::make_unique<DnnlKernel>();
  add_primitive(*k, cx, pd, in, {{DNNL_ARG_DST, cx.out_id(), plain_desc({m, c}, t)}});
  return k;
}

std::unique_ptr<Kernel> make_softmax_kernel(const BuildContext& cx) {
  DType dt = cx.out().dtype;
  const DnnlDims x = to_dims(cx.out().shape);
  const int axis = cx.out().shape.rank() == 0 ? 0 : static_cast<int>(cx.node.attrs.i("dim"));
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    DnnlDesc md = plain_desc(x, t);
    return dnnl::softmax_v2_forward::primitive_desc(
        dnnl::softmax_v2_forward::desc(prop_kind::forward_inference, algorithm::softmax_accurate,
                                       md, md, axis),
        user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  auto k = std::make_unique<DnnlKernel>();
  add_primitive(*k, cx, pd, {{DNNL_ARG_SRC, cx.in_id(0), plain_desc(x, t)}},
                {{DNNL_ARG_DST, cx.out_id(), plain_desc(x, t)}});
  return k;
}

namespace {

/// The eltwise algorithm and alpha/beta of a unary node (activations, exp, tanh, sigmoid, and
/// neg/add_scalar/mul_scalar as alpha * x + beta).
struct Eltwise {
  algorithm alg;
  float alpha, beta;
};
Eltwise eltwise_of(const BuildContext& cx) {
  switch (cx.node.op) {
    case OpKind::Exp:
      return {algorithm::eltwise_exp, 0.f, 0.f};
    case OpKind::Tanh:
      return {algorithm::eltwise_tanh, 0.f, 0.f};
    case OpKind::Sigmoid:
      return {algorithm::eltwise_logistic, 0.f, 0.f};
    case OpKind::Neg:
      return {algorithm::eltwise_linear, -1.f, 0.f};
    case OpKind::AddScalar:
      return {algorithm::eltwise_linear, 1.f, static_cast<float>(cx.node.attrs.f("value"))};
    case OpKind::MulScalar:
      return {algorithm::eltwise_linear, static_cast<float>(cx.node.attrs.f("value")), 0.f};
    default:
      break;
  }
  const std::string name = activation_attr_of(cx.node);
  if (name.empty()) throw Unsupported("cpu backend: not an elementwise op: " + cx.where);
  const Activation a = activation_of(name, cx.where);
  return {a.alg, a.alpha, 0.f};
}

}  // namespace

std::unique_ptr<Kernel> make_eltwise_kernel(const BuildContext& cx) {
  DType dt = cx.out().dtype;
  const Eltwise a = eltwise_of(cx);
  const DnnlDims x = {cx.out().shape.numel()};
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    return dnnl::eltwise_forward::primitive_desc(
        dnnl::eltwise_forward::desc(prop_kind::forward_inference, a.alg, plain_desc(x, t), a.alpha,
                                    a.beta),
        user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  auto k = std::make_unique<DnnlKernel>();
  add_primitive(*k, cx, pd, {{DNNL_ARG_SRC, cx.in_id(0), plain_desc(x, t)}},
                {{DNNL_ARG_DST, cx.out_id(), plain_desc(x, t)}});
  return k;
}

std::unique_ptr<Kernel> make_binary_loop_kernel(const BuildContext& cx);

std::unique_ptr<Kernel> make_binary_kernel(const BuildContext& cx) {
  DType dt = cx.out().dtype;
  if (dt == DType::Int64) return make_binary_loop_kernel(cx);
  const int r = std::max(cx.out().shape.rank(), 1);
  DnnlDims a = pad_leading(to_dims(cx.in(0).shape), r);
  DnnlDims b = pad_leading(to_dims(cx.in(1).shape), r);
  const DnnlDims c = to_dims(cx.out().shape);
  int ia = cx.in_id(0), ib = cx.in_id(1);
  const OpKind op = cx.node.op;
  // oneDNN broadcasts src1 cheaply; add and mul commute, so put the full-size operand first.
  if (a != c && b == c && (op == OpKind::Add || op == OpKind::Mul)) {
    std::swap(a, b);
    std::swap(ia, ib);
  }
  const algorithm alg = op == OpKind::Add   ? algorithm::binary_add
                        : op == OpKind::Mul ? algorithm::binary_mul
                        : op == OpKind::Sub ? algorithm::binary_sub
                                            : algorithm::binary_div;
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    return dnnl::binary::primitive_desc(
        dnnl::binary::desc(alg, plain_desc(a, t), plain_desc(b, t), plain_desc(c, t)),
        user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  auto k = std::make_unique<DnnlKernel>();
  add_primitive(*k, cx, pd,
                {{DNNL_ARG_SRC_0, ia, plain_desc(a, t)}, {DNNL_ARG_SRC_1, ib, plain_desc(b, t)}},
                {{DNNL_ARG_DST, cx.out_id(), plain_desc(c, t)}});
  return k;
}

// Sum and mean over a set of dims: a oneDNN reduction with the reduced dims kept as 1.
std::unique_ptr<Kernel> make_reduce_kernel(const BuildContext& cx) {
  DType dt = cx.out().dtype;
  const DnnlDims x = to_dims(cx.in(0).shape);
  DnnlDims y = x;
  for (auto d : cx.node.attrs.ints("dims")) y[static_cast<std::size_t>(d)] = 1;
  const algorithm alg =
      cx.node.op == OpKind::Sum ? algorithm::reduction_sum : algorithm::reduction_mean;
  auto pd = make_pd_with_fallback(cx, dt, [&](DnnlType t) {
    return dnnl::reduction::primitive_desc(
        dnnl::reduction::desc(alg, plain_desc(x, t), plain_desc(y, t), 0.f, 0.f),
        user_scratch_attr(), cpu_engine());
  });
  DnnlType t = dnnl_type(dt, cx.where);
  auto k = std::make_unique<DnnlKernel>();
  add_primitive(*k, cx, pd, {{DNNL_ARG_SRC, cx.in_id(0), plain_desc(x, t)}},
                {{DNNL_ARG_DST, cx.out_id(), plain_desc(y, t)}});
  return k;
}

std::unique_ptr<Kernel> make_strided_copy_loop_kernel(const BuildContext& cx,
                                                      const std::vector<std::int64_t>& dims,
                                                      const std::vector<std::int64_t>& strides,
                                                      std::size_t offset);

namespace {

/// Dims and strides of a data-movement view with the int64 lanes appended as a last dim.
struct MoveView {
  DnnlDims dims;
  DnnlDims strides;
};
MoveView with_lanes(DnnlDims dims, DnnlDims strides, int lanes) {
  if (lanes > 1) {
    for (auto& s : strides) s *= lanes;
    dims.push_back(lanes);
    strides.push_back(1);
  }
  return {std::move(dims), std::move(strides)};
}

/// A reorder kernel copying a strided view of input 0 (at `offset` bytes) to the plain output;
/// a loop when oneDNN cannot describe the view (interleaved strides of a stepped slice).
std::unique_ptr<Kernel> make_strided_copy(const BuildContext& cx, const DnnlDims& dims,
                                          const DnnlDims& src_strides, std::size_t offset) {
  MoveType mt = move_type(cx.out().dtype);
  MoveView src = with_lanes(dims, src_strides, mt.lanes);
  MoveView dst = with_lanes(dims, row_major_strides(dims), mt.lanes);
  DnnlDesc src_md, dst_md;
  dnnl::reorder::primitive_desc pd;
  try {
    src_md = strided_desc(src.dims, mt.type, src.strides);
    dst_md = strided_desc(dst.dims, mt.type, dst.strides);
    pd = dnnl::reorder::primitive_desc(cpu_engine(), src_md, cpu_engine(), dst_md,
                                       user_scratch_attr());
  } catch (const dnnl::error&) {
    return make_strided_copy_loop_kernel(cx, dims, src_strides, offset);
  }
  auto k = std::make_unique<DnnlKernel>();
  add_primitive(*k, cx, pd, {{DNNL_ARG_FROM, cx.in_id(0), src_md, offset}},
                {{DNNL_ARG_TO, cx.out_id(), dst_md}});
  return k;
}

}  // namespace

std::unique_ptr<Kernel> make_permute_kernel(const BuildContext& cx) {
  const DnnlDims in = to_dims(cx.in(0).shape);
  const DnnlDims in_strides = row_major_strides(in);
  const auto& perm = cx.node.attrs.ints("dims");
  DnnlDims dims, strides;
  for (auto p : perm) {
    dims.push_back(in[static_cast<std::size_t>(p)]);
    strides.push_back(in_strides[static_cast<std::size_t>(p)]);
  }
  if (perm.empty()) {  // a scalar
    dims = {1};
    strides = {1};
  }
  return make_strided_copy(cx, dims, strides, 0);
}

std::unique_ptr<Kernel> make_slice_kernel(const BuildContext& cx) {
  const Attrs& at = cx.node.attrs;
  const DnnlDims in = to_dims(cx.in(0).shape);
  const auto d = static_cast<std::size_t>(at.i("dim"));
  const std::int64_t step = at.i("step", 1);
  const std::int64_t start = at.i("start") + cx.rank.rank * at.i("rank_stride", 0);
  const DnnlDims out = to_dims(cx.out().shape);
  if (out[d] > 0 && start + (out[d] - 1) * step >= in[d]) {
    throw ShapeError("cpu backend: " + cx.where + ": rank " + std::to_string(cx.rank.rank) +
                     " slice starts at " + std::to_string(start) + " and runs past dim " +
                     std::to_string(d) + " of size " + std::to_string(in[d]));
  }
  DnnlDims strides = row_major_strides(in);
  const std::size_t offset =
      static_cast<std::size_t>(start * strides[d]) * dtype_size(cx.out().dtype);
  strides[d] *= step;
  return make_strided_copy(cx, out, strides, offset);
}

std::unique_ptr<Kernel> make_concat_kernel(const BuildContext& cx) {
  MoveType mt = move_type(cx.out().dtype);
  const auto dim = static_cast<int>(cx.node.attrs.i("dim"));
  auto plain = [&](const Shape& s) {
    DnnlDims dims = to_dims(s);
    MoveView v = with_lanes(dims, row_major_strides(dims), mt.lanes);
    return strided_desc(v.dims, mt.type, v.strides);
  };
  std::vector<Operand> in;
  std::vector<DnnlDesc> mds;
  for (std::size_t i = 0; i < cx.num_inputs(); ++i) {
    if (cx.in(i).shape.numel() == 0) continue;
    DnnlDesc md = plain(cx.in(i).shape);
    in.push_back({DNNL_ARG_MULTIPLE_SRC + static_cast<int>(in.size()), cx.in_id(i), md});
    mds.push_back(md);
  }
  DnnlDesc dst = plain(cx.out().shape);
  auto k = std::make_unique<DnnlKernel>();
  if (in.size() == 1) {  // every other input is empty: a copy
    add_primitive(
        *k, cx,
        dnnl::reorder::primitive_desc(cpu_engine(), mds[0], cpu_engine(), dst, user_scratch_attr()),
        {{DNNL_ARG_FROM, in[0].value, mds[0]}}, {{DNNL_ARG_TO, cx.out_id(), dst}});
    return k;
  }
  dnnl::concat::primitive_desc pd;
  try {
    pd = dnnl::concat::primitive_desc(dst, dim, mds, cpu_engine(), user_scratch_attr());
  } catch (const dnnl::error& e) {
    throw Error("cpu backend: oneDNN cannot build " + cx.where + ": " + e.what());
  }
  add_primitive(*k, cx, pd, in, {{DNNL_ARG_DST, cx.out_id(), dst}});
  return k;
}

}  // namespace devpipe::cpu
