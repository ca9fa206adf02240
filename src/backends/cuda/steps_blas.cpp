// Linear and Matmul on cuBLASLt.
//
// Row-major through the column-major library: the memory of a row-major C[M, N] is the
// column-major D = C^T (N x M, ld N), and D = B^T * A^T. So cuBLASLt's "A" is the memory of B
// (row-major [K, N] = column-major N x K, no transpose; or a weight [N, K] = column-major K x N,
// transposed) and its "B" is the memory of A (row-major [M, K] = column-major K x M). A bias of
// the output features is a bias of D's rows, which is what cuBLASLt's BIAS epilogue adds.
//
// Compute: CUBLAS_COMPUTE_32F (float accumulation) for every dtype; float32 may use TF32 only
// with DEVPIPE_ALLOW_TF32=1 (CUBLAS_COMPUTE_32F_FAST_TF32). Epilogues: RELU(_BIAS) always;
// GELU(_BIAS) (cuBLASLt's tanh approximation) for "gelu_tanh" in bfloat16/float16 only; BIAS
// otherwise, with exact gelu, silu (and gelu_tanh in float32) applied by the backend's own
// kernel. Algorithms are chosen once at compile, for 16-byte aligned operands and for
// element-aligned ones (the caller's buffers may sit at any element offset); when cuBLASLt has
// none, a plain CUDA kernel computes the product.
#include <algorithm>

#include "backends/cuda/executor.h"
#include "devpipe/error.h"

