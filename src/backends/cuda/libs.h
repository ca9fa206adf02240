// Internal (cuda backend): error checks and RAII handles for cuBLASLt, cuDNN and NCCL.
#pragma once

#include <cublasLt.h>
#include <cudnn.h>
#include <nccl.h>

#include <string>

#include "backends/cuda/cuda_util.h"
#include "devpipe/dtype.h"

namespace devpipe::cuda {

[[noreturn]] void throw_cublas_error(cublasStatus_t st, const char* call, const std::string& where);
[[noreturn]] void throw_cudnn_error(cudnnStatus_t st, const char* call, const std::string& where);
[[noreturn]] void throw_nccl_error(ncclResult_t st, const char* call, const std::string& where);

inline void check_cublas(cublasStatus_t st, const char* call, const std::string& where = {}) {
  if (st != CUBLAS_STATUS_SUCCESS) throw_cublas_error(st, call, where);
}
inline void check_cudnn(cudnnStatus_t st, const char* call, const std::string& where = {}) {
  if (st != CUDNN_STATUS_SUCCESS) throw_cudnn_error(st, call, where);
}
inline void check_nccl(ncclResult_t st, const char* call, const std::string& where = {}) {
  if (st != ncclSuccess) throw_nccl_error(st, call, where);
}

#define DEVPIPE_CUBLAS_CHECK(call, where) ::devpipe::cuda::check_cublas((call), #call, (where))
#define DEVPIPE_CUDNN_CHECK(call, where) ::devpipe::cuda::check_cudnn((call), #call, (where))
#define DEVPIPE_NCCL_CHECK(call, where) ::devpipe::cuda::check_nccl((call), #call, (where))

using LtHandle = Handle<cublasLtHandle_t, cublasLtDestroy>;
using LtMatmulDesc = Handle<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using LtLayout = Handle<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using LtPreference = Handle<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

using CudnnHandle = Handle<cudnnHandle_t, cudnnDestroy>;
using CudnnTensorDesc = Handle<cudnnTensorDescriptor_t, cudnnDestroyTensorDescriptor>;
using CudnnFilterDesc = Handle<cudnnFilterDescriptor_t, cudnnDestroyFilterDescriptor>;
using CudnnConvDesc = Handle<cudnnConvolutionDescriptor_t, cudnnDestroyConvolutionDescriptor>;

using NcclComm = Handle<ncclComm_t, ncclCommDestroy>;

/// CUDA data type of a floating dtype (throws Unsupported otherwise).
cudaDataType_t cuda_data_type(DType dt);
cudnnDataType_t cudnn_data_type(DType dt);
ncclDataType_t nccl_data_type(DType dt);

/// True when DEVPIPE_ALLOW_TF32=1: float32 matmuls and convolutions may use TF32 tensor cores.
bool allow_tf32();

}  // namespace devpipe::cuda
