// devpipe — a timeline of what the runtime does, for Chrome's trace viewer / Perfetto.
//
// When recording, the runtime notes a span per stage per rank (track "rank r"), per kernel
// (when kernels are included), per collective, and an instant event for each ranked hand-off.
// Recording is process-wide and thread-safe; when it is off each probe costs one atomic load.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace devpipe::timeline {

/// Starts recording (clears what was recorded before). `kernels`: also record every kernel.
void start(bool kernels = false);
/// Stops recording; the events stay until the next start() or clear().
void stop();
bool recording();
bool recording_kernels();
void clear();

/// One recorded event.
struct Event {
  std::string name;
  std::string category;  // "stage", "kernel", "collective", "handoff", "host"
  int track = 0;         // 0: host thread; r + 1: rank r's stream
  double start_us = 0;   // since start()
  double dur_us = 0;     // 0 for instant events
  bool instant = false;
};

/// The events recorded so far (a copy).
std::vector<Event> events();
/// Writes the events in the Chrome trace event format (JSON object with "traceEvents"), with
/// named tracks. Throws IoError when the file cannot be written.
void write_chrome_trace(const std::string& path);

/// Microseconds since start() (for probes).
double now_us();
/// Records a finished span / an instant event (no-op when not recording).
void record(const char* name, const char* category, int track, double start_us, double dur_us);
void instant(const char* name, const char* category, int track);

/// RAII span: records [construction, destruction) when recording.
class Span {
 public:
  Span(const char* name, const char* category, int track)
      : name_(name), category_(category), track_(track), start_(recording() ? now_us() : -1) {}
  ~Span() {
    if (start_ >= 0) record(name_, category_, track_, start_, now_us() - start_);
  }
  Span(const Span&) = delete;
  Span& operator=(const Span&) = delete;

 private:
  const char* name_;
  const char* category_;
  int track_;
  double start_;
};

}  // namespace devpipe::timeline
