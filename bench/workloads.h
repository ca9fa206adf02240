// The benchmark workloads' models (tools/bench.cpp builds and runs them; bench/pytorch_bench.py
// holds their PyTorch twins, fed the same weights).
#pragma once

#include <devpipe/devpipe.h>

#include <string>
#include <vector>

namespace devpipe::bench {

/// `large` stage 1: [32, 1440, 8] -> [32, 1440, 1280], the size of NxD Inference's own large
/// pipeline test intermediate (236 MB in float32).
struct Expand : nn::Module {
  nn::Linear proj{8, 1280};
  Expand() { register_module("proj", proj); }
  Var forward(Var x) const { return proj(x); }
};

/// `large` stage 2: [32, 1440, 1280] -> [32, 1440, 8].
struct Reduce : nn::Module {
  nn::Linear proj{1280, 8};
  Reduce() { register_module("proj", proj); }
  Var forward(Var x) const { return proj(x); }
};

/// `chain8` stage: Linear(64, 64) + exact GELU on [1, 64].
struct ChainStage : nn::Module {
  nn::Linear fc{64, 64};
  ChainStage() { register_module("fc", fc); }
  Var forward(Var x) const { return F::gelu(fc(x)); }
};

/// A wrapper with the bench's options and one example input set.
template <class M>
class BenchWrapper : public ModelWrapper {
 public:
  BenchWrapper(const InferenceConfig& c, WrapperOptions o, std::vector<Tensor> example)
      : ModelWrapper(c, model_cls<M>(), std::move(o)), example_(std::move(example)) {}
  std::vector<std::vector<Tensor>> input_generator() const override { return {example_}; }

 private:
  std::vector<Tensor> example_;
};

}  // namespace devpipe::bench
