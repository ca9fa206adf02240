// Internal (cpu backend): the kernel interface the executor runs, and the oneDNN kernel that
// runs a fixed list of primitives with pre-built argument arrays.
//
// A kernel is built once per node at compile time (all oneDNN primitives are created then),
// bound once to the planned memory, and run many times without heap allocation.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <oneapi/dnnl/dnnl.hpp>
#include <omp.h>
#include <string>
#include <vector>

#include "backends/cpu/cpu_isa.h"
#include "backends/cpu/dnnl_util.h"
#include "devpipe/graph.h"
#include "runtime/backend.h"

namespace devpipe::cpu {

/// A std::allocator that aligns to a cache line: weights a kernel packs for itself and loads a
/// vector register at a time (a 64-byte load from malloc's 16-byte alignment straddles two cache
/// lines three times in four: the fused conv + pool's micro-kernel ran about 5% slower so).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};
/// Floats starting on a cache line (CacheLineAllocator).
using AlignedFloats = std::vector<float, CacheLineAllocator<float>>;

/// Where a kernel operand lives: a graph value (plus a byte offset), the kernel's own scratch
/// region (an offset into it), or fixed memory (a parameter or a buffer the kernel owns).
struct BufRef {
  enum class Kind { Value, Scratch, Fixed };
  Kind kind = Kind::Value;
  int value = -1;
  std::size_t offset = 0;
  void* fixed = nullptr;

  static BufRef of_value(int value, std::size_t offset = 0) {
    return {Kind::Value, value, offset, nullptr};
  }
  static BufRef of_scratch(std::size_t offset) { return {Kind::Scratch, -1, offset, nullptr}; }
  static BufRef of_fixed(void* p) { return {Kind::Fixed, -1, 0, p}; }
};

/// What a kernel builder knows at compile time about the node it builds.
struct BuildContext {
  const Graph& graph;
  const Node& node;
  const RankInfo& rank;
  /// Per value id: the host address when it is fixed at compile time (a parameter or a view of
  /// one), else nullptr.
  const std::vector<std::byte*>& fixed;
  /// "linear at 'enc.fc1' ([2, 4] float32, [3, 4] float32) -> [2, 3] float32", for messages.
  std::string where;
  /// Per value id: true when its producer may store it in the primitive's preferred (blocked)
  /// layout, because its only reader is a pooling node that reads that layout directly.
  const std::vector<bool>* blocked_ok = nullptr;
  /// Per value id: the layout a producer chose for it (ndims 0: plain row-major).
  std::vector<DnnlDesc>* layouts = nullptr;

  int in_id(std::size_t i) const { return node.inputs.at(i); }
  int out_id(std::size_t i = 0) const { return node.outputs.at(i); }
  const ValueInfo& in(std::size_t i) const { return graph.value(in_id(i)); }
  const ValueInfo& out(std::size_t i = 0) const { return graph.value(out_id(i)); }
  std::size_t num_inputs() const { return node.inputs.size(); }
  /// Fixed address of input i, or nullptr.
  std::byte* fixed_input(std::size_t i) const { return fixed[static_cast<std::size_t>(in_id(i))]; }
  /// Whether output `value` may be stored blocked (see blocked_ok).
  bool may_block(int value) const {
    return blocked_ok && (*blocked_ok)[static_cast<std::size_t>(value)];
  }
  /// The non-plain layout of `value`, or nullptr when it is plain.
  const DnnlDesc* layout_of(int value) const {
    if (!layouts) return nullptr;
    const DnnlDesc& d = (*layouts)[static_cast<std::size_t>(value)];
    return d.data.ndims == 0 ? nullptr : &d;
  }
  void set_layout(int value, const DnnlDesc& md) const {
    if (layouts) (*layouts)[static_cast<std::size_t>(value)] = md;
  }
};

/// Memory handed to a kernel once, after planning.
struct BindContext {
  /// Per value id: the address when it does not change between runs, else nullptr.
  const std::vector<std::byte*>& values;
  /// Start of the kernel's scratch region (nullptr when it asked for none).
  std::byte* scratch;
};

/// Sets the calling thread's OpenMP thread count to `n` for a scope when n > 0 (ICVs are per
/// thread); the count it had comes back at the end of the scope.
class OmpThreadsScope {
 public:
  explicit OmpThreadsScope(int n) : previous_(omp_get_max_threads()) {
    if (n > 0) omp_set_num_threads(n);
  }
  ~OmpThreadsScope() { omp_set_num_threads(previous_); }
  OmpThreadsScope(const OmpThreadsScope&) = delete;
  OmpThreadsScope& operator=(const OmpThreadsScope&) = delete;

