// Shared bits of the devpipe command-line program.
#pragma once

#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "devpipe/error.h"

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

/// Prints a progress bar for long work (one line per step when stderr is not a terminal).
void print_progress(const std::string& tag, int done, int total, const std::string& what);

}  // namespace devpipe::cli
