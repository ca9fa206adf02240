// Safetensors: round trips, every malformed-file case (exception type and message), truncation
// and byte-flip robustness, and interop with PyTorch in both directions.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/safetensors.h"
#include "test_util.h"

using namespace devpipe;
namespace st = devpipe::safetensors;
using devpipe::testing::TempDir;

namespace {

// ---- helpers -------------------------------------------------------------------------------

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

/// A file made by hand: length prefix (the header's size unless `header_len` is given), the
/// header text as is, then `data`.
std::string raw_file(const std::string& header, const std::string& data,
                     std::uint64_t header_len = UINT64_MAX) {
  return le64(header_len == UINT64_MAX ? header.size() : header_len) + header + data;
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

/// Raw bytes of a host tensor, for bit-exact comparisons (NaN, -0.0).
std::string tensor_bytes(const Tensor& t) {
  return std::string(static_cast<const char*>(t.raw_data()), t.nbytes());
}

/// Asserts that `fn` throws exactly E (or a subclass) with `needle` in its message.
template <class E>
::testing::AssertionResult throws_with(const std::function<void()>& fn,
                                       const std::string& needle) {
  try {
    fn();
  } catch (const E& e) {
    std::string msg = e.what();
    if (msg.find(needle) == std::string::npos) {
      return ::testing::AssertionFailure() << "message lacks \"" << needle << "\": " << msg;
    }
    return ::testing::AssertionSuccess() << msg;
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "nothing thrown";
}

/// Writes `bytes` to a file and asserts opening it throws FormatError mentioning the path and
/// every needle.
::testing::AssertionResult bad_file(const std::string& bytes,
                                    const std::vector<std::string>& needles) {
  TempDir dir;
  std::string path = dir.str("bad.safetensors");
  write_bytes(path, bytes);
  try {
    st::File::open(path);
  } catch (const FormatError& e) {
    std::string msg = e.what();
    if (msg.find(path) == std::string::npos) {
      return ::testing::AssertionFailure() << "message lacks the path: " << msg;
    }
    for (const auto& n : needles) {
      if (msg.find(n) == std::string::npos) {
        return ::testing::AssertionFailure() << "message lacks \"" << n << "\": " << msg;
      }
    }
    return ::testing::AssertionSuccess();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "wrong exception type: " << e.what();
  }
  return ::testing::AssertionFailure() << "opened without error";
}

/// The tensors of tests/reference/st_interop.py, built here independently.
std::vector<std::pair<std::string, Tensor>> expected_tensors() {
  std::vector<float> f32(24);
  for (int i = 0; i < 24; ++i) f32[i] = (i - 12) * 0.25f;
  f32[0] = std::numeric_limits<float>::infinity();
  f32[1] = -std::numeric_limits<float>::infinity();
  f32[2] = -0.0f;
  f32[3] = static_cast<float>(1.0 / 3.0);
  f32[4] = static_cast<float>(1e-40);
  f32[5] = static_cast<float>(3.0e38);
  std::vector<float> bf16(15);
  for (int i = 0; i < 15; ++i) bf16[i] = (i - 7) * 0.5f;
  bf16[0] = std::numeric_limits<float>::infinity();
  bf16[1] = -0.0f;
  bf16[2] = std::ldexp(1.0f, -130);
  std::vector<float> f16(7);
  for (int i = 0; i < 7; ++i) f16[i] = (i - 3) * 0.125f;
  f16[0] = 65504.0f;
  f16[1] = std::ldexp(1.0f, -24);
  std::vector<std::int64_t> i64 = {std::numeric_limits<std::int64_t>::min(),
                                   std::numeric_limits<std::int64_t>::max(), 0, -1};
  return {
      {"f32", Tensor::from_vector(f32, {2, 3, 4}, DType::Float32)},
      {"bf16", Tensor::from_vector(bf16, {5, 3}, DType::BFloat16)},
      {"f16", Tensor::from_vector(f16, {7}, DType::Float16)},
      {"i64", Tensor::from_vector_i64(i64, {2, 2})},
      {"scalar", Tensor::from_vector({-2.5f}, Shape{}, DType::Float32)},
      {"empty", Tensor::zeros({0, 3}, DType::Float16)},
  };
}

const std::map<std::string, std::string> kInteropMetadata = {{"format", "pt"},
                                                             {"note", "interop ünïcode"}};

void expect_same(const Tensor& got, const Tensor& want, const std::string& name) {
  ASSERT_TRUE(got.defined()) << name;
  EXPECT_EQ(got.dtype(), want.dtype()) << name;
  EXPECT_EQ(got.shape(), want.shape()) << name;
  EXPECT_TRUE(got.device().is_host()) << name;
  EXPECT_EQ(tensor_bytes(got), tensor_bytes(want)) << name;
}

/// A valid header entry as JSON text.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  std::uint64_t b, std::uint64_t e) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
}

// ---- round trips ---------------------------------------------------------------------------

TEST(Safetensors, RoundTripAllDtypesScalarsEmptyAndMetadata) {
  TempDir dir;
  std::string path = dir.str("model.safetensors");
  auto tensors = expected_tensors();
  tensors.emplace_back("randn", Tensor::randn({3, 5}, 7));
  st::save(path, tensors, {{"k", "v"}, {"empty", ""}});

  std::string bytes = read_bytes(path);
  std::uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u) << "header padded to 8 bytes";
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp." + std::to_string(getpid())));

  st::File f = st::File::open(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.file_size(), bytes.size());
  std::vector<std::string> order;
  for (const auto& [name, t] : tensors) order.push_back(name);
  // Names come in data-offset order; "empty" (zero bytes) shares its offset with "randn" and
  // comes first in the header, so the save order is preserved.
  EXPECT_EQ(f.names(), order);
  EXPECT_EQ(f.metadata(), (std::map<std::string, std::string>{{"k", "v"}, {"empty", ""}}));
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(f.contains(name));
    expect_same(f.get(name), t, name);
    EXPECT_EQ(f.info(name).dtype, t.dtype());
    EXPECT_EQ(f.info(name).shape, t.shape());
    EXPECT_EQ(f.info(name).end - f.info(name).begin, t.nbytes());
  }
  EXPECT_EQ(f.get("scalar").rank(), 0);
  EXPECT_EQ(f.get("scalar").data<float>()[0], -2.5f);
  EXPECT_EQ(f.get("empty").numel(), 0);

