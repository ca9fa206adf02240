// Shared helpers for the tests: running the PyTorch reference scripts and comparing tensors.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "devpipe/tensor.h"

namespace devpipe::testing {

/// A fresh temporary directory, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "devpipe_test_XXXXXX").string();
    char* p = mkdtemp(tmpl.data());
    if (!p) throw std::runtime_error("mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::string str(const std::string& child = "") const {
    return child.empty() ? path_.string() : (path_ / child).string();
  }

 private:
  std::filesystem::path path_;
};

/// Runs tests/reference/<script> with Debian's PyTorch python, passing `args`; fails the test
/// (returns false) when it exits non-zero.
inline bool run_torch_script(const std::string& script, const std::string& args) {
  std::string cmd = std::string(DEVPIPE_TORCH_PYTHON) + " " + DEVPIPE_REFERENCE_DIR + "/" + script +
                    " " + args;
  int rc = std::system(cmd.c_str());
  if (rc != 0) {
    ADD_FAILURE() << "reference script failed (rc=" << rc << "): " << cmd;
    return false;
  }
  return true;
}

/// The message of the exception of type E that `f` throws; a test failure (and "") when it
/// throws another type or nothing.
template <class E, class F>
std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw another exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

/// Expects the text `msg` to contain `part`.
#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << "message: " << (msg)

/// Asserts |actual - expected| <= atol + rtol * |expected| elementwise, reporting the worst.
inline ::testing::AssertionResult tensors_close(const Tensor& actual, const Tensor& expected,
                                               double rtol, double atol) {
  if (actual.shape() != expected.shape()) {
    return ::testing::AssertionFailure()
           << "shape " << actual.shape().to_string() << " vs expected "
           << expected.shape().to_string();
  }
  auto a = actual.to_float_vector();
  auto e = expected.to_float_vector();
  double worst = 0;
  std::size_t worst_i = 0;
  std::size_t bad = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i] == e[i]) continue;  // equal, infinities included
    double d = std::abs(static_cast<double>(a[i]) - e[i]);
    double lim = atol + rtol * std::abs(static_cast<double>(e[i]));
    if (!(d <= lim)) {
      ++bad;
      if (!(d <= worst)) {
        worst = d;
        worst_i = i;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << a.size() << " elements differ beyond rtol=" << rtol
         << " atol=" << atol << "; worst at flat index " << worst_i << ": got " << a[worst_i]
         << ", expected " << e[worst_i] << " (|diff|=" << worst << ")";
}

}  // namespace devpipe::testing
