// Internal: the memory-planning compiler pass shared by the backends' executors.
//
// Every value is a root or a view of one (Reshape is a zero-copy alias of its input, at the
// same offset; StateWrite's output is its state, updated in place; so is a slice of leading
// rows, see plan_views). A root is a graph input
// (the caller's buffer, bound per run), a state (the application's buffer, bound per run like
// an input), a parameter
// (fixed at compile), a graph output written in place (the caller's output buffer, bound per
// run) or an intermediate placed by liveness into one arena (first fit, biggest first), next
// to the kernels' scratch, which lives only during its node. Outputs that cannot be written in
// place (a graph input or parameter returned as is, a view, a value returned twice) are copied
// at the end of the run.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "devpipe/graph.h"

namespace devpipe {

/// Where every value of a graph lives for one run, planned once at compile time.
struct MemoryPlan {
  static constexpr std::size_t npos = SIZE_MAX;
  enum class Kind { None, Input, State, Param, Produced };

  // ---- phase 1: plan_views
  std::vector<Kind> kind;                // per value
  std::vector<int> producer;             // per value: the node defining it, or -1
  std::vector<int> root;                 // per value: the value whose memory it views (itself
                                         // unless a Reshape or leading-rows Slice view)
  std::vector<std::size_t> root_offset;  // per value: byte offset into its root

  // ---- phase 2: plan_arena
  struct EndCopy {
    std::size_t output;  // graph output index
    int value;
    std::size_t bytes;
  };
  std::vector<int> output_roots;            // per graph output: the produced root written straight
                                            // into the caller's buffer, or -1
  std::vector<EndCopy> end_copies;          // outputs copied at the end of the run
  std::vector<std::size_t> arena_offset;    // per value: offset of an arena root (npos otherwise)
  std::vector<std::size_t> scratch_offset;  // per node: offset of its scratch (npos if none)
  std::size_t arena_bytes = 0;

  /// True when value `v` is a root of its own.
  bool is_root(int v) const { return root.at(static_cast<std::size_t>(v)) == v; }
};

/// Phase 1 (before kernels are built): kinds, producers and views. Throws FormatError, prefixed
/// with "`who`: " (e.g. "cpu backend") and naming the node, for a value read before anything
/// defines it or defined twice, a StateWrite whose first input is not a state, and a node that
/// reads a state (or a view of it) older than the state's latest update.
/// With `rank` >= 0 (a backend compiling for that rank), a slice of whole leading rows (the
/// batch split of a replicated stage, the first rows of a KV cache) is a view too, at the
/// rank's rows; of a state only when no later StateWrite updates that state (else a copy).
MemoryPlan plan_views(const Graph& graph, std::string_view who, int rank = -1);

/// Phase 2 (once the kernels report `scratch_bytes`, per node): outputs written in place or
/// copied at the end, liveness of the arena roots and their placement, with the scratch, into
/// one arena whose blocks start at multiples of `alignment`. Throws FormatError for a graph
/// output nothing defines.
void plan_arena(MemoryPlan& plan, const Graph& graph, const std::vector<std::size_t>& scratch_bytes,
                std::size_t alignment, std::string_view who);

/// Per value: the address of a parameter, or of a view of one, given the parameters' addresses
/// in graph.params order; nullptr for every other value. Needs phase 1.
std::vector<std::byte*> fixed_addresses(const Graph& graph, const MemoryPlan& plan,
                                        const std::vector<std::byte*>& params);

/// The address of every value during a run of a planned graph: parameters and arena values are
/// fixed at construction; graph inputs, in-place outputs and their views are bound per run.
class ValueAddresses {
 public:
  ValueAddresses() = default;
  /// `fixed` from fixed_addresses(); `arena`: plan.arena_bytes bytes (null when there are none).
  ValueAddresses(const Graph& graph, const MemoryPlan& plan, const std::vector<std::byte*>& fixed,
                 std::byte* arena);

  /// Points the graph inputs, the in-place outputs and their views at the caller's buffers.
  /// The counts must have been checked.
  void bind(const std::vector<const void*>& inputs, const std::vector<void*>& outputs);

  /// Per value id: the current address (null for a per-run one before the first bind()).
  const std::vector<std::byte*>& values() const { return values_; }
  std::byte* const* data() const { return values_.data(); }
  std::byte* at(int v) const { return values_.at(static_cast<std::size_t>(v)); }
  /// Node `node`'s scratch, or nullptr when it asked for none.
  std::byte* scratch(int node) const { return scratch_.at(static_cast<std::size_t>(node)); }

 private:
  struct Alias {
    int value;
    int root;
    std::size_t offset;
  };
  std::vector<std::byte*> values_;
  std::vector<std::byte*> scratch_;
  std::vector<int> input_values_;       // graph input i -> its value
  std::vector<int> output_roots_;       // graph output i -> root written in place, or -1
  std::vector<Alias> dynamic_aliases_;  // views of per-run roots, recomputed each bind()
};

// ---- helpers shared with the backends (messages and sizes)

/// Bytes of a value (numel * dtype size).
std::size_t value_bytes(const ValueInfo& info);
/// "[2, 4] float32".
std::string value_text(const ValueInfo& info);
/// "linear at 'enc.fc1' ([2, 4] float32, [3, 4] float32) -> [2, 3] float32".
std::string describe_node(const Graph& graph, const Node& node);

}  // namespace devpipe
