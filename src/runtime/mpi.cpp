// The MPI side of a multi-process world: initialisation, the control plane of compile/load,
// and the collectives of a stage whose ranks are processes.
//
// Collectives are non-blocking point-to-point messages to and from every peer, polled against a
// deadline, so that a peer process that died or hangs turns into a CollectiveError within
// DEVPIPE_COLLECTIVE_TIMEOUT_S instead of a hang. The all-reduce of a buffer above 2 KiB is a
// reduce-scatter (each process sums its slice over the ranks in rank order, accumulating in
// float32) followed by an all-gather, so the bytes each process sends are the bandwidth-optimal
// 2(P-1)/P of the buffer; a smaller buffer goes whole to every peer and each process sums all of
// it, in one step. Either way each element is summed with the same arithmetic, in the same
// order, as by the thread mode's shared-memory communicator, so the two modes give equal
// results bit for bit.
#include "runtime/mpi.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "devpipe/error.h"

#ifdef DEVPIPE_HAVE_MPI
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <thread>

#include "core/log.h"
#include "devpipe/dtype.h"
#include "devpipe/timeline.h"
#endif

namespace devpipe::mpi {

int launcher_world_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"}) {
    if (const char* v = std::getenv(name); v && *v) {
      char* end = nullptr;
      long n = std::strtol(v, &end, 10);
      if (end && *end == '\0' && n >= 1 && n <= 1 << 20) return static_cast<int>(n);
    }
  }
  return 0;
}

namespace {
struct Recorded {
  std::mutex mu;
  std::map<std::pair<std::string, std::size_t>, std::uint64_t> calls;
};
Recorded& recorded() {
  static Recorded r;
  return r;
}
}  // namespace

std::vector<CollectiveCount> recorded_collectives() {
  Recorded& r = recorded();
  std::lock_guard lock(r.mu);
  std::vector<CollectiveCount> out;
  for (const auto& [key, n] : r.calls) out.push_back({key.first, key.second, n});
  return out;
}

void clear_recorded_collectives() {
  Recorded& r = recorded();
  std::lock_guard lock(r.mu);
  r.calls.clear();
}

#ifndef DEVPIPE_HAVE_MPI

bool built_with_mpi() { return false; }

namespace {
[[noreturn]] void no_mpi(const char* what) {
  throw Unsupported(std::string(what) +
                    ": devpipe was built without MPI (install libopenmpi-dev and reconfigure)");
}
}  // namespace

std::pair<int, int> init(double) { no_mpi("MPI world"); }
int local_size() { no_mpi("MPI world"); }
std::unique_ptr<Communicator> make_communicator(DeviceKind, int, double) {
  no_mpi("MPI communicator");
}
std::vector<std::string> all_gather_text(const std::string&, double) {
  no_mpi("MPI control plane");
}
void broadcast_from_process0(void*, std::size_t, double) { no_mpi("MPI control plane"); }
void mark_out_of_step() {}

#else

bool built_with_mpi() { return true; }

namespace {

/// Every MPI call goes through this lock: correct whatever thread level the library provides,
/// and cheap (a poll holds it for one MPI_Test).
std::mutex& mpi_mutex() {
  static std::mutex mu;
  return mu;
}

struct State {
  bool we_initialised = false;
  int rank = 0;
  int size = 1;
  int local_size = 1;
  double exit_timeout_s = 300;
  MPI_Comm control = MPI_COMM_NULL;
  MPI_Comm exit = MPI_COMM_NULL;                      // only the barrier at exit
  MPI_Comm data[2] = {MPI_COMM_NULL, MPI_COMM_NULL};  // per DeviceKind: the groups' comms' parents
  std::atomic<bool> broken{false};  // a collective failed: the processes are out of step
};

State& state() {
  static State s;
  return s;
}

void abort_job() {
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, 1);
}

