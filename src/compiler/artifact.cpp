#include "compiler/artifact.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "devpipe/error.h"
#include "graph/op_def.h"

#ifndef DEVPIPE_VERSION
#define DEVPIPE_VERSION "0.0.0"
#endif

namespace devpipe {

using nlohmann::json;

const char* devpipe_version() { return DEVPIPE_VERSION; }

namespace {

json attrs_to_json(const Attrs& attrs) {
  json j = json::object();
  for (const auto& [k, v] : attrs.items()) {
    std::visit(
        [&](const auto& x) {
          using T = std::decay_t<decltype(x)>;
          if constexpr (std::is_same_v<T, double>) {
            // Tagged so that 1.0 stays a float; JSON has no inf/nan, so those are spelled.
            if (std::isfinite(x)) {
              j[k] = {{"f", x}};
            } else {
              j[k] = {{"f", std::isnan(x) ? "nan" : (x > 0 ? "inf" : "-inf")}};
            }
          } else {
            j[k] = x;
          }
        },
        v);
  }
  return j;
}

Attrs attrs_from_json(const json& j) {
  Attrs a;
  for (const auto& [k, v] : j.items()) {
    if (v.is_object()) {
      const json& f = v.at("f");
      if (f.is_string()) {
        const std::string t = f.get<std::string>();
        if (t != "inf" && t != "-inf" && t != "nan") {
          throw FormatError("attribute '" + k + "' has an unknown float spelling '" + t + "'");
        }
        a.set(k, t == "nan" ? std::numeric_limits<double>::quiet_NaN()
                            : (t == "inf" ? 1.0 : -1.0) * std::numeric_limits<double>::infinity());
      } else {
        a.set(k, f.get<double>());
      }
    } else if (v.is_number_integer()) {
      a.set(k, v.get<std::int64_t>());
    } else if (v.is_string()) {
      a.set(k, v.get<std::string>());
    } else if (v.is_array()) {
      a.set(k, v.get<std::vector<std::int64_t>>());
    } else {
      throw FormatError("attribute '" + k + "' has an unsupported JSON value " + v.dump());
    }
  }
  return a;
}

json graph_json(const Graph& g) {
  json values = json::array();
  for (const auto& v : g.values) values.push_back({v.shape.dims(), std::string(dtype_name(v.dtype))});
  json nodes = json::array();
  for (const auto& n : g.nodes) {
    json jn = {{"op", std::string(op_name(n.op))}, {"in", n.inputs}, {"out", n.outputs},
               {"attrs", attrs_to_json(n.attrs)}};
    if (!n.scope.empty()) jn["scope"] = n.scope;
    nodes.push_back(std::move(jn));
  }
  json inputs = json::array();
  for (const auto& i : g.inputs) {
    json ji = {{"value", i.value}, {"name", i.name}};
    if (i.is_state()) ji["kind"] = "state";
    inputs.push_back(std::move(ji));
  }
  json params = json::array();
  for (const auto& p : g.params) {
    json jp = {{"value", p.value}, {"key", p.key}, {"full_shape", p.full_shape.dims()},
               {"shard_dim", p.shard_dim}};
    if (p.constant) jp["constant"] = true;
    params.push_back(std::move(jp));
  }
  return {{"tp_degree", g.tp_degree}, {"values", values},   {"nodes", nodes},
          {"inputs", inputs},         {"params", params},   {"outputs", g.outputs}};
}

Graph graph_from(const json& j) {
  Graph g;
  g.tp_degree = j.at("tp_degree").get<int>();
  for (const auto& v : j.at("values")) {
    g.values.push_back({Shape(v.at(0).get<std::vector<std::int64_t>>()),
                        dtype_from_name(v.at(1).get<std::string>())});
  }
  auto check_id = [&](int id, const char* what) {
    if (id < 0 || id >= static_cast<int>(g.values.size())) {
      throw FormatError(std::string("graph ") + what + " refers to value %" + std::to_string(id) +
                        ", but the graph has " + std::to_string(g.values.size()) + " values");
    }
    return id;
  };
  for (const auto& jn : j.at("nodes")) {
    Node n;
    n.op = op_from_name(jn.at("op").get<std::string>());
    for (int id : jn.at("in").get<std::vector<int>>()) n.inputs.push_back(check_id(id, "node input"));
    for (int id : jn.at("out").get<std::vector<int>>()) n.outputs.push_back(check_id(id, "node output"));
    n.attrs = attrs_from_json(jn.at("attrs"));
    n.scope = jn.value("scope", std::string());
    g.nodes.push_back(std::move(n));
  }
  for (const auto& ji : j.at("inputs")) {
    const std::string kind = ji.value("kind", std::string("data"));
    if (kind != "data" && kind != "state") throw FormatError("graph input kind '" + kind + "' is not data or state");
    g.inputs.push_back({check_id(ji.at("value").get<int>(), "input"), ji.at("name").get<std::string>(),
                        kind == "state" ? GraphInput::Kind::State : GraphInput::Kind::Data});
  }
  for (const auto& jp : j.at("params")) {
    g.params.push_back({check_id(jp.at("value").get<int>(), "param"), jp.at("key").get<std::string>(),
                        Shape(jp.at("full_shape").get<std::vector<std::int64_t>>()),
                        jp.at("shard_dim").get<int>(), jp.value("constant", false)});
  }
  for (int id : j.at("outputs").get<std::vector<int>>()) g.outputs.push_back(check_id(id, "output"));
  return g;
}

json io_json(const std::vector<StageIO>& ios) {
  json a = json::array();
  for (const auto& io : ios) {
    json j = {{"name", io.name}, {"sample_shape", io.sample_shape.dims()},
              {"dtype", std::string(dtype_name(io.dtype))}};
    if (io.has_named_dims()) j["dims"] = io.dims;
    a.push_back(std::move(j));
  }
  return a;
}

std::vector<StageIO> io_from(const json& a) {
  std::vector<StageIO> out;
  for (const auto& j : a) {
    StageIO io{j.at("name").get<std::string>(), Shape(j.at("sample_shape").get<std::vector<std::int64_t>>()),
               dtype_from_name(j.at("dtype").get<std::string>()),
               j.value("dims", std::vector<std::string>{})};
    if (!io.dims.empty() && io.dims.size() != io.sample_shape.dims().size()) {
      throw FormatError("stage io '" + io.name + "' names " + std::to_string(io.dims.size()) + " dims for a sample shape " +
                        io.sample_shape.to_string());
    }
    for (std::size_t k = 0; k < io.sample_shape.dims().size(); ++k) {
      const bool named = k < io.dims.size() && !io.dims[k].empty();
      if (named != (io.sample_shape[k] == -1) || (!named && io.sample_shape[k] < 0)) {
        throw FormatError("stage io '" + io.name + "': sample dim " + std::to_string(k + 1) + " is " +
                          std::to_string(io.sample_shape[k]) + (named ? " but named '" + io.dims[k] + "'" : std::string()));
      }
    }
    out.push_back(std::move(io));
  }
  return out;
}

void write_file_atomic(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) throw IoError("cannot write '" + tmp + "': " + std::strerror(errno));
    f << text;
    f.flush();
    if (!f) throw IoError("failed writing '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    throw IoError("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
  }
}

}  // namespace

