// devpipe — device state shared by the stages of one application.
//
// A state (a KV cache, a diffusion latent, a cross-attention cache) is a graph input of kind
// State (see graph.h): a buffer per rank that lives on the rank's device across forward()
// calls. A StateStore holds an application's states by name: the first stage loaded with the
// store allocates each of its states (zero-filled) on every rank's device; every later stage
// naming the same state gets the same buffers, after its shape, dtype, tp degree and device
// kind are checked equal. The runtime never copies a state to the host. Thread-safe.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "devpipe/device.h"
#include "devpipe/dtype.h"
#include "devpipe/shape.h"

namespace devpipe {

class ModelWrapper;

class StateStore {
 public:
  StateStore();
  ~StateStore();
  StateStore(const StateStore&) = delete;
  StateStore& operator=(const StateStore&) = delete;

  /// What the store holds for one state.
  struct Entry {
    std::string name;
    Shape shape;  // per rank
    DType dtype = DType::Float32;
    int tp_degree = 1;
    DeviceKind device = DeviceKind::Cpu;
    std::string owner;  // tag of the stage that allocated it
  };
  /// Every state, sorted by name.
  std::vector<Entry> entries() const;
  /// Device bytes held on each rank.
  std::size_t bytes_per_rank() const;

 private:
  friend class ModelWrapper;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace devpipe
