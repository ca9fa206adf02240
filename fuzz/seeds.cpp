// Writes the fuzzers' seed corpora with devpipe's own writers (nothing opaque is committed):
//   fuzz_seeds <out>   ->  <out>/safetensors/  <out>/config/  <out>/artifact/
// The artifacts are compiled from small models with random weights: the vision and text
// stages of the example (conv2d, pooling, concat, linear) and the tensor-parallel MLP of the
// tests (column/row-parallel linears with an all-reduce, RMSNorm), in several dtypes, tp
// degrees and buckets, each packed as fuzz_artifact reads it. Beside them, "edge_*" seeds: those
// valid files with one integer field set to a value a reader must refuse (a float, one past
// int's range, a negative size), the cases issue 9 found by hand, so that every short CI run
// checks them.
#include <devpipe/devpipe.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <regex>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "pipeline_util.h"
#include "vision_text/models.h"

using namespace devpipe;
namespace fs = std::filesystem;

namespace {

int g_written = 0;

void seed(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  fuzz::write_file(dir / name, bytes);
  ++g_written;
}

/// `text` with the value of the first `"key": <number>` replaced by `value` (aborts when there
/// is none: the seeds must follow the writers' format).
std::string with_number(const std::string& text, const std::string& key, const std::string& value) {
  const std::regex re("\"" + key + "\": *-?[0-9][0-9.eE+-]*");
  if (!std::regex_search(text, re)) {
    std::fprintf(stderr, "fuzz_seeds: no number field \"%s\" to edit\n", key.c_str());
    std::abort();
  }
  return std::regex_replace(text, re, "\"" + key + "\": " + value, std::regex_constants::format_first_only);
}

/// The artifact in `art` packed as fuzz_artifact reads it; "raw:" keeps the checksums as they
/// are (they are the true ones here).
std::string pack_artifact(const fs::path& art, int tp_degree, bool raw) {
  std::vector<std::string> files{(raw ? "raw:" : "") + fuzz::read_file(art / "manifest.json")};
  for (int r = 0; r < tp_degree; ++r) {
    files.push_back(fuzz::read_file(art / ("weights/rank" + std::to_string(r) + ".safetensors")));
  }
  return fuzz::pack_files(files);
}

void write_artifact(ModelWrapper& w, const nn::Module& model, const fs::path& work, const fs::path& out,
                    const std::string& name) {
  const std::string ckpt = vision_text::write_random_checkpoint(model, (work / (name + "_ckpt")).string(), 7);
  const fs::path art = work / name;
  w.compile(ckpt, art.string());
  const int tp = w.neuron_config().tp_degree;
  seed(out / "artifact", name, pack_artifact(art, tp, false));
  for (int r = 0; r < tp; ++r) {
    seed(out / "safetensors", name + "_rank" + std::to_string(r),
         fuzz::read_file(art / ("weights/rank" + std::to_string(r) + ".safetensors")));
  }
  if (name != "mlp_tp2") return;
  const std::string packed = pack_artifact(art, tp, false);
  seed(out / "artifact", name + "_raw", pack_artifact(art, tp, true));
  seed(out / "artifact", "edge_format_version_2p32_plus_1", with_number(packed, "format_version", "4294967297"));
  seed(out / "artifact", "edge_format_version_1e300", with_number(packed, "format_version", "1e300"));
  seed(out / "artifact", "edge_rank_1e300", with_number(packed, "rank", "1e300"));
  seed(out / "artifact", "edge_bytes_negative", with_number(packed, "bytes", "-1"));
  seed(out / "artifact", "edge_shard_dim_negative", with_number(packed, "shard_dim", "-7"));
  seed(out / "artifact", "edge_batch_1e300", with_number(packed, "batch", "1e300"));
}

InferenceConfig small_config(std::int64_t batch, int tp, DType dtype, std::vector<std::int64_t> buckets = {}) {
  InferenceConfig c = vision_text::seed_config(batch, tp, dtype);
  c.mutable_runtime_config().buckets = std::move(buckets);
  c.set("vision_embedding_size", 8);
  c.set("text_input_size", 6);
  c.set("text_embedding_size", 4);
  c.set("output_size", 10);
  c.set("image_size", 6);
  return c;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_seeds <out dir>\n");
    return 2;
  }
  const fs::path out = argv[1];
  fs::create_directories(out);
  const fs::path work = out / "work";
  fs::remove_all(work);

  // safetensors: every dtype, a scalar, an empty tensor, metadata, an empty file list.
  const fs::path st = work / "st";
  fs::create_directories(st);
  auto save_seed = [&](const std::string& name, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& meta) {
    safetensors::save((st / name).string(), tensors, meta);
    seed(out / "safetensors", name, fuzz::read_file(st / name));
  };
  save_seed("one_f32", {{"w", Tensor::randn({2, 3}, 1)}}, {{"format", "pt"}});
  save_seed("dtypes",
            {{"a.f32", Tensor::randn({4}, 2)},
             {"b.bf16", Tensor::randn({2, 2}, 3).to_dtype(DType::BFloat16)},
             {"c.f16", Tensor::randn({3, 1}, 4).to_dtype(DType::Float16)},
             {"d.i64", Tensor::zeros({2}, DType::Int64)},
             {"e.scalar", Tensor::ones({})},
             {"f.empty", Tensor::zeros({0, 4})}},
            {});
  save_seed("metadata_only", {}, {{"tag", "x"}, {"rank", "0"}});

  // config.json: the example's config, buckets, every attribute type.
  InferenceConfig rich = small_config(4, 2, DType::BFloat16, {1, 2, 4});
  rich.set("rope_theta", 10000.5);
  rich.set("scales", std::vector<double>{0.5, 2.0});
  rich.set("layers", std::vector<std::int64_t>{1, 2, 3});
  rich.set("use_bias", true);
  rich.set("name", "tiny");
  seed(out / "config", "seed_config", vision_text::seed_config().to_json());
  seed(out / "config", "rich", rich.to_json());
  seed(out / "config", "minimal", InferenceConfig(RuntimeConfig{}).to_json());
  const std::string example = vision_text::seed_config().to_json();
  seed(out / "config", "edge_batch_1e300", with_number(example, "batch_size", "1e300"));
  seed(out / "config", "edge_batch_4.9", with_number(example, "batch_size", "4.9"));
  seed(out / "config", "edge_tp_2p32_plus_2", with_number(example, "tp_degree", "4294967298"));
  seed(out / "config", "edge_tp_1e300", with_number(example, "tp_degree", "1e300"));

  // Artifacts.
  {
    InferenceConfig c = small_config(2, 2, DType::Float32, {2, 4});
    vision_text::VisionModelWrapper w(c);
    write_artifact(w, vision_text::VisionModel(c), work, out, "vision_tp2");
  }
  {
    InferenceConfig c = small_config(3, 1, DType::BFloat16);
    vision_text::TextModelWrapper w(c);
    write_artifact(w, vision_text::TextModel(c), work, out, "text_tp1_bf16");
  }
  {
    InferenceConfig c(RuntimeConfig{.batch_size = 4, .tp_degree = 2});
    testing::TestWrapper<testing::ParallelMlp> w(
        c, {.pipeline_execution = true, .return_ranked_to_cpu = false, .tag = "mlp"},
        {{Tensor::zeros({4, 16})}});
    write_artifact(w, testing::ParallelMlp(), work, out, "mlp_tp2");
  }
  fs::remove_all(work);
  std::printf("fuzz_seeds: wrote %d seed files under %s\n", g_written, out.c_str());
  return 0;
}
