#include "cli_common.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>

#include "devpipe/model_wrapper.h"
#include "devpipe/timeline.h"

namespace devpipe::cli {

void print_progress(const std::string& tag, int done, int total, const std::string& what) {
  std::cout.flush();
  std::fflush(stdout);
  devpipe::print_progress(tag, done, total, what);
}

LatencyStats summarize(std::vector<double> v) {
  if (v.empty()) return {};
  std::sort(v.begin(), v.end());
  auto pct = [&](double p) {
    double idx = p * static_cast<double>(v.size() - 1);
    auto lo = static_cast<std::size_t>(std::floor(idx));
    auto hi = std::min(v.size() - 1, lo + 1);
    return v[lo] + (v[hi] - v[lo]) * (idx - static_cast<double>(lo));
  };
  double sum = 0;
  for (double x : v) sum += x;
  return {v.front(),
          pct(0.5),
          pct(0.9),
          pct(0.95),
          pct(0.99),
          v.back(),
          sum / static_cast<double>(v.size())};
}

void write_trace_of(const std::function<void()>& forward, const std::string& path) {
  timeline::start(/*kernels=*/true);
  try {
    forward();
  } catch (...) {
    timeline::stop();
    throw;
  }
  timeline::stop();
  timeline::write_chrome_trace(path);
  std::cout << "wrote " << path << " (open it in Perfetto or chrome://tracing)\n";
}

std::string cli_wording(const std::string& message, const std::string& work) {
  const std::string api = "compile()";
  const std::string cli = "`devpipe compile --work " + work + "`";
  std::string out;
  std::string::size_type from = 0;
  for (auto at = message.find(api); at != std::string::npos; at = message.find(api, from)) {
    out += message.substr(from, at - from) + cli;
    from = at + api.size();
  }
  return out + message.substr(from);
}

}  // namespace devpipe::cli
