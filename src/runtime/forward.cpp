// ModelWrapper::forward and its machinery: jobs reused from one forward to the next, one task
// per rank, results handed out as ranked tensors or host tensors.
#include "devpipe/model_wrapper.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

#include "compiler/artifact.h"
#include "core/device_copy.h"
#include "core/pool.h"
#include "devpipe/error.h"
#include "devpipe/timeline.h"
#include "runtime/backend.h"
#include "runtime/rank_group.h"
#include "runtime/ranked_host.h"
#include "runtime/stats.h"
#include "runtime/stream.h"
#include "runtime/wrapper_impl.h"

namespace devpipe {

using namespace wrapper_detail;


namespace {

// ---- forward machinery: jobs reused from one forward to the next (no steady-state allocation)

/// One argument after ranked inputs are expanded to their outputs.
struct Arg {
  Tensor host;           // defined for host arguments (already in the stage dtype)
  RankedTensors ranked;  // non-empty for ranked arguments
  const detail::RankedData* data = nullptr;  // ranked's data (read without its checks once valid)
  int output = 0;        // which output of `ranked`
};

struct Chunk {
  std::int64_t begin;  // first row of the caller's batch
  std::int64_t rows;   // real rows in this chunk
  std::size_t bucket;  // bucket index
};

/// What rank r's task of one forward uses; touched by the forward thread only before the task
/// is queued.
struct RankWork {
  detail::EventState done;             // rank r's outputs are written (or its failure)
  std::unique_ptr<DeviceEvent> device_done;  // recorded after rank r's device work (cuda); made once
  TransferStats counts;                      // what rank r moved in this forward
  bool made_event = false;
  std::vector<const void*> in_ptrs;
  std::vector<void*> out_ptrs;
  std::vector<Tensor> temps;           // per-chunk input/output buffers (pooled), by index
  std::vector<std::pair<std::size_t, std::size_t>> staged;  // (output, temp index)
  Shape shape;                         // scratch
  Shape region;                        // scratch
};

/// Everything one forward needs. Jobs come from the wrapper's JobPool and go back to it when
/// the last reference goes (the returned RankedTensors / Output, the queued tasks); every
/// container keeps its capacity, so a steady state of forwards allocates nothing.
struct Job {
  // Set by the forward thread before the tasks are queued.
  const Manifest* manifest = nullptr;
  Backend* backend = nullptr;
  RankGroup* group = nullptr;
  std::vector<std::vector<std::unique_ptr<Executable>>>* executables = nullptr;
  const std::vector<std::vector<Shape>>* in_shapes = nullptr;   // [bucket][input]
  const std::vector<std::vector<Shape>>* out_shapes = nullptr;  // [bucket][output]
  const std::vector<std::vector<void*>>* state_ptrs = nullptr;  // [rank][state]
  const std::vector<Device>* rank_device = nullptr;             // [rank]: Impl::rank_device
  std::vector<std::int64_t> real;  // per named dim: the arguments' size (-1: none carries it)
  bool single = false;       // one chunk: outputs are the bucket itself
  bool host_result = false;  // forward() waits for `finished`, then copies to the host
  std::size_t num_args = 0;  // args[0, num_args) are this forward's
  std::vector<Arg> args;
  std::vector<Chunk> chunks;
  detail::RankedData result;    // outputs [rank][output] + rank events, handed out by aliasing
  std::vector<Tensor> host_out;  // host results
  TransferStats host_counts;     // what the forward thread moved (forwards = 1)
  TransferStats total;           // host results: every local rank's and the forward thread's
  std::vector<std::unique_ptr<RankWork>> ranks;
  Shape shape;  // scratch for the forward thread

  std::atomic<int> pending{0};  // tasks not finished
  detail::EventState finished;  // host_result: every task finished and let go of its references
  std::shared_ptr<Job> self;    // the queued tasks' reference; the last task drops it
  Job* next_free = nullptr;     // JobPool's free list

  Arg& arg(std::size_t i) {
    if (i == args.size()) args.emplace_back();
    return args[i];
  }

  /// Lets go of the inputs (upstream buffers and their jobs), keeping the handles' capacity.
  void drop_inputs() noexcept {
    for (Arg& a : args) {
      detail::TensorAccess::drop(a.host);
      a.ranked = RankedTensors();
      a.data = nullptr;
    }
  }

