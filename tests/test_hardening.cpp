// Bad files and misuse found by probing: integers in config.json and manifest.json that are
// floats, out of range or negative; element counts that overflow; artifact paths that lead out of
// the artifact or name a FIFO; a recompile that fails half-way; load() racing forward(). Each is
// an exception of the devpipe::Error family naming the file, the key and the value — never a
// crash, a hang, a silent wrap-around or a lost artifact.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <fcntl.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <limits>
#include <nlohmann/json.hpp>
#include <thread>

#include "compiler/artifact.h"
#include "pipeline_util.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;
namespace fs = std::filesystem;
using nlohmann::json;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DEVPIPE_TEST_UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DEVPIPE_TEST_UNDER_SANITIZER 1
#endif
#endif

namespace {

json read_json(const std::string& path) {
  json j;
  std::ifstream(path) >> j;
  return j;
}

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// ------------------------------------------------------------------------ config.json integers

/// A config.json whose runtime key `key` holds the raw JSON text `raw`.
std::string config_with(const TempDir& dir, const std::string& key, const std::string& raw) {
  InferenceConfig c(RuntimeConfig{.batch_size = 4, .tp_degree = 2, .buckets = {4, 8}}, {{"hidden", 16}});
  std::string text = c.to_json();
  json j = json::parse(text);
  j["runtime"][key] = 0;  // placeholder replaced textually: nlohmann would write 1e300 as 1e+300
  std::string out = j.dump(2);
  std::string needle = "\"" + key + "\": 0";
  auto pos = out.find(needle);
  EXPECT_NE(pos, std::string::npos);
  out.replace(pos, needle.size(), "\"" + key + "\": " + raw);
  std::string path = dir.str("config.json");
  write_text(path, out);
  return path;
}

TEST(HardeningConfig, FloatsAndOutOfRangeIntegersAreRefusedNamingFileKeyAndValue) {
  TempDir dir;
  struct Case {
    const char* key;
    const char* raw;
    const char* shown;
  };
  for (const Case& c : {Case{"batch_size", "1e300", "1e+300"}, Case{"batch_size", "4.9", "4.9"},
                        Case{"batch_size", "-3", "-3"}, Case{"tp_degree", "4294967298", "4294967298"},
                        Case{"tp_degree", "2.0", "2.0"}, Case{"tp_degree", "1e300", "1e+300"},
                        Case{"buckets", "[8, 2.5]", "2.5"}, Case{"buckets", "[8, 18446744073709551615]",
                                                                 "18446744073709551615"}}) {
    SCOPED_TRACE(std::string(c.key) + " = " + c.raw);
    std::string path = config_with(dir, c.key, c.raw);
    auto msg = message_of<ConfigError>([&] { InferenceConfig::load(path); });
    EXPECT_HAS(msg, path);
    EXPECT_HAS(msg, c.key);
    EXPECT_HAS(msg, c.shown);
  }
  // Integer attributes beyond int64 are refused too (they would wrap to negative numbers).
  std::string path = dir.str("attr.json");
  write_text(path, R"({"runtime": {"batch_size": 4, "dtype": "float32", "tp_degree": 1},
                       "attributes": {"hidden": 9223372036854775808}})");
  auto msg = message_of<ConfigError>([&] { InferenceConfig::load(path); });
  EXPECT_HAS(msg, "hidden");
  EXPECT_HAS(msg, "9223372036854775808");
  write_text(path, R"({"runtime": {"batch_size": 4, "dtype": "float32", "tp_degree": 1},
                       "attributes": {"sizes": [1, 18446744073709551615]}})");
  msg = message_of<ConfigError>([&] { InferenceConfig::load(path); });
  EXPECT_HAS(msg, "sizes");
  EXPECT_HAS(msg, "18446744073709551615");
}

TEST(HardeningConfig, GoodValuesStillLoad) {
  TempDir dir;
  std::string path = config_with(dir, "tp_degree", "4");
  InferenceConfig c = InferenceConfig::load(path);
  EXPECT_EQ(c.runtime_config().tp_degree, 4);
  EXPECT_EQ(c.runtime_config().batch_size, 4);
  EXPECT_EQ(c.runtime_config().buckets, (std::vector<std::int64_t>{4, 8}));
  EXPECT_EQ(c.get_int("hidden"), 16);
}

