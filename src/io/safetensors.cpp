// devpipe — safetensors reading (mmap + full validation) and writing (atomic).
//
// Reading: the whole file is mapped MAP_PRIVATE with PROT_READ | PROT_WRITE, so a caller that
// writes into a returned view gets private copy-on-write pages (never a crash, never a change to
// the file). The header is validated completely in open(): every entry's dtype, shape and
// offsets, and the data section must be covered exactly (no overlaps, no gaps, no trailing
// bytes), as the published format requires.
//
// Alignment: the mapping base is page aligned, but a tensor starts at 8 + N + begin, which need
// not be a multiple of its element size (odd header length, or a 2-byte tensor of odd length
// before a 4-byte one). get() returns a view only when the tensor is aligned to its element
// size; otherwise it returns an aligned owned copy of the bytes.
#include "devpipe/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <set>
#include <unordered_map>

#include <nlohmann/json.hpp>

#include "devpipe/error.h"

namespace devpipe::safetensors {

namespace {

using Json = nlohmann::ordered_json;

/// Upper bound on the JSON header; anything larger is treated as a corrupt length prefix.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

[[noreturn]] void format_error(const std::string& path, const std::string& what) {
  throw FormatError("safetensors file " + in_quotes(path) + ": " + what);
}

std::string errno_text(int err) { return std::strerror(err); }

/// Safetensors dtype code ("F32", ...) of a devpipe dtype.
const char* dtype_code(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return "F32";
    case DType::BFloat16:
      return "BF16";
    case DType::Float16:
      return "F16";
    case DType::Int64:
      return "I64";
  }
  return "?";
}

/// Parses a safetensors dtype code; only the four codes devpipe supports are accepted (the
/// long names that dtype_from_name() also knows are not valid in a safetensors header).
bool parse_dtype_code(const std::string& code, DType* out) {
  for (DType d : {DType::Float32, DType::BFloat16, DType::Float16, DType::Int64}) {
    if (code == dtype_code(d)) {
      *out = d;
      return true;
    }
  }
  return false;
}

/// Reads a JSON number as a non-negative integer that fits `limit`; false otherwise.
bool as_count(const Json& j, std::uint64_t limit, std::uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<std::uint64_t>();
  } else if (j.is_number_integer()) {
    std::int64_t v = j.get<std::int64_t>();
    if (v < 0) return false;
    *out = static_cast<std::uint64_t>(v);
  } else {
    return false;
  }
  return *out <= limit;
}

std::uint64_t read_u64_le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

/// Parses the header, detecting duplicate keys at any nesting level (the plain parser would
/// silently keep one of them).
Json parse_header(const std::string& path, const char* begin, const char* end) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto callback = [&](int /*depth*/, nlohmann::json::parse_event_t event, Json& parsed) {
    using E = nlohmann::json::parse_event_t;
    if (event == E::object_start) {
      open_objects.emplace_back();
    } else if (event == E::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == E::key && !open_objects.empty() && duplicate.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) duplicate = key;
    }
    return true;
  };
  Json header;
  try {
    header = Json::parse(begin, end, callback, /*allow_exceptions=*/true);
  } catch (const nlohmann::json::exception& e) {
    format_error(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!duplicate.empty()) format_error(path, "header has duplicate key " + in_quotes(duplicate));
  if (!header.is_object()) {
    format_error(path, std::string("header is not a JSON object but a JSON ") + header.type_name());
  }
  return header;
}

