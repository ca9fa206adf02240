// Internal: the counters behind devpipe/stats.h.
#pragma once

#include <atomic>
#include <cstdint>

#include "devpipe/stats.h"

namespace devpipe::stats {

extern std::atomic<std::uint64_t> h2d, d2h, d2d, in_place, copied, host_in_place, forwards;

}  // namespace devpipe::stats