  auto all = st::load_all(path);
  ASSERT_EQ(all.size(), tensors.size());
  for (const auto& [name, t] : tensors) expect_same(all.at(name), t, name);
}

TEST(Safetensors, EmptyFileAndOverwrite) {
  TempDir dir;
  std::string path = dir.str("e.safetensors");
  st::save(path, {});
  st::File f = st::File::open(path);
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());
  // Overwriting replaces the file atomically.
  st::save(path, {{"x", Tensor::ones({2})}});
  EXPECT_EQ(st::File::open(path).names(), std::vector<std::string>{"x"});
  // The old mapping stays valid after the rename.
  EXPECT_TRUE(f.names().empty());
}

TEST(Safetensors, ViewsShareTheMappingAndOutliveTheFile) {
  TempDir dir;
  std::string path = dir.str("v.safetensors");
  Tensor a = Tensor::randn({4, 4}, 1);
  st::save(path, {{"a", a}});
  Tensor v1, v2;
  {
    st::File f = st::File::open(path);
    v1 = f.get("a");
    v2 = f.get("a");
  }
  EXPECT_TRUE(v1.same_memory(v2));
  std::filesystem::remove(path);
  expect_same(v1, a, "a");
  // Writing into a view touches private copy-on-write pages only.
  v1.data<float>()[0] = 42.0f;
  EXPECT_EQ(v2.data<float>()[0], 42.0f);
}

