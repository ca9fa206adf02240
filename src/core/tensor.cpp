#include "devpipe/tensor.h"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <ostream>
#include <random>
#include <unordered_map>
#include <sstream>

#include "core/device_copy.h"
#include "core/pool.h"
#include "devpipe/error.h"

namespace devpipe {

struct Tensor::Storage {
  std::shared_ptr<void> owner;
  void* base = nullptr;
  std::size_t nbytes = 0;
  Device device;
  // Memory released by a callback instead of an owner (no control block of its own).
  detail::TensorAccess::ReleaseFn release = nullptr;
  void* release_context = nullptr;
  std::size_t release_arg = 0;

  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage() {
    if (release) release(release_context, base, release_arg);
  }
};

namespace detail {
namespace {
std::mutex g_copy_mutex;
DeviceCopyFn g_copy_fns[2] = {nullptr, nullptr};
}  // namespace

void register_device_copy(DeviceKind kind, DeviceCopyFn fn) {
  std::lock_guard lock(g_copy_mutex);
  g_copy_fns[static_cast<int>(kind)] = fn;
}

void copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) {
  if (bytes == 0) return;
  if (dst_dev.is_host() && src_dev.is_host()) {
    std::memcpy(dst, src, bytes);
    return;
  }
  DeviceKind kind = dst_dev.is_host() ? src_dev.kind : dst_dev.kind;
  DeviceCopyFn fn;
  {
    std::lock_guard lock(g_copy_mutex);
    fn = g_copy_fns[static_cast<int>(kind)];
  }
  if (!fn) {
    throw Unsupported("no backend for device kind '" + std::string(device_kind_name(kind)) +
                      "' is linked into this build; cannot copy " + std::to_string(bytes) +
                      " bytes from " + src_dev.to_string() + " to " + dst_dev.to_string());
  }
  fn(dst, dst_dev, src, src_dev, bytes);
}
}  // namespace detail

void* detail::host_alloc(std::size_t bytes) noexcept {
  constexpr std::size_t kHuge = std::size_t{2} << 20;
  if (bytes > std::numeric_limits<std::size_t>::max() - kHuge) return nullptr;  // rounding up would wrap
  if (bytes >= kHuge) {
    std::size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* p = std::aligned_alloc(kHuge, rounded);
    if (p) ::madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure is harmless
    return p;
  }
  return std::aligned_alloc(64, std::max<std::size_t>(64, (bytes + 63) / 64 * 64));
}

namespace {

void* aligned_alloc_bytes(std::size_t bytes) {
  void* p = detail::host_alloc(bytes);
  if (!p) throw OutOfMemory("host allocation of " + std::to_string(bytes) + " bytes failed");
  return p;
}

void free_aligned(void*, void* data, std::size_t) noexcept { std::free(data); }

class HostPool;
HostPool& host_pool();

/// A thread's own few free small host blocks in front of the HostPool's shared lists: a small
/// buffer released and acquired again on one thread (a chain of light stages, each forward's
/// output let go when the next one's is taken) takes no lock. Blocks of at most kMaxClass
/// bytes, at most kPerClass per size class in kClasses classes, so a thread holds at most
/// 128 KiB here; a thread's blocks go to the shared lists when it ends. host_pool_trim() does
/// not reach them.
class LocalHostBlocks {
 public:
  static constexpr std::size_t kMaxClass = 4 << 10;
  /// A cached block of size class `cls`, or null.
  static void* get(std::size_t cls) noexcept {
    if (cls > kMaxClass || dead_) return nullptr;
    for (Slot& s : cache().slots) {
      if (s.cls == cls && s.head) {
        void* p = s.head;
        s.head = *static_cast<void**>(p);
        --s.count;
        return p;
      }
    }
    return nullptr;
  }
  /// Keeps `p` (of size class `cls`) when there is room; false when the caller must release it.
  static bool put(void* p, std::size_t cls) noexcept {
    if (cls > kMaxClass || dead_) return false;
    Slot* room = nullptr;
    for (Slot& s : cache().slots) {
      if (s.cls == cls) {
        room = s.count < kPerClass ? &s : nullptr;
        break;
      }
      if (!room && s.count == 0) room = &s;  // a free slot, unless cls has its own further on
    }
    if (!room) return false;
    room->cls = cls;
    *static_cast<void**>(p) = room->head;
    room->head = p;
    ++room->count;
    return true;
  }