std::string graph_to_json(const Graph& graph) { return graph_json(graph).dump(); }

Shape bucket_shape(const StageIO& io, const ArtifactBucket& bucket) {
  std::vector<std::int64_t> d{bucket.batch};
  for (std::size_t k = 0; k < io.sample_shape.dims().size(); ++k) {
    if (k < io.dims.size() && !io.dims[k].empty()) {
      auto it = bucket.dims.find(io.dims[k]);
      d.push_back(it == bucket.dims.end() ? -1 : it->second);
    } else {
      d.push_back(io.sample_shape[k]);
    }
  }
  return Shape(std::move(d));
}

std::string bucket_text(std::int64_t batch, const std::map<std::string, std::int64_t>& dims) {
  if (dims.empty()) return std::to_string(batch);
  std::string s = "batch " + std::to_string(batch);
  for (const auto& [name, size] : dims) s += ", " + name + " " + std::to_string(size);
  return s;
}

Graph graph_from_json(const std::string& text) {
  try {
    return graph_from(json::parse(text));
  } catch (const json::exception& e) {
    throw FormatError(std::string("graph JSON: ") + e.what());
  }
}

void write_manifest(const std::string& dir, const Manifest& m) {
  json buckets = json::array();
  for (const auto& b : m.buckets) {
    json jb = {{"batch", b.batch}, {"graph", graph_json(b.graph)}};
    if (!b.dims.empty()) jb["dims"] = b.dims;
    buckets.push_back(std::move(jb));
  }
  json states = json::array();
  for (const auto& st : m.states) {
    states.push_back({{"name", st.name}, {"shape", st.shape.dims()}, {"dtype", std::string(dtype_name(st.dtype))}});
  }
  json weights = json::array();
  for (const auto& w : m.weights) {
    weights.push_back({{"rank", w.rank}, {"file", w.file}, {"checksum", w.checksum}, {"bytes", w.bytes}});
  }
  json j = {{"format", "devpipe-artifact"},
            {"format_version", m.format_version},
            {"devpipe_version", m.devpipe_version},
            {"tag", m.tag},
            {"dtype", std::string(dtype_name(m.dtype))},
            {"tp_degree", m.tp_degree},
            {"pipeline_execution", m.pipeline_execution},
            {"return_ranked_to_cpu", m.return_ranked_to_cpu},
            {"config", json::parse(m.config_json.empty() ? "{}" : m.config_json)},
            {"inputs", io_json(m.inputs)},
            {"outputs", io_json(m.outputs)},
            {"states", states},
            {"buckets", buckets},
            {"weights", weights}};
  write_file_atomic((std::filesystem::path(dir) / "manifest.json").string(), j.dump(1) + "\n");
}

