// Shared bits of the devpipe command-line program.
#pragma once

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/model_wrapper.h"
#include "devpipe/tensor.h"
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

/// The number option --`name` holds (a String option), in [lo, hi]; `fallback` when absent.
/// UsageError naming the option, the range and the value otherwise.
double parse_number(const Args& a, const std::string& name, double fallback, double lo, double hi);

/// Where a compile-on-first-use command (generate, diffuse) keeps the artifacts of `model`
/// under `key`: --work DIR/<key>, by default MODEL/devpipe_compiled/<key>.
std::filesystem::path compiled_dir(const Args& a, const std::string& model, const std::string& key);

/// Loads `app` from `art` when every stage's manifest is there; otherwise (or when load()
/// finds the artifacts do not match: "recompiling: <why>" on stderr) compiles `app` into
/// `art` ("compiling MODEL into ART" on stderr) and loads that. Progress as set on `app`.
void load_or_compile(ApplicationBase& app, const std::filesystem::path& art, const std::string& model);

/// The float32 rank-4 tensor `key` of the safetensors file `path` (given with --`option`), each
/// of its last two dims >= 1; InvalidArgument naming the option, the file, the key (and what the
/// file holds instead) or the dtype and shape found against `dims` ("[images, channels, height,
/// width]") otherwise. The caller checks the dims against what it needs.
Tensor read_float32_nchw(const std::string& option, const std::string& path, const std::string& key,
                         const std::string& dims);

}  // namespace devpipe::cli
