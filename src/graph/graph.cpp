#include <array>
#include <sstream>

#include "devpipe/error.h"
#include "devpipe/graph.h"
#include "graph/op_def.h"

namespace devpipe {

namespace {
const std::array<const OpDef*, kNumOpKinds>& table() {
  static const std::array<const OpDef*, kNumOpKinds> t = [] {
    std::array<const OpDef*, kNumOpKinds> a{};
    for (const OpDef* d :
         {&ops::kLinear, &ops::kMatmul, &ops::kConv2d, &ops::kAdaptiveAvgPool2d, &ops::kMaxPool2d,
          &ops::kEmbedding, &ops::kLayerNorm, &ops::kRmsNorm, &ops::kReshape, &ops::kPermute,
          &ops::kConcat, &ops::kSlice, &ops::kAdd, &ops::kMul, &ops::kSoftmax, &ops::kGelu,
          &ops::kSilu, &ops::kRelu, &ops::kAllReduce, &ops::kAllGather, &ops::kSub, &ops::kDiv,
          &ops::kExp, &ops::kTanh, &ops::kSigmoid, &ops::kNeg, &ops::kAddScalar,
          &ops::kMulScalar, &ops::kFull, &ops::kArange, &ops::kSum, &ops::kMean, &ops::kArgMax,
          &ops::kIndexSelect, &ops::kGather, &ops::kWhere, &ops::kMaskedFill,
          &ops::kRotaryEmbedding, &ops::kScaledDotProductAttention, &ops::kMaskedAttention,
          &ops::kStateWrite, &ops::kSample, &ops::kConv2dGlobalAvgPool,
          &ops::kConvPatchMean}) {
      a[static_cast<std::size_t>(d->op)] = d;
    }
    return a;
  }();
  return t;
}
}  // namespace

const OpDef& op_def(OpKind op) { return *table()[static_cast<std::size_t>(op)]; }

std::string_view op_name(OpKind op) { return op_def(op).name; }

OpKind op_from_name(std::string_view name) {
  for (const OpDef* d : table()) {
    if (d->name == name) return d->op;
  }
  throw FormatError("unknown op '" + std::string(name) + "'");
}

std::vector<ValueInfo> infer_op(OpKind op, const std::vector<ValueInfo>& inputs,
                                const Attrs& attrs) {
  const OpDef& d = op_def(op);
  int n = static_cast<int>(inputs.size());
  if (n < d.min_inputs || (d.max_inputs >= 0 && n > d.max_inputs)) {
    throw InvalidArgument(std::string(d.name) + ": got " + std::to_string(n) +
                          " inputs, expected " + std::to_string(d.min_inputs) +
                          (d.max_inputs == d.min_inputs
                               ? std::string()
                               : " to " + (d.max_inputs < 0 ? std::string("any")
                                                            : std::to_string(d.max_inputs))));
  }
  return d.infer(inputs, attrs);
}

std::string shapes_to_string(const std::vector<ValueInfo>& infos) {
  std::string s;
  for (std::size_t i = 0; i < infos.size(); ++i) {
    if (i) s += ", ";
    s += infos[i].shape.to_string();
  }
  return s;
}

DType common_float_dtype(const char* op, const std::vector<ValueInfo>& infos) {
  DType d = DType::Float32;
  bool found = false;
  for (const auto& v : infos) {
    if (!is_floating(v.dtype)) continue;
    if (!found) {
      d = v.dtype;
      found = true;
    } else if (v.dtype != d) {
      throw DTypeError(std::string(op) + ": inputs mix dtypes " + std::string(dtype_name(d)) +
                       " and " + std::string(dtype_name(v.dtype)));
    }
  }
  return d;
}

Shape broadcast_shapes(const char* op, const Shape& a, const Shape& b) {
  int r = std::max(a.rank(), b.rank());
  std::vector<std::int64_t> out(static_cast<std::size_t>(r));
  for (int i = 0; i < r; ++i) {
    int ia = a.rank() - r + i, ib = b.rank() - r + i;
    std::int64_t da = ia >= 0 ? a[ia] : 1, db = ib >= 0 ? b[ib] : 1;
    if (da != db && da != 1 && db != 1) {
      throw ShapeError(std::string(op) + ": shapes " + a.to_string() + " and " + b.to_string() +
                       " cannot be broadcast (dim " + std::to_string(i) + ": " +
                       std::to_string(da) + " vs " + std::to_string(db) + ")");
    }
    out[static_cast<std::size_t>(i)] = da == 1 ? db : da;
  }
  return Shape(out);
}

std::vector<std::int64_t> broadcast_index(const Shape& s, const Shape& os) {
  const int r = os.rank(), off = os.rank() - s.rank();
  std::vector<std::int64_t> map(static_cast<std::size_t>(os.numel()));
  std::vector<std::int64_t> idx(static_cast<std::size_t>(r));
  for (std::int64_t o = 0; o < os.numel(); ++o) {
    std::int64_t rem = o;
    for (int i = r - 1; i >= 0; --i) {
      idx[static_cast<std::size_t>(i)] = rem % os[static_cast<std::size_t>(i)];
      rem /= os[static_cast<std::size_t>(i)];
    }
    std::int64_t src = 0;
    for (int i = 0; i < s.rank(); ++i) {
      const std::int64_t d = s[static_cast<std::size_t>(i)];
      src = src * d + (d == 1 ? 0 : idx[static_cast<std::size_t>(off + i)]);
    }
    map[static_cast<std::size_t>(o)] = src;
  }
  return map;
}

std::int64_t checked_dim(const char* op, std::int64_t dim, const Shape& shape) {
  if (dim < 0 || dim >= shape.rank()) {
    throw ShapeError(std::string(op) + ": dim " + std::to_string(dim) + " out of range for " +
                     shape.to_string());
  }
  return dim;
}

DType dtype_attr(const char* op, const Attrs& attrs, const char* name) {
  const std::string& text = attrs.s(name);
  try {
    return dtype_from_name(text);
  } catch (const DTypeError&) {
    throw FormatError(std::string(op) + ": attribute '" + name + "' is '" + text +
                      "', not a dtype name");
  }
}

// ---- Attrs ----

namespace {
template <class T>
const T& get_attr(const std::map<std::string, AttrValue>& items, std::string_view name,
                  const char* type) {
  auto it = items.find(std::string(name));
  if (it == items.end()) throw FormatError("missing attribute '" + std::string(name) + "'");
  if (auto* p = std::get_if<T>(&it->second)) return *p;
  throw FormatError("attribute '" + std::string(name) + "' is not " + type);
}
}  // namespace

std::int64_t Attrs::i(std::string_view name) const {
  return get_attr<std::int64_t>(items_, name, "an integer");
}
std::int64_t Attrs::i(std::string_view name, std::int64_t fallback) const {
  return has(name) ? i(name) : fallback;
}
double Attrs::f(std::string_view name) const {
  auto it = items_.find(std::string(name));
  if (it != items_.end()) {
    if (auto* p = std::get_if<std::int64_t>(&it->second)) return static_cast<double>(*p);
  }
  return get_attr<double>(items_, name, "a number");
}
double Attrs::f(std::string_view name, double fallback) const {
  return has(name) ? f(name) : fallback;
}
const std::string& Attrs::s(std::string_view name) const {
  return get_attr<std::string>(items_, name, "a string");
}
std::string Attrs::s(std::string_view name, const std::string& fallback) const {
  return has(name) ? s(name) : fallback;
}
const std::vector<std::int64_t>& Attrs::ints(std::string_view name) const {
  return get_attr<std::vector<std::int64_t>>(items_, name, "an integer list");
}

std::string Attrs::to_string() const {
  std::ostringstream os;
  bool first = true;
  for (const auto& [k, v] : items_) {
    if (!first) os << ", ";
    first = false;
    os << k << "=";
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, std::vector<std::int64_t>>) {
            os << Shape(x).to_string();
          } else if constexpr (std::is_same_v<T, std::string>) {
            os << '"' << x << '"';
          } else {
            os << x;
          }
        },
        v);
  }
  return os.str();
}

