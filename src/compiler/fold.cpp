#include "compiler/fold.h"

#include <algorithm>
#include <map>
#include <optional>
#include <set>

#include "compiler/graph_edit.h"
#include "devpipe/error.h"

namespace devpipe {

namespace {

using I64s = std::vector<std::int64_t>;

class Folder {
 public:
  Folder(Graph& g, const ParamValueFn& value_of) : g_(g), value_of_(value_of) {}

  /// The index of the replicated parameter whose value `v` is, or -1.
  int replicated_param(int v) const {
    for (std::size_t i = 0; i < g_.params.size(); ++i) {
      if (g_.params[i].value == v) return g_.params[i].shard_dim == -1 ? static_cast<int>(i) : -1;
    }
    return -1;
  }

  /// Parameter i's value in double.
  std::vector<double> values(int i) {
    const GraphParam& p = g_.params[static_cast<std::size_t>(i)];
    Tensor t = p.constant ? g_.constants.at(p.key) : value_of_(p);
    if (t.shape() != p.full_shape) {
      throw ShapeError("fold_linear_chains: parameter '" + p.key + "' has shape " + t.shape().to_string() +
                       " but the graph declares " + p.full_shape.to_string());
    }
    std::vector<float> f = t.to_float_vector();
    return {f.begin(), f.end()};
  }

  /// A new constant parameter `key` of `shape` (dtype `dt`) holding `v`; returns its value id.
  int add_constant(const std::string& key, const Shape& shape, DType dt, const std::vector<double>& v) {
    if (g_.constants.count(key)) throw Error("fold_linear_chains: parameter '" + key + "' exists already");
    const int id = g_.add_value({shape, dt});
    g_.params.push_back({id, key, shape, -1, true});
    g_.constants[key] = Tensor::from_vector(std::vector<float>(v.begin(), v.end()), shape, dt);
    return id;
  }

  /// Conv2d + AdaptiveAvgPool2d((1, 1)) -> conv_patch_mean, Linear, Reshape. Returns how many.
  int patch_means() {
    ValueUses uses(g_);
    std::map<std::size_t, std::vector<Node>> replace;  // pool node index -> its replacement
    std::vector<bool> removed(g_.nodes.size(), false);
    int count = 0;
    for (std::size_t i = 0; i < g_.nodes.size(); ++i) {
      const Node& pool = g_.nodes[i];
      if (pool.op != OpKind::AdaptiveAvgPool2d || pool.attrs.ints("output_size") != I64s{1, 1}) continue;
      const int c = pool.inputs[0];
      const int pc = uses.producer_of(c);
      if (pc < 0 || uses.readers_of(c) != 1) continue;
      const Node& conv = g_.nodes[static_cast<std::size_t>(pc)];
      if (conv.op != OpKind::Conv2d || conv.attrs.i("groups") != 1) continue;
      const int wp = replicated_param(conv.inputs[1]);
      if (wp < 0) continue;
      // Copies: adding values below may move the graph's value table.
      const ValueInfo xi = g_.value(conv.inputs[0]);
      const ValueInfo wi = g_.value(conv.inputs[1]);
      const ValueInfo out = g_.value(pool.outputs[0]);
      if (xi.dtype != out.dtype || wi.dtype != out.dtype) continue;
      const std::int64_t n = xi.shape[0], o = wi.shape[0], taps = wi.shape[1] * wi.shape[2] * wi.shape[3];

      const std::string key = "folded:" + g_.params[static_cast<std::size_t>(wp)].key;
      const int w2 = add_constant(key, Shape{o, taps}, wi.dtype, values(wp));
      Node pm;
      pm.op = OpKind::ConvPatchMean;
      pm.inputs = {conv.inputs[0]};
      pm.attrs.set("kernel_size", I64s{wi.shape[2], wi.shape[3]})
          .set("stride", conv.attrs.ints("stride"))
          .set("padding", conv.attrs.ints("padding"))
          .set("dilation", conv.attrs.ints("dilation"));
      pm.scope = conv.scope;
      pm.outputs = {g_.add_value({Shape{n, taps}, xi.dtype})};
      Node lin;
      lin.op = OpKind::Linear;
      lin.inputs = {pm.outputs[0], w2};
      if (conv.inputs.size() == 3) lin.inputs.push_back(conv.inputs[2]);
      lin.attrs.set("activation", std::string("none"));
      lin.scope = conv.scope;
      lin.outputs = {g_.add_value({Shape{n, o}, out.dtype})};
      Node rs;
      rs.op = OpKind::Reshape;
      rs.inputs = {lin.outputs[0]};
      rs.attrs.set("shape", I64s{n, o, 1, 1});
      rs.scope = pool.scope;
      rs.outputs = pool.outputs;
      removed[static_cast<std::size_t>(pc)] = true;
      replace[i] = {std::move(pm), std::move(lin), std::move(rs)};
      ++count;
    }
    if (count == 0) return 0;
    std::vector<Node> nodes;
    for (std::size_t i = 0; i < g_.nodes.size(); ++i) {
      if (removed[i]) continue;
      auto r = replace.find(i);
      if (r == replace.end()) {
        nodes.push_back(std::move(g_.nodes[i]));
      } else {
        for (Node& nn : r->second) nodes.push_back(std::move(nn));
      }
    }
    g_.nodes = std::move(nodes);
    return count;
  }

