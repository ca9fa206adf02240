// The backend conformance suite (after IREE's HAL CTS and ggml's test-backend-ops): every op
// case below runs on a backend through run_graph_once (or per rank, for sharded cases) and is
// compared with run_reference, within the tolerance of the one table below (per op, per dtype,
// each with its reason). A backend instantiates the whole suite with
//
//   DEVPIPE_BACKEND_CONFORMANCE(CpuConformance, cpu_target);
//
// where `cpu_target()` returns a `const BackendUnderTest&`: the backend, why its device is
// unavailable (every case then skips with that reason) and its explicit skip list — each entry
// {op or case name, dtype, reason}; a skipped case still appears as its own skipped gtest with
// the reason printed, never silently dropped, and an entry that matches no case fails.
// One gtest per (case, dtype), named <op>_<shape...>_<dtype>.
//
// Also shared by the backend test files: the tracing helpers (trace, param, vi), seeded random
// inputs and parameters, running a graph for one rank on any backend, and a graph touching
// every kernel family (mixed_graph).
//
// Header-only. Tests are defined only by the macro: use it once per backend and test binary.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <iostream>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "compiler/fuse.h"
#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/trace.h"
#include "graph/reference.h"
#include "runtime/backend.h"
#include "runtime/run_graph.h"
#include "test_util.h"

