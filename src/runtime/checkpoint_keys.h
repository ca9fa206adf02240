// Internal: matching a checkpoint's keys to a model's parameter keys, with the wrapper's ignore
// list and key map (WrapperOptions::ignore_checkpoint_keys / checkpoint_key_map).
#pragma once

#include <functional>
#include <regex>
#include <string>
#include <vector>

#include "io/checkpoint.h"

namespace devpipe {

struct CheckpointKeyRules {
  /// Unused checkpoint tensors whose key (as stored, or as mapped) matches one of these are
  /// dropped instead of being an error.
  std::vector<std::regex> ignore;
  /// The patterns as written, for messages.
  std::vector<std::string> ignore_text;
  /// Checkpoint key -> model key; "" drops the tensor. Unset: the identity.
  std::function<std::string(const std::string&)> map;
};

/// Compiles `patterns` (ECMAScript regular expressions, searched anywhere in a key); throws
/// ConfigError naming a pattern that does not compile.
CheckpointKeyRules make_key_rules(const std::vector<std::string>& patterns,
                                  std::function<std::string(const std::string&)> map);

/// For each of `model_keys`, the checkpoint key that holds it (same order). Strict: throws
/// InvalidArgument, starting with `where`, that lists the model keys no checkpoint key supplies
/// and the checkpoint keys that are neither used, dropped by the map nor ignored; and one that
/// names two checkpoint keys mapped to the same model key.
std::vector<std::string> match_checkpoint_keys(const Checkpoint& checkpoint,
                                               const std::vector<std::string>& model_keys,
                                               const CheckpointKeyRules& rules,
                                               const std::string& where);

}  // namespace devpipe