/// Validates one header entry (everything that does not depend on the other entries).
TensorInfo parse_entry(const std::string& path, const std::string& name, const Json& j,
                       std::uint64_t data_size) {
  std::string where = "tensor " + in_quotes(name);
  if (!j.is_object()) format_error(path, where + " is not a JSON object but a " + j.type_name());
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!j.contains(field)) format_error(path, where + " has no \"" + field + "\" field");
  }
  TensorInfo info;
  info.name = name;

  const Json& jd = j["dtype"];
  if (!jd.is_string()) format_error(path, where + ": dtype is not a string: " + jd.dump());
  const auto& code = jd.get_ref<const std::string&>();
  if (!parse_dtype_code(code, &info.dtype)) {
    format_error(path, where + " has unknown or unsupported dtype " + in_quotes(code) +
                           " (supported: F32, BF16, F16, I64)");
  }

  const Json& js = j["shape"];
  if (!js.is_array()) format_error(path, where + ": shape is not an array: " + js.dump());
  std::vector<std::int64_t> dims;
  // The product of the non-zero dims must fit an int64 so that Shape::numel() cannot overflow
  // whatever order it multiplies in.
  std::uint64_t product = 1;
  constexpr auto kMaxI64 = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
  for (const Json& d : js) {
    std::uint64_t v = 0;
    if (!as_count(d, kMaxI64, &v)) {
      format_error(path, where + ": shape " + js.dump() + " has dimension " + d.dump() +
                             ", which is not a non-negative integer");
    }
    if (v != 0 && (__builtin_mul_overflow(product, v, &product) || product > kMaxI64)) {
      format_error(path, where + ": shape " + js.dump() + " has too many elements (overflow)");
    }
    dims.push_back(static_cast<std::int64_t>(v));
  }
  info.shape = Shape(std::move(dims));

  const Json& jo = j["data_offsets"];
  std::uint64_t b = 0, e = 0;
  if (!jo.is_array() || jo.size() != 2 || !as_count(jo[0], UINT64_MAX, &b) ||
      !as_count(jo[1], UINT64_MAX, &e)) {
    format_error(path, where + ": data_offsets " + jo.dump() +
                           " is not a pair of non-negative integers [begin, end]");
  }
  if (b > e) {
    format_error(path, where + ": data_offsets [" + std::to_string(b) + ", " + std::to_string(e) +
                           "] has begin > end");
  }
  if (e > data_size) {
    format_error(path, where + " ends at byte " + std::to_string(e) +
                           " of the data section, but the data section has only " +
                           std::to_string(data_size) + " bytes (truncated file?)");
  }
  std::uint64_t numel = info.shape.numel();
  std::uint64_t expected = 0;
  bool overflow = __builtin_mul_overflow(numel, dtype_size(info.dtype), &expected);
  if (overflow || expected != e - b) {
    format_error(path, where + " has " + std::to_string(e - b) + " bytes of data, but shape " +
                           info.shape.to_string() + " of " + code + " needs " +
                           (overflow ? std::string("more than 2^64") : std::to_string(expected)));
  }
  info.begin = b;
  info.end = e;
  return info;
}

/// Closes a file descriptor when it goes out of scope.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

struct File::Impl {
  std::string path;
  void* map = nullptr;  // nullptr when the file was not mapped
  std::size_t map_size = 0;
  std::size_t data_start = 0;  // 8 + header length
  std::vector<std::string> names;
  std::unordered_map<std::string, TensorInfo> infos;
  std::map<std::string, std::string> metadata;

  Impl() = default;
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    if (map) ::munmap(map, map_size);
  }

  const unsigned char* bytes() const { return static_cast<const unsigned char*>(map); }
};

