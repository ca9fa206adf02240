// AllReduce (sum) and AllGather across the tensor-parallel ranks.
//
// Ranks on distinct GPUs (device_count >= tp_degree) use NCCL: one communicator per rank, all
// created in this process by ncclCommInitAll, each rank's thread enqueueing ncclAllReduce /
// ncclAllGather on its own stream.
//
// Ranks as processes (devpipe/world.h, mpirun -np tp_degree): one NCCL rank per process, on the
// GPU World::device_of_rank gives it; process 0 makes the NCCL unique id and the processes exchange it
// over MPI's control plane, then each calls ncclCommInitRank. (Compiled here; it has not run on
// GPUs yet. A hung peer is not bounded by DEVPIPE_COLLECTIVE_TIMEOUT_S on this path: NCCL waits
// on the device.)
//
// Ranks that share a GPU (tp_degree > device_count, e.g. tp 2 on one GPU) cannot be NCCL
// ranks. They use the "local" protocol, on device memory, with events between the ranks'
// streams and two host rendezvous through the runtime's Communicator::barrier (which only
// orders the host threads' enqueueing; it never waits for the GPU):
//   1. rank r prepares its buffer on its stream (all_reduce: out := in), publishes the buffer
//      pointer in the group's slot r and records ready[r] on its stream;
//   2. barrier: every rank has published and recorded;
//   3. rank r makes its stream wait for ready[q] of every peer q, then
//        all_reduce: sums slice r (elements [r*ceil(n/tp), ...)) of all ranks' buffers, in
//                    rank order, in float, and writes the sum back into every buffer;
//        all_gather: copies every rank's input into its own output (2-D copies);
//      and records done[r];
//   4. barrier: every rank has issued its waits on ready[] and recorded done[];
//   5. rank r makes its stream wait for done[q] of every peer (no peer still reads or writes
//      its buffers), and goes on.
// An event is re-recorded only after every peer issued its wait on the previous record (the
// barriers guarantee it), and the slots are rewritten only after every peer read them.
// Ranks on different GPUs that share the protocol (tp 4 on 2 GPUs) need peer access.
// DEVPIPE_CUDA_COLLECTIVES=local forces the local protocol on distinct GPUs too.
// The state belongs to the rank group (runtime/rank_group.h) the ranks' executables were
// compiled for (RankInfo.collectives): every stage of one (cuda, tp_degree) shares it.
// Neither path can be replayed from a CUDA graph (host rendezvous / NCCL across threads), so
// an executable with a collective at tp_degree > 1 always launches eagerly.
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "backends/cuda/executor.h"
#include "devpipe/error.h"
#include "devpipe/world.h"
#include "runtime/communicator.h"
#include "runtime/mpi.h"

namespace devpipe::cuda {
namespace {

/// The state of one rank group's collectives, built once.
class CollectiveGroup {
 public:
  enum class Mode { Nccl, Local };

