// Conv2d on cuDNN 9's legacy convolution API (cudnn_cnn): NCHW descriptors, the algorithm chosen
// once at compile with cudnnGetConvolutionForwardAlgorithm_v7, its workspace planned into the
// executable's arena. float32 runs with CUDNN_FMA_MATH (no TF32) unless DEVPIPE_ALLOW_TF32=1.
// When cuDNN offers no usable algorithm (a dtype/grouping it lacks), a direct CUDA kernel runs
// the convolution instead. The bias is added by the backend's broadcasting add kernel.
#include "backends/cuda/executor.h"
#include "devpipe/error.h"

namespace devpipe::cuda {
namespace {

constexpr std::size_t kMaxConvWorkspace = 256u << 20;

class ConvStep final : public Step {
 public:
  explicit ConvStep(const BuildContext& cx)
      : dt_(cx.out().dtype),
        x_(cx.in_id(0)),
        w_(cx.in_id(1)),
        b_(cx.num_inputs() == 3 ? cx.in_id(2) : -1),
        y_(cx.out_id()) {
    const Shape& xs = cx.in(0).shape;
    const Shape& ws = cx.in(1).shape;
    const Shape& ys = cx.out().shape;
    const auto& stride = cx.node.attrs.ints("stride");
    const auto& pad = cx.node.attrs.ints("padding");
    const auto& dil = cx.node.attrs.ints("dilation");
    p_.n = xs[0];
    p_.c = xs[1];
    p_.h = xs[2];
    p_.w = xs[3];
    p_.o = ws[0];
    p_.kh = static_cast<int>(ws[2]);
    p_.kw = static_cast<int>(ws[3]);
    p_.oh = ys[2];
    p_.ow = ys[3];
    p_.sh = static_cast<int>(stride[0]);
    p_.sw = static_cast<int>(stride[1]);
    p_.ph = static_cast<int>(pad[0]);
    p_.pw = static_cast<int>(pad[1]);
    p_.dh = static_cast<int>(dil[0]);
    p_.dw = static_cast<int>(dil[1]);
    p_.groups = static_cast<int>(cx.node.attrs.i("groups"));
    if (b_ >= 0) {
      bias_dims_ = collapse_dims({p_.n, p_.o, p_.oh * p_.ow},
                                 {p_.o * p_.oh * p_.ow, p_.oh * p_.ow, 1}, {0, 1, 0});
    }
    try {
      use_cudnn_ = setup_cudnn(cx);
    } catch (const OutOfMemory&) {
      throw;
    } catch (const Error&) {
      use_cudnn_ = false;  // cuDNN rejects this configuration: the direct kernel serves it
    }
  }

  std::size_t scratch_bytes() const override { return use_cudnn_ ? workspace_ : 0; }

  void launch(const LaunchContext& cx) override {
    const void* x = cx.at(x_);
    const void* w = cx.at(w_);
    void* y = cx.at(y_);
    if (!use_cudnn_) {
      launch_direct_conv(dt_, x, w, b_ >= 0 ? cx.at(b_) : nullptr, y, p_, cx.stream);
      return;
    }
    cudnnHandle_t h = cx.ctx.cudnn();
    DEVPIPE_CUDNN_CHECK(cudnnSetStream(h, cx.stream), where);
    const float alpha = 1.f, beta = 0.f;
    DEVPIPE_CUDNN_CHECK(cudnnConvolutionForward(
                            h, &alpha, x_desc_.get(), x, w_desc_.get(), w, conv_desc_.get(), algo_,
                            workspace_ ? cx.scratch : nullptr, workspace_, &beta, y_desc_.get(), y),
                        where);
    if (b_ >= 0) launch_binary(BinOp::Add, dt_, y, cx.at(b_), y, bias_dims_, cx.stream);
  }

 private:
  static int to_int(std::int64_t v, const std::string& where) {
    if (v > 0x7fffffff)
      throw Unsupported("cuda backend: " + where + ": a dimension exceeds cuDNN's int range");
    return static_cast<int>(v);
  }