TEST(Safetensors, MisalignedTensorsAreCopiedAligned) {
  TempDir dir;
  // 3 bf16 values (6 bytes) put the following f32 and i64 tensors off their alignment.
  std::string path = dir.str("m.safetensors");
  Tensor b = Tensor::from_vector({1, 2, 3}, {3}, DType::BFloat16);
  Tensor f = Tensor::from_vector({1.5f, -2.5f, 3.25f}, {3});
  Tensor i = Tensor::from_vector_i64({5, -6}, {2});
  st::save(path, {{"b", b}, {"f", f}, {"i", i}});
  st::File file = st::File::open(path);
  EXPECT_EQ(file.info("f").begin, 6u);
  for (const auto& [name, t] : std::vector<std::pair<std::string, Tensor>>{
           {"b", b}, {"f", f}, {"i", i}}) {
    Tensor got = file.get(name);
    expect_same(got, t, name);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(got.raw_data()) % dtype_size(t.dtype()), 0u)
        << name;
  }
  EXPECT_FALSE(file.get("f").same_memory(file.get("f"))) << "misaligned: a fresh copy each time";
  EXPECT_TRUE(file.get("b").same_memory(file.get("b"))) << "aligned: a view";

  // An odd header length misaligns everything; values must still come back right.
  std::string header = "{" + entry("x", "F32", "[2]", 0, 8) + "}";
  if (header.size() % 2 == 0) header += " ";  // odd length: data starts at an odd offset
  float vals[2] = {0.5f, -7.0f};
  std::string data(reinterpret_cast<const char*>(vals), 8);
  std::string odd = dir.str("odd.safetensors");
  write_bytes(odd, raw_file(header, data));
  Tensor x = st::File::open(odd).get("x");
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(x.raw_data()) % 4, 0u);
  EXPECT_EQ(x.to_float_vector(), (std::vector<float>{0.5f, -7.0f}));
}

// ---- malformed files -----------------------------------------------------------------------

TEST(SafetensorsMalformed, ShortFiles) {
  EXPECT_TRUE(bad_file("", {"0 bytes long", "shorter than the 8-byte"}));
  EXPECT_TRUE(bad_file("abcde", {"5 bytes long"}));
  EXPECT_TRUE(bad_file(std::string(7, '\0'), {"7 bytes long"}));
}

TEST(SafetensorsMalformed, HeaderLengthBeyondFile) {
  std::string header = "{}";
  std::string bytes = raw_file(header, "", 100);  // claims 100 bytes; the file has 10
  EXPECT_TRUE(bad_file(bytes, {"header length 100", "file is 10 bytes"}));
}

TEST(SafetensorsMalformed, AbsurdHeaderLength) {
  EXPECT_TRUE(bad_file(raw_file("{}", "", 200'000'000), {"header length 200000000", "limit"}));
  EXPECT_TRUE(bad_file(raw_file("{}", "", UINT64_MAX - 1), {"18446744073709551614"}));
}

TEST(SafetensorsMalformed, HeaderNotJsonOrNotObject) {
  EXPECT_TRUE(bad_file(raw_file("{not json", ""), {"not valid JSON"}));
  EXPECT_TRUE(bad_file(raw_file("", ""), {"not valid JSON"}));
  EXPECT_TRUE(bad_file(raw_file("{} trailing", ""), {"not valid JSON"}));
  EXPECT_TRUE(bad_file(raw_file("[1,2]", ""), {"not a JSON object", "array"}));
  EXPECT_TRUE(bad_file(raw_file("42", ""), {"not a JSON object", "number"}));
  // Invalid UTF-8 inside a string.
  EXPECT_TRUE(bad_file(raw_file("{\"\xff\xfe\":1}", ""), {"not valid JSON"}));
}

