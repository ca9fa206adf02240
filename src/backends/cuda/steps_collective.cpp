// AllReduce (sum) and AllGather across the tensor-parallel ranks.
//
// Ranks on distinct GPUs (device_count >= tp_degree) use NCCL: one communicator per rank, all
// created in this process (ncclCommInitRankConfig for every rank inside one NCCL group), each
// rank's thread enqueueing ncclAllReduce / ncclAllGather on its own stream.
//
// Ranks as processes (devpipe/world.h, mpirun -np tp_degree): one NCCL rank per process, on the
// GPU World::device_of_rank gives it; process 0 makes the NCCL unique id and the processes exchange it
// over MPI's control plane, then each calls ncclCommInitRankConfig. (Compiled here; it has not
// run on GPUs yet.)
//
// Timeouts (DEVPIPE_COLLECTIVE_TIMEOUT_S, World::collective_timeout_s). A peer rank that died or
// hangs would otherwise leave the NCCL kernels of the others, and every host wait behind them,
// waiting for ever. So (compiled here, not run on a GPU yet):
//   - the communicators are non-blocking (ncclConfig_t::blocking = 0): no NCCL call blocks the
//     host; a call that answers ncclInProgress (the set-up, and a collective's first use of a
//     connection, which needs the peer) is polled with ncclCommGetAsyncError until it is done,
//     within the timeout;
//   - every collective is queued between two events, watched by the group's CollectiveWatchdog
//     (runtime/collective_watchdog.h): once the first event is done (the collective has begun,
//     everything queued before it on the rank's stream ran), the collective must finish within
//     the timeout.
// On expiry, or an NCCL error, the group fails: its communicators are aborted (ncclCommAbort,
// which ends the kernels still waiting, so host waits return), the error naming the rank, the
// collective, its bytes and the timeout is recorded for the process, and every later host wait
// on the cuda backend (device events, copies) and every later collective throws it as a
// CollectiveError: the ranks are out of step and the job must be restarted. Across processes
// the MPI side is marked out of step too (mpi::mark_out_of_step), so the job is aborted at
// exit, which also ends a hung peer.
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
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "backends/cuda/executor.h"
#include "devpipe/error.h"
#include "devpipe/world.h"
#include "runtime/collective_watchdog.h"
#include "runtime/communicator.h"
#include "runtime/mpi.h"

namespace devpipe::cuda {
namespace {

/// The first collective failure of this process (never destroyed: host waits may run at exit).
struct FailureRecord {
  std::mutex mu;
  std::string message;
  std::atomic<bool> failed{false};
};

FailureRecord& failure_record() {
  static auto* r = new FailureRecord();
  return *r;
}

void record_failure(const std::string& message) {
  FailureRecord& r = failure_record();
  std::lock_guard lock(r.mu);
  if (r.failed.load()) return;
  r.message = message;
  r.failed = true;
}

std::string seconds_text(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", s);
  return buf;
}

/// One NCCL communicator of a group. Its calls and its abort are serialised: the watchdog
/// aborts from its own thread while the rank's thread may be queueing.
class NcclRank {
 public:
  explicit NcclRank(ncclComm_t c) : comm_(c) {}
  NcclRank(const NcclRank&) = delete;
  NcclRank& operator=(const NcclRank&) = delete;

  /// f(comm)'s result; ncclInvalidUsage once aborted.
  template <class F>
  ncclResult_t call(const F& f) {
    std::lock_guard lock(mu_);
    if (!comm_) return ncclInvalidUsage;
    return f(comm_.get());
  }
  /// ncclCommGetAsyncError's state (ncclInProgress while a call is still being carried out).
  ncclResult_t state() {
    return call([](ncclComm_t c) {
      ncclResult_t st = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(c, &st);
      return q != ncclSuccess ? q : st;
    });
  }
  /// NCCL's last error text for this communicator ("" once aborted).
  std::string last_error() {
    std::lock_guard lock(mu_);
    const char* t = comm_ ? ncclGetLastError(comm_.get()) : nullptr;
    return t ? t : "";
  }
  /// Ends the communicator's work on the device and frees it (once).
  void abort() {
    std::lock_guard lock(mu_);
    if (comm_) (void)ncclCommAbort(comm_.release());
  }

 private:
  std::mutex mu_;
  NcclComm comm_;  // ncclCommDestroy when the group goes normally
};

/// A collective's two marks for the watchdog: events recorded before and after it on the
/// rank's stream.
class EventMarks final : public CollectiveWatchdog::Marks {
 public:
  explicit EventMarks(int device) : before_(Event::create(device)), after_(Event::create(device)) {}
  bool begun() override { return done(before_); }
  bool finished() override { return done(after_); }
  cudaEvent_t before() const { return before_.get(); }
  cudaEvent_t after() const { return after_.get(); }

 private:
  static bool done(const Event& e) {
    const cudaError_t err = cudaEventQuery(e.get());
    if (err == cudaErrorNotReady) return false;
    // Any other error is the device's: the host waits behind the event report it.
    if (err != cudaSuccess) (void)cudaGetLastError();
    return true;
  }
  Event before_, after_;
};

/// The state of one rank group's collectives, built once.
class CollectiveGroup {
 public:
  enum class Mode { Nccl, Local };

