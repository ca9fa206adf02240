// Helpers shared by the pipeline tests: a wrapper with options chosen by the test, and a small
// tensor-parallel model.
#pragma once

#include <devpipe/devpipe.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace devpipe::testing {

/// A ModelWrapper around model class M with the test's options and example inputs.
template <class M>
class TestWrapper : public ModelWrapper {
 public:
  TestWrapper(const InferenceConfig& config, WrapperOptions options,
              std::vector<std::vector<Tensor>> examples, std::vector<std::string> names = {})
      : ModelWrapper(config, model_cls<M>(), std::move(options)),
        examples_(std::move(examples)),
        names_(std::move(names)) {}
  std::vector<std::vector<Tensor>> input_generator() const override { return examples_; }
  std::vector<std::string> input_names() const override {
    return names_.empty() ? ModelWrapper::input_names() : names_;
  }

 private:
  std::vector<std::vector<Tensor>> examples_;
  std::vector<std::string> names_;
};

/// A tensor-parallel MLP block (16 -> 32 -> 16): column-parallel up projection, row-parallel
/// down projection (an all-reduce between the ranks, oneDNN matmuls on the cpu backend), then
/// an RMSNorm.
struct ParallelMlp : nn::Module {
  nn::ColumnParallelLinear& up;
  nn::RowParallelLinear& down;
  nn::RMSNorm& norm;
  ParallelMlp()
      : up(register_module("up", std::make_unique<nn::ColumnParallelLinear>(
                                   16, 32, /*bias=*/true, /*gather_output=*/false))),
        down(register_module("down", std::make_unique<nn::RowParallelLinear>(
                                     32, 16, /*bias=*/true, /*input_is_parallel=*/true))),
        norm(register_module("norm",
                             std::make_unique<nn::RMSNorm>(std::vector<std::int64_t>{16}))) {}
  Var forward(Var x) const { return norm(down(up(x))); }
};

}  // namespace devpipe::testing
