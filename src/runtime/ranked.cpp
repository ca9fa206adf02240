#include "devpipe/ranked.h"

#include "devpipe/error.h"
#include "runtime/stats.h"
#include "runtime/stream.h"

namespace devpipe {

RankedTensors::RankedTensors(std::vector<std::vector<Tensor>> per_rank, std::int64_t real_batch,
                             std::string producer, std::vector<Event> ready)
    : per_rank_(std::move(per_rank)),
      real_batch_(real_batch),
      producer_(std::move(producer)),
      ready_(std::move(ready)) {
  if (ready_.size() != per_rank_.size()) {
    throw InvalidArgument("RankedTensors: " + std::to_string(per_rank_.size()) + " ranks but " +
                          std::to_string(ready_.size()) + " events");
  }
}

const std::vector<Tensor>& RankedTensors::operator[](int rank) const {
  if (rank < 0 || rank >= num_ranks()) {
    throw InvalidArgument("ranked tensors from '" + producer_ + "': rank " + std::to_string(rank) +
                          " out of range (" + std::to_string(num_ranks()) + " ranks)");
  }
  return per_rank_[static_cast<std::size_t>(rank)];
}

RankedTensors RankedTensors::select(int index) const {
  if (index < 0 || index >= num_outputs()) {
    throw InvalidArgument("ranked tensors from '" + producer_ + "': output " + std::to_string(index) +
                          " out of range (" + std::to_string(num_outputs()) + " outputs)");
  }
  std::vector<std::vector<Tensor>> one;
  for (const auto& r : per_rank_) one.push_back({r[static_cast<std::size_t>(index)]});
  return RankedTensors(std::move(one), real_batch_, producer_, ready_);
}

void RankedTensors::wait() const {
  for (const auto& e : ready_) e->wait();
}

const Event& RankedTensors::ready(int rank) const {
  return ready_.at(static_cast<std::size_t>(rank));
}

std::vector<Tensor> RankedTensors::to_host() const {
  wait();
  std::vector<Tensor> out;
  if (per_rank_.empty()) return out;
  for (const Tensor& t : per_rank_[0]) {
    Tensor rows = t.narrow_rows(0, real_batch_);
    Tensor h = Tensor::empty(rows.shape(), rows.dtype());
    h.copy_from(rows);
    stats::d2h += h.nbytes();
    out.push_back(std::move(h));
  }
  return out;
}

std::string RankedTensors::describe() const {
  std::string s = "ranked tensors [" + std::to_string(num_ranks()) + " rank" +
                  (num_ranks() == 1 ? "" : "s") + " x " + std::to_string(num_outputs()) +
                  " output" + (num_outputs() == 1 ? "" : "s") + "] (list of lists)";
  if (!producer_.empty()) s += " from '" + producer_ + "'";
  if (!per_rank_.empty() && !per_rank_[0].empty()) {
    s += ", batch " + std::to_string(real_batch_) + " of " +
         std::to_string(per_rank_[0][0].shape()[0]) + " rows on " +
         per_rank_[0][0].device().to_string();
  }
  return s;
}

const RankedTensors& Output::ranked() const {
  if (!is_ranked()) throw StateError("this output is on the host, not ranked; use tensor()/tensors()");
  return ranked_;
}

const std::vector<Tensor>& Output::tensors() const {
  if (is_ranked()) {
    throw StateError("this output is " + ranked_.describe() +
                     "; pass it to the next stage or call ranked().to_host()");
  }
  return host_;
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
