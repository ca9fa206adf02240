// The memory-planning compiler pass (compiler/memory_plan.h) on traced graphs: views, arena
// reuse by liveness, in-place outputs and end copies, and the graph checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <string>
#include <vector>

#include "compiler/memory_plan.h"
#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/trace.h"

namespace devpipe {
namespace {

using Kind = MemoryPlan::Kind;

Graph trace(const Shape& x, const std::function<std::vector<Var>(const Var&)>& body) {
  TraceOptions opt;
  return trace_function(opt, {{"x", ValueInfo{x, DType::Float32}}},
                        [&](const std::vector<Var>& v) { return body(v[0]); });
}

MemoryPlan plan(const Graph& g, std::size_t alignment = 64) {
  MemoryPlan p = plan_views(g, "test backend");
  plan_arena(p, g, std::vector<std::size_t>(g.nodes.size(), 0), alignment, "test backend");
  return p;
}

std::size_t at(int v) { return static_cast<std::size_t>(v); }

/// Whether the arena ranges of values a and b overlap.
bool share_bytes(const Graph& g, const MemoryPlan& p, int a, int b) {
  const std::size_t oa = p.arena_offset[at(a)], ob = p.arena_offset[at(b)];
  const std::size_t na = value_bytes(g.value(a)), nb = value_bytes(g.value(b));
  return oa < ob + nb && ob < oa + na;
}

TEST(MemoryPlan, ReshapeViewsShareTheirRoot) {
  Graph g = trace({4, 6}, [](const Var& x) {
    Var a = F::relu(x);
    Var r = F::reshape(F::reshape(a, {2, 12}), {24});
    Var xi = F::reshape(x, {3, 8});
    return std::vector<Var>{F::silu(r), F::silu(xi)};
  });
  ASSERT_EQ(g.nodes.size(), 6u);
  MemoryPlan p = plan(g);
  const int x = g.inputs[0].value;
  const int a = g.nodes[0].outputs[0];
  const int r = g.nodes[2].outputs[0];
  const int xi = g.nodes[3].outputs[0];
  EXPECT_EQ(p.kind[at(x)], Kind::Input);
  EXPECT_EQ(p.kind[at(a)], Kind::Produced);
  EXPECT_EQ(p.producer[at(a)], 0);
  EXPECT_EQ(p.producer[at(r)], 2);
  EXPECT_EQ(p.root[at(r)], a);
  EXPECT_EQ(p.root[at(g.nodes[1].outputs[0])], a);
  EXPECT_EQ(p.root_offset[at(r)], 0u);
  EXPECT_EQ(p.root[at(xi)], x);
  EXPECT_TRUE(p.is_root(a));
  EXPECT_FALSE(p.is_root(r));
  // Only the root has arena memory; the views have none of their own.
  EXPECT_NE(p.arena_offset[at(a)], MemoryPlan::npos);
  EXPECT_EQ(p.arena_offset[at(r)], MemoryPlan::npos);
  EXPECT_EQ(p.arena_offset[at(x)], MemoryPlan::npos);
  EXPECT_EQ(p.arena_bytes, 128u);  // 96 bytes, 64-byte aligned

  // Addresses: a view follows its root, also when the root is bound per run.
  std::vector<std::byte> arena(p.arena_bytes);
  ValueAddresses addr(g, p, fixed_addresses(g, p, {}), arena.data());
  EXPECT_EQ(addr.at(r), addr.at(a));
  std::vector<float> in(24), out0(24), out1(24);
  addr.bind({in.data()}, {out0.data(), out1.data()});
  EXPECT_EQ(addr.at(xi), reinterpret_cast<std::byte*>(in.data()));
  EXPECT_EQ(addr.at(g.outputs[0]), reinterpret_cast<std::byte*>(out0.data()));
}

TEST(MemoryPlan, DisjointLifetimesShareArenaBytes) {
  // a = relu(x); b = relu(a); c = relu(b); d = c + x: a dies at node 1, so c can take its
  // bytes; b is live while c is produced, so they cannot overlap.
  Graph g = trace({16, 16}, [](const Var& x) {
    Var a = F::relu(x);
    Var b = F::relu(a);
    Var c = F::relu(b);
    return std::vector<Var>{c + x};
  });
  ASSERT_EQ(g.nodes.size(), 4u);
  MemoryPlan p = plan(g);
  const int a = g.nodes[0].outputs[0], b = g.nodes[1].outputs[0], c = g.nodes[2].outputs[0];
  EXPECT_TRUE(share_bytes(g, p, a, c));
  EXPECT_FALSE(share_bytes(g, p, a, b));
  EXPECT_FALSE(share_bytes(g, p, b, c));
  EXPECT_EQ(p.arena_bytes, 2u * 16 * 16 * 4);
  // The last node writes the output in place: no arena bytes, no end copy.
  EXPECT_EQ(p.output_roots, std::vector<int>{g.outputs[0]});
  EXPECT_TRUE(p.end_copies.empty());
  EXPECT_EQ(p.arena_offset[at(g.outputs[0])], MemoryPlan::npos);
}

TEST(MemoryPlan, ScratchLivesOnlyDuringItsNode) {
  Graph g = trace({8, 8}, [](const Var& x) {
    Var a = F::relu(x);
    Var b = F::relu(a);
    return std::vector<Var>{F::relu(b)};
  });
  MemoryPlan p = plan_views(g, "test backend");
  plan_arena(p, g, {0, 100, 0}, 256, "test backend");
  const int a = g.nodes[0].outputs[0], b = g.nodes[1].outputs[0];
  EXPECT_EQ(p.scratch_offset[0], MemoryPlan::npos);
  EXPECT_EQ(p.scratch_offset[2], MemoryPlan::npos);
  ASSERT_NE(p.scratch_offset[1], MemoryPlan::npos);
  // Node 1 reads a, writes b and uses its scratch: three disjoint 256-byte aligned blocks.
  std::vector<std::size_t> offsets{p.arena_offset[at(a)], p.arena_offset[at(b)],
                                   p.scratch_offset[1]};
  for (std::size_t o : offsets) EXPECT_EQ(o % 256, 0u);
  std::sort(offsets.begin(), offsets.end());
  EXPECT_EQ(offsets, (std::vector<std::size_t>{0, 256, 512}));
  EXPECT_EQ(p.arena_bytes, 768u);
}

TEST(MemoryPlan, OutputWrittenInPlaceOnceThenCopied) {
  Graph g = trace({2, 6}, [](const Var& x) {
    Var a = F::relu(x);
    Var r = F::reshape(a, {3, 4});
    Var s = F::silu(x);
    return std::vector<Var>{s, s, x, r};
  });
  MemoryPlan p = plan(g);
  const int s = g.outputs[0];
  const int a = g.nodes[0].outputs[0];
  // The first reference to s is written in place, the second copied from it at the end, as
  // is the graph input returned as is. The reshape of a is a whole view of a, so a is written
  // straight into that output's buffer.
  EXPECT_EQ(p.output_roots, (std::vector<int>{s, -1, -1, a}));
  ASSERT_EQ(p.end_copies.size(), 2u);
  EXPECT_EQ(p.end_copies[0].output, 1u);
  EXPECT_EQ(p.end_copies[0].value, s);
  EXPECT_EQ(p.end_copies[0].bytes, 12u * 4);
  EXPECT_EQ(p.end_copies[1].output, 2u);
  EXPECT_EQ(p.end_copies[1].value, g.inputs[0].value);
  EXPECT_EQ(p.root[at(g.outputs[3])], a);
  EXPECT_EQ(p.arena_offset[at(a)], MemoryPlan::npos);
  EXPECT_EQ(p.arena_offset[at(s)], MemoryPlan::npos);
  EXPECT_EQ(p.arena_bytes, 0u);
}

TEST(MemoryPlan, ReadingAnUndefinedValueIsAFormatError) {
  Graph g = trace({2, 3}, [](const Var& x) { return std::vector<Var>{F::relu(F::relu(x))}; });
  // Node 1 now reads a value that nothing defines.
  const int orphan = g.add_value(g.value(g.nodes[0].outputs[0]));
  g.nodes[1].inputs[0] = orphan;
  try {
    plan_views(g, "test backend");
    FAIL() << "expected a FormatError";
  } catch (const FormatError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("test backend: relu"), std::string::npos) << what;
    EXPECT_NE(what.find("reads value " + std::to_string(orphan) + " before anything defines it"),
              std::string::npos)
        << what;
  }
}

TEST(MemoryPlan, RedefiningAValueAndUndefinedOutputsAreFormatErrors) {
  Graph g = trace({2, 3}, [](const Var& x) { return std::vector<Var>{F::relu(F::relu(x))}; });
  Graph twice = g;
  twice.nodes[1].outputs[0] = twice.nodes[0].outputs[0];
  EXPECT_THROW(plan_views(twice, "test backend"), FormatError);

  Graph missing = g;
  missing.outputs.push_back(missing.add_value(g.value(g.outputs[0])));
  MemoryPlan p = plan_views(missing, "test backend");
  try {
    plan_arena(p, missing, std::vector<std::size_t>(missing.nodes.size(), 0), 64, "test backend");
    FAIL() << "expected a FormatError";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("test backend: graph output 1"), std::string::npos)
        << e.what();
  }
}

}  // namespace
// A rank's share of whole leading rows (the batch split of a replicated stage) is a view at
// its rows when planned for that rank; a stepped slice, one of an inner dim, or a plan for no
// rank, copies.
TEST(MemoryPlan, LeadingRowsSliceIsAViewAtTheRanksRows) {
  auto rows = [](std::int64_t step) {
    return trace(Shape{4, 3, 5}, [step](const Var& x) {
      Attrs a;
      a.set("dim", std::int64_t{0}).set("start", std::int64_t{0}).set("end", std::int64_t{2})
          .set("step", step).set("rank_stride", std::int64_t{2});
      return std::vector<Var>{F::relu(Tracer::current().emit(OpKind::Slice, {x}, a))};
    });
  };
  Graph g = rows(1);
  const int x = g.inputs[0].value, s = g.nodes[0].outputs[0];
  for (int rank : {0, 1}) {
    MemoryPlan p = plan_views(g, "test backend", rank);
    EXPECT_EQ(p.root[at(s)], x) << "rank " << rank;
    EXPECT_EQ(p.root_offset[at(s)], static_cast<std::size_t>(rank * 2 * 3 * 5 * 4)) << "rank " << rank;
  }
  EXPECT_EQ(plan_views(g, "test backend").root[at(s)], s);  // no rank: a copy
  Graph every_other = rows(2);
  const int e = every_other.nodes[0].outputs[0];
  EXPECT_EQ(plan_views(every_other, "test backend", 1).root[at(e)], e);
  Graph stepped = trace(Shape{4, 3, 5}, [](const Var& x) {
    Attrs a;
    a.set("dim", std::int64_t{1}).set("start", std::int64_t{0}).set("end", std::int64_t{2})
        .set("step", std::int64_t{1}).set("rank_stride", std::int64_t{1});
    return std::vector<Var>{F::relu(Tracer::current().emit(OpKind::Slice, {x}, a))};
  });
  const int t = stepped.nodes[0].outputs[0];
  EXPECT_EQ(plan_views(stepped, "test backend", 1).root[at(t)], t);  // rows of dim 1: not contiguous
  // Leading rows of a state: a copy when a later state_write updates the state (a view would
  // see the write), a view of the state once nothing writes it any more (the first rows of a
  // KV cache read after the step's cache_write: no copy of the cache).
  Graph state = trace(Shape{2, 1, 3}, [](const Var& x) {
    Var st = F::state("s", {4, 5, 3}, DType::Float32);
    Var before = F::slice(st, 0, 0, 2);
    Var written = F::state_write(st, x, F::reshape(F::arange(2), {2, 1}), 1);
    return std::vector<Var>{F::relu(before), F::relu(F::slice(written, 0, 0, 2))};
  });
  std::vector<int> slices;
  for (const Node& n : state.nodes) {
    if (n.op == OpKind::Slice) slices.push_back(n.outputs[0]);
  }
  ASSERT_EQ(slices.size(), 2u);
  const int st = state.inputs[1].value;
  ASSERT_TRUE(state.inputs[1].is_state());
  MemoryPlan sp = plan_views(state, "test backend", 0);  // and no "reads an old version" error
  EXPECT_EQ(sp.root[at(slices[0])], slices[0]);            // before the write: a copy
  EXPECT_EQ(sp.root[at(slices[1])], st);                   // after it: a view
  EXPECT_EQ(sp.root_offset[at(slices[1])], 0u);
  EXPECT_EQ(plan_views(state, "test backend").root[at(slices[1])], slices[1]);  // no rank: a copy
  // A state_write through a view of a state is still refused (it updates a state, not a view).
  Graph through = trace(Shape{2, 1, 3}, [](const Var& x) {
    Var st = F::state("s", {4, 5, 3}, DType::Float32);
    Var rows = F::slice(st, 0, 0, 2);
    return std::vector<Var>{F::state_write(rows, x, F::reshape(F::arange(2), {2, 1}), 1)};
  });
  try {
    plan_views(through, "test backend", 0);
    ADD_FAILURE() << "a state_write of a slice view was accepted";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("which is not a state"), std::string::npos) << e.what();
  }
}

}  // namespace devpipe
