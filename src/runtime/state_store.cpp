#include "runtime/state_store.h"

#include "devpipe/error.h"
#include "devpipe/world.h"

namespace devpipe {

StateStore::StateStore() : impl_(std::make_unique<Impl>()) {}
StateStore::~StateStore() = default;

std::vector<StateStore::Entry> StateStore::entries() const {
  std::lock_guard lock(impl_->mu);
  std::vector<Entry> out;
  for (const auto& [name, slot] : impl_->slots) out.push_back(slot.entry);
  return out;
}

std::size_t StateStore::bytes_per_rank() const {
  std::lock_guard lock(impl_->mu);
  std::size_t n = 0;
  for (const auto& [name, slot] : impl_->slots) {
    n += static_cast<std::size_t>(slot.entry.shape.numel()) * dtype_size(slot.entry.dtype);
  }
  return n;
}

std::vector<Tensor> StateStore::Impl::acquire(const std::string& name, const Shape& shape, DType dtype,
                                              int tp_degree, Backend& backend, const std::string& tag) {
  std::lock_guard lock(mu);
  auto it = slots.find(name);
  if (it != slots.end()) {
    const Entry& e = it->second.entry;
    if (e.shape != shape || e.dtype != dtype || e.tp_degree != tp_degree || e.device != backend.kind()) {
      throw ArtifactMismatch("[" + tag + "] state '" + name + "' is " + shape.to_string() + " " +
                             std::string(dtype_name(dtype)) + " at tp_degree " + std::to_string(tp_degree) + " on " +
                             std::string(device_kind_name(backend.kind())) + ", but stage '" + e.owner +
                             "' of the same application declared it as " + e.shape.to_string() + " " +
                             std::string(dtype_name(e.dtype)) + " at tp_degree " + std::to_string(e.tp_degree) +
                             " on " + std::string(device_kind_name(e.device)) +
                             ": stages sharing a state must declare it alike");
    }
    return it->second.per_rank;
  }
  Slot slot;
  slot.entry = {name, shape, dtype, tp_degree, backend.kind(), tag};
  const std::size_t bytes = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
  // Only the ranks this process runs get a buffer (all of them in thread mode).
  slot.per_rank.resize(static_cast<std::size_t>(tp_degree));
  for (int r : World::get().local_ranks(tp_degree)) {
    Device dev = backend.device_for_rank(r, tp_degree);
    Tensor t = backend.allocate(shape, dtype, dev);
    backend.fill_zero(t.raw_data(), dev, bytes);
    slot.per_rank[static_cast<std::size_t>(r)] = std::move(t);
  }
  std::vector<Tensor> out = slot.per_rank;
  slots.emplace(name, std::move(slot));
  return out;
}

}  // namespace devpipe