  /// Lets go of every buffer (back to the pools) before the job waits in the free list.
  void drop_all() noexcept {
    drop_inputs();
    for (auto& outs : result.per_rank) {
      for (Tensor& t : outs) detail::TensorAccess::drop(t);
    }
    for (Tensor& t : host_out) detail::TensorAccess::drop(t);
    for (auto& w : ranks) {
      for (Tensor& t : w->temps) detail::TensorAccess::drop(t);
    }
  }
};

}  // namespace

namespace wrapper_detail {

/// A wrapper's free jobs. Shared by the wrapper and every job handed out (their deleter brings
/// them back), so results may outlive the wrapper. The job a forward gave back last waits in a
/// one-job slot taken and filled with one atomic exchange, so a chain of forwards from one
/// thread, each letting go of the previous result, takes no lock; more free jobs wait in a
/// locked list.
class JobPool {
 public:
  JobPool() = default;
  JobPool(const JobPool&) = delete;
  JobPool& operator=(const JobPool&) = delete;
  ~JobPool() {
    delete spare_.load();
    while (head_) {
      Job* next = head_->next_free;
      delete head_;
      head_ = next;
    }
  }

  /// A free job (a new one when none is free), owned by the returned pointer; its control block
  /// comes from a pool allocator, so this allocates nothing in steady state.
  static std::shared_ptr<Job> acquire(const std::shared_ptr<JobPool>& pool) {
    Job* job = pool->spare_.exchange(nullptr, std::memory_order_acquire);
    if (!job) {
      std::lock_guard lock(pool->mu_);
      if (pool->head_) {
        job = pool->head_;
        pool->head_ = job->next_free;
        job->next_free = nullptr;
      }
    }
    if (!job) job = new Job();
    return std::shared_ptr<Job>(job, GiveBack{pool}, detail::PoolAllocator<Job>());
  }

 private:
  struct GiveBack {
    std::shared_ptr<JobPool> pool;
    void operator()(Job* job) const noexcept {
      job->drop_all();
      Job* empty = nullptr;
      if (pool->spare_.compare_exchange_strong(empty, job, std::memory_order_release, std::memory_order_relaxed)) {
        return;
      }
      std::lock_guard lock(pool->mu_);
      job->next_free = pool->head_;
      pool->head_ = job;
    }
  };

