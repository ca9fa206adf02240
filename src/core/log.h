// Internal: devpipe's log lines on stderr, filtered by DEVPIPE_LOG_LEVEL.
//
//   DEVPIPE_LOG_LEVEL=error|warn|info|debug   (case-insensitive; unset or empty: warn)
//
// error and warn lines report trouble that is not an exception (a bad environment value
// ignored); info says what compile() and load() did; debug adds each step. Each line is written
// whole ("devpipe info: ..."), so lines from several threads do not interleave.
#pragma once

#include <string>

namespace devpipe::log {

enum class Level { Error, Warn, Info, Debug };

/// The current level (DEVPIPE_LOG_LEVEL, read once, on first use).
Level level();
inline bool enabled(Level l) { return static_cast<int>(l) <= static_cast<int>(level()); }
/// Writes `message` as one line at level `l` if that level is enabled.
void write(Level l, const std::string& message);

inline void error(const std::string& m) { write(Level::Error, m); }
inline void warn(const std::string& m) { write(Level::Warn, m); }
inline void info(const std::string& m) { write(Level::Info, m); }
inline void debug(const std::string& m) { write(Level::Debug, m); }

/// Reads DEVPIPE_LOG_LEVEL again (tests change it); an unknown value keeps warn and warns.
void reload_level();

}  // namespace devpipe::log
