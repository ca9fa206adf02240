// devpipe — tensors.
//
// A Tensor is a shared handle to a contiguous, row-major block of memory on a device, plus a
// shape and dtype. Copying a Tensor copies the handle, not the data (like torch.Tensor); the
// memory is freed when the last handle goes. Views (reshape, narrow along dim 0) share memory.
// A Tensor is not synchronised: concurrent writes to one storage from several threads are the
// caller's business.
#pragma once

#include <cstddef>
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <string>
#include <vector>

#include "devpipe/device.h"
#include "devpipe/dtype.h"
#include "devpipe/shape.h"

namespace devpipe {

namespace detail {
struct TensorAccess;  // runtime internals (src/core/pool.h)
}

class Tensor {
 public:
  /// An undefined tensor (defined() == false).
  Tensor() = default;

  // ---- factories (host memory unless a device is given; device memory needs its backend) ----
  /// Uninitialised host tensor, 64-byte aligned (its own allocation, freed with its last view).
  static Tensor empty(const Shape& shape, DType dtype = DType::Float32);
  static Tensor zeros(const Shape& shape, DType dtype = DType::Float32);
  static Tensor ones(const Shape& shape, DType dtype = DType::Float32);
  static Tensor full(const Shape& shape, double value, DType dtype = DType::Float32);
  /// Standard normal samples from a deterministic generator seeded with `seed`.
  static Tensor randn(const Shape& shape, std::uint64_t seed, DType dtype = DType::Float32);
  /// Uniform samples in [low, high) from a deterministic generator seeded with `seed`.
  static Tensor uniform(const Shape& shape, double low, double high, std::uint64_t seed,
                        DType dtype = DType::Float32);
  /// Random integers in [0, high) (int64).
  static Tensor randint(const Shape& shape, std::int64_t high, std::uint64_t seed);
  /// Copies `values` (converted to `dtype`); throws ShapeError when the count differs.
  static Tensor from_vector(const std::vector<float>& values, const Shape& shape,
                            DType dtype = DType::Float32);
  static Tensor from_vector_i64(const std::vector<std::int64_t>& values, const Shape& shape);
  /// Wraps memory the caller owns; `owner` is kept alive as long as any view of the tensor.
  static Tensor from_blob(void* data, const Shape& shape, DType dtype, Device device,
                          std::shared_ptr<void> owner);

  // ---- properties ----
  bool defined() const { return static_cast<bool>(storage_); }
  const Shape& shape() const { return shape_; }
  DType dtype() const { return dtype_; }
  Device device() const;
  std::int64_t numel() const { return shape_.numel(); }
  std::size_t nbytes() const;
  int rank() const { return shape_.rank(); }
  std::int64_t dim(int i) const { return shape_.dim(i); }

  /// Pointer to the first element (device memory for device tensors).
  void* raw_data() const;
  /// Typed host pointer; throws DTypeError when T does not match dtype(), StateError when the
  /// tensor is undefined or not in host memory.
  template <class T>
  T* data() const;

  /// True when both tensors view the same bytes.
  bool same_memory(const Tensor& other) const;

  // ---- views (share memory) ----
  /// Same data, new shape with the same numel; one dim may be -1.
  Tensor reshape(const Shape& shape) const;
  /// Rows [begin, end) along dim 0.
  Tensor narrow_rows(std::int64_t begin, std::int64_t end) const;

  // ---- copies ----
  /// Deep copy on the same device.
  Tensor clone() const;
  /// Copy to host memory (returns *this when already on the host).
  Tensor to_host() const;
  /// Host copy converted to `dtype` (returns *this when the dtype already matches).
  Tensor to_dtype(DType dtype) const;
  /// All elements as float (host tensors of any dtype).
  std::vector<float> to_float_vector() const;
  /// Copies the bytes of `src` into this tensor (same dtype and numel, host memory).
  void copy_from(const Tensor& src);

  /// PyTorch-like printout: shape, dtype, device and (up to `max_per_dim` per dim) values.
  std::string to_string(int max_per_dim = 6) const;

 private:
  friend struct detail::TensorAccess;
  struct Storage;
  std::shared_ptr<Storage> storage_;
  std::size_t offset_ = 0;  // bytes from the storage base
  Shape shape_;
  DType dtype_ = DType::Float32;

  void check_host(const char* what) const;
};

std::ostream& operator<<(std::ostream& os, const Tensor& t);
std::ostream& operator<<(std::ostream& os, const Shape& s);

/// Largest elementwise |a - b| over two host tensors of equal shape (any floating dtype).
double max_abs_diff(const Tensor& a, const Tensor& b);
/// True when |a - b| <= atol + rtol * |b| elementwise (like torch.allclose).
bool allclose(const Tensor& a, const Tensor& b, double rtol, double atol);

}  // namespace devpipe
