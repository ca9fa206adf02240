// The collective watchdog (runtime/collective_watchdog.h).
#include "runtime/collective_watchdog.h"

#include <string>
#include <utility>

#include "devpipe/error.h"

namespace devpipe {

CollectiveWatchdog::CollectiveWatchdog(double timeout_s,
                                       std::function<std::unique_ptr<Marks>(int)> make_marks,
                                       std::function<void(const Label&, double)> on_expired,
                                       std::chrono::microseconds poll)
    : timeout_s_(timeout_s),
      poll_(poll),
      make_marks_(std::move(make_marks)),
      on_expired_(std::move(on_expired)) {
  if (!(timeout_s > 0)) {
    throw InvalidArgument("collective watchdog: the timeout must be > 0 seconds, got " +
                          std::to_string(timeout_s));
  }
  if (!make_marks_ || !on_expired_) {
    throw InvalidArgument("collective watchdog: needs a maker of marks and an expiry action");
  }
  thread_ = std::thread([this] { loop(); });
}

CollectiveWatchdog::~CollectiveWatchdog() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

std::unique_ptr<CollectiveWatchdog::Marks> CollectiveWatchdog::take(int rank) {
  if (rank < 0) throw InvalidArgument("collective watchdog: rank " + std::to_string(rank) + " is negative");
  {
    std::lock_guard lock(mu_);
    const auto r = static_cast<std::size_t>(rank);
    if (r < idle_.size() && !idle_[r].empty()) {
      std::unique_ptr<Marks> m = std::move(idle_[r].back());
      idle_[r].pop_back();
      return m;
    }
  }
  std::unique_ptr<Marks> m = make_marks_(rank);
  if (!m) throw StateError("collective watchdog: no marks were made for rank " + std::to_string(rank));
  return m;
}

void CollectiveWatchdog::give_back(int rank, std::unique_ptr<Marks> m) {
  std::lock_guard lock(mu_);
  give_back_locked(rank, std::move(m));
}

void CollectiveWatchdog::give_back_locked(int rank, std::unique_ptr<Marks> m) {
  const auto r = static_cast<std::size_t>(rank);
  if (idle_.size() <= r) idle_.resize(r + 1);
  idle_[r].push_back(std::move(m));
}

void CollectiveWatchdog::add(const Label& label, std::unique_ptr<Marks> m) {
  {
    std::lock_guard lock(mu_);
    Pending p;
    p.label = label;
    p.marks = std::move(m);
    pending_.push_back(std::move(p));
  }
  cv_.notify_all();
}

bool CollectiveWatchdog::expired() const {
  std::lock_guard lock(mu_);
  return expired_;
}

std::size_t CollectiveWatchdog::pending() const {
  std::lock_guard lock(mu_);
  return pending_.size();
}

void CollectiveWatchdog::loop() {
  using clock = std::chrono::steady_clock;
  std::unique_lock lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] { return stop_ || !pending_.empty(); });
    if (stop_) return;
    bool fire = false;
    Label late;
    double waited = 0;
    for (std::size_t i = 0; i < pending_.size();) {
      Pending& p = pending_[i];
      if (p.marks->finished()) {
        give_back_locked(p.label.rank, std::move(p.marks));
        pending_.erase(pending_.begin() + static_cast<std::ptrdiff_t>(i));
        continue;
      }
      // The clock is read after the mark was seen done, so the collective has waited at least
      // as long as measured from here.
      if (!p.begun && p.marks->begun()) {
        p.begun = true;
        p.began_at = clock::now();
      }
      if (p.begun && !expired_) {
        const double w = std::chrono::duration<double>(clock::now() - p.began_at).count();
        if (w > timeout_s_) {
          expired_ = true;
          fire = true;
          late = p.label;
          waited = w;
        }
      }
      ++i;
    }
    if (fire) {
      lock.unlock();
      try {
        on_expired_(late, waited);
      } catch (...) {
        // Documented: the action must not throw; the watchdog thread carries on regardless.
      }
      lock.lock();
    }
    cv_.wait_for(lock, poll_, [&] { return stop_; });
    if (stop_) return;
  }
}

}  // namespace devpipe
