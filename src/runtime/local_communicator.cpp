// Collectives between ranks that are threads of this process, over shared memory.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/timeline.h"
#include "runtime/communicator.h"

namespace devpipe {
namespace {

class LocalCommunicator final : public Communicator, public HelpBoard {
 public:
  explicit LocalCommunicator(int size)
      : size_(size),
        slots_(static_cast<std::size_t>(size)),
        sources_(static_cast<std::size_t>(size) * static_cast<std::size_t>(size)),
        jobs_(static_cast<std::size_t>(size)),
        exhausted_(static_cast<std::size_t>(size)),
        inside_(static_cast<std::size_t>(size)),
        post_of_(static_cast<std::size_t>(size)),
        seen_(static_cast<std::size_t>(size)) {}

  int size() const override { return size_; }

  void all_reduce_sum(int rank, void* data, std::size_t count, DType dtype) override {
    timeline::Span span("all_reduce", "collective", rank + 1);
    slots_[static_cast<std::size_t>(rank)] = data;
    barrier(rank);
    // Rank r reduces slice r of every buffer into its own buffer and copies the sum to the
    // others: slices are disjoint, and the summation order (rank 0, 1, ...) is the same for
    // every element.
    std::size_t per = (count + static_cast<std::size_t>(size_) - 1) / static_cast<std::size_t>(size_);
    std::size_t begin = std::min(count, per * static_cast<std::size_t>(rank));
    std::size_t end = std::min(count, begin + per);
    const std::size_t elem = dtype_size(dtype);
    const void** sources =
        sources_.data() + static_cast<std::size_t>(rank) * static_cast<std::size_t>(size_);
    for (int r = 0; r < size_; ++r) {
      sources[r] = static_cast<const char*>(slots_[static_cast<std::size_t>(r)]) + begin * elem;
    }
    char* mine = static_cast<char*>(data) + begin * elem;
    sum_in_rank_order(sources, static_cast<std::size_t>(size_), mine, end - begin, dtype);
    for (int r = 0; r < size_; ++r) {
      if (r != rank)
        std::memcpy(static_cast<char*>(slots_[static_cast<std::size_t>(r)]) + begin * elem, mine,
                    (end - begin) * elem);
    }
    barrier(rank);
  }

  void all_gather(int rank, const void* in, void* out, std::size_t outer,
                  std::size_t inner_bytes) override {
    timeline::Span span("all_gather", "collective", rank + 1);
    cslots_[rank % kMaxRanks] = in;
    barrier(rank);
    auto* o = static_cast<char*>(out);
    for (std::size_t i = 0; i < outer; ++i) {
      for (int r = 0; r < size_; ++r) {
        const char* src = static_cast<const char*>(cslots_[r]) + i * inner_bytes;
        std::memcpy(o + (i * static_cast<std::size_t>(size_) + static_cast<std::size_t>(r)) * inner_bytes, src,
                    inner_bytes);
      }
    }
    barrier(rank);
  }

  void barrier(int rank) override {
    std::unique_lock lock(mu_);
    if (aborted_) throw Error("collective aborted: another rank failed (rank " + std::to_string(rank) + " stopped)");
    std::uint64_t gen = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    // While the others come, run tasks of a job another rank posted (HelpBoard). No rank's
    // arrival can complete the barrier while this one helps: the job's owner is one of the
    // ranks still to come, and it leaves its job only once every task claimed of it has run.
    bool look = true;
    for (;;) {
      if (!look) cv_.wait(lock, [&] { return generation_ != gen || aborted_ || posts_ != seen_[static_cast<std::size_t>(rank)]; });
      if (generation_ != gen) return;
      if (aborted_) {
        throw Error("collective aborted: another rank failed (rank " + std::to_string(rank) + " stopped)");
      }
      look = false;
      seen_[static_cast<std::size_t>(rank)] = posts_;
      int owner = -1;
      for (int i = 1; i < size_ && owner < 0; ++i) {
        const int r = (rank + i) % size_;
        if (jobs_[static_cast<std::size_t>(r)] != nullptr && !exhausted_[static_cast<std::size_t>(r)]) owner = r;
      }
      if (owner < 0) continue;
      const auto o = static_cast<std::size_t>(owner);
      HelpJob* job = jobs_[o];
      const std::uint64_t post = post_of_[o];
      ++inside_[o];
      lock.unlock();
      std::int64_t ran = 0;
      std::exception_ptr failed;
      try {
        timeline::Span span("help", "help", rank + 1);
        const int slot = rank < owner ? rank : rank - 1;
        while (job->help(slot)) ++ran;
      } catch (...) {
        failed = std::current_exception();
      }
      lock.lock();
      helped_.fetch_add(ran, std::memory_order_relaxed);
      // The same post (its owner may have posted another job since, at the same address): not
      // picked again until the owner posts anew.
      if (jobs_[o] != nullptr && post_of_[o] == post) exhausted_[o] = true;
      if (--inside_[o] == 0) cv_.notify_all();  // its owner may be withdrawing it
      if (failed) std::rethrow_exception(failed);
      look = true;  // another rank's job may be open
    }
  }

