// Collectives between ranks that are threads of this process, over shared memory.
#include <atomic>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/timeline.h"
#include "runtime/communicator.h"

namespace devpipe {
namespace {

float load(const void* p, DType dt, std::size_t i) {
  switch (dt) {
    case DType::Float32: return static_cast<const float*>(p)[i];
    case DType::BFloat16: return bf16_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case DType::Float16: return fp16_to_float(static_cast<const std::uint16_t*>(p)[i]);
    case DType::Int64: return static_cast<float>(static_cast<const std::int64_t*>(p)[i]);
  }
  return 0;
}

void store(void* p, DType dt, std::size_t i, float v) {
  switch (dt) {
    case DType::Float32: static_cast<float*>(p)[i] = v; return;
    case DType::BFloat16: static_cast<std::uint16_t*>(p)[i] = float_to_bf16(v); return;
    case DType::Float16: static_cast<std::uint16_t*>(p)[i] = float_to_fp16(v); return;
    case DType::Int64: static_cast<std::int64_t*>(p)[i] = static_cast<std::int64_t>(v); return;
  }
}

class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(int size) : size_(size), slots_(static_cast<std::size_t>(size)) {}

  int size() const override { return size_; }

  void all_reduce_sum(int rank, void* data, std::size_t count, DType dtype) override {
    timeline::Span span("all_reduce", "collective", rank + 1);
    slots_[static_cast<std::size_t>(rank)] = data;
    barrier(rank);
    // Rank r reduces slice r of every buffer and writes the sum back to all of them: slices are
    // disjoint, and the summation order (rank 0, 1, ...) is the same for every element.
    std::size_t per = (count + static_cast<std::size_t>(size_) - 1) / static_cast<std::size_t>(size_);
    std::size_t begin = std::min(count, per * static_cast<std::size_t>(rank));
    std::size_t end = std::min(count, begin + per);
    if (dtype == DType::Float32) {
      for (std::size_t i = begin; i < end; ++i) {
        float acc = 0;
        for (int r = 0; r < size_; ++r) acc += static_cast<const float*>(slots_[static_cast<std::size_t>(r)])[i];
        for (int r = 0; r < size_; ++r) static_cast<float*>(slots_[static_cast<std::size_t>(r)])[i] = acc;
      }
    } else {
      for (std::size_t i = begin; i < end; ++i) {
        float acc = 0;
        for (int r = 0; r < size_; ++r) acc += load(slots_[static_cast<std::size_t>(r)], dtype, i);
        for (int r = 0; r < size_; ++r) store(slots_[static_cast<std::size_t>(r)], dtype, i, acc);
      }
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
    cv_.wait(lock, [&] { return generation_ != gen || aborted_; });
    if (generation_ == gen) {
      throw Error("collective aborted: another rank failed (rank " + std::to_string(rank) + " stopped)");
    }
  }


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
  const void* cslots_[kMaxRanks] = {};
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool aborted_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_local_communicator(int size) {
  if (size < 1 || size > 64) {
    throw InvalidArgument("communicator size must be in [1, 64], got " + std::to_string(size));
  }
  return std::make_unique<LocalCommunicator>(size);
}

}  // namespace devpipe