File File::open(const std::string& path) {
  // O_NONBLOCK: a FIFO is refused below instead of waited on (regular files ignore the flag).
  FdCloser fd{::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC)};
  if (fd.fd < 0) {
    int err = errno;
    throw IoError("cannot open safetensors file " + in_quotes(path) + ": " + errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) {
    int err = errno;
    throw IoError("cannot stat safetensors file " + in_quotes(path) + ": " + errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    throw IoError("cannot read safetensors file " + in_quotes(path) + ": not a regular file");
  }
  auto size = static_cast<std::uint64_t>(st.st_size);
  if (size < 8) {
    format_error(path, "file is " + std::to_string(size) +
                           " bytes long, shorter than the 8-byte header length");
  }

  auto impl = std::make_shared<Impl>();
  impl->path = path;
  void* map = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd.fd, 0);
  if (map == MAP_FAILED) {
    int err = errno;
    throw IoError("cannot memory-map safetensors file " + in_quotes(path) + " (" +
                  std::to_string(size) + " bytes): " + errno_text(err));
  }
  impl->map = map;
  impl->map_size = size;

  std::uint64_t header_len = read_u64_le(impl->bytes());
  if (header_len > kMaxHeaderBytes) {
    format_error(path, "header length " + std::to_string(header_len) + " exceeds the limit of " +
                           std::to_string(kMaxHeaderBytes) + " bytes (file is " +
                           std::to_string(size) + " bytes; corrupt length prefix?)");
  }
  if (header_len > size - 8) {
    format_error(path, "header length " + std::to_string(header_len) +
                           " is larger than the file allows (file is " + std::to_string(size) +
                           " bytes, so at most " + std::to_string(size - 8) +
                           " bytes of header; truncated file?)");
  }
  impl->data_start = 8 + header_len;
  const std::uint64_t data_size = size - impl->data_start;
  const char* hb = reinterpret_cast<const char*>(impl->bytes()) + 8;
  Json header = parse_header(path, hb, hb + header_len);

  std::vector<TensorInfo> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == kMetadataKey) {
      if (!value.is_object()) {
        format_error(path, std::string("\"") + kMetadataKey + "\" is not a JSON object but a " +
                               value.type_name());
      }
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) {
          format_error(path, std::string("\"") + kMetadataKey + "\" value of " + in_quotes(mk) +
                                 " is not a string: " + mv.dump());
        }
        impl->metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_entry(path, key, value, data_size));
  }

  // The data section must be covered exactly: sorted by offsets, each tensor starts where the
  // previous one ended, and the last one ends at the end of the file. Zero-size tensors may
  // share an offset with a neighbour. The sort is stable, so ties keep the header's order.
  std::stable_sort(entries.begin(), entries.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t pos = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& e : entries) {
    if (e.begin < pos) {
      format_error(path, "tensors " + in_quotes(prev->name) + " [" + std::to_string(prev->begin) +
                             ", " + std::to_string(prev->end) + ") and " + in_quotes(e.name) +
                             " [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
                             ") overlap in the data section");
    }
    if (e.begin > pos) {
      format_error(path, "bytes [" + std::to_string(pos) + ", " + std::to_string(e.begin) +
                             ") of the data section are not covered by any tensor (gap before " +
                             in_quotes(e.name) + ")");
    }
    pos = e.end;
    prev = &e;
  }
  if (pos != data_size) {
    format_error(path, "bytes [" + std::to_string(pos) + ", " + std::to_string(data_size) +
                           ") at the end of the data section are not covered by any tensor");
  }

  for (TensorInfo& e : entries) {
    impl->names.push_back(e.name);
    impl->infos.emplace(e.name, std::move(e));
  }
  File f;
  f.impl_ = std::move(impl);
  return f;
}

const std::string& File::path() const { return impl_->path; }

const std::vector<std::string>& File::names() const { return impl_->names; }

bool File::contains(const std::string& name) const { return impl_->infos.count(name) != 0; }

const TensorInfo& File::info(const std::string& name) const {
  auto it = impl_->infos.find(name);
  if (it == impl_->infos.end()) {
    throw InvalidArgument("safetensors file " + in_quotes(impl_->path) + " has no tensor named " +
                          in_quotes(name) + " (it has " + std::to_string(impl_->names.size()) +
                          " tensors)");
  }
  return it->second;
}

Tensor File::get(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const std::size_t bytes = ti.end - ti.begin;
  // A zero-size tensor has no bytes to view; give it its own (empty) storage.
  if (bytes == 0) return Tensor::empty(ti.shape, ti.dtype);
  unsigned char* p = static_cast<unsigned char*>(impl_->map) + impl_->data_start + ti.begin;
  if (reinterpret_cast<std::uintptr_t>(p) % dtype_size(ti.dtype) != 0) {
    // Misaligned for its element type: hand out an aligned copy instead of a view.
    Tensor t = Tensor::empty(ti.shape, ti.dtype);
    std::memcpy(t.raw_data(), p, bytes);
    return t;
  }
  std::shared_ptr<void> owner = std::const_pointer_cast<Impl>(impl_);
  return Tensor::from_blob(p, ti.shape, ti.dtype, Device::cpu(), std::move(owner));
}

