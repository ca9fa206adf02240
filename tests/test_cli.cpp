// The devpipe command-line program: its option parser (tools/options.h) and helpers
// (tools/cli_common.h) directly, and the program itself run as a user would, checking exit
// codes, stdout, stderr and the files it leaves.
//
// The program's tests run build/tools/devpipe, or the binary named by DEVPIPE_TEST_CLI (to
// run them against another build, e.g. an older one).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <tuple>

#include "cli_common.h"
#include "devpipe/safetensors.h"
#include "lm_twin.h"
#include "options.h"
#include "test_util.h"

namespace fs = std::filesystem;
using devpipe::testing::TempDir;
using devpipe::testing::tensors_close;
using devpipe::testing::Twin;
using nlohmann::json;

namespace devpipe::cli {
namespace {

// ----------------------------------------------------------------------- the option parser

const Command& demo_command() {
  static const Command c{
      .name = "demo",
      .summary = "a command for the tests",
      .positionals = "[DIR]",
      .max_positionals = 1,
      .options = {
          {.name = "flag", .help = "a flag"},
          {.name = "name", .kind = OptionKind::String, .value = "TEXT", .help = "a string"},
          {.name = "iters", .kind = OptionKind::Int, .value = "N", .help = "an int", .min = 1},
          {.name = "warmup", .kind = OptionKind::Int, .value = "N", .min = 0, .max = 10},
          {.name = "buckets", .kind = OptionKind::IntList, .value = "8,32", .help = "ints"},
          {.name = "dtype",
           .kind = OptionKind::Choice,
           .value = "D",
           .choices = {"float32", "bfloat16"}},
          {.name = "modes", .kind = OptionKind::ChoiceList, .value = "M", .choices = {"a", "b"}},
          {.name = "tp", .kind = OptionKind::Int, .refused = "it is fixed when compiling"}}};
  return c;
}

Args parse(const std::vector<std::string>& argv) { return Args::parse(demo_command(), argv); }

std::string usage_error(const std::vector<std::string>& argv) {
  try {
    parse(argv);
  } catch (const UsageError& e) {
    return e.what();
  }
  return "(no UsageError)";
}

TEST(CliOptions, ReadsEveryDeclaredKind) {
  Args a = parse({"--flag", "--name", "x y", "--iters=7", "--warmup", "0", "--buckets", "8,32,1",
                  "--dtype", "bfloat16", "--modes=b,a", "some/dir"});
  EXPECT_FALSE(a.help());
  EXPECT_TRUE(a.has("flag"));
  EXPECT_EQ(a.get("name", "?"), "x y");
  EXPECT_EQ(a.get_int("iters", 1), 7);
  EXPECT_EQ(a.get_int("warmup", 3), 0);
  EXPECT_EQ(a.get_ints("buckets"), (std::vector<long long>{8, 32, 1}));
  EXPECT_EQ(a.get("dtype", "float32"), "bfloat16");
  EXPECT_EQ(a.get_list("modes", "a"), (std::vector<std::string>{"b", "a"}));
  EXPECT_EQ(a.positional(), (std::vector<std::string>{"some/dir"}));
}

TEST(CliOptions, AbsentOptionsGiveTheFallbacks) {
  Args a = parse({});
  EXPECT_FALSE(a.has("flag"));
  EXPECT_EQ(a.get("name", "fallback"), "fallback");
  EXPECT_EQ(a.get_int("iters", 42), 42);
  EXPECT_EQ(a.get_ints("buckets", {4}), (std::vector<long long>{4}));
  EXPECT_EQ(a.get_list("modes", "a,b"), (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(a.positional().empty());
}

TEST(CliOptions, UsageErrorsNameTheOptionAndTheValue) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--frobnicate", "3"}, "unknown option --frobnicate"},
      {{"-x"}, "unknown option -x"},
      {{"--tp", "4"}, "option --tp is not accepted: it is fixed when compiling"},
      {{"--buckets", "8,abc"},
       "option --buckets expects comma-separated positive integers, got '8,abc'"},
      {{"--buckets", "8,"}, "option --buckets expects comma-separated positive integers, got '8,'"},
      {{"--buckets", "0"}, "option --buckets expects comma-separated positive integers, got '0'"},
      {{"--iters", "0"}, "option --iters expects an integer >= 1, got '0'"},
      {{"--iters", "-3"}, "option --iters expects an integer >= 1, got '-3'"},
      {{"--iters", "1e3"}, "option --iters expects an integer >= 1, got '1e3'"},
      {{"--iters", "99999999999999999999"},
       "option --iters expects an integer >= 1, got '99999999999999999999'"},
      {{"--iters="}, "option --iters expects an integer >= 1, got ''"},
      {{"--warmup", "11"}, "option --warmup expects an integer in [0, 10], got '11'"},
      {{"--dtype", "int8"}, "option --dtype expects one of float32, bfloat16, got 'int8'"},
      {{"--modes", "a,c"}, "option --modes expects a comma-separated list of a, b, got 'a,c'"},
      {{"--name", ""}, "option --name expects a non-empty value, got ''"},
      {{"--iters"}, "option --iters needs a value"},
      {{"--name", "--flag"}, "option --name needs a value, got option --flag"},
      {{"--flag=1"}, "option --flag takes no value, got '--flag=1'"},
      {{"--iters", "2", "--iters", "3"}, "option --iters is given twice"},
      {{"a", "b"}, "unexpected argument 'b'"},
  };
  for (const auto& [argv, message] : cases) {
    EXPECT_EQ(usage_error(argv), message) << "argv[0] " << argv[0];
  }
}

TEST(CliOptions, AnIntListAcceptsItsWordsForTheCommandToRead) {
  static const Command c{.name = "demo",
                         .summary = "s",
                         .options = {{.name = "ids",
                                      .kind = OptionKind::IntList,
                                      .value = "1,2",
                                      .min = 0,
                                      .words = {"img"}}}};
  Args a = Args::parse(c, {"--ids", "1,img,0"});
  EXPECT_THROW(a.get_ints("ids"),
               InvalidArgument);  // a word is no integer: the command reads the items
  EXPECT_EQ(Args::parse(c, {"--ids", "3,0"}).get_ints("ids"), (std::vector<long long>{3, 0}));
  try {
    Args::parse(c, {"--ids", "1,image"});
    FAIL() << "no UsageError";
  } catch (const UsageError& e) {  // the message of an IntList without words
    EXPECT_STREQ(e.what(), "option --ids expects comma-separated integers >= 0, got '1,image'");
  }
  try {
    refuse_value(c.options[0], "1,img");
    FAIL() << "no UsageError";
  } catch (const UsageError& e) {
    EXPECT_STREQ(e.what(), "option --ids expects comma-separated integers >= 0, got '1,img'");
  }
}

TEST(CliOptions, HelpAnywhereChecksNothingElse) {
  EXPECT_TRUE(parse({"--frobnicate", "--iters", "0", "-h"}).help());
  EXPECT_TRUE(parse({"--help"}).help());
}

TEST(CliOptions, MissingPositionalIsNamed) {
  static const Command c{.name = "inspect",
                         .summary = "s",
                         .positionals = "ARTIFACT_DIR",
                         .min_positionals = 1,
                         .max_positionals = 1};
  try {
    Args::parse(c, {});
    FAIL() << "no UsageError";
  } catch (const UsageError& e) {
    EXPECT_STREQ(e.what(), "missing argument ARTIFACT_DIR");
  }
}

TEST(CliOptions, UsageListsTheAcceptedOptions) {
  std::string u = demo_command().usage();
  EXPECT_EQ(u.rfind("usage: devpipe demo [options] [DIR]\n  a command for the tests\n", 0), 0u)
      << u;
  EXPECT_NE(u.find("  --iters N"), std::string::npos) << u;
  EXPECT_NE(u.find("  --dtype D"), std::string::npos) << u;
  EXPECT_NE(u.find("(float32, bfloat16)"), std::string::npos) << u;
  EXPECT_NE(u.find("  -h, --help"), std::string::npos) << u;
  EXPECT_EQ(u.find("--tp"), std::string::npos) << "a refused option is not offered: " << u;
}

TEST(CliOptions, ReadingAnUndeclaredOptionIsAProgrammingError) {
  Args a = parse({});
  EXPECT_THROW(a.has("nope"), InvalidArgument);
  EXPECT_THROW(a.get_int("name", 1), InvalidArgument);  // declared as a string
  try {
    a.get("nope", "");
  } catch (const UsageError&) {
    FAIL() << "not the user's fault, so not a UsageError";
  } catch (const InvalidArgument&) {
  }
}

// ------------------------------------------------------------------------------ helpers

TEST(CliSummary, PercentilesInterpolateBetweenSortedSamples) {
  LatencyStats s = summarize({4, 1, 3, 2});
  EXPECT_DOUBLE_EQ(s.min, 1);
  EXPECT_DOUBLE_EQ(s.p50, 2.5);
  EXPECT_DOUBLE_EQ(s.p90, 3.7);
  EXPECT_DOUBLE_EQ(s.p99, 3.97);
  EXPECT_DOUBLE_EQ(s.max, 4);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  std::vector<double> hundred;
  for (int i = 100; i >= 1; --i) hundred.push_back(i);
  s = summarize(hundred);
  EXPECT_NEAR(s.p50, 50.5, 1e-12);
  EXPECT_NEAR(s.p90, 90.1, 1e-12);
  EXPECT_NEAR(s.p95, 95.05, 1e-12);
  EXPECT_NEAR(s.p99, 99.01, 1e-12);
  EXPECT_NEAR(s.mean, 50.5, 1e-12);
  s = summarize({});
  EXPECT_EQ(s.min, 0);
  EXPECT_EQ(s.mean, 0);
}

TEST(CliWording, AdviceToCallCompileBecomesTheCommand) {
  EXPECT_EQ(cli_wording("artifact at 'x' was compiled with tp_degree 2: recompile with compile() "
                        "or fix the config",
                        "/w"),
            "artifact at 'x' was compiled with tp_degree 2: recompile with `devpipe compile --work "
            "/w` or fix the "
            "config");
  EXPECT_EQ(cli_wording("compile() and compile()", "D"),
            "`devpipe compile --work D` and `devpipe compile --work D`");
  EXPECT_EQ(cli_wording("nothing to change", "D"), "nothing to change");
}

// ------------------------------------------------------------------------ the program

struct Result {
  int code = -1;  // exit code, or 128 + signal
  std::string out, err;
};

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::string cli_path() {
  const char* other = std::getenv("DEVPIPE_TEST_CLI");
  return other && *other ? other : DEVPIPE_CLI;
}

/// Runs `devpipe <args>` (args as a shell would split them, paths absolute). With `merged`, stderr
/// goes to the same file as stdout (in `out`), as with `2>&1` into a pipe or file.
Result run_cli(const std::string& args, bool merged = false) {
  TempDir io;
  // In a scratch folder, so that the defaults' relative paths (build/devpipe_work, ...) land there.
  std::string cmd = "cd " + io.str() + " && '" + cli_path() + "' " + args + " >" + io.str("out") +
                    (merged ? " 2>&1" : " 2>" + io.str("err")) + " </dev/null";
  int status = std::system(cmd.c_str());
  Result r;
  if (status != -1 && WIFEXITED(status)) r.code = WEXITSTATUS(status);
  if (status != -1 && WIFSIGNALED(status)) r.code = 128 + WTERMSIG(status);
  r.out = read_text(io.path() / "out");
  if (!merged) r.err = read_text(io.path() / "err");
  return r;
}

const std::vector<std::string> kCommands = {"compile", "run", "inspect", "bench", "diffuse", "help"};

TEST(Cli, EveryCommandHasHelpThatRunsNothing) {
  TempDir t;
  const std::string work = t.str("work");
  for (const auto& cmd : kCommands) {
    for (const char* flag : {"--help", "-h"}) {
      // With the options that would make the command do something.
      std::string args = cmd + " --work " + work + " " + flag;
      if (cmd == "bench") args = cmd + " --workload chain8 --out " + work + "/r.json " + flag;
      if (cmd == "inspect") args = cmd + " " + work + " " + flag;
      if (cmd == "help") args = cmd + " " + flag;
      Result r = run_cli(args);
      EXPECT_EQ(r.code, 0) << args << "\n" << r.err;
      EXPECT_EQ(r.out.rfind("usage: devpipe " + cmd, 0), 0u) << args << "\n" << r.out;
      EXPECT_NE(r.out.find("-h, --help"), std::string::npos) << args << "\n" << r.out;
      EXPECT_EQ(r.err, "") << args;
      EXPECT_FALSE(fs::exists(work)) << args << " wrote " << work;
    }
  }
}

TEST(Cli, HelpCommandAndTopLevelHelp) {
  Result general = run_cli("--help");
  EXPECT_EQ(general.code, 0);
  for (const auto& cmd : kCommands) {
    EXPECT_NE(general.out.find("\n  " + cmd + " "), std::string::npos) << cmd << " missing from\n"
                                                                       << general.out;
    Result via_help = run_cli("help " + cmd), via_flag = run_cli(cmd + " --help");
    EXPECT_EQ(via_help.code, 0) << cmd;
    EXPECT_EQ(via_help.out, via_flag.out) << cmd;
  }
  Result help = run_cli("help");
  EXPECT_EQ(help.code, 0);
  EXPECT_EQ(help.out, general.out);
  Result nosuch = run_cli("help nosuch");
  EXPECT_EQ(nosuch.code, 2);
  EXPECT_EQ(nosuch.err, "devpipe help: unknown command 'nosuch' (see devpipe help --help)\n");
  Result none = run_cli("");
  EXPECT_EQ(none.code, 2);
  EXPECT_EQ(none.err, general.out) << "no command: the usage, on stderr";
  Result unknown = run_cli("frobnicate");
  EXPECT_EQ(unknown.code, 2);
  EXPECT_EQ(unknown.err, "devpipe: unknown command 'frobnicate' (see devpipe --help)\n");
}

TEST(Cli, VersionIsTheProjectVersion) {
  Result r = run_cli("--version");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out, std::string("devpipe ") + DEVPIPE_PROJECT_VERSION + "\n");
}

TEST(Cli, UnknownOptionsAreRefusedByName) {
  for (const auto& cmd : kCommands) {
    Result r = run_cli(cmd + " --frobnicate 3");
    EXPECT_EQ(r.code, 2) << cmd << "\n" << r.out << r.err;
    EXPECT_EQ(r.err,
              "devpipe " + cmd + ": unknown option --frobnicate (see devpipe " + cmd + " --help)\n")
        << cmd;
  }
}

TEST(Cli, RunRefusesWhatIsFixedAtCompileTime) {
  for (const std::string flag :
       {"tp 4", "dtype bfloat16", "buckets 8", "image 32", "vision-ckpt x", "text-ckpt x"}) {
    Result r = run_cli("run --" + flag);
    EXPECT_EQ(r.code, 2) << flag << "\n" << r.err;
    std::string name = flag.substr(0, flag.find(' '));
    EXPECT_EQ(r.err.rfind("devpipe run: option --" + name +
                              " is not accepted: it is fixed when compiling "
                              "(devpipe compile --work DIR --" +
                              name,
                          0),
              0u)
        << r.err;
  }
}

TEST(Cli, BadValuesNameTheOptionAndTheValue) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"compile --buckets 8,abc",
       "devpipe compile: option --buckets expects comma-separated positive integers, got '8,abc'"},
      {"compile --tp 0", "devpipe compile: option --tp expects an integer in [1, 64], got '0'"},
      {"compile --dtype int64",
       "devpipe compile: option --dtype expects one of float32, bfloat16, float16, got 'int64'"},
      {"compile --model llama",
       "devpipe compile: option --model expects one of vision_text, got 'llama'"},
      {"run --iters 0", "devpipe run: option --iters expects an integer in [1, 1000000], got '0'"},
      {"run --iters -3",
       "devpipe run: option --iters expects an integer in [1, 1000000], got '-3'"},
      {"run --batch 2.5",
       "devpipe run: option --batch expects an integer in [1, 1048576], got '2.5'"},
      {"bench --iters 0",
       "devpipe bench: option --iters expects an integer in [1, 1000000], got '0'"},
      {"bench --warmup -1",
       "devpipe bench: option --warmup expects an integer in [0, 1000000], got '-1'"},
      {"bench --workload seed,nope",
       "devpipe bench: option --workload expects a comma-separated list of seed, "
       "seed_tp1, seed_tp2, large, chain8, llm, vlm, dit, got 'seed,nope'"},
      {"bench --all --workload chain8", "devpipe bench: options --all and --workload exclude each other"},
      {"inspect", "devpipe inspect: missing argument ARTIFACT_DIR"},
  };
  for (const auto& [args, message] : cases) {
    Result r = run_cli(args);
    EXPECT_EQ(r.code, 2) << args << "\n" << r.err;
    EXPECT_EQ(r.err, message + " (see devpipe " + args.substr(0, args.find(' ')) + " --help)\n")
        << args;
  }
}