// ---- Graph ----

std::string Graph::to_text() const {
  std::ostringstream os;
  auto v = [&](int id) {
    const auto& info = value(id);
    std::string s = "%";
    s += std::to_string(id);
    s += ':';
    s += dtype_name(info.dtype);
    s += info.shape.to_string();
    return s;
  };
  os << "graph(tp_degree=" << tp_degree << ")\n";
  for (const auto& in : inputs) {
    os << "  " << (in.is_state() ? "state  " : "input  ") << v(in.value) << " \"" << in.name << "\"\n";
  }
  for (const auto& p : params) {
    os << "  param  " << v(p.value) << " \"" << p.key << "\"";
    if (p.shard_dim >= 0) {
      os << " shard(dim=" << p.shard_dim << ", full=" << p.full_shape.to_string() << ")";
    }
    if (p.constant) os << " constant";
    os << "\n";
  }
  for (const auto& n : nodes) {
    os << "  ";
    for (std::size_t i = 0; i < n.outputs.size(); ++i) os << (i ? ", " : "") << v(n.outputs[i]);
    os << " = " << op_name(n.op) << "(";
    for (std::size_t i = 0; i < n.inputs.size(); ++i) {
      os << (i ? ", " : "") << "%" << n.inputs[i];
    }
    os << ")";
    if (!n.attrs.items().empty()) os << " {" << n.attrs.to_string() << "}";
    if (!n.scope.empty()) os << "  # " << n.scope;
    os << "\n";
  }
  os << "  return";
  for (std::size_t i = 0; i < outputs.size(); ++i) os << (i ? ", " : " ") << "%" << outputs[i];
  os << "\n";
  return os.str();
}

}  // namespace devpipe
