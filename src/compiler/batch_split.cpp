#include "compiler/batch_split.h"

#include <vector>

namespace devpipe {

namespace {

/// `d` counted from the front (a negative dim counts from the back).
std::int64_t front_dim(std::int64_t d, int rank) { return d < 0 ? d + rank : d; }

}  // namespace

std::string rank_dependence(const Graph& g) {
  for (const GraphParam& p : g.params) {
    if (p.shard_dim >= 0) return "parameter '" + p.key + "' is sharded";
  }
  for (const GraphInput& in : g.inputs) {
    if (in.is_state()) return "it reads the state '" + in.name + "'";
  }
  for (const Node& n : g.nodes) {
    auto where = [&] { return std::string(op_name(n.op)) + (n.scope.empty() ? "" : " in " + n.scope); };
    if (n.op == OpKind::AllReduce || n.op == OpKind::AllGather) return where() + " is a collective";
    if (n.op == OpKind::StateWrite) return where() + " writes a state";
    if (n.op == OpKind::Embedding && n.attrs.i("vocab_per_rank", 0) > 0) {
      return where() + " reads a vocabulary split over the ranks";
    }
    if (n.op == OpKind::Slice && n.attrs.i("rank_stride", 0) != 0) return where() + " takes rows by rank";
  }
  return "";
}

std::string batch_split_blocker(const Graph& g, std::int64_t batch) {
  if (std::string why = rank_dependence(g); !why.empty()) return why;
  // rows[v]: value v has the batch rows on dim 0 (size `batch`), row i depending only on row i
  // of the data inputs. A value that depends on no data input (a parameter, a constant) is
  // free; any other value mixes rows.
  std::vector<bool> rows(g.values.size(), false);
  for (const GraphInput& in : g.inputs) {
    const ValueInfo& v = g.value(in.value);
    if (v.shape.rank() < 1 || v.shape[0] != batch) {
      return "input '" + in.name + "' of shape " + v.shape.to_string() + " has no " + std::to_string(batch) +
             " batch rows";
    }
    rows[static_cast<std::size_t>(in.value)] = true;
  }
  for (const Node& n : g.nodes) {
    const std::string where = std::string(op_name(n.op)) + (n.scope.empty() ? "" : " in " + n.scope);
    bool any_rows = false;
    for (int v : n.inputs) any_rows = any_rows || rows[static_cast<std::size_t>(v)];
    const ValueInfo& out = g.value(n.outputs.at(0));
    const int r = out.shape.rank();
    auto in_rows = [&](std::size_t i) { return i < n.inputs.size() && rows[static_cast<std::size_t>(n.inputs[i])]; };
    auto in_shape = [&](std::size_t i) -> const Shape& { return g.value(n.inputs.at(i)).shape; };
    auto int_attr = [&](const char* name, int rank) { return front_dim(n.attrs.i(name), rank); };
    // Broadcasting ops: the rows inputs have the output's rank (dim 0 lines up with the
    // output's); a free input broadcasts over the rows (fewer dims, or 1 on dim 0).
    auto broadcast_ok = [&]() {
      for (std::size_t i = 0; i < n.inputs.size(); ++i) {
        const Shape& s = in_shape(i);
        if (in_rows(i) ? s.rank() != r : s.rank() == r && s[0] != 1) return false;
      }
      return true;
    };
    // Ops whose every input leads with the batch dim (positions, lengths, sampling params): a
    // free input has 1 row.
    auto leading_ok = [&]() {
      for (std::size_t i = 0; i < n.inputs.size(); ++i) {
        if (!in_rows(i) && in_shape(i).rank() >= 1 && in_shape(i)[0] != 1) return false;
      }
      return true;
    };
    // Ops that take the rows in input 0 and parameters in the rest.
    auto first_only = [&]() {
      if (!in_rows(0)) return false;
      for (std::size_t i = 1; i < n.inputs.size(); ++i) {
        if (in_rows(i)) return false;
      }
      return true;
    };
    bool keeps = false;
    switch (n.op) {
      case OpKind::AllReduce:
      case OpKind::AllGather:
      case OpKind::StateWrite:
        break;  // rank_dependence() refused them
      case OpKind::Embedding:
        keeps = first_only();
        break;
      case OpKind::Slice:
        keeps = first_only() && int_attr("dim", in_shape(0).rank()) != 0;
        break;
      case OpKind::Full:
      case OpKind::Arange:
        keeps = true;  // no inputs: free
        break;
      case OpKind::Linear:
        keeps = first_only() && in_shape(0).rank() >= 2;
        break;
      case OpKind::Matmul: {
        const Shape &a = in_shape(0), &b = in_shape(1);
        // a's dim 0 is a batch dim of the product or, at rank 2, its M dim; b's dim 0 is K at
        // rank 2 (the contraction), so b can carry the rows only as a batch dim.
        const bool a_ok = in_rows(0) ? a.rank() == r : !(a.rank() == r && r >= 3 && a[0] != 1);
        const bool b_ok = in_rows(1) ? b.rank() == r && r >= 3 : !(b.rank() == r && r >= 3 && b[0] != 1);
        keeps = a_ok && b_ok;
        break;
      }
      case OpKind::Conv2d:
      case OpKind::Conv2dGlobalAvgPool:
      case OpKind::ConvPatchMean:
      case OpKind::AdaptiveAvgPool2d:
      case OpKind::MaxPool2d:
        keeps = first_only() && in_shape(0).rank() == 4;
        break;
      case OpKind::LayerNorm:
      case OpKind::RmsNorm:
        keeps = first_only() &&
                static_cast<std::size_t>(in_shape(0).rank()) > n.attrs.ints("normalized_shape").size();
        break;
      case OpKind::Reshape:
        keeps = r >= 1 && out.shape[0] == batch;  // row-major: each row's elements stay in the row
        break;
      case OpKind::Permute: {
        const auto& dims = n.attrs.ints("dims");
        keeps = !dims.empty() && front_dim(dims[0], r) == 0;
        break;
      }
      case OpKind::Concat:
        keeps = broadcast_ok() && int_attr("dim", r) != 0;
        for (std::size_t i = 0; i < n.inputs.size(); ++i) keeps = keeps && in_rows(i);
        break;
      case OpKind::Add:
      case OpKind::Mul:
      case OpKind::Sub:
      case OpKind::Div:
      case OpKind::Where:
      case OpKind::MaskedFill:
      case OpKind::Gelu:
      case OpKind::Silu:
      case OpKind::Relu:
      case OpKind::Exp:
      case OpKind::Tanh:
      case OpKind::Sigmoid:
      case OpKind::Neg:
      case OpKind::AddScalar:
      case OpKind::MulScalar:
        keeps = broadcast_ok();
        break;
      case OpKind::Softmax:
        keeps = broadcast_ok() && int_attr("dim", r) != 0;
        break;
      case OpKind::Sum:
      case OpKind::Mean: {
        const auto& dims = n.attrs.ints("dims");
        const int rank = in_shape(0).rank();
        keeps = !dims.empty();
        for (std::int64_t d : dims) keeps = keeps && front_dim(d, rank) != 0;
        break;
      }
      case OpKind::ArgMax:
        keeps = int_attr("dim", in_shape(0).rank()) != 0;
        break;
      case OpKind::IndexSelect:
        keeps = first_only() && int_attr("dim", in_shape(0).rank()) != 0;
        break;
      case OpKind::Gather:
        keeps = broadcast_ok() && int_attr("dim", r) != 0;
        break;
      case OpKind::ScaledDotProductAttention:
        keeps = broadcast_ok() && r >= 3;
        break;
      case OpKind::RotaryEmbedding:
      case OpKind::MaskedAttention:
      case OpKind::Sample:
        keeps = leading_ok() && in_shape(0).rank() >= (n.op == OpKind::Sample ? 2 : 3);
        break;
    }
    if (!any_rows) continue;  // free in, free out
    if (!keeps || r < 1 || out.shape[0] != batch) return where + " mixes the batch rows";
    for (int o : n.outputs) rows[static_cast<std::size_t>(o)] = true;
  }
  for (std::size_t i = 0; i < g.outputs.size(); ++i) {
    if (!rows[static_cast<std::size_t>(g.outputs[i])]) {
      return "output " + std::to_string(i) + " does not keep the batch rows apart";
    }
  }
  return "";
}

}  // namespace devpipe
