// devpipe — reading Hugging Face / diffusers config.json files (internal to src/models/).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#include "devpipe/error.h"

namespace devpipe::models {

/// <dir>/config.json as a JSON object; IoError when it cannot be read, ConfigError when it is
/// not a JSON object. read_json_object() reads any such file.
nlohmann::json read_hf_config_json(const std::string& dir);
nlohmann::json read_json_object(const std::string& path);

/// Typed reads of an HF config object's keys; errors name `where` (e.g. "'dir/config.json'") and the key.
struct HfFields {
  const nlohmann::json& j;
  std::string where;
  /// j[key] (HF's null counts as absent: the fallback; no fallback: ConfigError "lacks").
  std::int64_t integer(const char* key, std::optional<std::int64_t> fallback) const {
    if (!j.contains(key) || j[key].is_null()) {
      if (fallback) return *fallback;
      throw ConfigError(where + " lacks \"" + key + "\"");
    }
    if (!j[key].is_number_integer()) throw ConfigError(where + ": \"" + key + "\" is " + j[key].dump() + ", expected an integer");
    return j[key].get<std::int64_t>();
  }
  double number(const char* key, double fallback) const {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    if (!j[key].is_number()) throw ConfigError(where + ": \"" + key + "\" is " + j[key].dump() + ", expected a number");
    return j[key].get<double>();
  }
  std::string text(const char* key, const std::string& fallback) const {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    if (!j[key].is_string()) throw ConfigError(where + ": \"" + key + "\" is " + j[key].dump() + ", expected a string");
    return j[key].get<std::string>();
  }
  bool flag(const char* key, bool fallback) const {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    if (!j[key].is_boolean()) throw ConfigError(where + ": \"" + key + "\" is " + j[key].dump() + ", expected true or false");
    return j[key].get<bool>();
  }
  /// j[key] as a non-empty list of integers / strings (HF's null or absent: the fallback).
  std::vector<std::int64_t> integers(const char* key, const std::vector<std::int64_t>& fallback) const {
    return list(key, fallback);
  }
  std::vector<std::string> texts(const char* key, const std::vector<std::string>& fallback) const {
    return list(key, fallback);
  }
  template <class T>
  std::vector<T> list(const char* key, const std::vector<T>& fallback) const {
    if (!j.contains(key) || j[key].is_null()) return fallback;
    constexpr bool kInts = std::is_same_v<T, std::int64_t>;
    std::vector<T> out;
    if (j[key].is_array()) {
      for (const auto& v : j[key]) {
        if (kInts ? !v.is_number_integer() : !v.is_string()) break;
        out.push_back(v.template get<T>());
      }
    }
    if (out.empty() || out.size() != j[key].size()) {
      throw ConfigError(where + ": \"" + key + "\" is " + j[key].dump() + ", expected a non-empty list of " +
                        (kInts ? "integers" : "strings"));
    }
    return out;
  }
  /// j[key] as an object (nested configs); ConfigError when absent or of another type.
  const nlohmann::json& object(const char* key) const {
    if (!j.contains(key) || !j[key].is_object()) {
      throw ConfigError(where + " lacks the object \"" + key + "\"" +
                        (j.contains(key) ? std::string(" (it is ") + j[key].type_name() + ")" : ""));
    }
    return j[key];
  }
};

/// ConfigError `where: "key" must be >= 1, got v` for the first (key, value) below 1.
inline void require_positive(const std::string& where,
                             std::initializer_list<std::pair<const char*, std::int64_t>> fields) {
  for (const auto& [key, v] : fields) {
    if (v < 1) throw ConfigError(where + ": \"" + key + "\" must be >= 1, got " + std::to_string(v));
  }
}

}  // namespace devpipe::models
