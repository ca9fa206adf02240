// The decoder-LLM ops beyond their PyTorch comparison (test_ops) and conformance
// (test_cpu_backend): manifest round trips with re-inference, errors that name the values,
// the attention kernel's cache bounds (keys past kv_lengths, or past a key mask's C, are never
// read), and
// masked_attention against scaled_dot_product_attention with the equivalent explicit mask.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include <cstdlib>

#include "backend_conformance.h"
#include "backends/cpu/kernel.h"
#include "compiler/artifact.h"
#include "graph/op_def.h"

using namespace devpipe;
using namespace devpipe::testing;

namespace {

Backend& cpu_backend() { return backend_for(DeviceKind::Cpu); }

/// A graph using every new op and attribute kind (optional scale, -inf, dims, dtype names).
Graph every_new_op() {
  return trace(DType::Float32,
               {{"x", vi({2, 4, 6, 6}, DType::Float32)},
                {"pos", vi({2, 6}, DType::Int64)},
                {"len", vi({2}, DType::Int64)},
                {"mask", vi({6, 6}, DType::Int64)}},
               [](const std::vector<Var>& v) {
                 Var x = F::rotary_embedding(v[0], v[1], 500000.0);
                 Var kv = F::slice(x, 1, 0, 2);  // 2 kv heads for 4 query heads
                 Var a = F::masked_attention(x, kv, kv, v[1], v[2], 0.125);
                 Var s = F::scaled_dot_product_attention(x, x, x, std::nullopt, true);
                 Var m = F::scaled_dot_product_attention(x, x, x, v[3]);
                 Var e = F::sigmoid(F::exp(a) / (F::tanh(s) + 2.0)) - (-m) * 0.5;
                 Var f = F::masked_fill(e, v[3], -std::numeric_limits<double>::infinity());
                 Var g = F::where(v[3], f, F::full({1}, 3.0, DType::Float32));
                 Var r = F::sum(g, {-1}) + F::mean(g, {3});                     // [2, 4, 6]
                 Var top = F::index_select(F::argmax(r, -1), 0, F::arange(1));  // [1, 4]
                 Var idx = F::reshape(top, {1, 4, 1}) * F::full({2, 4, 2}, 1.0, DType::Int64);
                 return std::vector<Var>{F::gather(r, 2, idx), F::sub(F::arange(4), F::neg(F::arange(4)))};
               });
}

}  // namespace

TEST(LlmOps, EveryNewOpRoundTripsThroughTheManifestJsonAndReinfers) {
  const Graph g = every_new_op();
  const Graph back = graph_from_json(graph_to_json(g));
  EXPECT_EQ(back.to_text(), g.to_text());
  ASSERT_EQ(back.nodes.size(), g.nodes.size());
  std::set<OpKind> seen;
  for (std::size_t i = 0; i < back.nodes.size(); ++i) {
    const Node& n = back.nodes[i];
    seen.insert(n.op);
    EXPECT_EQ(n.attrs, g.nodes[i].attrs) << op_name(n.op);
    std::vector<ValueInfo> ins;
    for (int id : n.inputs) ins.push_back(back.value(id));
    const auto outs = infer_op(n.op, ins, n.attrs);
    ASSERT_EQ(outs.size(), 1u);
    EXPECT_EQ(outs[0], back.value(n.outputs[0])) << op_name(n.op);
  }
  for (OpKind op : {OpKind::Sub, OpKind::Div, OpKind::Exp, OpKind::Tanh, OpKind::Sigmoid,
                    OpKind::Neg, OpKind::AddScalar, OpKind::MulScalar, OpKind::Full,
                    OpKind::Arange, OpKind::Sum, OpKind::Mean, OpKind::ArgMax,
                    OpKind::IndexSelect, OpKind::Gather, OpKind::Where, OpKind::MaskedFill,
                    OpKind::RotaryEmbedding, OpKind::ScaledDotProductAttention,
                    OpKind::MaskedAttention}) {
    EXPECT_TRUE(seen.count(op)) << op_name(op) << " is not in the round-trip graph";
  }
  // -inf survives JSON (which has no infinities).
  bool found_inf = false;
  for (const Node& n : back.nodes) {
    if (n.op == OpKind::MaskedFill) found_inf = std::isinf(n.attrs.f("value")) && n.attrs.f("value") < 0;
  }
  EXPECT_TRUE(found_inf);
  // And the cpu backend runs the whole graph like the reference.
  std::vector<Tensor> in{Tensor::randn({2, 4, 6, 6}, 1),
                         Tensor::from_vector_i64({0, 1, 2, 3, 4, 5, 0, 1, 2, 3, -1, -1}, {2, 6}),
                         Tensor::from_vector_i64({6, 4}, {2}), Tensor::randint({6, 6}, 2, 3)};
  for (std::int64_t i = 0; i < 6; ++i) in[3].data<std::int64_t>()[i * 6] = 1;
  expect_matches_reference(cpu_backend(), g, in, {}, {1e-4, 1e-5});
}

