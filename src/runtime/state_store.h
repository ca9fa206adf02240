// Internal: the buffers behind devpipe::StateStore.
#pragma once

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "devpipe/state.h"
#include "devpipe/tensor.h"
#include "runtime/backend.h"

namespace devpipe {

struct StateStore::Impl {
  struct Slot {
    Entry entry;
    std::vector<Tensor> per_rank;  // device tensors, one per rank
  };
  mutable std::mutex mu;
  std::map<std::string, Slot> slots;

  /// The buffers of state `name` on every rank: allocated (zeroed) on first use, else checked
  /// against the earlier declaration. Throws ArtifactMismatch naming the state, both stages and
  /// both specs.
  std::vector<Tensor> acquire(const std::string& name, const Shape& shape, DType dtype, int tp_degree,
                              Backend& backend, const std::string& tag);
};

}  // namespace devpipe