  explicit CollectiveGroup(const GroupPlacement& p)
      : size(p.tp_degree), world(*p.world), timeout_s(p.world->collective_timeout_s()) {
    const int tp = p.tp_degree;
    if (world.multi_process()) {
      init_across_processes(p);
      return;
    }
    const int ndev = num_devices();
    const char* force = std::getenv("DEVPIPE_CUDA_COLLECTIVES");
    const bool force_local = force != nullptr && std::string(force) == "local";
    mode = ndev >= tp && !force_local ? Mode::Nccl : Mode::Local;
    if (mode == Mode::Nccl) {
      for (int r = 0; r < tp; ++r) devices.push_back(device_index(r));
      ncclUniqueId id{};
      DEVPIPE_NCCL_CHECK(ncclGetUniqueId(&id), "making the NCCL unique id");
      std::vector<int> all(static_cast<std::size_t>(tp));
      for (int r = 0; r < tp; ++r) all[static_cast<std::size_t>(r)] = r;
      init_nccl(id, all);
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
    const std::vector<std::string> all = mpi::all_gather_text(mine, timeout_s);
    if (all.empty() || all[0].size() != sizeof id) {
      throw CollectiveError("cuda backend: process 0 sent an NCCL unique id of " +
                            std::to_string(all.empty() ? 0 : all[0].size()) + " bytes, expected " +
                            std::to_string(sizeof id));
    }
    std::memcpy(&id, all[0].data(), sizeof id);
    devices.assign(static_cast<std::size_t>(tp), -1);
    devices[static_cast<std::size_t>(rank)] = p.devices.front().index;
    init_nccl(id, {rank});
  }

  /// Creates the non-blocking NCCL communicators of `ranks` (this process's) in one NCCL group
  /// and waits, within the timeout, until they are ready; then starts the watchdog. On a
  /// failure the communicators made so far are aborted.
  void init_nccl(const ncclUniqueId& id, const std::vector<int>& ranks) {
    nccl.resize(static_cast<std::size_t>(size));
    const std::string what = "creating the NCCL communicator" + std::string(ranks.size() > 1 ? "s" : "") +
                             " of " + (ranks.size() > 1 ? "ranks 0 to " + std::to_string(size - 1)
                                                        : describe_rank(ranks.front()));
    ncclResult_t st = ncclGroupStart();
    if (st == ncclSuccess) {
      for (int r : ranks) {
        DeviceGuard guard(devices[static_cast<std::size_t>(r)]);
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;
        ncclComm_t c = nullptr;
        const ncclResult_t rs = ncclCommInitRankConfig(&c, size, id, r, &config);
        if (c != nullptr) nccl[static_cast<std::size_t>(r)] = std::make_unique<NcclRank>(c);
        if (rs != ncclSuccess && rs != ncclInProgress) {
          st = rs;
          break;
        }
      }
      const ncclResult_t end = ncclGroupEnd();
      if (st == ncclSuccess && end != ncclInProgress) st = end;
    }
    if (st != ncclSuccess) {
      abort_init();
      throw CollectiveError("cuda backend: [nccl] " + what + " failed: " + ncclGetErrorString(st));
    }
    for (int r : ranks) {
      NcclRank* n = nccl[static_cast<std::size_t>(r)].get();
      if (n == nullptr) {
        abort_init();
        throw CollectiveError("cuda backend: [nccl] " + what + ": NCCL returned no communicator for rank " +
                              std::to_string(r));
      }
      ncclResult_t state = ncclInProgress;
      const bool ready = poll_until(
          [&] {
            state = n->state();
            return state != ncclInProgress;
          },
          timeout_s);
      if (!ready || state != ncclSuccess) {
        const std::string why = !ready ? "did not complete within " + seconds_text(timeout_s) +
                                             " s (DEVPIPE_COLLECTIVE_TIMEOUT_S): a peer process died, hangs or "
                                             "failed"
                                       : std::string("failed: ") + ncclGetErrorString(state) + " (" +
                                             n->last_error() + ")";
        abort_init();
        throw CollectiveError("cuda backend: [nccl] " + what + " " + why);
      }
    }
    watchdog = std::make_unique<CollectiveWatchdog>(
        timeout_s, [this](int r) { return std::make_unique<EventMarks>(devices[static_cast<std::size_t>(r)]); },
        [this](const CollectiveWatchdog::Label& l, double waited) {
          fail("cuda backend: [nccl] " + std::string(l.op) + " of " + std::to_string(l.bytes) + " bytes on " +
               describe_rank(l.rank) + " did not complete within " + seconds_text(timeout_s) +
               " s of starting (DEVPIPE_COLLECTIVE_TIMEOUT_S; waited " + seconds_text(waited) +
               " s): a peer rank died, hangs or failed; the NCCL communicators of the " + std::to_string(size) +
               " ranks were aborted and the job must be restarted");
        });
  }

  /// "rank 1 of 2 (process 1 of 2, cuda:0)".
  std::string describe_rank(int r) const {
    const int dev = r >= 0 && static_cast<std::size_t>(r) < devices.size() ? devices[static_cast<std::size_t>(r)] : -1;
    return "rank " + std::to_string(r) + " of " + std::to_string(size) + " (process " +
           std::to_string(world.process()) + " of " + std::to_string(world.num_processes()) + ", cuda:" +
           std::to_string(dev) + ")";
  }

  /// The group has failed (`message` says why): the message becomes the process's collective
  /// failure, the communicators are aborted, and across processes MPI is marked out of step.
  void fail(const std::string& message) {
    record_failure(message);
    abort_all();
    if (world.multi_process()) mpi::mark_out_of_step();
  }

  void abort_all() {
    for (auto& n : nccl) {
      if (n) n->abort();
    }
  }

  /// The set-up failed: the communicators made so far are aborted; across processes the peers
  /// may be stuck in theirs, so MPI is marked out of step (the job is aborted at exit).
  void abort_init() {
    abort_all();
    if (world.multi_process()) mpi::mark_out_of_step();
  }

  /// Queues `f(comm)` (an NCCL collective) for rank `rank`, waiting within the timeout while
  /// NCCL answers ncclInProgress; fails the group and throws CollectiveError on expiry or an
  /// NCCL error.
  template <class F>
  void enqueue(int rank, const CollectiveWatchdog::Label& label, const F& f) {
    NcclRank& n = *nccl[static_cast<std::size_t>(rank)];
    ncclResult_t st = n.call(f);
    bool timed_out = false;
    if (st == ncclInProgress) {
      timed_out = !poll_until(
          [&] {
            st = n.state();
            return st != ncclInProgress;
          },
          timeout_s);
    }
    if (st == ncclSuccess && !timed_out) return;
    throw_if_collectives_failed();  // the watchdog aborted the communicator meanwhile: its error
    const std::string what = "cuda backend: [nccl] queueing " + std::string(label.op) + " of " +
                             std::to_string(label.bytes) + " bytes on " + describe_rank(rank);
    std::string message;
    if (timed_out) {
      message = what + " did not complete within " + seconds_text(timeout_s) +
                " s (DEVPIPE_COLLECTIVE_TIMEOUT_S): a peer rank died, hangs or failed; the job must be restarted";
    } else {
      const std::string detail = n.last_error();
      message = what + " failed: " + ncclGetErrorString(st) + (detail.empty() ? "" : " (" + detail + ")");
    }
    fail(message);
    throw CollectiveError(message);
  }

  /// The device of rank `r` (thread mode: every rank is this process's).
  int device_index(int r) const {
    return World::device_of_rank(DeviceKind::Cuda, r, size, num_devices()).index;
  }

  int size;
  const World& world;
  double timeout_s;
  Mode mode = Mode::Local;
  std::vector<int> devices;                    // NCCL: [rank] its device; -1 for other processes' ranks
  std::vector<std::unique_ptr<NcclRank>> nccl;  // NCCL: [rank]; null for other processes' ranks
  std::unique_ptr<CollectiveWatchdog> watchdog;  // NCCL; after `nccl`: stops before they go
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
    throw_if_collectives_failed();
    CollectiveGroup& g = *group_;
    const CollectiveWatchdog::Label label{gather_ ? "all_gather" : "all_reduce",
                                          gather_ ? static_cast<std::size_t>(tp_) * bytes_ : bytes_, rank_};
    // all_gather with outer > 1: rank-major into scratch, then each rank's slab interleaved
    // into [outer, tp, inner].
    std::byte* gathered = gather_ && outer_ > 1 ? cx.scratch : out;
    g.watchdog->watch(label, [&](CollectiveWatchdog::Marks& m) {
      auto& marks = static_cast<EventMarks&>(m);
      DEVPIPE_CUDA_CHECK(cudaEventRecord(marks.before(), cx.stream));
      g.enqueue(rank_, label, [&](ncclComm_t comm) {
        return gather_ ? ncclAllGather(in, gathered, bytes_, ncclInt8, comm, cx.stream)
                       : ncclAllReduce(in, out, count_, nccl_data_type(dt_), ncclSum, comm, cx.stream);
      });
      DEVPIPE_CUDA_CHECK(cudaEventRecord(marks.after(), cx.stream));
    });
    if (gathered == out) return;
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

void throw_if_collectives_failed() {
  FailureRecord& r = failure_record();
  if (!r.failed.load()) return;
  std::lock_guard lock(r.mu);
  throw CollectiveError(r.message);
}

std::unique_ptr<Step> make_collective_step(const BuildContext& cx) {
  return std::make_unique<CollectiveStep>(cx);
}

std::unique_ptr<DeviceCollectives> make_device_collectives(const GroupPlacement& placement) {
  if (placement.world == nullptr) throw InvalidArgument("cuda backend: a rank group placement without its world");
  return std::make_unique<GroupCollectives>(placement);
}

}  // namespace devpipe::cuda