/// A work folder compiled by the program: tp 2, batch 4, buckets 2 and 4, 16x16 images.
class CliWork : public ::testing::Test {
 protected:
  void SetUp() override {
    Result r = run_cli("compile --work " + work() + " --tp 2 --batch 4 --buckets 2,4 --image 16");
    ASSERT_EQ(r.code, 0) << r.out << r.err;
  }
  std::string work() const { return dir_.str("work"); }

  TempDir dir_;
};

/// Every file under `root` (relative path -> contents).
std::map<std::string, std::string> snapshot(const fs::path& root) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(root)) {
    if (e.is_regular_file()) files[fs::relative(e.path(), root).string()] = read_text(e.path());
  }
  return files;
}

double number_after(const std::string& text, const std::string& label) {
  std::smatch m;
  if (!std::regex_search(text, m, std::regex(label + " ([0-9]+\\.[0-9]+)"))) {
    ADD_FAILURE() << "no '" << label << " <number>' in\n" << text;
    return 0;
  }
  return std::stod(m[1].str());
}

TEST_F(CliWork, RunPrintsALatencySummary) {
  Result r = run_cli("run --work " + work() + " --batch 3 --iters 7 --warmup 2");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("Final output shape: [3, 1024] on cpu"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("latency over 7 iterations (after 2 warm-up): "), std::string::npos)
      << r.out;
  double min = number_after(r.out, "min"), p50 = number_after(r.out, "p50"),
         p90 = number_after(r.out, "p90");
  double p99 = number_after(r.out, "p99"), mean = number_after(r.out, "mean"),
         max = number_after(r.out, "max");
  double throughput = number_after(r.out, "throughput:");
  EXPECT_GT(min, 0);
  EXPECT_LE(min, p50);
  EXPECT_LE(p50, p90);
  EXPECT_LE(p90, p99);
  EXPECT_LE(p99, max);
  EXPECT_LE(min, mean);
  EXPECT_LE(mean, max);
  // samples/s = batch / mean latency, both printed rounded (ms to 0.001, samples/s to 0.1).
  EXPECT_GE(throughput, 3000.0 / (mean + 0.0005) - 0.05) << r.out;
  EXPECT_LE(throughput, 3000.0 / (mean - 0.0005) + 0.05) << r.out;
  EXPECT_NE(r.out.find(" samples/s"), std::string::npos) << r.out;
}