TEST(LlmOps, ShapeAndDtypeErrorsNameTheValues) {
  auto heads = message_of<ShapeError>([] {
    trace(DType::Float32, {{"q", vi({1, 6, 3, 8}, DType::Float32)}, {"k", vi({1, 4, 3, 8}, DType::Float32)}},
          [](const std::vector<Var>& v) {
            return std::vector<Var>{F::scaled_dot_product_attention(v[0], v[1], v[1])};
          });
  });
  EXPECT_HAS(heads, "6 query heads");
  EXPECT_HAS(heads, "4 key/value heads");
  auto both = message_of<InvalidArgument>([] {
    trace(DType::Float32, {{"q", vi({1, 2, 3, 8}, DType::Float32)}, {"m", vi({3, 3}, DType::Int64)}},
          [](const std::vector<Var>& v) {
            return std::vector<Var>{F::scaled_dot_product_attention(v[0], v[0], v[0], v[1], true)};
          });
  });
  EXPECT_HAS(both, "not both");
  auto mask = message_of<ShapeError>([] {
    trace(DType::Float32, {{"q", vi({1, 2, 3, 8}, DType::Float32)}, {"m", vi({3, 4}, DType::Int64)}},
          [](const std::vector<Var>& v) {
            return std::vector<Var>{F::scaled_dot_product_attention(v[0], v[0], v[0], v[1])};
          });
  });
  EXPECT_HAS(mask, "attn_mask [3, 4]");
  EXPECT_HAS(mask, "[1, 2, 3, 3]");
  auto pos = message_of<ShapeError>([] {
    trace(DType::Float32,
          {{"q", vi({2, 2, 3, 8}, DType::Float32)}, {"p", vi({2, 4}, DType::Int64)}, {"l", vi({2}, DType::Int64)}},
          [](const std::vector<Var>& v) {
            return std::vector<Var>{F::masked_attention(v[0], v[0], v[0], v[1], v[2])};
          });
  });
  EXPECT_HAS(pos, "q_positions [2, 4] must be [B, T] = [2, 3]");
  auto odd = message_of<ShapeError>([] {
    trace(DType::Float32, {{"x", vi({1, 1, 2, 7}, DType::Float32)}, {"p", vi({1, 2}, DType::Int64)}},
          [](const std::vector<Var>& v) { return std::vector<Var>{F::rotary_embedding(v[0], v[1], 1e4)}; });
  });
  EXPECT_HAS(odd, "D even, got [1, 1, 2, 7]");
  auto cond = message_of<DTypeError>([] {
    trace(DType::Float32, {{"x", vi({3}, DType::Float32)}},
          [](const std::vector<Var>& v) { return std::vector<Var>{F::where(v[0], v[0], v[0])}; });
  });
  EXPECT_HAS(cond, "condition must be int64");
  auto frac = message_of<DTypeError>([] {
    trace(DType::Float32, {{"i", vi({3}, DType::Int64)}},
          [](const std::vector<Var>& v) { return std::vector<Var>{v[0] * 0.5}; });
  });
  EXPECT_HAS(frac, "integral value");
}