Manifest read_manifest(const std::string& dir) {
  std::string path = (std::filesystem::path(dir) / "manifest.json").string();
  std::ifstream f(path);
  if (!f) {
    throw IoError("no compiled artifact at '" + dir + "': cannot open " + path +
                  " (run compile() first)");
  }
  std::stringstream ss;
  ss << f.rdbuf();
  json j;
  try {
    j = json::parse(ss.str());
  } catch (const json::exception& e) {
    throw FormatError(path + " is not valid JSON: " + e.what());
  }
  Manifest m;
  try {
    if (j.value("format", std::string()) != "devpipe-artifact") {
      throw FormatError(path + " is not a devpipe artifact manifest (missing \"format\": \"devpipe-artifact\")");
    }
    m.format_version = j.at("format_version").get<int>();
    m.devpipe_version = j.value("devpipe_version", std::string("?"));
    if (m.format_version != kArtifactFormatVersion) {
      throw ArtifactMismatch("artifact at '" + dir + "' has format version " +
                             std::to_string(m.format_version) + " (written by devpipe " +
                             m.devpipe_version + "); this devpipe " + devpipe_version() +
                             " reads format version " + std::to_string(kArtifactFormatVersion) +
                             ": recompile the model with compile()");
    }
    m.tag = j.at("tag").get<std::string>();
    m.dtype = dtype_from_name(j.at("dtype").get<std::string>());
    m.tp_degree = j.at("tp_degree").get<int>();
    m.pipeline_execution = j.value("pipeline_execution", false);
    m.return_ranked_to_cpu = j.value("return_ranked_to_cpu", true);
    m.config_json = j.at("config").dump();
    m.inputs = io_from(j.at("inputs"));
    m.outputs = io_from(j.at("outputs"));
    for (const auto& st : j.value("states", json::array())) {
      m.states.push_back({st.at("name").get<std::string>(), Shape(st.at("shape").get<std::vector<std::int64_t>>()),
                          dtype_from_name(st.at("dtype").get<std::string>())});
    }
    for (const auto& b : j.at("buckets")) {
      m.buckets.push_back({b.at("batch").get<std::int64_t>(),
                           b.value("dims", std::map<std::string, std::int64_t>{}), graph_from(b.at("graph"))});
    }
    for (const auto& w : j.at("weights")) {
      m.weights.push_back({w.at("rank").get<int>(), w.at("file").get<std::string>(),
                           w.at("checksum").get<std::string>(), w.at("bytes").get<std::uint64_t>()});
    }
  } catch (const json::exception& e) {
    throw FormatError(path + ": missing or mistyped field: " + e.what());
  } catch (const DTypeError& e) {
    throw FormatError(path + ": " + e.what());
  }
  if (m.buckets.empty()) throw FormatError(path + ": no buckets");
  if (static_cast<int>(m.weights.size()) != m.tp_degree) {
    throw FormatError(path + ": lists " + std::to_string(m.weights.size()) +
                      " weight files for tp_degree " + std::to_string(m.tp_degree));
  }
  for (const auto& b : m.buckets) {
    validate_stage_graph(b.graph, b, m, path + ", bucket " + bucket_text(b.batch, b.dims));
  }
  return m;
}