 private:
  int previous_;
};

class WorkPool;

/// Per-run state handed to each kernel.
struct RunContext {
  /// Per value id: the address for this run.
  std::byte* const* values;
  std::byte* scratch;
  dnnl::stream& stream;
  const RankInfo& rank;
  /// The executable's thread team for kernels that asked for one (wants_pool), else nullptr.
  WorkPool* pool = nullptr;
};

/// One node's computation.
class Kernel {
 public:
  virtual ~Kernel() = default;
  /// Bytes of scratch needed while the kernel runs (planned into the arena).
  virtual std::size_t scratch_bytes() const { return 0; }
  /// Called once after memory planning.
  virtual void bind(const BindContext& cx) {}
  /// Runs the node; no heap allocation on success.
  virtual void run(const RunContext& cx) = 0;
  /// Whether run() spreads its work over RunContext::pool (instead of OpenMP).
  virtual bool wants_pool() const { return false; }

  /// Op, scope and shapes, for messages.
  std::string where;
};

/// A kernel made of oneDNN primitives executed in order, with argument arrays built at compile
/// time; only operands whose memory changes between runs get a new handle per run.
class DnnlKernel : public Kernel {
 public:
  /// One primitive argument.
  struct Arg {
    int arg;  // DNNL_ARG_*
    DnnlDesc md;
    BufRef ref;
  };

  /// Reserves `bytes` of scratch (64-byte aligned); returns its offset in the kernel's region.
  std::size_t add_scratch(std::size_t bytes);
  /// Appends a primitive to run with `args`.
  void add_step(const dnnl::primitive& prim, const std::vector<Arg>& args);
  /// Keeps a block (reordered weights) alive as long as the kernel.
  void keep(std::shared_ptr<void> block) { owned_.push_back(std::move(block)); }

  std::size_t scratch_bytes() const override { return scratch_; }
  void bind(const BindContext& cx) override;
  void run(const RunContext& cx) override;

