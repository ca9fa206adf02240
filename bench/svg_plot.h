// Latency plot for `devpipe bench`: a standalone SVG (no scripts, fonts or other external
// assets) with one horizontal box plot per series.
//
// Series whose names all read "GROUP LABEL" (e.g. "seed_tp1 pipeline", "chain8 pipeline")
// with at least two distinct GROUPs are drawn in one panel per GROUP, each panel with its own
// axis (workloads differ by orders of magnitude; one axis would flatten the fast ones to a
// dot). A panel's axis is logarithmic (1-2-5 ticks) when its samples span a factor of 5 or
// more, so that a fast mode's box stays visible beside a slow peer's; linear otherwise. Equal
// LABELs get the same colour in every panel. Otherwise: one panel.
//
// Per series: box p25..p75, a thick median line, a whisker from min to p99 with end caps, a
// diamond at p90, and every sample as a faint dot jittered vertically; the label on the left
// carries the series name and its p50 (and n). Non-finite samples are ignored; a series with
// no samples is listed as such.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace devpipe::bench {

/// Returns the SVG document. `samples_ms_by_series`: (series name, samples in ms), drawn top
/// to bottom in the given order.
std::string latency_svg(const std::string& title,
                        const std::vector<std::pair<std::string, std::vector<double>>>&
                            samples_ms_by_series);

}  // namespace devpipe::bench
