// What every benchmark report records about the machine and the run (devpipe bench,
// devpipe_mpi_bench): one reader for both.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

namespace devpipe::bench {

/// {"cpu": the model name from /proc/cpuinfo ("?" when unknown), "cores", "kernel", "hostname"}.
nlohmann::json host_json();
/// The 1, 5 and 15 minute load averages, or null when unknown.
nlohmann::json load_average_json();
/// {"commit": HEAD of the checkout at `source_dir`, or "unknown (git rev-parse failed)" without
/// git or outside a clone; "worktree_dirty"; "time_utc"; "devpipe_version";
/// "load_average_start": now}.
nlohmann::json run_json(const std::string& source_dir);

}  // namespace devpipe::bench
