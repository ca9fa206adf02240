#include "runtime/stream.h"

#include "runtime/backend.h"

#include <chrono>
#include <thread>

namespace devpipe {
namespace detail {

void EventState::signal(std::exception_ptr error) {
  error_ = std::move(error);
  done_.store(true);
  if (waiters_.load() > 0) {
    { std::lock_guard lock(mu_); }  // a waiter between its check and its sleep holds the mutex
    cv_.notify_all();
  }
}

void EventState::wait_queued() const {
  if (!done_.load()) {
    waiters_.fetch_add(1);
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return done_.load(); });
    }
    waiters_.fetch_sub(1);
  }
  if (error_) std::rethrow_exception(error_);
}

void EventState::wait() const {
  wait_queued();
  if (device_) device_->synchronize();
}

bool EventState::ready() const { return done_.load(); }

std::exception_ptr EventState::error() const { return done_.load() ? error_ : nullptr; }

void EventState::reset() {
  // Nobody waits on an event being reset: the submission that reuses it publishes the store.
  if (error_) error_ = nullptr;
  done_.store(false, std::memory_order_relaxed);
}

}  // namespace detail

namespace {
constexpr std::size_t kInitialRing = 64;
constexpr int kSpinMicros = 50;
}  // namespace

RankStream::RankStream(std::string name)
    : name_(std::move(name)), ring_(kInitialRing), thread_([this] { loop(); }) {}

RankStream::~RankStream() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void RankStream::grow() {
  std::vector<StreamTask> bigger(ring_.size() * 2);
  for (std::size_t i = 0; i < count_; ++i) bigger[i] = ring_[(head_ + i) % ring_.size()];
  ring_.swap(bigger);
  head_ = 0;
}

void RankStream::enqueue(StreamTask task) {
  {
    std::lock_guard lock(mu_);
    if (count_ == ring_.size()) grow();
    ring_[(head_ + count_) % ring_.size()] = task;
    ++count_;
    queued_.store(count_, std::memory_order_release);
  }
  cv_.notify_one();
}

void RankStream::synchronize() {
  std::unique_lock lock(mu_);
  idle_cv_.wait(lock, [&] { return count_ == 0 && !running_task_; });
}

bool RankStream::claim_if_idle() {
  std::lock_guard lock(mu_);
  if (count_ != 0 || running_task_) return false;
  running_task_ = true;
  // Written under mu_ only: a load and a store (no locked instruction); read anywhere.
  claimed_runs_.store(claimed_runs_.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  return true;
}

void RankStream::end_claim() {
  bool more;
  {
    std::lock_guard lock(mu_);
    running_task_ = false;
    more = count_ > 0;
    if (!more) idle_cv_.notify_all();
  }
  if (more) cv_.notify_one();
}

void RankStream::loop() {
  for (;;) {
    StreamTask task;
    // Before sleeping, look for more work for a little while, yielding the core to any other
    // runnable thread: back-to-back stages then start without a wake-up (tens of microseconds
    // on small VMs), and an idle stream still sleeps.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
    while (queued_.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < spin_until) {
      std::this_thread::yield();
    }
    {
      std::unique_lock lock(mu_);
      // A claiming thread's task runs first: the stream's own wait behind it.
      cv_.wait(lock, [&] { return !running_task_ && (stop_ || count_ > 0); });
      if (count_ == 0) return;  // stop requested and drained
      task = ring_[head_];
      head_ = (head_ + 1) % ring_.size();
      --count_;
      queued_.store(count_, std::memory_order_release);
      running_task_ = true;
    }
    task.fn(task.context, task.arg);
    {
      std::lock_guard lock(mu_);
      running_task_ = false;
      if (count_ == 0) idle_cv_.notify_all();
    }
  }
}

}  // namespace devpipe