TEST(SafetensorsMalformed, EntryNotObjectOrMissingFields) {
  EXPECT_TRUE(bad_file(raw_file("{\"a\":5}", ""), {"tensor 'a' is not a JSON object"}));
  EXPECT_TRUE(bad_file(raw_file(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", std::string(4, 0)),
                       {"'a' has no \"dtype\""}));
  EXPECT_TRUE(bad_file(
      raw_file(R"({"a":{"dtype":"F32","data_offsets":[0,4]}})", std::string(4, 0)),
      {"'a' has no \"shape\""}));
  EXPECT_TRUE(bad_file(raw_file(R"({"a":{"dtype":"F32","shape":[1]}})", std::string(4, 0)),
                       {"'a' has no \"data_offsets\""}));
}

TEST(SafetensorsMalformed, BadDtype) {
  std::string d4(4, 0);
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "F64", "[1]", 0, 8) + "}", std::string(8, 0)),
                       {"tensor 'w'", "unsupported dtype 'F64'"}));
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "float32", "[1]", 0, 4) + "}", d4),
                       {"'float32'"}));
  EXPECT_TRUE(bad_file(raw_file(R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", d4),
                       {"dtype is not a string"}));
}

TEST(SafetensorsMalformed, BadShape) {
  std::string d8(8, 0);
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "F32", "[-1,2]", 0, 8) + "}", d8),
                       {"tensor 'w'", "dimension -1", "not a non-negative integer"}));
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "F32", "[1.5]", 0, 8) + "}", d8),
                       {"dimension 1.5"}));
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "F32", "[\"2\"]", 0, 8) + "}", d8),
                       {"dimension \"2\""}));
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "F32", "2", 0, 8) + "}", d8),
                       {"shape is not an array"}));
  EXPECT_TRUE(bad_file(
      raw_file("{" + entry("w", "F32", "[4611686018427387904,4]", 0, 8) + "}", d8),
      {"too many elements"}));
  EXPECT_TRUE(bad_file(
      raw_file("{" + entry("w", "F32", "[18446744073709551615]", 0, 8) + "}", d8),
      {"not a non-negative integer"}));
}

TEST(SafetensorsMalformed, BadDataOffsets) {
  std::string d8(8, 0);
  auto with_offsets = [&](const std::string& offsets) {
    return raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":)" + offsets + "}}", d8);
  };
  EXPECT_TRUE(bad_file(with_offsets("[0,8,9]"), {"data_offsets [0,8,9]", "pair"}));
  EXPECT_TRUE(bad_file(with_offsets("[0]"), {"data_offsets [0]"}));
  EXPECT_TRUE(bad_file(with_offsets("[0.0,8]"), {"pair of non-negative integers"}));
  EXPECT_TRUE(bad_file(with_offsets("[-8,0]"), {"data_offsets [-8,0]"}));
  EXPECT_TRUE(bad_file(with_offsets("{}"), {"data_offsets {}"}));
  EXPECT_TRUE(bad_file(with_offsets("[8,0]"), {"[8, 0]", "begin > end"}));
}

TEST(SafetensorsMalformed, TruncatedData) {
  // 'w' needs bytes [0, 16) but only 10 are there.
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "F32", "[4]", 0, 16) + "}", std::string(10, 0)),
                       {"tensor 'w' ends at byte 16", "only 10 bytes", "truncated"}));
}

TEST(SafetensorsMalformed, SizeDoesNotMatchShape) {
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "F32", "[2]", 0, 4) + "}", std::string(4, 0)),
                       {"tensor 'w' has 4 bytes", "needs 8"}));
  EXPECT_TRUE(bad_file(raw_file("{" + entry("w", "BF16", "[2,3]", 0, 24) + "}",
                                std::string(24, 0)),
                       {"has 24 bytes", "[2, 3]", "needs 12"}));
  EXPECT_TRUE(bad_file(
      raw_file("{" + entry("w", "I64", "[4611686018427387903]", 0, 8) + "}", std::string(8, 0)),
      {"has 8 bytes", "more than 2^64"}));
}

