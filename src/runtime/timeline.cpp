#include "devpipe/timeline.h"

#include <atomic>
#include <chrono>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>

#include "devpipe/error.h"

namespace devpipe::timeline {

namespace {
std::atomic<bool> g_on{false};
std::atomic<bool> g_kernels{false};
std::mutex g_mu;
std::vector<Event> g_events;
std::chrono::steady_clock::time_point g_t0 = std::chrono::steady_clock::now();
}  // namespace

void start(bool kernels) {
  std::lock_guard lock(g_mu);
  g_events.clear();
  g_events.reserve(1 << 16);
  g_t0 = std::chrono::steady_clock::now();
  g_kernels = kernels;
  g_on = true;
}

void stop() { g_on = false; }
bool recording() { return g_on.load(std::memory_order_relaxed); }
bool recording_kernels() { return g_on.load(std::memory_order_relaxed) && g_kernels.load(std::memory_order_relaxed); }

void clear() {
  std::lock_guard lock(g_mu);
  g_events.clear();
}

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - g_t0).count();
}

void record(const char* name, const char* category, int track, double start_us, double dur_us) {
  if (!recording()) return;
  std::lock_guard lock(g_mu);
  g_events.push_back({name, category, track, start_us, dur_us, false});
}

void instant(const char* name, const char* category, int track) {
  if (!recording()) return;
  double t = now_us();
  std::lock_guard lock(g_mu);
  g_events.push_back({name, category, track, t, 0, true});
}

std::vector<Event> events() {
  std::lock_guard lock(g_mu);
  return g_events;
}

void write_chrome_trace(const std::string& path) {
  using nlohmann::json;
  auto evs = events();
  json trace = json::array();
  std::set<int> tracks{0};
  for (const auto& e : evs) tracks.insert(e.track);
  for (int t : tracks) {
    trace.push_back({{"name", "thread_name"}, {"ph", "M"}, {"pid", 1}, {"tid", t},
                     {"args", {{"name", t == 0 ? std::string("host") : "rank " + std::to_string(t - 1)}}}});
    trace.push_back({{"name", "thread_sort_index"}, {"ph", "M"}, {"pid", 1}, {"tid", t}, {"args", {{"sort_index", t}}}});
  }
  trace.push_back({{"name", "process_name"}, {"ph", "M"}, {"pid", 1}, {"args", {{"name", "devpipe"}}}});
  for (const auto& e : evs) {
    json j = {{"name", e.name}, {"cat", e.category}, {"pid", 1}, {"tid", e.track}, {"ts", e.start_us}};
    if (e.instant) {
      j["ph"] = "i";
      j["s"] = "t";
    } else {
      j["ph"] = "X";
      j["dur"] = e.dur_us;
    }
    trace.push_back(std::move(j));
  }
  std::ofstream f(path);
  if (!f) throw IoError("cannot write trace file '" + path + "'");
  f << json{{"traceEvents", trace}, {"displayTimeUnit", "ms"}}.dump() << "\n";
  if (!f) throw IoError("failed writing trace file '" + path + "'");
}

}  // namespace devpipe::timeline