namespace devpipe::testing {

// ---- tracing and random data ----

using TraceInputs = std::vector<std::pair<std::string, ValueInfo>>;
using TraceBody = std::function<std::vector<Var>(const std::vector<Var>&)>;

inline Graph trace(DType dtype, const TraceInputs& inputs, const TraceBody& body,
                   int tp_degree = 1) {
  TraceOptions opt;
  opt.dtype = dtype;
  opt.tp_degree = tp_degree;
  return trace_function(opt, inputs, body);
}

/// A replicated parameter of the current trace.
inline Var param(const std::string& key, const Shape& shape) {
  return Tracer::current().parameter(key, shape, -1);
}

inline ValueInfo vi(Shape s, DType dt) { return {std::move(s), dt}; }

/// N(0, 1) values for every (floating) graph input, seeds seed, seed + 1, ...
inline std::vector<Tensor> random_inputs(const Graph& g, std::uint64_t seed = 1) {
  std::vector<Tensor> out;
  for (const auto& in : g.inputs) {
    const ValueInfo& info = g.value(in.value);
    out.push_back(Tensor::randn(info.shape, seed++, info.dtype));
  }
  return out;
}

/// Parameters: matrices and kernels uniform in +-1/sqrt(fan_in) like PyTorch's default init (so
/// that float32 sums stay O(1) instead of cancelling from O(sqrt(fan_in))), vectors N(0, 1).
inline std::vector<Tensor> random_params(const Graph& g, std::uint64_t seed = 1000) {
  std::vector<Tensor> out;
  for (const auto& p : g.params) {
    const ValueInfo& info = g.value(p.value);
    if (info.shape.rank() >= 2) {
      double bound = 1.0 / std::sqrt(static_cast<double>(info.shape.numel() / info.shape[0]));
      out.push_back(Tensor::uniform(info.shape, -bound, bound, seed++, info.dtype));
    } else {
      out.push_back(Tensor::randn(info.shape, seed++, info.dtype));
    }
  }
  return out;
}

/// Compiles `g` for `rank` on `be`, runs it once on host `inputs` (copied to the rank's device)
/// and returns host copies of the outputs. run_graph_once for any rank.
inline std::vector<Tensor> run_on_rank(Backend& be, const Graph& g,
                                       const std::vector<Tensor>& inputs,
                                       const std::vector<Tensor>& params, const RankInfo& rank) {
  const Device dev = be.device_for_rank(rank.rank, rank.tp_degree);
  auto exe = be.compile(g, params, rank);
  std::vector<Tensor> dev_in;
  std::vector<const void*> in;
  for (const auto& t : inputs) {
    dev_in.push_back(be.allocate(t.shape(), t.dtype(), dev));
    be.copy(dev_in.back().raw_data(), dev, t.raw_data(), t.device(), t.nbytes());
    in.push_back(dev_in.back().raw_data());
  }
  std::vector<Tensor> dev_out;
  std::vector<void*> out;
  for (int id : g.outputs) {
    dev_out.push_back(be.allocate(g.value(id).shape, g.value(id).dtype, dev));
    out.push_back(dev_out.back().raw_data());
  }
  exe->run(in, out);
  std::vector<Tensor> host;
  for (const auto& t : dev_out) {
    host.push_back(Tensor::empty(t.shape(), t.dtype()));
    be.copy(host.back().raw_data(), Device::cpu(), t.raw_data(), dev, t.nbytes());
  }
  return host;
}

/// A graph touching every kernel family (conv, pools, embedding, norms, GEMMs, softmax,
/// concat/slice, elementwise): inputs x [2, 4, 8, 8] and idx [2, 3] int64 (< 10); outputs
/// [2, 3, 5] and [2, 72].
inline Graph mixed_graph(DType dt = DType::Float32) {
  return trace(
      dt, {{"x", vi({2, 4, 8, 8}, dt)}, {"idx", vi({2, 3}, DType::Int64)}},
      [](const std::vector<Var>& v) {
        Var h = F::conv2d(v[0], param("c.w", {8, 4, 3, 3}), param("c.b", {8}), {1, 1}, {1, 1});
        h = F::max_pool2d(F::gelu(h), {2, 2}, {2, 2});
        Var p = F::adaptive_avg_pool2d(h, {3, 3});
        h = F::adaptive_avg_pool2d(h, {2, 2});
        h = F::flatten(h, 1);                                // [2, 32]
        Var e = F::embedding(v[1], param("emb", {10, 32}));  // [2, 3, 32]
        Var t = F::reshape(h, {2, 1, 32}) + e;
        t = F::layer_norm(t, {32}, param("ln.w", {32}), param("ln.b", {32}));
        t = F::rms_norm(F::silu(t), {32}, param("rms.w", {32}));
        Var a = F::linear(t, param("fc.w", {16, 32}), param("fc.b", {16}));
        Var att = F::softmax(F::matmul(a, F::transpose(a, 1, 2)), 2);  // [2, 3, 3]
        Var c = F::concat({att, F::slice(att, 2, 0, 3, 2)}, 2);
        return std::vector<Var>{F::relu(c) * c, F::flatten(p, 1)};
      });
}

// ---- tolerances: one table, per op and dtype, each row with its reason ----

struct Tol {
  double rtol = 0, atol = 0;
};

struct ToleranceRow {
  std::string_view op;
  std::optional<Tol> f32, bf16, f16, i64;  // nullopt: the op is not tested in that dtype
  std::string_view reason;
};

/// |got - want| <= atol + rtol * |want| elementwise, want from run_reference.
inline const std::vector<ToleranceRow>& tolerance_table() {
  constexpr Tol kExact{0, 0};
  // float32: a sum of K products rounded in another order than the reference's (which sums in
  // double) differs by a few ulps (2^-24 = 6e-8) times the sum's condition; 1e-4 leaves room
  // for K up to 3000 here. No TF32 (the cuda backend uses it only with DEVPIPE_ALLOW_TF32=1).
  constexpr Tol kF32{1e-4, 1e-5};
  // bfloat16 keeps 8 significant bits (one ulp = 2^-8 = 3.9e-3 relative): the result is
  // rounded once to bfloat16 after float32 accumulation, a reordered sum can land one ulp away.
  constexpr Tol kBF16{2e-2, 2e-2};
  // float16 keeps 11 bits (one ulp = 2^-11 = 4.9e-4 relative), same reasoning as bfloat16.
  constexpr Tol kF16{1e-2, 1e-2};
  // clang-format off
  static const std::vector<ToleranceRow> table{
      // op                   float32 bfloat16 float16 int64
      {"linear",              kF32,   kBF16,   kF16,   {},
       "GEMM libraries (oneDNN, cuBLASLt) block the K sum in their own order; a fused "
       "activation runs on the float32 accumulator"},
      {"matmul",              kF32,   kBF16,   kF16,   {},
       "batched GEMMs (oneDNN, cuBLASLt): the summation order differs"},
      {"conv2d",              kF32,   kBF16,   kF16,   {},
       "oneDNN/cuDNN pick the algorithm (direct, implicit GEMM): sums of up to 288 terms in "
       "another order"},
      {"conv2d_global_avg_pool", kF32, kBF16,  kF16,   {},
       "the conv's sums of up to 80 products, then the mean over up to 690 positions, in another "
       "order (float32 accumulators within a row, double across rows; the reference sums in "
       "double)"},
      {"conv_patch_mean",     kF32,   kBF16,   kF16,   {},
       "window sums over up to 690 positions in double in another order (row sums, then the "
       "rows), divided once"},
      {"adaptive_avg_pool2d", kF32,   kBF16,   kF16,   {},
       "window sum in float32, then a divide (the reference sums in double)"},
      {"layer_norm",          kF32,   kBF16,   kF16,   {},
       "mean and variance by vectorised/parallel reductions over up to 1500 elements; rsqrt"},
      {"rms_norm",            kF32,   kBF16,   kF16,   {},
       "mean of squares by parallel reductions over up to 2048 elements; rsqrt"},
      {"softmax",             kF32,   kBF16,   kF16,   {},
       "exp of the vector/device math library and a parallel sum over up to 3000 elements"},
      {"gelu",                kF32,   kBF16,   kF16,   {},
       "erf/tanh of oneDNN's eltwise or of the device math library: a few float32 ulps from "
       "glibc's double ones"},
      {"silu",                kF32,   kBF16,   kF16,   {},
       "exp of oneDNN's eltwise or of the device math library"},
      {"chain",               kF32,   kBF16,   kF16,   {},
       "short graphs of several ops with O(1) values: each op's rounding feeds the next, kept "
       "within the per-op bound"},
      {"relu",                kExact, kExact,  kExact, {},
       "max(x, 0) selects an input value"},
      {"add_mul",             kExact, kExact,  kExact, {},
       "one operation per element, correctly rounded to float32 (the reference's double + or * "
       "of two float32 values rounds to the same float32), then the same rounding to the dtype"},
      {"max_pool2d",          kExact, kExact,  kExact, {},
       "selects an input element"},
      {"embedding",           kExact, kExact,  kExact, {},
       "copies table rows (rows held by another rank come out zero)"},
      {"permute",             kExact, kExact,  kExact, {}, "moves elements bit for bit"},
      {"concat",              kExact, kExact,  kExact, {}, "moves elements bit for bit"},
      {"slice",               kExact, kExact,  kExact, {}, "moves elements bit for bit"},
      {"int64",               {},     {},      {},     kExact,
       "integer data movement and (wrapping) arithmetic are exact"},
      {"sub_div",             kExact, kExact,  kExact, {},
       "one IEEE operation per element (division included), rounded to float32 like the "
       "reference's double result, then the same rounding to the dtype"},
      {"unary_math",          kF32,   kBF16,   kF16,   {},
       "exp/tanh/sigmoid of oneDNN's eltwise or the device math library: a few float32 ulps "
       "from glibc's double ones"},
      {"scalar",              kF32,   kBF16,   kF16,   {},
       "x * a + b with the scalar rounded to float32 by the kernels (the reference keeps the "
       "double), fused or not"},
      {"constant",            kExact, kExact,  kExact, kExact,
       "full/arange store values exactly representable in the dtype"},
      {"reduce",              kF32,   kBF16,   kF16,   {},
       "sum/mean by vectorised/parallel float32 reductions over up to 6000 elements (the "
       "reference sums in double)"},
      {"argmax",              kExact, kExact,  kExact, {},
       "an index: both sides compare the same widened values and keep the first maximum"},
      {"select",              kExact, kExact,  kExact, kExact,
       "index_select/gather/where/masked_fill copy input elements (or the fill value rounded "
       "once to the dtype)"},
      {"rotary_embedding",    kF32,   kBF16,   kF16,   {},
       "cos/sin of the same float32 angle in float32 (kernel) vs double (reference), then two "
       "products and a sum in float32"},
      {"state_write",         kExact, kExact,  kExact, {},
       "copies rows of values into the state: both sides move the same elements"},
      {"sample",              kExact, kExact,  kExact, {},
       "a token id: both sides make the same float32 choice (sample_row) on the same logits"},
      {"attention",           kF32,   kBF16,   kF16,   {},
       "float32 dot products over D <= 64 and an online softmax over key blocks (rescaled "
       "partial sums, float32 exp) against the reference's double two-pass softmax"},
  };
  // clang-format on
  return table;
}

/// The tolerance of `op` in `dtype`; nullopt when the table has no entry (a test error).
inline std::optional<Tol> tolerance_for(std::string_view op, DType dtype) {
  for (const auto& row : tolerance_table()) {
    if (row.op != op) continue;
    switch (dtype) {
      case DType::Float32:
        return row.f32;
      case DType::BFloat16:
        return row.bf16;
      case DType::Float16:
        return row.f16;
      case DType::Int64:
        return row.i64;
    }
  }
  return std::nullopt;
}

// ---- the op cases ----

/// One op configuration, run in each of `dtypes`.
struct OpCase {
  std::string name;           // unique; [a-z0-9_]; the gtest name is name + "_" + dtype
  std::string op;             // the tolerance_table() row and what a skip entry may name
  std::vector<DType> dtypes;  // the dtypes it runs in
  std::function<Graph(DType)> build;
  /// Host inputs for the graph; empty: random_inputs(g, 1).
  std::function<std::vector<Tensor>(const Graph&)> inputs;
  /// > 1: rank r of `ranks` is compiled and run (no communicator: no collectives) and compared
  /// with run_reference(..., RefContext{r, ranks}); 1: run_graph_once.
  int ranks = 1;
};

/// Dims joined by 'x' ("3x5x7"; a negative value as "m5"), for case names.
inline std::string dims_tag(const std::vector<std::int64_t>& dims) {
  std::string s;
  for (std::size_t i = 0; i < dims.size(); ++i) {
    if (i) s += 'x';
    s += dims[i] < 0 ? "m" + std::to_string(-dims[i]) : std::to_string(dims[i]);
  }
  return s;
}
inline std::string dims_tag(const Shape& s) { return dims_tag(s.dims()); }

inline const std::vector<DType>& floating_dtypes() {
  static const std::vector<DType> all{DType::Float32, DType::BFloat16, DType::Float16};
  return all;
}

/// Every op case of the suite, built once (no tracing until a case runs).
inline const std::vector<OpCase>& conformance_cases() {
  static const std::vector<OpCase> cases = [] {
    using I64s = std::vector<std::int64_t>;
    std::vector<OpCase> c;
    // A floating case of `op` on graph inputs traced from `inputs_of(dt)`.
    auto add = [&c](std::string name, std::string op, std::function<TraceInputs(DType)> inputs_of,
                    TraceBody body) {
      c.push_back({std::move(name), std::move(op), floating_dtypes(),
                   [inputs_of, body](DType dt) { return trace(dt, inputs_of(dt), body); }});
    };
    auto one = [](Shape x) { return [x](DType dt) { return TraceInputs{{"x", vi(x, dt)}}; }; };
    auto two = [](Shape a, Shape b) {
      return [a, b](DType dt) { return TraceInputs{{"a", vi(a, dt)}, {"b", vi(b, dt)}}; };
    };

    // ---- Linear / Matmul ----
    for (std::int64_t out : {4, 24}) {
      for (Shape x : {Shape{3, 5, 7}, Shape{1, 7}, Shape{7}, Shape{2, 1, 3, 7}, Shape{33, 64}}) {
        if (out == 4 && x.dim(-1) == 64) continue;
        for (bool bias : {true, false}) {
          add("linear_x" + dims_tag(x) + "_out" + std::to_string(out) + (bias ? "_bias" : ""),
              "linear", one(x), [x, out, bias](const std::vector<Var>& v) {
                std::optional<Var> b;
                if (bias) b = param("b", {out});
                return std::vector<Var>{F::linear(v[0], param("w", {out, x.dim(-1)}), b)};
              });
        }
      }
    }
    // Skinny float32 shapes the cpu backend runs with its own kernels (kernels_skinny):
    // K <= 16 with many output channels, and N <= 8 with a long K; row counts that leave a
    // tail after the row blocks, channel counts that leave one after the register blocks.
    for (const auto& [x, out, bias] : std::vector<std::tuple<Shape, std::int64_t, bool>>{
             {{3, 367, 8}, 80, true},   // expand, 1101 rows
             {{1025, 5}, 64, false},    // expand, K 5
             {{1031, 100}, 5, true},    // reduce, K tail 100 % 16
             {{2, 515, 64}, 8, false}}) {
      add("linear_skinny_x" + dims_tag(x) + "_out" + std::to_string(out) + (bias ? "_bias" : ""),
          "linear", one(x), [x = x, out = out, bias = bias](const std::vector<Var>& v) {
            std::optional<Var> b;
            if (bias) b = param("b", {out});
            return std::vector<Var>{F::linear(v[0], param("w", {out, x.dim(-1)}), b)};
          });
    }
    // Token-generation shapes (at most 16 rows; the cpu backend's kernels_small_rows): K and N
    // tails after the vector and column blocks, rows over more than one row group.
    for (const auto& [x, out, bias] : std::vector<std::tuple<Shape, std::int64_t, bool>>{
             {{1, 1, 300}, 131, false}, {{8, 1, 203}, 77, true}, {{13, 37}, 29, true}}) {
      add("linear_rows_x" + dims_tag(x) + "_out" + std::to_string(out) + (bias ? "_bias" : ""),
          "linear", one(x), [x = x, out = out, bias = bias](const std::vector<Var>& v) {
            std::optional<Var> b;
            if (bias) b = param("b", {out});
            return std::vector<Var>{F::linear(v[0], param("w", {out, x.dim(-1)}), b)};
          });
    }
    // Linear with a fused activation (what the fusion pass produces).
    struct FusedCase {
      Shape x;
      std::int64_t out;
      bool bias;
    };
    for (const FusedCase& f : {FusedCase{{3, 2, 9}, 5, true}, FusedCase{{3, 2, 16}, 8, true},
                               FusedCase{{3, 2, 16}, 8, false}}) {
      for (std::string act : {"relu", "gelu", "gelu_tanh", "silu"}) {
        c.push_back(
            {"linear_" + act + "_x" + dims_tag(f.x) + "_out" + std::to_string(f.out) +
                 (f.bias ? "_bias" : ""),
             "linear", floating_dtypes(), [f, act](DType dt) {
               Graph g = trace(dt, {{"x", vi(f.x, dt)}}, [&](const std::vector<Var>& v) {
                 std::optional<Var> b;
                 if (f.bias) b = param("b", {f.out});
                 return std::vector<Var>{F::linear(v[0], param("w", {f.out, f.x.dim(-1)}), b)};
               });
               g.nodes.back().attrs.set("activation", act);
               return g;
             }});
      }
    }
    for (const auto& [a, b] : std::vector<std::pair<Shape, Shape>>{{{3, 4}, {4, 5}},
                                                                   {{7, 3, 4}, {4, 6}},
                                                                   {{1, 2, 8}, {3, 8, 1}},
                                                                   {{2, 1, 3, 4}, {5, 4, 2}},
                                                                   {{2, 3, 5, 4}, {2, 3, 4, 3}},
                                                                   {{4, 1}, {1, 6}},
                                                                   {{3, 4}, {2, 4, 5}},
                                                                   {{2, 16, 32}, {2, 32, 8}}}) {
      add("matmul_" + dims_tag(a) + "_at_" + dims_tag(b), "matmul", two(a, b),
          [](const std::vector<Var>& v) { return std::vector<Var>{F::matmul(v[0], v[1])}; });
    }

    // ---- Conv2d ----
    struct ConvCase {
      Shape x;
      std::int64_t out;
      I64s kernel, stride, padding, dilation;
      std::int64_t groups;
      bool bias;
    };
    for (const ConvCase& k : std::vector<ConvCase>{
             {{1, 3, 9, 9}, 8, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, true},
             {{3, 4, 7, 10}, 6, {3, 2}, {2, 1}, {1, 0}, {2, 1}, 2, true},
             {{7, 6, 5, 5}, 6, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 6, false},  // depthwise
             {{2, 16, 6, 4}, 32, {1, 1}, {1, 1}, {0, 0}, {1, 1}, 1, true},
             {{1, 5, 11, 8}, 3, {5, 3}, {3, 2}, {2, 1}, {1, 2}, 1, false},
             {{3, 32, 14, 14}, 64, {3, 3}, {2, 2}, {1, 1}, {1, 1}, 1, true}}) {
      add("conv2d_x" + dims_tag(k.x) + "_out" + std::to_string(k.out) + "_k" + dims_tag(k.kernel) +
              "_s" + dims_tag(k.stride) + "_p" + dims_tag(k.padding) + "_d" + dims_tag(k.dilation) +
              "_g" + std::to_string(k.groups) + (k.bias ? "_bias" : ""),
          "conv2d", one(k.x), [k](const std::vector<Var>& v) {
            Var w = param("w", {k.out, k.x[1] / k.groups, k.kernel[0], k.kernel[1]});
            std::optional<Var> b;
            if (k.bias) b = param("b", {k.out});
            return std::vector<Var>{
                F::conv2d(v[0], w, b, k.stride, k.padding, k.dilation, k.groups)};
          });
    }
    // Weights that are graph inputs, not parameters (converted to the kernel's layout per run).
    add(
        "conv2d_weights_as_inputs_x3x4x6x5_w6x2x3x3_g2", "conv2d",
        [](DType dt) {
          return TraceInputs{
              {"x", vi({3, 4, 6, 5}, dt)}, {"w", vi({6, 2, 3, 3}, dt)}, {"b", vi({6}, dt)}};
        },
        [](const std::vector<Var>& v) {
          return std::vector<Var>{F::conv2d(v[0], v[1], v[2], {1, 2}, {1, 1}, {1, 1}, 2)};
        });

    // Conv2d + global average pool, fused by the compiler's pass into conv2d_global_avg_pool:
    // output widths that leave a tail after the 6-pixel blocks, output channels that are not a
    // multiple of the vector width, groups, strides, dilation and padding as wide as the kernel.
    for (const ConvCase& k : std::vector<ConvCase>{
             {{2, 3, 20, 23}, 64, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, true},
             {{1, 4, 9, 11}, 20, {3, 3}, {2, 2}, {1, 1}, {2, 2}, 2, false},
             {{3, 5, 7, 10}, 10, {3, 3}, {2, 2}, {1, 1}, {1, 1}, 5, true},
             {{2, 16, 6, 4}, 80, {1, 1}, {1, 1}, {0, 0}, {1, 1}, 1, true},
             {{1, 3, 13, 10}, 5, {5, 5}, {2, 2}, {2, 2}, {1, 1}, 1, true},
             {{2, 4, 5, 30}, 33, {3, 2}, {1, 3}, {0, 2}, {1, 2}, 1, false}}) {
      c.push_back(
          {"conv2d_global_avg_pool_x" + dims_tag(k.x) + "_out" + std::to_string(k.out) + "_k" +
               dims_tag(k.kernel) + "_s" + dims_tag(k.stride) + "_p" + dims_tag(k.padding) +
               "_d" + dims_tag(k.dilation) + "_g" + std::to_string(k.groups) +
               (k.bias ? "_bias" : ""),
           "conv2d_global_avg_pool", floating_dtypes(), [k](DType dt) {
             Graph g = trace(dt, {{"x", vi(k.x, dt)}}, [&](const std::vector<Var>& v) {
               Var w = param("w", {k.out, k.x[1] / k.groups, k.kernel[0], k.kernel[1]});
               std::optional<Var> b;
               if (k.bias) b = param("b", {k.out});
               return std::vector<Var>{F::adaptive_avg_pool2d(
                   F::conv2d(v[0], w, b, k.stride, k.padding, k.dilation, k.groups), {1, 1})};
             });
             if (fuse_conv_global_avg_pool(g) != 1) {
               throw Error("conformance: conv2d + adaptive_avg_pool2d((1, 1)) was not fused");
             }
             return g;
           }});
    }

    // The patch means folding makes of a conv + global average pool (conv_patch_mean): unit
    // and other strides (the row-sum paths), padding wider than the kernel's reach, dilation.
    for (const ConvCase& k : std::vector<ConvCase>{
             {{2, 3, 20, 23}, 0, {3, 3}, {1, 1}, {1, 1}, {1, 1}, 1, false},
             {{1, 4, 9, 11}, 0, {3, 3}, {2, 2}, {1, 1}, {2, 2}, 1, false},
             {{3, 5, 7, 10}, 0, {3, 2}, {1, 3}, {2, 0}, {1, 2}, 1, false},
             {{2, 2, 6, 4}, 0, {1, 1}, {1, 1}, {0, 0}, {1, 1}, 1, false},
             {{1, 3, 13, 10}, 0, {5, 5}, {2, 2}, {4, 3}, {1, 1}, 1, false}}) {
      add("conv_patch_mean_x" + dims_tag(k.x) + "_k" + dims_tag(k.kernel) + "_s" + dims_tag(k.stride) + "_p" +
              dims_tag(k.padding) + "_d" + dims_tag(k.dilation),
          "conv_patch_mean", one(k.x), [k](const std::vector<Var>& v) {
            Attrs a;
            a.set("kernel_size", k.kernel).set("stride", k.stride).set("padding", k.padding).set("dilation", k.dilation);
            return std::vector<Var>{Tracer::current().emit(OpKind::ConvPatchMean, {v[0]}, a)};
          });
    }

    // ---- pooling ----
    for (const auto& [x, os] : std::vector<std::pair<Shape, I64s>>{{{3, 4, 8, 8}, {2, 2}},
                                                                   {{1, 3, 7, 10}, {3, 4}},
                                                                   {{2, 5, 6, 6}, {1, 1}},
                                                                   {{7, 2, 5, 3}, {5, 3}},
                                                                   {{1, 1, 4, 9}, {3, 2}}}) {
      add("adaptive_avg_pool2d_x" + dims_tag(x) + "_to" + dims_tag(os), "adaptive_avg_pool2d",
          one(x), [os = os](const std::vector<Var>& v) {
            return std::vector<Var>{F::adaptive_avg_pool2d(v[0], os)};
          });
    }
    struct MaxPoolCase {
      Shape x;
      I64s k, s, p, d;
    };
    for (const MaxPoolCase& m :
         std::vector<MaxPoolCase>{{{3, 4, 9, 9}, {3, 3}, {2, 2}, {1, 1}, {1, 1}},
                                  {{1, 3, 8, 7}, {2, 2}, {2, 2}, {0, 0}, {1, 1}},
                                  {{2, 3, 10, 10}, {3, 3}, {1, 1}, {1, 1}, {2, 2}},
                                  {{7, 2, 6, 9}, {3, 2}, {1, 3}, {1, 0}, {1, 3}}}) {
      add("max_pool2d_x" + dims_tag(m.x) + "_k" + dims_tag(m.k) + "_s" + dims_tag(m.s) + "_p" +
              dims_tag(m.p) + "_d" + dims_tag(m.d),
          "max_pool2d", one(m.x), [m](const std::vector<Var>& v) {
            return std::vector<Var>{F::max_pool2d(v[0], m.k, m.s, m.p, m.d)};
          });
    }

    // ---- embedding ----
    c.push_back({"embedding_idx3x5_vocab11_dim6", "embedding", floating_dtypes(),
                 [](DType dt) {
                   return trace(dt, {{"idx", vi({3, 5}, DType::Int64)}},
                                [](const std::vector<Var>& v) {
                                  return std::vector<Var>{F::embedding(v[0], param("w", {11, 6}))};
                                });
                 },
                 [](const Graph&) {
                   return std::vector<Tensor>{Tensor::randint({3, 5}, 11, 7)};
                 }});
    // Rank r of 2 holds rows [r*6, r*6+6) of a 12-row table; other rows come out zero.
    c.push_back({"embedding_sharded_2ranks_idx2x7_vocab12_dim4", "embedding", floating_dtypes(),
                 [](DType dt) {
                   return trace(
                       dt, {{"idx", vi({2, 7}, DType::Int64)}}, [](const std::vector<Var>& v) {
                         return std::vector<Var>{F::embedding(v[0], param("w", {6, 4}), 6)};
                       });
                 },
                 [](const Graph&) {
                   return std::vector<Tensor>{Tensor::randint({2, 7}, 12, 3)};
                 },
                 2});

    // ---- norms ----
    struct NormCase {
      Shape x;
      I64s ns;
      int affine;  // 0: none, 1: weight, 2: weight + bias
    };
    for (const NormCase& n : std::vector<NormCase>{{{3, 5, 8}, {8}, 2},
                                                   {{1, 5, 8}, {5, 8}, 2},
                                                   {{7, 33}, {33}, 1},
                                                   {{2, 3, 16}, {16}, 0},
                                                   {{4, 1500}, {1500}, 2}}) {
      static const char* const kAffine[] = {"", "_weight", "_weight_bias"};
      add("layer_norm_x" + dims_tag(n.x) + "_n" + dims_tag(n.ns) + kAffine[n.affine], "layer_norm",
          one(n.x), [n](const std::vector<Var>& v) {
            std::optional<Var> w, b;
            if (n.affine >= 1) w = param("w", Shape(n.ns));
            if (n.affine >= 2) b = param("b", Shape(n.ns));
            return std::vector<Var>{F::layer_norm(v[0], n.ns, w, b, 1e-5)};
          });
    }
    // Scale/shift that are graph inputs (oneDNN wants float32 ones: converted per run).
    add(
        "layer_norm_weights_as_inputs_x4x12", "layer_norm",
        [](DType dt) {
          return TraceInputs{{"x", vi({4, 12}, dt)}, {"w", vi({12}, dt)}, {"b", vi({12}, dt)}};
        },
        [](const std::vector<Var>& v) {
          return std::vector<Var>{F::layer_norm(v[0], {12}, v[1], v[2], 1e-5)};
        });
    for (Shape x : {Shape{3, 7, 16}, Shape{1, 33}, Shape{5, 2, 3}, Shape{2, 2048}}) {
      for (bool weight : {true, false}) {
        add("rms_norm_x" + dims_tag(x) + (weight ? "_weight" : ""), "rms_norm", one(x),
            [x, weight](const std::vector<Var>& v) {
              const I64s ns{x.dim(-1)};
              std::optional<Var> w;
              if (weight) w = param("w", Shape(ns));
              return std::vector<Var>{F::rms_norm(v[0], ns, w, 1e-6)};
            });
      }
    }

    // ---- softmax, activations, elementwise ----
    for (const auto& [x, dim] : std::vector<std::pair<Shape, int>>{
             {{3, 7, 5}, 0}, {{3, 7, 5}, 1}, {{3, 7, 5}, 2}, {{4, 3000}, 1}}) {
      add("softmax_x" + dims_tag(x) + "_dim" + std::to_string(dim), "softmax", one(x),
          [dim = dim](const std::vector<Var>& v) {
            return std::vector<Var>{F::softmax(v[0], dim)};
          });
    }
    const Shape act_x{3, 5, 17};
    add("gelu_x" + dims_tag(act_x), "gelu", one(act_x),
        [](const std::vector<Var>& v) { return std::vector<Var>{F::gelu(v[0])}; });
    add("gelu_tanh_x" + dims_tag(act_x), "gelu", one(act_x),
        [](const std::vector<Var>& v) { return std::vector<Var>{F::gelu(v[0], "tanh")}; });
    add("silu_x" + dims_tag(act_x), "silu", one(act_x),
        [](const std::vector<Var>& v) { return std::vector<Var>{F::silu(v[0])}; });
    add("relu_x" + dims_tag(act_x), "relu", one(act_x),
        [](const std::vector<Var>& v) { return std::vector<Var>{F::relu(v[0])}; });
    for (const auto& [a, b] : std::vector<std::pair<Shape, Shape>>{{{3, 4, 5}, {3, 4, 5}},
                                                                   {{3, 4, 5}, {5}},
                                                                   {{5}, {3, 4, 5}},
                                                                   {{3, 1, 5}, {1, 4, 1}},
                                                                   {{7, 1}, {1}},
                                                                   {{1, 3, 1, 2}, {4, 1}}}) {
      add("add_mul_" + dims_tag(a) + "_and_" + dims_tag(b), "add_mul", two(a, b),
          [](const std::vector<Var>& v) {
            return std::vector<Var>{v[0] + v[1], v[0] * v[1]};
          });
    }

    // ---- data movement ----
    for (const auto& [x, p] :
         std::vector<std::pair<Shape, I64s>>{{{2, 3, 4, 5}, {0, 2, 3, 1}},
                                             {{3, 1, 7}, {2, 0, 1}},
                                             {{6, 5}, {1, 0}},
                                             {{2, 3, 2, 3, 2}, {4, 2, 0, 3, 1}},
                                             {{4, 5}, {0, 1}}}) {
      add("permute_x" + dims_tag(x) + "_to" + dims_tag(p), "permute", one(x),
          [p = p](const std::vector<Var>& v) { return std::vector<Var>{F::permute(v[0], p)}; });
    }
    for (int dim : {0, 1, 2, -1}) {
      // [2, 3, 4] with sizes 4, 1, 5, 4 along `dim` (the first operand twice).
      add(
          "concat_2x3x4_dim" + (dim < 0 ? "m" + std::to_string(-dim) : std::to_string(dim)),
          "concat",
          [dim](DType dt) {
            Shape a{2, 3, 4}, b{2, 3, 4}, cc{2, 3, 4};
            const auto d = static_cast<std::size_t>(dim < 0 ? dim + 3 : dim);
            b[d] = 1;
            cc[d] = 5;
            return TraceInputs{{"a", vi(a, dt)}, {"b", vi(b, dt)}, {"c", vi(cc, dt)}};
          },
          [dim](const std::vector<Var>& v) {
            return std::vector<Var>{F::concat({v[0], v[1], v[2], v[0]}, dim)};
          });
    }
    struct SliceCase {
      Shape x;
      int dim;
      std::int64_t start, end, step;
    };
    for (const SliceCase& s : std::vector<SliceCase>{{{3, 10, 4}, 1, 1, 8, 2},
                                                     {{5, 7}, 1, 2, 7, 1},
                                                     {{9, 2, 3}, 0, 0, 9, 4},
                                                     {{2, 3, 11}, 2, -5, 100, 3},
                                                     {{2, 3, 3}, 2, 0, 3, 2},  // odd strides
                                                     {{4, 6}, 0, 1, 3, 1}}) {
      add("slice_x" + dims_tag(s.x) + "_dim" + std::to_string(s.dim) + "_" +
              dims_tag(I64s{s.start}) + "to" + std::to_string(s.end) + "_step" +
              std::to_string(s.step),
          "slice", one(s.x), [s](const std::vector<Var>& v) {
            return std::vector<Var>{F::slice(v[0], s.dim, s.start, s.end, s.step)};
          });
    }
    // Rank r reads [r*4, r*4+4) of the sliced dimension.
    c.push_back({"slice_rank_stride_2ranks_x3x8",
                 "slice",
                 floating_dtypes(),
                 [](DType dt) {
                   Graph g = trace(dt, {{"x", vi({3, 8}, dt)}}, [](const std::vector<Var>& v) {
                     return std::vector<Var>{F::slice(v[0], 1, 0, 4)};
                   });
                   g.nodes.back().attrs.set("rank_stride", std::int64_t{4});
                   return g;
                 },
                 {},
                 2});

    // ---- int64 data movement and arithmetic ----
    c.push_back({"int64_permute_concat_slice_reshape_add_mul",
                 "int64",
                 {DType::Int64},
                 [](DType dt) {
                   return trace(DType::Float32,
                                {{"a", vi({2, 3, 4}, dt)}, {"b", vi({2, 1, 4}, dt)}},
                                [](const std::vector<Var>& v) {
                                  Var p = F::permute(v[0], {2, 0, 1});
                                  Var cat = F::concat({v[0], v[1]}, 1);
                                  Var s = F::slice(v[0], 2, 1, 4, 2);
                                  Var r = F::reshape(cat, {8, 4});
                                  return std::vector<Var>{p, cat, s, r, v[0] + v[1], v[0] * v[1]};
                                });
                 },
                 [](const Graph&) {
                   return std::vector<Tensor>{Tensor::randint({2, 3, 4}, 1000000007LL * 3, 5),
                                              Tensor::randint({2, 1, 4}, 1000, 6)};
                 }});

    // ---- ops of decoder LLMs ----
    // Inputs: floating ones N(0, 1) in the case's dtype, int64 ones given per case.
    using Inputs = std::function<std::vector<Tensor>(const Graph&)>;
    auto mixed = [](std::vector<std::function<Tensor(DType, std::uint64_t)>> makers) -> Inputs {
      return [makers](const Graph& g) {
        std::vector<Tensor> out;
        for (std::size_t i = 0; i < makers.size(); ++i) {
          out.push_back(makers[i](g.value(g.inputs[i].value).dtype, 11 + i));
        }
        return out;
      };
    };
    auto f_in = [](Shape s) {
      return [s](DType dt, std::uint64_t seed) { return Tensor::randn(s, seed, dt); };
    };
    auto i_in = [](Shape s, std::int64_t high, std::int64_t low = 0) {
      return [s, high, low](DType, std::uint64_t seed) {
        Tensor t = Tensor::randint(s, high - low, seed);
        for (std::int64_t i = 0; i < t.numel(); ++i) t.data<std::int64_t>()[i] += low;
        return t;
      };
    };
    auto fixed_i64 = [](std::vector<std::int64_t> v, Shape s) {
      return [v, s](DType, std::uint64_t) { return Tensor::from_vector_i64(v, s); };
    };
    auto traced = [&c](std::string name, std::string op, std::vector<DType> dtypes,
                       std::function<TraceInputs(DType)> inputs_of, TraceBody body,
                       Inputs inputs) {
      c.push_back({std::move(name), std::move(op), std::move(dtypes),
                   [inputs_of, body](DType dt) { return trace(dt, inputs_of(dt), body); },
                   std::move(inputs)});
    };
    for (const auto& [a, b] : std::vector<std::pair<Shape, Shape>>{
             {{3, 4, 5}, {5}}, {{3, 1, 5}, {1, 4, 1}}, {{5}, {3, 4, 5}}, {{2, 3}, {2, 3}}}) {
      add("sub_div_" + dims_tag(a) + "_and_" + dims_tag(b), "sub_div", two(a, b),
          [](const std::vector<Var>& v) { return std::vector<Var>{v[0] - v[1], v[0] / v[1]}; });
    }
    add("unary_math_exp_tanh_sigmoid_x" + dims_tag(act_x), "unary_math", one(act_x),
        [](const std::vector<Var>& v) {
          return std::vector<Var>{F::exp(v[0]), F::tanh(v[0]), F::sigmoid(v[0])};
        });
    add("scalar_neg_add_mul_sub_div_x" + dims_tag(act_x), "scalar", one(act_x),
        [](const std::vector<Var>& v) {
          return std::vector<Var>{-v[0], v[0] + 0.1, v[0] * -2.5, 1.5 - v[0], v[0] / 3.0};
        });
    c.push_back({"constant_full_2x3_arange_6", "constant",
                 {DType::Float32, DType::BFloat16, DType::Float16, DType::Int64},
                 [](DType dt) {
                   return trace(DType::Float32, {}, [dt](const std::vector<Var>&) {
                     return std::vector<Var>{F::full({2, 3}, dt == DType::Int64 ? -3.0 : -0.75, dt),
                                             F::arange(6, dt)};
                   });
                 }});
    for (const auto& [x, dims, keep] : std::vector<std::tuple<Shape, I64s, bool>>{
             {{3, 7, 16}, {1}, false}, {{3, 7, 16}, {0, 2}, true}, {{4, 1500}, {}, false},
             {{2, 6000}, {1}, true}}) {
      add("reduce_sum_mean_x" + dims_tag(x) + "_dims" + dims_tag(dims) + (keep ? "_keepdim" : ""),
          "reduce", one(x), [dims = dims, keep = keep](const std::vector<Var>& v) {
            return std::vector<Var>{F::sum(v[0], dims, keep), F::mean(v[0], dims, keep)};
          });
    }
    for (const auto& [x, dim] : std::vector<std::pair<Shape, int>>{
             {{3, 7, 10}, 2}, {{3, 7, 10}, 0}, {{4, 3000}, 1}}) {
      add("argmax_x" + dims_tag(x) + "_dim" + std::to_string(dim), "argmax", one(x),
          [dim = dim](const std::vector<Var>& v) {
            return std::vector<Var>{F::argmax(v[0], dim), F::argmax(v[0], dim, true)};
          });
    }
    const std::vector<DType> select_dtypes{DType::Float32, DType::BFloat16, DType::Float16,
                                           DType::Int64};
    auto any_in = [](Shape s) {
      return [s](DType dt, std::uint64_t seed) {
        return dt == DType::Int64 ? Tensor::randint(s, 1000000, seed) : Tensor::randn(s, seed, dt);
      };
    };
    traced("select_index_select_gather_x5x7", "select", select_dtypes,
           [](DType dt) {
             return TraceInputs{{"x", vi({5, 7}, dt)},
                                {"rows", vi({4}, DType::Int64)},
                                {"idx", vi({5, 3}, DType::Int64)}};
           },
           [](const std::vector<Var>& v) {
             return std::vector<Var>{F::index_select(v[0], 0, v[1]),
                                     F::index_select(v[0], 1, v[1]), F::gather(v[0], 1, v[2])};
           },
           mixed({any_in({5, 7}), fixed_i64({4, 0, 0, 2}, {4}), i_in({5, 3}, 7)}));
    traced("select_where_masked_fill_x3x4x5", "select", select_dtypes,
           [](DType dt) {
             return TraceInputs{{"cond", vi({3, 1, 5}, DType::Int64)},
                                {"a", vi({3, 4, 5}, dt)},
                                {"b", vi({4, 1}, dt)}};
           },
           [](const std::vector<Var>& v) {
             return std::vector<Var>{F::where(v[0], v[1], v[2]), F::masked_fill(v[1], v[0], -7)};
           },
           mixed({i_in({3, 1, 5}, 2, -1), any_in({3, 4, 5}), any_in({4, 1})}));
    traced("rotary_embedding_x2x3x5x64_theta1e4", "rotary_embedding", floating_dtypes(),
           [](DType dt) {
             return TraceInputs{{"x", vi({2, 3, 5, 64}, dt)}, {"pos", vi({2, 5}, DType::Int64)}};
           },
           [](const std::vector<Var>& v) {
             return std::vector<Var>{F::rotary_embedding(v[0], v[1], 10000.0)};
           },
           mixed({f_in({2, 3, 5, 64}), i_in({2, 5}, 2048, -1)}));
    struct SdpaCase {
      std::string tag;
      Shape q, kv;
      std::optional<Shape> mask;
      bool int_mask, causal;
    };
    for (const SdpaCase& a : std::vector<SdpaCase>{
             {"causal_gqa", {2, 4, 33, 32}, {2, 2, 33, 32}, std::nullopt, false, true},
             {"nomask", {1, 2, 5, 16}, {1, 2, 40, 16}, std::nullopt, false, false},
             {"int_mask", {2, 4, 7, 16}, {2, 4, 9, 16}, Shape{2, 1, 7, 9}, true, false},
             {"float_mask", {1, 3, 7, 8}, {1, 3, 9, 8}, Shape{7, 9}, false, false}}) {
      std::vector<std::function<Tensor(DType, std::uint64_t)>> makers{f_in(a.q), f_in(a.kv),
                                                                       f_in(a.kv)};
      if (a.mask && a.int_mask) makers.push_back(i_in(*a.mask, 2));
      if (a.mask && !a.int_mask) makers.push_back(f_in(*a.mask));
      traced("attention_sdpa_" + a.tag + "_q" + dims_tag(a.q) + "_kv" + dims_tag(a.kv),
             "attention", floating_dtypes(),
             [a](DType dt) {
               TraceInputs in{{"q", vi(a.q, dt)}, {"k", vi(a.kv, dt)}, {"v", vi(a.kv, dt)}};
               if (a.mask) in.push_back({"mask", vi(*a.mask, a.int_mask ? DType::Int64 : dt)});
               return in;
             },
             [a](const std::vector<Var>& v) {
               std::optional<Var> m;
               if (a.mask) m = v[3];
               return std::vector<Var>{F::scaled_dot_product_attention(v[0], v[1], v[2], m, a.causal)};
             },
             mixed(makers));
    }
    struct MaskedCase {
      std::string tag;
      Shape q, kv;
      std::vector<std::int64_t> pos, len;
    };
    std::vector<std::int64_t> prefill_pos;
    for (std::int64_t b = 0; b < 2; ++b) {
      for (std::int64_t t = 0; t < 40; ++t) prefill_pos.push_back(b == 1 && t >= 23 ? -1 : t);
    }
    for (const MaskedCase& a : std::vector<MaskedCase>{
             {"prefill_padded", {2, 4, 40, 64}, {2, 2, 64, 64}, prefill_pos, {40, 23}},
             {"decode", {3, 6, 1, 32}, {3, 2, 100, 32}, {36, 99, -1}, {37, 100, 0}}}) {
      const Shape pos_shape{a.q[0], a.q[2]}, len_shape{a.q[0]};
      traced("attention_masked_" + a.tag + "_q" + dims_tag(a.q) + "_kv" + dims_tag(a.kv),
             "attention", floating_dtypes(),
             [a, pos_shape, len_shape](DType dt) {
               return TraceInputs{{"q", vi(a.q, dt)},
                                  {"k", vi(a.kv, dt)},
                                  {"v", vi(a.kv, dt)},
                                  {"pos", vi(pos_shape, DType::Int64)},
                                  {"len", vi(len_shape, DType::Int64)}};
             },
             [](const std::vector<Var>& v) {
               return std::vector<Var>{F::masked_attention(v[0], v[1], v[2], v[3], v[4])};
             },
             mixed({f_in(a.q), f_in(a.kv), f_in(a.kv), fixed_i64(a.pos, pos_shape),
                    fixed_i64(a.len, len_shape)}));
    }
    {
      // A decode step over the first C = 48 rows of a 100-row cache (a cache bucket), with a key
      // mask [B, C] that also hides keys inside the sequences (0 at j = 3 and 20 of b = 0).
      const Shape q{3, 6, 1, 32}, kv{3, 2, 100, 32}, pos_shape{3, 1}, len_shape{3}, mask_shape{3, 48};
      const std::vector<std::int64_t> pos{47, 29, -1}, len{48, 30, 0};
      std::vector<std::int64_t> mask(3 * 48, 0);
      for (std::int64_t b = 0; b < 2; ++b) {
        for (std::int64_t j = 0; j < len[static_cast<std::size_t>(b)]; ++j) mask[static_cast<std::size_t>(b * 48 + j)] = 1;
      }
      mask[3] = mask[20] = 0;
      traced("attention_masked_key_mask_q" + dims_tag(q) + "_kv" + dims_tag(kv) + "_c48", "attention",
             floating_dtypes(),
             [=](DType dt) {
               return TraceInputs{{"q", vi(q, dt)},
                                  {"k", vi(kv, dt)},
                                  {"v", vi(kv, dt)},
                                  {"pos", vi(pos_shape, DType::Int64)},
                                  {"len", vi(len_shape, DType::Int64)},
                                  {"key_mask", vi(mask_shape, DType::Int64)}};
             },
             [](const std::vector<Var>& v) {
               return std::vector<Var>{F::masked_attention(v[0], v[1], v[2], v[3], v[4], v[5])};
             },
             mixed({f_in(q), f_in(kv), f_in(kv), fixed_i64(pos, pos_shape), fixed_i64(len, len_shape),
                    fixed_i64(mask, mask_shape)}));
    }

    // ---- state_write (into a state, in place) and sample ----
    // The state is the graph's last input (states follow the data inputs); prefill rows with
    // padding (-1), a decode step into the first rows of a larger cache, a write past the end.
    struct StateCase {
      std::string tag;
      Shape state, values;
      std::vector<std::int64_t> pos;
    };
    for (const StateCase& a : std::vector<StateCase>{
             {"prefill", {3, 2, 8, 4}, {3, 2, 5, 4}, {0, 1, 2, 3, 4, 0, 1, 2, -1, -1, -1, -1, -1, -1, -1}},
             {"decode", {4, 2, 8, 4}, {2, 2, 1, 4}, {5, 8}}}) {
      const Shape pos_shape{a.values[0], a.values[2]};
      c.push_back({"state_write_" + a.tag + "_s" + dims_tag(a.state.dims()) + "_v" + dims_tag(a.values.dims()),
                   "state_write", floating_dtypes(),
                   [a, pos_shape](DType dt) {
                     TraceOptions o;
                     o.dtype = dt;
                     Tracer tr(o);
                     Var v = tr.input("values", a.values, dt);
                     Var p = tr.input("positions", pos_shape, DType::Int64);
                     Var s = tr.state("cache", a.state, dt);
                     return tr.finish({F::cache_write(s, v, p)});
                   },
                   mixed({f_in(a.values), fixed_i64(a.pos, pos_shape), f_in(a.state)})});
    }
    {
      auto fixed_f32 = [](std::vector<float> v, Shape s) {
        return [v, s](DType, std::uint64_t) { return Tensor::from_vector(v, s); };
      };
      traced("sample_greedy_topk_topp_x5x40", "sample", floating_dtypes(),
             [](DType dt) {
               return TraceInputs{{"logits", vi({5, 40}, dt)},
                                  {"params", vi({5, 3}, DType::Float32)},
                                  {"u", vi({5}, DType::Float32)}};
             },
             [](const std::vector<Var>& v) { return std::vector<Var>{F::sample(v[0], v[1], v[2])}; },
             mixed({f_in({5, 40}),
                    fixed_f32({0, 0, 1, 1, 0, 1, 0.7f, 5, 1, 1.3f, 0, 0.6f, 2, 1, 0.5f}, {5, 3}),
                    fixed_f32({0.5f, 0.13f, 0.77f, 0.31f, 0.95f}, {5})}));
    }

    // ---- small graphs of several ops ----
    c.push_back(
        {"chain_linear_gelu_layer_norm_softmax_rms_norm_x3x8",
         "chain",
         {DType::Float16},
         [](DType dt) {
           return trace(dt, {{"x", vi({3, 8}, dt)}}, [](const std::vector<Var>& v) {
             Var h = F::linear(v[0], param("w", {6, 8}), param("b", {6}));
             h = F::layer_norm(F::gelu(h), {6}, param("ln.w", {6}), param("ln.b", {6}));
             return std::vector<Var>{F::softmax(h * h, 1), F::rms_norm(h, {6}, std::nullopt)};
           });
         }});
    c.push_back({"chain_mixed_graph", "chain", {DType::Float32}, mixed_graph, [](const Graph&) {
                   return std::vector<Tensor>{Tensor::randn({2, 4, 8, 8}, 3),
                                              Tensor::randint({2, 3}, 10, 4)};
                 }});
    return c;
  }();
  return cases;
}

// ---- running a case ----

/// Expects `got` (a backend's outputs) to match `want` (run_reference's) within `tol`.
inline void expect_outputs_close(const std::vector<Tensor>& got, const std::vector<Tensor>& want,
                                 Tol tol, const Graph& g) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].dtype(), want[i].dtype()) << "output " << i;
    EXPECT_TRUE(tensors_close(got[i], want[i], tol.rtol, tol.atol)) << "output " << i << " of\n"
                                                                    << g.to_text();
  }
}

