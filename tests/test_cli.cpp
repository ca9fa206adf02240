// The devpipe command-line program: its option parser (tools/options.h) and helpers
// (tools/cli_common.h) directly, and the program itself run as a user would, checking exit
// codes, stdout, stderr and the files it leaves.
//
// The program's tests run build/tools/devpipe, or the binary named by DEVPIPE_TEST_CLI (to
// run them against another build, e.g. an older one).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "cli_common.h"
#include "options.h"
#include "test_util.h"

namespace fs = std::filesystem;
using devpipe::testing::TempDir;
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

const std::vector<std::string> kCommands = {"compile", "run", "inspect", "bench", "help"};

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
       "seed_tp1, seed_tp2, large, chain8, llm, got 'seed,nope'"},
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

}  // namespace
}  // namespace devpipe::cli
