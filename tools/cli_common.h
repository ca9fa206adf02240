// Shared bits of the devpipe command-line program.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "devpipe/error.h"
#include "options.h"

namespace devpipe::cli {


/// The library's progress bar (devpipe/model_wrapper.h), drawn on stderr after flushing
/// stdout, so that what the program printed before comes first when both go to one place.
void print_progress(const std::string& tag, int done, int total, const std::string& what);

/// Latency statistics of timed iterations, in the samples' unit; percentiles interpolate
/// linearly between the sorted samples (p50 of {1, 2, 3, 4} is 2.5). All 0 for no samples.
struct LatencyStats {
  double min = 0, p50 = 0, p90 = 0, p95 = 0, p99 = 0, max = 0, mean = 0;
};
LatencyStats summarize(std::vector<double> samples);

/// Records one call of `forward` with the timeline (kernels included) and writes it to `path`
/// in the Chrome trace event format; says so on stdout. Warm `forward` up before.
void write_trace_of(const std::function<void()>& forward, const std::string& path);

/// A library message in the command line's terms: advice to call the C++ API's compile()
/// becomes advice to run `devpipe compile --work <work>`.
std::string cli_wording(const std::string& message, const std::string& work);

}  // namespace devpipe::cli