TEST(SafetensorsMalformed, OverlapGapsAndTrailingBytes) {
  std::string d12(12, 0);
  EXPECT_TRUE(bad_file(
      raw_file("{" + entry("a", "F32", "[2]", 0, 8) + "," + entry("b", "F32", "[2]", 4, 12) + "}",
               d12),
      {"'a' [0, 8)", "'b' [4, 12)", "overlap"}));
  // Two tensors claiming the same bytes.
  EXPECT_TRUE(bad_file(
      raw_file("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 0, 4) + "}",
               std::string(4, 0)),
      {"overlap"}));
  EXPECT_TRUE(bad_file(
      raw_file("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("b", "F32", "[1]", 8, 12) + "}",
               d12),
      {"bytes [4, 8)", "not covered", "gap before 'b'"}));
  EXPECT_TRUE(bad_file(raw_file("{" + entry("a", "F32", "[1]", 4, 8) + "}", std::string(8, 0)),
                       {"bytes [0, 4)", "not covered"}));
  EXPECT_TRUE(bad_file(raw_file("{" + entry("a", "F32", "[1]", 0, 4) + "}", std::string(9, 0)),
                       {"bytes [4, 9) at the end", "not covered"}));
  EXPECT_TRUE(bad_file(raw_file("{}", "x"), {"bytes [0, 1)"}));
}

TEST(SafetensorsMalformed, DuplicateNames) {
  std::string d8(8, 0);
  EXPECT_TRUE(bad_file(
      raw_file("{" + entry("a", "F32", "[1]", 0, 4) + "," + entry("a", "F32", "[1]", 4, 8) + "}",
               d8),
      {"duplicate key 'a'"}));
  EXPECT_TRUE(bad_file(
      raw_file(R"({"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
               std::string(4, 0)),
      {"duplicate key 'dtype'"}));
}

TEST(SafetensorsMalformed, BadMetadata) {
  EXPECT_TRUE(bad_file(raw_file(R"({"__metadata__":{"a":1}})", ""),
                       {"\"__metadata__\" value of 'a' is not a string: 1"}));
  EXPECT_TRUE(bad_file(raw_file(R"({"__metadata__":["a"]})", ""),
                       {"\"__metadata__\" is not a JSON object"}));
}

TEST(Safetensors, ValidHandWrittenFileWithPaddingAndMetadata) {
  // Trailing spaces in the header and metadata before the entries, as other writers do.
  float v[3] = {1, 2, 3};
  std::string header = R"({"__metadata__":{"a":"b"},)" + entry("t", "F32", "[3]", 0, 12) + "}   ";
  TempDir dir;
  std::string path = dir.str("ok.safetensors");
  write_bytes(path, raw_file(header, std::string(reinterpret_cast<char*>(v), 12)));
  st::File f = st::File::open(path);
  EXPECT_EQ(f.metadata().at("a"), "b");
  EXPECT_EQ(f.get("t").to_float_vector(), (std::vector<float>{1, 2, 3}));
}

// ---- other errors --------------------------------------------------------------------------

TEST(Safetensors, IoErrors) {
  TempDir dir;
  std::string missing = dir.str("missing.safetensors");
  EXPECT_TRUE(throws_with<IoError>([&] { st::File::open(missing); }, missing));
  EXPECT_TRUE(throws_with<IoError>([&] { st::File::open(missing); }, "No such file"));
  EXPECT_TRUE(throws_with<IoError>([&] { st::File::open(dir.str()); }, "not a regular file"));
  std::string nowhere = dir.str("no/such/dir/x.safetensors");
  EXPECT_TRUE(throws_with<IoError>([&] { st::save(nowhere, {{"a", Tensor::ones({1})}}); },
                                   nowhere));
  EXPECT_TRUE(throws_with<IoError>([&] { st::load_all(missing); }, missing));
}

TEST(Safetensors, MissingNameIsInvalidArgument) {
  TempDir dir;
  std::string path = dir.str("x.safetensors");
  st::save(path, {{"a", Tensor::ones({1})}});
  st::File f = st::File::open(path);
  EXPECT_FALSE(f.contains("b"));
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { f.get("b"); }, "no tensor named 'b'"));
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { f.info("b"); }, path));
}