TEST_F(CliWork, RunWritesTheTraceOfOneForward) {
  const std::string trace = dir_.str("trace.json");
  Result r = run_cli("run --work " + work() + " --iters 3 --trace " + trace);
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("wrote " + trace), std::string::npos) << r.out;
  json j = json::parse(read_text(trace));
  ASSERT_TRUE(j.at("traceEvents").is_array());
  std::map<std::pair<int, std::string>, int> stage_spans;  // (track, stage) -> count
  std::map<int, int> kernels;                              // track -> kernel spans
  std::map<int, std::string> tracks;
  for (const auto& e : j["traceEvents"]) {
    if (e.at("ph") == "M" && e.at("name") == "thread_name")
      tracks[e.at("tid").get<int>()] = e["args"]["name"];
    if (e.at("ph") != "X") continue;
    if (e.at("cat") == "stage")
      ++stage_spans[{e.at("tid").get<int>(), e.at("name").get<std::string>()}];
    if (e.at("cat") == "kernel") ++kernels[e.at("tid").get<int>()];
  }
  EXPECT_EQ(tracks[1], "rank 0");
  EXPECT_EQ(tracks[2], "rank 1");
  for (int track : {1, 2}) {
    // One forward: each stage once per rank (not the warm-up's nor the timed iterations').
    EXPECT_EQ((stage_spans[{track, "vision_model"}]), 1) << "track " << track;
    EXPECT_EQ((stage_spans[{track, "text_model"}]), 1) << "track " << track;
    // Both stages split the batch over the 2 ranks (each rank's rows are a view of the input,
    // no kernel): conv2d_global_avg_pool, linear, all_gather (vision); linear, concat, linear,
    // all_gather (text).
    EXPECT_EQ(kernels[track], 7) << "track " << track;
  }
}

