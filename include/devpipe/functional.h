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
}  // namespace devpipe
