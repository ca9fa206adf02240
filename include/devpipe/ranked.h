// devpipe — ranked tensors: a stage's outputs left on the devices of its tensor-parallel ranks.
//
// Indexed [rank][output] (the seed's "list of lists"); a rank run by another process (MPI
// mode, devpipe/world.h) has no tensors here. Each tensor lives on its rank's device and
// may be padded to the producer's compiled batch bucket; real_batch() is the caller's batch.
// Passing a RankedTensors to the next stage's forward() hands the buffers over with no copy
// when the buckets agree (they are re-padded on the device otherwise). Produced asynchronously:
// reading values (to_host, wait) blocks until the producing stage has finished on every rank.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "devpipe/stats.h"
#include "devpipe/tensor.h"

namespace devpipe {

class ModelWrapper;

/// The compiled bucket a forward ran in (its first chunk's when the batch ran in chunks): the
/// sizes the runtime padded the inputs to.
struct BucketInfo {
  std::int64_t batch = 0;            // the bucket's batch size (0: not produced by a forward)
  std::vector<std::string> dims;     // the stage's named dims, sorted (e.g. {"cache"}, {"seq"})
  std::vector<std::int64_t> sizes;   // their sizes in the bucket, in the order of dims
  /// The bucket's size of named dim `dim`; InvalidArgument naming the dims it has otherwise.
  std::int64_t size(const std::string& dim) const;
};

namespace detail {
class EventState;

/// What RankedTensors handles share (runtime use). The runtime keeps these in per-stage
/// objects it reuses from one forward to the next, so handing results out allocates nothing.
struct RankedData {
  std::vector<std::vector<Tensor>> per_rank;  // [rank][output]
  std::vector<EventState*> ready;             // rank r's completion; lives as long as this
  std::vector<const TransferStats*> rank_counts;  // rank r's transfers in this forward (null: none)
  const TransferStats* host_counts = nullptr;     // the forward thread's (forwards = 1)
  std::int64_t real_batch = 0;
  BucketInfo bucket;  // the bucket the producing forward ran in
  std::string producer;
  std::vector<std::shared_ptr<EventState>> owned_ready;  // events given to the constructor
  std::shared_ptr<const void> keep_alive;               // what `ready` points into, if other
};
}  // namespace detail

/// A handle: copying one copies a reference to the same tensors and events (no allocation).
class RankedTensors {
 public:
  RankedTensors() = default;
  /// Built by the runtime. `ready[r]` signals when rank r's tensors are written.
  RankedTensors(std::vector<std::vector<Tensor>> per_rank, std::int64_t real_batch,
                std::string producer, std::vector<std::shared_ptr<detail::EventState>> ready);

  bool empty() const { return !data_ || data_->per_rank.empty(); }
  int num_ranks() const { return data_ ? static_cast<int>(data_->per_rank.size()) : 0; }
  int num_outputs() const;
  /// Rank r's outputs (device tensors; padded rows past real_batch() are unspecified). Under
  /// MPI (devpipe/world.h) a process holds only its own ranks' tensors: other ranks throw.
  const std::vector<Tensor>& operator[](int rank) const;
  /// Whether this process holds rank r's tensors (every rank in thread mode).
  bool is_local(int rank) const;
  /// The ranks this process holds, ascending.
  std::vector<int> local_ranks() const;
  /// The caller's batch (rows that hold real results).
  std::int64_t real_batch() const { return data_ ? data_->real_batch : 0; }
  /// Tag of the stage that produced them.
  const std::string& producer() const;
  /// The compiled bucket the producing forward ran in (batch 0 for tensors built by a caller).
  const BucketInfo& bucket() const;
  /// Only output `index`, on every rank.
  RankedTensors select(int index) const;
  /// Blocks until every rank has produced its tensors; rethrows a failure of the producer.
  void wait() const;
  /// Completion event of rank r (runtime use; shares ownership with these tensors).
  std::shared_ptr<detail::EventState> ready(int rank) const;
  /// What the forward that produced these moved, over this process's ranks (waits first).
  TransferStats transfer_stats() const;
  /// Host copies of the outputs of the first local rank (rank 0 in thread mode; every rank holds
  /// the same whole outputs) cut to real_batch() rows (waits first).
  std::vector<Tensor> to_host() const;
  /// "ranked tensors [2 ranks x 1 output] from 'vision_model', batch 32 of 32".
  std::string describe() const;

 private:
  friend class ModelWrapper;
  explicit RankedTensors(std::shared_ptr<const detail::RankedData> data) : data_(std::move(data)) {}
  std::shared_ptr<const detail::RankedData> data_;
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
/// return_ranked_to_cpu=false) or host tensors of the caller's batch. Copying one copies
/// handles (no allocation).
class Output {
 public:
  Output() = default;
  explicit Output(RankedTensors r) : ranked_(std::move(r)) {}
  explicit Output(std::vector<Tensor> host);

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
  /// What the forward that returned this moved (for ranked outputs: once its ranks finish;
  /// host outputs: counted when forward() returned). Zero for an Output built by the caller.
  TransferStats transfer_stats() const;
  /// The compiled bucket the forward that returned this ran in (its batch and the sizes of its
  /// named dims, e.g. the token-generation cache bucket); batch 0 for an Output built by the
  /// caller.
  const BucketInfo& bucket() const;

  operator Input() const {  // NOLINT: pass a stage's result straight to the next stage
    return is_ranked() ? Input(ranked_) : Input(tensor(0));
  }

 private:
  friend class ModelWrapper;
  struct SharedHost {};
  Output(SharedHost, std::shared_ptr<const std::vector<Tensor>> host, std::shared_ptr<const TransferStats> counts,
         std::shared_ptr<const BucketInfo> bucket)
      : host_(std::move(host)), counts_(std::move(counts)), bucket_(std::move(bucket)) {}
  RankedTensors ranked_;
  std::shared_ptr<const std::vector<Tensor>> host_;  // null: no host outputs
  std::shared_ptr<const TransferStats> counts_;      // host outputs: the forward's transfers
  std::shared_ptr<const BucketInfo> bucket_;         // host outputs: the forward's bucket
};

}  // namespace devpipe
