#include "compiler/artifact.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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
#include "devpipe/version.h"
#include "graph/op_def.h"
#include "io/json_int.h"

namespace devpipe {

namespace fs = std::filesystem;
using nlohmann::json;

const char* devpipe_version() { return version(); }

namespace {

json attrs_to_json(const Attrs& attrs) {
  json j = json::object();
  for (const auto& [name, v] : attrs.items()) {
    const std::string& k = name;  // a variable, not a structured binding: clang 14 cannot capture those
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

Attrs attrs_from_json(const json& j, const std::string& where, const std::string& key) {
  Attrs a;
  for (const auto& [k, v] : j.items()) {
    if (v.is_object()) {
      const std::string t = v.contains("f") && v.at("f").is_string() ? v.at("f").get<std::string>() : "";
      if (v.size() == 1 && v.contains("f") && v.at("f").is_number()) {
        a.set(k, v.at("f").get<double>());
      } else if (t == "inf" || t == "-inf" || t == "nan") {
        a.set(k, t == "nan" ? std::numeric_limits<double>::quiet_NaN()
                            : (t == "inf" ? 1.0 : -1.0) * std::numeric_limits<double>::infinity());
      } else {
        throw FormatError(where + ": " + key + "." + k + " is " + v.dump() +
                          "; a float attribute is {\"f\": number}, or \"inf\", \"-inf\", \"nan\"");
      }
    } else if (v.is_number_integer()) {
      a.set(k, json_int::value<FormatError>(v, json_int::kMin, json_int::kMax, where, key + "." + k));
    } else if (v.is_string()) {
      a.set(k, v.get<std::string>());
    } else if (v.is_array()) {
      a.set(k, json_int::values<FormatError>(v, json_int::kMin, json_int::kMax, where, key + "." + k));
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

/// "<key>[<i>]".
std::string item(const std::string& key, std::size_t i) { return key + "[" + std::to_string(i) + "]"; }

/// A shape read from `v`: non-negative integer dims whose element count, and byte size in
/// `dtype`, fit an int64 (so that no size computed from it overflows). FormatError otherwise.
Shape shape_from(const json& v, DType dtype, const std::string& where, const std::string& key) {
  Shape s(json_int::values<FormatError>(v, 0, json_int::kMax, where, key));
  std::int64_t bytes = 0;
  bool fits = true;
  try {
    fits = !__builtin_mul_overflow(s.numel(), static_cast<std::int64_t>(dtype_size(dtype)), &bytes);
  } catch (const ShapeError&) {
    fits = false;
  }
  if (!fits) {
    throw FormatError(where + ": " + key + " is " + s.to_string() + " " + std::string(dtype_name(dtype)) +
                      ", whose size overflows (more than 2^63 bytes)");
  }
  return s;
}

Graph graph_from(const json& j, const std::string& where, const std::string& key) {
  Graph g;
  g.tp_degree = static_cast<int>(json_int::member<FormatError>(j, "tp_degree", 1, json_int::kIntMax, where, key + ".tp_degree"));
  std::int64_t total_bytes = 0;  // every value at once must fit an int64 too (memory plans add them up)
  for (const auto& v : j.at("values")) {
    std::string vk = item(key + ".values", g.values.size());
    DType dt = dtype_from_name(v.at(1).get<std::string>());
    Shape s = shape_from(v.at(0), dt, where, vk);
    if (__builtin_add_overflow(total_bytes, s.numel() * static_cast<std::int64_t>(dtype_size(dt)), &total_bytes)) {
      throw FormatError(where + ": " + key + ".values need more than 2^63 bytes in all (" + vk + " is " +
                        s.to_string() + ")");
    }
    g.values.push_back({std::move(s), dt});
  }
  auto check_id = [&](std::int64_t id, const std::string& k) {
    if (id < 0 || id >= static_cast<std::int64_t>(g.values.size())) {
      throw FormatError(where + ": " + k + " refers to value %" + std::to_string(id) + ", but the graph has " +
                        std::to_string(g.values.size()) + " values");
    }
    return static_cast<int>(id);
  };
  // A list of value ids, each checked.
  auto ids = [&](const json& a, const std::string& k) {
    std::vector<int> out;
    for (auto id : json_int::values<FormatError>(a, json_int::kMin, json_int::kMax, where, k)) {
      out.push_back(check_id(id, item(k, out.size())));
    }
    return out;
  };
  for (const auto& jn : j.at("nodes")) {
    std::string nk = item(key + ".nodes", g.nodes.size());
    Node n;
    n.op = op_from_name(jn.at("op").get<std::string>());
    n.inputs = ids(jn.at("in"), nk + ".in");
    n.outputs = ids(jn.at("out"), nk + ".out");
    n.attrs = attrs_from_json(jn.at("attrs"), where, nk + ".attrs");
    n.scope = jn.value("scope", std::string());
    g.nodes.push_back(std::move(n));
  }
  for (const auto& ji : j.at("inputs")) {
    std::string ik = item(key + ".inputs", g.inputs.size());
    const std::string kind = ji.value("kind", std::string("data"));
    if (kind != "data" && kind != "state") {
      throw FormatError(where + ": " + ik + ".kind is '" + kind + "', not data or state");
    }
    g.inputs.push_back({check_id(json_int::member<FormatError>(ji, "value", json_int::kMin, json_int::kMax, where, ik + ".value"), ik + ".value"),
                        ji.at("name").get<std::string>(),
                        kind == "state" ? GraphInput::Kind::State : GraphInput::Kind::Data});
  }
  for (const auto& jp : j.at("params")) {
    std::string pk = item(key + ".params", g.params.size());
    int value = check_id(json_int::member<FormatError>(jp, "value", json_int::kMin, json_int::kMax, where, pk + ".value"), pk + ".value");
    Shape full = shape_from(jp.at("full_shape"), g.values[static_cast<std::size_t>(value)].dtype, where, pk + ".full_shape");
    // -1: replicated; else the dim split over the ranks.
    auto shard_dim = json_int::member<FormatError>(jp, "shard_dim", -1, full.rank() - 1, where, pk + ".shard_dim");
    // A module buffer whose value the weight files hold (absent: false).
    bool constant = false;
    if (jp.contains("constant")) {
      if (!jp.at("constant").is_boolean()) {
        throw FormatError(where + ": " + pk + ".constant is " + jp.at("constant").dump() + ", not true or false");
      }
      constant = jp.at("constant").get<bool>();
    }
    g.params.push_back({value, jp.at("key").get<std::string>(), std::move(full), static_cast<int>(shard_dim), constant});
  }
  g.outputs = ids(j.at("outputs"), key + ".outputs");
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

std::vector<StageIO> io_from(const json& a, const std::string& where, const std::string& key) {
  std::vector<StageIO> out;
  for (const auto& j : a) {
    std::string k = item(key, out.size());
    DType dt = dtype_from_name(j.at("dtype").get<std::string>());
    std::vector<std::string> dims = j.value("dims", std::vector<std::string>{});
    // A named (bucketed) dim is -1 in sample_shape.
    Shape sample = dims.empty() ? shape_from(j.at("sample_shape"), dt, where, k + ".sample_shape")
                                : Shape(json_int::values<FormatError>(j.at("sample_shape"), -1, json_int::kMax, where,
                                                                      k + ".sample_shape"));
    StageIO io{j.at("name").get<std::string>(), std::move(sample), dt, std::move(dims)};
    if (!io.dims.empty() && io.dims.size() != io.sample_shape.dims().size()) {
      throw FormatError(where + ": " + k + " ('" + io.name + "') names " + std::to_string(io.dims.size()) +
                        " dims for a sample shape " + io.sample_shape.to_string());
    }
    for (std::size_t d = 0; d < io.sample_shape.dims().size(); ++d) {
      const bool named = d < io.dims.size() && !io.dims[d].empty();
      if (named != (io.sample_shape[d] == -1)) {
        throw FormatError(where + ": " + k + " ('" + io.name + "'): sample dim " + std::to_string(d + 1) + " is " +
                          std::to_string(io.sample_shape[d]) +
                          (named ? " but named '" + io.dims[d] + "'" : std::string(" (only a named dim is -1)")));
      }
    }
    out.push_back(std::move(io));
  }
  return out;
}

/// Closes a file descriptor when it goes out of scope.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

/// fsync of a folder, so that a rename in it is durable (best effort).
void sync_dir(const fs::path& dir) {
  Fd d{::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (d.fd >= 0) ::fsync(d.fd);
}

void write_file_atomic(const std::string& path, const std::string& text) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  auto fail = [&](const std::string& what) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw IoError(what + ": " + std::strerror(err));
  };
  {
    Fd f{::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)};
    if (f.fd < 0) throw IoError("cannot write '" + tmp + "': " + std::strerror(errno));
    for (std::size_t done = 0; done < text.size();) {
      ssize_t n = ::write(f.fd, text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) fail("failed writing '" + tmp + "'");
      done += static_cast<std::size_t>(n);
    }
    if (::fsync(f.fd) != 0) fail("failed writing '" + tmp + "' (fsync)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail("cannot rename '" + tmp + "' to '" + path + "'");
  sync_dir(fs::path(path).parent_path());
}

/// The whole text of the regular file `path`; IoError when it cannot be read, FormatError when it
/// is not a regular file (a FIFO is never waited on).
std::string read_regular_file(const std::string& path, const std::string& missing_hint) {
  Fd f{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (f.fd < 0) throw IoError("cannot open " + path + ": " + std::strerror(errno) + missing_hint);
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw IoError("cannot stat " + path + ": " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw FormatError(path + " is not a regular file");
  std::string text;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(f.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw IoError("cannot read " + path + ": " + std::strerror(errno));
    if (n == 0) break;
    text.append(buf, static_cast<std::size_t>(n));
  }
  return text;
}

/// Refuses a weight file path that is not a plain relative path inside the artifact: absolute,
/// empty, or leading out with "..". (Symlinks are checked when the file is opened.)
void check_relative_inside(const std::string& file, const std::string& dir, const std::string& where,
                           const std::string& key) {
  fs::path p = fs::path(file).lexically_normal();
  bool inside = !file.empty() && p.is_relative() && !p.empty() && p != "." && *p.begin() != "..";
  if (!inside) {
    throw FormatError(where + ": " + key + " '" + file + "' is outside the artifact folder '" + dir +
                      "' (weight files are relative paths inside it)");
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
    return graph_from(json::parse(text), "graph JSON", "graph");
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
  write_file_atomic((fs::path(dir) / "manifest.json").string(), j.dump(1) + "\n");
}

Manifest read_manifest(const std::string& dir) {
  std::string path = (fs::path(dir) / "manifest.json").string();
  std::string text;
  try {
    text = read_regular_file(path, " (run compile() first)");
  } catch (const IoError& e) {
    throw IoError("no compiled artifact at '" + dir + "': " + e.what());
  }
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw FormatError(path + " is not valid JSON: " + e.what());
  }
  Manifest m;
  try {
    if (j.value("format", std::string()) != "devpipe-artifact") {
      throw FormatError(path + " is not a devpipe artifact manifest (missing \"format\": \"devpipe-artifact\")");
    }
    m.format_version = static_cast<int>(json_int::member<FormatError>(j, "format_version", 0, json_int::kIntMax, path));
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
    m.tp_degree = static_cast<int>(json_int::member<FormatError>(j, "tp_degree", 1, json_int::kIntMax, path));
    m.pipeline_execution = j.value("pipeline_execution", false);
    m.return_ranked_to_cpu = j.value("return_ranked_to_cpu", true);
    m.config_json = j.at("config").dump();
    m.inputs = io_from(j.at("inputs"), path, "inputs");
    m.outputs = io_from(j.at("outputs"), path, "outputs");
    for (const auto& st : j.value("states", json::array())) {
      std::string sk = item("states", m.states.size());
      DType dt = dtype_from_name(st.at("dtype").get<std::string>());
      m.states.push_back({st.at("name").get<std::string>(), shape_from(st.at("shape"), dt, path, sk + ".shape"), dt});
    }
    for (const auto& b : j.at("buckets")) {
      std::string bk = item("buckets", m.buckets.size());
      std::int64_t batch = json_int::member<FormatError>(b, "batch", 1, json_int::kMax, path, bk + ".batch");
      std::map<std::string, std::int64_t> dims;
      if (b.contains("dims")) {
        for (const auto& [name, size] : b.at("dims").items()) {
          dims[name] = json_int::member<FormatError>(b.at("dims"), name, 1, json_int::kMax, path, bk + ".dims." + name);
        }
      }
      m.buckets.push_back({batch, std::move(dims), graph_from(b.at("graph"), path, bk + ".graph")});
    }
    for (const auto& w : j.at("weights")) {
      std::string wk = item("weights", m.weights.size());
      WeightFileEntry e;
      e.rank = static_cast<int>(json_int::member<FormatError>(w, "rank", 0, m.tp_degree - 1, path, wk + ".rank"));
      e.file = w.at("file").get<std::string>();
      check_relative_inside(e.file, dir, path, wk + ".file");
      e.checksum = w.at("checksum").get<std::string>();
      e.bytes = static_cast<std::uint64_t>(json_int::member<FormatError>(w, "bytes", 0, json_int::kMax, path, wk + ".bytes"));
      m.weights.push_back(std::move(e));
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

std::string resolve_artifact_file(const std::string& dir, const std::string& file) {
  const std::string shown = (fs::path(dir) / file).string();
  check_relative_inside(file, dir, "artifact at '" + dir + "'", "weight file");
  std::error_code ec;
  fs::path real_dir = fs::canonical(dir, ec);
  if (ec) throw IoError("cannot resolve artifact folder '" + dir + "': " + ec.message());
  fs::path real = fs::canonical(fs::path(dir) / file, ec);
  if (ec) throw IoError("cannot open weight file '" + shown + "': " + ec.message());
  // Component-wise prefix test: /a/art2 is not inside /a/art.
  auto differ = std::mismatch(real_dir.begin(), real_dir.end(), real.begin(), real.end());
  if (differ.first != real_dir.end()) {
    throw FormatError("weight file '" + shown + "' leads to '" + real.string() + "', outside the artifact folder '" +
                      dir + "' (weight files and the links to them stay inside it)");
  }
  struct stat st {};
  if (::stat(real.c_str(), &st) != 0) throw IoError("cannot stat weight file '" + shown + "': " + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) {
    throw FormatError("weight file '" + shown + "' is not a regular file (a FIFO, device or folder cannot be a weight file)");
  }
  return real.string();
}

std::string file_checksum(const std::string& path) {
  // O_NONBLOCK: opening a FIFO does not wait for a writer (it is refused below).
  int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) throw IoError("cannot open '" + path + "': " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw IoError("cannot stat '" + path + "': " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError("'" + path + "' is not a regular file");
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

void replace_artifact_dir(const std::string& dir, const std::function<void(const std::string& tmp)>& write) {
  std::error_code ec;
  auto io_fail = [&](const std::string& what) {
    throw IoError("compile(): " + what + ": " + ec.message());
  };
  fs::path target = fs::absolute(dir, ec).lexically_normal();
  if (ec) io_fail("cannot resolve '" + dir + "'");
  if (!target.has_filename()) target = target.parent_path();  // "art/" names "art"
  if (!target.has_filename() || target.filename() == "..") {
    throw InvalidArgument("compile(): cannot write an artifact to '" + dir + "': name a folder for it");
  }
  const fs::path parent = target.parent_path();
  const bool exists = fs::exists(fs::symlink_status(target, ec));
  if (exists) {
    if (!fs::is_directory(target, ec)) {
      throw InvalidArgument("compile(): '" + dir + "' exists and is not a folder; an artifact is a folder");
    }
    // The whole folder is replaced: refuse one that holds more than an artifact.
    std::vector<std::string> foreign;
    for (fs::directory_iterator it(target, ec), end; !ec && it != end; it.increment(ec)) {
      std::string name = it->path().filename().string();
      std::error_code ignored;
      bool ours = name == "manifest.json" || (name == "weights" && it->is_directory(ignored)) ||
                  name.rfind("manifest.json.tmp.", 0) == 0;
      if (!ours) foreign.push_back(name);
    }
    if (ec) io_fail("cannot list '" + dir + "'");
    if (!foreign.empty()) {
      std::sort(foreign.begin(), foreign.end());
      std::string list;
      for (std::size_t i = 0; i < foreign.size() && i < 10; ++i) {
        list += i ? ", '" : "'";
        list += foreign[i];
        list += "'";
      }
      if (foreign.size() > 10) list += ", ... (" + std::to_string(foreign.size() - 10) + " more)";
      throw InvalidArgument("compile(): '" + dir + "' holds " + list +
                            ", which is not part of an artifact; compiling replaces the whole folder, so it must be "
                            "empty or hold a previous artifact: choose another folder");
    }
  }
  fs::create_directories(parent, ec);
  if (ec) io_fail("cannot create '" + parent.string() + "'");
  // A hidden sibling "<parent>/.<name><suffix>XXXXXX" for mkdtemp.
  auto sibling = [&](const char* suffix) {
    std::string name(".");
    name += target.filename().string();
    name += suffix;
    return (parent / name).string();
  };
  std::string tmpl = sibling(".tmp-XXXXXX");
  if (!::mkdtemp(tmpl.data())) {
    throw IoError("cannot create a folder beside '" + dir + "' (" + tmpl + "): " + std::strerror(errno));
  }
  const fs::path tmp = tmpl;
  auto discard = [&](const fs::path& p) noexcept {
    std::error_code ignored;
    fs::remove_all(p, ignored);
  };
  try {
    write(tmp.string());
  } catch (...) {
    discard(tmp);
    throw;
  }
  // Commit: one rename. An existing artifact is swapped out atomically (readers see the old or
  // the new one, never a mix or none), then removed.
  if (!exists) {
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
      int err = errno;
      discard(tmp);
      throw IoError("cannot rename '" + tmp.string() + "' to '" + target.string() + "': " + std::strerror(err));
    }
  } else if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) != 0) {
    // No atomic exchange on this file system: move the old one aside, the new one in.
    int err = errno;
    if (err != EINVAL && err != ENOSYS && err != ENOTSUP) {
      discard(tmp);
      throw IoError("cannot replace '" + target.string() + "' with '" + tmp.string() + "': " + std::strerror(err));
    }
    std::string old = sibling(".old-XXXXXX");
    const bool made = ::mkdtemp(old.data()) != nullptr;
    if (!made || ::rename(target.c_str(), old.c_str()) != 0) {
      err = errno;
      if (made) discard(old);
      discard(tmp);
      throw IoError("cannot move the previous artifact '" + target.string() + "' aside: " + std::strerror(err));
    }
    if (::rename(tmp.c_str(), target.c_str()) != 0) {
      err = errno;
      ::rename(old.c_str(), target.c_str());  // put the previous one back
      discard(tmp);
      throw IoError("cannot rename '" + tmp.string() + "' to '" + target.string() + "': " + std::strerror(err));
    }
    discard(old);
    sync_dir(parent);
    return;
  }
  sync_dir(parent);
  discard(tmp);  // after an exchange: the previous artifact
}

}  // namespace devpipe
