// The peers of `devpipe bench`: other runtimes as persistent child processes on the bench's
// line-JSON pipe protocol (bench/README.md, "The worker protocol"), and the check that a peer's
// output matches devpipe's.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace devpipe::bench {

/// A peer worker process: started once, then asked to run N iterations at a time.
class ChildWorker {
 public:
  /// Starts `argv` (argv[0] found on PATH) with its stdin and stdout on pipes and its stderr appended
  /// to `log_path`, and reads its first line: {"ready": true, ...}. Throws devpipe::StateError
  /// naming `name`, the command and the log's tail when it cannot start or answers an error.
  ChildWorker(std::string name, const std::vector<std::string>& argv, std::string log_path);
  /// Sends {"cmd": "quit"}, closes the pipes and waits for the process.
  ~ChildWorker();
  ChildWorker(const ChildWorker&) = delete;
  ChildWorker& operator=(const ChildWorker&) = delete;

  /// Sends one request line and returns the reply; throws devpipe::StateError naming the peer,
  /// the request and the reply (or the log's tail when the process ended).
  nlohmann::json request(const nlohmann::json& req);
  /// The worker's first line ({"ready": true, "peer": ..., "version": ..., "threads": ...}).
  const nlohmann::json& hello() const { return hello_; }

 private:
  std::string read_line();
  /// Sends quit, closes the pipes and waits for the process (its stdin closed, it ends).
  void shut() noexcept;
  std::string failure(const std::string& what) const;

  std::string name_;
  std::string command_;
  std::string log_path_;
  pid_t pid_ = -1;
  int to_ = -1;                // the child's stdin
  std::FILE* from_ = nullptr;  // the child's stdout
  nlohmann::json hello_;
};

/// Tolerance of a peer's output against devpipe's: it matches when
/// max |got - want| <= atol + rtol * max |want|.
struct Tolerance {
  double atol = 1e-5;
  double rtol = 1e-4;
};

/// The outcome of comparing a peer's output with devpipe's.
struct OutputCheck {
  bool ok = false;
  double max_abs = 0;   ///< max |got - want|
  double max_rel = 0;   ///< max_abs / max |want|
  std::size_t worst = 0;  ///< index of the largest |got - want|
  double got_at_worst = 0, want_at_worst = 0;
  std::string message;  ///< one line naming the peer, the workload, the diffs and the tolerance
};

/// Compares `got` (the peer `peer`'s output on `workload`) with `want` (devpipe's). A size
/// mismatch or a non-finite value fails too.
OutputCheck check_output(const std::string& peer, const std::string& workload, const std::vector<float>& want,
                         const std::vector<float>& got, Tolerance tol = {});

}  // namespace devpipe::bench