const std::map<std::string, std::string>& File::metadata() const { return impl_->metadata; }

std::size_t File::file_size() const { return impl_->map_size; }

// ---------------------------------------------------------------------------------------------
// Writing

namespace {

/// Writes all of `size` bytes, retrying on short writes and EINTR; false (errno set) on failure.
bool write_all(int fd, const void* data, std::size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += n;
    size -= static_cast<std::size_t>(n);
  }
  return true;
}

}  // namespace

void save(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
          const std::map<std::string, std::string>& metadata) {
  // Validate everything before touching the file system.
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    if (name.empty()) {
      throw InvalidArgument("safetensors::save(" + in_quotes(path) + "): empty tensor name");
    }
    if (name == kMetadataKey) {
      throw InvalidArgument("safetensors::save(" + in_quotes(path) + "): tensor name " +
                            in_quotes(name) + " is reserved for the metadata");
    }
    if (!seen.insert(name).second) {
      throw InvalidArgument("safetensors::save(" + in_quotes(path) + "): duplicate tensor name " +
                            in_quotes(name));
    }
    if (!t.defined()) {
      throw InvalidArgument("safetensors::save(" + in_quotes(path) + "): tensor " + in_quotes(name) +
                            " is undefined");
    }
    if (!t.device().is_host()) {
      throw InvalidArgument("safetensors::save(" + in_quotes(path) + "): tensor " + in_quotes(name) +
                            " lives on " + t.device().to_string() +
                            ", not in host memory; call to_host() first");
    }
  }

  Json header = Json::object();
  if (!metadata.empty()) {
    Json m = Json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header[kMetadataKey] = std::move(m);
  }
  std::uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    Json entry = Json::object();
    entry["dtype"] = dtype_code(t.dtype());
    entry["shape"] = t.shape().dims();
    entry["data_offsets"] = {offset, offset + t.nbytes()};
    header[name] = std::move(entry);
    offset += t.nbytes();
  }
  std::string text;
  try {
    text = header.dump(-1, ' ', false, nlohmann::json::error_handler_t::strict);
  } catch (const nlohmann::json::exception& e) {
    throw InvalidArgument("safetensors::save(" + in_quotes(path) +
                          "): a tensor name or metadata string is not valid UTF-8 (" + e.what() +
                          ")");
  }
  // Pad with spaces so that the data section starts 8-byte aligned.
  text.append((8 - text.size() % 8) % 8, ' ');
  unsigned char len_le[8];
  for (int i = 0; i < 8; ++i) len_le[i] = static_cast<unsigned char>(text.size() >> (8 * i));

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  auto fail = [&](const std::string& what, int err, int fd) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw IoError("cannot write safetensors file " + in_quotes(path) + ": " + what + ": " +
                  errno_text(err));
  };
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    int err = errno;
    throw IoError("cannot write safetensors file " + in_quotes(path) + ": cannot create " +
                  in_quotes(tmp) + ": " + errno_text(err));
  }
  if (!write_all(fd, len_le, 8) || !write_all(fd, text.data(), text.size())) {
    fail("write failed", errno, fd);
  }
  for (const auto& [name, t] : tensors) {
    if (t.nbytes() > 0 && !write_all(fd, t.raw_data(), t.nbytes())) {
      fail("write of tensor " + in_quotes(name) + " failed", errno, fd);
    }
  }
  if (::fsync(fd) != 0) fail("fsync failed", errno, fd);
  if (::close(fd) != 0) fail("close failed", errno, -1);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename from " + in_quotes(tmp), errno, -1);
  // Best effort: make the rename itself durable.
  std::string dir = std::filesystem::path(path).parent_path().string();
  int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::map<std::string, Tensor> load_all(const std::string& path) {
  File f = File::open(path);
  std::map<std::string, Tensor> out;
  for (const auto& name : f.names()) out.emplace(name, f.get(name));
  return out;
}

}  // namespace devpipe::safetensors
