// devpipe — functional ops on traced values, named and behaving as in torch.nn.functional.
// Each records one node (or none for a no-op view) in the current trace; a shape or dtype
// mismatch throws ShapeError/DTypeError naming the module path and the shapes.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "devpipe/trace.h"

namespace devpipe::F {

Var linear(Var x, Var weight, std::optional<Var> bias = std::nullopt);
Var matmul(Var a, Var b);
Var conv2d(Var x, Var weight, std::optional<Var> bias, std::vector<std::int64_t> stride = {1, 1},
           std::vector<std::int64_t> padding = {0, 0}, std::vector<std::int64_t> dilation = {1, 1},
           std::int64_t groups = 1);
Var adaptive_avg_pool2d(Var x, std::vector<std::int64_t> output_size);
Var max_pool2d(Var x, std::vector<std::int64_t> kernel_size, std::vector<std::int64_t> stride,
               std::vector<std::int64_t> padding = {0, 0},
               std::vector<std::int64_t> dilation = {1, 1});
/// `vocab_per_rank` > 0: the weight holds rows [rank*vocab_per_rank, ...) of a sharded table;
/// indices outside give zero rows (summed across ranks afterwards).
Var embedding(Var indices, Var weight, std::int64_t vocab_per_rank = 0);
Var layer_norm(Var x, std::vector<std::int64_t> normalized_shape, std::optional<Var> weight,
               std::optional<Var> bias, double eps = 1e-5);
Var rms_norm(Var x, std::vector<std::int64_t> normalized_shape, std::optional<Var> weight,
             double eps = 1e-6);

/// View with a new shape; one dim may be -1.
Var reshape(Var x, std::vector<std::int64_t> shape);
/// torch.flatten(x, start_dim, end_dim).
Var flatten(Var x, int start_dim = 0, int end_dim = -1);
Var permute(Var x, std::vector<std::int64_t> dims);
Var transpose(Var x, int dim0, int dim1);
/// torch.cat.
Var concat(const std::vector<Var>& xs, int dim = 0);
inline Var cat(const std::vector<Var>& xs, int dim = 0) { return concat(xs, dim); }
/// x[..., start:end:step, ...] along `dim`, with Python clamping of start/end.
Var slice(Var x, int dim, std::int64_t start, std::int64_t end, std::int64_t step = 1);

/// The state `name` of the current trace (Tracer::state): a buffer on each rank's device that
/// lives across forward() calls and is shared by name between the stages of an application.
Var state(const std::string& name, const Shape& shape, DType dtype);
/// Writes rows of `state` in place and returns the updated state: for row i of `values` and
/// t < values.dim(dim), state[i, ..., positions[i, t], ...] = values[i, ..., t, ...]; a
/// position outside [0, state.dim(dim)) (e.g. -1 for padding) writes nothing. `values` has the
/// state's shape except dim 0 (<= the state's rows: rows 0.. are written) and `dim`;
/// `positions` is int64 [values.dim(0), values.dim(dim)]. `state` must be a state (or an
/// update of one) not updated since; later readers must use the returned Var.
Var state_write(Var state, Var values, Var positions, int dim);
/// The KV-cache form: cache [B, H, S, D], values [b, H, T, D], positions [b, T].
inline Var cache_write(Var cache, Var values, Var positions) { return state_write(cache, values, positions, 2); }
/// One token id per row of `logits` [B, V] (int64 [B]): params float32 [B, 3] holds each row's
/// temperature, top_k and top_p; u float32 [B] a uniform number in [0, 1) per row (the seeded
/// randomness, drawn by the caller). temperature <= 0 is greedy (the first maximum); see the
/// op's definition (src/graph/op_def.h, sample_row) for the exact rule.
Var sample(Var logits, Var params, Var u);

Var add(Var a, Var b);
Var mul(Var a, Var b);
/// Broadcasting a - b (int64: exact, wrapping) and a / b (floating only: true division).
Var sub(Var a, Var b);
Var div(Var a, Var b);
/// Floating-point x only.
Var exp(Var x);
Var tanh(Var x);
Var sigmoid(Var x);
/// -x (int64: exact).
Var neg(Var x);
/// x + s and x * s with a scalar constant (an attribute of the node, not a tensor); an int64 x
/// takes only integral s. `x - s` is add(x, -s), `x / s` is mul(x, 1 / s).
Var add(Var a, double s);
Var mul(Var a, double s);
/// A constant tensor of `shape` filled with `value` (integral for int64); no inputs.
Var full(std::vector<std::int64_t> shape, double value, DType dtype);
/// The constant [n] tensor 0, 1, ..., n-1.
Var arange(std::int64_t n, DType dtype = DType::Int64);
/// Sum / mean over `dims` (negative dims count from the end; empty: every dim), floating x.
Var sum(Var x, std::vector<std::int64_t> dims, bool keepdim = false);
Var mean(Var x, std::vector<std::int64_t> dims, bool keepdim = false);
/// Index of the first maximum along `dim` (a NaN counts as the maximum), int64.
Var argmax(Var x, int dim, bool keepdim = false);
/// torch.index_select: rows `index` (1-D int64, each in [0, x.size(dim))) of x along dim.
Var index_select(Var x, int dim, Var index);
/// torch.gather: out[..., i, ...] = x[..., index[..., i, ...], ...] along dim; index int64 of
/// x's rank, out has index's shape.
Var gather(Var x, int dim, Var index);
/// cond ? a : b elementwise, all three broadcast; cond is int64 (nonzero = true), a and b share
/// a dtype. devpipe has no bool dtype: masks are int64.
Var where(Var cond, Var a, Var b);
/// x with `value` where mask (int64, nonzero = fill; broadcast to x) is set.
Var masked_fill(Var x, Var mask, double value);
/// torch's F.scaled_dot_product_attention: q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]
/// -> [B, Hq, T, Dv]; Hq a multiple of Hkv is grouped-query attention (kv head h / (Hq / Hkv)
/// serves query head h). attn_mask, broadcast to [B, Hq, T, S]: int64 (nonzero = attend) or of
/// q's dtype (added to the scores). is_causal (no attn_mask then): query i sees keys j <= i.
/// scale defaults to 1/sqrt(D). A query that sees no key gives zeros (PyTorch gives NaN).
Var scaled_dot_product_attention(Var q, Var k, Var v, std::optional<Var> attn_mask = std::nullopt,
                                 bool is_causal = false, std::optional<double> scale = std::nullopt);
/// Attention over a KV cache: q [B, Hq, T, D], k/v [B, Hkv, S, D] (S: the cache length),
/// q_positions [B, T] int64 (each query's absolute position), kv_lengths [B] int64 (in [0, S]):
/// query (b, i) sees key j iff j <= q_positions[b, i] and j < kv_lengths[b]; one that sees no
/// key (padding, e.g. position -1) gives zeros. GQA as scaled_dot_product_attention. The cpu
/// kernel never materialises a [T, S] score matrix and reads keys only below kv_lengths[b].
Var masked_attention(Var q, Var k, Var v, Var q_positions, Var kv_lengths,
                     std::optional<double> scale = std::nullopt);
/// The same over the first C keys of the cache only, with a Hugging Face-style key_mask
/// [B, C] int64 (1 <= C <= S; nonzero = attend): query (b, i) sees key j iff j < C,
/// key_mask[b, j] != 0, j <= q_positions[b, i] and j < kv_lengths[b]. The k/v rows at j >= C
/// are never read, so a stage compiled per C (a token-generation cache bucket) attends over a
/// prefix of a [B, H, S, D] cache in place, without slicing it.
Var masked_attention(Var q, Var k, Var v, Var q_positions, Var kv_lengths, Var key_mask,
                     std::optional<double> scale = std::nullopt);
/// Rotary position embedding, Hugging Face's rotate-half convention: x [B, H, T, D] (D even),
/// positions [B, T] int64; inv_freq[i] = float32(theta^(-2i/D)), angle = float32(pos) * inv_freq
/// (float32), out = x * cos(cat(angle, angle)) + rotate_half(x) * sin(...), computed in float32
/// and rounded to x's dtype.
Var rotary_embedding(Var x, Var positions, double theta);
Var softmax(Var x, int dim);
/// approximate: "none" (exact, erf) or "tanh".
Var gelu(Var x, const std::string& approximate = "none");
Var silu(Var x);
Var relu(Var x);

/// Sum over the tensor-parallel ranks (identity at tp_degree 1).
Var all_reduce(Var x);
/// Concatenation of every rank's x along `dim` (identity at tp_degree 1).
Var all_gather(Var x, int dim);

}  // namespace devpipe::F

namespace devpipe {
inline Var operator+(Var a, Var b) { return F::add(a, b); }
inline Var operator*(Var a, Var b) { return F::mul(a, b); }
inline Var operator-(Var a, Var b) { return F::sub(a, b); }
inline Var operator/(Var a, Var b) { return F::div(a, b); }
inline Var operator-(Var a) { return F::neg(a); }
inline Var operator+(Var a, double s) { return F::add(a, s); }
inline Var operator+(double s, Var a) { return F::add(a, s); }
inline Var operator-(Var a, double s) { return F::add(a, -s); }
inline Var operator-(double s, Var a) { return F::add(F::neg(a), s); }
inline Var operator*(Var a, double s) { return F::mul(a, s); }
inline Var operator*(double s, Var a) { return F::mul(a, s); }
inline Var operator/(Var a, double s) { return F::mul(a, 1.0 / s); }
}  // namespace devpipe
