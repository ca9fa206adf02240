#include "runtime/stream.h"

namespace devpipe {
namespace detail {

void EventState::signal(std::exception_ptr error) {
  {
    std::lock_guard lock(mu_);
    done_ = true;
    error_ = std::move(error);
  }
  cv_.notify_all();
}

void EventState::wait() const {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return done_; });
  if (error_) std::rethrow_exception(error_);
}

bool EventState::ready() const {
  std::lock_guard lock(mu_);
  return done_;
}

std::exception_ptr EventState::error() const {
  std::lock_guard lock(mu_);
  return error_;
}

}  // namespace detail

RankStream::RankStream(std::string name) : name_(std::move(name)), thread_([this] { loop(); }) {}

RankStream::~RankStream() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void RankStream::enqueue(std::function<void()> task) {
  {
    std::lock_guard lock(mu_);
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
}

void RankStream::synchronize() {
  std::unique_lock lock(mu_);
  idle_cv_.wait(lock, [&] { return queue_.empty() && !running_task_; });
}

void RankStream::loop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop requested and drained
      task = std::move(queue_.front());
      queue_.pop_front();
      running_task_ = true;
    }
    task();
    {
      std::lock_guard lock(mu_);
      running_task_ = false;
      if (queue_.empty()) idle_cv_.notify_all();
    }
  }
}

}  // namespace devpipe
