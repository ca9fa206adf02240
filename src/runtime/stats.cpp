#include "runtime/stats.h"

namespace devpipe {

TransferStats& TransferStats::operator+=(const TransferStats& o) {
  host_to_device_bytes += o.host_to_device_bytes;
  device_to_host_bytes += o.device_to_host_bytes;
  device_to_device_bytes += o.device_to_device_bytes;
  ranked_inputs_in_place += o.ranked_inputs_in_place;
  ranked_inputs_copied += o.ranked_inputs_copied;
  host_inputs_in_place += o.host_inputs_in_place;
  forwards += o.forwards;
  return *this;
}

namespace stats {
std::atomic<std::uint64_t> h2d{0}, d2h{0}, d2d{0}, in_place{0}, copied{0}, host_in_place{0}, forwards{0};
}

TransferStats transfer_stats() {
  TransferStats s;
  s.host_to_device_bytes = stats::h2d.load();
  s.device_to_host_bytes = stats::d2h.load();
  s.device_to_device_bytes = stats::d2d.load();
  s.ranked_inputs_in_place = stats::in_place.load();
  s.ranked_inputs_copied = stats::copied.load();
  s.host_inputs_in_place = stats::host_in_place.load();
  s.forwards = stats::forwards.load();
  return s;
}

void reset_transfer_stats() {
  for (auto* c : {&stats::h2d, &stats::d2h, &stats::d2d, &stats::in_place, &stats::copied, &stats::host_in_place, &stats::forwards}) {
    c->store(0);
  }
}

}  // namespace devpipe