// ---------------------------------------------------------------------- manifest.json integers

/// The entries of a folder, sorted.
std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

/// A tp-2 ParallelMlp (bucket 4, tag "mlp") compiled into dir/art, and ways to load it.
struct Compiled {
  TempDir dir;
  std::unique_ptr<TestWrapper<ParallelMlp>> w;
  std::string art;
  std::string manifest;

  explicit Compiled(std::uint64_t seed = 7, const std::string& tag = "mlp") {
    w = make_wrapper(tag);
    safetensors::save(dir.str("ckpt.safetensors"), nn::random_state_dict(ParallelMlp(), seed));
    art = dir.str("art");
    manifest = art + "/manifest.json";
    w->compile(dir.str("ckpt.safetensors"), art);
  }
  static std::unique_ptr<TestWrapper<ParallelMlp>> make_wrapper(const std::string& tag = "mlp") {
    InferenceConfig c(RuntimeConfig{.batch_size = 4, .tp_degree = 2});
    return std::make_unique<TestWrapper<ParallelMlp>>(c, WrapperOptions{.tag = tag},
                                                      std::vector<std::vector<Tensor>>{{Tensor::zeros({4, 16})}});
  }
  /// Loads the artifact with `edit` applied to its manifest; the original is restored after.
  template <class E>
  std::string load_error(const std::function<void(json&)>& edit) {
    std::string orig = read_text();
    json j = json::parse(orig);
    edit(j);
    write_text(manifest, j.dump());
    auto fresh = make_wrapper();
    std::string msg = message_of<E>([&] { fresh->load(art); });
    write_text(manifest, orig);
    return msg;
  }
  /// The same as load_error, with the manifest text edited textually (for floats as written).
  template <class E>
  std::string load_error_text(const std::string& from, const std::string& to) {
    std::string orig = read_text();
    std::string text = orig;
    auto pos = text.find(from);
    EXPECT_NE(pos, std::string::npos) << from;
    if (pos != std::string::npos) text.replace(pos, from.size(), to);
    write_text(manifest, text);
    auto fresh = make_wrapper();
    std::string msg = message_of<E>([&] { fresh->load(art); });
    write_text(manifest, orig);
    return msg;
  }
  /// The output for `x` of a wrapper that loads the artifact now.
  Tensor run(const Tensor& x) const {
    auto fresh = make_wrapper();
    fresh->load(art);
    return fresh->forward({x}).tensor().clone();
  }
  /// A valid copy of rank 0's weights beside the artifact (its checksum matches the manifest's).
  std::string copy_outside() const {
    std::string path = dir.str("outside.safetensors");
    fs::copy_file(art + "/weights/rank0.safetensors", path);
    return path;
  }
  /// A checkpoint with other weights, beside the artifact.
  std::string other_checkpoint() const {
    std::string path = dir.str("other.safetensors");
    safetensors::save(path, nn::random_state_dict(ParallelMlp(), 8));
    return path;
  }
  /// After a failed recompile: the artifact loads and computes `y_old` for `x` as before, and
  /// nothing of the failed compile is left beside it.
  void expect_unchanged(const Tensor& x, const Tensor& y_old) const {
    Tensor y;
    ASSERT_NO_THROW(y = run(x));
    EXPECT_EQ(max_abs_diff(y, y_old), 0.0);
    EXPECT_EQ(entries(dir.str()), (std::vector<std::string>{"art", "ckpt.safetensors", "other.safetensors"}));
  }
  std::string read_text() const {
    std::ifstream in(manifest);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
};

TEST(HardeningManifest, FloatsAndOutOfRangeIntegersAreRefusedNamingFileKeyAndValue) {
  Compiled a;
  // Sanity: the untouched artifact loads.
  ASSERT_NO_THROW(Compiled::make_wrapper()->load(a.art));

  auto msg = a.load_error<FormatError>([](json& j) { j["format_version"] = 4294967297ull; });
  EXPECT_HAS(msg, a.manifest);
  EXPECT_HAS(msg, "format_version");
  EXPECT_HAS(msg, "4294967297");

  msg = a.load_error_text<FormatError>("\"format_version\": 1", "\"format_version\": 1e300");
  EXPECT_HAS(msg, "format_version");
  EXPECT_HAS(msg, "1e+300");

  msg = a.load_error<FormatError>([](json& j) { j["tp_degree"] = 4294967298ull; });
  EXPECT_HAS(msg, "tp_degree");
  EXPECT_HAS(msg, "4294967298");

  msg = a.load_error<FormatError>([](json& j) { j["weights"][1]["rank"] = 4294967296ull; });
  EXPECT_HAS(msg, "weights[1].rank");
  EXPECT_HAS(msg, "4294967296");

  msg = a.load_error<FormatError>([](json& j) { j["weights"][0]["rank"] = 1e300; });
  EXPECT_HAS(msg, "weights[0].rank");

  msg = a.load_error<FormatError>([](json& j) { j["weights"][0]["bytes"] = -1; });
  EXPECT_HAS(msg, "weights[0].bytes");
  EXPECT_HAS(msg, "-1");

  msg = a.load_error<FormatError>([](json& j) { j["buckets"][0]["batch"] = 4.9; });
  EXPECT_HAS(msg, "buckets[0].batch");
  EXPECT_HAS(msg, "4.9");

  msg = a.load_error<FormatError>([](json& j) { j["buckets"][0]["graph"]["params"][0]["shard_dim"] = -7; });
  EXPECT_HAS(msg, "shard_dim");
  EXPECT_HAS(msg, "-7");

  msg = a.load_error<FormatError>([](json& j) { j["inputs"][0]["sample_shape"][0] = 16.5; });
  EXPECT_HAS(msg, "inputs[0].sample_shape");
  EXPECT_HAS(msg, "16.5");

  // A value id of 2^32 would be read as %0.
  msg = a.load_error<FormatError>([](json& j) { j["buckets"][0]["graph"]["nodes"][0]["in"][0] = 4294967296ull; });
  EXPECT_HAS(msg, "nodes[0].in");
  EXPECT_HAS(msg, "4294967296");

  msg = a.load_error<FormatError>([](json& j) { j["buckets"][0]["graph"]["tp_degree"] = 2.5; });
  EXPECT_HAS(msg, "graph.tp_degree");
}

// ------------------------------------------------------------------------- element-count overflow

TEST(HardeningShape, NumelOverflowIsAShapeError) {
  const std::int64_t big = std::int64_t{1} << 40;
  Shape s{big, big};
  auto msg = message_of<ShapeError>([&] { (void)s.numel(); });
  EXPECT_HAS(msg, "[1099511627776, 1099511627776]");
  EXPECT_EQ((Shape{big, 4}).numel(), big * 4);
  EXPECT_EQ((Shape{}).numel(), 1);
  EXPECT_EQ((Shape{big, big, 0}).numel(), 0);
  // Tensors: the byte count overflows even when the element count does not.
  auto msg2 = message_of<ShapeError>([&] { Tensor::empty({std::int64_t{1} << 61, 2}); });
  EXPECT_HAS(msg2, "[2305843009213693952, 2]");
}

/// A parameter-free stage: every value has the input's shape.
struct Activation : nn::Module {
  Var forward(Var x) const { return F::gelu(F::silu(x)); }
};

/// The artifact of an Activation stage compiled for [4, 8] inputs, whose manifest a test rewrites
/// with other sample dims (consistent with the ops: every value is [4] + the sample).
struct ActivationArtifact {
  TempDir dir;
  InferenceConfig config{RuntimeConfig{.batch_size = 4}};
  std::string path = dir.str("art/manifest.json");

