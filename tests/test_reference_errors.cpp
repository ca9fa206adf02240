// run_reference: argument validation, errors raised by reference implementations, and the
// rank-dependent attributes (vocab_per_rank, rank_stride) at a rank other than 0.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/trace.h"
#include "graph/reference.h"

using namespace devpipe;

namespace {

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

Graph linear_graph() {
  return trace_function({}, {{"x", {Shape{2, 8}, DType::Float32}}, {"w", {Shape{4, 8}, DType::Float32}}},
                        [](const std::vector<Var>& v) {
                          return std::vector<Var>{F::linear(v[0], v[1])};
                        });
}

Graph embedding_graph(std::int64_t n, std::int64_t vocab, std::int64_t vocab_per_rank = 0) {
  return trace_function({}, {{"ids", {Shape{n}, DType::Int64}}, {"table", {Shape{vocab, 4}, DType::Float32}}},
                        [&](const std::vector<Var>& v) {
                          return std::vector<Var>{F::embedding(v[0], v[1], vocab_per_rank)};
                        });
}

}  // namespace

TEST(ReferenceErrors, WrongShapeInputIsShapeErrorNamingTheInput) {
  Graph g = linear_graph();
  try {
    run_reference(g, {Tensor::zeros({2, 9}), Tensor::zeros({4, 8})}, {});
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, "'x'")) << msg;
    EXPECT_TRUE(contains(msg, "[2, 9]")) << msg;
    EXPECT_TRUE(contains(msg, "[2, 8]")) << msg;
  }
  try {
    run_reference(g, {Tensor::zeros({2, 8}), Tensor::zeros({4, 7})}, {});
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, "'w'")) << msg;
    EXPECT_TRUE(contains(msg, "[4, 7]")) << msg;
  }
}

TEST(ReferenceErrors, WrongDtypeInputIsDTypeErrorNamingTheInput) {
  Graph g = linear_graph();
  try {
    run_reference(g, {Tensor::zeros({2, 8}, DType::BFloat16), Tensor::zeros({4, 8})}, {});
    FAIL() << "expected DTypeError";
  } catch (const DTypeError& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, "'x'")) << msg;
    EXPECT_TRUE(contains(msg, "bfloat16")) << msg;
    EXPECT_TRUE(contains(msg, "float32")) << msg;
  }
}

TEST(ReferenceErrors, WrongInputCountIsInvalidArgument) {
  Graph g = linear_graph();
  EXPECT_THROW(run_reference(g, {Tensor::zeros({2, 8})}, {}), InvalidArgument);
  EXPECT_THROW(run_reference(g, {Tensor::zeros({2, 8}), Tensor::zeros({4, 8})}, {Tensor::zeros({1})}),
               InvalidArgument);
}

TEST(ReferenceErrors, WrongShapeParameterNamesItsKey) {
  Graph g = trace_function({}, {{"x", {Shape{2, 8}, DType::Float32}}}, [](const std::vector<Var>& v) {
    Var w = Tracer::current().parameter("fc.weight", Shape{4, 8}, -1);
    return std::vector<Var>{F::linear(v[0], w)};
  });
  ASSERT_EQ(g.params.size(), 1u);
  try {
    run_reference(g, {Tensor::zeros({2, 8})}, {Tensor::zeros({8, 4})});
    FAIL() << "expected ShapeError";
  } catch (const ShapeError& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, "fc.weight")) << msg;
    EXPECT_TRUE(contains(msg, "[8, 4]")) << msg;
  }
  auto out = run_reference(g, {Tensor::ones({2, 8})}, {Tensor::full({4, 8}, 0.5)});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0].shape(), (Shape{2, 4}));
  for (float v : out[0].to_float_vector()) EXPECT_FLOAT_EQ(v, 4.0f);
}