void validate_stage_graph(const Graph& g, const ArtifactBucket& bucket, const Manifest& m,
                          const std::string& where) {
  auto fail = [&](const std::string& what) { throw FormatError(where + ": " + what); };
  if (g.tp_degree != m.tp_degree) {
    fail("graph tp_degree " + std::to_string(g.tp_degree) + " differs from the manifest's " +
         std::to_string(m.tp_degree));
  }
  // Every value defined once before it is read; every node's recorded outputs are what its op
  // infers from its inputs (kernels trust these shapes, so a tampered file must not pass).
  std::vector<bool> defined(g.values.size(), false);
  for (const auto& in : g.inputs) defined[static_cast<std::size_t>(in.value)] = true;
  for (const auto& p : g.params) defined[static_cast<std::size_t>(p.value)] = true;
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    std::string node = "node " + std::to_string(i) + " (" + std::string(op_name(n.op)) + ")";
    std::vector<ValueInfo> ins;
    for (int v : n.inputs) {
      if (!defined[static_cast<std::size_t>(v)]) fail(node + " reads %" + std::to_string(v) + " before it is defined");
      ins.push_back(g.value(v));
    }
    std::vector<ValueInfo> outs;
    try {
      outs = infer_op(n.op, ins, n.attrs);
    } catch (const Error& e) {
      fail(node + " is inconsistent: " + e.what());
    }
    if (outs.size() != n.outputs.size()) fail(node + " records " + std::to_string(n.outputs.size()) + " outputs");
    for (std::size_t k = 0; k < outs.size(); ++k) {
      int v = n.outputs[k];
      if (defined[static_cast<std::size_t>(v)]) fail(node + " redefines %" + std::to_string(v));
      defined[static_cast<std::size_t>(v)] = true;
      if (!(outs[k] == g.value(v))) {
        fail(node + " output %" + std::to_string(v) + " is recorded as " + g.value(v).shape.to_string() + " " +
             std::string(dtype_name(g.value(v).dtype)) + " but the op gives " + outs[k].shape.to_string() + " " +
             std::string(dtype_name(outs[k].dtype)));
      }
    }
  }
  for (int v : g.outputs) {
    if (!defined[static_cast<std::size_t>(v)]) fail("graph output %" + std::to_string(v) + " is never defined");
  }
  // The stage's specs: batch x sample shape for every input and output, in order.
  auto check_io = [&](const char* kind, const std::vector<StageIO>& specs, const std::vector<int>& ids) {
    if (specs.size() != ids.size()) {
      fail(std::string("the manifest lists ") + std::to_string(specs.size()) + " " + kind + "s, the graph has " +
           std::to_string(ids.size()));
    }
    for (std::size_t k = 0; k < ids.size(); ++k) {
      ValueInfo want{bucket_shape(specs[k], bucket), specs[k].dtype};
      if (!(g.value(ids[k]) == want)) {
        fail(std::string(kind) + " " + std::to_string(k) + " is " + g.value(ids[k]).shape.to_string() +
             " in the graph but " + want.shape.to_string() + " in the manifest's specs");
      }
    }
  };
  std::vector<int> in_ids;
  std::vector<const GraphInput*> states;
  for (const auto& in : g.inputs) {
    if (in.is_state()) {
      states.push_back(&in);
    } else {
      if (!states.empty()) fail("data input '" + in.name + "' comes after state '" + states.back()->name + "'");
      in_ids.push_back(in.value);
    }
  }
  check_io("input", m.inputs, in_ids);
  if (states.size() != m.states.size()) {
    fail("the manifest lists " + std::to_string(m.states.size()) + " states, the graph has " +
         std::to_string(states.size()));
  }
  for (std::size_t k = 0; k < states.size(); ++k) {
    const StateSpec& spec = m.states[k];
    const ValueInfo& info = g.value(states[k]->value);
    if (states[k]->name != spec.name || info.shape != spec.shape || info.dtype != spec.dtype) {
      fail("state " + std::to_string(k) + " is '" + states[k]->name + "' " + info.shape.to_string() + " " +
           std::string(dtype_name(info.dtype)) + " in the graph but '" + spec.name + "' " + spec.shape.to_string() +
           " " + std::string(dtype_name(spec.dtype)) + " in the manifest's state specs");
    }
  }
  check_io("output", m.outputs, g.outputs);
  for (const auto& p : g.params) {
    if (p.shard_dim >= p.full_shape.rank()) fail("parameter '" + p.key + "' has shard_dim out of range");
    if (p.constant && p.shard_dim >= 0) fail("constant '" + p.key + "' is marked sharded");
  }
}

