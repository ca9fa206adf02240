#include "cli_common.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "devpipe/model_wrapper.h"
#include "devpipe/safetensors.h"
#include "devpipe/timeline.h"

namespace fs = std::filesystem;

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

double parse_number(const Args& a, const std::string& name, double fallback, double lo, double hi) {
  if (!a.has(name)) return fallback;
  const std::string text = a.get(name, "");
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || !(v >= lo && v <= hi)) {
    std::ostringstream range;  // 0 and 1000000, not 0.000000 and 1000000.000000
    range << std::setprecision(15) << "[" << lo << ", " << hi << "]";
    throw UsageError("option --" + name + " expects a number in " + range.str() + ", got '" + text + "'");
  }
  return v;
}

fs::path compiled_dir(const Args& a, const std::string& model, const std::string& key) {
  return fs::path(a.has("work") ? a.get("work", "") : (fs::path(model) / "devpipe_compiled").string()) / key;
}

void load_or_compile(ApplicationBase& app, const fs::path& art, const std::string& model) {
  if (std::all_of(app.models.begin(), app.models.end(),
                  [&](const auto& m) { return fs::exists(art / m->tag() / "manifest.json"); })) {
    try {
      app.load(art.string());
      return;
    } catch (const ArtifactMismatch& e) {
      std::cerr << "recompiling: " << e.what() << "\n";
    }
  }
  std::cerr << "compiling " << model << " into " << art.string() << "\n";
  app.compile(art.string());
  app.load(art.string());
}

Tensor read_float32_nchw(const std::string& option, const std::string& path, const std::string& key,
                         const std::string& dims) {
  const safetensors::File file = safetensors::File::open(path);
  if (!file.contains(key)) {
    std::string held;
    for (const auto& n : file.names()) held += (held.empty() ? "" : ", ") + n;
    throw InvalidArgument("--" + option + " '" + path + "' has no tensor \"" + key +
                          "\" (it holds: " + (held.empty() ? "nothing" : held) + ")");
  }
  const safetensors::TensorInfo& info = file.info(key);
  if (info.dtype != DType::Float32 || info.shape.rank() != 4 || info.shape[2] < 1 || info.shape[3] < 1) {
    throw InvalidArgument("--" + option + " '" + path + "': \"" + key + "\" is " +
                          std::string(dtype_name(info.dtype)) + " " + info.shape.to_string() + ", expected float32 " +
                          dims);
  }
  return file.get(key);
}

}  // namespace devpipe::cli