TEST_F(CliWork, ErrorsAdviseTheCommandNotTheApi) {
  // A config.json that no longer matches the artifacts.
  json config = json::parse(read_text(work() + "/config.json"));
  ASSERT_EQ(config.at("runtime").at("tp_degree"), 2) << config.dump();
  config["runtime"]["tp_degree"] = 1;
  std::ofstream(work() + "/config.json") << config.dump();
  Result r = run_cli("run --work " + work());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(
      r.err.find(
          "tp_degree 2, but this wrapper has tp_degree 1: recompile with `devpipe compile --work " +
          work() + "`"),
      std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("compile()"), std::string::npos) << r.err;

  fs::remove_all(work() + "/compiled");
  r = run_cli("run --work " + work());
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("(run `devpipe compile --work " + work() + "` first)"), std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("compile()"), std::string::npos) << r.err;

  r = run_cli("inspect " + work() + "/compiled/vision/vision_model");
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("(run `devpipe compile --work DIR` first)"), std::string::npos) << r.err;
}

TEST_F(CliWork, AFailedCompileLeavesTheWorkFolderAsItWas) {
  const auto before = snapshot(work());
  ASSERT_TRUE(before.count("config.json") &&
              before.count("compiled/vision/vision_model/manifest.json") &&
              before.count("checkpoints/vision/model.safetensors"));
  // Another config; the vision stage compiles, the text stage's checkpoint does not exist.
  Result r = run_cli("compile --work " + work() +
                     " --tp 1 --batch 2 --buckets 1,2 --image 8 --text-ckpt " +
                     dir_.str("no_such_checkpoint"));
  ASSERT_EQ(r.code, 1) << r.out << r.err;
  EXPECT_NE(r.err.find("no_such_checkpoint"), std::string::npos) << r.err;
  EXPECT_EQ(snapshot(work()), before) << "config.json, checkpoints or artifacts changed";
  std::vector<std::string> entries;
  for (const auto& e : fs::directory_iterator(work()))
    entries.push_back(e.path().filename().string());
  std::sort(entries.begin(), entries.end());
  EXPECT_EQ(entries, (std::vector<std::string>{"checkpoints", "compiled", "config.json"}));
  r = run_cli("run --work " + work() + " --iters 1");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("Final output shape: [4, 1024] on cpu"), std::string::npos) << r.out;

  // A compile that succeeds replaces them all.
  r = run_cli("compile --work " + work() + " --tp 1 --batch 2 --buckets 1,2 --image 8");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(json::parse(read_text(work() + "/config.json")).at("runtime").at("tp_degree"), 1);
  EXPECT_EQ(
      json::parse(read_text(work() + "/compiled/text/text_model/manifest.json")).at("tp_degree"),
      1);
  entries.clear();
  for (const auto& e : fs::recursive_directory_iterator(work()))
    entries.push_back(e.path().filename().string());
  for (const auto& name : entries) EXPECT_EQ(name.find(".old."), std::string::npos) << name;
  for (const auto& name : entries) EXPECT_EQ(name.find("staging"), std::string::npos) << name;
  r = run_cli("run --work " + work() + " --iters 1");
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("Final output shape: [2, 1024] on cpu"), std::string::npos) << r.out;
}

TEST_F(CliWork, StdoutComesBeforeTheProgressDrawnAfterIt) {
  // stdout and stderr into one file (not a terminal): what run prints before loading must
  // come before the load's progress bars, and the output before the trace's "wrote".
  Result r = run_cli("run --work " + work() + " --iters 1", /*merged=*/true);
  ASSERT_EQ(r.code, 0) << r.out;
  auto header = r.out.find("running vision_text from " + work());
  auto first_bar = r.out.find("[#");
  auto output = r.out.find("Final output shape");
  ASSERT_NE(header, std::string::npos) << r.out;
  ASSERT_NE(first_bar, std::string::npos) << r.out;
  EXPECT_LT(header, first_bar) << r.out;
  EXPECT_GT(output, r.out.rfind("[#")) << r.out;

  r = run_cli("compile --work " + work() + " --batch 4 --image 16", /*merged=*/true);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(r.out.rfind(
                "compiling vision_text (tp_degree 2, float32, batch 4, buckets 4, image 16) into " +
                    work(),
                0),
            0u)
      << r.out;
}

// ------------------------------------------------------------ generate with a Llama folder

/// `devpipe generate` on a Llama folder (tests/reference/llama_ref.py's tiny model: hidden 64,
/// vocab 300) against the twin's greedy ids: the folder kind the vision-language one joined.
TEST(CliLlama, GreedyIdsMatchTheTwin) {
  const std::string run = " --prompts '1,17,42;5,6,7,8,9' --max-new-tokens 6 --greedy --ignore-eos";
  const fs::path twin = devpipe::testing::cached_twin_dir(
      "cli_llama_twin", {"llama_ref.py"}, run, [&](const fs::path& tmp) {
        return devpipe::testing::run_torch_script(
                   "llama_ref.py", "write-model " + (tmp / "model").string() + " > /dev/null") &&
               devpipe::testing::run_torch_script(
                   "llama_ref.py", "run " + (tmp / "model").string() + run + " --out " +
                                       (tmp / "ref").string() + " > /dev/null");
      });
  const Twin ref = devpipe::testing::load_twin((twin / "ref").string());
  TempDir work;
  const std::string args =
      "generate --model " + (twin / "model").string() +
      " --prompt-ids 1,17,42 --prompt-ids 5,6,7,8,9 --max-new-tokens 6 --no-eos --json --work " +
      work.str();
  for (int pass = 0; pass < 2; ++pass) {  // compiles, then loads what it compiled
    Result r = run_cli(args);
    ASSERT_EQ(r.code, 0) << r.out << r.err;
    EXPECT_EQ(json::parse(r.out).at("generated").get<std::vector<std::vector<std::int64_t>>>(),
              ref.generated)
        << r.out;
    EXPECT_EQ(r.err.find("compiling") != std::string::npos, pass == 0) << r.err;
  }
  EXPECT_TRUE(fs::exists(work.path() / "tp1_float32_b2_len16_cache-16_ctx-16" / "context_encoding" /
                         "manifest.json"));
  Result r = run_cli("generate --model " + (twin / "model").string() + " --prompt-ids 1,x --work " +
                     work.str());
  EXPECT_EQ(r.code, 2);
  EXPECT_EQ(r.err,
            "devpipe generate: option --prompt-ids expects comma-separated integers >= 0, got "
            "'1,x' (see devpipe "
            "generate --help)\n");
}

