// Internal: bounds the wait for collectives that run asynchronously on a device queue (NCCL
// kernels on a CUDA stream). Such a collective is queued by the host and then waits on the
// device for its peers; a peer that died or hangs leaves it, and every host wait behind it,
// waiting for ever. The watchdog is a thread that polls each watched collective's two marks
// (on cuda: an event recorded before it and one after it): the deadline starts when the first
// mark is seen done (the collective has begun: everything queued before it on the rank's queue
// ran, so from then on it waits only for its peers) and ends `timeout_s` later
// (World::collective_timeout_s, DEVPIPE_COLLECTIVE_TIMEOUT_S). When a collective has begun and
// not finished by then, `on_expired` runs once, on the watchdog's thread (the cuda backend
// aborts its NCCL communicators there, which ends the kernels, and records the error every
// later host wait throws). No device type appears here: tests drive it with fake marks.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace devpipe {

/// Polls `ready()` until it returns true or `timeout_s` seconds have passed (spinning a few
/// times, then sleeping in steps of `step`); returns whether it became ready. `timeout_s` <= 0
/// polls without bound.
template <class Ready>
bool poll_until(const Ready& ready, double timeout_s,
                std::chrono::microseconds step = std::chrono::microseconds(100)) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (int polls = 0;; ++polls) {
    if (ready()) return true;
    if (timeout_s > 0 && std::chrono::duration<double>(clock::now() - start).count() > timeout_s) {
      return ready();  // one last look: it may have become ready while the clock was read
    }
    if (polls >= 100) std::this_thread::sleep_for(step);
  }
}

class CollectiveWatchdog {
 public:
  /// One watched collective's two marks, made by the backend (two CUDA events) and reused.
  class Marks {
   public:
    virtual ~Marks() = default;
    /// The collective has begun: the mark queued just before it is done.
    virtual bool begun() = 0;
    /// The collective is done: the mark queued just after it is done.
    virtual bool finished() = 0;
  };

  /// What a watched collective is, for the error (no allocation per collective).
  struct Label {
    const char* op = "";     ///< "all_reduce" / "all_gather"
    std::size_t bytes = 0;   ///< the buffer (all_gather: the gathered output)
    int rank = 0;            ///< the rank that queued it
  };

  /// `make_marks(rank)` makes a new pair of marks for a collective of `rank` (on its device)
  /// when none of that rank's is idle. `on_expired(label, waited_s)` runs once, for the first
  /// collective that began and did not finish within `timeout_s` (> 0); it must not throw (an
  /// exception from it is dropped). Marks are polled every `poll`.
  CollectiveWatchdog(double timeout_s, std::function<std::unique_ptr<Marks>(int rank)> make_marks,
                     std::function<void(const Label&, double waited_s)> on_expired,
                     std::chrono::microseconds poll = std::chrono::microseconds(1000));
  /// Stops the thread (collectives still pending are no longer watched).
  ~CollectiveWatchdog();
  CollectiveWatchdog(const CollectiveWatchdog&) = delete;
  CollectiveWatchdog& operator=(const CollectiveWatchdog&) = delete;

  /// Takes idle marks of label.rank, lets `queue(marks)` queue the collective between them (it records the
  /// first mark, queues the collective, records the second), then watches it. When `queue`
  /// throws, the marks go back to the idle ones unwatched and the exception propagates.
  template <class Queue>
  void watch(const Label& label, const Queue& queue) {
    std::unique_ptr<Marks> m = take(label.rank);
    try {
      queue(*m);
    } catch (...) {
      give_back(label.rank, std::move(m));
      throw;
    }
    add(label, std::move(m));
  }

  /// Whether on_expired has run.
  bool expired() const;
  /// Collectives watched now (begun or not, not seen finished).
  std::size_t pending() const;
  double timeout_s() const { return timeout_s_; }

 private:
  struct Pending {
    Label label;
    std::unique_ptr<Marks> marks;
    bool begun = false;
    std::chrono::steady_clock::time_point began_at{};
  };

  std::unique_ptr<Marks> take(int rank);
  void give_back(int rank, std::unique_ptr<Marks> m);
  void give_back_locked(int rank, std::unique_ptr<Marks> m);
  void add(const Label& label, std::unique_ptr<Marks> m);
  void loop();

  const double timeout_s_;
  const std::chrono::microseconds poll_;
  std::function<std::unique_ptr<Marks>(int)> make_marks_;
  std::function<void(const Label&, double)> on_expired_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Pending> pending_;
  std::vector<std::vector<std::unique_ptr<Marks>>> idle_;  // [rank]
  bool expired_ = false;
  bool stop_ = false;
  std::thread thread_;  // last: started once everything above exists
};

}  // namespace devpipe