  explicit CollectiveGroup(const GroupPlacement& p) : size(p.tp_degree) {
    const int tp = p.tp_degree;
    const World& world = *p.world;
    if (world.multi_process()) {
      init_across_processes(p);
      return;
    }
    const int ndev = num_devices();
    const char* force = std::getenv("DEVPIPE_CUDA_COLLECTIVES");
    const bool force_local = force != nullptr && std::string(force) == "local";
    mode = ndev >= tp && !force_local ? Mode::Nccl : Mode::Local;
    if (mode == Mode::Nccl) {
      std::vector<int> devs(static_cast<std::size_t>(tp));
      for (int r = 0; r < tp; ++r) devs[static_cast<std::size_t>(r)] = device_index(r);
      std::vector<ncclComm_t> raw(static_cast<std::size_t>(tp), nullptr);
      DEVPIPE_NCCL_CHECK(ncclCommInitAll(raw.data(), tp, devs.data()),
                         "creating " + std::to_string(tp) + " NCCL ranks");
      for (ncclComm_t c : raw) comms.emplace_back(c);
      return;
    }
    if (tp > kMaxLocalRanks) {
      throw Unsupported("cuda backend: " + std::to_string(tp) + " ranks on " +
                        std::to_string(ndev) +
                        " GPU(s): the shared-GPU collectives serve at most " +
                        std::to_string(kMaxLocalRanks) + " ranks");
    }
    for (int a = 0; a < std::min(tp, ndev); ++a) {
      for (int b = 0; b < std::min(tp, ndev); ++b) {
        if (a == b) continue;
        int can = 0;
        DEVPIPE_CUDA_CHECK(cudaDeviceCanAccessPeer(&can, a, b));
        if (!can) {
          throw Unsupported("cuda backend: ranks sharing GPUs need peer access between cuda:" +
                            std::to_string(a) + " and cuda:" + std::to_string(b) +
                            ", which this system lacks");
        }
        DeviceGuard guard(a);
        cudaError_t err = cudaDeviceEnablePeerAccess(b, 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          (void)cudaGetLastError();
        } else {
          DEVPIPE_CUDA_CHECK(err);
        }
      }
    }
    for (int r = 0; r < tp; ++r) {
      ready.push_back(Event::create(device_index(r)));
      done.push_back(Event::create(device_index(r)));
    }
    in_slots.assign(static_cast<std::size_t>(tp), nullptr);
    out_slots.assign(static_cast<std::size_t>(tp), nullptr);
  }

  /// One NCCL rank per process: the unique id from process 0, broadcast over MPI.
  void init_across_processes(const GroupPlacement& p) {
    const World& world = *p.world;
    const int tp = p.tp_degree;
    if (tp != world.num_processes() || p.ranks.size() != 1) {
      throw Unsupported("cuda backend: tp_degree " + std::to_string(tp) + " across " +
                        std::to_string(world.num_processes()) +
                        " processes: one NCCL rank per process needs tp_degree == the process count");
    }
    mode = Mode::Nccl;
    const int rank = p.ranks.front();
    ncclUniqueId id{};
    if (rank == 0) DEVPIPE_NCCL_CHECK(ncclGetUniqueId(&id), "making the NCCL unique id");
    const std::string mine = rank == 0 ? std::string(reinterpret_cast<const char*>(&id), sizeof id) : std::string();
    const std::vector<std::string> all = mpi::all_gather_text(mine, world.collective_timeout_s());
    if (all.empty() || all[0].size() != sizeof id) {
      throw CollectiveError("cuda backend: process 0 sent an NCCL unique id of " +
                            std::to_string(all.empty() ? 0 : all[0].size()) + " bytes, expected " +
                            std::to_string(sizeof id));
    }
    std::memcpy(&id, all[0].data(), sizeof id);
    comms.resize(static_cast<std::size_t>(tp));
    DeviceGuard guard(p.devices.front().index);
    ncclComm_t c = nullptr;
    DEVPIPE_NCCL_CHECK(ncclCommInitRank(&c, tp, id, rank),
                       "joining NCCL rank " + std::to_string(rank) + " of " + std::to_string(tp) + " (process " +
                           std::to_string(world.process()) + ")");
    comms[static_cast<std::size_t>(rank)] = NcclComm(c);
  }

  /// The device of rank `r` (thread mode: every rank is this process's).
  int device_index(int r) const {
    return World::device_of_rank(DeviceKind::Cuda, r, size, num_devices()).index;
  }

  int size;
  Mode mode = Mode::Local;
  std::vector<NcclComm> comms;
  std::vector<Event> ready, done;
  std::vector<const void*> in_slots;
  std::vector<void*> out_slots;
};

/// A rank group's collectives (Backend::make_collectives), owned by the group: the state is
/// built when the first collective step of the group is (NCCL's setup is a collective of its
/// own, which every process reaches at the same step of load()).
class GroupCollectives final : public DeviceCollectives {
 public:
  explicit GroupCollectives(GroupPlacement placement) : placement_(std::move(placement)) {}