// ------------------------------------------------- generate with a vision-language folder

/// `devpipe generate` on a Llava folder (a Pixtral vision tower) against the PyTorch twin
/// (tests/reference/pixtral_ref.py): its tiny model (text hidden 64, vocab 300; vision patch 4,
/// image_size 32, image_token_index 10, "full" features) and its greedy ids for two prompts, each
/// about one 16 x 12 image (4 x 3 patches: 12 image tokens), 6 new tokens without eos.
class CliLlava : public ::testing::Test {
 protected:
  static constexpr std::int64_t kImageToken = 10, kImageTokens = 12;
  static void SetUpTestSuite() {
    const std::string model = " --patch 4 --image-size 32",
                      run =
                          " --prompts '1,img,17,42;1,5,img,9' --image-hw 16x12 "
                          "--max-new-tokens 6 --greedy --ignore-eos";
    twin_ = new fs::path(devpipe::testing::cached_twin_dir(
        "cli_llava_twin", {"pixtral_ref.py", "llama_ref.py"}, model + run,
        [&](const fs::path& tmp) {
          return devpipe::testing::run_torch_script(
                     "pixtral_ref.py",
                     "write-model " + (tmp / "model").string() + model + " > /dev/null") &&
                 devpipe::testing::run_torch_script(
                     "pixtral_ref.py", "run " + (tmp / "model").string() + run + " --out " +
                                           (tmp / "ref").string() + " > /dev/null");
        }));
    ref_ = new Twin(devpipe::testing::load_twin((*twin_ / "ref").string()));
    dir_ = new TempDir();
    // What the user saves from HF's processor: a file with pixel_values only.
    safetensors::save(dir_->str("pixels.safetensors"),
                      {{"pixel_values", ref_->t.at("pixel_values")}});
  }
  static void TearDownTestSuite() {
    delete dir_;
    delete ref_;
    delete twin_;
  }
  static std::string model() { return (*twin_ / "model").string(); }
  static std::string pixels() { return dir_->str("pixels.safetensors"); }

  /// The twin's prompts, as --prompt-ids options: image tokens expanded, or as `img`.
  static std::string prompt_args(bool shorthand) {
    auto img = [&] {
      if (shorthand) return std::string("img");
      std::string run;
      for (std::int64_t i = 0; i < kImageTokens; ++i)
        run += (i ? "," : "") + std::to_string(kImageToken);
      return run;
    };
    return " --prompt-ids 1," + img() + ",17,42 --prompt-ids 1,5," + img() + ",9";
  }

  /// generate --json at `tp` into `work`, both prompt forms: the ids equal the twin's; the
  /// second run loads what the first compiled, under a key naming the image size.
  static void expect_twin_ids(int tp) {
    ASSERT_EQ(ref_->generated.size(), 2u);
    std::set<std::int64_t>
        distinct;  // the twin's ids are not degenerate, so equal ids mean something
    for (const auto& s : ref_->generated) distinct.insert(s.begin(), s.end());
    EXPECT_GE(distinct.size(), 4u);
    TempDir work;
    for (bool shorthand : {false, true}) {
      SCOPED_TRACE(shorthand ? "img shorthand" : "expanded image tokens");
      Result r = run_cli("generate --model " + model() + " --pixel-values " + pixels() +
                         prompt_args(shorthand) + " --max-new-tokens 6 --no-eos --json --tp " +
                         std::to_string(tp) + " --work " + work.str());
      ASSERT_EQ(r.code, 0) << r.out << r.err;
      const json j = json::parse(r.out);
      EXPECT_EQ(j.at("generated").get<std::vector<std::vector<std::int64_t>>>(), ref_->generated)
          << r.out;
      EXPECT_GT(j.at("tokens_per_s").get<double>(), 0) << r.out;
      EXPECT_EQ(r.err.find("compiling") != std::string::npos, !shorthand) << r.err;
    }
    const std::string key = "tp" + std::to_string(tp) + "_float32_b2_len32_cache-32_ctx-16-32_img16x12";
    EXPECT_TRUE(fs::exists(work.path() / key / "vision_encoder" / "manifest.json")) << key;
  }

  static fs::path* twin_;
  static Twin* ref_;
  static TempDir* dir_;
};

fs::path* CliLlava::twin_ = nullptr;
Twin* CliLlava::ref_ = nullptr;
TempDir* CliLlava::dir_ = nullptr;

TEST_F(CliLlava, GreedyIdsMatchTheTwinAtTp1) { expect_twin_ids(1); }

TEST_F(CliLlava, GreedyIdsMatchTheTwinAtTp2) { expect_twin_ids(2); }

TEST_F(CliLlava, StreamsTokensThenEachSequence) {
  TempDir work;
  Result r = run_cli("generate --model " + model() + " --pixel-values " + pixels() +
                     prompt_args(true) + " --max-new-tokens 6 --no-eos --work " + work.str());
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  std::string streamed, sequences;
  for (std::size_t step = 0; step < 6; ++step) {
    streamed += (step ? "\n" : "") + std::string("0:") + std::to_string(ref_->generated[0][step]) +
                " 1:" + std::to_string(ref_->generated[1][step]) + " ";
  }
  for (std::size_t s = 0; s < 2; ++s) {
    sequences += "sequence " + std::to_string(s) + ":";
    for (std::int64_t id : ref_->generated[s]) sequences += " " + std::to_string(id);
    sequences += "\n";
  }
  EXPECT_EQ(r.out.rfind(streamed + "\n" + sequences + "12 tokens in ", 0), 0u) << r.out;
  EXPECT_NE(r.out.find(" tokens/s (tp_degree 1, float32)\n"), std::string::npos) << r.out;
}