// At exit: when the processes are out of step (a collective failed), peers may sit in a
// collective that will never complete, so the whole job is aborted. Otherwise the processes meet
// once more, within the timeout (a process that leaves early, after an error of its own, must
// not wait in MPI_Finalize for peers that wait for it elsewhere), and finalise.
void at_exit() {
  State& s = state();
  int finalized = 0;
  {
    std::lock_guard lock(mpi_mutex());
    MPI_Finalized(&finalized);
  }
  if (finalized) return;
  if (s.broken.load()) abort_job();
  MPI_Request req = MPI_REQUEST_NULL;
  {
    std::lock_guard lock(mpi_mutex());
    if (MPI_Ibarrier(s.exit, &req) != MPI_SUCCESS) abort_job();
  }
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    int done = 0;
    {
      std::lock_guard lock(mpi_mutex());
      if (MPI_Test(&req, &done, MPI_STATUS_IGNORE) != MPI_SUCCESS) abort_job();
    }
    if (done) break;
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >
        s.exit_timeout_s) {
      std::fprintf(
          stderr,
          "devpipe: [mpi] process %d of %d: the peers did not reach the end of the program within "
          "%g s (DEVPIPE_COLLECTIVE_TIMEOUT_S); aborting the job\n",
          s.rank, s.size, s.exit_timeout_s);
      abort_job();
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  std::lock_guard lock(mpi_mutex());
  if (s.we_initialised) MPI_Finalize();
}

std::string mpi_error_text(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, static_cast<std::size_t>(len));
}

void check(int code, const char* call) {
  if (code != MPI_SUCCESS) {
    state().broken = true;
    throw CollectiveError(std::string(call) + " failed: " + mpi_error_text(code));
  }
}