  /// One Linear -> (reshapes ->) Linear pair folded, if there is one.
  bool linear_pair() {
    ValueUses uses(g_);
    for (std::size_t i = 0; i < g_.nodes.size(); ++i) {
      const Node& l2 = g_.nodes[i];
      if (l2.op != OpKind::Linear) continue;
      // Back through reshapes with one reader each to the value they started from.
      std::vector<int> chain;
      int v = l2.inputs[0];
      while (uses.producer_of(v) >= 0 && uses.readers_of(v) == 1 &&
             g_.nodes[static_cast<std::size_t>(uses.producer_of(v))].op == OpKind::Reshape) {
        chain.push_back(uses.producer_of(v));
        v = g_.nodes[static_cast<std::size_t>(chain.back())].inputs[0];
      }
      const int p1 = uses.producer_of(v);
      if (p1 < 0 || uses.readers_of(v) != 1) continue;
      const Node& l1 = g_.nodes[static_cast<std::size_t>(p1)];
      if (l1.op != OpKind::Linear || l1.attrs.s("activation", "none") != "none") continue;
      if (g_.value(l2.inputs[0]).shape != g_.value(v).shape) continue;  // the reshapes undo each other
      const int w1 = replicated_param(l1.inputs[1]), w2 = replicated_param(l2.inputs[1]);
      if (w1 < 0 || w2 < 0) continue;
      const int b1 = l1.inputs.size() == 3 ? replicated_param(l1.inputs[2]) : -1;
      const int b2 = l2.inputs.size() == 3 ? replicated_param(l2.inputs[2]) : -1;
      if ((l1.inputs.size() == 3 && b1 < 0) || (l2.inputs.size() == 3 && b2 < 0)) continue;
      const ValueInfo w1i = g_.value(l1.inputs[1]);  // copies: values are added below
      const ValueInfo w2i = g_.value(l2.inputs[1]);
      const DType dt = g_.value(l2.outputs[0]).dtype;
      if (w1i.dtype != dt || w2i.dtype != dt || g_.value(l1.inputs[0]).dtype != dt) continue;
      const std::int64_t n1 = w1i.shape[0], k1 = w1i.shape[1], n2 = w2i.shape[0];
      if (k1 * n2 > k1 * n1 + n1 * n2) continue;  // folding would cost more multiply-adds

      const std::vector<double> a = values(w1), b = values(w2);
      std::vector<double> w(static_cast<std::size_t>(n2 * k1), 0.0);
      for (std::int64_t r = 0; r < n2; ++r) {
        for (std::int64_t m = 0; m < n1; ++m) {
          const double brm = b[static_cast<std::size_t>(r * n1 + m)];
          const double* am = a.data() + m * k1;
          double* wr = w.data() + r * k1;
          for (std::int64_t k = 0; k < k1; ++k) wr[k] += brm * am[k];
        }
      }
      Node l = l2;  // keeps the second Linear's activation, scope and output
      l.inputs = {l1.inputs[0], add_constant("folded:" + g_.params[static_cast<std::size_t>(w2)].key,
                                             Shape{n2, k1}, dt, w)};
      if (b1 >= 0 || b2 >= 0) {
        std::vector<double> bias(static_cast<std::size_t>(n2), 0.0);
        if (b2 >= 0) bias = values(b2);
        if (b1 >= 0) {
          const std::vector<double> c = values(b1);
          for (std::int64_t r = 0; r < n2; ++r) {
            for (std::int64_t m = 0; m < n1; ++m) bias[static_cast<std::size_t>(r)] += b[static_cast<std::size_t>(r * n1 + m)] * c[static_cast<std::size_t>(m)];
          }
        }
        const std::string bkey = b2 >= 0 ? g_.params[static_cast<std::size_t>(b2)].key
                                         : g_.params[static_cast<std::size_t>(w2)].key + ":bias";
        l.inputs.push_back(add_constant("folded:" + bkey, Shape{n2}, dt, bias));
      }
      std::vector<bool> removed(g_.nodes.size(), false);
      removed[static_cast<std::size_t>(p1)] = true;
      for (int r : chain) removed[static_cast<std::size_t>(r)] = true;
      g_.nodes[i] = std::move(l);
      erase_nodes(g_, removed, 1 + static_cast<int>(chain.size()));
      return true;
    }
    return false;
  }

  /// Drops the parameters no node reads (and their constants).
  void drop_unread_params() {
    ValueUses uses(g_);
    std::vector<GraphParam> kept;
    for (GraphParam& p : g_.params) {
      if (uses.readers_of(p.value) > 0) {
        kept.push_back(std::move(p));
      } else if (p.constant) {
        g_.constants.erase(p.key);
      }
    }
    g_.params = std::move(kept);
  }

 private:
  Graph& g_;
  const ParamValueFn& value_of_;
};

}  // namespace

FoldCounts fold_linear_chains(Graph& graph, const ParamValueFn& value_of, bool patch_means) {
  Folder f(graph, value_of);
  FoldCounts counts;
  if (patch_means) counts.patch_means = f.patch_means();
  while (f.linear_pair()) ++counts.linear_pairs;
  if (counts.total() > 0) f.drop_unread_params();
  return counts;
}

}  // namespace devpipe