TEST(LlmOps, RunTimeIndexErrorsNameTheIndexOnReferenceAndCpu) {
  Graph g = trace(DType::Float32, {{"x", vi({4, 3}, DType::Float32)}, {"i", vi({2}, DType::Int64)}},
                  [](const std::vector<Var>& v) { return std::vector<Var>{F::index_select(v[0], 0, v[1])}; });
  const std::vector<Tensor> in{Tensor::randn({4, 3}, 1), Tensor::from_vector_i64({1, 4}, {2})};
  auto ref = message_of<InvalidArgument>([&] { run_reference(g, in, {}); });
  EXPECT_HAS(ref, "index 4 at position 1 is outside [0, 4)");
  auto got = message_of<InvalidArgument>([&] { run_graph_once(cpu_backend(), g, in, {}); });
  EXPECT_HAS(got, "index 4 at position 1 is outside [0, 4)");

  Graph a = trace(DType::Float32,
                  {{"q", vi({2, 1, 1, 8}, DType::Float32)}, {"kv", vi({2, 1, 5, 8}, DType::Float32)},
                   {"p", vi({2, 1}, DType::Int64)}, {"l", vi({2}, DType::Int64)}},
                  [](const std::vector<Var>& v) {
                    return std::vector<Var>{F::masked_attention(v[0], v[1], v[1], v[2], v[3])};
                  });
  const std::vector<Tensor> ain{Tensor::randn({2, 1, 1, 8}, 1), Tensor::randn({2, 1, 5, 8}, 2),
                                Tensor::from_vector_i64({3, 5}, {2, 1}), Tensor::from_vector_i64({4, 6}, {2})};
  EXPECT_HAS(message_of<InvalidArgument>([&] { run_reference(a, ain, {}); }), "kv_lengths[1] = 6 is outside [0, 5]");
  EXPECT_HAS(message_of<InvalidArgument>([&] { run_graph_once(cpu_backend(), a, ain, {}); }),
             "kv_lengths[1] = 6 is outside [0, 5]");
}

// Cache slots at and past kv_lengths[b] (and past each query's position) hold NaN: a kernel
// that read them, even to mask them afterwards, would produce NaN (0 * NaN). Padding query
// rows (position -1) and an empty sequence (length 0) give zeros.
TEST(LlmOps, MaskedAttentionNeverReadsPastTheVisibleKeys) {
  for (DType dt : {DType::Float32, DType::BFloat16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    const std::int64_t B = 3, Hq = 8, Hkv = 2, T = 5, S = 300, D = 64;
    Graph g = trace(dt,
                    {{"q", vi({B, Hq, T, D}, dt)}, {"k", vi({B, Hkv, S, D}, dt)}, {"v", vi({B, Hkv, S, D}, dt)},
                     {"p", vi({B, T}, DType::Int64)}, {"l", vi({B}, DType::Int64)}},
                    [](const std::vector<Var>& v) {
                      return std::vector<Var>{F::masked_attention(v[0], v[1], v[2], v[3], v[4])};
                    });
    const std::vector<std::int64_t> len{290, 37, 0};
    // b = 0: positions past its length (only keys < 290 are visible); b = 1: two padding rows.
    const std::vector<std::int64_t> pos{287, 289, 295, 298, 299, 30, 31, 32, -1, -1, -1, -1, -1, -1, -1};
    Tensor k = Tensor::randn({B, Hkv, S, D}, 2).to_dtype(DType::Float32);
    Tensor v = Tensor::randn({B, Hkv, S, D}, 3).to_dtype(DType::Float32);
    Tensor kz = k.clone(), vz = v.clone();
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < Hkv; ++h) {
        for (std::int64_t j = len[static_cast<std::size_t>(b)]; j < S; ++j) {
          for (std::int64_t d = 0; d < D; ++d) {
            const std::int64_t i = ((b * Hkv + h) * S + j) * D + d;
            k.data<float>()[i] = v.data<float>()[i] = nan;
            kz.data<float>()[i] = vz.data<float>()[i] = 0.f;
          }
        }
      }
    }
    const Tensor q = Tensor::randn({B, Hq, T, D}, 1, dt);
    const Tensor p = Tensor::from_vector_i64(pos, {B, T}), l = Tensor::from_vector_i64(len, {B});
    const auto got = run_graph_once(cpu_backend(), g, {q, k.to_dtype(dt), v.to_dtype(dt), p, l}, {});
    const auto want = run_reference(g, {q, kz.to_dtype(dt), vz.to_dtype(dt), p, l}, {});
    const auto y = got[0].to_float_vector();
    for (float e : y) ASSERT_TRUE(std::isfinite(e));
    EXPECT_TRUE(tensors_close(got[0], want[0], dt == DType::Float32 ? 1e-4 : 2e-2, dt == DType::Float32 ? 1e-5 : 2e-2));
    // Row (b=1, t>=3) and all of b=2 are padding: zeros.
    for (std::int64_t h = 0; h < Hq; ++h) {
      for (std::int64_t d = 0; d < D; ++d) {
        EXPECT_EQ(y[static_cast<std::size_t>(((1 * Hq + h) * T + 4) * D + d)], 0.f);
        EXPECT_EQ(y[static_cast<std::size_t>(((2 * Hq + h) * T + 0) * D + d)], 0.f);
      }
    }
  }
}

