#include "devpipe/ranked.h"

#include "runtime/ranked_host.h"

#include "core/device_copy.h"
#include "core/pool.h"
#include "devpipe/error.h"
#include "runtime/stats.h"
#include "runtime/stream.h"

namespace devpipe {

namespace {
const std::string& empty_string() {
  static const std::string* s = new std::string();
  return *s;
}
const std::vector<Tensor>& empty_tensors() {
  static const std::vector<Tensor>* v = new std::vector<Tensor>();
  return *v;
}
const BucketInfo& no_bucket() {
  static const BucketInfo* b = new BucketInfo();
  return *b;
}
}  // namespace

std::int64_t BucketInfo::size(const std::string& dim) const {
  for (std::size_t i = 0; i < dims.size() && i < sizes.size(); ++i) {
    if (dims[i] == dim) return sizes[i];
  }
  std::string have;
  for (const std::string& d : dims) have += (have.empty() ? "'" : ", '") + d + "'";
  throw InvalidArgument("bucket of batch " + std::to_string(batch) + " has no named dim '" + dim + "' (it has " +
                        (have.empty() ? std::string("none") : have) + ")");
}

std::size_t detail::first_local_rank(const RankedData& data) {
  for (std::size_t r = 0; r < data.per_rank.size(); ++r) {
    if (!data.per_rank[r].empty()) return r;
  }
  return 0;
}

RankedTensors::RankedTensors(std::vector<std::vector<Tensor>> per_rank, std::int64_t real_batch,
                             std::string producer, std::vector<Event> ready) {
  if (ready.size() != per_rank.size()) {
    throw InvalidArgument("RankedTensors: " + std::to_string(per_rank.size()) + " ranks but " +
                          std::to_string(ready.size()) + " events");
  }
  auto d = std::make_shared<detail::RankedData>();
  d->per_rank = std::move(per_rank);
  d->real_batch = real_batch;
  d->producer = std::move(producer);
  d->owned_ready = std::move(ready);
  for (const Event& e : d->owned_ready) d->ready.push_back(e.get());
  data_ = std::move(d);
}

const std::vector<Tensor>& RankedTensors::operator[](int rank) const {
  if (rank < 0 || rank >= num_ranks()) {
    throw InvalidArgument("ranked tensors from '" + producer() + "': rank " + std::to_string(rank) +
                          " out of range (" + std::to_string(num_ranks()) + " ranks)");
  }
  const auto& outs = data_->per_rank[static_cast<std::size_t>(rank)];
  if (outs.empty() && !data_->per_rank[detail::first_local_rank(*data_)].empty()) {
    std::string have;
    for (int r : local_ranks()) have += (have.empty() ? "" : ", ") + std::to_string(r);
    throw InvalidArgument("ranked tensors from '" + producer() + "': rank " + std::to_string(rank) +
                          " runs in another process; this process holds rank(s) " + have);
  }
  return outs;
}

int RankedTensors::num_outputs() const {
  return empty() ? 0 : static_cast<int>(data_->per_rank[detail::first_local_rank(*data_)].size());
}

bool RankedTensors::is_local(int rank) const {
  return data_ && rank >= 0 && rank < num_ranks() &&
         !data_->per_rank[static_cast<std::size_t>(rank)].empty();
}

std::vector<int> RankedTensors::local_ranks() const {
  std::vector<int> out;
  for (int r = 0; r < num_ranks(); ++r) {
    if (is_local(r)) out.push_back(r);
  }
  return out;
}

TransferStats RankedTensors::transfer_stats() const {
  TransferStats t;
  if (!data_) return t;
  wait();
  for (const TransferStats* c : data_->rank_counts) {
    if (c) t += *c;
  }
  if (data_->host_counts) t += *data_->host_counts;
  return t;
}

TransferStats Output::transfer_stats() const {
  if (is_ranked()) return ranked_.transfer_stats();
  return counts_ ? *counts_ : TransferStats();
}

const std::string& RankedTensors::producer() const { return data_ ? data_->producer : empty_string(); }

const BucketInfo& RankedTensors::bucket() const { return data_ ? data_->bucket : no_bucket(); }

const BucketInfo& Output::bucket() const {
  if (is_ranked()) return ranked_.bucket();
  return bucket_ ? *bucket_ : no_bucket();
}

RankedTensors RankedTensors::select(int index) const {
  if (index < 0 || index >= num_outputs()) {
    throw InvalidArgument("ranked tensors from '" + producer() + "': output " + std::to_string(index) +
                          " out of range (" + std::to_string(num_outputs()) + " outputs)");
  }
  auto d = std::make_shared<detail::RankedData>();
  for (const auto& r : data_->per_rank) {
    d->per_rank.push_back(r.empty() ? std::vector<Tensor>()
                                    : std::vector<Tensor>{r[static_cast<std::size_t>(index)]});
  }
  d->ready = data_->ready;
  d->rank_counts = data_->rank_counts;
  d->host_counts = data_->host_counts;
  d->real_batch = data_->real_batch;
  d->bucket = data_->bucket;
  d->producer = data_->producer;
  d->keep_alive = data_;  // the events live in the original
  return RankedTensors(std::shared_ptr<const detail::RankedData>(std::move(d)));
}

void RankedTensors::wait() const {
  if (!data_) return;
  for (detail::EventState* e : data_->ready) {
    if (e) e->wait();  // null: a rank of another process
  }
}

Event RankedTensors::ready(int rank) const {
  if (!data_) throw std::out_of_range("RankedTensors::ready: no ranks");
  detail::EventState* e = data_->ready.at(static_cast<std::size_t>(rank));
  if (!e) {
    throw InvalidArgument("ranked tensors from '" + producer() + "': rank " + std::to_string(rank) +
                          " runs in another process");
  }
  return Event(data_, e);  // aliasing: shares the ownership of the tensors
}

std::uint64_t detail::copy_rank0_to_host(const RankedData& data, std::vector<Tensor>& out, Shape& scratch) {
  std::uint64_t bytes = 0;
  const std::vector<Tensor>& outputs = data.per_rank.at(first_local_rank(data));
  out.resize(outputs.size());
  for (std::size_t o = 0; o < outputs.size(); ++o) {
    const Tensor& t = outputs[o];
    scratch.dims().assign(t.shape().dims().begin(), t.shape().dims().end());
    scratch[0] = data.real_batch;
    Tensor& h = out[o];
    TensorAccess::rebind_host_pool(h, scratch, t.dtype());
    copy_bytes(h.raw_data(), h.device(), t.raw_data(), t.device(), h.nbytes());
    stats::add(stats::kD2h, h.nbytes());
    bytes += h.nbytes();
  }
  return bytes;
}

std::vector<Tensor> RankedTensors::to_host() const {
  wait();
  std::vector<Tensor> out;
  if (empty()) return out;
  Shape scratch;
  detail::copy_rank0_to_host(*data_, out, scratch);
  return out;
}

std::string RankedTensors::describe() const {
  std::string s = "ranked tensors [" + std::to_string(num_ranks()) + " rank" +
                  (num_ranks() == 1 ? "" : "s") + " x " + std::to_string(num_outputs()) +
                  " output" + (num_outputs() == 1 ? "" : "s") + "] (list of lists)";
  if (!producer().empty()) s += " from '" + producer() + "'";
  if (!empty() && num_outputs() > 0) {
    const Tensor& t = data_->per_rank[detail::first_local_rank(*data_)][0];
    s += ", batch " + std::to_string(real_batch()) + " of " + std::to_string(t.shape()[0]) +
         " rows on " + t.device().to_string();
  }
  return s;
}

Output::Output(std::vector<Tensor> host)
    : host_(std::make_shared<const std::vector<Tensor>>(std::move(host))) {}

const RankedTensors& Output::ranked() const {
  if (!is_ranked()) throw StateError("this output is on the host, not ranked; use tensor()/tensors()");
  return ranked_;
}

const std::vector<Tensor>& Output::tensors() const {
  if (is_ranked()) {
    throw StateError("this output is " + ranked_.describe() +
                     "; pass it to the next stage or call ranked().to_host()");
  }
  return host_ ? *host_ : empty_tensors();
}

const Tensor& Output::tensor(int index) const {
  const auto& t = tensors();
  if (index < 0 || index >= static_cast<int>(t.size())) {
    throw InvalidArgument("output " + std::to_string(index) + " out of range (" +
                          std::to_string(t.size()) + " outputs)");
  }
  return t[static_cast<std::size_t>(index)];
}

std::string Output::type_name() const { return is_ranked() ? ranked_.describe() : "tensor"; }

}  // namespace devpipe
