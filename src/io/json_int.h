// Internal: integers read from devpipe's JSON files (config.json, manifest.json), checked.
//
// nlohmann's get<int>() converts whatever it finds: 4.9 becomes 4, 4294967298 becomes 2, -1
// read as unsigned becomes 2^64 - 1, and 1e300 is undefined behaviour. Every integer field of
// a file devpipe reads goes through these instead: a JSON integer (not a float, even 2.0; not a
// bool or a string) within the range the field allows, else the exception E naming the file,
// the key and the value as written.
#pragma once

#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace devpipe::json_int {

inline constexpr std::int64_t kMin = std::numeric_limits<std::int64_t>::min();
inline constexpr std::int64_t kMax = std::numeric_limits<std::int64_t>::max();
inline constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();

/// "an integer in [lo, hi]", "an integer >= lo" or "an integer".
inline std::string range_text(std::int64_t lo, std::int64_t hi) {
  if (lo == kMin && hi == kMax) return "an integer in the int64 range";
  if (hi == kMax) return "an integer >= " + std::to_string(lo);
  return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

/// `v` as an integer in [lo, hi]; otherwise throws E("<where>: <key> is <v>, expected ...").
template <class E>
std::int64_t value(const nlohmann::json& v, std::int64_t lo, std::int64_t hi, const std::string& where,
                   const std::string& key) {
  std::int64_t x = 0;
  bool ok = false;
  if (v.is_number_unsigned()) {
    auto u = v.get<std::uint64_t>();
    ok = u <= static_cast<std::uint64_t>(kMax);
    x = static_cast<std::int64_t>(u);
  } else if (v.is_number_integer()) {
    x = v.get<std::int64_t>();
    ok = true;
  }
  if (ok && x >= lo && x <= hi) return x;
  throw E(where + ": " + key + " is " + v.dump() + ", expected " + range_text(lo, hi));
}

/// The member `name` of the object `obj` as value() reads it; `key` names it in messages
/// (its path in the file, e.g. "weights[1].rank"; `name` when empty).
template <class E>
std::int64_t member(const nlohmann::json& obj, const std::string& name, std::int64_t lo, std::int64_t hi,
                    const std::string& where, const std::string& key = "") {
  const std::string& k = key.empty() ? name : key;
  if (!obj.is_object() || !obj.contains(name)) throw E(where + ": " + k + " is missing (" + range_text(lo, hi) + ")");
  return value<E>(obj[name], lo, hi, where, k);
}

/// `v` as an array of integers each in [lo, hi] (messages name element i as "<key>[i]").
template <class E>
std::vector<std::int64_t> values(const nlohmann::json& v, std::int64_t lo, std::int64_t hi, const std::string& where,
                                 const std::string& key) {
  if (!v.is_array()) throw E(where + ": " + key + " is " + v.dump() + ", expected an array of integers");
  std::vector<std::int64_t> out;
  out.reserve(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) {
    out.push_back(value<E>(v[i], lo, hi, where, key + "[" + std::to_string(i) + "]"));
  }
  return out;
}

/// The member `name` of `obj` as values() reads it.
template <class E>
std::vector<std::int64_t> members(const nlohmann::json& obj, const std::string& name, std::int64_t lo,
                                  std::int64_t hi, const std::string& where, const std::string& key = "") {
  const std::string& k = key.empty() ? name : key;
  if (!obj.is_object() || !obj.contains(name)) throw E(where + ": " + k + " is missing (a list of integers)");
  return values<E>(obj[name], lo, hi, where, k);
}

}  // namespace devpipe::json_int