// A key mask [B, C] bounds the keys to the cache's first C rows (a token-generation cache
// bucket over a longer cache): rows at and past C hold NaN, kv_lengths reach past C (up to S),
// and the kernel reads neither them nor past kv_lengths; the mask's zeros hide keys inside the
// sequence too. Checked against the reference (which sees zeros past C) and against
// scaled_dot_product_attention on the first C rows with the equivalent explicit mask.
TEST(LlmOps, MaskedAttentionWithAKeyMaskReadsOnlyTheFirstCKeys) {
  for (DType dt : {DType::Float32, DType::BFloat16}) {
    SCOPED_TRACE(std::string(dtype_name(dt)));
    const std::int64_t B = 3, Hq = 4, Hkv = 2, S = 200, C = 64, D = 32;
    Graph g = trace(dt,
                    {{"q", vi({B, Hq, 1, D}, dt)}, {"k", vi({B, Hkv, S, D}, dt)}, {"v", vi({B, Hkv, S, D}, dt)},
                     {"p", vi({B, 1}, DType::Int64)}, {"l", vi({B}, DType::Int64)}, {"m", vi({B, C}, DType::Int64)},
                     {"kc", vi({B, Hkv, C, D}, dt)}, {"vc", vi({B, Hkv, C, D}, dt)},
                     {"full", vi({B, 1, 1, C}, DType::Int64)}},
                    [](const std::vector<Var>& v) {
                      return std::vector<Var>{F::masked_attention(v[0], v[1], v[2], v[3], v[4], v[5]),
                                              F::scaled_dot_product_attention(v[0], v[6], v[7], v[8])};
                    });
    // b = 0: 50 keys, two hidden by the mask; b = 1: kv_lengths 150 > C, but the mask (and C)
    // stop at 64; b = 2: padding (position -1, an all-zero mask row).
    const std::vector<std::int64_t> len{50, 150, 0}, pos{49, 149, -1};
    std::vector<std::int64_t> mask(static_cast<std::size_t>(B * C), 0), full;
    for (std::int64_t j = 0; j < C; ++j) {
      mask[static_cast<std::size_t>(j)] = j < 50 && j != 7 && j != 33 ? 1 : 0;
      mask[static_cast<std::size_t>(C + j)] = 1;
    }
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t j = 0; j < C; ++j) {
        const bool vis = mask[static_cast<std::size_t>(b * C + j)] != 0 && j < len[static_cast<std::size_t>(b)] &&
                         j <= pos[static_cast<std::size_t>(b)];
        full.push_back(vis ? 1 : 0);
      }
    }
    Tensor k = Tensor::randn({B, Hkv, S, D}, 2).to_dtype(DType::Float32);
    Tensor v = Tensor::randn({B, Hkv, S, D}, 3).to_dtype(DType::Float32);
    Tensor kz = k.clone(), vz = v.clone();
    std::vector<float> kc, vc;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < Hkv; ++h) {
        for (std::int64_t j = 0; j < S; ++j) {
          for (std::int64_t d = 0; d < D; ++d) {
            const std::int64_t i = ((b * Hkv + h) * S + j) * D + d;
            if (j < C) {
              kc.push_back(k.data<float>()[i]);
              vc.push_back(v.data<float>()[i]);
              continue;
            }
            k.data<float>()[i] = v.data<float>()[i] = nan;
            kz.data<float>()[i] = vz.data<float>()[i] = 0.f;
          }
        }
      }
    }
    const Tensor q = Tensor::randn({B, Hq, 1, D}, 1, dt);
    const Tensor p = Tensor::from_vector_i64(pos, {B, 1}), l = Tensor::from_vector_i64(len, {B});
    const Tensor m = Tensor::from_vector_i64(mask, {B, C}), fm = Tensor::from_vector_i64(full, {B, 1, 1, C});
    const Tensor kct = Tensor::from_vector(kc, {B, Hkv, C, D}).to_dtype(dt);
    const Tensor vct = Tensor::from_vector(vc, {B, Hkv, C, D}).to_dtype(dt);
    const auto got = run_graph_once(cpu_backend(), g, {q, k.to_dtype(dt), v.to_dtype(dt), p, l, m, kct, vct, fm}, {});
    const auto want = run_reference(g, {q, kz.to_dtype(dt), vz.to_dtype(dt), p, l, m, kct, vct, fm}, {});
    for (float e : got[0].to_float_vector()) ASSERT_TRUE(std::isfinite(e));
    const double rtol = dt == DType::Float32 ? 1e-4 : 2e-2, atol = dt == DType::Float32 ? 1e-5 : 2e-2;
    EXPECT_TRUE(tensors_close(got[0], want[0], rtol, atol));
    EXPECT_TRUE(tensors_close(got[0], got[1], rtol, atol));   // = attention over the first C rows
    EXPECT_TRUE(tensors_close(want[0], want[1], rtol, atol));
    // The mask matters: without its zeros inside b = 0 the result differs.
    std::vector<std::int64_t> ones = mask;
    ones[7] = ones[33] = 1;
    const auto unmasked = run_graph_once(cpu_backend(), g,
                                         {q, k.to_dtype(dt), v.to_dtype(dt), p, l, Tensor::from_vector_i64(ones, {B, C}), kct, vct, fm}, {});
    EXPECT_FALSE(tensors_close(unmasked[0], got[0], rtol, atol));
  }
  // Shape and dtype errors name the values.
  auto wide = message_of<ShapeError>([] {
    trace(DType::Float32,
          {{"q", vi({2, 2, 1, 8}, DType::Float32)}, {"kv", vi({2, 2, 16, 8}, DType::Float32)},
           {"p", vi({2, 1}, DType::Int64)}, {"l", vi({2}, DType::Int64)}, {"m", vi({2, 17}, DType::Int64)}},
          [](const std::vector<Var>& v) {
            return std::vector<Var>{F::masked_attention(v[0], v[1], v[1], v[2], v[3], v[4])};
          });
  });
  EXPECT_HAS(wide, "key_mask [2, 17] must be [B, C] with B = 2 and 1 <= C <= 16");
  auto dtype = message_of<DTypeError>([] {
    trace(DType::Float32,
          {{"q", vi({2, 2, 1, 8}, DType::Float32)}, {"kv", vi({2, 2, 16, 8}, DType::Float32)},
           {"p", vi({2, 1}, DType::Int64)}, {"l", vi({2}, DType::Int64)}, {"m", vi({2, 8}, DType::Float32)}},
          [](const std::vector<Var>& v) {
            return std::vector<Var>{F::masked_attention(v[0], v[1], v[1], v[2], v[3], v[4])};
          });
  });
  EXPECT_HAS(dtype, "key_mask must be int64");
}