 private:
  static constexpr int kClasses = 8, kPerClass = 4;
  struct Slot {
    std::size_t cls = 0;
    void* head = nullptr;
    int count = 0;
  };
  struct Cache {
    Slot slots[kClasses];
    ~Cache();
  };
  static Cache& cache() {
    thread_local Cache c;
    return c;
  }
  static inline thread_local bool dead_ = false;  // trivially destructible: readable until the end
};

/// Caches 64-byte aligned host blocks in free lists keyed by size class, so that a steady
/// state of acquire/release (one forward after another) reuses the same blocks with no heap
/// allocation (the free lists are threaded through the cached blocks themselves). Size classes
/// are multiples of an eighth of the next power of two (at most 12.5% slack), at least 64.
/// Never destroyed: tensors may outlive static destruction.
class HostPool {
 public:
  void* acquire(std::size_t bytes, std::size_t* cls_out) {
    // Beyond this no allocation can succeed, and the size class arithmetic would overflow.
    if (bytes > kMaxBytes) throw OutOfMemory("host allocation of " + std::to_string(bytes) + " bytes failed");
    const std::size_t cls = size_class(bytes);
    *cls_out = cls;
    if (void* p = LocalHostBlocks::get(cls)) return p;
    {
      std::lock_guard lock(mutex_);
      auto it = free_.find(cls);
      if (it != free_.end() && it->second) {
        void* p = it->second;
        it->second = *static_cast<void**>(p);
        cached_bytes_ -= cls;
        return p;
      }
    }
    void* p = detail::host_alloc(cls);
    if (!p) {
      trim();
      p = detail::host_alloc(cls);
    }
    if (!p) throw OutOfMemory("host allocation of " + std::to_string(bytes) + " bytes failed");
    try {
      std::lock_guard lock(mutex_);
      free_.try_emplace(cls, nullptr);  // release() then never inserts
    } catch (...) {
      std::free(p);
      throw;
    }
    return p;
  }

  void release(void* p, std::size_t cls) noexcept {
    if (LocalHostBlocks::put(p, cls)) return;
    release_shared(p, cls);
  }

  /// Into the shared free list (a thread's own blocks go there when it ends).
  void release_shared(void* p, std::size_t cls) noexcept {
    std::lock_guard lock(mutex_);
    auto it = free_.find(cls);
    if (it == free_.end()) {  // not from acquire(); cannot happen
      std::free(p);
      return;
    }
    *static_cast<void**>(p) = it->second;
    it->second = p;
    cached_bytes_ += cls;
  }

  void trim() {
    std::lock_guard lock(mutex_);
    for (auto& [cls, head] : free_) {
      while (head) {
        void* next = *static_cast<void**>(head);
        std::free(head);
        head = next;
      }
    }
    cached_bytes_ = 0;
  }

 private:
  static constexpr std::size_t kMaxBytes = std::size_t{1} << 62;
  static std::size_t size_class(std::size_t bytes) {
    if (bytes <= 64) return 64;
    std::size_t pow2 = 64;
    while (pow2 < bytes) pow2 <<= 1;
    const std::size_t step = std::max<std::size_t>(pow2 / 8, 64);
    return (bytes + step - 1) / step * step;
  }

  std::mutex mutex_;
  std::unordered_map<std::size_t, void*> free_;  // size class -> first cached block
  std::size_t cached_bytes_ = 0;
};

HostPool& host_pool() {
  static HostPool* pool = new HostPool();
  return *pool;
}

LocalHostBlocks::Cache::~Cache() {
  dead_ = true;  // blocks released later in this thread's exit go to the shared lists
  for (Slot& s : slots) {
    while (s.head) {
      void* next = *static_cast<void**>(s.head);
      host_pool().release_shared(s.head, s.cls);
      s.head = next;
    }
  }
}

void release_to_host_pool(void*, void* data, std::size_t cls) noexcept {
  host_pool().release(data, cls);
}

void store_float(void* base, DType dtype, std::int64_t i, double v) {
  switch (dtype) {
    case DType::Float32:
      static_cast<float*>(base)[i] = static_cast<float>(v);
      return;
    case DType::BFloat16:
      static_cast<std::uint16_t*>(base)[i] = float_to_bf16(static_cast<float>(v));
      return;
    case DType::Float16:
      static_cast<std::uint16_t*>(base)[i] = float_to_fp16(static_cast<float>(v));
      return;
    case DType::Int64:
      static_cast<std::int64_t*>(base)[i] = static_cast<std::int64_t>(v);
      return;
  }
}

double load_float(const void* base, DType dtype, std::int64_t i) {
  switch (dtype) {
    case DType::Float32:
      return static_cast<const float*>(base)[i];
    case DType::BFloat16:
      return bf16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::Float16:
      return fp16_to_float(static_cast<const std::uint16_t*>(base)[i]);
    case DType::Int64:
      return static_cast<double>(static_cast<const std::int64_t*>(base)[i]);
  }
  return 0.0;
}

void check_dims(const Shape& shape) {
  for (auto d : shape.dims()) {
    if (d < 0) throw ShapeError("negative dimension in shape " + shape.to_string());
  }
}

/// Bytes of a tensor of `shape` and `dtype`, checked: ShapeError for a negative dim or a size
/// that overflows (never a wrapped-around, too small allocation).
std::size_t checked_nbytes(const Shape& shape, DType dtype) {
  check_dims(shape);
  std::size_t bytes = 0;
  if (__builtin_mul_overflow(static_cast<std::size_t>(shape.numel()), dtype_size(dtype), &bytes)) {
    throw ShapeError("shape " + shape.to_string() + " of " + std::string(dtype_name(dtype)) +
                     " needs more bytes than a size_t holds");
  }
  return bytes;
}

}  // namespace

