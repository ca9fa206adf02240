// Shared bits of the devpipe command-line program.
#pragma once

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/model_wrapper.h"

namespace devpipe::cli {

/// "--key value" and "--flag" arguments after the sub-command, plus positionals.
struct Args {
  std::map<std::string, std::string> opts;
  std::vector<std::string> positional;

  static Args parse(int argc, char** argv, int first, const std::vector<std::string>& flags);
  bool has(const std::string& k) const { return opts.count(k) != 0; }
  std::string get(const std::string& k, const std::string& fallback) const;
  std::string require(const std::string& k) const;
  long long get_int(const std::string& k, long long fallback) const;
};

/// The library's progress bar (devpipe/model_wrapper.h).
using devpipe::print_progress;

}  // namespace devpipe::cli
