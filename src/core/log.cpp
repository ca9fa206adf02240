#include "core/log.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdio>
#include <cstdlib>

namespace devpipe::log {

namespace {

constexpr const char* kNames[] = {"error", "warn", "info", "debug"};

std::atomic<int> g_level{-1};  // -1: not read yet

/// The level DEVPIPE_LOG_LEVEL names; `bad` gets an unknown value (then the level is warn).
Level level_from_env(std::string& bad) {
  const char* v = std::getenv("DEVPIPE_LOG_LEVEL");
  if (!v || !*v) return Level::Warn;
  std::string s(v);
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  if (s == "warning") return Level::Warn;
  for (int i = 0; i < 4; ++i) {
    if (s == kNames[i]) return static_cast<Level>(i);
  }
  bad = v;
  return Level::Warn;
}

}  // namespace

void reload_level() {
  std::string bad;
  g_level = static_cast<int>(level_from_env(bad));
  if (!bad.empty()) {
    warn("DEVPIPE_LOG_LEVEL='" + bad + "' is not one of error, warn, info, debug; using warn");
  }
}

Level level() {
  if (g_level.load(std::memory_order_relaxed) < 0) reload_level();
  return static_cast<Level>(g_level.load(std::memory_order_relaxed));
}

void write(Level l, const std::string& message) {
  if (!enabled(l)) return;
  const char* name = l == Level::Warn ? "warning" : kNames[static_cast<int>(l)];
  // One fprintf per line: stdio locks the stream, so concurrent lines stay whole.
  std::fprintf(stderr, "devpipe %s: %s\n", name, message.c_str());
}

}  // namespace devpipe::log
