// devpipe — command-line program.
//
//   devpipe compile [--model vision_text] [--work DIR] [--tp N] [--batch N] [--buckets 8,32]
//                   [--dtype float32|bfloat16|float16] [--image N] [--vision-ckpt P] [--text-ckpt
//                   P]
//   devpipe run     [--model vision_text] [--work DIR] [--batch N] [--iters N] [--warmup N]
//   [--trace F] devpipe inspect ARTIFACT_DIR [--graphs] devpipe bench   ...  (see bench/README.md
//   in the repository) devpipe help [COMMAND], devpipe --help, devpipe --version
//
// Every command's options are declared once (options.h); `devpipe <command> --help` prints
// them. Usage errors exit with code 2, failures with code 1.
#include "devpipe/devpipe.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "cli_common.h"
#include "compiler/artifact.h"
#include "vision_text/models.h"

namespace fs = std::filesystem;
using namespace devpipe;

namespace devpipe::cli {
const Command& bench_command();
int bench_main(const Args& args);
const Command& generate_command();  // tools/generate.cpp
int generate_main(const Args& args);
const Command& diffuse_command();  // tools/diffuse.cpp
int diffuse_main(const Args& args);
}  // namespace devpipe::cli

namespace {

using cli::Args;
using cli::Command;
using cli::Option;
using cli::OptionKind;

constexpr const char* kDefaultWork = "build/devpipe_work";
constexpr long long kMaxBatch = 1 << 20;

Option model_option() {
  return {.name = "model",
          .kind = OptionKind::Choice,
          .value = "NAME",
          .help = "the model; vision_text is the seed's pipeline",
          .choices = {"vision_text"}};
}

Option work_option(const std::string& help) {
  return {.name = "work",
          .kind = OptionKind::String,
          .value = "DIR",
          .help = help + " (default " + kDefaultWork + ")"};
}

const Command& compile_command() {
  static const Command c{
      .name = "compile",
      .summary = "trace, shard and write the artifacts of a model's stages into DIR/compiled",
      .options = {model_option(),
                  work_option("the work folder: config.json, checkpoints/, compiled/"),
                  {.name = "tp",
                   .kind = OptionKind::Int,
                   .value = "N",
                   .help = "tp_degree: ranks per stage (default 2)",
                   .min = 1,
                   .max = 64},
                  {.name = "batch",
                   .kind = OptionKind::Int,
                   .value = "N",
                   .help = "batch size (default 32)",
                   .min = 1,
                   .max = kMaxBatch},
                  {.name = "buckets",
                   .kind = OptionKind::IntList,
                   .value = "8,32",
                   .help = "batch buckets to compile (default: the batch size)"},
                  {.name = "dtype",
                   .kind = OptionKind::Choice,
                   .value = "DTYPE",
                   .help = "weights and activations",
                   .choices = {"float32", "bfloat16", "float16"}},
                  {.name = "image",
                   .kind = OptionKind::Int,
                   .value = "N",
                   .help = "input image size (default 224)",
                   .min = 1,
                   .max = 4096},
                  {.name = "vision-ckpt",
                   .kind = OptionKind::String,
                   .value = "PATH",
                   .help = "the vision stage's safetensors checkpoint (file or folder)"},
                  {.name = "text-ckpt",
                   .kind = OptionKind::String,
                   .value = "PATH",
                   .help = "the text stage's safetensors checkpoint (file or folder)"},
                  {.name = "fold-linear-chains",
                   .help = "fold chains with nothing nonlinear between them (the vision stage's conv + "
                           "pool + fc becomes patch means and one Linear); results change by rounding"}},
      .notes =
          "Without checkpoints, random ones with a fixed seed are written under DIR/checkpoints.\n"
          "DIR/config.json, the random checkpoints and DIR/compiled are replaced only once the\n"
          "compile succeeded; a failed compile leaves DIR as it was.\n"};
  return c;
}

std::string fixed_at_compile(const std::string& flag) {
  return "it is fixed when compiling (devpipe compile --work DIR --" + flag +
         " ...); devpipe run uses what DIR/config.json and the artifacts say";
}

const Command& run_command() {
  static const Command c{
      .name = "run",
      .summary = "load the artifacts of DIR/compiled and run the pipeline on random inputs",
      .options = {model_option(),
                  work_option("the work folder devpipe compile wrote"),
                  {.name = "batch",
                   .kind = OptionKind::Int,
                   .value = "N",
                   .help = "batch size of the inputs (default: the compiled batch size)",
                   .min = 1,
                   .max = kMaxBatch},
                  {.name = "iters",
                   .kind = OptionKind::Int,
                   .value = "N",
                   .help = "timed forwards (default 10)",
                   .min = 1,
                   .max = 1000000},
                  {.name = "warmup",
                   .kind = OptionKind::Int,
                   .value = "N",
                   .help = "untimed forwards before (default 1)",
                   .min = 0,
                   .max = 1000000},
                  {.name = "trace",
                   .kind = OptionKind::String,
                   .value = "FILE",
                   .help = "also write one forward's Chrome trace (Perfetto, chrome://tracing)"},
                  {.name = "tp", .kind = OptionKind::Int, .refused = fixed_at_compile("tp N")},
                  {.name = "dtype",
                   .kind = OptionKind::String,
                   .refused = fixed_at_compile("dtype DTYPE")},
                  {.name = "buckets",
                   .kind = OptionKind::String,
                   .refused = fixed_at_compile("buckets 8,32")},
                  {.name = "image",
                   .kind = OptionKind::String,
                   .refused = fixed_at_compile("image N")},
                  {.name = "vision-ckpt",
                   .kind = OptionKind::String,
                   .refused = fixed_at_compile("vision-ckpt PATH")},
                  {.name = "text-ckpt",
                   .kind = OptionKind::String,
                   .refused = fixed_at_compile("text-ckpt PATH")},
                  {.name = "fold-linear-chains", .refused = fixed_at_compile("fold-linear-chains")}},
      .notes =
          "Prints the final output and a latency summary: min, p50, p90, p99, mean and max of the\n"
          "timed forwards (vision then text stage, inputs to final output) and the throughput\n"
          "(batch / mean latency). tp_degree, dtype, buckets and image size are the compiled "
          "ones.\n"};
  return c;
}

const Command& inspect_command() {
  static const Command c{
      .name = "inspect",
      .summary = "print an artifact's manifest (and with --graphs its graphs)",
      .positionals = "ARTIFACT_DIR",
      .min_positionals = 1,
      .max_positionals = 1,
      .options = {{.name = "graphs", .help = "also print each bucket's graph"}},
      .notes = "ARTIFACT_DIR is one stage's folder, e.g. DIR/compiled/vision/vision_model.\n"};
  return c;
}

const Command& help_command() {
  static const Command c{.name = "help",
                         .summary = "print the usage of devpipe, or of one command",
                         .positionals = "[COMMAND]",
                         .max_positionals = 1};
  return c;
}

struct Entry {
  const Command& (*command)();
  int (*main)(const Args&);
};
const std::vector<Entry>& commands();

std::string general_usage() {
  std::ostringstream s;
  s << "usage: devpipe <command> [options]\n"
       "       devpipe help [COMMAND] | devpipe --help | devpipe --version\n\ncommands:\n";
  for (const auto& e : commands())
    s << "  " << e.command().name << std::string(9 - e.command().name.size(), ' ')
      << e.command().summary << "\n";
  s << "\n`devpipe <command> --help` prints a command's options.\n";
  return s.str();
}

const Entry* find_command(const std::string& name) {
  for (const auto& e : commands()) {
    if (e.command().name == name) return &e;
  }
  return nullptr;
}

std::string work_of(const Args& a) { return a.get("work", kDefaultWork); }

std::string joined(const std::vector<std::int64_t>& v) {
  std::string s;
  for (auto x : v) s += (s.empty() ? "" : ",") + std::to_string(x);
  return s;
}

InferenceConfig config_from(const Args& a) {
  std::vector<std::int64_t> buckets;
  for (long long b : a.get_ints("buckets")) buckets.push_back(b);
  InferenceConfig c =
      vision_text::seed_config(a.get_int("batch", 32), static_cast<int>(a.get_int("tp", 2)),
                               dtype_from_name(a.get("dtype", "float32")));
  c.mutable_runtime_config().buckets = buckets;
  c.mutable_runtime_config().fold_linear_chains = a.has("fold-linear-chains");
  c.mutable_runtime_config().validate();
  c.set("image_size", static_cast<std::int64_t>(a.get_int("image", 224)));
  return c;
}

/// Moves `staged` onto `target`: a file by one rename (atomic); a folder by renaming the old
/// one aside, the new one into place and removing the old one (put back if the second fails).
void move_into_place(const fs::path& staged, const fs::path& target) {
  try {
    fs::create_directories(target.parent_path());
    if (!fs::is_directory(fs::symlink_status(target))) {
      fs::rename(staged, target);
      return;
    }
    fs::path old = target;
    old += ".old." + std::to_string(::getpid());
    fs::remove_all(old);
    fs::rename(target, old);
    try {
      fs::rename(staged, target);
    } catch (const fs::filesystem_error&) {
      fs::rename(old, target);
      throw;
    }
    fs::remove_all(old);
  } catch (const fs::filesystem_error& e) {
    throw IoError("cannot move the compiled '" + staged.string() + "' into place as '" +
                  target.string() + "': " + e.what());
  }
}

/// A folder removed (with what is in it) when this goes out of scope.
struct ScratchDir {
  fs::path path;
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

int cmd_compile(const Args& a) {
  const fs::path work = work_of(a);
  InferenceConfig c = config_from(a);
  const auto& rc = c.runtime_config();
  std::cout << "compiling vision_text (tp_degree " << rc.tp_degree << ", " << dtype_name(rc.dtype)
            << ", batch " << rc.batch_size << ", buckets " << joined(rc.batch_buckets())
            << ", image " << c.get_int("image_size") << ") into " << work.string() << "\n";
  // Everything is written into a scratch folder inside DIR first and moved into place only
  // once both stages compiled, so that a failure leaves DIR's config, checkpoints and
  // artifacts matching each other.
  std::error_code ec;
  fs::create_directories(work, ec);
  if (ec) throw IoError("cannot create the work folder '" + work.string() + "': " + ec.message());
  ScratchDir scratch{work / (".compile-staging." + std::to_string(::getpid()))};
  fs::remove_all(scratch.path);
  std::vector<std::string> moved = {"config.json", "compiled/vision", "compiled/text"};
  std::string vck = a.get("vision-ckpt", ""), tck = a.get("text-ckpt", "");
  const bool random_vision = vck.empty(), random_text = tck.empty();
  if (random_vision) {
    vck = vision_text::write_random_checkpoint(
        vision_text::VisionModel(c), (scratch.path / "checkpoints/vision").string(), 1234);
    moved.push_back("checkpoints/vision");
  }
  if (random_text) {
    tck = vision_text::write_random_checkpoint(vision_text::TextModel(c),
                                               (scratch.path / "checkpoints/text").string(), 1235);
    moved.push_back("checkpoints/text");
  }
  c.save((scratch.path / "config.json").string());
  vision_text::VisionModelApp vision(vck, c);
  vision_text::TextModelApp text(tck, c);
  vision.set_progress(cli::print_progress);
  text.set_progress(cli::print_progress);
  vision.compile((scratch.path / "compiled/vision").string());
  text.compile((scratch.path / "compiled/text").string());
  for (const auto& rel : moved) move_into_place(scratch.path / rel, work / rel);
  if (random_vision) {
    std::cerr << "wrote a random vision checkpoint (seed 1234) to "
              << (work / "checkpoints/vision").string() << "\n";
  }
  if (random_text) {
    std::cerr << "wrote a random text checkpoint (seed 1235) to "
              << (work / "checkpoints/text").string() << "\n";
  }
  std::cout << "compiled vision_model and text_model into " << (work / "compiled").string() << "\n";
  return 0;
}

int cmd_run(const Args& a) {
  const std::string work = work_of(a);
  if (!fs::exists(work + "/config.json")) {
    throw InvalidArgument("no compiled model in '" + work +
                          "' (no config.json): run `devpipe compile --work " + work + "` first");
  }
  InferenceConfig c = InferenceConfig::load(work + "/config.json");
  const auto& rc = c.runtime_config();
  std::int64_t batch = a.get_int("batch", rc.batch_size);
  int iters = static_cast<int>(a.get_int("iters", 10));
  int warmup = static_cast<int>(a.get_int("warmup", 1));
  std::int64_t hw = c.has("image_size") ? c.get_int("image_size") : 224;
  std::cout << "running vision_text from " << work << " (tp_degree " << rc.tp_degree << ", "
            << dtype_name(rc.dtype) << ", buckets " << joined(rc.batch_buckets()) << ", image "
            << hw << ") at batch " << batch << "\n";
  vision_text::VisionModelApp vision("", c);
  vision_text::TextModelApp text("", c);
  vision.set_progress(cli::print_progress);
  text.set_progress(cli::print_progress);
  vision.load(work + "/compiled/vision");
  text.load(work + "/compiled/text");
  Tensor image = Tensor::randn({batch, 3, hw, hw}, 42);
  Tensor txt = Tensor::randn({batch, c.get_int("text_input_size")}, 43);
  auto forward = [&] { return text.forward(vision.forward(image), txt); };
  for (int i = 0; i < warmup; ++i) forward();
  Output out;
  std::vector<double> samples_ms;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    out = forward();
    samples_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::cout << "Final output shape: " << out.shape() << " on " << out.device().kind_name() << "\n"
            << out.tensor().to_string(4) << "\n";
  cli::LatencyStats s = cli::summarize(samples_ms);
  std::printf(
      "latency over %d iterations (after %d warm-up): min %.3f ms, p50 %.3f ms, p90 %.3f ms, "
      "p99 %.3f ms, mean %.3f ms, max %.3f ms\n",
      iters, warmup, s.min, s.p50, s.p90, s.p99, s.mean, s.max);
  std::printf("throughput: %.1f samples/s (batch %lld / mean latency)\n",
              1000.0 * static_cast<double>(batch) / s.mean, static_cast<long long>(batch));
  std::fflush(stdout);
  if (a.has("trace")) cli::write_trace_of([&] { forward(); }, a.get("trace", ""));
  return 0;
}

int cmd_inspect(const Args& a) {
  const std::string& dir = a.positional()[0];
  Manifest m = read_manifest(dir);
  std::cout << "artifact " << dir << "\n"
            << "  format version " << m.format_version << ", devpipe " << m.devpipe_version << "\n"
            << "  tag " << m.tag << ", dtype " << dtype_name(m.dtype) << ", tp_degree "
            << m.tp_degree << ", pipeline_execution " << (m.pipeline_execution ? "true" : "false")
            << ", return_ranked_to_cpu " << (m.return_ranked_to_cpu ? "true" : "false") << "\n";
  for (const auto& io : m.inputs) {
    std::cout << "  input  " << io.name << " [batch] + " << io.sample_shape.to_string() << " "
              << dtype_name(io.dtype) << "\n";
  }
  for (const auto& io : m.outputs) {
    std::cout << "  output " << io.name << " [batch] + " << io.sample_shape.to_string() << " "
              << dtype_name(io.dtype) << "\n";
  }
  for (const auto& b : m.buckets) {
    std::cout << "  bucket " << b.batch << ": " << b.graph.nodes.size() << " ops, "
              << b.graph.params.size() << " parameters\n";
  }
  for (const auto& w : m.weights) {
    std::cout << "  rank " << w.rank << " weights " << w.file << " (" << w.bytes << " bytes, "
              << w.checksum << ")\n";
  }
  if (a.has("graphs")) {
    for (const auto& b : m.buckets)
      std::cout << "\n# bucket " << b.batch << "\n" << b.graph.to_text();
  }
  return 0;
}

int cmd_help(const Args& a) {
  if (a.positional().empty()) {
    std::cout << general_usage();
    return 0;
  }
  const Entry* e = find_command(a.positional()[0]);
  if (!e) throw cli::UsageError("unknown command '" + a.positional()[0] + "'");
  std::cout << e->command().usage();
  return 0;
}

const std::vector<Entry>& commands() {
  static const std::vector<Entry> all = {{compile_command, cmd_compile},
                                         {run_command, cmd_run},
                                         {inspect_command, cmd_inspect},
                                         {cli::bench_command, cli::bench_main},
                                         {cli::generate_command, cli::generate_main},
                                         {cli::diffuse_command, cli::diffuse_main},
                                         {help_command, cmd_help}};
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  // Line by line, so that what goes to stdout and the progress on stderr keep their order.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  std::vector<std::string> args(argv + std::min(argc, 2), argv + argc);
  const std::string first = argc < 2 ? "" : argv[1];
  if (first.empty()) {
    std::cerr << general_usage();
    return 2;
  }
  if (first == "--help" || first == "-h") {
    std::cout << general_usage();
    return 0;
  }
  if (first == "--version") {
    std::cout << "devpipe " << devpipe::version() << "\n";
    return 0;
  }
  const Entry* entry = find_command(first);
  if (!entry) {
    std::cerr << "devpipe: unknown "
              << (first[0] == '-' ? "option " + first : "command '" + first + "'")
              << " (see devpipe --help)\n";
    return 2;
  }
  const Command& command = entry->command();
  std::string work = "DIR";
  try {
    Args a = Args::parse(command, args);
    if (a.help()) {
      std::cout << command.usage();
      return 0;
    }
    if (command.find("work")) work = work_of(a);
    return entry->main(a);
  } catch (const cli::UsageError& e) {
    std::cout.flush();
    std::cerr << "devpipe " << command.name << ": " << e.what() << " (see devpipe " << command.name
              << " --help)\n";
    return 2;
  } catch (const std::exception& e) {
    std::cout.flush();
    std::cerr << "devpipe " << command.name << ": error: " << cli::cli_wording(e.what(), work)
              << "\n";
    return 1;
  }
}