/// Runs `g` once on `be` (run_graph_once) and on the reference; compares within `tol`.
inline void expect_matches_reference(Backend& be, const Graph& g, const std::vector<Tensor>& inputs,
                                     const std::vector<Tensor>& params, Tol tol) {
  expect_outputs_close(run_graph_once(be, g, inputs, params), run_reference(g, inputs, params), tol,
                       g);
}

/// Runs case `c` in `dtype` on `be` and compares with the reference.
inline void run_case(Backend& be, const OpCase& c, DType dtype) {
  const std::optional<Tol> tol = tolerance_for(c.op, dtype);
  ASSERT_TRUE(tol.has_value()) << "tolerance_table() has no " << dtype_name(dtype) << " entry for '"
                               << c.op << "'";
  Graph g = c.build(dtype);
  const std::vector<Tensor> inputs = c.inputs ? c.inputs(g) : random_inputs(g, 1);
  const std::vector<Tensor> params = random_params(g, 1001);
  if (c.ranks == 1) {
    expect_matches_reference(be, g, inputs, params, *tol);
    return;
  }
  for (int r = 0; r < c.ranks; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(c.ranks));
    expect_outputs_close(run_on_rank(be, g, inputs, params, RankInfo{r, c.ranks, nullptr, 1}),
                         run_reference(g, inputs, params, RefContext{r, c.ranks}), *tol, g);
  }
}