  bool setup_cudnn(const BuildContext& cx) {
    const std::string& where = cx.where;
    cudnnHandle_t h = cx.ctx.cudnn();
    const cudnnDataType_t type = cudnn_data_type(dt_);
    DEVPIPE_CUDNN_CHECK(cudnnCreateTensorDescriptor(x_desc_.out()), where);
    DEVPIPE_CUDNN_CHECK(cudnnCreateTensorDescriptor(y_desc_.out()), where);
    DEVPIPE_CUDNN_CHECK(cudnnCreateFilterDescriptor(w_desc_.out()), where);
    DEVPIPE_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(conv_desc_.out()), where);
    DEVPIPE_CUDNN_CHECK(
        cudnnSetTensor4dDescriptor(x_desc_.get(), CUDNN_TENSOR_NCHW, type, to_int(p_.n, where),
                                   to_int(p_.c, where), to_int(p_.h, where), to_int(p_.w, where)),
        where);
    DEVPIPE_CUDNN_CHECK(
        cudnnSetTensor4dDescriptor(y_desc_.get(), CUDNN_TENSOR_NCHW, type, to_int(p_.n, where),
                                   to_int(p_.o, where), to_int(p_.oh, where), to_int(p_.ow, where)),
        where);
    DEVPIPE_CUDNN_CHECK(
        cudnnSetFilter4dDescriptor(w_desc_.get(), type, CUDNN_TENSOR_NCHW, to_int(p_.o, where),
                                   to_int(p_.c / p_.groups, where), p_.kh, p_.kw),
        where);
    DEVPIPE_CUDNN_CHECK(
        cudnnSetConvolution2dDescriptor(conv_desc_.get(), p_.ph, p_.pw, p_.sh, p_.sw, p_.dh, p_.dw,
                                        CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT),
        where);
    DEVPIPE_CUDNN_CHECK(cudnnSetConvolutionGroupCount(conv_desc_.get(), p_.groups), where);
    const bool fma_only = dt_ == DType::Float32 && !allow_tf32();
    DEVPIPE_CUDNN_CHECK(cudnnSetConvolutionMathType(conv_desc_.get(),
                                                    fma_only ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH),
                        where);
    int n = 0, c = 0, oh = 0, ow = 0;
    DEVPIPE_CUDNN_CHECK(cudnnGetConvolution2dForwardOutputDim(conv_desc_.get(), x_desc_.get(),
                                                              w_desc_.get(), &n, &c, &oh, &ow),
                        where);
    if (n != p_.n || c != p_.o || oh != p_.oh || ow != p_.ow) {
      throw Error("cuda backend: " + where + ": cuDNN computes an output of [" + std::to_string(n) +
                  ", " + std::to_string(c) + ", " + std::to_string(oh) + ", " + std::to_string(ow) +
                  "]");
    }
    cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    int returned = 0;
    DEVPIPE_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(
                            h, x_desc_.get(), w_desc_.get(), conv_desc_.get(), y_desc_.get(),
                            CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &returned, perf),
                        where);
    for (int i = 0; i < returned; ++i) {
      const auto& r = perf[i];
      if (r.status != CUDNN_STATUS_SUCCESS) continue;
      if (fma_only && r.mathType != CUDNN_FMA_MATH) continue;
      if (cudnnSetConvolutionMathType(conv_desc_.get(), r.mathType) != CUDNN_STATUS_SUCCESS)
        continue;
      std::size_t ws = 0;
      if (cudnnGetConvolutionForwardWorkspaceSize(h, x_desc_.get(), w_desc_.get(), conv_desc_.get(),
                                                  y_desc_.get(), r.algo,
                                                  &ws) != CUDNN_STATUS_SUCCESS ||
          ws > kMaxConvWorkspace) {
        continue;
      }
      algo_ = r.algo;
      workspace_ = ws;
      return true;
    }
    return false;
  }

  DType dt_;
  int x_, w_, b_, y_;
  ConvParams p_;
  StridedDims bias_dims_;
  bool use_cudnn_ = false;
  CudnnTensorDesc x_desc_, y_desc_;
  CudnnFilterDesc w_desc_;
  CudnnConvDesc conv_desc_;
  cudnnConvolutionFwdAlgo_t algo_ = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
  std::size_t workspace_ = 0;
};

}  // namespace

std::unique_ptr<Step> make_conv2d_step(const BuildContext& cx) {
  if (!is_floating(cx.out().dtype)) {
    throw Unsupported("cuda backend: " + cx.where + ": no " +
                      std::string(dtype_name(cx.out().dtype)) + " kernel");
  }
  return std::make_unique<ConvStep>(cx);
}

}  // namespace devpipe::cuda