  CollectiveGroup& state() {
    std::lock_guard lock(mu_);
    if (!state_) state_ = std::make_unique<CollectiveGroup>(placement_);
    return *state_;
  }

 private:
  GroupPlacement placement_;
  std::mutex mu_;
  std::unique_ptr<CollectiveGroup> state_;
};

class CollectiveStep final : public Step {
 public:
  explicit CollectiveStep(const BuildContext& cx)
      : gather_(cx.node.op == OpKind::AllGather),
        dt_(cx.in(0).dtype),
        in_(cx.in_id(0)),
        out_(cx.out_id()),
        count_(static_cast<std::size_t>(cx.in(0).shape.numel())),
        bytes_(count_ * dtype_size(dt_)),
        tp_(cx.rank.tp_degree),
        rank_(cx.rank.rank),
        comm_(cx.rank.comm) {
    if (gather_) {
      const auto dim = static_cast<std::size_t>(cx.node.attrs.i("dim"));
      std::int64_t outer = 1;
      for (std::size_t i = 0; i < dim; ++i) outer *= cx.in(0).shape[i];
      outer_ = static_cast<std::size_t>(outer);
      inner_bytes_ = outer_ == 0 ? 0 : bytes_ / outer_;
      const std::int64_t parts = cx.node.attrs.i("parts", tp_);
      if (tp_ > 1 && parts != tp_) {
        throw ShapeError("cuda backend: " + cx.where + " gathers " + std::to_string(parts) +
                         " parts but there are " + std::to_string(tp_) + " ranks");
      }
    } else if (!is_floating(dt_)) {
      throw Unsupported("cuda backend: " + cx.where + ": all_reduce needs a floating dtype");
    }
    if (tp_ <= 1) return;
    if (comm_ == nullptr) {
      throw StateError("cuda backend: " + cx.where + " runs at tp_degree " + std::to_string(tp_) +
                       " but rank " + std::to_string(rank_) +
                       " was compiled without a communicator");
    }
    auto* collectives = dynamic_cast<GroupCollectives*>(cx.rank.collectives);
    if (collectives == nullptr) {
      throw StateError("cuda backend: " + cx.where + " runs at tp_degree " + std::to_string(tp_) +
                       " but rank " + std::to_string(rank_) +
                       " was compiled without its rank group's collectives (RankInfo.collectives " +
                       (cx.rank.collectives ? "is another backend's)" : "is null)"));
    }
    group_ = &collectives->state();
    if (group_->mode == CollectiveGroup::Mode::Nccl && gather_ && outer_ > 1) {
      scratch_ = static_cast<std::size_t>(tp_) * bytes_;
    }
  }

  bool capturable() const override { return tp_ <= 1; }
  std::size_t scratch_bytes() const override { return scratch_; }

  void launch(const LaunchContext& cx) override {
    std::byte* in = cx.at(in_);
    std::byte* out = cx.at(out_);
    if (tp_ <= 1) {
      if (out != in && bytes_)
        DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(out, in, bytes_, cudaMemcpyDeviceToDevice, cx.stream));
      return;
    }
    if (group_->mode == CollectiveGroup::Mode::Nccl) {
      launch_nccl(in, out, cx);
    } else {
      launch_local(in, out, cx);
    }
  }

