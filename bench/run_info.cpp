#include "run_info.h"

#include <sys/utsname.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <thread>

#include "devpipe/version.h"

namespace devpipe::bench {

namespace {

/// Runs `cmd` (stderr discarded); its stdout and whether it exited 0.
bool run(const std::string& cmd, std::string& out) {
  FILE* p = ::popen((cmd + " 2>/dev/null").c_str(), "r");
  if (!p) return false;
  char buf[4096];
  while (std::fgets(buf, sizeof buf, p)) out += buf;
  const int rc = ::pclose(p);
  return WIFEXITED(rc) && WEXITSTATUS(rc) == 0;
}

std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

}  // namespace

nlohmann::json host_json() {
  utsname u{};
  uname(&u);
  std::string cpu = "?";
  std::ifstream ci("/proc/cpuinfo");
  for (std::string line; std::getline(ci, line);) {
    if (line.rfind("model name", 0) == 0) {
      cpu = line.substr(line.find(':') + 2);
      break;
    }
  }
  return {{"cpu", cpu},
          {"cores", std::thread::hardware_concurrency()},
          {"kernel", u.release},
          {"hostname", u.nodename}};
}

nlohmann::json load_average_json() {
  double l[3] = {0, 0, 0};
  if (getloadavg(l, 3) != 3) return nullptr;
  return {l[0], l[1], l[2]};
}

nlohmann::json run_json(const std::string& source_dir) {
  std::string commit, dirty;
  const std::string src = shell_quote(source_dir);
  const bool have = run("git -C " + src + " rev-parse HEAD", commit);
  if (have) run("git -C " + src + " status --porcelain --untracked-files=no", dirty);
  while (!commit.empty() && commit.back() == '\n') commit.pop_back();
  char when[32];
  const std::time_t now = std::time(nullptr);
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return {{"commit", have ? commit : std::string("unknown (git rev-parse failed)")},
          {"worktree_dirty", have && !dirty.empty()},
          {"time_utc", when},
          {"devpipe_version", devpipe::version()},
          {"load_average_start", load_average_json()}};
}

}  // namespace devpipe::bench