Tensor Tensor::empty(const Shape& shape, DType dtype) {
  void* p = aligned_alloc_bytes(checked_nbytes(shape, dtype));
  Tensor t;
  detail::TensorAccess::rebind(t, p, shape, dtype, Device::cpu(), &free_aligned, nullptr, 0);
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype) {
  Tensor t = empty(shape, dtype);
  std::memset(t.raw_data(), 0, t.nbytes());
  return t;
}

Tensor Tensor::full(const Shape& shape, double value, DType dtype) {
  Tensor t = empty(shape, dtype);
  for (std::int64_t i = 0; i < t.numel(); ++i) store_float(t.raw_data(), dtype, i, value);
  return t;
}

Tensor Tensor::ones(const Shape& shape, DType dtype) { return full(shape, 1.0, dtype); }

Tensor Tensor::randn(const Shape& shape, std::uint64_t seed, DType dtype) {
  Tensor t = empty(shape, dtype);
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  for (std::int64_t i = 0; i < t.numel(); ++i) store_float(t.raw_data(), dtype, i, dist(gen));
  return t;
}

Tensor Tensor::uniform(const Shape& shape, double low, double high, std::uint64_t seed,
                       DType dtype) {
  Tensor t = empty(shape, dtype);
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(low, high);
  for (std::int64_t i = 0; i < t.numel(); ++i) store_float(t.raw_data(), dtype, i, dist(gen));
  return t;
}