// Two code paths of the fused kernel (positions/lengths vs an explicit int64 mask) and the
// additive form (0 / -inf) agree on the same visibility, with GQA and several key blocks.
TEST(LlmOps, MaskedAttentionEqualsSdpaWithTheEquivalentMask) {
  const std::int64_t B = 2, Hq = 6, Hkv = 3, T = 40, S = 70, D = 32;
  const std::vector<std::int64_t> len{70, 45};
  std::vector<std::int64_t> pos;
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t t = 0; t < T; ++t) pos.push_back(b == 0 ? 30 + t : (t < 20 ? 25 + t : -1));
  }
  std::vector<std::int64_t> mask;
  std::vector<float> bias;
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t j = 0; j < S; ++j) {
        const bool vis = j <= pos[static_cast<std::size_t>(b * T + t)] && j < len[static_cast<std::size_t>(b)];
        mask.push_back(vis ? 1 : 0);
        bias.push_back(vis ? 0.f : -std::numeric_limits<float>::infinity());
      }
    }
  }
  const Shape qs{B, Hq, T, D}, kvs{B, Hkv, S, D};
  Graph g = trace(DType::Float32,
                  {{"q", vi(qs, DType::Float32)}, {"k", vi(kvs, DType::Float32)}, {"v", vi(kvs, DType::Float32)},
                   {"p", vi({B, T}, DType::Int64)}, {"l", vi({B}, DType::Int64)},
                   {"m", vi({B, 1, T, S}, DType::Int64)}, {"bias", vi({B, 1, T, S}, DType::Float32)}},
                  [](const std::vector<Var>& v) {
                    return std::vector<Var>{F::masked_attention(v[0], v[1], v[2], v[3], v[4]),
                                            F::scaled_dot_product_attention(v[0], v[1], v[2], v[5]),
                                            F::scaled_dot_product_attention(v[0], v[1], v[2], v[6])};
                  });
  const auto out = run_graph_once(cpu_backend(), g,
                                  {Tensor::randn(qs, 1), Tensor::randn(kvs, 2), Tensor::randn(kvs, 3),
                                   Tensor::from_vector_i64(pos, {B, T}), Tensor::from_vector_i64(len, {B}),
                                   Tensor::from_vector_i64(mask, {B, 1, T, S}),
                                   Tensor::from_vector(bias, {B, 1, T, S})},
                                  {});
  EXPECT_TRUE(tensors_close(out[1], out[0], 1e-5, 1e-6));
  EXPECT_TRUE(tensors_close(out[2], out[0], 1e-5, 1e-6));
}

