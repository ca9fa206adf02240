// Peer worker processes and the output check (see peers.h).
#include "peers.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "devpipe/error.h"

extern char** environ;

namespace devpipe::bench {

using nlohmann::json;

namespace {

std::string tail_of(const std::string& path, std::size_t max_chars = 1500) {
  std::ifstream f(path);
  std::stringstream ss;
  ss << f.rdbuf();
  std::string s = ss.str();
  return s.size() > max_chars ? "..." + s.substr(s.size() - max_chars) : s;
}

/// Writes all of `text` to `fd`; false when the reader is gone (EPIPE) or on another error.
/// SIGPIPE is blocked in this thread for the write and a pending one consumed, so a worker that
/// exited does not kill the bench.
bool write_all(int fd, const std::string& text) {
  sigset_t pipe_set, old;
  sigemptyset(&pipe_set);
  sigaddset(&pipe_set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_set, &old);
  bool ok = true;
  for (std::size_t done = 0; done < text.size();) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ok = false;
      break;
    }
    done += static_cast<std::size_t>(n);
  }
  if (!ok) {
    const timespec zero{0, 0};
    while (sigtimedwait(&pipe_set, nullptr, &zero) == SIGPIPE) {
    }
  }
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return ok;
}

}  // namespace

ChildWorker::ChildWorker(std::string name, const std::vector<std::string>& argv, std::string log_path)
    : name_(std::move(name)), log_path_(std::move(log_path)) {
  for (const auto& a : argv) command_ += (command_.empty() ? "" : " ") + a;
  int in[2], out[2];
  if (::pipe2(in, O_CLOEXEC) != 0 || ::pipe2(out, O_CLOEXEC) != 0) {
    throw StateError("bench: " + name_ + ": pipe() failed: " + std::strerror(errno));
  }
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, in[0], 0);
  posix_spawn_file_actions_adddup2(&fa, out[1], 1);
  posix_spawn_file_actions_addopen(&fa, 2, log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  int rc = posix_spawnp(&pid_, args[0], &fa, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  ::close(in[0]);
  ::close(out[1]);
  if (rc != 0) {
    ::close(in[1]);
    ::close(out[0]);
    pid_ = -1;
    throw StateError("bench: " + name_ + ": cannot start '" + command_ + "': " + std::strerror(rc));
  }
  to_ = in[1];
  from_ = ::fdopen(out[0], "r");
  try {
    std::string line = read_line();
    try {
      hello_ = json::parse(line);
    } catch (const json::exception&) {
      throw StateError(failure("its first line is not JSON: '" + line + "'"));
    }
    if (hello_.contains("error")) throw StateError(failure(hello_["error"].get<std::string>()));
    if (!hello_.value("ready", false)) throw StateError(failure("its first line is not {\"ready\": true}: " + line));
  } catch (...) {
    shut();
    throw;
  }
}

void ChildWorker::shut() noexcept {
  if (to_ >= 0) {
    write_all(to_, "{\"cmd\": \"quit\"}\n");
    ::close(to_);
    to_ = -1;
  }
  if (from_) {
    std::fclose(from_);
    from_ = nullptr;
  }
  if (pid_ > 0) {
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
  }
}

ChildWorker::~ChildWorker() { shut(); }

std::string ChildWorker::failure(const std::string& what) const {
  return "bench: peer " + name_ + " (" + command_ + "): " + what + "; its log " + log_path_ + " ends:\n" +
         tail_of(log_path_);
}

std::string ChildWorker::read_line() {
  std::string line;
  char buf[1 << 16];
  while (std::fgets(buf, sizeof buf, from_)) {
    line += buf;
    if (!line.empty() && line.back() == '\n') {
      line.pop_back();
      return line;
    }
  }
  int status = 0;
  if (pid_ > 0 && ::waitpid(pid_, &status, 0) == pid_) pid_ = -1;
  throw StateError(failure(line.empty() ? "the process ended without answering (exit status " +
                                              std::to_string(WIFEXITED(status) ? WEXITSTATUS(status) : -1) + ")"
                                        : "the process ended in the middle of a line: '" + line + "'"));
}

json ChildWorker::request(const json& req) {
  const std::string text = req.dump();
  if (!write_all(to_, text + "\n")) {
    throw StateError(failure("cannot send " + text));
  }
  std::string line = read_line();
  json reply;
  try {
    reply = json::parse(line);
  } catch (const json::exception&) {
    throw StateError(failure("answered " + text + " with a line that is not JSON: '" + line.substr(0, 300) + "'"));
  }
  if (reply.contains("error")) {
    throw StateError(failure("answered " + text + " with an error: " + reply["error"].get<std::string>()));
  }
  return reply;
}

OutputCheck check_output(const std::string& peer, const std::string& workload, const std::vector<float>& want,
                         const std::vector<float>& got, Tolerance tol) {
  OutputCheck c;
  std::ostringstream m;
  m << "peer " << peer << " on workload " << workload << ": ";
  if (want.size() != got.size()) {
    m << "output has " << got.size() << " values, devpipe's has " << want.size();
    c.message = m.str();
    return c;
  }
  double scale = 0;
  bool finite = true;
  for (std::size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!std::isfinite(d)) {
      if (finite) c.worst = i;
      finite = false;
    } else if (d > c.max_abs) {
      c.max_abs = d;
      c.worst = i;
    }
  }
  if (!want.empty()) {
    c.got_at_worst = got[c.worst];
    c.want_at_worst = want[c.worst];
  }
  c.max_rel = scale > 0 ? c.max_abs / scale : (c.max_abs > 0 ? INFINITY : 0);
  const double limit = tol.atol + tol.rtol * scale;
  c.ok = finite && c.max_abs <= limit;
  m << (c.ok ? "output matches devpipe's" : "output differs from devpipe's") << ": max abs diff " << c.max_abs
    << ", max rel diff " << c.max_rel << " (of max |devpipe| " << scale << "); worst at index " << c.worst
    << ": " << c.got_at_worst << " vs devpipe " << c.want_at_worst << (finite ? "" : "; a value is not finite")
    << "; tolerance |diff| <= " << tol.atol << " + " << tol.rtol << " * max |devpipe| = " << limit;
  c.message = m.str();
  return c;
}

}  // namespace devpipe::bench
