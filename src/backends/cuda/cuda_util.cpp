#include "backends/cuda/cuda_util.h"

#include <atomic>
#include <cstdlib>

#include "backends/cuda/kernels.h"
#include "backends/cuda/libs.h"
#include "devpipe/error.h"

namespace devpipe::cuda {

namespace {
std::atomic<std::uint64_t> g_mallocs{0};
std::atomic<std::uint64_t> g_host_syncs{0};
}  // namespace

void throw_cuda_error(cudaError_t err, const char* call, const std::string& where) {
  std::string msg = std::string("cuda backend: ") + call + " failed: " + cudaGetErrorString(err) +
                    " (" + cudaGetErrorName(err) + ")";
  if (!where.empty()) msg += " in " + where;
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // not sticky: clear it so later calls are unaffected
    throw OutOfMemory(msg);
  }
  throw Error(msg);
}

void check_launch(const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda_error(err, "kernel launch", kernel);
}

void note_cuda_malloc() { g_mallocs.fetch_add(1, std::memory_order_relaxed); }
void note_host_sync() { g_host_syncs.fetch_add(1, std::memory_order_relaxed); }
std::uint64_t malloc_count() { return g_mallocs.load(std::memory_order_relaxed); }
std::uint64_t host_sync_count() { return g_host_syncs.load(std::memory_order_relaxed); }

void sync_stream(cudaStream_t s, const char* why) {
  note_host_sync();
  cudaError_t err = cudaStreamSynchronize(s);
  if (err != cudaSuccess) throw_cuda_error(err, "cudaStreamSynchronize", why);
}

DeviceGuard::DeviceGuard(int device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) {
    (void)cudaGetLastError();
    previous_ = -1;
  }
  if (previous_ != device) {
    if (cudaSetDevice(device) == cudaSuccess) {
      changed_ = previous_ >= 0;
    } else {
      (void)cudaGetLastError();  // the next checked call reports the failure
    }
  }
}

DeviceGuard::~DeviceGuard() {
  if (changed_) (void)cudaSetDevice(previous_);
}

Stream Stream::create(int device) {
  DeviceGuard guard(device);
  Stream s;
  DEVPIPE_CUDA_CHECK(cudaStreamCreateWithFlags(s.h_.out(), cudaStreamNonBlocking));
  s.device_ = device;
  return s;
}

Event Event::create(int device) {
  DeviceGuard guard(device);
  Event e;
  DEVPIPE_CUDA_CHECK(cudaEventCreateWithFlags(e.h_.out(), cudaEventDisableTiming));
  return e;
}

PinnedBuffer PinnedBuffer::allocate(std::size_t bytes) {
  PinnedBuffer b;
  void* p = nullptr;
  DEVPIPE_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocPortable));
  *b.h_.out() = p;
  b.bytes_ = bytes;
  return b;
}

int device_count(std::string* reason) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    if (reason) *reason = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    return 0;
  }
  if (n == 0 && reason) *reason = "cudaGetDeviceCount returned 0 devices";
  return n;
}

// ---- libraries ----

void throw_cublas_error(cublasStatus_t st, const char* call, const std::string& where) {
  std::string msg = std::string("cuda backend: ") + call +
                    " failed: " + cublasLtGetStatusString(st) + " (" + cublasLtGetStatusName(st) +
                    ")";
  if (!where.empty()) msg += " in " + where;
  if (st == CUBLAS_STATUS_ALLOC_FAILED) throw OutOfMemory(msg);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) throw Unsupported(msg);
  throw Error(msg);
}

void throw_cudnn_error(cudnnStatus_t st, const char* call, const std::string& where) {
  std::string msg = std::string("cuda backend: ") + call + " failed: " + cudnnGetErrorString(st);
  if (!where.empty()) msg += " in " + where;
  if (st == CUDNN_STATUS_ALLOC_FAILED) throw OutOfMemory(msg);
  if (st == CUDNN_STATUS_NOT_SUPPORTED) throw Unsupported(msg);
  throw Error(msg);
}

void throw_nccl_error(ncclResult_t st, const char* call, const std::string& where) {
  std::string msg = std::string("cuda backend: ") + call + " failed: " + ncclGetErrorString(st);
  if (!where.empty()) msg += " in " + where;
  throw Error(msg);
}

cudaDataType_t cuda_data_type(DType dt) {
  switch (dt) {
    case DType::Float32:
      return CUDA_R_32F;
    case DType::BFloat16:
      return CUDA_R_16BF;
    case DType::Float16:
      return CUDA_R_16F;
    default:
      break;
  }
  throw Unsupported("cuda backend: no CUDA data type for " + std::string(dtype_name(dt)));
}

cudnnDataType_t cudnn_data_type(DType dt) {
  switch (dt) {
    case DType::Float32:
      return CUDNN_DATA_FLOAT;
    case DType::BFloat16:
      return CUDNN_DATA_BFLOAT16;
    case DType::Float16:
      return CUDNN_DATA_HALF;
    default:
      break;
  }
  throw Unsupported("cuda backend: no cuDNN data type for " + std::string(dtype_name(dt)));
}

ncclDataType_t nccl_data_type(DType dt) {
  switch (dt) {
    case DType::Float32:
      return ncclFloat32;
    case DType::BFloat16:
      return ncclBfloat16;
    case DType::Float16:
      return ncclFloat16;
    default:
      break;
  }
  throw Unsupported("cuda backend: no NCCL data type for " + std::string(dtype_name(dt)));
}

bool allow_tf32() {
  static const bool allow = [] {
    const char* v = std::getenv("DEVPIPE_ALLOW_TF32");
    return v != nullptr && std::string(v) == "1";
  }();
  return allow;
}

}  // namespace devpipe::cuda
