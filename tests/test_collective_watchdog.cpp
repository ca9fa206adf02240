// The collective watchdog (src/runtime/collective_watchdog.h), which bounds the cuda backend's
// NCCL collectives by the world's collective timeout, driven here by fake marks (no GPU): a
// collective that began and does not finish is reported once, within the timeout plus the
// polling; time spent queued behind earlier work does not count; finished collectives give
// their marks back for reuse.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "devpipe/error.h"
#include "runtime/collective_watchdog.h"

using namespace devpipe;
using namespace std::chrono_literals;
using clock_type = std::chrono::steady_clock;

namespace {

/// The two marks of one collective, set by the test (as the device would).
struct FakeState {
  std::atomic<bool> begun{false}, finished{false};
};

class FakeMarks final : public CollectiveWatchdog::Marks {
 public:
  explicit FakeMarks(std::shared_ptr<FakeState> s) : s_(std::move(s)) {}
  bool begun() override { return s_->begun.load(); }
  bool finished() override { return s_->finished.load(); }
  std::shared_ptr<FakeState> s_;
};

/// A watchdog whose marks are FakeMarks, each made with a fresh state the test reaches through
/// `made` (in order of making); records every expiry.
struct Harness {
  explicit Harness(double timeout_s)
      : dog(
            timeout_s,
            [this](int rank) {
              std::lock_guard lock(mu);
              made.push_back(std::make_shared<FakeState>());
              ranks.push_back(rank);
              return std::make_unique<FakeMarks>(made.back());
            },
            [this](const CollectiveWatchdog::Label& l, double waited) {
              std::lock_guard lock(mu);
              expiries.push_back({l, waited, clock_type::now()});
              for (auto& s : made) s->finished = true;  // as ncclCommAbort ends the kernels
            },
            1ms) {}

  /// Watches one collective and returns its state (the marks it got).
  std::shared_ptr<FakeState> watch(const char* op, std::size_t bytes, int rank) {
    std::shared_ptr<FakeState> state;
    dog.watch({op, bytes, rank}, [&](CollectiveWatchdog::Marks& m) {
      state = static_cast<FakeMarks&>(m).s_;
      state->begun = false;  // recorded anew (reused marks too)
      state->finished = false;
    });
    return state;
  }

  struct Expiry {
    CollectiveWatchdog::Label label;
    double waited;
    clock_type::time_point at;
  };
  std::mutex mu;
  std::vector<std::shared_ptr<FakeState>> made;
  std::vector<int> ranks;
  std::vector<Expiry> expiries;
  CollectiveWatchdog dog;  // last: its thread stops before the members above go
};

bool wait_for(const std::function<bool()>& cond, std::chrono::milliseconds limit) {
  const auto end = clock_type::now() + limit;
  while (clock_type::now() < end) {
    if (cond()) return true;
    std::this_thread::sleep_for(1ms);
  }
  return cond();
}

TEST(CollectiveWatchdog, AHungCollectiveExpiresOnceWithinTheTimeout) {
  constexpr double kTimeout = 0.2;
  Harness h(kTimeout);
  auto a = h.watch("all_reduce", 4096, 1);
  auto b = h.watch("all_gather", 512, 1);
  const auto began = clock_type::now();
  a->begun = true;  // began, waits for a peer that never comes
  b->begun = true;
  ASSERT_TRUE(wait_for([&] { return h.dog.expired(); }, 5000ms)) << "the hung collective was never reported";
  std::this_thread::sleep_for(50ms);  // a second report would come within a few polls
  std::lock_guard lock(h.mu);
  ASSERT_EQ(h.expiries.size(), 1u) << "reported more than once";
  const auto& e = h.expiries[0];
  EXPECT_STREQ(e.label.op, "all_reduce");  // the oldest pending one
  EXPECT_EQ(e.label.bytes, 4096u);
  EXPECT_EQ(e.label.rank, 1);
  EXPECT_GE(e.waited, kTimeout);
  const double after = std::chrono::duration<double>(e.at - began).count();
  EXPECT_GE(after, kTimeout);
  EXPECT_LT(after, kTimeout + 1.0) << "reported long after the deadline";
}

TEST(CollectiveWatchdog, TimeQueuedBehindEarlierWorkDoesNotCount) {
  constexpr double kTimeout = 0.5;  // far above the 20 ms it runs once begun, even on a loaded machine
  Harness h(kTimeout);
  auto s = h.watch("all_reduce", 64, 0);
  std::this_thread::sleep_for(800ms);  // not begun: the rank's earlier kernels still run
  EXPECT_FALSE(h.dog.expired());
  s->begun = true;
  std::this_thread::sleep_for(20ms);  // begun, well within the timeout
  s->finished = true;
  ASSERT_TRUE(wait_for([&] { return h.dog.pending() == 0; }, 2000ms));
  EXPECT_FALSE(h.dog.expired());
  std::lock_guard lock(h.mu);
  EXPECT_TRUE(h.expiries.empty());
}

TEST(CollectiveWatchdog, FinishedCollectivesGiveTheirMarksBackPerRank) {
  Harness h(5);
  for (int i = 0; i < 20; ++i) {
    for (int rank : {0, 1}) {
      auto s = h.watch("all_reduce", 16, rank);
      s->begun = true;
      s->finished = true;
    }
    ASSERT_TRUE(wait_for([&] { return h.dog.pending() == 0; }, 2000ms)) << "iteration " << i;
  }
  std::lock_guard lock(h.mu);
  // One pair of marks per rank, reused: never one rank's marks for the other (they live on
  // its device).
  ASSERT_EQ(h.made.size(), 2u);
  EXPECT_EQ(h.ranks, (std::vector<int>{0, 1}));
  EXPECT_TRUE(h.expiries.empty());
}

TEST(CollectiveWatchdog, MarksOfACollectiveThatFailedToQueueAreReused) {
  Harness h(5);
  EXPECT_THROW(h.dog.watch({"all_reduce", 8, 0}, [](CollectiveWatchdog::Marks&) {
    throw CollectiveError("enqueue failed");
  }),
               CollectiveError);
  EXPECT_EQ(h.dog.pending(), 0u);
  auto s = h.watch("all_reduce", 8, 0);
  s->begun = s->finished = true;
  std::lock_guard lock(h.mu);
  EXPECT_EQ(h.made.size(), 1u);
}

TEST(CollectiveWatchdog, RefusesANonPositiveTimeoutNamingIt) {
  try {
    CollectiveWatchdog dog(
        0, [](int) { return std::unique_ptr<CollectiveWatchdog::Marks>(); },
        [](const CollectiveWatchdog::Label&, double) {});
    ADD_FAILURE() << "accepted a timeout of 0 s";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("got 0"), std::string::npos) << e.what();
  }
}

TEST(CollectiveWatchdog, PollUntilReturnsWhenReadyOrAtTheTimeout) {
  const auto t0 = clock_type::now();
  EXPECT_TRUE(poll_until([&] { return clock_type::now() - t0 > 30ms; }, 5.0));
  const double ready_after = std::chrono::duration<double>(clock_type::now() - t0).count();
  EXPECT_LT(ready_after, 2.0);
  const auto t1 = clock_type::now();
  EXPECT_FALSE(poll_until([] { return false; }, 0.1));
  const double gave_up = std::chrono::duration<double>(clock_type::now() - t1).count();
  EXPECT_GE(gave_up, 0.1);
  EXPECT_LT(gave_up, 2.0);
}

}  // namespace