// ---- the backend under test and its skip list ----

/// A case the backend does not run, and why. `name` is a case name (conformance_cases()) or an
/// op (OpCase::op: all its cases).
struct Skip {
  std::string name;
  DType dtype;
  std::string reason;
};

struct BackendUnderTest {
  std::string name;                          // "cpu", "cuda": printed with skips
  std::function<Backend&()> backend;         // called only when the device is available
  std::function<std::string()> unavailable;  // empty or returning "": the device is usable;
                                             // else why not (every test skips with it)
  std::vector<Skip> skips;
};

inline bool skip_covers(const Skip& s, const OpCase& c, DType dtype) {
  return (s.name == c.name || s.name == c.op) && s.dtype == dtype;
}

/// The skip entry covering (c, dtype), or nullptr.
inline const Skip* find_skip(const BackendUnderTest& t, const OpCase& c, DType dtype) {
  for (const Skip& s : t.skips) {
    if (skip_covers(s, c, dtype)) return &s;
  }
  return nullptr;
}

/// Why `t`'s device cannot run tests, prefixed with the backend's name; "" when it can.
/// Callers skip with it: `if (auto why = unavailable_reason(t); !why.empty()) GTEST_SKIP() << why;`
inline std::string unavailable_reason(const BackendUnderTest& t) {
  const std::string why = t.unavailable ? t.unavailable() : std::string();
  return why.empty() ? why : "[" + t.name + "] " + why;
}