/// Polls the `n` requests until all complete or `timeout_s` passes (0: no bound): spins
/// briefly, then yields, then sleeps in short steps, so a rank waiting on a slow peer does not
/// hold a core. `what()` names the collective in the error (built only then: the hot path
/// allocates nothing).
template <class What>
void wait_all(MPI_Request* reqs, int n, double timeout_s, const What& what) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (long polls = 0;; ++polls) {
    int done = 0;
    {
      std::lock_guard lock(mpi_mutex());
      check(MPI_Testall(n, reqs, &done, MPI_STATUSES_IGNORE), "MPI_Testall");
    }
    if (done) return;
    if (polls < 2000) continue;
    const double waited = std::chrono::duration<double>(clock::now() - start).count();
    if (timeout_s > 0 && waited > timeout_s) {
      state().broken = true;  // the requests stay pending: the processes are out of step for good
      char buf[32];
      std::snprintf(buf, sizeof buf, "%g", timeout_s);
      throw CollectiveError(
          what() + " did not complete within " + buf +
          " s (DEVPIPE_COLLECTIVE_TIMEOUT_S): a peer process died, hangs or failed; "
          "the job must be restarted");
    }
    if (polls < 20000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

template <class What>
void wait(MPI_Request& req, double timeout_s, const What& what) {
  wait_all(&req, 1, timeout_s, what);
}

template <class What>
int as_count(std::size_t bytes, const What& what) {
  if (bytes > static_cast<std::size_t>(INT_MAX)) {
    throw Unsupported(what() + ": " + std::to_string(bytes) +
                      " bytes per process exceed MPI's int count");
  }
  return static_cast<int>(bytes);
}

/// Counts a collective for recorded_collectives(), only while the timeline records.
void note(const char* op, std::size_t bytes) {
  if (!timeline::recording()) return;
  Recorded& r = recorded();
  std::lock_guard lock(r.mu);
  ++r.calls[{op, bytes}];
}

/// The MPI communicator of one rank group, its own: duplicated from its device kind's when the
/// group is made (every process makes its groups at the same load() calls, after they compared
/// their configs; a peer that does not come fails the duplication within the timeout), so the
/// collectives of groups of different tp degrees, issued from their streams at once, never meet
/// on one communicator. Freed with the group; left to MPI once MPI is finalised or the
/// processes are out of step after a failure.
class OwnedComm {
 public:
  template <class What>
  OwnedComm(MPI_Comm parent, double timeout_s, const What& what) {
    MPI_Request req = MPI_REQUEST_NULL;
    {
      std::lock_guard lock(mpi_mutex());
      check(MPI_Comm_idup(parent, &comm_, &req), "MPI_Comm_idup");
    }
    wait(req, timeout_s, what);
  }
  ~OwnedComm() {
    std::lock_guard lock(mpi_mutex());
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && !state().broken.load()) MPI_Comm_free(&comm_);
  }
  OwnedComm(const OwnedComm&) = delete;
  OwnedComm& operator=(const OwnedComm&) = delete;
  MPI_Comm get() const { return comm_; }

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(std::unique_ptr<OwnedComm> comm, int size, int rank, double timeout_s)
      : comm_(comm->get()), size_(size), rank_(rank), timeout_s_(timeout_s), owned_(std::move(comm)) {}

  int size() const override { return size_; }

  // The collectives are point-to-point messages (MPI_Isend / MPI_Irecv to and from every peer):
  // Open MPI's non-blocking collectives (libnbc) cost about twice its point-to-point messages on
  // small and medium buffers (devpipe_mpi_bench), and the results are the same, summed here.
  void all_reduce_sum(int rank, void* data, std::size_t count, DType dtype) override {
    timeline::Span span("all_reduce", "collective", rank + 1);
    enter(rank, "all_reduce");
    const std::size_t elem = dtype_size(dtype);
    note("all_reduce", count * elem);
    const auto p = static_cast<std::size_t>(size_);
    const auto me = static_cast<std::size_t>(rank_);
    auto what = [&] {
      return describe("all_reduce of " + std::to_string(count) + " " +
                      std::string(dtype_name(dtype)));
    };
    char* bytes = static_cast<char*>(data);
    if (count * elem <= kDirectBytes) {
      // Small buffers: every process sends its whole buffer to every other one and sums them
      // all, one message step instead of two.
      const int n = as_count(count * elem, what);
      if (scratch_.size() < p * count * elem) scratch_.resize(p * count * elem);
      sources_.assign(p, nullptr);
      exchange(
          [&](std::size_t q) {
            char* from_q = scratch_.data() + q * count * elem;
            sources_[q] = from_q;
            return Message{from_q, n, bytes, n};
          },
          kTagReduce, what);
      sources_[me] = bytes;
      sum_into(bytes, count, dtype);
      return;
    }
    // Reduce-scatter: process q's slice `me` lands at scratch[q * mine]; this process sums its
    // slice; then the slices are all-gathered in place.
    const std::size_t per = (count + p - 1) / p;
    auto begin_of = [&](std::size_t q) { return std::min(count, per * q); };
    auto len_of = [&](std::size_t q) { return std::min(count, begin_of(q) + per) - begin_of(q); };
    const std::size_t mine = len_of(me);
    if (scratch_.size() < p * mine * elem) scratch_.resize(p * mine * elem);
    sources_.assign(p, nullptr);
    exchange(
        [&](std::size_t q) {
          char* from_q = scratch_.data() + q * mine * elem;
          sources_[q] = from_q;
          return Message{from_q, as_count(mine * elem, what), bytes + begin_of(q) * elem,
                         as_count(len_of(q) * elem, what)};
        },
        kTagReduce, what);
    sources_[me] = bytes + begin_of(me) * elem;
    sum_into(bytes + begin_of(me) * elem, mine, dtype);
    exchange(
        [&](std::size_t q) {
          return Message{bytes + begin_of(q) * elem, as_count(len_of(q) * elem, what),
                         bytes + begin_of(me) * elem, as_count(mine * elem, what)};
        },
        kTagGather, what);
  }

  void all_gather(int rank, const void* in, void* out, std::size_t outer,
                  std::size_t inner_bytes) override {
    timeline::Span span("all_gather", "collective", rank + 1);
    enter(rank, "all_gather");
    const auto p = static_cast<std::size_t>(size_);
    const auto me = static_cast<std::size_t>(rank_);
    const std::size_t slab = outer * inner_bytes;
    note("all_gather", p * slab);
    auto what = [&] { return describe("all_gather of " + std::to_string(slab) + " bytes"); };
    const int n = as_count(slab, what);
    // outer == 1: the ranks' slabs are consecutive in `out` already.
    char* dst = static_cast<char*>(out);
    if (outer != 1) {
      if (scratch_.size() < p * slab) scratch_.resize(p * slab);
      dst = scratch_.data();
    }
    exchange(
        [&](std::size_t q) {
          return Message{dst + q * slab, n, const_cast<void*>(in), n};
        },
        kTagAllGather, what);
    if (dst + me * slab != in) std::memcpy(dst + me * slab, in, slab);
    if (outer != 1) {
      auto* o = static_cast<char*>(out);
      for (std::size_t i = 0; i < outer; ++i) {
        for (std::size_t q = 0; q < p; ++q) {
          std::memcpy(o + (i * p + q) * inner_bytes, scratch_.data() + q * slab + i * inner_bytes,
                      inner_bytes);
        }
      }
    }
  }

  void barrier(int rank) override {
    enter(rank, "barrier");
    MPI_Request req = MPI_REQUEST_NULL;
    {
      std::lock_guard lock(mpi_mutex());
      check(MPI_Ibarrier(comm_, &req), "MPI_Ibarrier");
    }
    wait(req, timeout_s_, [&] { return describe("barrier"); });
  }

  // A rank of this process failed mid-forward: the peers are now in a collective this process
  // will not join, so the processes are out of step for good. The peers time out; at exit the
  // job is aborted.
  void abort() override { state().broken = true; }
  void reset() override {}

 private:
  void enter(int rank, const char* call) const {
    if (rank != rank_) {
      throw InvalidArgument(std::string("MPI communicator: ") + call + " called for rank " +
                            std::to_string(rank) + ", but this process runs rank " +
                            std::to_string(rank_));
    }
    if (state().broken.load()) {
      throw CollectiveError(
          describe(call) +
          " refused: an earlier collective of this process failed or timed out, so the "
          "processes are out of step; the job must be restarted");
    }
  }
  std::string describe(const std::string& what) const {
    return "[mpi] " + what + " on rank " + std::to_string(rank_) + " (process " +
           std::to_string(rank_) + " of " + std::to_string(size_) + ")";
  }

  /// What this process receives from peer q and sends to it.
  struct Message {
    void* recv;
    int recv_bytes;
    void* send;
    int send_bytes;
  };

  /// One message step: for every peer q, receives and sends what `message(q)` says (tagged
  /// `tag`), and waits for all of it.
  template <class MessageOf, class What>
  void exchange(const MessageOf& message, int tag, const What& what) {
    requests_.clear();
    {
      std::lock_guard lock(mpi_mutex());
      for (int q = 0; q < size_; ++q) {
        if (q == rank_) continue;
        const Message m = message(static_cast<std::size_t>(q));
        requests_.push_back(MPI_REQUEST_NULL);
        check(MPI_Irecv(m.recv, m.recv_bytes, MPI_BYTE, q, tag, comm_, &requests_.back()),
              "MPI_Irecv");
        requests_.push_back(MPI_REQUEST_NULL);
        check(MPI_Isend(m.send, m.send_bytes, MPI_BYTE, q, tag, comm_, &requests_.back()),
              "MPI_Isend");
      }
    }
    wait_all(requests_.data(), static_cast<int>(requests_.size()), timeout_s_, what);
  }

  /// out[i] := the sum over the ranks of sources_[q][i], in rank order (the arithmetic every
  /// communicator shares: sum_in_rank_order).
  void sum_into(void* out, std::size_t n, DType dtype) const {
    sum_in_rank_order(sources_.data(), sources_.size(), out, n, dtype);
  }

  /// Up to this many bytes an all-reduce sends the whole buffer to every peer (one step);
  /// above, it is a reduce-scatter and an all-gather (2(P-1)/P of the buffer sent, two steps).
  /// Measured with devpipe_mpi_bench on Open MPI 4.1's shared-memory transport: a message
  /// below its 4 KiB eager limit goes in one copy, a larger one needs a handshake first, so a
  /// 4 KiB buffer is faster as two steps of 2 KiB messages than as one 4 KiB message.
  static constexpr std::size_t kDirectBytes = 2048;
  static constexpr int kTagReduce = 1, kTagGather = 2, kTagAllGather = 3;

  MPI_Comm comm_;
  int size_;
  int rank_;
  double timeout_s_;
  std::vector<MPI_Request> requests_;
  std::vector<const void*> sources_;  // per rank: where its contribution to a sum lies
  std::vector<char> scratch_;  // grows to the largest collective, then stays
  std::unique_ptr<OwnedComm> owned_;  // comm_'s owner
};

/// tp = k * P ranks, k per process: the process's ranks meet in shared memory, and its first
/// rank (the leader) moves every local rank's data through MPI. The all-reduce gives every
/// process the k contributions of every process for its slice of the elements (MPI_Ialltoallv),
/// sums them over all tp ranks in rank order in float32 (the thread mode's arithmetic, bit for
/// bit), then all-gathers the reduced slices; the leader writes the result to every local rank.
class GroupCommunicator final : public Communicator {
 public:
  GroupCommunicator(std::unique_ptr<OwnedComm> comm, int processes, int process, int k, double timeout_s)
      : comm_(comm->get()),
        processes_(processes),
        process_(process),
        k_(k),
        timeout_s_(timeout_s),
        local_(make_local_communicator(k)),
        slots_(static_cast<std::size_t>(k)),
        cslots_(static_cast<std::size_t>(k)),
        counts_(static_cast<std::size_t>(processes)),
        displs_(static_cast<std::size_t>(processes)),
        rcounts_(static_cast<std::size_t>(processes)),
        rdispls_(static_cast<std::size_t>(processes)),
        owned_(std::move(comm)) {}

  int size() const override { return processes_ * k_; }

  void all_reduce_sum(int rank, void* data, std::size_t count, DType dtype) override {
    timeline::Span span("all_reduce", "collective", rank + 1);
    const int l = local_index(rank, "all_reduce");
    slots_[static_cast<std::size_t>(l)] = data;
    local_->barrier(l);
    std::exception_ptr failed;
    if (l == 0) {
      try {
        leader_all_reduce(count, dtype);
      } catch (...) {
        failed = std::current_exception();
        local_->abort();  // the other local ranks leave the barrier below with an error
      }
    }
    if (failed) std::rethrow_exception(failed);
    local_->barrier(l);
  }

  void all_gather(int rank, const void* in, void* out, std::size_t outer, std::size_t inner_bytes) override {
    timeline::Span span("all_gather", "collective", rank + 1);
    const int l = local_index(rank, "all_gather");
    cslots_[static_cast<std::size_t>(l)] = in;
    local_->barrier(l);
    const std::size_t slab = outer * inner_bytes;
    const auto tp = static_cast<std::size_t>(size());
    std::exception_ptr failed;
    if (l == 0) {
      try {
        auto what = [&] { return describe("all_gather of " + std::to_string(slab) + " bytes"); };
        enter("all_gather");
        const std::size_t mine = static_cast<std::size_t>(k_) * slab;
        if (send_.size() < mine) send_.resize(mine);
        for (int j = 0; j < k_; ++j) {
          std::memcpy(send_.data() + static_cast<std::size_t>(j) * slab, cslots_[static_cast<std::size_t>(j)], slab);
        }
        if (scratch_.size() < tp * slab) scratch_.resize(tp * slab);
        const int n = as_count(mine, what);
        MPI_Request req = MPI_REQUEST_NULL;
        {
          std::lock_guard lock(mpi_mutex());
          check(MPI_Iallgather(send_.data(), n, MPI_BYTE, scratch_.data(), n, MPI_BYTE, comm_, &req),
                "MPI_Iallgather");
        }
        wait(req, timeout_s_, what);
      } catch (...) {
        failed = std::current_exception();
        local_->abort();
      }
    }
    if (failed) std::rethrow_exception(failed);
    local_->barrier(l);  // scratch_ holds [tp][slab]: every local rank lays out its own output
    auto* o = static_cast<char*>(out);
    for (std::size_t i = 0; i < outer; ++i) {
      for (std::size_t q = 0; q < tp; ++q) {
        std::memcpy(o + (i * tp + q) * inner_bytes, scratch_.data() + q * slab + i * inner_bytes, inner_bytes);
      }
    }
    local_->barrier(l);  // every local rank has read scratch_ before the next collective rewrites it
  }

  void barrier(int rank) override {
    const int l = local_index(rank, "barrier");
    local_->barrier(l);
    std::exception_ptr failed;
    if (l == 0) {
      try {
        enter("barrier");
        MPI_Request req = MPI_REQUEST_NULL;
        {
          std::lock_guard lock(mpi_mutex());
          check(MPI_Ibarrier(comm_, &req), "MPI_Ibarrier");
        }
        wait(req, timeout_s_, [&] { return describe("barrier"); });
      } catch (...) {
        failed = std::current_exception();
        local_->abort();
      }
    }
    if (failed) std::rethrow_exception(failed);
    local_->barrier(l);
  }

  // A local rank failed: the local peers are released (they throw), and the processes are out
  // of step for good (see MpiCommunicator::abort).
  void abort() override {
    state().broken = true;
    local_->abort();
  }
  void reset() override { local_->reset(); }

  /// The process's ranks meet in the local communicator's barriers: they help each other there
  /// as ranks of a thread-mode group do (the leader, waiting on MPI, does not).
  HelpBoard* help_board() override { return local_->help_board() != nullptr ? &board_ : nullptr; }

 private:
  /// The local communicator's board in this communicator's rank numbering.
  class LocalBoard final : public HelpBoard {
   public:
    explicit LocalBoard(GroupCommunicator& g) : g_(g) {}
    int helpers() const override { return g_.k_ - 1; }
    void post(int rank, HelpJob* job) override { g_.local_->help_board()->post(g_.local_index(rank, "post"), job); }
    void withdraw(int rank) override { g_.local_->help_board()->withdraw(g_.local_index(rank, "withdraw")); }
    std::int64_t helped() const override { return g_.local_->help_board()->helped(); }

   private:
    GroupCommunicator& g_;
  };

  int local_index(int rank, const char* call) const {
    const int l = rank - process_ * k_;
    if (l < 0 || l >= k_) {
      throw InvalidArgument(std::string("MPI communicator: ") + call + " called for rank " + std::to_string(rank) +
                            ", but this process runs ranks " + std::to_string(process_ * k_) + " to " +
                            std::to_string(process_ * k_ + k_ - 1));
    }
    return l;
  }
  void enter(const char* call) const {
    if (state().broken.load()) {
      throw CollectiveError(describe(call) +
                            " refused: an earlier collective of this process failed or timed out, so the "
                            "processes are out of step; the job must be restarted");
    }
  }
  std::string describe(const std::string& what) const {
    return "[mpi] " + what + " on ranks " + std::to_string(process_ * k_) + " to " +
           std::to_string(process_ * k_ + k_ - 1) + " (process " + std::to_string(process_) + " of " +
           std::to_string(processes_) + ")";
  }

  void leader_all_reduce(std::size_t count, DType dtype) {
    auto what = [&] {
      return describe("all_reduce of " + std::to_string(count) + " " + std::string(dtype_name(dtype)));
    };
    enter("all_reduce");
    const std::size_t elem = dtype_size(dtype);
    const auto p = static_cast<std::size_t>(processes_);
    const auto k = static_cast<std::size_t>(k_);
    // Slices by process (any partition gives the same sums; this one keeps each process's
    // share contiguous).
    const std::size_t per = (count + p - 1) / p;
    auto begin_of = [&](std::size_t q) { return std::min(count, per * q); };
    auto len_of = [&](std::size_t q) { return std::min(count, begin_of(q) + per) - begin_of(q); };
    const auto me = static_cast<std::size_t>(process_);
    const std::size_t mine = len_of(me);
    // Send buffer: for each destination q, the k local contributions to slice q.
    if (send_.size() < k * count * elem) send_.resize(k * count * elem);
    std::size_t off = 0;
    for (std::size_t q = 0; q < p; ++q) {
      counts_[q] = as_count(k * len_of(q) * elem, what);
      displs_[q] = as_count(off, what);
      for (std::size_t j = 0; j < k; ++j) {
        std::memcpy(send_.data() + off, static_cast<const char*>(slots_[j]) + begin_of(q) * elem, len_of(q) * elem);
        off += len_of(q) * elem;
      }
      rcounts_[q] = as_count(k * mine * elem, what);
      rdispls_[q] = as_count(q * k * mine * elem, what);
    }
    if (scratch_.size() < p * k * mine * elem) scratch_.resize(p * k * mine * elem);
    MPI_Request req = MPI_REQUEST_NULL;
    {
      std::lock_guard lock(mpi_mutex());
      check(MPI_Ialltoallv(send_.data(), counts_.data(), displs_.data(), MPI_BYTE, scratch_.data(), rcounts_.data(),
                           rdispls_.data(), MPI_BYTE, comm_, &req),
            "MPI_Ialltoallv");
    }
    wait(req, timeout_s_, what);
    // scratch_ holds, for r = q * k + j, rank r's elements of this process's slice: sum them in
    // rank order.
    const std::size_t tp = p * k;
    sources_.resize(tp);
    for (std::size_t r = 0; r < tp; ++r) sources_[r] = scratch_.data() + r * mine * elem;
    sum_in_rank_order(sources_.data(), tp, static_cast<char*>(slots_[0]) + begin_of(me) * elem,
                      mine, dtype);
    // All-gather of the reduced slices into the leader's buffer, then to the other local ranks.
    for (std::size_t q = 0; q < p; ++q) {
      counts_[q] = as_count(len_of(q) * elem, what);
      displs_[q] = as_count(begin_of(q) * elem, what);
    }
    {
      std::lock_guard lock(mpi_mutex());
      check(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_BYTE, slots_[0], counts_.data(), displs_.data(), MPI_BYTE, comm_,
                            &req),
            "MPI_Iallgatherv");
    }
    wait(req, timeout_s_, what);
    for (std::size_t j = 1; j < k; ++j) std::memcpy(slots_[j], slots_[0], count * elem);
  }

  MPI_Comm comm_;
  int processes_, process_, k_;
  double timeout_s_;
  std::unique_ptr<Communicator> local_;
  LocalBoard board_{*this};
  std::vector<void*> slots_;
  std::vector<const void*> cslots_;
  std::vector<int> counts_, displs_, rcounts_, rdispls_;
  std::vector<const void*> sources_;  // per rank: where its contribution to a sum lies
  std::vector<char> send_, scratch_;  // grow to the largest collective, then stay
  std::unique_ptr<OwnedComm> owned_;  // comm_'s owner
};

}  // namespace