std::string file_checksum(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw IoError("cannot open '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw IoError("cannot stat '" + path + "': " + std::strerror(errno));
  }
  std::size_t n = static_cast<std::size_t>(st.st_size);
  std::uint64_t h = 0xcbf29ce484222325ull ^ n;
  if (n > 0) {
    void* p = ::mmap(nullptr, n, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw IoError("cannot map '" + path + "': " + std::strerror(errno));
    }
    const auto* b = static_cast<const unsigned char*>(p);
    // Four independent 64-bit lanes (FNV-style multiply-xor on 8-byte words), then folded.
    std::uint64_t lane[4] = {h, h ^ 0x9e3779b97f4a7c15ull, h ^ 0xbf58476d1ce4e5b9ull, h ^ 0x94d049bb133111ebull};
    std::size_t i = 0;
    for (; i + 32 <= n; i += 32) {
      for (int k = 0; k < 4; ++k) {
        std::uint64_t w;
        std::memcpy(&w, b + i + 8 * k, 8);
        lane[k] = (lane[k] ^ w) * 0x100000001b3ull;
      }
    }
    for (; i < n; ++i) lane[0] = (lane[0] ^ b[i]) * 0x100000001b3ull;
    h = lane[0];
    for (int k = 1; k < 4; ++k) h = (h ^ (lane[k] + (h << 6) + (h >> 2))) * 0x100000001b3ull;
    ::munmap(p, n);
  }
  ::close(fd);
  char buf[32];
  std::snprintf(buf, sizeof buf, "h64:%016llx", static_cast<unsigned long long>(h));
  return buf;
}

}  // namespace devpipe
