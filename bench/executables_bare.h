// `executables_bare` mode of `devpipe bench`: the floor for the runtime itself.
//
// The executables devpipe's pipeline runs — each stage's graph and weights read from its
// compiled artifact, compiled by the backend for rank 0 with the pipeline's threads per rank —
// called back to back in a plain loop, each stage's output buffer the next stage's input: no
// ModelWrapper, no forward(), no rank streams, events, pools or padding. Against the pipeline
// mode's p50 it measures what the runtime adds around the same kernels (kernels_bare, oneDNN
// alone, is not that floor where the cpu backend runs kernels of its own).
#pragma once

#include <devpipe/tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace devpipe::bench {

/// A workload's compiled stages, loaded once; run() as often as wanted (a persistent worker).
class ExecutablesBare {
 public:
  /// Loads the stage artifacts `artifact_dirs` (in pipeline order) at the bucket of batch
  /// `batch`: the weights of rank 0 (checksums verified), the graph compiled by the backend of
  /// the artifact's device with RankInfo{rank 0, the artifact's tp_degree, no communicator,
  /// threads_per_rank of its config}, every input and output buffer allocated once. Stage i
  /// takes the previous stage's output (i > 0), then `host_inputs[i]` (copied once into its
  /// buffers), in its graph's input order, as the pipeline passes them. Throws
  /// devpipe::InvalidArgument when rank 0 cannot run a stage alone (why_not_alone), a stage has
  /// states, the previous stage has not exactly one output, or no bucket has `batch`;
  /// ShapeError naming the stage and the input for a shape or dtype that differs from the
  /// graph's; the artifact's errors (FormatError, IoError) as load() has them.
  ExecutablesBare(const std::vector<std::string>& artifact_dirs, std::int64_t batch,
                  const std::vector<std::vector<Tensor>>& host_inputs);
  ~ExecutablesBare();
  ExecutablesBare(const ExecutablesBare&) = delete;
  ExecutablesBare& operator=(const ExecutablesBare&) = delete;

  /// "" when rank 0 of the artifact in `dir` computes its bucket of batch `batch` on its own:
  /// tp_degree 1, or a stage whose ranks all compute the same values (no sharded weight,
  /// collective or state: rank_dependence), which the pipeline runs once for all ranks. Else
  /// the reason, naming the artifact.
  static std::string why_not_alone(const std::string& dir, std::int64_t batch);

  /// Runs `iters` (>= 1) forwards (every stage once, in order); one wall-clock sample (ms) each.
  std::vector<double> run(int iters);
  /// The last stage's first output of the last run, row-major float32.
  std::vector<float> output() const;
  /// The threads per rank stage 0's executable runs with.
  int threads() const;
  /// One line: the stages, their artifacts, tp degree and threads.
  const std::string& what() const { return what_; }

  struct Plan;

 private:
  std::unique_ptr<Plan> plan_;
  std::string what_;
};

}  // namespace devpipe::bench
