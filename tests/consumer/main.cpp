// A program outside the devpipe tree, built against the installed package only (headers,
// libdevpipe.a and what devpipeConfig.cmake or devpipe.pc say to link): a two-layer
// tensor-parallel model at tp 2, its checkpoint written here, compiled, loaded and run, the
// output checked against values worked out by hand. Usage: devpipe_consumer <empty work dir>.
#include <devpipe/devpipe.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

namespace nn = devpipe::nn;
using devpipe::Tensor;
using devpipe::Var;

namespace {

// 2 -> 4 (column-parallel, gathered) -> 1 (row-parallel on the full input), NxD's defaults.
struct TinyModel : nn::Module {
  nn::ColumnParallelLinear up{2, 4};
  nn::RowParallelLinear down{4, 1};
  TinyModel() {
    register_module("up", up);
    register_module("down", down);
  }
  Var forward(Var x) const { return down(up(x)); }
};

class TinyWrapper : public devpipe::ModelWrapper {
 public:
  explicit TinyWrapper(const devpipe::InferenceConfig& config)
      : ModelWrapper(config, devpipe::model_cls<TinyModel>(), {.tag = "tiny"}) {}
  std::vector<std::vector<Tensor>> input_generator() const override {
    return {{Tensor::zeros({neuron_config().batch_size, 2})}};
  }
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <work dir>\n", argv[0]);
    return 2;
  }
  const std::filesystem::path work = argv[1];
  try {
    std::filesystem::create_directories(work);
    // up.weight rows: x0, x1, x0 + x1, x0 - x1; up.bias adds 1 to the last. down sums the four
    // and adds 0.5. For x = (1, 2): up = (1, 2, 3, 0), down = 6.5; for x = (3, -1): up =
    // (3, -1, 2, 5), down = 9.5.
    devpipe::safetensors::save(
        (work / "model.safetensors").string(),
        {{"up.weight", Tensor::from_vector({1, 0, 0, 1, 1, 1, 1, -1}, {4, 2})},
         {"up.bias", Tensor::from_vector({0, 0, 0, 1}, {4})},
         {"down.weight", Tensor::from_vector({1, 1, 1, 1}, {1, 4})},
         {"down.bias", Tensor::from_vector({0.5f}, {1})}});
    devpipe::InferenceConfig config(devpipe::RuntimeConfig{.batch_size = 2, .tp_degree = 2});
    TinyWrapper model(config);
    model.compile(work.string(), (work / "compiled").string());
    model.load((work / "compiled").string());
    devpipe::Output out = model.forward({Tensor::from_vector({1, 2, 3, -1}, {2, 2})});
    std::vector<float> got = out.tensor(0).to_float_vector();
    const std::vector<float> want = {6.5f, 9.5f};
    bool ok = out.shape() == devpipe::Shape{2, 1} && got.size() == want.size();
    for (std::size_t i = 0; ok && i < want.size(); ++i) ok = std::fabs(got[i] - want[i]) <= 1e-6f;
    if (!ok) {
      std::fprintf(stderr, "devpipe_consumer: got shape %s, values", out.shape().to_string().c_str());
      for (float v : got) std::fprintf(stderr, " %g", v);
      std::fprintf(stderr, "; expected [2, 1], 6.5 9.5\n");
      return 1;
    }
    if (std::string(devpipe::version()) != DEVPIPE_VERSION_STRING) {
      std::fprintf(stderr, "devpipe_consumer: library %s, headers %s\n", devpipe::version(),
                   DEVPIPE_VERSION_STRING);
      return 1;
    }
    std::printf("devpipe_consumer: devpipe %s, tp 2: output [2, 1] = %g %g as expected\n",
                devpipe::version(), got[0], got[1]);
    return 0;
  } catch (const devpipe::Error& e) {
    std::fprintf(stderr, "devpipe_consumer: %s\n", e.what());
    return 1;
  }
}
