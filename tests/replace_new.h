// Replacement global operator new/delete for tests that count heap allocations.
//
// DEVPIPE_REPLACE_GLOBAL_NEW(alloc) defines EVERY replaceable form (plain, array, nothrow,
// aligned, aligned nothrow, and the sized and aligned deletes), each allocating with
// `alloc(bytes, alignment)` (a function returning std::malloc / std::aligned_alloc memory, or
// null when out of memory) and freeing with std::free. Replacing only some forms pairs, say,
// the library's nothrow new with our delete: the sanitizers report that as an
// alloc-dealloc-mismatch, and it is one. Expand the macro once per test binary, at namespace
// scope (replacement functions cannot be inline).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>

namespace devpipe::testing {

/// `bytes` from std::malloc, or from std::aligned_alloc when `align` exceeds what malloc
/// guarantees; null on failure.
inline void* heap_alloc(std::size_t bytes, std::size_t align) noexcept {
  if (bytes == 0) bytes = 1;
  if (align <= alignof(std::max_align_t)) return std::malloc(bytes);
  return std::aligned_alloc(align, (bytes + align - 1) / align * align);
}

}  // namespace devpipe::testing

#define DEVPIPE_REPLACE_GLOBAL_NEW(alloc)                                                            \
  void* operator new(std::size_t n) {                                                               \
    if (void* p = alloc(n, 0)) return p;                                                            \
    throw std::bad_alloc();                                                                         \
  }                                                                                                 \
  void* operator new[](std::size_t n) { return operator new(n); }                                   \
  void* operator new(std::size_t n, std::align_val_t a) {                                           \
    if (void* p = alloc(n, static_cast<std::size_t>(a))) return p;                                  \
    throw std::bad_alloc();                                                                         \
  }                                                                                                 \
  void* operator new[](std::size_t n, std::align_val_t a) { return operator new(n, a); }            \
  void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return alloc(n, 0); }         \
  void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return alloc(n, 0); }       \
  void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {           \
    return alloc(n, static_cast<std::size_t>(a));                                                   \
  }                                                                                                 \
  void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {         \
    return alloc(n, static_cast<std::size_t>(a));                                                   \
  }                                                                                                 \
  void operator delete(void* p) noexcept { std::free(p); }                                          \
  void operator delete[](void* p) noexcept { std::free(p); }                                        \
  void operator delete(void* p, std::size_t) noexcept { std::free(p); }                             \
  void operator delete[](void* p, std::size_t) noexcept { std::free(p); }                           \
  void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }                        \
  void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }                      \
  void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }           \
  void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }         \
  void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }                   \
  void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }                 \
  void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); } \
  void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { std::free(p); }
