// Matching checkpoint keys to model keys: the ignore list and the key map.
#include "runtime/checkpoint_keys.h"

#include <map>
#include <set>

#include "core/log.h"
#include "devpipe/error.h"
#include "runtime/wrapper_impl.h"

namespace devpipe {

using wrapper_detail::join;

namespace {
std::string quoted(const std::string& s) { return "'" + s + "'"; }
}  // namespace

CheckpointKeyRules make_key_rules(const std::vector<std::string>& patterns,
                                  std::function<std::string(const std::string&)> map) {
  CheckpointKeyRules rules;
  for (const auto& p : patterns) {
    try {
      rules.ignore.emplace_back(p, std::regex::ECMAScript | std::regex::optimize);
    } catch (const std::regex_error& e) {
      throw ConfigError("ignore_checkpoint_keys: " + quoted(p) +
                        " is not a valid regular expression (" + e.what() + ")");
    }
    rules.ignore_text.push_back(p);
  }
  rules.map = std::move(map);
  return rules;
}

namespace {

bool ignored(const CheckpointKeyRules& rules, const std::string& key) {
  for (const auto& re : rules.ignore) {
    if (std::regex_search(key, re)) return true;
  }
  return false;
}

}  // namespace

std::vector<std::string> match_checkpoint_keys(const Checkpoint& checkpoint,
                                               const std::vector<std::string>& model_keys,
                                               const CheckpointKeyRules& rules,
                                               const std::string& where) {
  const std::set<std::string> wanted(model_keys.begin(), model_keys.end());
  std::map<std::string, std::string> source;  // model key -> checkpoint key
  std::vector<std::string> unused, dropped, skipped;
  for (const auto& key : checkpoint.keys()) {
    std::string mapped = rules.map ? rules.map(key) : key;
    if (mapped.empty()) {
      dropped.push_back(key);
      continue;
    }
    if (!wanted.count(mapped)) {
      if (ignored(rules, key) || ignored(rules, mapped)) {
        skipped.push_back(key);
      } else {
        unused.push_back(mapped == key ? key : key + " (mapped to " + mapped + ")");
      }
      continue;
    }
    auto [it, inserted] = source.emplace(mapped, key);
    if (!inserted) {
      throw InvalidArgument(where + "checkpoint keys " + quoted(it->second) + " and " +
                            quoted(key) + " both map to the model's " + quoted(mapped) +
                            " (checkpoint_key_map)");
    }
  }
  std::vector<std::string> missing, out;
  for (const auto& k : model_keys) {
    auto it = source.find(k);
    if (it == source.end()) {
      missing.push_back(k);
    } else {
      out.push_back(it->second);
    }
  }
  if (!missing.empty() || !unused.empty()) {
    std::string msg =
        where + "checkpoint " + quoted(checkpoint.path()) + " does not match the model:";
    if (!missing.empty()) {
      msg += " missing " + std::to_string(missing.size()) + " tensor(s): " + join(missing) + ";";
    }
    if (!unused.empty()) {
      msg += " unused " + std::to_string(unused.size()) + " tensor(s): " + join(unused) + ";";
      msg +=
          " (to drop tensors the model does not use, list patterns in "
          "WrapperOptions::ignore_checkpoint_keys";
      if (!rules.ignore_text.empty()) msg += ", now " + join(rules.ignore_text);
      msg += ")";
    }
    if (rules.map) msg += " (model keys as checkpoint_key_map gives them)";
    throw InvalidArgument(msg);
  }
  if (!dropped.empty()) {
    log::info(where + "checkpoint_key_map dropped " + std::to_string(dropped.size()) +
              " tensor(s): " + join(dropped));
  }
  if (!skipped.empty()) {
    log::info(where + "ignored " + std::to_string(skipped.size()) +
              " unused tensor(s) (ignore_checkpoint_keys): " + join(skipped));
  }
  return out;
}

}  // namespace devpipe