std::pair<int, int> init(double timeout_s) {
  static std::once_flag once;
  std::call_once(once, [timeout_s] {
    State& s = state();
    std::lock_guard lock(mpi_mutex());
    int initialised = 0;
    MPI_Initialized(&initialised);
    if (!initialised) {
      int provided = 0;
      int code = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
      if (code != MPI_SUCCESS)
        throw CollectiveError("MPI_Init_thread failed: " + mpi_error_text(code));
      s.we_initialised = true;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &s.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &s.size);
    // Errors come back as codes (turned into exceptions), not as MPI's default abort.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    s.exit_timeout_s = timeout_s;
    MPI_Comm_dup(MPI_COMM_WORLD, &s.control);
    MPI_Comm_dup(MPI_COMM_WORLD, &s.exit);
    for (MPI_Comm& c : s.data) MPI_Comm_dup(MPI_COMM_WORLD, &c);
    MPI_Comm node = MPI_COMM_NULL;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, s.rank, MPI_INFO_NULL, &node) ==
        MPI_SUCCESS) {
      MPI_Comm_size(node, &s.local_size);
      MPI_Comm_free(&node);
    }
    std::atexit(at_exit);
  });
  return {state().rank, state().size};
}

int local_size() {
  init(0);
  return state().local_size;
}

