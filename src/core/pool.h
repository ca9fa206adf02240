// Internal: allocation-free steady state for the runtime's hot path.
//
//  - FixedBlockPool / PoolAllocator: thread-safe free lists of fixed-size blocks (shared_ptr
//    control blocks, tensor storages). Blocks come from operator new the first time and are
//    recycled forever after; nothing is ever given back to the heap.
//  - host_pool_*: the process-wide caching pool of 64-byte aligned host memory (the cpu
//    backend's device memory and the runtime's host results).
//  - TensorAccess: re-points an existing Tensor handle at new memory while keeping its shape
//    buffer, so a reused handle costs no allocation.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>

#include "devpipe/tensor.h"

namespace devpipe::detail {

/// A free list of blocks of one size. Thread-safe; never destroyed (see fixed_block_pool).
class FixedBlockPool {
 public:
  explicit FixedBlockPool(std::size_t size) : size_(size < sizeof(Node) ? sizeof(Node) : size) {}
  void* get() {
    {
      std::lock_guard lock(mu_);
      if (head_) {
        Node* n = head_;
        head_ = n->next;
        return n;
      }
    }
    return ::operator new(size_);
  }
  void put(void* p) noexcept {
    std::lock_guard lock(mu_);
    auto* n = static_cast<Node*>(p);
    n->next = head_;
    head_ = n;
  }

 private:
  struct Node {
    Node* next;
  };
  std::size_t size_;
  std::mutex mu_;
  Node* head_ = nullptr;
};

/// The pool for blocks of `Size` bytes (one per size for the whole program).
template <std::size_t Size>
FixedBlockPool& fixed_block_pool() {
  static FixedBlockPool* pool = new FixedBlockPool(Size);  // outlives static destruction
  return *pool;
}

/// A thread's own few free blocks of `Size` bytes in front of fixed_block_pool<Size>(): a block
/// freed and taken again on one thread (a forward's job and tensor control blocks) takes no
/// lock. At most kMax per thread; the rest, and a thread's blocks when it ends, go to the
/// shared list.
template <std::size_t Size>
class LocalBlocks {
 public:
  static void* get() {
    if (!dead_) {
      Cache& c = cache();
      if (c.head) {
        Node* n = c.head;
        c.head = n->next;
        --c.count;
        return n;
      }
    }
    return fixed_block_pool<Size>().get();
  }
  static void put(void* p) noexcept {
    if (!dead_) {
      Cache& c = cache();
      if (c.count < kMax) {
        auto* n = static_cast<Node*>(p);
        n->next = c.head;
        c.head = n;
        ++c.count;
        return;
      }
    }
    fixed_block_pool<Size>().put(p);
  }

 private:
  struct Node {
    Node* next;
  };
  static_assert(Size >= sizeof(Node), "a block holds the free list's link");
  static constexpr int kMax = 32;
  struct Cache {
    Node* head = nullptr;
    int count = 0;
    ~Cache() {
      dead_ = true;  // blocks freed later in this thread's exit go to the shared list
      while (head) {
        Node* n = head->next;
        fixed_block_pool<Size>().put(head);
        head = n;
      }
    }
  };
  static Cache& cache() {
    thread_local Cache c;
    return c;
  }
  static inline thread_local bool dead_ = false;  // trivially destructible: readable until the end
};

/// A std allocator drawing single objects from LocalBlocks<sizeof(T)>: for
/// std::allocate_shared and shared_ptr control blocks on the hot path.
template <class T>
struct PoolAllocator {
  using value_type = T;
  PoolAllocator() = default;
  template <class U>
  PoolAllocator(const PoolAllocator<U>&) noexcept {}  // NOLINT
  T* allocate(std::size_t n) {
    static_assert(alignof(T) <= __STDCPP_DEFAULT_NEW_ALIGNMENT__, "over-aligned type");
    if (n == 1) return static_cast<T*>(LocalBlocks<sizeof(T)>::get());
    return static_cast<T*>(::operator new(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n == 1) {
      LocalBlocks<sizeof(T)>::put(p);
    } else {
      ::operator delete(p);
    }
  }
  template <class U>
  bool operator==(const PoolAllocator<U>&) const noexcept {
    return true;
  }
};

/// A 64-byte aligned host block of at least `bytes` bytes from the caching host pool; `*cls`
/// receives its size class (pass it back to host_pool_release). Throws OutOfMemory.
void* host_pool_acquire(std::size_t bytes, std::size_t* cls);
/// Host memory for a large buffer, freed with std::free: 64-byte aligned; from 2 MiB on it is
/// aligned to 2 MiB and advised for transparent huge pages (fewer TLB misses when a kernel
/// streams through hundreds of MB). Returns nullptr when the allocation fails.
void* host_alloc(std::size_t bytes) noexcept;
/// Returns a block to the pool (thread-safe, no allocation).
void host_pool_release(void* block, std::size_t cls) noexcept;
/// Frees every cached host block.
void host_pool_trim();

/// Runtime access to Tensor internals (reusing handles without reallocating their shape).
struct TensorAccess {
  /// Called once when the last view of a storage goes.
  using ReleaseFn = void (*)(void* context, void* data, std::size_t arg) noexcept;

  /// Re-points `t` at `data` (whose release is `release(context, data, arg)`, may be null)
  /// with `shape` copied into t's existing shape buffer: no heap allocation once t's shape
  /// buffer is large enough.
  static void rebind(Tensor& t, void* data, const Shape& shape, DType dtype, Device device,
                     ReleaseFn release, void* context, std::size_t arg);
  /// Re-points `t` at a fresh block of the host pool (device `device`, a host device).
  static void rebind_host_pool(Tensor& t, const Shape& shape, DType dtype,
                               Device device = Device::cpu());
  /// Drops t's reference to its memory, keeping its shape buffer for the next rebind.
  static void drop(Tensor& t) noexcept;
  /// A new storage whose control block comes from a PoolAllocator.
  static std::shared_ptr<Tensor::Storage> make_storage();
};

/// Sets `dst` to [rows, sample...] reusing dst's buffer.
inline void set_with_batch(Shape& dst, const Shape& sample, std::int64_t rows) {
  auto& d = dst.dims();
  const auto& s = sample.dims();
  d.resize(s.size() + 1);
  d[0] = rows;
  for (std::size_t i = 0; i < s.size(); ++i) d[i + 1] = s[i];
}

/// True when `full` is [any, sample...].
inline bool has_sample_shape(const Shape& full, const Shape& sample) {
  const auto& f = full.dims();
  const auto& s = sample.dims();
  if (f.size() != s.size() + 1) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (f[i + 1] != s[i]) return false;
  }
  return true;
}

}  // namespace devpipe::detail
