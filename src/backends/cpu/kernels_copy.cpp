// A contiguous block copy: a slice that takes whole leading rows (the batch split of a
// replicated stage slices dim 0) is one memcpy, split over the rank's threads when large,
// instead of a oneDNN reorder (which allocates on every execute).
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "backends/cpu/kernel.h"

namespace devpipe::cpu {

namespace {

/// Copies at least this many bytes per thread.
constexpr std::size_t kBytesPerThread = 1u << 20;

class BlockCopyKernel final : public Kernel {
 public:
  BlockCopyKernel(int in, int out, std::size_t offset, std::size_t bytes)
      : in_(in), out_(out), offset_(offset), bytes_(bytes) {}

  void run(const RunContext& cx) override {
    const std::byte* src = cx.values[in_] + offset_;
    std::byte* dst = cx.values[out_];
    const auto parts = static_cast<std::int64_t>(
        std::min<std::size_t>(static_cast<std::size_t>(std::max(1, omp_get_max_threads())),
                              std::max<std::size_t>(1, bytes_ / kBytesPerThread)));
    if (parts == 1) {
      std::memcpy(dst, src, bytes_);
      return;
    }
    const std::size_t chunk =
        (bytes_ + static_cast<std::size_t>(parts) - 1) / static_cast<std::size_t>(parts);
#pragma omp parallel for schedule(static) num_threads(static_cast <int>(parts))
    for (std::int64_t p = 0; p < parts; ++p) {
      const std::size_t begin = static_cast<std::size_t>(p) * chunk;
      if (begin < bytes_) std::memcpy(dst + begin, src + begin, std::min(chunk, bytes_ - begin));
    }
  }

 private:
  int in_, out_;
  std::size_t offset_, bytes_;
};

}  // namespace

std::unique_ptr<Kernel> make_block_copy_kernel(const BuildContext& cx, std::size_t offset) {
  const std::size_t bytes =
      static_cast<std::size_t>(cx.out().shape.numel()) * dtype_size(cx.out().dtype);
  return std::make_unique<BlockCopyKernel>(cx.in_id(0), cx.out_id(), offset, bytes);
}

}  // namespace devpipe::cpu