  std::atomic<Job*> spare_{nullptr};
  std::mutex mu_;
  Job* head_ = nullptr;
};

std::shared_ptr<JobPool> make_job_pool() { return std::make_shared<JobPool>(); }

}  // namespace wrapper_detail

namespace {

/// Bytes of one batch row of a tensor of `shape` with elements of `elem` bytes.
std::size_t row_bytes_of(const Shape& shape, std::size_t elem) {
  std::size_t n = elem;
  for (std::size_t k = 1; k < shape.dims().size(); ++k) n *= static_cast<std::size_t>(shape[k]);
  return n;
}

/// Bytes of one batch row of a tensor of `shape` (its bucket shape).
std::size_t bytes_per_row(const Shape& shape, DType dtype) { return row_bytes_of(shape, dtype_size(dtype)); }

/// Copies the region [0, region[0]) x [0, region[1]) x ... of `src` (shape src_shape, from
/// row src_row on) into `dst` (shape dst_shape, from row 0); every region dim fits both. With
/// `zero_rest`, dst outside the region is zeroed (padding). Returns the bytes copied. One copy
/// when only the rows differ (the batch-only case); else one per contiguous run.
std::size_t copy_region(Backend& be, void* dst, Device dst_dev, const Shape& dst_shape, const void* src,
                        Device src_dev, const Shape& src_shape, std::int64_t src_row, const Shape& region,
                        std::size_t elem, bool zero_rest) {
  const int n = region.rank();
  int k = 0;  // the innermost dim (>= 1) where the region is narrower than src or dst
  for (int d = n - 1; d >= 1; --d) {
    const auto du = static_cast<std::size_t>(d);
    if (region[du] != dst_shape[du] || region[du] != src_shape[du]) {
      k = d;
      break;
    }
  }
  const std::int64_t rows = region[0];
  if (k == 0) {
    const std::size_t row = row_bytes_of(dst_shape, elem);
    be.copy(dst, dst_dev, static_cast<const char*>(src) + static_cast<std::size_t>(src_row) * row, src_dev,
            static_cast<std::size_t>(rows) * row);
    if (zero_rest) {
      be.fill_zero(static_cast<char*>(dst) + static_cast<std::size_t>(rows) * row, dst_dev,
                   static_cast<std::size_t>(dst_shape[0] - rows) * row);
    }
    return static_cast<std::size_t>(rows) * row;
  }
  if (n > 8) throw Unsupported("padding along a named dim of a tensor of rank " + std::to_string(n) + " (at most 8)");
  if (zero_rest) be.fill_zero(dst, dst_dev, static_cast<std::size_t>(dst_shape.numel()) * elem);
  std::size_t inner = elem;  // bytes of one element of dim k
  for (int d = k + 1; d < n; ++d) inner *= static_cast<std::size_t>(region[static_cast<std::size_t>(d)]);
  const std::size_t block = static_cast<std::size_t>(region[static_cast<std::size_t>(k)]) * inner;
  std::int64_t idx[8] = {0};
  std::size_t copied = 0;
  const auto* s = static_cast<const char*>(src);
  auto* t = static_cast<char*>(dst);
  while (true) {
    // offsets of (idx[0..k-1], 0, ...) in src and dst
    std::size_t so = static_cast<std::size_t>(src_row + idx[0]), doff = static_cast<std::size_t>(idx[0]);
    for (int d = 1; d < k; ++d) {
      const auto du = static_cast<std::size_t>(d);
      so = so * static_cast<std::size_t>(src_shape[du]) + static_cast<std::size_t>(idx[d]);
      doff = doff * static_cast<std::size_t>(dst_shape[du]) + static_cast<std::size_t>(idx[d]);
    }
    so *= static_cast<std::size_t>(src_shape[static_cast<std::size_t>(k)]) * inner;
    doff *= static_cast<std::size_t>(dst_shape[static_cast<std::size_t>(k)]) * inner;
    be.copy(t + doff, dst_dev, s + so, src_dev, block);
    copied += block;
    int d = k - 1;
    while (d >= 0 && ++idx[d] == region[static_cast<std::size_t>(d)]) idx[d--] = 0;
    if (d < 0) break;
  }
  return copied;
}

/// Rank r's share of a forward: every chunk through the rank's executable.
void run_chunks(Job& job, RankWork& w, int r) {
  const Manifest& m = *job.manifest;
  Backend& be = *job.backend;
  const std::string& tag = job.result.producer;
  const Device dev = (*job.rank_device)[static_cast<std::size_t>(r)];
  const bool host_shared = be.device_memory_is_host();
  const std::size_t nargs = job.num_args;
  const auto ru = static_cast<std::size_t>(r);
  std::vector<Tensor>& out = job.result.per_rank[ru];
  const std::vector<void*>& states = (*job.state_ptrs)[ru];
  w.counts = TransferStats();

  Executable& first = *(*job.executables)[job.chunks.front().bucket][ru];
  if (!w.made_event) {  // once per rank of this job: the event is reused from then on
    w.device_done = first.create_event();
    w.done.set_device(w.device_done.get());
    w.made_event = true;
  }
  for (std::size_t i = 0; i < nargs; ++i) {
    const Arg& a = job.args[i];
    if (a.ranked.empty()) continue;
    // The producer's task has queued its work (its failure propagates here); this rank's queue
    // waits for the producer's device event, the host does not.
    const detail::EventState& ready = *a.data->ready[static_cast<std::size_t>(r)];
    ready.wait_queued();
    if (DeviceEvent* e = ready.device()) first.wait(*e);
  }
  w.in_ptrs.resize(nargs + states.size());
  for (std::size_t k = 0; k < states.size(); ++k) w.in_ptrs[nargs + k] = states[k];
  w.out_ptrs.resize(m.outputs.size());
  std::size_t used = 0;  // temps holding buffers of the current chunk
  for (const Chunk& c : job.chunks) {
    const std::int64_t bsz = m.buckets[c.bucket].batch;
    const std::vector<Shape>& in_shapes = (*job.in_shapes)[c.bucket];
    const std::vector<Shape>& out_shapes = (*job.out_shapes)[c.bucket];
    for (std::size_t k = 0; k < used; ++k) detail::TensorAccess::drop(w.temps[k]);
    used = 0;
    // A pooled buffer of the bucket's shape for this chunk.
    auto temp = [&](const Shape& shape, DType dtype) -> std::size_t {
      if (used == w.temps.size()) w.temps.emplace_back();
      be.allocate_into(w.temps[used], shape, dtype, dev);
      return used++;
    };
    // The chunk's rows of `src` copied into a fresh bucket-shaped buffer, the padding zeroed.
    auto copy_padded = [&](const StageIO& spec, const Shape& bucket, const Tensor& src) -> std::pair<const void*, std::size_t> {
      void* buf = w.temps[temp(bucket, spec.dtype)].raw_data();
      w.region = src.shape();
      w.region[0] = c.rows;
      std::size_t bytes = copy_region(be, buf, dev, bucket, src.raw_data(), src.device(), src.shape(), c.begin,
                                      w.region, dtype_size(spec.dtype), true);
      return {buf, bytes};
    };
    // Whether t's dims past the batch are the bucket's (no padding but along the batch).
    auto same_sample = [](const Shape& t, const Shape& bucket) {
      for (std::size_t k = 1; k < bucket.dims().size(); ++k) {
        if (t[k] != bucket[k]) return false;
      }
      return true;
    };
    for (std::size_t i = 0; i < nargs; ++i) {
      const Arg& a = job.args[i];
      const StageIO& spec = m.inputs[i];
      const Shape& bucket = in_shapes[i];
      const std::size_t row_bytes = bytes_per_row(bucket, spec.dtype);
      if (!a.ranked.empty()) {
        const Tensor& t = a.data->per_rank[ru][static_cast<std::size_t>(a.output)];
        if (t.shape()[0] >= c.begin + bsz && same_sample(t.shape(), bucket)) {
          w.in_ptrs[i] = static_cast<const char*>(t.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes;
          stats::add(stats::kInPlace);
          ++w.counts.ranked_inputs_in_place;
          timeline::instant("ranked hand-off (in place)", "handoff", r + 1);
          continue;
        }
        auto [ptr, bytes] = copy_padded(spec, bucket, t);
        w.in_ptrs[i] = ptr;
        stats::add(stats::kD2d, bytes);
        stats::add(stats::kCopied);
        w.counts.device_to_device_bytes += bytes;
        ++w.counts.ranked_inputs_copied;
        timeline::instant("ranked hand-off (re-padded on device)", "handoff", r + 1);
      } else if (host_shared && c.rows == bsz && a.host.device().is_host() && same_sample(a.host.shape(), bucket)) {
        // The rank's device memory is host memory and no padding is needed: read in place.
        w.in_ptrs[i] = static_cast<const char*>(a.host.raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes;
        stats::add(stats::kHostInPlace);
        ++w.counts.host_inputs_in_place;
      } else {
        auto [ptr, bytes] = copy_padded(spec, bucket, a.host);
        w.in_ptrs[i] = ptr;
        stats::add(stats::kH2d, bytes);
        w.counts.host_to_device_bytes += bytes;
      }
    }
    // outputs: straight into the result when the chunk fills its bucket rows
    w.staged.clear();
    for (std::size_t o = 0; o < m.outputs.size(); ++o) {
      const StageIO& spec = m.outputs[o];
      const std::size_t row_bytes = bytes_per_row(out_shapes[o], spec.dtype);
      if (job.single || c.rows == bsz) {
        w.out_ptrs[o] = static_cast<char*>(out[o].raw_data()) + (job.single ? 0 : static_cast<std::size_t>(c.begin) * row_bytes);
      } else {
        std::size_t k = temp(out_shapes[o], spec.dtype);
        w.out_ptrs[o] = w.temps[k].raw_data();
        w.staged.emplace_back(o, k);
      }
    }
    {
      timeline::Span run_span(tag.c_str(), "compute", r + 1);
      (*job.executables)[c.bucket][ru]->run(w.in_ptrs, w.out_ptrs);
    }
    for (const auto& [o, k] : w.staged) {
      const StageIO& spec = m.outputs[o];
      const std::size_t row_bytes = bytes_per_row(out_shapes[o], spec.dtype);
      be.copy(static_cast<char*>(out[o].raw_data()) + static_cast<std::size_t>(c.begin) * row_bytes, dev,
              w.temps[k].raw_data(), dev, static_cast<std::size_t>(c.rows) * row_bytes);
      stats::add(stats::kD2d, static_cast<std::size_t>(c.rows) * row_bytes);
      w.counts.device_to_device_bytes += static_cast<std::size_t>(c.rows) * row_bytes;
    }
  }
  // The outputs are ready when the device has run everything queued so far.
  if (w.device_done) (*job.executables)[job.chunks.back().bucket][ru]->record(*w.device_done);
}

/// The stream task of rank r (context: the Job). Never throws: a failure is signalled on the
/// rank's event and aborts the communicator so that peers blocked in a collective return.
void run_rank(void* context, int r) {
  Job& job = *static_cast<Job*>(context);
  RankWork& w = *job.ranks[static_cast<std::size_t>(r)];
  std::exception_ptr error;
  {
    timeline::Span stage_span(job.result.producer.c_str(), "stage", r + 1);
    try {
      run_chunks(job, w, r);
    } catch (const std::exception&) {
      error = std::current_exception();
    } catch (...) {
      error = std::make_exception_ptr(Error(prefix(job.result.producer) + "rank " + std::to_string(r) + " failed"));
    }
  }
  for (Tensor& t : w.temps) detail::TensorAccess::drop(t);
  if (error) job.group->mark_failed();
  w.done.signal(error);

  // The count only falls, one decrement per task: reading 1 means this is the last task and the
  // others' decrements (releases) are seen, so the one task of a `once` forward takes no locked
  // instruction here. (Reset per forward, the count is read by nothing else.)
  if (job.pending.load(std::memory_order_acquire) != 1 &&
      job.pending.fetch_sub(1, std::memory_order_acq_rel) != 1) {
    return;
  }
  // The last task of the forward: let go of the inputs and of the tasks' reference.
  job.drop_inputs();
  if (job.host_result) {
    // forward() holds a reference while it waits on `finished`: this is not the last one, and
    // once forward() wakes every reference but its own is gone (deterministic reuse).
    std::shared_ptr<Job>().swap(job.self);
    job.finished.signal();
  } else {
    std::shared_ptr<Job> last = std::move(job.self);  // may return the job to its pool
  }
}

}  // namespace

// ------------------------------------------------------------------------------ forward

// The hot path: in steady state forward() makes no heap allocation. The per-forward state (the
// argument list, chunk plan, per-rank outputs, events and pointer arrays) lives in a Job reused
// from the wrapper's pool; output buffers come from the backend's caching pool into reused
// tensor handles; each rank gets a plain StreamTask; the RankedTensors / Output returned alias
// the job. Errors (exceptions, messages) may allocate: they are not the hot path.
Output ModelWrapper::forward(const std::vector<Input>& inputs) { return forward_loaded(inputs); }

Output ModelWrapper::forward(std::initializer_list<Input> inputs) {
  return forward_loaded(std::span<const Input>(inputs.begin(), inputs.size()));
}

Output ModelWrapper::forward_loaded(std::span<const Input> inputs) {
  CallGuard guard(calls_in_flight_, loading_, options_.tag, "forward()");
  if (!impl_) {
    throw StateError(prefix(options_.tag) +
                     "forward() called before load(): compile(path) and load(path) the model first");
  }
  return run_forward(*impl_, inputs);
}

Output ModelWrapper::run_forward(Impl& im, std::span<const Input> inputs) {
  const std::string& tag = options_.tag;
  const Manifest& m = im.manifest;
  const int tp = m.tp_degree;
  const auto tpu = static_cast<std::size_t>(tp);
  // The ranks this process runs (all of them in thread mode; one per process under MPI).
  const std::vector<int>& local = im.group->ranks();
  const int first = local.front();
  Backend& be = *im.backend;
  im.group->recover_if_failed();
  stats::add(stats::kForwards);
  timeline::Span host_span(tag.c_str(), "host", 0);

  std::shared_ptr<Job> held = JobPool::acquire(im.jobs);
  Job& job = *held;
  if (!job.manifest) {  // a new job: what every forward of this load shares (im.jobs is per load)
    job.manifest = &m;
    job.backend = &be;
    job.group = im.group.get();
    job.executables = &im.executables;
    job.in_shapes = &im.in_shapes;
    job.out_shapes = &im.out_shapes;
    job.state_ptrs = &im.state_ptrs;
    job.rank_device = &im.rank_device;
    job.result.producer = tag;
    job.result.bucket.dims = im.named;
  }
  job.real.assign(im.named.size(), -1);

  // ---- expand and validate the arguments
  // The tasks run after forward() returns: the job holds its own references to the inputs.
  std::size_t nargs = 0;
  for (const Input& in : inputs) {
    if (in.is_ranked()) {
      const RankedTensors& rt = in.ranked();
      const int outputs = rt.num_outputs();
      for (int k = 0; k < outputs; ++k) {
        Arg& a = job.arg(nargs++);
        detail::TensorAccess::drop(a.host);
        a.ranked = rt;
        a.data = rt.data_.get();
        a.output = k;
      }
    } else {
      Arg& a = job.arg(nargs++);
      a.host = in.tensor();
      a.ranked = RankedTensors();
      a.data = nullptr;
      a.output = 0;
    }
  }
  job.num_args = nargs;
  auto arg_name = [&](std::size_t i) {
    return "argument " + std::to_string(i) + " ('" + (i < m.inputs.size() ? m.inputs[i].name : std::string("?")) + "')";
  };
  // "[32, seq, 64]" for messages (the batch's size, or "batch" when < 0); sample_text:
  // "[seq, 64]".
  auto dims_text = [](const StageIO& spec) {
    std::string s;
    for (std::size_t k = 0; k < spec.sample_shape.dims().size(); ++k) {
      s += (k ? ", " : "") +
           (k < spec.dims.size() && !spec.dims[k].empty() ? spec.dims[k] : std::to_string(spec.sample_shape[k]));
    }
    return s;
  };
  auto spec_text = [&](const StageIO& spec, std::int64_t batch) {
    std::string d = dims_text(spec);
    return "[" + (batch >= 0 ? std::to_string(batch) : std::string("batch")) + (d.empty() ? "" : ", " + d) + "]";
  };
  auto sample_text = [&](const StageIO& spec) { return "[" + dims_text(spec) + "]"; };
  // Whether `t` is [rows, sample...] with the fixed dims of `spec` (named dims any size >= 1).
  auto fits = [](const StageIO& spec, const Shape& t) {
    const auto& sd = spec.sample_shape.dims();
    if (t.dims().size() != sd.size() + 1) return false;
    for (std::size_t k = 0; k < sd.size(); ++k) {
      if (sd[k] < 0 ? t[k + 1] < 1 : t[k + 1] != sd[k]) return false;
    }
    return true;
  };
  if (nargs != m.inputs.size()) {
    std::string want;
    for (const auto& io : m.inputs) want += (want.empty() ? "" : ", ") + io.name + " " + spec_text(io, -1);
    throw InvalidArgument(prefix(tag) + "forward() got " + std::to_string(nargs) + " input(s), expected " +
                          std::to_string(m.inputs.size()) + " (" + want +
                          "); a ranked argument counts as its " + "number of outputs");
  }
  std::int64_t batch = -1;
  for (std::size_t i = 0; i < nargs; ++i) {
    Arg& a = job.args[i];
    const StageIO& spec = m.inputs[i];
    std::int64_t rows;
    const Shape* shape = nullptr;
    if (!a.ranked.empty()) {
      const RankedTensors& r = a.ranked;
      if (r.num_ranks() != tp) {
        throw InvalidArgument(prefix(tag) + arg_name(i) + ": ranked tensors from '" + r.producer() + "' have " +
                              std::to_string(r.num_ranks()) + " ranks, this stage has tp_degree " + std::to_string(tp));
      }
      for (int rk : local) {
        const std::vector<Tensor>& outs = a.data->per_rank[static_cast<std::size_t>(rk)];
        // operator[] names a rank of another process (outs empty); a local rank has them all
        const Tensor& t = (outs.empty() ? r[rk] : outs)[static_cast<std::size_t>(a.output)];
        const Device want = im.rank_device[static_cast<std::size_t>(rk)];
        if (t.device() != want) {
          throw InvalidArgument(prefix(tag) + arg_name(i) + ": rank " + std::to_string(rk) + "'s tensor from '" +
                                r.producer() + "' lives on " + t.device().to_string() + ", this stage's rank " +
                                std::to_string(rk) + " runs on " + want.to_string());
        }
        if (t.dtype() != spec.dtype) {
          throw DTypeError(prefix(tag) + arg_name(i) + ": ranked tensor from '" + r.producer() + "' is " +
                           std::string(dtype_name(t.dtype())) + ", expected " + std::string(dtype_name(spec.dtype)));
        }
        if (!fits(spec, t.shape()) || t.shape()[0] < r.real_batch()) {
          throw ShapeError(prefix(tag) + arg_name(i) + ": ranked tensor from '" + r.producer() + "' has shape " +
                           t.shape().to_string() + ", expected " + spec_text(spec, r.real_batch()) + " (batch x " +
                           sample_text(spec) + ")");
        }
      }
      rows = r.real_batch();
      shape = &a.data->per_rank[static_cast<std::size_t>(first)][static_cast<std::size_t>(a.output)].shape();
    } else {
      if (!a.host.defined()) throw InvalidArgument(prefix(tag) + arg_name(i) + " is an undefined tensor");
      if (!fits(spec, a.host.shape())) {
        throw ShapeError(prefix(tag) + arg_name(i) + " has shape " + a.host.shape().to_string() + ", expected " +
                         spec_text(spec, a.host.rank() >= 1 ? a.host.shape()[0] : 1) + " (batch x " +
                         sample_text(spec) + ")");
      }
      if (a.host.dtype() != spec.dtype) {
        if (!is_floating(a.host.dtype()) || !is_floating(spec.dtype)) {
          throw DTypeError(prefix(tag) + arg_name(i) + " is " + std::string(dtype_name(a.host.dtype())) +
                           ", expected " + std::string(dtype_name(spec.dtype)));
        }
        a.host = a.host.to_host().to_dtype(spec.dtype);  // a conversion allocates
      }
      rows = a.host.shape()[0];
      shape = &a.host.shape();
    }
    if (rows < 1) throw ShapeError(prefix(tag) + arg_name(i) + " has an empty batch");
    if (batch >= 0 && rows != batch) {
      throw ShapeError(prefix(tag) + arg_name(i) + " has batch " + std::to_string(rows) + " but earlier arguments have batch " +
                       std::to_string(batch));
    }
    batch = rows;
    const std::vector<int>& named = im.in_named[i];
    for (std::size_t k = 0; k < named.size(); ++k) {
      if (named[k] < 0) continue;
      const std::int64_t size = (*shape)[k + 1];
      std::int64_t& real = job.real[static_cast<std::size_t>(named[k])];
      if (real >= 0 && real != size) {
        throw ShapeError(prefix(tag) + arg_name(i) + " has " + im.named[static_cast<std::size_t>(named[k])] + " " +
                         std::to_string(size) + " (dim " + std::to_string(k + 1) + ") but earlier arguments have " +
                         im.named[static_cast<std::size_t>(named[k])] + " " + std::to_string(real));
      }
      real = size;
    }
  }

  // ---- plan chunks: the smallest size of every named dim that fits, then the smallest batch
  // bucket that fits, or chunks of the largest
  job.chunks.clear();
  {
    const std::size_t nb = m.buckets.size();
    // The named sizes wanted, as the index of the first bucket that has all of them.
    std::size_t want = 0;
    if (im.has_named) {
      bool found = false;
      for (std::size_t k = 0; k < nb && !found; ++k) {
        bool ok = true;
        for (std::size_t d = 0; d < im.named.size() && ok; ++d) ok = im.bucket_named[k][d] >= std::max<std::int64_t>(job.real[d], 1);
        if (!ok) continue;
        // the smallest such sizes: no other fitting bucket is smaller in any named dim
        bool smallest = true;
        for (std::size_t j = 0; j < nb && smallest; ++j) {
          bool fits_j = true, smaller = false;
          for (std::size_t d = 0; d < im.named.size(); ++d) {
            fits_j = fits_j && im.bucket_named[j][d] >= std::max<std::int64_t>(job.real[d], 1);
            smaller = smaller || im.bucket_named[j][d] < im.bucket_named[k][d];
          }
          smallest = !(fits_j && smaller);
        }
        if (smallest) {
          want = k;
          found = true;
        }
      }
      if (!found) {
        std::string what;
        for (std::size_t d = 0; d < im.named.size(); ++d) {
          std::int64_t largest = 0;
          for (std::size_t k = 0; k < nb; ++k) largest = std::max(largest, im.bucket_named[k][d]);
          if (job.real[d] > largest) {
            what += (what.empty() ? "" : "; ") + im.named[d] + " " + std::to_string(job.real[d]) +
                    " exceeds the largest compiled " + im.named[d] + " bucket " + std::to_string(largest);
          }
        }
        throw ShapeError(prefix(tag) + "the arguments do not fit any compiled bucket: " + what);
      }
    }
    auto matches = [&](std::size_t k) { return !im.has_named || im.bucket_named[k] == im.bucket_named[want]; };
    std::size_t largest_bi = nb;
    for (std::size_t k = 0; k < nb; ++k) {
      if (matches(k) && (largest_bi == nb || m.buckets[k].batch > m.buckets[largest_bi].batch)) largest_bi = k;
    }
    const std::int64_t largest = m.buckets[largest_bi].batch;
    std::int64_t begin = 0;
    while (begin < batch) {
      std::int64_t left = batch - begin;
      std::size_t bi = largest_bi;
      for (std::size_t k = 0; k < nb; ++k) {
        if (matches(k) && m.buckets[k].batch >= left && m.buckets[k].batch < m.buckets[bi].batch) bi = k;
      }
      std::int64_t rows = std::min(left, largest);
      job.chunks.push_back({begin, rows, bi});
      begin += rows;
    }
  }
  job.single = job.chunks.size() == 1;
  // Whether the first local rank computes for all of them, and whether its task may run on
  // this thread (Impl::once, Impl::light): only when every chunk's bucket allows it.
  bool once = true, light = true;
  for (const Chunk& c : job.chunks) {
    once = once && im.once[c.bucket];
    light = light && im.light[c.bucket];
  }
  if (!job.single && !m.states.empty()) {
    throw InvalidArgument(prefix(tag) + "batch " + std::to_string(batch) + " exceeds the largest batch bucket " +
                          std::to_string(m.buckets[job.chunks[0].bucket].batch) +
                          " of a stage with state ('" + m.states[0].name +
                          "'): its rows are sequences of the state and cannot run in chunks");
  }

  // ---- output buffers: the bucket itself when one chunk, else the caller's batch
  detail::RankedData& res = job.result;
  res.per_rank.resize(tpu);
  res.ready.resize(tpu);
  while (job.ranks.size() < tpu) job.ranks.push_back(std::make_unique<RankWork>());
  const std::int64_t out_rows = job.single ? m.buckets[job.chunks[0].bucket].batch : batch;
  const std::vector<Shape>& out_shapes = im.out_shapes[job.chunks[0].bucket];
  if (local.size() != tpu) {  // ranks as processes: other processes' ranks hold no tensors here
    for (std::size_t r = 0; r < tpu; ++r) {
      if (std::find(local.begin(), local.end(), static_cast<int>(r)) == local.end())
        res.per_rank[r].clear();
    }
  }
  for (int rk : local) {
    const auto r = static_cast<std::size_t>(rk);
    const Device dev = im.rank_device[r];
    res.per_rank[r].resize(m.outputs.size());
    for (std::size_t o = 0; o < m.outputs.size(); ++o) {
      if (once && rk != first) {  // the first rank's buffer, which this rank's memory is too
        res.per_rank[r][o] = res.per_rank[static_cast<std::size_t>(first)][o];
        continue;
      }
      job.shape = out_shapes[o];
      job.shape[0] = out_rows;
      be.allocate_into(res.per_rank[r][o], job.shape, m.outputs[o].dtype, dev);
    }
  }
  res.real_batch = batch;
  {  // the bucket (of the first chunk); assignments keep the capacity (no steady-state allocation)
    const std::size_t bi = job.chunks.front().bucket;
    res.bucket.batch = m.buckets[bi].batch;
    if (im.has_named) {
      res.bucket.sizes.assign(im.bucket_named[bi].begin(), im.bucket_named[bi].end());
    } else {
      res.bucket.sizes.clear();
    }
  }

  // ---- one task per rank runs every chunk
  job.host_result = !(options_.pipeline_execution && !options_.return_ranked_to_cpu);
  job.finished.reset();
  res.rank_counts.resize(tpu);
  for (std::size_t r = 0; r < tpu; ++r) {
    res.ready[r] = nullptr;
    res.rank_counts[r] = nullptr;
  }
  for (int rk : local) {
    const auto r = static_cast<std::size_t>(rk);
    const bool runs = !once || rk == first;
    if (runs) job.ranks[r]->done.reset();
    // A rank the first one computes for is ready when the first one is, and moved nothing.
    res.ready[r] = &job.ranks[runs ? r : static_cast<std::size_t>(first)]->done;
    res.rank_counts[r] = runs ? &job.ranks[r]->counts : nullptr;
  }
  job.host_counts = TransferStats();
  job.host_counts.forwards = 1;
  res.host_counts = &job.host_counts;
  job.pending.store(once ? 1 : static_cast<int>(local.size()), std::memory_order_relaxed);
  job.self = held;
  im.group->submit(&run_rank, &job, once ? first : -1, light);

  if (!job.host_result) {
    return Output(RankedTensors(std::shared_ptr<const detail::RankedData>(held, &job.result)));
  }

  // ---- host results: the first local rank's outputs (every rank holds the same whole
  // outputs) cut to the caller's batch, in pooled host memory
  job.finished.wait();
  try {
    for (int rk : local) {
      const detail::EventState& done = *res.ready[static_cast<std::size_t>(rk)];
      if (std::exception_ptr e = done.error()) std::rethrow_exception(e);
      if (DeviceEvent* e = done.device()) e->synchronize();  // the device has run the stage
    }
    if (!im.has_named) {
      job.host_counts.device_to_host_bytes += detail::copy_rank0_to_host(res, job.host_out, job.shape);
    } else {
      // Cut back along the batch and every named dim the arguments carry.
      job.host_out.resize(m.outputs.size());
      for (std::size_t o = 0; o < m.outputs.size(); ++o) {
        const Tensor& t = res.per_rank[static_cast<std::size_t>(first)][o];
        job.shape = t.shape();
        job.shape[0] = batch;
        const std::vector<int>& named = im.out_named[o];
        for (std::size_t k = 0; k < named.size(); ++k) {
          if (named[k] >= 0 && job.real[static_cast<std::size_t>(named[k])] >= 1) {
            job.shape[k + 1] = std::min(job.shape[k + 1], job.real[static_cast<std::size_t>(named[k])]);
          }
        }
        Tensor& h = job.host_out[o];
        detail::TensorAccess::rebind_host_pool(h, job.shape, t.dtype());
        const std::size_t bytes = copy_region(be, h.raw_data(), h.device(), h.shape(), t.raw_data(), t.device(),
                                              t.shape(), 0, job.shape, dtype_size(t.dtype()), false);
        stats::add(stats::kD2h, bytes);
        job.host_counts.device_to_host_bytes += bytes;
      }
    }
  } catch (...) {
    im.group->recover_if_failed();
    throw;
  }
  // The device buffers go back to their pool now; the host copies live as long as the Output.
  for (auto& outs : res.per_rank) {
    for (Tensor& t : outs) detail::TensorAccess::drop(t);
  }
  job.total = job.host_counts;
  for (int rk : local) {
    if (const TransferStats* c = res.rank_counts[static_cast<std::size_t>(rk)]) job.total += *c;
  }
  return Output(Output::SharedHost{}, std::shared_ptr<const std::vector<Tensor>>(held, &job.host_out),
                std::shared_ptr<const TransferStats>(held, &job.total),
                std::shared_ptr<const BucketInfo>(held, &job.result.bucket));
}

}  // namespace devpipe