  ActivationArtifact() {
    safetensors::save(dir.str("empty.safetensors"), {});
    make()->compile(dir.str("empty.safetensors"), dir.str("art"));
  }
  std::unique_ptr<TestWrapper<Activation>> make() const {
    return std::make_unique<TestWrapper<Activation>>(config, WrapperOptions{.tag = "act"},
                                                     std::vector<std::vector<Tensor>>{{Tensor::zeros({4, 8})}});
  }
  /// Rewrites the specs' sample shape to `spec` and every graph value to [4] + `graph`.
  void set_dims(const std::vector<std::int64_t>& spec, const std::vector<std::int64_t>& graph) const {
    json j = read_json(path);
    for (auto* io : {&j["inputs"][0], &j["outputs"][0]}) (*io)["sample_shape"] = spec;
    std::vector<std::int64_t> v{4};
    v.insert(v.end(), graph.begin(), graph.end());
    for (auto& value : j["buckets"][0]["graph"]["values"]) value[0] = v;
    write_text(path, j.dump());
  }
  template <class E>
  std::string load_error() const {
    return message_of<E>([&] { make()->load(dir.str("art")); });
  }
};

TEST(HardeningShape, ManifestDimsOverflowingTheElementCountAreRefusedAtLoad) {
  ActivationArtifact a;
  ASSERT_NO_THROW(a.make()->load(a.dir.str("art")));
  // Every [8] sample becomes [2^40, 2^40]: consistent with the ops, 2^82 elements per value.
  const std::int64_t big = std::int64_t{1} << 40;
  a.set_dims({big, big}, {big, big});
  auto msg = a.load_error<FormatError>();
  EXPECT_HAS(msg, a.path);
  EXPECT_HAS(msg, "inputs[0].sample_shape is [1099511627776, 1099511627776] float32");
  EXPECT_HAS(msg, "overflows");
  // The same in the graph only (the specs left small) is refused there.
  a.set_dims({8}, {big, big});
  msg = a.load_error<FormatError>();
  EXPECT_HAS(msg, "buckets[0].graph.values[0] is [4, 1099511627776, 1099511627776] float32");
  // [4, 2^60] float32: 2^62 elements fit an int64, their 2^64 bytes do not.
  a.set_dims({std::int64_t{1} << 60}, {std::int64_t{1} << 60});
  msg = a.load_error<FormatError>();
  EXPECT_HAS(msg, "buckets[0].graph.values[0] is [4, 1152921504606846976] float32");
}

TEST(HardeningShape, HugeManifestDimsThatFitAreOutOfMemoryAtLoad) {
#ifdef DEVPIPE_TEST_UNDER_SANITIZER
  GTEST_SKIP() << "sanitizer allocators abort on a 16 TiB request instead of failing it";
#endif
  // [4, 2^40] float32 fits every size type (16 TiB per value), and no host has that memory.
  ActivationArtifact a;
  const std::int64_t big = std::int64_t{1} << 40;
  a.set_dims({big}, {big});
  EXPECT_HAS(a.load_error<OutOfMemory>(), "17592186044416");  // 2^44 bytes
}

// ------------------------------------------------------------------------------ artifact paths

TEST(HardeningPaths, AbsolutePathOutsideTheArtifactIsRefusedBeforeItIsOpened) {
  Compiled a;
  const std::string copy = a.copy_outside();  // an absolute path; the checksum would match
  auto msg = a.load_error<FormatError>([&](json& j) { j["weights"][0]["file"] = copy; });
  EXPECT_HAS(msg, copy);
  EXPECT_HAS(msg, "outside the artifact");
  // A system file is not opened, so its checksum is not shown either.
  const std::string foreign = "/etc/hostname";
  if (!fs::is_regular_file(foreign)) GTEST_SKIP() << foreign << " does not exist here";
  const std::string foreign_sum = file_checksum(foreign);
  msg = a.load_error<FormatError>([&](json& j) { j["weights"][0]["file"] = foreign; });
  EXPECT_HAS(msg, foreign);
  EXPECT_HAS(msg, "outside the artifact");
  EXPECT_EQ(msg.find(foreign_sum), std::string::npos) << "the foreign file was checksummed: " << msg;
}

TEST(HardeningPaths, DotDotEscapeIsRefusedEvenWhenTheChecksumMatches) {
  Compiled a;
  a.copy_outside();
  auto msg = a.load_error<FormatError>([](json& j) { j["weights"][0]["file"] = "../outside.safetensors"; });
  EXPECT_HAS(msg, "../outside.safetensors");
  EXPECT_HAS(msg, "outside the artifact");
  msg = a.load_error<FormatError>([](json& j) { j["weights"][0]["file"] = "weights/../../outside.safetensors"; });
  EXPECT_HAS(msg, "outside the artifact");
}

TEST(HardeningPaths, SymlinkLeadingOutIsRefusedOneStayingInsideIsFollowed) {
  Compiled a;
  const std::string rank0 = a.art + "/weights/rank0.safetensors";
  a.copy_outside();
  fs::copy_file(rank0, a.art + "/weights/copy0.safetensors");
  fs::remove(rank0);
  fs::create_symlink("../../outside.safetensors", rank0);
  auto msg = message_of<FormatError>([&] { Compiled::make_wrapper()->load(a.art); });
  EXPECT_HAS(msg, "weights/rank0.safetensors");
  EXPECT_HAS(msg, "outside the artifact");
  // A link to a file inside the artifact is fine.
  fs::remove(rank0);
  fs::create_symlink("copy0.safetensors", rank0);
  EXPECT_NO_THROW(Compiled::make_wrapper()->load(a.art));
}

TEST(HardeningPaths, FifoOrDirectoryIsRefusedWithoutHanging) {
  Compiled a;
  const std::string rank1 = a.art + "/weights/rank1.safetensors";
  fs::remove(rank1);
  ASSERT_EQ(::mkfifo(rank1.c_str(), 0600), 0);
  auto fresh = Compiled::make_wrapper();
  auto done = std::async(std::launch::async, [&] { return message_of<FormatError>([&] { fresh->load(a.art); }); });
  if (done.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "load() hangs on a FIFO";
    // Unblock the reader: a writer that opens and closes gives it end-of-file.
    int fd = ::open(rank1.c_str(), O_WRONLY | O_NONBLOCK);
    if (fd >= 0) ::close(fd);
  }
  std::string msg = done.get();
  EXPECT_HAS(msg, "rank1.safetensors");
  EXPECT_HAS(msg, "not a regular file");

  msg = a.load_error<FormatError>([](json& j) { j["weights"][1]["file"] = "weights"; });
  EXPECT_HAS(msg, "not a regular file");
}

// ------------------------------------------------------------------- atomic artifact replacement

TEST(HardeningAtomicCompile, ExceptionMidWriteLeavesThePreviousArtifactLoadable) {
  Compiled a(7);
  Tensor x = Tensor::randn({3, 16}, 11);
  Tensor y_old = a.run(x);

  // Recompile other weights; the progress callback throws once rank 0's weights are written.
  std::string other = a.other_checkpoint();
  int written = 0;
  auto stop_after_rank0 = [&](const std::string&, int, int, const std::string& what) {
    if (what.rfind("wrote weights", 0) == 0 && ++written == 1) throw IoError("injected failure after " + what);
  };
  auto msg = message_of<IoError>([&] { Compiled::make_wrapper()->compile(other, a.art, stop_after_rank0); });
  EXPECT_HAS(msg, "injected failure");
  EXPECT_EQ(written, 1);
  a.expect_unchanged(x, y_old);
}

TEST(HardeningAtomicCompile, FailedWriteLeavesThePreviousArtifactLoadable) {
  Compiled a(7);
  Tensor x = Tensor::randn({5, 16}, 12);
  Tensor y_old = a.run(x);
  std::string other = a.other_checkpoint();

  // A real write failure: files may grow to 1 KiB only (EFBIG, as ENOSPC on a full disk), so the
  // first weight file of the new artifact cannot be written.
  ASSERT_GT(fs::file_size(a.art + "/weights/rank0.safetensors"), 1024u);
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = old;
  small.rlim_cur = 1024;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string msg;
  try {
    Compiled::make_wrapper()->compile(other, a.art);
    ADD_FAILURE() << "compile did not fail";
  } catch (const IoError& e) {
    msg = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);
  EXPECT_HAS(msg, "File too large");
  a.expect_unchanged(x, y_old);
}

TEST(HardeningAtomicCompile, SuccessfulRecompileReplacesTheWholeArtifact) {
  Compiled a(7);
  Tensor x = Tensor::randn({4, 16}, 13);
  Tensor y_old = a.run(x);
  // A stray file in the old weights folder must not survive the replacement.
  write_text(a.art + "/weights/stale.safetensors", "x");
  Compiled::make_wrapper()->compile(a.other_checkpoint(), a.art);
  Compiled reference(8);  // the same weights compiled into a fresh folder
  auto w_new = Compiled::make_wrapper();
  w_new->load(a.art);
  auto w_ref = Compiled::make_wrapper();
  w_ref->load(reference.art);
  Tensor y_new = w_new->forward({x}).tensor();
  EXPECT_EQ(max_abs_diff(y_new, w_ref->forward({x}).tensor()), 0.0);
  EXPECT_GT(max_abs_diff(y_new, y_old), 1e-3);
  EXPECT_EQ(entries(a.art + "/weights"), (std::vector<std::string>{"rank0.safetensors", "rank1.safetensors"}));
  EXPECT_EQ(entries(a.dir.str()), (std::vector<std::string>{"art", "ckpt.safetensors", "other.safetensors"}));
}

TEST(HardeningAtomicCompile, AFolderHoldingOtherFilesIsNotReplaced) {
  TempDir dir;
  write_text(dir.str("notes.txt"), "mine");
  safetensors::save(dir.str("ckpt.safetensors"), nn::random_state_dict(ParallelMlp(), 7));
  auto msg = message_of<InvalidArgument>([&] { Compiled::make_wrapper()->compile(dir.str("ckpt.safetensors"), dir.str()); });
  EXPECT_HAS(msg, dir.str());
  EXPECT_HAS(msg, "notes.txt");
  EXPECT_TRUE(fs::exists(dir.str("notes.txt")));
}

// ------------------------------------------------------------------------- load() vs forward()

TEST(HardeningConcurrency, LoadWhileForwardsRunIsAStateError) {
  Compiled a;
  auto w = Compiled::make_wrapper("mlp");
  w->load(a.art);
  Tensor x = Tensor::randn({64, 16}, 21);  // 16 chunks of bucket 4: each forward takes a while
  Tensor expected = w->forward({x}).tensor().clone();

  std::atomic<bool> stop{false};
  std::atomic<int> forwards{0}, wrong{0}, refused{0}, other{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 3; ++t) {
    threads.emplace_back([&] {
      while (!stop.load()) {
        try {
          Output y = w->forward({x});
          if (max_abs_diff(y.tensor(), expected) != 0.0) ++wrong;
          ++forwards;
        } catch (const StateError& e) {
          // a forward that starts while a load() replaces the artifact
          if (std::string(e.what()).find("[mlp]") == std::string::npos) ++other;
          ++refused;
        } catch (...) {
          ++other;
        }
      }
    });
  }
  while (forwards.load() < 6) std::this_thread::yield();
  int load_refused = 0, loaded = 0;
  std::string msg;
  for (int i = 0; i < 30; ++i) {
    try {
      w->load(a.art);
      ++loaded;
    } catch (const StateError& e) {
      ++load_refused;
      msg = e.what();
    }
  }
  stop = true;
  for (auto& t : threads) t.join();
  EXPECT_GE(load_refused, 1) << "load() never noticed the forwards in flight (" << loaded << " loads went through)";
  EXPECT_HAS(msg, "[mlp]");
  EXPECT_HAS(msg, "forward()");
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(other.load(), 0);
  // Once the forwards are done, load() works and the wrapper still computes the same.
  ASSERT_NO_THROW(w->load(a.art));
  EXPECT_EQ(max_abs_diff(w->forward({x}).tensor(), expected), 0.0);
}

}  // namespace
