// State updates (StateWrite) and token sampling (Sample): the ops a decoder's KV cache and its
// generation loop need on the device.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

// ---- StateWrite ----

std::vector<ValueInfo> infer_state_write(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& s = in[0].shape;
  const Shape& v = in[1].shape;
  const Shape& p = in[2].shape;
  const std::int64_t d = attrs.i("dim");
  auto fail = [&](const std::string& why) {
    throw ShapeError("state_write: " + why + " (state " + s.to_string() + ", values " + v.to_string() +
                     ", positions " + p.to_string() + ", dim " + std::to_string(d) + ")");
  };
  if (s.rank() < 2) fail("the state needs a batch dim and a position dim");
  if (d < 1 || d >= s.rank()) fail("dim must be in [1, " + std::to_string(s.rank()) + ")");
  if (v.rank() != s.rank()) fail("values must have the state's rank");
  if (v[0] > s[0]) fail("values have more rows than the state");
  for (int k = 1; k < s.rank(); ++k) {
    if (k != d && v[static_cast<std::size_t>(k)] != s[static_cast<std::size_t>(k)]) {
      fail("values differ from the state in dim " + std::to_string(k));
    }
  }
  if (p.rank() != 2 || p[0] != v[0] || p[1] != v[static_cast<std::size_t>(d)]) {
    fail("positions must be [values rows, values dim " + std::to_string(d) + "]");
  }
  if (in[2].dtype != DType::Int64) {
    throw DTypeError("state_write: positions must be int64, got " + std::string(dtype_name(in[2].dtype)));
  }
  if (in[1].dtype != in[0].dtype) {
    throw DTypeError("state_write: values are " + std::string(dtype_name(in[1].dtype)) + ", the state is " +
                     std::string(dtype_name(in[0].dtype)));
  }
  return {in[0]};
}

void ref_state_write(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                     const RefContext&) {
  const std::size_t bytes = static_cast<std::size_t>(in[0].numel()) * dtype_size(in[0].dtype());
  if (out[0].raw_data() != in[0].raw_data()) std::memcpy(out[0].raw_data(), in[0].raw_data(), bytes);
  state_write_rows(out[0].raw_data(), in[0].shape(), in[1].raw_data(), in[1].shape(),
                   in[2].data<std::int64_t>(), static_cast<int>(attrs.i("dim")), dtype_size(in[0].dtype()));
}

// ---- Sample ----

std::vector<ValueInfo> infer_sample(const std::vector<ValueInfo>& in, const Attrs&) {
  const Shape& l = in[0].shape;
  if (l.rank() != 2) throw ShapeError("sample: logits must be [B, V], got " + l.to_string());
  if (!is_floating(in[0].dtype)) throw DTypeError("sample: logits must be floating point");
  if (in[1].shape != Shape{l[0], 3} || in[1].dtype != DType::Float32) {
    throw ShapeError("sample: params must be float32 [" + std::to_string(l[0]) + ", 3] (temperature, top_k, top_p), got " +
                     in[1].shape.to_string() + " " + std::string(dtype_name(in[1].dtype)));
  }
  if (in[2].shape != Shape{l[0]} || in[2].dtype != DType::Float32) {
    throw ShapeError("sample: u must be float32 [" + std::to_string(l[0]) + "], got " + in[2].shape.to_string() + " " +
                     std::string(dtype_name(in[2].dtype)));
  }
  return {{Shape{l[0]}, DType::Int64}};
}

void ref_sample(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&, const RefContext&) {
  const std::int64_t B = in[0].dim(0), V = in[0].dim(1);
  std::vector<float> logits = in[0].to_float_vector();
  const float* params = in[1].data<float>();
  const float* u = in[2].data<float>();
  std::int64_t* y = out[0].data<std::int64_t>();
  std::vector<float> work(static_cast<std::size_t>(V));
  std::vector<std::int32_t> order(static_cast<std::size_t>(V));
  for (std::int64_t b = 0; b < B; ++b) {
    y[b] = sample_row(logits.data() + b * V, V, params[3 * b], params[3 * b + 1], params[3 * b + 2], u[b],
                      work.data(), order.data());
  }
}

}  // namespace

void state_write_rows(void* state, const Shape& state_shape, const void* values, const Shape& values_shape,
                      const std::int64_t* positions, int dim, std::size_t elem_size) {
  const auto d = static_cast<std::size_t>(dim);
  std::int64_t outer = 1, inner = 1;
  for (std::size_t k = 1; k < d; ++k) outer *= state_shape[k];
  for (std::size_t k = d + 1; k < static_cast<std::size_t>(state_shape.rank()); ++k) inner *= state_shape[k];
  const std::int64_t S = state_shape[d], T = values_shape[d], rows = values_shape[0];
  const std::size_t block = static_cast<std::size_t>(inner) * elem_size;
  auto* dst = static_cast<char*>(state);
  const auto* src = static_cast<const char*>(values);
  for (std::int64_t i = 0; i < rows; ++i) {
    for (std::int64_t t = 0; t < T; ++t) {
      const std::int64_t p = positions[i * T + t];
      if (p < 0 || p >= S) continue;
      for (std::int64_t o = 0; o < outer; ++o) {
        std::memcpy(dst + static_cast<std::size_t>((i * outer + o) * S + p) * block,
                    src + static_cast<std::size_t>((i * outer + o) * T + t) * block, block);
      }
    }
  }
}

std::int64_t sample_row(const float* logits, std::int64_t V, float temperature, float top_k, float top_p, float u,
                        float* work, std::int32_t* order) {
  if (!(temperature > 0.0f)) {
    std::int64_t best = 0;
    for (std::int64_t j = 1; j < V; ++j) {
      if (logits[j] > logits[best]) best = j;
    }
    return best;
  }
  std::iota(order, order + V, 0);
  std::int64_t k = static_cast<std::int64_t>(top_k);
  if (k <= 0 || k > V) k = V;
  auto greater = [&](std::int32_t a, std::int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(order, order + k, order + V, greater);
  // Softmax over the k best of logits / temperature (the largest first, so exp(0) = 1 leads).
  const float top = logits[order[0]] / temperature;
  double total = 0;
  for (std::int64_t j = 0; j < k; ++j) {
    work[j] = std::exp(logits[order[j]] / temperature - top);
    total += work[j];
  }
  // Nucleus: the shortest prefix whose probability reaches top_p (at least one token).
  std::int64_t n = k;
  if (top_p > 0.0f && top_p < 1.0f) {
    double cum = 0;
    for (std::int64_t j = 0; j < k; ++j) {
      cum += work[j];
      if (cum >= static_cast<double>(top_p) * total) {
        n = j + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (std::int64_t j = 0; j < n; ++j) kept += work[j];
  const double target = static_cast<double>(u) * kept;
  double cum = 0;
  for (std::int64_t j = 0; j < n; ++j) {
    cum += work[j];
    if (cum > target) return order[j];
  }
  return order[n - 1];
}

namespace ops {
const OpDef kStateWrite{OpKind::StateWrite, "state_write", 3, 3, infer_state_write, ref_state_write};
const OpDef kSample{OpKind::Sample, "sample", 3, 3, infer_sample, ref_sample};
}  // namespace ops
}  // namespace devpipe
