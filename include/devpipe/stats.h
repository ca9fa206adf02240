// devpipe — counters of the bytes the runtime moves: per forward (Output::transfer_stats(),
// RankedTensors::transfer_stats()) and process-wide (transfer_stats(), thread-safe).
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

  /// Field by field sum.
  TransferStats& operator+=(const TransferStats& o);
  friend bool operator==(const TransferStats&, const TransferStats&) = default;
};

/// A snapshot of the process-wide counters (every forward of every wrapper since the last reset;
/// prefer a forward's own counts where several forwards run).
TransferStats transfer_stats();
/// Sets every counter to zero.
void reset_transfer_stats();

}  // namespace devpipe
