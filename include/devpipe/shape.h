// devpipe — tensor shapes.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace devpipe {

/// A tensor shape: a list of non-negative dimension sizes, outermost first (row-major).
class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) : dims_(dims) {}
  explicit Shape(std::vector<std::int64_t> dims) : dims_(std::move(dims)) {}

  /// Number of dimensions.
  int rank() const { return static_cast<int>(dims_.size()); }
  /// Product of all dimensions (1 for a scalar); ShapeError when it overflows an int64.
  std::int64_t numel() const;
  /// Dimension i; negative i counts from the end. Throws ShapeError when out of range.
  std::int64_t dim(int i) const;
  std::int64_t operator[](std::size_t i) const { return dims_[i]; }
  std::int64_t& operator[](std::size_t i) { return dims_[i]; }
  const std::vector<std::int64_t>& dims() const { return dims_; }
  std::vector<std::int64_t>& dims() { return dims_; }
  /// Normalises a possibly negative axis against rank(); throws ShapeError when out of range.
  int axis(int i) const;

  /// "[32, 3, 224, 224]".
  std::string to_string() const;

  friend bool operator==(const Shape&, const Shape&) = default;

 private:
  std::vector<std::int64_t> dims_;
};

}  // namespace devpipe