/// One gtest of the suite: case `index` of conformance_cases() in `dtype` on `target`.
struct ConformanceParam {
  const BackendUnderTest* target = nullptr;
  std::size_t index = 0;
  DType dtype = DType::Float32;
  const OpCase& op_case() const { return conformance_cases()[index]; }
};

inline void PrintTo(const ConformanceParam& p, std::ostream* os) {
  *os << p.target->name << " " << p.op_case().name << " " << dtype_name(p.dtype);
}

/// Every (case, dtype) pair, skipped ones included (they skip with their reason).
inline std::vector<ConformanceParam> conformance_params(const BackendUnderTest& target) {
  std::vector<ConformanceParam> out;
  const auto& cases = conformance_cases();
  for (std::size_t i = 0; i < cases.size(); ++i) {
    for (DType dt : cases[i].dtypes) out.push_back({&target, i, dt});
  }
  return out;
}

struct ConformanceParamName {
  std::string operator()(const ::testing::TestParamInfo<ConformanceParam>& info) const {
    return info.param.op_case().name + "_" + std::string(dtype_name(info.param.dtype));
  }
};

/// The fixture DEVPIPE_BACKEND_CONFORMANCE derives its suite from.
class BackendConformanceTest : public ::testing::TestWithParam<ConformanceParam> {
 protected:
  void RunCase() {
    const ConformanceParam& p = GetParam();
    const BackendUnderTest& t = *p.target;
    if (auto why = unavailable_reason(t); !why.empty()) GTEST_SKIP() << why;
    if (const Skip* s = find_skip(t, p.op_case(), p.dtype)) {
      GTEST_SKIP() << "[" << t.name << " skip list] " << p.op_case().name << " "
                   << dtype_name(p.dtype) << ": " << s->reason;
    }
    run_case(t.backend(), p.op_case(), p.dtype);
  }
};

