// The progress bar of long compiles and loads.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <mutex>

#include "devpipe/model_wrapper.h"

namespace devpipe {

void print_progress(const std::string& tag, int done, int total, const std::string& what) {
  static std::mutex mu;
  std::lock_guard lock(mu);
  constexpr int kWidth = 24;
  int filled = total > 0 ? std::min(kWidth, done * kWidth / total) : kWidth;
  std::string bar(static_cast<std::size_t>(filled), '#');
  bool tty = ::isatty(STDERR_FILENO) != 0;
  std::fprintf(stderr, "%s[%-*s] %-14s %3d%% %s%s", tty ? "\r\033[K" : "", kWidth, bar.c_str(), tag.c_str(),
               total > 0 ? done * 100 / total : 100, what.c_str(), (!tty || done == total) ? "\n" : "");
  std::fflush(stderr);
}

}  // namespace devpipe