TEST(ReferenceErrors, EmbeddingIndexOutOfRangeIsInvalidArgumentNamingIndexAndVocab) {
  Graph g = embedding_graph(3, 10);
  Tensor table = Tensor::randn({10, 4}, 1);
  try {
    run_reference(g, {Tensor::from_vector_i64({1, 12, 2}, {3}), table}, {});
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, "12")) << msg;
    EXPECT_TRUE(contains(msg, "10")) << msg;
  }
  try {
    run_reference(g, {Tensor::from_vector_i64({-3, 0, 2}, {3}), table}, {});
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    std::string msg = e.what();
    EXPECT_TRUE(contains(msg, "-3")) << msg;
    EXPECT_TRUE(contains(msg, "10")) << msg;
  }
  // The last row is in range.
  EXPECT_NO_THROW(run_reference(g, {Tensor::from_vector_i64({9, 0, 2}, {3}), table}, {}));
}

TEST(ReferenceErrors, ShardedEmbeddingAtRankOneUsesItsRowsAndZeroesTheRest) {
  // The full table has 8 rows; rank 1 of 2 holds rows [4, 8).
  Graph g = embedding_graph(4, 4, /*vocab_per_rank=*/4);
  std::vector<float> rows(16);
  for (int i = 0; i < 16; ++i) rows[static_cast<std::size_t>(i)] = static_cast<float>(100 + i);
  Tensor table = Tensor::from_vector(rows, {4, 4});
  auto out = run_reference(g, {Tensor::from_vector_i64({0, 5, 7, 3}, {4}), table}, {},
                           RefContext{.rank = 1, .tp_degree = 1});
  ASSERT_EQ(out.size(), 1u);
  auto v = out[0].to_float_vector();
  for (int d = 0; d < 4; ++d) {
    EXPECT_EQ(v[static_cast<std::size_t>(0 * 4 + d)], 0.0f);                 // row 0: rank 0's
    EXPECT_EQ(v[static_cast<std::size_t>(1 * 4 + d)], 100.0f + 1 * 4 + d);  // row 5 -> local 1
    EXPECT_EQ(v[static_cast<std::size_t>(2 * 4 + d)], 100.0f + 3 * 4 + d);  // row 7 -> local 3
    EXPECT_EQ(v[static_cast<std::size_t>(3 * 4 + d)], 0.0f);                 // row 3: rank 0's
  }
}

TEST(ReferenceErrors, SliceRankStrideShiftsTheWindowByRank) {
  Graph g = trace_function({}, {{"x", {Shape{2, 8}, DType::Int64}}}, [](const std::vector<Var>& v) {
    Attrs a;
    a.set("dim", std::int64_t{1}).set("start", std::int64_t{0}).set("end", std::int64_t{4})
        .set("step", std::int64_t{1}).set("rank_stride", std::int64_t{4});
    return std::vector<Var>{Tracer::current().emit(OpKind::Slice, {v[0]}, a)};
  });
  std::vector<std::int64_t> xs(16);
  for (int i = 0; i < 16; ++i) xs[static_cast<std::size_t>(i)] = i;
  Tensor x = Tensor::from_vector_i64(xs, {2, 8});
  auto r0 = run_reference(g, {x}, {}, RefContext{.rank = 0});
  auto r1 = run_reference(g, {x}, {}, RefContext{.rank = 1});
  const std::int64_t* p0 = r0[0].data<std::int64_t>();
  const std::int64_t* p1 = r1[0].data<std::int64_t>();
  for (int row = 0; row < 2; ++row) {
    for (int j = 0; j < 4; ++j) {
      EXPECT_EQ(p0[row * 4 + j], row * 8 + j);
      EXPECT_EQ(p1[row * 4 + j], row * 8 + 4 + j);
    }
  }
  // Rank 2 would read past the end.
  EXPECT_THROW(run_reference(g, {x}, {}, RefContext{.rank = 2}), ShapeError);
}

TEST(ReferenceErrors, OutputThatIsAnInputIsACopy) {
  Graph g = trace_function({}, {{"x", {Shape{3}, DType::Float32}}}, [](const std::vector<Var>& v) {
    return std::vector<Var>{F::reshape(v[0], {3})};  // no-op view: no node
  });
  Tensor x = Tensor::ones({3});
  auto out = run_reference(g, {x}, {});
  ASSERT_EQ(out.size(), 1u);
  EXPECT_FALSE(out[0].same_memory(x));
  EXPECT_EQ(out[0].to_float_vector(), x.to_float_vector());
}
