// devpipe — counters the runtime keeps of the bytes it moves (process-wide, thread-safe).
#pragma once

#include <cstdint>

namespace devpipe {

struct TransferStats {
  std::uint64_t host_to_device_bytes = 0;    // caller's host inputs copied to rank devices
  std::uint64_t device_to_host_bytes = 0;    // stage outputs copied back to the host
  std::uint64_t device_to_device_bytes = 0;  // on-device re-padding / chunk assembly copies
  std::uint64_t ranked_inputs_in_place = 0;  // ranked inputs used without any copy
  std::uint64_t ranked_inputs_copied = 0;    // ranked inputs re-padded on the device
  std::uint64_t host_inputs_in_place = 0;    // host inputs read where they lie (a backend whose
                                             // device memory is host memory; no padding needed)
  std::uint64_t forwards = 0;                // ModelWrapper::forward calls
};

/// A snapshot of the counters.
TransferStats transfer_stats();
/// Sets every counter to zero.
void reset_transfer_stats();

}  // namespace devpipe