TEST_F(CliLlava, ContextBucketsHoldTheImageTokensAndNoShorterOnes) {
  // A 32 x 32 image: 8 x 8 patches, 64 image tokens; the prompt holds 66 ids. Buckets 16 and 32
  // could never run; 64 cannot hold the prompt, 128 (the cache length) does.
  TempDir t;
  safetensors::save(t.str("pixels.safetensors"), {{"pixel_values", Tensor::randn({1, 3, 32, 32}, 7)}});
  Result r = run_cli("generate --model " + model() + " --pixel-values " + t.str("pixels.safetensors") +
                     " --prompt-ids 1,img,2 --max-new-tokens 2 --no-eos --json --work " + t.str("work"));
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  const auto ids = json::parse(r.out).at("generated").get<std::vector<std::vector<std::int64_t>>>();
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(ids[0].size(), 2u);
  const json manifest = json::parse(read_text(
      t.path() / "work" / "tp1_float32_b1_len128_cache-128_ctx-64-128_img32x32" / "context_encoding" / "manifest.json"));
  std::set<std::int64_t> seqs;
  for (const auto& b : manifest.at("buckets")) seqs.insert(b.at("dims").at("seq").get<std::int64_t>());
  EXPECT_EQ(seqs, (std::set<std::int64_t>{64, 128})) << manifest.dump();
}

TEST_F(CliLlava, RequestErrorsNameTheValues) {
  TempDir t;
  const std::string work = t.str("work");
  const Tensor& pv = ref_->t.at("pixel_values");  // [2, 3, 16, 12]
  const std::vector<float> values = pv.to_float_vector();
  auto write = [&](const std::string& name, const std::string& key, const Tensor& x) {
    safetensors::save(t.str(name), {{key, x}});
    return t.str(name);
  };
  const std::string other_key = write("other_key.safetensors", "images", pv);
  const std::string bf16 = write("bf16.safetensors", "pixel_values",
                                 Tensor::from_vector(values, {2, 3, 16, 12}, DType::BFloat16));
  const std::string rank3 =
      write("rank3.safetensors", "pixel_values", Tensor::from_vector(values, {2, 3, 192}));
  const std::string one =
      write("one.safetensors", "pixel_values",
            Tensor::from_vector(std::vector<float>(values.begin(), values.begin() + 3 * 16 * 12),
                                {1, 3, 16, 12}));
  const std::string gray =
      write("gray.safetensors", "pixel_values",
            Tensor::from_vector(std::vector<float>(values.begin(), values.begin() + 2 * 16 * 12),
                                {2, 1, 16, 12}));
  const std::string odd = write(
      "odd.safetensors", "pixel_values",
      Tensor::from_vector(std::vector<float>(values.begin(), values.begin() + 2 * 3 * 14 * 12),
                          {2, 3, 14, 12}));
  // A Llama folder: the twin's text config alone (nothing reads weights before these errors).
  fs::create_directories(t.path() / "llama");
  std::ofstream(t.path() / "llama" / "config.json")
      << json::parse(read_text(*twin_ / "model" / "config.json")).at("text_config").dump();
  const std::string llama = t.str("llama");
  const std::string base = "generate --work " + work + " --max-new-tokens 6 --model ";
  const std::string two = prompt_args(true);
  std::string eleven = " --prompt-ids 1";
  for (int i = 0; i < 11; ++i) eleven += ",10";
  eleven += " --prompt-ids 1,img";
  const std::vector<std::tuple<std::string, int, std::string>> cases = {
      {base + model() + two, 2,
       "devpipe generate: missing option --pixel-values FILE (" + model() +
           " is a vision-language folder: LlavaForConditionalGeneration) (see devpipe generate "
           "--help)\n"},
      {base + llama + " --prompt-ids 1,17 --pixel-values " + pixels(), 2,
       "devpipe generate: option --pixel-values is for vision-language folders; " + llama +
           " is a Llama folder (config.json names no LlavaForConditionalGeneration nor a "
           "vision_config) "
           "(see devpipe generate --help)\n"},
      {base + llama + " --prompt-ids 1,img,17", 2,
       "devpipe generate: option --prompt-ids expects comma-separated integers >= 0, got "
       "'1,img,17' "
       "(see devpipe generate --help)\n"},
      {base + model() + " --prompt-ids 1,image,17 --pixel-values " + pixels(), 2,
       "devpipe generate: option --prompt-ids expects comma-separated integers >= 0, got "
       "'1,image,17' "
       "(see devpipe generate --help)\n"},
      {base + model() + two + " --pixel-values " + other_key, 1,
       "devpipe generate: error: --pixel-values '" + other_key +
           "' has no tensor \"pixel_values\" (it holds: images)\n"},
      {base + model() + two + " --pixel-values " + bf16, 1,
       "devpipe generate: error: --pixel-values '" + bf16 +
           "': \"pixel_values\" is bfloat16 [2, 3, 16, 12], expected float32 [images, channels, "
           "height, width]\n"},
      {base + model() + two + " --pixel-values " + rank3, 1,
       "devpipe generate: error: --pixel-values '" + rank3 +
           "': \"pixel_values\" is float32 [2, 3, 192], expected float32 [images, channels, "
           "height, width]\n"},
      {base + model() + two + " --pixel-values " + one, 1,
       "devpipe generate: error: --pixel-values '" + one +
           "': \"pixel_values\" [1, 3, 16, 12] holds 1 images of 3 channels, expected one image "
           "per --prompt-ids (2) "
           "of 3 channels (the vision config's num_channels)\n"},
      {base + model() + two + " --pixel-values " + gray, 1,
       "devpipe generate: error: --pixel-values '" + gray +
           "': \"pixel_values\" [2, 1, 16, 12] holds 2 images of 1 channels, expected one image "
           "per --prompt-ids (2) "
           "of 3 channels (the vision config's num_channels)\n"},
      {base + model() + two + " --pixel-values " + odd, 1,
       "devpipe generate: error: llava: image_height 14 must be a multiple of patch_size 4 and at "
       "most the vision "
       "image_size 32 of '" +
           model() + "'\n"},
      {base + model() + eleven + " --pixel-values " + pixels(), 1,
       "devpipe generate: error: generate: sequence 0: the prompt holds 11 image tokens (id 10), "
       "but its image gives 12 "
       "features (16 x 12 pixels, patch 4)\n"},
  };
  for (const auto& [args, code, message] : cases) {
    Result r = run_cli(args);
    EXPECT_EQ(r.code, code) << args << "\n" << r.err;
    EXPECT_EQ(r.err, message) << args;
    EXPECT_FALSE(fs::exists(work)) << args << " compiled into " << work;
  }
}

// ------------------------------------------------------------- diffuse with a DiT pipeline folder

