// Kernels for the decoder's device-side ops: StateWrite (rows written into a state in place)
// and Sample (a token id per row of logits).
#include <omp.h>

#include <cstring>

#include "backends/cpu/kernel.h"
#include "graph/op_def.h"

namespace devpipe::cpu {

namespace {

/// Writes the rows of `values` into the state at `positions`. The output is the state itself
/// (the memory planner aliases them), so nothing else is copied.
class StateWriteKernel : public Kernel {
 public:
  explicit StateWriteKernel(const BuildContext& cx)
      : state_(cx.in_id(0)),
        values_(cx.in_id(1)),
        positions_(cx.in_id(2)),
        out_(cx.out_id()),
        state_shape_(cx.in(0).shape),
        values_shape_(cx.in(1).shape),
        dim_(static_cast<int>(cx.node.attrs.i("dim"))),
        elem_(dtype_size(cx.in(0).dtype)),
        bytes_(static_cast<std::size_t>(cx.in(0).shape.numel()) * elem_) {}

  void run(const RunContext& cx) override {
    std::byte* out = cx.values[out_];
    // Aliased by the plan; a copy only if a caller compiled the node some other way.
    if (out != cx.values[state_]) std::memmove(out, cx.values[state_], bytes_);
    state_write_rows(out, state_shape_, cx.values[values_], values_shape_,
                     reinterpret_cast<const std::int64_t*>(cx.values[positions_]), dim_, elem_);
  }

 private:
  int state_, values_, positions_, out_;
  Shape state_shape_, values_shape_;
  int dim_;
  std::size_t elem_, bytes_;
};

/// One token per row: rows in parallel, each with its own slice of scratch (logits widened to
/// float, the softmax weights and the candidate order).
template <DType D>
class SampleKernel : public Kernel {
  using E = Elem<D>;
  using T = typename E::T;

 public:
  explicit SampleKernel(const BuildContext& cx)
      : logits_(cx.in_id(0)),
        params_(cx.in_id(1)),
        u_(cx.in_id(2)),
        out_(cx.out_id()),
        rows_(cx.in(0).shape[0]),
        vocab_(cx.in(0).shape[1]) {}

  std::size_t scratch_bytes() const override { return static_cast<std::size_t>(rows_) * row_scratch(); }

  void run(const RunContext& cx) override {
    const auto* logits = reinterpret_cast<const T*>(cx.values[logits_]);
    const auto* params = reinterpret_cast<const float*>(cx.values[params_]);
    const auto* u = reinterpret_cast<const float*>(cx.values[u_]);
    auto* y = reinterpret_cast<std::int64_t*>(cx.values[out_]);
    std::byte* scratch = cx.scratch;
    const std::int64_t V = vocab_;
#pragma omp parallel for schedule(static) if (rows_ > 1)
    for (std::int64_t b = 0; b < rows_; ++b) {
      std::byte* s = scratch + static_cast<std::size_t>(b) * row_scratch();
      auto* row = reinterpret_cast<float*>(s);
      auto* work = row + V;
      auto* order = reinterpret_cast<std::int32_t*>(work + V);
      const T* src = logits + b * V;
      for (std::int64_t j = 0; j < V; ++j) row[j] = E::load(src[j]);
      y[b] = sample_row(row, V, params[3 * b], params[3 * b + 1], params[3 * b + 2], u[b], work, order);
    }
  }

 private:
  std::size_t row_scratch() const {
    std::size_t n = static_cast<std::size_t>(vocab_) * (2 * sizeof(float) + sizeof(std::int32_t));
    return (n + 63) / 64 * 64;
  }
  int logits_, params_, u_, out_;
  std::int64_t rows_, vocab_;
};

}  // namespace

std::unique_ptr<Kernel> make_state_write_kernel(const BuildContext& cx) {
  return std::make_unique<StateWriteKernel>(cx);
}

std::unique_ptr<Kernel> make_sample_kernel(const BuildContext& cx) {
  return dispatch_float(cx.in(0).dtype, cx.where, [&](auto e) -> std::unique_ptr<Kernel> {
    return std::make_unique<SampleKernel<decltype(e)::kDType>>(cx);
  });
}

}  // namespace devpipe::cpu
