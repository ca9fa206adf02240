#include "devpipe/config.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "devpipe/error.h"
#include "io/json_int.h"

namespace devpipe {

using nlohmann::json;

namespace {
constexpr int kMaxTpDegree = 64;
}  // namespace

std::vector<std::int64_t> RuntimeConfig::batch_buckets() const {
  std::vector<std::int64_t> b = buckets.empty() ? std::vector<std::int64_t>{batch_size} : buckets;
  for (auto v : b) {
    if (v < 1) throw ConfigError("batch bucket sizes must be >= 1, got " + std::to_string(v));
  }
  std::sort(b.begin(), b.end());
  b.erase(std::unique(b.begin(), b.end()), b.end());
  return b;
}

std::map<std::string, std::vector<std::int64_t>> RuntimeConfig::named_buckets() const {
  std::map<std::string, std::vector<std::int64_t>> out;
  for (const auto& [name, sizes] : dim_buckets) {
    if (name.empty() || name == "batch") {
      throw ConfigError("dim_buckets: '" + name + "' cannot be a named dim (the batch is bucketed by 'buckets')");
    }
    if (sizes.empty()) throw ConfigError("dim_buckets['" + name + "'] is empty");
    std::vector<std::int64_t> b = sizes;
    for (auto v : b) {
      if (v < 1) throw ConfigError("dim_buckets['" + name + "'] sizes must be >= 1, got " + std::to_string(v));
    }
    std::sort(b.begin(), b.end());
    b.erase(std::unique(b.begin(), b.end()), b.end());
    out.emplace(name, std::move(b));
  }
  return out;
}

void RuntimeConfig::validate() const {
  if (batch_size < 1) throw ConfigError("batch_size must be >= 1, got " + std::to_string(batch_size));
  if (tp_degree < 1 || tp_degree > kMaxTpDegree) {
    throw ConfigError("tp_degree must be in [1, " + std::to_string(kMaxTpDegree) + "], got " + std::to_string(tp_degree));
  }
  if (!is_floating(dtype)) {
    throw ConfigError("dtype must be a floating type, got " + std::string(dtype_name(dtype)));
  }
  if (num_threads < 0 || num_threads > kMaxThreads) {
    throw ConfigError("num_threads must be in [0, " + std::to_string(kMaxThreads) +
                      "] (0: OMP_NUM_THREADS or the cores), got " + std::to_string(num_threads));
  }
  batch_buckets();
  named_buckets();
}

std::string ConfigValue::type_name() const {
  switch (v_.index()) {
    case 0: return "int";
    case 1: return "float";
    case 2: return "string";
    case 3: return "int list";
    case 4: return "float list";
    default: return "bool";
  }
}

InferenceConfig::InferenceConfig(RuntimeConfig runtime,
                                 std::initializer_list<std::pair<const std::string, ConfigValue>> attrs)
    : runtime_(std::move(runtime)), attrs_(attrs) {
  runtime_.validate();
}

const ConfigValue& InferenceConfig::get(const std::string& name, const char* want) const {
  auto it = attrs_.find(name);
  if (it == attrs_.end()) {
    std::string have;
    for (const auto& [k, v] : attrs_) have += (have.empty() ? "" : ", ") + k;
    throw ConfigError("config attribute '" + name + "' (" + want + ") is missing; the config has: " +
                      (have.empty() ? std::string("no attributes") : have));
  }
  return it->second;
}

namespace {
[[noreturn]] void wrong_type(const std::string& name, const char* want, const ConfigValue& v) {
  throw ConfigError("config attribute '" + name + "' is a " + v.type_name() + ", expected " + want);
}
}  // namespace

std::int64_t InferenceConfig::get_int(const std::string& name) const {
  const auto& v = get(name, "int");
  if (auto* p = std::get_if<std::int64_t>(&v.storage())) return *p;
  wrong_type(name, "an int", v);
}

double InferenceConfig::get_float(const std::string& name) const {
  const auto& v = get(name, "float");
  if (auto* p = std::get_if<double>(&v.storage())) return *p;
  if (auto* p = std::get_if<std::int64_t>(&v.storage())) return static_cast<double>(*p);
  wrong_type(name, "a float", v);
}

bool InferenceConfig::get_bool(const std::string& name) const {
  const auto& v = get(name, "bool");
  if (auto* p = std::get_if<bool>(&v.storage())) return *p;
  wrong_type(name, "a bool", v);
}

const std::string& InferenceConfig::get_string(const std::string& name) const {
  const auto& v = get(name, "string");
  if (auto* p = std::get_if<std::string>(&v.storage())) return *p;
  wrong_type(name, "a string", v);
}

const std::vector<std::int64_t>& InferenceConfig::get_ints(const std::string& name) const {
  const auto& v = get(name, "int list");
  if (auto* p = std::get_if<std::vector<std::int64_t>>(&v.storage())) return *p;
  wrong_type(name, "an int list", v);
}

std::string InferenceConfig::to_json() const {
  json j;
  j["runtime"] = {{"batch_size", runtime_.batch_size},
                  {"dtype", std::string(dtype_name(runtime_.dtype))},
                  {"tp_degree", runtime_.tp_degree},
                  {"buckets", runtime_.buckets},
                  {"device", std::string(device_kind_name(runtime_.device))},
                  {"num_threads", runtime_.num_threads}};
  if (!runtime_.dim_buckets.empty()) j["runtime"]["dim_buckets"] = runtime_.dim_buckets;
  if (runtime_.fold_linear_chains) j["runtime"]["fold_linear_chains"] = true;
  json a = json::object();
  for (const auto& [name, v] : attrs_) {
    const std::string& k = name;  // a variable, not a structured binding: clang 14 cannot capture those
    std::visit([&](const auto& x) { a[k] = x; }, v.storage());
  }
  j["attributes"] = a;
  return j.dump(2);
}

InferenceConfig InferenceConfig::from_json(const std::string& text) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw ConfigError(std::string("config JSON does not parse: ") + e.what());
  }
  InferenceConfig c;
  try {
    if (!j.is_object()) throw ConfigError("config JSON must be an object with 'runtime' and 'attributes', got " + j.dump());
    const json& r = j.at("runtime");
    if (!r.is_object()) throw ConfigError("config JSON: 'runtime' must be an object, got " + r.dump());
    const std::string where = "config JSON";
    c.runtime_.batch_size = json_int::member<ConfigError>(r, "batch_size", 1, json_int::kMax, where, "runtime.batch_size");
    c.runtime_.dtype = dtype_from_name(r.at("dtype").get<std::string>());
    c.runtime_.tp_degree = static_cast<int>(json_int::member<ConfigError>(r, "tp_degree", 1, kMaxTpDegree, where, "runtime.tp_degree"));
    if (r.contains("buckets")) {
      c.runtime_.buckets = json_int::members<ConfigError>(r, "buckets", 1, json_int::kMax, where, "runtime.buckets");
    }
    c.runtime_.device = device_kind_from_name(r.value("device", std::string("cpu")));
    if (r.contains("dim_buckets")) {
      const json& d = r.at("dim_buckets");
      if (!d.is_object()) throw ConfigError("config JSON: runtime.dim_buckets must be an object of name: [sizes], got " + d.dump());
      for (const auto& [name, sizes] : d.items()) {
        c.runtime_.dim_buckets[name] =
            json_int::values<ConfigError>(sizes, 1, json_int::kMax, where, "runtime.dim_buckets." + name);
      }
    }
    if (r.contains("num_threads")) {  // absent in configs written before it existed
      c.runtime_.num_threads = static_cast<int>(
          json_int::member<ConfigError>(r, "num_threads", 0, RuntimeConfig::kMaxThreads, where, "runtime.num_threads"));
    }
    if (r.contains("fold_linear_chains")) {
      const json& f = r.at("fold_linear_chains");
      if (!f.is_boolean()) {
        throw ConfigError("config JSON: runtime.fold_linear_chains must be true or false, got " + f.dump());
      }
      c.runtime_.fold_linear_chains = f.get<bool>();
    }
    const json& attributes = j.at("attributes");
    if (!attributes.is_object()) {
      throw ConfigError("config JSON: 'attributes' must be an object of name: value, got " + attributes.dump());
    }
    for (const auto& [k, v] : attributes.items()) {
      if (v.is_boolean()) {
        c.attrs_.emplace(k, v.get<bool>());
      } else if (v.is_number_integer()) {
        c.attrs_.emplace(k, json_int::value<ConfigError>(v, json_int::kMin, json_int::kMax, where, "attributes." + k));
      } else if (v.is_number()) {
        c.attrs_.emplace(k, v.get<double>());
      } else if (v.is_string()) {
        c.attrs_.emplace(k, v.get<std::string>());
      } else if (v.is_array() && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_number_integer(); })) {
        c.attrs_.emplace(k, json_int::values<ConfigError>(v, json_int::kMin, json_int::kMax, where, "attributes." + k));
      } else if (v.is_array() && std::all_of(v.begin(), v.end(), [](const json& e) { return e.is_number(); })) {
        c.attrs_.emplace(k, v.get<std::vector<double>>());
      } else {
        throw ConfigError("config attribute '" + k + "' has an unsupported JSON type: " + v.dump());
      }
    }
  } catch (const json::exception& e) {
    throw ConfigError(std::string("config JSON is missing or mistypes a field: ") + e.what());
  } catch (const DTypeError& e) {
    throw ConfigError(std::string("config JSON: ") + e.what());
  } catch (const InvalidArgument& e) {
    throw ConfigError(std::string("config JSON: ") + e.what());
  }
  c.runtime_.validate();
  return c;
}

void InferenceConfig::save(const std::string& path) const {
  // Written to a temporary file and renamed into place: a crash never leaves half a config.
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::trunc);
    if (!f) throw IoError("cannot write config file '" + tmp + "': " + std::strerror(errno));
    f << to_json() << "\n";
    f.flush();
    if (!f) throw IoError("failed writing config file '" + tmp + "'");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw IoError("cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(errno));
  }
}

InferenceConfig InferenceConfig::load(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw IoError("cannot read config file '" + path + "'");
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return from_json(ss.str());
  } catch (const ConfigError& e) {
    throw ConfigError("config file '" + path + "': " + e.what());
  }
}

}  // namespace devpipe
