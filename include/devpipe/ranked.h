// devpipe — ranked tensors: a stage's outputs left on the devices of its tensor-parallel ranks.
//
// Indexed [rank][output] (the seed's "list of lists"). Each tensor lives on its rank's device and
// may be padded to the producer's compiled batch bucket; real_batch() is the caller's batch.
// Passing a RankedTensors to the next stage's forward() hands the buffers over with no copy
// when the buckets agree (they are re-padded on the device otherwise). Produced asynchronously:
// reading values (to_host, wait) blocks until the producing stage has finished on every rank.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "devpipe/tensor.h"

namespace devpipe {

namespace detail {
class EventState;
}

class RankedTensors {
 public:
  RankedTensors() = default;
  /// Built by the runtime. `ready[r]` signals when rank r's tensors are written.
  RankedTensors(std::vector<std::vector<Tensor>> per_rank, std::int64_t real_batch,
                std::string producer, std::vector<std::shared_ptr<detail::EventState>> ready);

  bool empty() const { return per_rank_.empty(); }
  int num_ranks() const { return static_cast<int>(per_rank_.size()); }
  int num_outputs() const { return per_rank_.empty() ? 0 : static_cast<int>(per_rank_[0].size()); }
  /// Rank r's outputs (device tensors; padded rows past real_batch() are unspecified).
  const std::vector<Tensor>& operator[](int rank) const;
  /// The caller's batch (rows that hold real results).
  std::int64_t real_batch() const { return real_batch_; }
  /// Tag of the stage that produced them.
  const std::string& producer() const { return producer_; }
  /// Only output `index`, on every rank.
  RankedTensors select(int index) const;
  /// Blocks until every rank has produced its tensors; rethrows a failure of the producer.
  void wait() const;
  /// Completion event of rank r (runtime use).
  const std::shared_ptr<detail::EventState>& ready(int rank) const;
  /// Host copies of rank 0's outputs cut to real_batch() rows (waits first).
  std::vector<Tensor> to_host() const;
  /// "ranked tensors [2 ranks x 1 output] from 'vision_model', batch 32 of 32".
  std::string describe() const;

 private:
  std::vector<std::vector<Tensor>> per_rank_;
  std::int64_t real_batch_ = 0;
  std::string producer_;
  std::vector<std::shared_ptr<detail::EventState>> ready_;
};

/// One argument of ModelWrapper::forward: a host tensor or ranked tensors (all of whose outputs
/// become consecutive arguments).
class Input {
 public:
  Input(Tensor t) : tensor_(std::move(t)) {}                   // NOLINT: implicit by design
  Input(RankedTensors r) : ranked_(std::move(r)) {}            // NOLINT
  bool is_ranked() const { return !ranked_.empty(); }
  const Tensor& tensor() const { return tensor_; }
  const RankedTensors& ranked() const { return ranked_; }

 private:
  Tensor tensor_;
  RankedTensors ranked_;
};

/// What a stage's forward returns: ranked tensors (pipeline_execution with
/// return_ranked_to_cpu=false) or host tensors of the caller's batch.
class Output {
 public:
  Output() = default;
  explicit Output(RankedTensors r) : ranked_(std::move(r)) {}
  explicit Output(std::vector<Tensor> host) : host_(std::move(host)) {}

  bool is_ranked() const { return !ranked_.empty(); }
  /// Throws StateError when the output is on the host.
  const RankedTensors& ranked() const;
  /// Host outputs; throws StateError when ranked (use ranked().to_host()).
  const std::vector<Tensor>& tensors() const;
  const Tensor& tensor(int index = 0) const;
  /// Shape / device of host output 0 (PyTorch's final_output.shape / .device).
  const Shape& shape() const { return tensor(0).shape(); }
  Device device() const { return tensor(0).device(); }
  /// "ranked tensors [2 ranks x 1 output] ..." or "tensor".
  std::string type_name() const;

  operator Input() const {  // NOLINT: pass a stage's result straight to the next stage
    return is_ranked() ? Input(ranked_) : Input(tensor(0));
  }

 private:
  RankedTensors ranked_;
  std::vector<Tensor> host_;
};

}  // namespace devpipe
