// Internal (cuda backend): launchers of the backend's own CUDA kernels (kernels_*.cu).
//
// Shared by nvcc (the .cu files) and the host compiler (the .cpp files that build the steps):
// plain C++17, CUDA types only from cuda_runtime_api.h. Every launcher enqueues on `stream`,
// never synchronises, never allocates, and throws devpipe::Error (through check_launch) when
// the launch itself fails. Floating kernels accept float32, bfloat16 and float16 and
// accumulate in float; data-movement kernels work on raw elements of 1, 2, 4 or 8 bytes.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "backends/cuda/strided_dims.h"
#include "devpipe/dtype.h"

namespace devpipe::cuda {

inline constexpr int kMaxLocalRanks = 8;

/// Fused activation of linear (and the standalone activations).
enum class Act : int { None = 0, Relu = 1, Gelu = 2, GeluTanh = 3, Silu = 4 };

/// Throws devpipe::Error naming `kernel` when the last launch failed (cudaGetLastError).
void check_launch(const char* kernel);

enum class BinOp : int { Add = 0, Mul = 1, Sub = 2, Div = 3 };

/// y[i] = a[a_off(i)] (+|*|-|/) b[b_off(i)] over dims.size (contiguous y); offsets from
/// dims.stride0 (a) and dims.stride1 (b). Int64 is exact (wrapping) arithmetic (no Div). `y`
/// may be `a` when a is not broadcast.
void launch_binary(BinOp op, DType dt, const void* a, const void* b, void* y,
                   const StridedDims& dims, cudaStream_t stream);

/// y[r, c] = act(x[r, c] + bias[c]) for a [rows, cols] tensor; bias may be null; y may be x.
void launch_bias_act(DType dt, const void* x, const void* bias, void* y, std::int64_t rows,
                     std::int64_t cols, Act act, cudaStream_t stream);

/// Softmax along the middle dim of x viewed as [outer, n, inner].
void launch_softmax(DType dt, const void* x, void* y, std::int64_t outer, std::int64_t n,
                    std::int64_t inner, cudaStream_t stream);

/// LayerNorm (rms = false; w, b optional) or RmsNorm (rms = true; w optional) over the last
/// `d` elements of each of `rows` rows.
void launch_norm(DType dt, bool rms, const void* x, const void* w, const void* b, void* y,
                 std::int64_t rows, std::int64_t d, float eps, cudaStream_t stream);

struct PoolParams {
  std::int64_t planes = 0, h = 0, w = 0, oh = 0, ow = 0;
  int kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
};
/// PyTorch's adaptive average pooling windows (only planes/h/w/oh/ow are used).
void launch_adaptive_avg_pool(DType dt, const void* x, void* y, const PoolParams& p,
                              cudaStream_t stream);
/// Max pooling; padding counts as -inf; NaN wins.
void launch_max_pool(DType dt, const void* x, void* y, const PoolParams& p, cudaStream_t stream);

/// Written by kernels that find bad input (an embedding index out of range); lives in device
/// memory and is read back by the host after a synchronising copy. code 0: no error.
struct DeviceErrorRecord {
  int code = 0;
  int tag = 0;          // which node (the backend's registry of node descriptions)
  long long value = 0;  // the offending index
  long long position = 0;
  long long limit = 0;  // the vocabulary size
};

/// out[i, :] = table[idx[i] - first, :]; rows outside [0, rows) give zeros, and when
/// `report` is set the first such index is recorded in *err (tagged `tag`).
void launch_embedding(std::size_t elem_bytes, const std::int64_t* idx, const void* table, void* y,
                      std::int64_t count, std::int64_t rows, std::int64_t dim, std::int64_t first,
                      bool report, DeviceErrorRecord* err, int tag, cudaStream_t stream);

/// y (contiguous, dims.size) [i] = x[sum_d idx_d * dims.stride0[d]] (permute, strided slice).
void launch_strided_copy(std::size_t elem_bytes, const void* x, void* y, const StridedDims& dims,
                         cudaStream_t stream);

// ---- ops of decoder LLMs (kernels_llm.cu) ----

enum class UnaryOp : int { Exp = 0, Tanh = 1, Sigmoid = 2, Affine = 3 };
/// y[i] = op(x[i]) for i < n (Affine: x * a + b). Floating dtypes compute in float; int64 takes
/// only Affine, in wrapping integer arithmetic with a and b truncated to integers.
void launch_unary(UnaryOp op, DType dt, const void* x, void* y, std::int64_t n, double a,
                  double b, cudaStream_t stream);
/// y[i] = the element whose raw little-endian bits are `bits` (elem_bytes of them), i < n.
void launch_fill(std::size_t elem_bytes, unsigned long long bits, void* y, std::int64_t n,
                 cudaStream_t stream);
/// y[i] = i in dtype dt, i < n.
void launch_arange(DType dt, void* y, std::int64_t n, cudaStream_t stream);

/// An iteration space with three operand strides (cond, a, b), like StridedDims.
struct SelectDims {
  int ndim = 0;
  std::int64_t size[kMaxDims] = {};
  std::int64_t sc[kMaxDims] = {}, sa[kMaxDims] = {}, sb[kMaxDims] = {};
};
/// y[i] = cond != 0 ? a : b elementwise over d (contiguous y); a null: the element `fill_bits`
/// instead (masked_fill: cond is the mask, b the input).
void launch_select(std::size_t elem_bytes, const std::int64_t* cond, const void* a,
                   unsigned long long fill_bits, const void* b, void* y, const SelectDims& d,
                   cudaStream_t stream);

/// Error codes of DeviceErrorRecord beyond 1 (an embedding index).
inline constexpr int kErrIndexOutOfRange = 2;  // index_select/gather: limit = the dim's size
inline constexpr int kErrKvLength = 3;         // masked_attention: limit = the cache length

/// y[o, j, i] = x[o, idx[j], i] (x [outer, n, inner], y [outer, m, inner]); an index outside
/// [0, n) gives zeros and is recorded in *err (code kErrIndexOutOfRange, tagged `tag`).
void launch_index_select(std::size_t elem_bytes, const void* x, const std::int64_t* idx, void* y,
                         std::int64_t outer, std::int64_t n, std::int64_t inner, std::int64_t m,
                         DeviceErrorRecord* err, int tag, cudaStream_t stream);
/// torch.gather: y (index's shape d.size, contiguous) [i] = x[coords of i with dim replaced by
/// idx[i]]; d.stride0 holds x's strides. Bad indices as launch_index_select.
void launch_gather(std::size_t elem_bytes, const void* x, const std::int64_t* idx, void* y,
                   const StridedDims& d, int dim, std::int64_t limit, DeviceErrorRecord* err,
                   int tag, cudaStream_t stream);
/// y[o, i] = index of the first maximum of x[o, :, i] (x [outer, n, inner]); NaN wins.
void launch_argmax(DType dt, const void* x, std::int64_t* y, std::int64_t outer, std::int64_t n,
                   std::int64_t inner, cudaStream_t stream);
/// y[o] = scale * sum over the reduced space of x: `kept` spans the outputs (size, stride0 =
/// x's strides of the kept dims), `reduced` the reduced dims likewise.
void launch_reduce(DType dt, const void* x, void* y, const StridedDims& kept,
                   const StridedDims& reduced, float scale, cudaStream_t stream);

inline constexpr int kMaxRopeHalf = 256;
struct RopeParams {
  std::int64_t rows = 0;  // B * H * T
  std::int64_t h = 0, t = 0, half = 0;
  float inv_freq[kMaxRopeHalf] = {};
};
/// Hugging Face rotate-half rotary embedding of x [B, H, T, 2 * half] at positions [B, T].
void launch_rotary(DType dt, const void* x, const std::int64_t* pos, void* y, const RopeParams& p,
                   cudaStream_t stream);

/// 0 none, 1 causal, 2 int64 mask (nonzero: attend), 3 additive mask, 4 q_positions/kv_lengths
/// (with `mask` non-null: masked_attention's key mask [B, c], only keys j < c it sets).
struct AttnParams {
  std::int64_t b = 0, hq = 0, hkv = 0, t = 0, s = 0, d = 0, dv = 0, group = 1;
  std::int64_t c = 0;  // kind 4: keys visible at most (the key mask's C, else s)
  int kind = 0;
  std::int64_t mst[4] = {};  // mask strides over [B, Hq, T, S]
  float scale = 1.f;
};
inline constexpr int kMaxAttnHeadDim = 256;
/// Attention with an online softmax, one block per query row (see the cpu kernel for the
/// semantics); kv_lengths outside [0, S] are clamped and recorded (code kErrKvLength).
void launch_attention(DType dt, const void* q, const void* k, const void* v, void* y,
                      const void* mask, const std::int64_t* pos, const std::int64_t* len,
                      const AttnParams& p, DeviceErrorRecord* err, int tag, cudaStream_t stream);

/// Buffers of the ranks sharing one reduction.
struct RankBuffers {
  int count = 0;
  void* ptr[kMaxLocalRanks] = {};
};
/// For i in [begin, end): s = sum over ranks (in rank order, in float) of buf[r][i]; every
/// buf[r][i] = s.
void launch_rank_reduce(DType dt, const RankBuffers& bufs, std::int64_t begin, std::int64_t end,
                        cudaStream_t stream);

struct ConvParams {
  std::int64_t n = 0, c = 0, h = 0, w = 0, o = 0, oh = 0, ow = 0;
  int kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, groups = 1;
};
/// Direct convolution (the fallback when cuDNN has no algorithm); bias may be null.
void launch_direct_conv(DType dt, const void* x, const void* w, const void* bias, void* y,
                        const ConvParams& p, cudaStream_t stream);

/// C[b][m][n] = sum_k A(b, m, k) * B(b, k, n), C contiguous [batch, M, N]; A(b, m, k) at
/// a[b * a_batch + m * a_m + k * a_k], likewise B. The fallback when cuBLASLt has no algorithm.
struct GemmParams {
  std::int64_t batch = 1, m = 0, n = 0, k = 0;
  std::int64_t a_batch = 0, a_m = 0, a_k = 0;
  std::int64_t b_batch = 0, b_k = 0, b_n = 0;
};
void launch_naive_gemm(DType dt, const void* a, const void* b, void* c, const GemmParams& p,
                       cudaStream_t stream);

}  // namespace devpipe::cuda