// ---- error behaviour every backend shares ----

/// Out-of-range embedding indices are an InvalidArgument naming the index and the vocabulary
/// (reported at run time or at the next copy); valid indices run clean afterwards.
inline void check_embedding_out_of_range(const BackendUnderTest& t) {
  if (auto why = unavailable_reason(t); !why.empty()) GTEST_SKIP() << why;
  Graph g = trace(DType::Float32, {{"idx", vi({3}, DType::Int64)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::embedding(v[0], param("w", {5, 2}))};
  });
  const auto params = random_params(g);
  try {
    run_graph_once(t.backend(), g, {Tensor::from_vector_i64({0, 5, 1}, {3})}, params);
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("index 5"), std::string::npos) << msg;
    EXPECT_NE(msg.find("vocabulary size 5"), std::string::npos) << msg;
  }
  EXPECT_NO_THROW(
      run_graph_once(t.backend(), g, {Tensor::from_vector_i64({0, 4, 1}, {3})}, params));
}

/// Compiling a collective for 2 ranks without a communicator is a StateError.
inline void check_collective_without_communicator(const BackendUnderTest& t) {
  if (auto why = unavailable_reason(t); !why.empty()) GTEST_SKIP() << why;
  Graph g = trace(
      DType::Float32, {{"x", vi({2, 4}, DType::Float32)}},
      [](const std::vector<Var>& v) { return std::vector<Var>{F::all_reduce(v[0])}; },
      /*tp_degree=*/2);
  EXPECT_THROW(t.backend().compile(g, {}, RankInfo{0, 2, nullptr, 1}), StateError);
}

