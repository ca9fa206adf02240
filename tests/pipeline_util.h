// Helpers shared by the pipeline tests: a wrapper with options chosen by the test.
#pragma once

#include <devpipe/devpipe.h>

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

}  // namespace devpipe::testing