 private:
  struct Step {
    dnnl::primitive prim;
    std::vector<dnnl::memory> mems;
    std::vector<BufRef> refs;
    std::vector<dnnl_exec_arg_t> args;
  };
  struct Dynamic {
    dnnl_memory_t mem;
    int value;
    std::size_t offset;
  };
  std::vector<Step> steps_;
  std::vector<Dynamic> dynamic_;
  std::vector<std::shared_ptr<void>> owned_;
  std::size_t scratch_ = 0;
};

/// A tensor operand of a primitive: a graph value seen through a descriptor in the value's own
/// dtype and layout (plain or strided).
struct Operand {
  int arg;  // DNNL_ARG_*
  int value;
  DnnlDesc md;
  std::size_t offset = 0;  // bytes from the value's start
};

/// Primitive attributes with a user-managed scratchpad (planned into the arena).
dnnl::primitive_attr user_scratch_attr();

/// Builds a primitive descriptor with `make(type)`: first for the node's own floating dtype,
/// then, when oneDNN has no such primitive for it, for f32 (operands are then converted by
/// add_primitive). Wraps oneDNN errors into devpipe::Error naming cx.where.
template <class MakePd>
auto make_pd_with_fallback(const BuildContext& cx, DType dtype, MakePd&& make)
    -> decltype(make(DnnlType::f32)) {
  DnnlType native = dnnl_type(dtype, cx.where);
  try {
    return make(native);
  } catch (const dnnl::error& e) {
    if (native == DnnlType::f32) {
      throw Error("cpu backend: oneDNN cannot build " + cx.where + ": " + e.what());
    }
  }
  try {
    return make(DnnlType::f32);
  } catch (const dnnl::error& e) {
    throw Error("cpu backend: oneDNN cannot build " + cx.where + " (in " +
                std::string(dtype_name(dtype)) + " nor float32): " + e.what());
  }
}

/// Adds `pd`'s primitive to `k`. An operand whose descriptor differs from the one the primitive
/// wants (another layout or dtype) goes through a reorder: inputs in fixed memory (weights)
/// once now into memory the kernel keeps, other inputs per run into scratch before the
/// primitive, outputs per run from scratch after it. Adds the scratchpad when needed.
void add_primitive(DnnlKernel& k, const BuildContext& cx, const dnnl::primitive_desc_base& pd,
                   const std::vector<Operand>& inputs, const std::vector<Operand>& outputs);

/// Adds a reorder (copy/convert) from `src` to `dst` to `k`.
void add_reorder(DnnlKernel& k, const DnnlDesc& src_md, const BufRef& src, const DnnlDesc& dst_md,
                 const BufRef& dst);

/// Runs `body(i)` for i in [0, n), over the calling thread's OpenMP team when the work
/// (n * work_per_item) is big enough to pay for it.
template <class Body>
void parallel_for(std::int64_t n, std::int64_t work_per_item, Body&& body) {
  if (n * work_per_item < 32768 || n < 2) {
    for (std::int64_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) body(i);
}

/// Builds the kernel of cx.node; throws Unsupported for an op/dtype it cannot run.
std::unique_ptr<Kernel> make_kernel(const BuildContext& cx);

// Family builders (kernels_*.cpp).
std::unique_ptr<Kernel> make_linear_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_matmul_kernel(const BuildContext& cx);
/// An own kernel for a skinny float32 Linear (kernels_skinny), or nullptr for oneDNN's.
std::unique_ptr<Kernel> make_skinny_linear_kernel(const BuildContext& cx);
/// Which skinny kernel runs x[m, k] @ w[n, k]^T on `isa` (None: oneDNN's matmul).
enum class SkinnyForm { None, Expand, Reduce };
SkinnyForm skinny_linear_form(std::int64_t m, std::int64_t k, std::int64_t n, CpuIsa isa);
/// The Linear kernel for at most 16 rows of float32 or bfloat16 (kernels_small_rows), or
/// nullptr when small_rows_linear_applies says no or the operands' dtypes differ.
std::unique_ptr<Kernel> make_small_rows_linear_kernel(const BuildContext& cx);
/// Whether the small-rows kernel runs x[m, k] @ w[n, k]^T in `dtype` on `isa` (Baseline: no).
bool small_rows_linear_applies(std::int64_t m, std::int64_t k, DType dtype, CpuIsa isa);
/// Whether a Linear of m rows and n outputs whose weights are fixed at compile, built for
/// `threads` threads, runs as column slices of one-thread oneDNN matmuls on the executable's
/// WorkPool (kernels_dnnl.cpp; when the skinny and small-rows kernels do not take it).
bool sliced_linear_applies(std::int64_t m, std::int64_t n, int threads);
std::unique_ptr<Kernel> make_conv2d_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_conv_global_avg_pool_kernel(const BuildContext& cx);  // kernels_conv_pool
std::unique_ptr<Kernel> make_conv_patch_mean_kernel(const BuildContext& cx);       // kernels_conv_pool
std::unique_ptr<Kernel> make_adaptive_avg_pool_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_max_pool_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_layer_norm_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_softmax_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_eltwise_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_binary_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_permute_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_concat_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_slice_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_embedding_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_rms_norm_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_collective_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_reduce_kernel(const BuildContext& cx);
// kernels_select.cpp
std::unique_ptr<Kernel> make_constant_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_argmax_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_index_select_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_gather_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_where_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_masked_fill_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_int64_affine_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_rotary_kernel(const BuildContext& cx);
// kernels_attention.cpp
std::unique_ptr<Kernel> make_attention_kernel(const BuildContext& cx);
/// The instruction set attention kernels built now use: "avx512", "avx2" or "baseline" (the
/// best the CPU supports, capped by DEVPIPE_CPU_ISA).
std::string attention_isa();
// kernels_state.cpp
std::unique_ptr<Kernel> make_state_write_kernel(const BuildContext& cx);
std::unique_ptr<Kernel> make_sample_kernel(const BuildContext& cx);

}  // namespace devpipe::cpu