void mark_out_of_step() { state().broken = true; }

std::unique_ptr<Communicator> make_communicator(DeviceKind kind, int tp_degree, double timeout_s) {
  const auto world_size = init(0);
  const int rank = world_size.first, size = world_size.second;
  if (tp_degree < size || tp_degree % size != 0) {
    throw ConfigError("an MPI communicator needs tp_degree a multiple of the " + std::to_string(size) +
                      " processes, got " + std::to_string(tp_degree));
  }
  if (state().broken.load()) {
    throw CollectiveError("[mpi] a communicator for " + std::string(device_kind_name(kind)) + " ranks of tp_degree " +
                          std::to_string(tp_degree) + " refused on process " + std::to_string(rank) + " of " +
                          std::to_string(size) + ": an earlier collective failed, the processes are out of step");
  }
  auto comm = std::make_unique<OwnedComm>(state().data[static_cast<int>(kind)], timeout_s, [&] {
    return "[mpi] making the communicator of the " + std::string(device_kind_name(kind)) + " ranks of tp_degree " +
           std::to_string(tp_degree) + " on process " + std::to_string(rank) + " of " + std::to_string(size);
  });
  if (tp_degree == size) return std::make_unique<MpiCommunicator>(std::move(comm), size, rank, timeout_s);
  return std::make_unique<GroupCommunicator>(std::move(comm), size, rank, tp_degree / size, timeout_s);
}