Tensor Tensor::randint(const Shape& shape, std::int64_t high, std::uint64_t seed) {
  if (high <= 0) throw InvalidArgument("randint: high must be positive, got " + std::to_string(high));
  Tensor t = empty(shape, DType::Int64);
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<std::int64_t> dist(0, high - 1);
  auto* p = t.data<std::int64_t>();
  for (std::int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

Tensor Tensor::from_vector(const std::vector<float>& values, const Shape& shape, DType dtype) {
  if (static_cast<std::int64_t>(values.size()) != shape.numel()) {
    throw ShapeError("from_vector: " + std::to_string(values.size()) +
                     " values do not fill shape " + shape.to_string() + " (" +
                     std::to_string(shape.numel()) + " elements)");
  }
  Tensor t = empty(shape, dtype);
  for (std::size_t i = 0; i < values.size(); ++i) {
    store_float(t.raw_data(), dtype, static_cast<std::int64_t>(i), values[i]);
  }
  return t;
}

Tensor Tensor::from_vector_i64(const std::vector<std::int64_t>& values, const Shape& shape) {
  if (static_cast<std::int64_t>(values.size()) != shape.numel()) {
    throw ShapeError("from_vector_i64: " + std::to_string(values.size()) +
                     " values do not fill shape " + shape.to_string());
  }
  Tensor t = empty(shape, DType::Int64);
  std::memcpy(t.raw_data(), values.data(), values.size() * sizeof(std::int64_t));
  return t;
}

Tensor Tensor::from_blob(void* data, const Shape& shape, DType dtype, Device device,
                         std::shared_ptr<void> owner) {
  const std::size_t nbytes = checked_nbytes(shape, dtype);
  Tensor t;
  t.storage_ = detail::TensorAccess::make_storage();
  t.storage_->owner = std::move(owner);
  t.storage_->base = data;
  t.storage_->nbytes = nbytes;
  t.storage_->device = device;
  t.shape_ = shape;
  t.dtype_ = dtype;
  return t;
}

namespace detail {

void* host_pool_acquire(std::size_t bytes, std::size_t* cls) { return host_pool().acquire(bytes, cls); }
void host_pool_release(void* block, std::size_t cls) noexcept { host_pool().release(block, cls); }
void host_pool_trim() { host_pool().trim(); }

std::shared_ptr<Tensor::Storage> TensorAccess::make_storage() {
  return std::allocate_shared<Tensor::Storage>(PoolAllocator<Tensor::Storage>());
}

void TensorAccess::rebind(Tensor& t, void* data, const Shape& shape, DType dtype, Device device,
                          ReleaseFn release, void* context, std::size_t arg) {
  std::shared_ptr<Tensor::Storage> st;
  try {
    st = make_storage();
  } catch (...) {
    if (release) release(context, data, arg);
    throw;
  }
  st->base = data;
  st->nbytes = static_cast<std::size_t>(shape.numel()) * dtype_size(dtype);
  st->device = device;
  st->release = release;
  st->release_context = context;
  st->release_arg = arg;
  t.storage_ = std::move(st);
  t.offset_ = 0;
  t.dtype_ = dtype;
  t.shape_ = shape;  // copy-assignment: reuses t's buffer when it is large enough
}

void TensorAccess::rebind_host_pool(Tensor& t, const Shape& shape, DType dtype, Device device) {
  std::size_t cls = 0;
  void* p = host_pool().acquire(checked_nbytes(shape, dtype), &cls);
  rebind(t, p, shape, dtype, device, &release_to_host_pool, nullptr, cls);
}

void TensorAccess::drop(Tensor& t) noexcept {
  t.storage_.reset();
  t.offset_ = 0;
}

}  // namespace detail

Device Tensor::device() const { return storage_ ? storage_->device : Device::cpu(); }

std::size_t Tensor::nbytes() const {
  return static_cast<std::size_t>(numel()) * dtype_size(dtype_);
}

void* Tensor::raw_data() const {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_->base) + offset_;
}

void Tensor::check_host(const char* what) const {
  if (!storage_) throw StateError(std::string(what) + ": tensor is undefined");
  if (!storage_->device.is_host()) {
    throw StateError(std::string(what) + ": tensor lives on " + storage_->device.to_string() +
                     ", not in host memory; call to_host() first");
  }
}

template <class T>
T* Tensor::data() const {
  check_host("data()");
  bool ok = false;
  if constexpr (std::is_same_v<T, float>) ok = dtype_ == DType::Float32;
  if constexpr (std::is_same_v<T, std::uint16_t>) {
    ok = dtype_ == DType::BFloat16 || dtype_ == DType::Float16;
  }
  if constexpr (std::is_same_v<T, std::int64_t>) ok = dtype_ == DType::Int64;
  if (!ok) {
    throw DTypeError("data(): tensor has dtype " + std::string(dtype_name(dtype_)) +
                     ", which does not match the requested element type");
  }
  return static_cast<T*>(raw_data());
}

template float* Tensor::data<float>() const;
template std::uint16_t* Tensor::data<std::uint16_t>() const;
template std::int64_t* Tensor::data<std::int64_t>() const;

bool Tensor::same_memory(const Tensor& other) const {
  return storage_ && other.storage_ && raw_data() == other.raw_data() &&
         device() == other.device();
}

Tensor Tensor::reshape(const Shape& shape) const {
  Shape s = shape;
  int infer = -1;
  std::int64_t known = 1;
  for (int i = 0; i < s.rank(); ++i) {
    if (s[i] == -1) {
      if (infer >= 0) throw ShapeError("reshape: more than one -1 in " + shape.to_string());
      infer = i;
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0 && known > 0 && numel() % known == 0) s[infer] = numel() / known;
  if (s.numel() != numel()) {
    throw ShapeError("reshape: cannot view shape " + shape_.to_string() + " (" +
                     std::to_string(numel()) + " elements) as " + shape.to_string());
  }
  Tensor t = *this;
  t.shape_ = s;
  return t;
}

Tensor Tensor::narrow_rows(std::int64_t begin, std::int64_t end) const {
  if (rank() == 0 || begin < 0 || end < begin || end > shape_[0]) {
    throw ShapeError("narrow_rows: rows [" + std::to_string(begin) + ", " + std::to_string(end) +
                     ") out of range for shape " + shape_.to_string());
  }
  Tensor t = *this;
  std::size_t row_bytes = shape_[0] ? nbytes() / static_cast<std::size_t>(shape_[0]) : 0;
  t.offset_ += static_cast<std::size_t>(begin) * row_bytes;
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  if (!storage_) return {};
  if (!device().is_host()) {
    throw Unsupported("clone() of a " + device().to_string() +
                      " tensor: use the backend's allocation; call to_host() for a host copy");
  }
  Tensor t = empty(shape_, dtype_);
  std::memcpy(t.raw_data(), raw_data(), nbytes());
  return t;
}

Tensor Tensor::to_host() const {
  if (!storage_ || device().is_host()) return *this;
  Tensor t = empty(shape_, dtype_);
  detail::copy_bytes(t.raw_data(), Device::cpu(), raw_data(), device(), nbytes());
  return t;
}

Tensor Tensor::to_dtype(DType dtype) const {
  check_host("to_dtype()");
  if (dtype == dtype_) return *this;
  Tensor t = empty(shape_, dtype);
  for (std::int64_t i = 0; i < numel(); ++i) {
    store_float(t.raw_data(), dtype, i, load_float(raw_data(), dtype_, i));
  }
  return t;
}

std::vector<float> Tensor::to_float_vector() const {
  Tensor h = to_host();
  std::vector<float> out(static_cast<std::size_t>(numel()));
  for (std::int64_t i = 0; i < numel(); ++i) {
    out[static_cast<std::size_t>(i)] = static_cast<float>(load_float(h.raw_data(), dtype_, i));
  }
  return out;
}

void Tensor::copy_from(const Tensor& src) {
  if (src.dtype() != dtype_ || src.numel() != numel()) {
    throw ShapeError("copy_from: source " + src.shape().to_string() + " " +
                     std::string(dtype_name(src.dtype())) + " does not fit destination " +
                     shape_.to_string() + " " + std::string(dtype_name(dtype_)));
  }
  detail::copy_bytes(raw_data(), device(), src.raw_data(), src.device(), nbytes());
}

namespace {
void print_rec(std::ostringstream& os, const Tensor& h, int dim, std::int64_t offset,
               int max_per_dim, const std::vector<std::int64_t>& strides) {
  const Shape& s = h.shape();
  os << "[";
  std::int64_t n = s[dim];
  auto emit = [&](std::int64_t i) {
    if (dim == s.rank() - 1) {
      double v = load_float(h.raw_data(), h.dtype(), offset + i);
      if (h.dtype() == DType::Int64) {
        os << static_cast<std::int64_t>(v);
      } else {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.4f", v);
        os << buf;
      }
    } else {
      print_rec(os, h, dim + 1, offset + i * strides[dim], max_per_dim, strides);
    }
  };
  bool elide = n > max_per_dim;
  std::int64_t head = elide ? max_per_dim / 2 : n;
  for (std::int64_t i = 0; i < head; ++i) {
    if (i) os << ", ";
    emit(i);
  }
  if (elide) {
    os << ", ...";
    for (std::int64_t i = n - (max_per_dim - head); i < n; ++i) {
      os << ", ";
      emit(i);
    }
  }
  os << "]";
}
}  // namespace

std::string Tensor::to_string(int max_per_dim) const {
  if (!storage_) return "tensor(undefined)";
  std::ostringstream os;
  os << "tensor(shape=" << shape_.to_string() << ", dtype=" << dtype_name(dtype_)
     << ", device=" << device().to_string() << ")";
  Tensor h = to_host();
  if (rank() == 0) {
    os << " " << load_float(h.raw_data(), dtype_, 0);
    return os.str();
  }
  if (numel() == 0) return os.str() + " []";
  std::vector<std::int64_t> strides(static_cast<std::size_t>(rank()), 1);
  for (int i = rank() - 2; i >= 0; --i) strides[i] = strides[i + 1] * shape_[i + 1];
  os << "\n";
  print_rec(os, h, 0, 0, std::max(2, max_per_dim), strides);
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Tensor& t) { return os << t.to_string(); }
std::ostream& operator<<(std::ostream& os, const Shape& s) { return os << s.to_string(); }

double max_abs_diff(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) {
    throw ShapeError("max_abs_diff: shapes differ: " + a.shape().to_string() + " vs " +
                     b.shape().to_string());
  }
  auto va = a.to_float_vector();
  auto vb = b.to_float_vector();
  double m = 0;
  for (std::size_t i = 0; i < va.size(); ++i) {
    double d = std::fabs(static_cast<double>(va[i]) - vb[i]);
    if (std::isnan(d)) return d;
    m = std::max(m, d);
  }
  return m;
}

bool allclose(const Tensor& a, const Tensor& b, double rtol, double atol) {
  if (a.shape() != b.shape()) return false;
  auto va = a.to_float_vector();
  auto vb = b.to_float_vector();
  for (std::size_t i = 0; i < va.size(); ++i) {
    double d = std::fabs(static_cast<double>(va[i]) - vb[i]);
    if (!(d <= atol + rtol * std::fabs(static_cast<double>(vb[i])))) return false;
  }
  return true;
}

}  // namespace devpipe