  int helpers() const override { return size_ - 1; }

  void post(int rank, HelpJob* job) override {
    {
      std::lock_guard lock(mu_);
      const auto r = static_cast<std::size_t>(rank);
      jobs_[r] = job;
      exhausted_[r] = false;
      post_of_[r] = ++posts_;
    }
    cv_.notify_all();
  }

  void withdraw(int rank) override {
    std::unique_lock lock(mu_);
    const auto r = static_cast<std::size_t>(rank);
    jobs_[r] = nullptr;
    cv_.wait(lock, [&] { return inside_[r] == 0; });
  }

  std::int64_t helped() const override { return helped_.load(std::memory_order_relaxed); }

  HelpBoard* help_board() override { return this; }

  void abort() override {
    std::lock_guard lock(mu_);
    aborted_ = true;
    cv_.notify_all();
  }

  void reset() override {
    std::lock_guard lock(mu_);
    aborted_ = false;
    arrived_ = 0;
  }

 private:
  static constexpr int kMaxRanks = 64;
  int size_;
  std::vector<void*> slots_;
  std::vector<const void*> sources_;  // [rank][size]: rank r's view of the slices it sums
  const void* cslots_[kMaxRanks] = {};
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool aborted_ = false;
  // The help board (under mu_): per rank its posted job (null when none), whether a helper
  // found it without tasks left, how many helpers are inside it, which post it is (posts_
  // counts every post), and the posts_ count the rank last looked at while waiting.
  std::vector<HelpJob*> jobs_;
  std::vector<char> exhausted_;
  std::vector<int> inside_;
  std::vector<std::uint64_t> post_of_;
  std::vector<std::uint64_t> seen_;
  std::uint64_t posts_ = 0;
  std::atomic<std::int64_t> helped_{0};
};

}  // namespace

void sum_in_rank_order(const void* const* sources, std::size_t num_sources, void* out,
                       std::size_t n, DType dtype) {
  // Blocked, so that the loop over the elements of a block vectorises; each element sees the
  // same additions in the same order as the plain loop over the sources.
  constexpr std::size_t kBlock = 512;
  float acc[kBlock];
  for (std::size_t b = 0; b < n; b += kBlock) {
    const std::size_t m = std::min(kBlock, n - b);
    for (std::size_t j = 0; j < m; ++j) acc[j] = 0;
    if (dtype == DType::Float32) {
      for (std::size_t q = 0; q < num_sources; ++q) {
        const float* s = static_cast<const float*>(sources[q]) + b;
        for (std::size_t j = 0; j < m; ++j) acc[j] += s[j];
      }
      std::memcpy(static_cast<float*>(out) + b, acc, m * sizeof(float));
      continue;
    }
    for (std::size_t q = 0; q < num_sources; ++q) {
      const void* s = sources[q];
      switch (dtype) {
        case DType::BFloat16:
          for (std::size_t j = 0; j < m; ++j)
            acc[j] += bf16_to_float(static_cast<const std::uint16_t*>(s)[b + j]);
          break;
        case DType::Float16:
          for (std::size_t j = 0; j < m; ++j)
            acc[j] += fp16_to_float(static_cast<const std::uint16_t*>(s)[b + j]);
          break;
        case DType::Int64:
          for (std::size_t j = 0; j < m; ++j)
            acc[j] += static_cast<float>(static_cast<const std::int64_t*>(s)[b + j]);
          break;
        case DType::Float32:
          break;
      }
    }
    for (std::size_t j = 0; j < m; ++j) {
      switch (dtype) {
        case DType::BFloat16:
          static_cast<std::uint16_t*>(out)[b + j] = float_to_bf16(acc[j]);
          break;
        case DType::Float16:
          static_cast<std::uint16_t*>(out)[b + j] = float_to_fp16(acc[j]);
          break;
        case DType::Int64:
          static_cast<std::int64_t*>(out)[b + j] = static_cast<std::int64_t>(acc[j]);
          break;
        case DType::Float32:
          break;
      }
    }
  }
}

std::unique_ptr<Communicator> make_local_communicator(int size) {
  if (size < 1 || size > 64) {
    throw InvalidArgument("communicator size must be in [1, 64], got " + std::to_string(size));
  }
  return std::make_unique<LocalCommunicator>(size);
}

}  // namespace devpipe
