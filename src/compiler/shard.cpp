#include "compiler/shard.h"

#include <cstring>

#include "devpipe/error.h"

namespace devpipe {

Tensor shard_tensor(const Tensor& full, int dim, int parts, int rank) {
  if (dim < 0 || parts == 1) return full;
  const Shape& s = full.shape();
  if (dim >= s.rank() || s[static_cast<std::size_t>(dim)] % parts != 0 || rank < 0 || rank >= parts) {
    throw ShapeError("cannot take part " + std::to_string(rank) + " of " + std::to_string(parts) +
                     " along dim " + std::to_string(dim) + " of shape " + s.to_string());
  }
  std::int64_t n = s[static_cast<std::size_t>(dim)];
  std::int64_t local = n / parts;
  std::size_t outer = 1, inner = dtype_size(full.dtype());
  for (int i = 0; i < dim; ++i) outer *= static_cast<std::size_t>(s[static_cast<std::size_t>(i)]);
  for (int i = dim + 1; i < s.rank(); ++i) inner *= static_cast<std::size_t>(s[static_cast<std::size_t>(i)]);
  Shape ls = s;
  ls[static_cast<std::size_t>(dim)] = local;
  Tensor out = Tensor::empty(ls, full.dtype());
  const char* src = static_cast<const char*>(full.raw_data());
  char* dst = static_cast<char*>(out.raw_data());
  std::size_t slab = static_cast<std::size_t>(local) * inner;
  for (std::size_t o = 0; o < outer; ++o) {
    std::memcpy(dst + o * slab, src + (o * static_cast<std::size_t>(n) + static_cast<std::size_t>(rank * local)) * inner, slab);
  }
  return out;
}

}  // namespace devpipe
