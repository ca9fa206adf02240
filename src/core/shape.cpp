#include "devpipe/shape.h"

#include "devpipe/error.h"

namespace devpipe {

std::int64_t Shape::numel() const {
  std::int64_t n = 1;
  for (auto d : dims_) {
    if (__builtin_mul_overflow(n, d, &n)) {
      // [2^40, 2^40, 0] has no elements, whatever order the product is taken in.
      for (auto z : dims_) {
        if (z == 0) return 0;
      }
      throw ShapeError("shape " + to_string() + " has more elements than an int64 holds");
    }
  }
  return n;
}

int Shape::axis(int i) const {
  int r = rank();
  int a = i < 0 ? i + r : i;
  if (a < 0 || a >= r) {
    throw ShapeError("dimension " + std::to_string(i) + " is out of range for shape " +
                     to_string() + " of rank " + std::to_string(r));
  }
  return a;
}

std::int64_t Shape::dim(int i) const { return dims_[static_cast<std::size_t>(axis(i))]; }

std::string Shape::to_string() const {
  std::string s = "[";
  for (std::size_t i = 0; i < dims_.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(dims_[i]);
  }
  return s + "]";
}

}  // namespace devpipe