/// A parameter of the wrong shape, or a missing one, is an InvalidArgument at compile.
inline void check_wrong_parameter(const BackendUnderTest& t) {
  if (auto why = unavailable_reason(t); !why.empty()) GTEST_SKIP() << why;
  Graph g =
      trace(DType::Float32, {{"x", vi({2, 4}, DType::Float32)}}, [](const std::vector<Var>& v) {
        return std::vector<Var>{F::linear(v[0], param("w", {3, 4}))};
      });
  EXPECT_THROW(t.backend().compile(g, {Tensor::zeros({4, 3})}, RankInfo{}), InvalidArgument);
  EXPECT_THROW(t.backend().compile(g, {}, RankInfo{}), InvalidArgument);
}

/// Prints the skip list; fails for an entry that matches no (case, dtype) (a stale skip).
inline void check_skip_list(const BackendUnderTest& t) {
  std::cout << "[" << t.name << "] conformance skip list: " << t.skips.size() << " entries\n";
  for (const Skip& s : t.skips) {
    int matched = 0;
    for (const OpCase& c : conformance_cases()) {
      for (DType dt : c.dtypes) matched += skip_covers(s, c, dt) ? 1 : 0;
    }
    std::cout << "  skip " << s.name << " " << dtype_name(s.dtype) << " (" << matched
              << " gtests): " << s.reason << "\n";
    EXPECT_GT(matched, 0) << "skip entry '" << s.name << "' " << dtype_name(s.dtype)
                          << " matches no conformance case";
    EXPECT_FALSE(s.reason.empty()) << "skip entry '" << s.name << "' has no reason";
  }
}

}  // namespace devpipe::testing

