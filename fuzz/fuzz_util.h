// Shared by the fuzz harnesses (fuzz_*.cpp) and the seed writer (seeds.cpp).
//
// The readers under test take paths (safetensors files are memory-mapped, artifacts are
// folders), so every harness writes its input into a scratch folder of its own process and
// hands the reader that path. An artifact input packs several files into one byte string:
// manifest.json, then weights/rank0.safetensors, weights/rank1.safetensors, ..., separated by
// kFileSeparator (a line no JSON or safetensors writer of devpipe emits).
#pragma once

#include <devpipe/error.h>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

/// ASan defaults of the fuzzers: a request for more than 1 GiB fails the way it fails on a
/// machine without that memory (malloc returns null; devpipe throws OutOfMemory) instead of
/// being reported as a crash, so that a manifest declaring a large model is not a "finding"
/// (C++ `new` of that size is still reported: devpipe sizes its containers by what it read).
extern "C" const char* __asan_default_options() {
  return "allocator_may_return_null=1:max_allocation_size_mb=1024";
}

namespace devpipe::fuzz {

inline constexpr std::string_view kFileSeparator = "\n--devpipe-fuzz-next-file--\n";

/// Splits a packed artifact input into its files (the first is manifest.json).
inline std::vector<std::string_view> split_files(std::string_view packed) {
  std::vector<std::string_view> parts;
  for (;;) {
    std::size_t at = packed.find(kFileSeparator);
    parts.push_back(packed.substr(0, at));
    if (at == std::string_view::npos) return parts;
    packed.remove_prefix(at + kFileSeparator.size());
  }
}

/// Packs files for split_files.
inline std::string pack_files(const std::vector<std::string>& files) {
  std::string out;
  for (std::size_t i = 0; i < files.size(); ++i) {
    if (i) out += kFileSeparator;
    out += files[i];
  }
  return out;
}

inline void write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) {
    std::fprintf(stderr, "fuzz harness: cannot write %s\n", path.c_str());
    std::abort();  // the harness's own failure, not a finding in devpipe
  }
}

inline std::string read_file(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

/// A scratch folder for this process ($TMPDIR or /tmp), removed when the process exits
/// normally.
inline const std::filesystem::path& scratch_dir() {
  struct Dir {
    std::filesystem::path path;
    Dir() {
      std::string tmpl = (std::filesystem::temp_directory_path() / "devpipe_fuzz_XXXXXX").string();
      if (!::mkdtemp(tmpl.data())) {
        std::perror("fuzz harness: mkdtemp");
        std::abort();
      }
      path = tmpl;
    }
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir;
  return dir.path;
}

/// Runs `f`. A devpipe::Error is the documented answer to a bad file and ends the input
/// (printed when DEVPIPE_FUZZ_VERBOSE is set, to see how far an input gets); any other
/// exception escaping devpipe's readers is a finding: it is printed with its type and the
/// process aborts, so that libFuzzer saves the input.
template <class F>
void expect_only_devpipe_errors(const char* what, F&& f) {
  static const bool verbose = std::getenv("DEVPIPE_FUZZ_VERBOSE") != nullptr;
  try {
    f();
    if (verbose) std::fprintf(stderr, "%s: accepted\n", what);
  } catch (const Error& e) {
    if (verbose) std::fprintf(stderr, "%s: devpipe error: %s\n", what, e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: a non-devpipe exception escaped: %s: %s\n", what, typeid(e).name(), e.what());
    std::abort();
  }
}

}  // namespace devpipe::fuzz