 private:
  void launch_nccl(std::byte* in, std::byte* out, const LaunchContext& cx) {
    ncclComm_t comm = group_->comms[static_cast<std::size_t>(rank_)].get();
    if (!gather_) {
      DEVPIPE_NCCL_CHECK(
          ncclAllReduce(in, out, count_, nccl_data_type(dt_), ncclSum, comm, cx.stream), where);
      return;
    }
    if (outer_ <= 1) {
      DEVPIPE_NCCL_CHECK(ncclAllGather(in, out, bytes_, ncclInt8, comm, cx.stream), where);
      return;
    }
    // Rank-major gather into scratch, then each rank's slab interleaved into [outer, tp, inner].
    DEVPIPE_NCCL_CHECK(ncclAllGather(in, cx.scratch, bytes_, ncclInt8, comm, cx.stream), where);
    copy_slabs(
        out,
        [&](int q) {
          return static_cast<const void*>(cx.scratch + static_cast<std::size_t>(q) * bytes_);
        },
        cx.stream);
  }

  template <class Src>
  void copy_slabs(std::byte* out, Src src, cudaStream_t stream) {
    if (inner_bytes_ == 0 || outer_ == 0) return;
    const std::size_t pitch = static_cast<std::size_t>(tp_) * inner_bytes_;
    for (int q = 0; q < tp_; ++q) {
      DEVPIPE_CUDA_CHECK(cudaMemcpy2DAsync(out + static_cast<std::size_t>(q) * inner_bytes_, pitch,
                                           src(q), inner_bytes_, inner_bytes_, outer_,
                                           cudaMemcpyDefault, stream));
    }
  }

  void wait_peers(const std::vector<Event>& events, cudaStream_t s) {
    for (int q = 0; q < tp_; ++q) {
      if (q != rank_)
        DEVPIPE_CUDA_CHECK(cudaStreamWaitEvent(s, events[static_cast<std::size_t>(q)].get(), 0));
    }
  }

  void launch_local(std::byte* in, std::byte* out, const LaunchContext& cx) {
    CollectiveGroup& g = *group_;
    const auto r = static_cast<std::size_t>(rank_);
    if (!gather_ && out != in && bytes_) {
      DEVPIPE_CUDA_CHECK(cudaMemcpyAsync(out, in, bytes_, cudaMemcpyDeviceToDevice, cx.stream));
    }
    g.in_slots[r] = in;
    g.out_slots[r] = out;
    DEVPIPE_CUDA_CHECK(cudaEventRecord(g.ready[r].get(), cx.stream));
    comm_->barrier(rank_);
    wait_peers(g.ready, cx.stream);
    if (gather_) {
      copy_slabs(
          out, [&](int q) { return g.in_slots[static_cast<std::size_t>(q)]; }, cx.stream);
    } else {
      RankBuffers bufs;
      bufs.count = tp_;
      for (int q = 0; q < tp_; ++q) bufs.ptr[q] = g.out_slots[static_cast<std::size_t>(q)];
      const std::size_t per =
          (count_ + static_cast<std::size_t>(tp_) - 1) / static_cast<std::size_t>(tp_);
      const std::size_t begin = std::min(count_, per * r);
      const std::size_t end = std::min(count_, begin + per);
      launch_rank_reduce(dt_, bufs, static_cast<std::int64_t>(begin),
                         static_cast<std::int64_t>(end), cx.stream);
    }
    DEVPIPE_CUDA_CHECK(cudaEventRecord(g.done[r].get(), cx.stream));
    comm_->barrier(rank_);
    wait_peers(g.done, cx.stream);
  }

  bool gather_;
  DType dt_;
  int in_, out_;
  std::size_t count_, bytes_;
  int tp_, rank_;
  Communicator* comm_;
  std::size_t outer_ = 1, inner_bytes_ = 0;
  std::size_t scratch_ = 0;
  CollectiveGroup* group_ = nullptr;  // the rank group's; it outlives this step
};

}  // namespace

std::unique_ptr<Step> make_collective_step(const BuildContext& cx) {
  return std::make_unique<CollectiveStep>(cx);
}

std::unique_ptr<DeviceCollectives> make_device_collectives(const GroupPlacement& placement) {
  if (placement.world == nullptr) throw InvalidArgument("cuda backend: a rank group placement without its world");
  return std::make_unique<GroupCollectives>(placement);
}

}  // namespace devpipe::cuda