TEST(Safetensors, SaveRejectsBadInput) {
  TempDir dir;
  std::string path = dir.str("x.safetensors");
  Tensor t = Tensor::ones({2});
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { st::save(path, {{"", t}}); }, "empty"));
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { st::save(path, {{"a", t}, {"a", t}}); },
                                           "duplicate tensor name 'a'"));
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { st::save(path, {{"a", Tensor()}}); },
                                           "'a' is undefined"));
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { st::save(path, {{"__metadata__", t}}); },
                                           "reserved"));
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { st::save(path, {{"bad\xff", t}}); }, "UTF-8"));
  Tensor dev = Tensor::from_blob(t.raw_data(), t.shape(), t.dtype(), Device::cuda(0), nullptr);
  EXPECT_TRUE(throws_with<InvalidArgument>([&] { st::save(path, {{"d", dev}}); }, "cuda:0"));
  EXPECT_FALSE(std::filesystem::exists(path)) << "nothing written on invalid input";
}

// ---- robustness ----------------------------------------------------------------------------

TEST(SafetensorsFuzz, TruncationAndByteFlipsOnlyThrowDevpipeErrors) {
  TempDir dir;
  std::string good_path = dir.str("good.safetensors");
  st::save(good_path,
           {{"a", Tensor::randn({3, 2}, 1)},
            {"b", Tensor::randn({5}, 2, DType::BFloat16)},
            {"c", Tensor::from_vector_i64({1, 2, 3}, {3})},
            {"d", Tensor::randn({2, 2}, 3, DType::Float16)}},
           {{"meta", "data"}});
  const std::string good = read_bytes(good_path);
  std::uint64_t header_len = 0;
  std::memcpy(&header_len, good.data(), 8);
  std::string path = dir.str("fuzz.safetensors");

  // Every truncation of a valid file is invalid (the data section must be covered exactly).
  for (std::size_t len = 0; len < good.size(); ++len) {
    write_bytes(path, good.substr(0, len));
    EXPECT_THROW(st::File::open(path), FormatError) << "truncated to " << len;
  }
  write_bytes(path, good);
  EXPECT_NO_THROW(st::File::open(path));

  // Random byte changes in the length prefix and header: either the file still opens (and every
  // tensor can be read), or a devpipe::Error comes out; never a crash or another exception.
  std::mt19937 gen(12345);
  std::uniform_int_distribution<std::size_t> where(0, 8 + header_len - 1);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_int_distribution<int> count(1, 3);
  int opened = 0, rejected = 0;
  for (int iter = 0; iter < 300; ++iter) {
    std::string bytes = good;
    for (int k = count(gen); k > 0; --k) bytes[where(gen)] = static_cast<char>(byte(gen));
    write_bytes(path, bytes);
    try {
      st::File f = st::File::open(path);
      for (const auto& name : f.names()) {
        Tensor t = f.get(name);
        volatile double sink = 0;
        for (float v : t.to_float_vector()) sink = sink + v;
      }
      ++opened;
    } catch (const devpipe::Error&) {
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "iteration " << iter << ": non-devpipe exception: " << e.what();
    }
  }
  EXPECT_EQ(opened + rejected, 300);
  EXPECT_GT(rejected, 0);
}

// ---- interop with PyTorch ------------------------------------------------------------------

TEST(SafetensorsInterop, ReadsFileWrittenByTorch) {
  TempDir dir;
  std::string path = dir.str("torch.safetensors");
  ASSERT_TRUE(devpipe::testing::run_torch_script("st_interop.py", "write " + path));
  st::File f = st::File::open(path);
  EXPECT_EQ(f.metadata(), kInteropMetadata);
  auto want = expected_tensors();
  EXPECT_EQ(f.names().size(), want.size());
  for (const auto& [name, t] : want) expect_same(f.get(name), t, name);
}

TEST(SafetensorsInterop, TorchReadsFileWrittenByDevpipe) {
  TempDir dir;
  std::string path = dir.str("devpipe.safetensors");
  st::save(path, expected_tensors(), kInteropMetadata);
  EXPECT_TRUE(devpipe::testing::run_torch_script("st_interop.py", "verify " + path));
}

}  // namespace