// Every instruction-set path of the fused kernel (AVX-512, AVX2+FMA, baseline x86-64, as far
// as this CPU has them) matches the reference, float32 and bfloat16, causal GQA prefill and
// decode over several key blocks, with and without a key mask.
TEST(LlmOps, AttentionMatchesTheReferenceOnEveryInstructionSetPath) {
  const char* before = std::getenv("DEVPIPE_CPU_ISA");
  const std::string saved = before ? before : "";
  const std::string best = cpu::attention_isa();
  for (const std::string isa : {"avx512", "avx2", "baseline"}) {
    ::setenv("DEVPIPE_CPU_ISA", isa.c_str(), 1);
    const std::string got = cpu::attention_isa();
    if (isa == "baseline" || (isa == "avx2" && best != "baseline") || best == isa) {
      EXPECT_EQ(got, isa);
    } else {
      std::cout << "[ isa ] this CPU has no " << isa << "; runs " << got << "\n";
    }
    for (DType dt : {DType::Float32, DType::BFloat16}) {
      SCOPED_TRACE(isa + " " + std::string(dtype_name(dt)));
      Graph g = trace(dt,
                      {{"q", vi({2, 6, 37, 64}, dt)}, {"kv", vi({2, 2, 37, 64}, dt)},
                       {"dq", vi({2, 6, 1, 64}, dt)}, {"cache", vi({2, 2, 100, 64}, dt)},
                       {"p", vi({2, 1}, DType::Int64)}, {"l", vi({2}, DType::Int64)},
                       {"m", vi({2, 72}, DType::Int64)}, {"pm", vi({2, 1}, DType::Int64)}},
                      [](const std::vector<Var>& v) {
                        return std::vector<Var>{
                            F::scaled_dot_product_attention(v[0], v[1], v[1], std::nullopt, true),
                            F::masked_attention(v[2], v[3], v[3], v[4], v[5]),
                            F::masked_attention(v[2], v[3], v[3], v[7], v[5], v[6])};  // first 72 keys
                      });
      std::vector<std::int64_t> key_mask(2 * 72, 1);
      key_mask[5] = key_mask[72 + 40] = 0;
      std::vector<Tensor> in{Tensor::randn({2, 6, 37, 64}, 1, dt), Tensor::randn({2, 2, 37, 64}, 2, dt),
                             Tensor::randn({2, 6, 1, 64}, 3, dt), Tensor::randn({2, 2, 100, 64}, 4, dt),
                             Tensor::from_vector_i64({66, 99}, {2, 1}), Tensor::from_vector_i64({67, 100}, {2}),
                             Tensor::from_vector_i64(key_mask, {2, 72}), Tensor::from_vector_i64({66, 71}, {2, 1})};
      expect_matches_reference(cpu_backend(), g, in, {},
                               dt == DType::Float32 ? Tol{1e-4, 1e-5} : Tol{2e-2, 2e-2});
    }
  }
  if (before) {
    ::setenv("DEVPIPE_CPU_ISA", saved.c_str(), 1);
  } else {
    ::unsetenv("DEVPIPE_CPU_ISA");
  }
}

TEST(LlmOps, MalformedFloatAttributesAndConstantFlagsAreFormatErrors) {
  const Graph g = every_new_op();
  std::string text = graph_to_json(g);
  auto spoil = [&](const std::string& from, const std::string& to) {
    std::string t = text;
    const auto at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    if (at != std::string::npos) t.replace(at, from.size(), to);
    return t;
  };
  EXPECT_HAS(message_of<FormatError>([&] { graph_from_json(spoil("\"-inf\"", "\"-infinity\"")); }),
             "a float attribute is");
  EXPECT_HAS(message_of<FormatError>([&] { graph_from_json(spoil("{\"f\":0.125}", "{\"f\":true}")); }),
             "a float attribute is");
  Graph c = trace(DType::Float32, {{"x", vi({2}, DType::Float32)}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{v[0] + Tracer::current().constant("c", Tensor::zeros({2}))};
  });
  text = graph_to_json(c);
  EXPECT_TRUE(graph_from_json(text).params.at(0).constant);
  EXPECT_HAS(message_of<FormatError>([&] { graph_from_json(spoil("\"constant\":true", "\"constant\":1")); }),
             ".constant is 1, not true or false");
}