void broadcast_from_process0(void* data, std::size_t bytes, double timeout_s) {
  const auto world_size = init(0);
  const int rank = world_size.first, size = world_size.second;
  State& s = state();
  auto what = [&] {
    return "[mpi] broadcast of " + std::to_string(bytes) + " bytes from process 0, on process " +
           std::to_string(rank) + " of " + std::to_string(size);
  };
  if (s.broken.load()) {
    throw CollectiveError(what() + " refused: an earlier collective failed, the processes are out of step");
  }
  const int n = as_count(bytes, what);
  MPI_Request req = MPI_REQUEST_NULL;
  {
    std::lock_guard lock(mpi_mutex());
    check(MPI_Ibcast(data, n, MPI_BYTE, 0, s.control, &req), "MPI_Ibcast");
  }
  wait(req, timeout_s, what);
}

std::vector<std::string> all_gather_text(const std::string& text, double timeout_s) {
  const auto world_size = init(0);
  const int rank = world_size.first, size = world_size.second;
  State& s = state();
  auto what = [&] {
    return "[mpi] control-plane exchange on process " + std::to_string(rank) + " of " +
           std::to_string(size);
  };
  if (s.broken.load()) {
    throw CollectiveError(what() +
                          " refused: an earlier collective failed, the processes are out of step");
  }
  int len = as_count(text.size(), what);
  std::vector<int> lens(static_cast<std::size_t>(size));
  MPI_Request req = MPI_REQUEST_NULL;
  {
    std::lock_guard lock(mpi_mutex());
    check(MPI_Iallgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, s.control, &req),
          "MPI_Iallgather");
  }
  wait(req, timeout_s, what);
  std::vector<int> displs(static_cast<std::size_t>(size));
  std::size_t total = 0;
  for (std::size_t q = 0; q < lens.size(); ++q) {
    displs[q] = as_count(total, what);
    total += static_cast<std::size_t>(lens[q]);
  }
  std::string all(total, '\0');
  {
    std::lock_guard lock(mpi_mutex());
    check(MPI_Iallgatherv(text.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(),
                          MPI_CHAR, s.control, &req),
          "MPI_Iallgatherv");
  }
  wait(req, timeout_s, what);
  std::vector<std::string> out;
  for (std::size_t q = 0; q < lens.size(); ++q) {
    out.push_back(
        all.substr(static_cast<std::size_t>(displs[q]), static_cast<std::size_t>(lens[q])));
  }
  return out;
}

#endif

}  // namespace devpipe::mpi
