#include "backends/cuda/plan.h"

#include <algorithm>
#include <string>

#include "devpipe/error.h"

namespace devpipe::cuda {

std::vector<std::int64_t> row_major_strides(const Shape& s) {
  std::vector<std::int64_t> st(static_cast<std::size_t>(s.rank()), 1);
  for (int i = s.rank() - 2; i >= 0; --i) {
    st[static_cast<std::size_t>(i)] =
        st[static_cast<std::size_t>(i + 1)] * s[static_cast<std::size_t>(i + 1)];
  }
  return st;
}

std::vector<std::int64_t> broadcast_strides(const Shape& s, const Shape& out) {
  const auto st = row_major_strides(s);
  std::vector<std::int64_t> r(static_cast<std::size_t>(out.rank()), 0);
  const int off = out.rank() - s.rank();
  for (int i = 0; i < s.rank(); ++i) {
    if (s[static_cast<std::size_t>(i)] != 1)
      r[static_cast<std::size_t>(off + i)] = st[static_cast<std::size_t>(i)];
  }
  return r;
}

StridedDims collapse_dims(const std::vector<std::int64_t>& size,
                          const std::vector<std::int64_t>& s0,
                          const std::vector<std::int64_t>& s1) {
  struct D {
    std::int64_t size, s0, s1;
  };
  std::vector<D> merged;  // innermost first
  for (std::size_t k = size.size(); k-- > 0;) {
    if (size[k] == 1) continue;
    const D d{size[k], s0[k], s1[k]};
    if (!merged.empty()) {
      D& cur = merged.back();
      if (d.s0 == cur.s0 * cur.size && d.s1 == cur.s1 * cur.size) {
        cur.size *= d.size;
        continue;
      }
    }
    merged.push_back(d);
  }
  std::reverse(merged.begin(), merged.end());
  if (merged.empty()) merged.push_back({1, 0, 0});
  if (merged.size() > static_cast<std::size_t>(kMaxDims)) {
    throw Unsupported("cuda backend: an iteration space of " + std::to_string(merged.size()) +
                      " non-mergeable dims (at most " + std::to_string(kMaxDims) + ")");
  }
  StridedDims out;
  out.ndim = static_cast<int>(merged.size());
  for (std::size_t i = 0; i < merged.size(); ++i) {
    out.size[i] = merged[i].size;
    out.stride0[i] = merged[i].s0;
    out.stride1[i] = merged[i].s1;
  }
  return out;
}

GemmPlan plan_linear(const Shape& x, const Shape& weight) {
  GemmPlan plan;
  plan.k = weight[1];
  plan.n = weight[0];
  std::int64_t rows = 1;
  for (int i = 0; i + 1 < x.rank(); ++i) rows *= x[static_cast<std::size_t>(i)];
  plan.m = rows;
  plan.b_nk = true;
  plan.calls.push_back({});
  return plan;
}

GemmPlan plan_matmul(const Shape& as, const Shape& bs, const Shape& os) {
  GemmPlan plan;
  plan.m = as.dim(-2);
  plan.k = as.dim(-1);
  plan.n = bs.dim(-1);
  const int ob = os.rank() - 2, ab = as.rank() - 2, bb = bs.rank() - 2;

  // Per output batch dim: size and the element strides of a, b and c (0: broadcast).
  struct D {
    std::int64_t size, sa, sb, sc;
  };
  std::vector<D> dims(static_cast<std::size_t>(ob));
  {
    std::int64_t sa = plan.m * plan.k, sb = plan.k * plan.n, sc = plan.m * plan.n;
    for (int i = ob - 1; i >= 0; --i) {
      const int ia = i - (ob - ab), ib = i - (ob - bb);
      const std::int64_t da = ia >= 0 ? as[static_cast<std::size_t>(ia)] : 1;
      const std::int64_t db = ib >= 0 ? bs[static_cast<std::size_t>(ib)] : 1;
      const std::int64_t size = os[static_cast<std::size_t>(i)];
      dims[static_cast<std::size_t>(i)] = {size, da == 1 ? 0 : sa, db == 1 ? 0 : sb, sc};
      sa *= da;
      sb *= db;
      sc *= size;
    }
  }
  // Drop size-1 dims and merge the ones whose strides chain.
  std::vector<D> merged;  // innermost first
  for (std::size_t k = dims.size(); k-- > 0;) {
    const D& d = dims[k];
    if (d.size == 1) continue;
    if (!merged.empty()) {
      D& cur = merged.back();
      if (d.sa == cur.sa * cur.size && d.sb == cur.sb * cur.size && d.sc == cur.sc * cur.size) {
        cur.size *= d.size;
        continue;
      }
    }
    merged.push_back(d);
  }
  std::reverse(merged.begin(), merged.end());
  // The innermost batch dim becomes the strided batch (both operands batched), or is folded
  // into m (b broadcast, a's batches contiguous); the others are enumerated as calls.
  if (!merged.empty()) {
    const D last = merged.back();
    if (last.sa != 0 && last.sb != 0) {
      plan.batch = last.size;
      plan.stride_a = last.sa;
      plan.stride_b = last.sb;
      plan.stride_c = last.sc;
      merged.pop_back();
    } else if (last.sb == 0 && last.sa == plan.m * plan.k && last.sc == plan.m * plan.n) {
      plan.m *= last.size;
      merged.pop_back();
    }
  }
  std::int64_t ncalls = 1;
  for (const D& d : merged) ncalls *= d.size;
  for (std::int64_t ci = 0; ci < ncalls; ++ci) {
    GemmCall call;
    std::int64_t rem = ci;
    for (std::size_t k = merged.size(); k-- > 0;) {
      const std::int64_t idx = rem % merged[k].size;
      rem /= merged[k].size;
      call.a_off += idx * merged[k].sa;
      call.b_off += idx * merged[k].sb;
      call.c_off += idx * merged[k].sc;
    }
    plan.calls.push_back(call);
  }
  return plan;
}

}  // namespace devpipe::cuda