/// `devpipe diffuse` on a diffusers DiTPipeline folder (tests/reference/dit_ref.py's tiny model:
/// 2 heads of 16, 2 blocks, 4 x 8 x 8 latents with learned sigma, 10 classes, DDIM leading
/// spacing with x0 clipped) against the twin's runs for classes 3 and 7 over 4 steps, at guidance
/// 4 and at guidance 1 (no guidance), from the twin's initial latents. Tolerances as
/// tests/test_dit.cpp measured and states: atol 5e-4 + rtol 1e-4 (float32 rounding amplified by
/// the guidance combine and DDIM's 1 / sqrt(alpha_t); worst seen there 1.8e-4).
class CliDiT : public ::testing::Test {
 protected:
  static constexpr double kRtol = 1e-4, kAtol = 5e-4;
  static void SetUpTestSuite() {
    const std::string guided = " --classes 3,7 --steps 4 --guidance 4.0 --seed 0",
                      plain = " --classes 3,7 --steps 4 --guidance 1.0 --seed 0";
    twin_ = new fs::path(devpipe::testing::cached_twin_dir(
        "cli_dit_twin", {"dit_ref.py"}, guided + plain, [&](const fs::path& tmp) {
          const std::string m = (tmp / "model").string();
          return devpipe::testing::run_torch_script("dit_ref.py", "write-model " + m + " > /dev/null") &&
                 devpipe::testing::run_torch_script(
                     "dit_ref.py", "run " + m + guided + " --out " + (tmp / "guided").string() + " > /dev/null") &&
                 devpipe::testing::run_torch_script(
                     "dit_ref.py", "run " + m + plain + " --out " + (tmp / "plain").string() + " > /dev/null");
        }));
    guided_ = new Run(load("guided"));
    plain_ = new Run(load("plain"));
    dir_ = new TempDir();
    // What a user saves from a diffusers run: its initial latents alone.
    safetensors::save(dir_->str("guided_init.safetensors"), {{"latents", guided_->init}});
    safetensors::save(dir_->str("plain_init.safetensors"), {{"latents", plain_->init}});
  }
  static void TearDownTestSuite() {
    delete dir_;
    delete plain_;
    delete guided_;
    delete twin_;
  }

  /// A twin run: its initial latents, its timesteps and its latents after the last step.
  struct Run {
    Tensor init, last;
    std::vector<std::int64_t> timesteps;
  };
  static Run load(const std::string& name) {
    const auto t = safetensors::load_all((*twin_ / (name + ".safetensors")).string());
    const Tensor& steps = t.at("latents_step");  // [steps, B, C, S, S]
    const Tensor& init = t.at("latents_init");
    return {init, steps.narrow_rows(steps.dim(0) - 1, steps.dim(0)).reshape(init.shape()),
            json::parse(read_text(*twin_ / (name + ".json"))).at("timesteps").get<std::vector<std::int64_t>>()};
  }
  static std::string model() { return (*twin_ / "model").string(); }
  static std::string init(const std::string& name) { return dir_->str(name + "_init.safetensors"); }

  /// diffuse --json from `name`'s initial latents at `tp` and `guidance`, twice into one work
  /// folder: the written latents equal the twin's last ones both times; the first run compiles
  /// into the key's folder, the second loads it.
  static void expect_twin_latents(const std::string& name, const Run& ref, int tp, const std::string& guidance,
                                  const std::string& key) {
    ASSERT_FALSE(tensors_close(ref.last, ref.init, 0.1, 0.1)) << "the twin's steps changed the latents";
    TempDir work;
    const std::string out = work.str("latents.safetensors");
    for (int pass = 0; pass < 2; ++pass) {
      SCOPED_TRACE("pass " + std::to_string(pass));
      fs::remove(out);
      Result r = run_cli("diffuse --model " + model() + " --latents " + init(name) +
                         " --class-labels 3,7 --steps 4 --guidance " + guidance + " --tp " + std::to_string(tp) +
                         " --json --out " + out + " --work " + work.str("compiled"));
      ASSERT_EQ(r.code, 0) << r.out << r.err;
      const json j = json::parse(r.out);
      EXPECT_EQ(j.at("timesteps").get<std::vector<std::int64_t>>(), ref.timesteps) << r.out;
      EXPECT_EQ(j.at("out"), out) << r.out;
      const double seconds = j.at("seconds").get<double>();
      EXPECT_GT(seconds, 0) << r.out;
      EXPECT_NEAR(j.at("steps_per_s").get<double>(), 4 / seconds, 1e-9 * (4 / seconds)) << r.out;
      const auto written = safetensors::load_all(out);
      ASSERT_EQ(written.size(), 1u);
      EXPECT_TRUE(tensors_close(written.at("latents"), ref.last, kRtol, kAtol));
      EXPECT_EQ(r.err.find("compiling " + model() + " into " + work.str("compiled") + "/" + key) !=
                    std::string::npos,
                pass == 0)
          << r.err;
      for (int step = 1; step <= 4; ++step) {
        const std::string line = "step " + std::to_string(step) + "/4 t=" +
                                 std::to_string(ref.timesteps[static_cast<std::size_t>(step - 1)]) + "\n";
        EXPECT_NE(r.err.find(line), std::string::npos) << line << r.err;
      }
    }
    EXPECT_TRUE(fs::exists(work.path() / "compiled" / key / "denoiser" / "manifest.json")) << key;
    std::vector<std::string> left;  // nothing but the latents beside them (written beside, renamed)
    for (const auto& e : fs::directory_iterator(work.path())) left.push_back(e.path().filename().string());
    std::sort(left.begin(), left.end());
    EXPECT_EQ(left, (std::vector<std::string>{"compiled", "latents.safetensors"}));
  }

  static fs::path* twin_;
  static Run* guided_;
  static Run* plain_;
  static TempDir* dir_;
};

fs::path* CliDiT::twin_ = nullptr;
CliDiT::Run* CliDiT::guided_ = nullptr;
CliDiT::Run* CliDiT::plain_ = nullptr;
TempDir* CliDiT::dir_ = nullptr;

TEST_F(CliDiT, GuidedLatentsMatchTheTwinAtTp1) {
  expect_twin_latents("guided", *guided_, 1, "4", "tp1_float32_b2_guidance");
}

TEST_F(CliDiT, GuidedLatentsMatchTheTwinAtTp2) {
  expect_twin_latents("guided", *guided_, 2, "4", "tp2_float32_b2_guidance");
}

// --guidance 1 compiles the pipeline without guidance (the other key) and gives the twin's
// unguided latents, which are not the guided ones.
TEST_F(CliDiT, GuidanceOneCompilesWithoutGuidance) {
  ASSERT_FALSE(tensors_close(plain_->last, guided_->last, 0.01, 0.01));
  expect_twin_latents("plain", *plain_, 1, "1", "tp1_float32_b2_noguidance");
}

