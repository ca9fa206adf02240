#include "cli_common.h"

#include <algorithm>

namespace devpipe::cli {

Args Args::parse(int argc, char** argv, int first, const std::vector<std::string>& flags) {
  Args a;
  for (int i = first; i < argc; ++i) {
    std::string s = argv[i];
    if (s.rfind("--", 0) == 0) {
      std::string key = s.substr(2);
      auto eq = key.find('=');
      if (eq != std::string::npos) {
        a.opts[key.substr(0, eq)] = key.substr(eq + 1);
      } else if (std::find(flags.begin(), flags.end(), key) != flags.end()) {
        a.opts[key] = "1";
      } else {
        if (i + 1 >= argc) throw InvalidArgument("option --" + key + " needs a value");
        a.opts[key] = argv[++i];
      }
    } else {
      a.positional.push_back(s);
    }
  }
  return a;
}

std::string Args::get(const std::string& k, const std::string& fallback) const {
  auto it = opts.find(k);
  return it == opts.end() ? fallback : it->second;
}

std::string Args::require(const std::string& k) const {
  auto it = opts.find(k);
  if (it == opts.end()) throw InvalidArgument("missing required option --" + k);
  return it->second;
}

long long Args::get_int(const std::string& k, long long fallback) const {
  auto it = opts.find(k);
  if (it == opts.end()) return fallback;
  try {
    std::size_t pos = 0;
    long long v = std::stoll(it->second, &pos);
    if (pos != it->second.size()) throw std::invalid_argument("trailing");
    return v;
  } catch (const std::exception&) {
    throw InvalidArgument("option --" + k + " expects an integer, got '" + it->second + "'");
  }
}


}  // namespace devpipe::cli
