// devpipe — command-line program.
//
//   devpipe compile [--model vision_text] [--work DIR] [--tp N] [--batch N] [--buckets 8,32]
//                   [--dtype float32|bfloat16] [--image N] [--vision-ckpt P] [--text-ckpt P]
//   devpipe run     [--model vision_text] [--work DIR] [--batch N] [--iters N]
//   devpipe inspect ARTIFACT_DIR [--graphs]
//   devpipe bench   ...  (see bench/README in the repository)
#include <chrono>
#include <filesystem>
#include <iostream>
#include <sstream>

#include "cli_common.h"
#include "compiler/artifact.h"
#include "devpipe/devpipe.h"
#include "vision_text/models.h"

namespace fs = std::filesystem;
using namespace devpipe;

namespace devpipe::cli {
int bench_main(const Args& args);
}

namespace {

const char* kUsage =
    "usage: devpipe <command> [options]\n"
    "  compile  trace, shard and write the artifacts of a model's stages\n"
    "           --model vision_text --work DIR --tp N --batch N --buckets 8,32 --dtype float32|bfloat16\n"
    "           --image N (input image size, default 224) --vision-ckpt P --text-ckpt P\n"
    "           (without checkpoints, random ones with a fixed seed are written under DIR)\n"
    "  run      load the artifacts and run the pipeline on random inputs\n"
    "           --model vision_text --work DIR --batch N --iters N\n"
    "  inspect  print an artifact's manifest (and with --graphs its graphs): devpipe inspect DIR\n"
    "  bench    run the benchmark workloads and write a JSON report (devpipe bench --help)\n";

InferenceConfig config_from(const cli::Args& a) {
  std::vector<std::int64_t> buckets;
  std::stringstream ss(a.get("buckets", ""));
  for (std::string item; std::getline(ss, item, ',');) {
    if (!item.empty()) buckets.push_back(std::stoll(item));
  }
  InferenceConfig c = vision_text::seed_config(a.get_int("batch", 32), static_cast<int>(a.get_int("tp", 2)),
                                               dtype_from_name(a.get("dtype", "float32")));
  c.mutable_runtime_config().buckets = buckets;
  c.mutable_runtime_config().validate();
  c.set("image_size", static_cast<std::int64_t>(a.get_int("image", 224)));
  return c;
}

void check_model(const cli::Args& a) {
  std::string m = a.get("model", "vision_text");
  if (m != "vision_text") {
    throw InvalidArgument("unknown model '" + m + "': this build knows 'vision_text' (the seed's pipeline)");
  }
}

int cmd_compile(const cli::Args& a) {
  check_model(a);
  std::string work = a.get("work", "build/devpipe_work");
  InferenceConfig c = config_from(a);
  std::string vck = a.get("vision-ckpt", ""), tck = a.get("text-ckpt", "");
  if (vck.empty()) {
    vck = vision_text::write_random_checkpoint(vision_text::VisionModel(c), work + "/checkpoints/vision", 1234);
    std::cerr << "wrote a random vision checkpoint (seed 1234) to " << vck << "\n";
  }
  if (tck.empty()) {
    tck = vision_text::write_random_checkpoint(vision_text::TextModel(c), work + "/checkpoints/text", 1235);
    std::cerr << "wrote a random text checkpoint (seed 1235) to " << tck << "\n";
  }
  fs::create_directories(work);
  c.save(work + "/config.json");
  vision_text::VisionModelApp vision(vck, c);
  vision_text::TextModelApp text(tck, c);
  vision.set_progress(cli::print_progress);
  text.set_progress(cli::print_progress);
  vision.compile(work + "/compiled/vision");
  text.compile(work + "/compiled/text");
  std::cout << "compiled vision_model and text_model into " << work << "/compiled\n";
  return 0;
}

int cmd_run(const cli::Args& a) {
  check_model(a);
  std::string work = a.get("work", "build/devpipe_work");
  if (!fs::exists(work + "/config.json")) {
    throw InvalidArgument("no compiled model in '" + work + "' (no config.json): run `devpipe compile --work " + work +
                          "` first");
  }
  InferenceConfig c = InferenceConfig::load(work + "/config.json");
  std::int64_t batch = a.get_int("batch", c.runtime_config().batch_size);
  int iters = static_cast<int>(a.get_int("iters", 1));
  vision_text::VisionModelApp vision("", c);
  vision_text::TextModelApp text("", c);
  vision.set_progress(cli::print_progress);
  text.set_progress(cli::print_progress);
  vision.load(work + "/compiled/vision");
  text.load(work + "/compiled/text");
  std::int64_t hw = c.has("image_size") ? c.get_int("image_size") : 224;
  Tensor image = Tensor::randn({batch, 3, hw, hw}, 42);
  Tensor txt = Tensor::randn({batch, c.get_int("text_input_size")}, 43);
  Output out;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    Output feats = vision.forward(image);
    out = text.forward(feats, txt);
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::cout << "iteration " << i << ": " << ms << " ms\n";
  }
  std::cout << "Final output shape: " << out.shape() << " on " << out.device().kind_name() << "\n"
            << out.tensor().to_string(4) << "\n";
  return 0;
}

int cmd_inspect(const cli::Args& a) {
  if (a.positional.empty()) throw InvalidArgument("inspect needs an artifact directory");
  const std::string& dir = a.positional[0];
  Manifest m = read_manifest(dir);
  std::cout << "artifact " << dir << "\n"
            << "  format version " << m.format_version << ", devpipe " << m.devpipe_version << "\n"
            << "  tag " << m.tag << ", dtype " << dtype_name(m.dtype) << ", tp_degree " << m.tp_degree
            << ", pipeline_execution " << (m.pipeline_execution ? "true" : "false") << ", return_ranked_to_cpu "
            << (m.return_ranked_to_cpu ? "true" : "false") << "\n";
  for (const auto& io : m.inputs) {
    std::cout << "  input  " << io.name << " [batch] + " << io.sample_shape.to_string() << " " << dtype_name(io.dtype) << "\n";
  }
  for (const auto& io : m.outputs) {
    std::cout << "  output " << io.name << " [batch] + " << io.sample_shape.to_string() << " " << dtype_name(io.dtype) << "\n";
  }
  for (const auto& b : m.buckets) {
    std::cout << "  bucket " << b.batch << ": " << b.graph.nodes.size() << " ops, " << b.graph.params.size() << " parameters\n";
  }
  for (const auto& w : m.weights) {
    std::cout << "  rank " << w.rank << " weights " << w.file << " (" << w.bytes << " bytes, " << w.checksum << ")\n";
  }
  if (a.has("graphs")) {
    for (const auto& b : m.buckets) std::cout << "\n# bucket " << b.batch << "\n" << b.graph.to_text();
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  try {
    cli::Args a = cli::Args::parse(argc, argv, 2, {"graphs", "all", "help", "no-pytorch"});
    if (cmd == "compile") return cmd_compile(a);
    if (cmd == "run") return cmd_run(a);
    if (cmd == "inspect") return cmd_inspect(a);
    if (cmd == "bench") return cli::bench_main(a);
    std::cerr << "unknown command '" << cmd << "'\n" << kUsage;
    return 2;
  } catch (const devpipe::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
