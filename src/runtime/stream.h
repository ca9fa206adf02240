// Internal: per-rank streams (a worker thread running tasks in FIFO order) and events.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace devpipe {
class DeviceEvent;
namespace detail {

/// Completion of one piece of stream work, with its failure if it failed. Thread-safe. The
/// host flag says the rank's task has run (its device work is queued); with a device event, the
/// work is done on the device once that event completes too.
class EventState {
 public:
  /// Marks the rank's task finished; `error` is rethrown by wait().
  void signal(std::exception_ptr error = nullptr);
  /// Blocks until the work is done: the task finished and, with a device event, the device ran
  /// it. Rethrows the work's failure.
  void wait() const;
  /// Blocks until the task finished (its device work queued); rethrows its failure. A consumer
  /// on a device queue then waits for device() there instead of on the host.
  void wait_queued() const;
  /// The device event recorded after the task's work, or null (the cpu backend). Set once, by
  /// the event's owner, before the first signal; reset() keeps it.
  DeviceEvent* device() const { return device_; }
  void set_device(DeviceEvent* event) { device_ = event; }
  bool ready() const;
  /// The failure, or null (only meaningful once ready).
  std::exception_ptr error() const;
  /// Makes the event pending again (for reuse; nobody may be waiting on it).
  void reset();

 private:
  // done_ is set once per use by signal(), after error_; a waiter that finds it unset counts
  // itself in waiters_ and sleeps on cv_, and signal() takes the mutex to wake it only when
  // someone waits (both sides sequentially consistent: either the waiter sees done_, or
  // signal() sees the waiter). A finished event costs a load to check.
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::atomic<bool> done_{false};
  mutable std::atomic<int> waiters_{0};
  std::exception_ptr error_;
  DeviceEvent* device_ = nullptr;
};

}  // namespace detail

using Event = std::shared_ptr<detail::EventState>;

/// One unit of stream work: `fn(context, arg)`. Plain data: queuing one allocates nothing.
struct StreamTask {
  void (*fn)(void* context, int arg) = nullptr;
  void* context = nullptr;
  int arg = 0;
};

/// A worker thread executing tasks in submission order (the cpu backend's stream). Tasks must
/// not throw (wrap them); the destructor drains the queue and joins. The queue is a ring that
/// only grows (doubling) when more tasks are pending than ever before, so a steady state of
/// enqueues makes no heap allocation.
class RankStream {
 public:
  explicit RankStream(std::string name);
  ~RankStream();
  RankStream(const RankStream&) = delete;
  RankStream& operator=(const RankStream&) = delete;

  /// Queues `task` to run on the stream's thread; non-blocking.
  void enqueue(StreamTask task);
  /// Blocks until every queued task has run (and a claim by the caller's thread ended).
  void synchronize();
  /// When nothing is queued or running, marks the stream busy for the calling thread, which may
  /// then run one task itself, in order with the stream's others: tasks queued meanwhile wait
  /// for end_claim(). Returns false, claiming nothing, when the stream has work.
  bool claim_if_idle();
  /// Ends a claim_if_idle() claim: the stream goes on with what was queued meanwhile.
  void end_claim();
  /// Tasks run by claiming threads instead of the stream's own (for tests and statistics).
  std::size_t claimed_runs() const { return claimed_runs_.load(std::memory_order_relaxed); }

 private:
  void loop();
  void grow();  // mu_ held
  std::string name_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::vector<StreamTask> ring_;
  std::size_t head_ = 0;   // next task to run
  std::size_t count_ = 0;  // tasks queued
  std::atomic<std::size_t> queued_{0};  // count_, readable without the lock (for spinning)
  bool running_task_ = false;  // the stream's thread, or a claiming thread, runs a task
  std::atomic<std::size_t> claimed_runs_{0};
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace devpipe