/// Instantiates the conformance suite for the backend `target_fn()` describes (a function
/// returning a `const devpipe::testing::BackendUnderTest&` that lives for the whole run):
/// Conformance/<Suite>.Op/<case>_<dtype> per case and dtype, plus <Suite>Errors.* for the
/// shared error behaviour and the skip list.
#define DEVPIPE_BACKEND_CONFORMANCE(Suite, target_fn)                           \
  class Suite : public ::devpipe::testing::BackendConformanceTest {};           \
  TEST_P(Suite, Op) { RunCase(); }                                              \
  INSTANTIATE_TEST_SUITE_P(                                                     \
      Conformance, Suite,                                                       \
      ::testing::ValuesIn(::devpipe::testing::conformance_params(target_fn())), \
      ::devpipe::testing::ConformanceParamName{});                              \
  TEST(Suite##Errors, EmbeddingOutOfRangeIsInvalidArgument) {                   \
    ::devpipe::testing::check_embedding_out_of_range(target_fn());              \
  }                                                                             \
  TEST(Suite##Errors, CollectiveWithoutCommunicatorIsAStateError) {             \
    ::devpipe::testing::check_collective_without_communicator(target_fn());     \
  }                                                                             \
  TEST(Suite##Errors, WrongParameterIsRejectedAtCompile) {                      \
    ::devpipe::testing::check_wrong_parameter(target_fn());                     \
  }                                                                             \
  TEST(Suite##Errors, SkipListNamesKnownCases) { ::devpipe::testing::check_skip_list(target_fn()); }