// Without --json: the timesteps, the rate and where the latents went. Without --latents: noise
// from --seed, which is devpipe's Tensor::randn with that seed (another seed, other latents).
TEST_F(CliDiT, SeedNoiseIsTensorRandnAndStdoutSaysWhatRan) {
  TempDir t;
  const std::string base = "diffuse --model " + model() + " --class-labels 3,7 --steps 4 --work " + t.str("compiled");
  safetensors::save(t.str("randn5.safetensors"), {{"latents", Tensor::randn({2, 4, 8, 8}, 5)}});
  Result r = run_cli(base + " --seed 5 --out " + t.str("seed5.safetensors"));
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  EXPECT_EQ(r.out.rfind("timesteps: 750 500 250 0\n4 steps of 2 images in ", 0), 0u) << r.out;
  EXPECT_NE(r.out.find(" steps/s (tp_degree 1, float32, guidance 4.0)\nwrote latents [2, 4, 8, 8] to " +
                       t.str("seed5.safetensors") + "\n"),
            std::string::npos)
      << r.out;
  r = run_cli(base + " --latents " + t.str("randn5.safetensors") + " --out " + t.str("randn5_out.safetensors"));
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  r = run_cli(base + " --seed 6 --out " + t.str("seed6.safetensors"));
  ASSERT_EQ(r.code, 0) << r.out << r.err;
  const Tensor seed5 = safetensors::load_all(t.str("seed5.safetensors")).at("latents");
  EXPECT_TRUE(tensors_close(seed5, safetensors::load_all(t.str("randn5_out.safetensors")).at("latents"), 0, 1e-6));
  EXPECT_FALSE(tensors_close(seed5, safetensors::load_all(t.str("seed6.safetensors")).at("latents"), 0.01, 0.01));
}

TEST_F(CliDiT, RequestErrorsNameTheValues) {
  TempDir t;
  const std::string work = t.str("compiled");
  const std::vector<float> values = guided_->init.to_float_vector();  // [2, 4, 8, 8]
  auto write = [&](const std::string& name, const std::string& key, const Tensor& x) {
    safetensors::save(t.str(name), {{key, x}});
    return t.str(name);
  };
  const std::string other_key = write("other_key.safetensors", "noise", guided_->init);
  const std::string bf16 =
      write("bf16.safetensors", "latents", Tensor::from_vector(values, {2, 4, 8, 8}, DType::BFloat16));
  const std::string rank3 = write("rank3.safetensors", "latents", Tensor::from_vector(values, {2, 4, 64}));
  const std::string one = write(
      "one.safetensors", "latents",
      Tensor::from_vector(std::vector<float>(values.begin(), values.begin() + 4 * 8 * 8), {1, 4, 8, 8}));
  const std::string small = write(
      "small.safetensors", "latents",
      Tensor::from_vector(std::vector<float>(values.begin(), values.begin() + 2 * 4 * 4 * 4), {2, 4, 4, 4}));
  const std::string base = "diffuse --work " + work + " --model " + model();
  const std::string see = " (see devpipe diffuse --help)\n";
  const std::vector<std::tuple<std::string, int, std::string>> cases = {
      {base + " --class-labels 3,10", 1,
       "devpipe diffuse: error: generate: class label 10 of image 1 is outside [0, num_embeds_ada_norm 10)\n"},
      {base + " --class-labels 3,-1", 2,
       "devpipe diffuse: option --class-labels expects comma-separated integers >= 0, got '3,-1'" + see},
      {base + " --class-labels 3,x", 2,
       "devpipe diffuse: option --class-labels expects comma-separated integers >= 0, got '3,x'" + see},
      {base, 2, "devpipe diffuse: missing option --class-labels (one class id per image)" + see},
      {"diffuse --class-labels 3 --work " + work, 2, "devpipe diffuse: missing option --model DIR" + see},
      {base + " --class-labels 3 --steps 0", 2,
       "devpipe diffuse: option --steps expects an integer in [1, 1048576], got '0'" + see},
      {base + " --class-labels 3 --steps 1001", 1,
       "devpipe diffuse: error: DDIM: 1001 inference steps is outside [1, num_train_timesteps 1000]\n"},
      {base + " --class-labels 3 --guidance 4x", 2,
       "devpipe diffuse: option --guidance expects a number in [0, 1000000], got '4x'" + see},
      {base + " --class-labels 3 --guidance -2", 2,
       "devpipe diffuse: option --guidance expects a number in [0, 1000000], got '-2'" + see},
      {base + " --class-labels 3,7 --seed 1 --latents " + init("guided"), 2,
       "devpipe diffuse: options --seed and --latents exclude each other" + see},
      {base + " --class-labels 3,7 --tp 4", 1,
       "devpipe diffuse: error: dit: num_attention_heads 2 cannot be split over tp_degree 4\n"},
      {base + " --class-labels 3,7 --out " + t.str("no_such_folder/x.safetensors"), 1,
       "devpipe diffuse: error: --out '" + t.str("no_such_folder/x.safetensors") + "': the folder '" +
           t.str("no_such_folder") + "' does not exist\n"},
      {base + " --class-labels 3,7 --latents " + t.str("no_such.safetensors"), 1,
       "devpipe diffuse: error: cannot open safetensors file '" + t.str("no_such.safetensors") +
           "': No such file or directory\n"},
      {base + " --class-labels 3,7 --latents " + other_key, 1,
       "devpipe diffuse: error: --latents '" + other_key + "' has no tensor \"latents\" (it holds: noise)\n"},
      {base + " --class-labels 3,7 --latents " + bf16, 1,
       "devpipe diffuse: error: --latents '" + bf16 +
           "': \"latents\" is bfloat16 [2, 4, 8, 8], expected float32 [images, channels, height, width]\n"},
      {base + " --class-labels 3,7 --latents " + rank3, 1,
       "devpipe diffuse: error: --latents '" + rank3 +
           "': \"latents\" is float32 [2, 4, 64], expected float32 [images, channels, height, width]\n"},
      {base + " --class-labels 3,7 --latents " + one, 1,
       "devpipe diffuse: error: --latents '" + one +
           "': \"latents\" is [1, 4, 8, 8], expected [2, 4, 8, 8]: one per --class-labels (2) of in_channels 4 x "
           "sample_size 8 x 8\n"},
      {base + " --class-labels 3,7 --latents " + small, 1,
       "devpipe diffuse: error: --latents '" + small +
           "': \"latents\" is [2, 4, 4, 4], expected [2, 4, 8, 8]: one per --class-labels (2) of in_channels 4 x "
           "sample_size 8 x 8\n"},
  };
  for (const auto& [args, code, message] : cases) {
    Result r = run_cli(args);
    EXPECT_EQ(r.code, code) << args << "\n" << r.err;
    EXPECT_EQ(r.err, message) << args;
    EXPECT_EQ(r.out, "") << args;
    EXPECT_FALSE(fs::exists(work)) << args << " compiled into " << work;
  }
  Result r = run_cli("diffuse --model " + t.str("no_such_model") + " --class-labels 3 --work " + work);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("'" + t.str("no_such_model") + "/transformer/config.json'"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace devpipe::cli