namespace devpipe::cuda {
namespace {

Act act_from_name(const std::string& s) {
  if (s == "relu") return Act::Relu;
  if (s == "gelu") return Act::Gelu;
  if (s == "gelu_tanh") return Act::GeluTanh;
  if (s == "silu") return Act::Silu;
  return Act::None;
}

class GemmStep final : public Step {
 public:
  GemmStep(const BuildContext& cx, GemmPlan plan, int a, int b, int bias, int c, Act act)
      : plan_(std::move(plan)), dt_(cx.out().dtype), a_(a), b_(b), bias_(bias), c_(c), act_(act) {
    es_ = dtype_size(dt_);
    if (plan_.k == 0) {
      post_bias_ = bias_ >= 0;
      post_act_ = act_;
      return;  // C = act(bias): no product to compute
    }
    lt_ = cx.ctx.lt();
    workspace_ = cx.ctx.lt_workspace();
    const cudaDataType_t type = cuda_data_type(dt_);
    const cublasComputeType_t compute =
        dt_ == DType::Float32 && allow_tf32() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    const std::string& where = cx.where;
    DEVPIPE_CUBLAS_CHECK(cublasLtMatmulDescCreate(desc_.out(), compute, CUDA_R_32F), where);
    const cublasOperation_t trans_a = plan_.b_nk ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t trans_b = CUBLAS_OP_N;
    DEVPIPE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_.get(), CUBLASLT_MATMUL_DESC_TRANSA,
                                                        &trans_a, sizeof trans_a),
                         where);
    DEVPIPE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_.get(), CUBLASLT_MATMUL_DESC_TRANSB,
                                                        &trans_b, sizeof trans_b),
                         where);
    // LtA = memory of B, LtB = memory of A, D = C^T.
    const std::uint64_t m = static_cast<std::uint64_t>(plan_.m),
                        n = static_cast<std::uint64_t>(plan_.n),
                        k = static_cast<std::uint64_t>(plan_.k);
    if (plan_.b_nk) {
      DEVPIPE_CUBLAS_CHECK(
          cublasLtMatrixLayoutCreate(lt_a_.out(), type, k, n, static_cast<std::int64_t>(k)), where);
    } else {
      DEVPIPE_CUBLAS_CHECK(
          cublasLtMatrixLayoutCreate(lt_a_.out(), type, n, k, static_cast<std::int64_t>(n)), where);
    }
    DEVPIPE_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(lt_b_.out(), type, k, m, static_cast<std::int64_t>(k)), where);
    DEVPIPE_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(lt_d_.out(), type, n, m, static_cast<std::int64_t>(n)), where);
    if (plan_.batch > 1) {
      const std::int32_t count = static_cast<std::int32_t>(plan_.batch);
      set_batch(lt_a_.get(), count, plan_.stride_b, where);
      set_batch(lt_b_.get(), count, plan_.stride_a, where);
      set_batch(lt_d_.get(), count, plan_.stride_c, where);
    }

    // Epilogue, then the algorithms (aligned and element-aligned operands).
    cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_DEFAULT;
    const bool has_bias = bias_ >= 0;
    const bool low_precision = dt_ != DType::Float32;
    if (act_ == Act::Relu) {
      epi = has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    } else if (act_ == Act::GeluTanh && low_precision) {
      epi = has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    } else if (has_bias) {
      epi = CUBLASLT_EPILOGUE_BIAS;
    }
    const bool epi_has_act = epi != CUBLASLT_EPILOGUE_DEFAULT && epi != CUBLASLT_EPILOGUE_BIAS;
    if (epi != CUBLASLT_EPILOGUE_DEFAULT && plan_.batch == 1 && choose_algos(epi, where)) {
      epilogue_ = true;
      post_bias_ = false;
      post_act_ = epi_has_act ? Act::None : act_;
    } else {
      set_epilogue(CUBLASLT_EPILOGUE_DEFAULT, where);
      choose_algos(CUBLASLT_EPILOGUE_DEFAULT, where);
      post_bias_ = has_bias;
      post_act_ = act_;
    }
  }

  void launch(const LaunchContext& cx) override {
    std::byte* a = cx.at(a_);
    std::byte* b = cx.at(b_);
    std::byte* c = cx.at(c_);
    const void* bias = bias_ >= 0 ? cx.at(bias_) : nullptr;
    const std::int64_t total_rows = total_c_elems() / plan_.n;
    if (plan_.k == 0) {
      DEVPIPE_CUDA_CHECK(
          cudaMemsetAsync(c, 0, static_cast<std::size_t>(total_c_elems()) * es_, cx.stream));
    } else {
      if (epilogue_) {
        DEVPIPE_CUBLAS_CHECK(
            cublasLtMatmulDescSetAttribute(desc_.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias,
                                           sizeof bias),
            where);
      }
      const float alpha = 1.f, beta = 0.f;
      for (const GemmCall& call : plan_.calls) {
        const std::byte* pa = a + static_cast<std::size_t>(call.a_off) * es_;
        const std::byte* pb = b + static_cast<std::size_t>(call.b_off) * es_;
        std::byte* pc = c + static_cast<std::size_t>(call.c_off) * es_;
        const bool aligned = aligned16(pa) && aligned16(pb) && aligned16(pc);
        const cublasLtMatmulAlgo_t* algo = aligned && has_aligned_ ? &algo_aligned_
                                           : has_unaligned_        ? &algo_unaligned_
                                                                   : nullptr;
        const std::size_t ws = aligned && has_aligned_ ? ws_aligned_ : ws_unaligned_;
        if (algo) {
          DEVPIPE_CUBLAS_CHECK(
              cublasLtMatmul(lt_, desc_.get(), &alpha, pb, lt_a_.get(), pa, lt_b_.get(), &beta, pc,
                             lt_d_.get(), pc, lt_d_.get(), algo, workspace_, ws, cx.stream),
              where);
        } else {
          GemmParams p;
          p.batch = plan_.batch;
          p.m = plan_.m;
          p.n = plan_.n;
          p.k = plan_.k;
          p.a_batch = plan_.stride_a;
          p.a_m = plan_.k;
          p.a_k = 1;
          p.b_batch = plan_.stride_b;
          p.b_k = plan_.b_nk ? 1 : plan_.n;
          p.b_n = plan_.b_nk ? plan_.k : 1;
          launch_naive_gemm(dt_, pa, pb, pc, p, cx.stream);
          if (epilogue_) {  // the epilogue was planned into cuBLASLt: apply it here instead
            launch_bias_act(dt_, pc, bias, pc, plan_.batch * plan_.m, plan_.n, act_, cx.stream);
          }
        }
      }
    }
    if (post_bias_ || post_act_ != Act::None) {
      launch_bias_act(dt_, c, post_bias_ ? bias : nullptr, c, total_rows, plan_.n, post_act_,
                      cx.stream);
    }
  }

 private:
  static bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

  std::int64_t total_c_elems() const {
    std::int64_t calls = static_cast<std::int64_t>(plan_.calls.size());
    return calls * plan_.batch * plan_.m * plan_.n;
  }

  static void set_batch(cublasLtMatrixLayout_t l, std::int32_t count, std::int64_t stride,
                        const std::string& where) {
    DEVPIPE_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                          &count, sizeof count),
                         where);
    DEVPIPE_CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                         sizeof stride),
        where);
  }

  void set_epilogue(cublasLtEpilogue_t epi, const std::string& where) {
    DEVPIPE_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc_.get(), CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                        &epi, sizeof epi),
                         where);
  }

  /// Best algorithm for operands aligned to `align` bytes, or false.
  bool query(std::uint32_t align, cublasLtMatmulAlgo_t& algo, std::size_t& ws,
             const std::string& where) {
    LtPreference pref;
    DEVPIPE_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(pref.out()), where);
    const std::uint64_t max_ws = RankContext::kLtWorkspaceBytes;
    DEVPIPE_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &max_ws, sizeof max_ws),
        where);
    for (auto attr :
         {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
          CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
      DEVPIPE_CUBLAS_CHECK(
          cublasLtMatmulPreferenceSetAttribute(pref.get(), attr, &align, sizeof align), where);
    }
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(lt_, desc_.get(), lt_a_.get(), lt_b_.get(), lt_d_.get(),
                                       lt_d_.get(), pref.get(), 1, &result, &returned);
    if (st != CUBLAS_STATUS_SUCCESS || returned < 1 || result.state != CUBLAS_STATUS_SUCCESS)
      return false;
    algo = result.algo;
    ws = result.workspaceSize;
    return true;
  }

  /// Sets the epilogue and picks both algorithms; false (nothing kept) when the epilogue has
  /// no algorithm for one of the alignments.
  bool choose_algos(cublasLtEpilogue_t epi, const std::string& where) {
    set_epilogue(epi, where);
    has_aligned_ = query(16, algo_aligned_, ws_aligned_, where);
    has_unaligned_ = query(static_cast<std::uint32_t>(es_), algo_unaligned_, ws_unaligned_, where);
    if (epi != CUBLASLT_EPILOGUE_DEFAULT && !(has_aligned_ && has_unaligned_)) {
      has_aligned_ = has_unaligned_ = false;
      return false;
    }
    return true;
  }

  GemmPlan plan_;
  DType dt_;
  std::size_t es_ = 4;
  int a_, b_, bias_, c_;
  Act act_;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  LtMatmulDesc desc_;
  LtLayout lt_a_, lt_b_, lt_d_;
  cublasLtMatmulAlgo_t algo_aligned_{}, algo_unaligned_{};
  std::size_t ws_aligned_ = 0, ws_unaligned_ = 0;
  bool has_aligned_ = false, has_unaligned_ = false;
  bool epilogue_ = false;
  bool post_bias_ = false;
  Act post_act_ = Act::None;
};

}  // namespace

std::unique_ptr<Step> make_linear_step(const BuildContext& cx) {
  GemmPlan plan = plan_linear(cx.in(0).shape, cx.in(1).shape);
  const int bias = cx.num_inputs() == 3 ? cx.in_id(2) : -1;
  return std::make_unique<GemmStep>(cx, std::move(plan), cx.in_id(0), cx.in_id(1), bias,
                                    cx.out_id(),
                                    act_from_name(cx.node.attrs.s("activation", "none")));
}

std::unique_ptr<Step> make_matmul_step(const BuildContext& cx) {
  GemmPlan plan = plan_matmul(cx.in(0).shape, cx.in(1).shape, cx.out().shape);
  return std::make_unique<GemmStep>(cx, std::move(plan), cx.in_id(0), cx.in_id(1), -1, cx.out_id(),
                                    Act::None);
}

}  // namespace devpipe::cuda
