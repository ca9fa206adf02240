// Linear and Matmul.
#include <cmath>
#include <numbers>

#include "devpipe/error.h"
#include "graph/op_def.h"

namespace devpipe {
namespace {

std::vector<ValueInfo> infer_linear(const std::vector<ValueInfo>& in, const Attrs& attrs) {
  const Shape& x = in[0].shape;
  const Shape& w = in[1].shape;
  DType dt = common_float_dtype("linear", in);
  if (x.rank() < 1) throw ShapeError("linear: input must have rank >= 1, got " + x.to_string());
  if (w.rank() != 2) throw ShapeError("linear: weight must be 2-D [out, in], got " + w.to_string());
  if (x.dim(-1) != w[1]) {
    throw ShapeError("linear: input " + x.to_string() + " has last dim " +
                     std::to_string(x.dim(-1)) + " but the weight " + w.to_string() +
                     " expects in_features=" + std::to_string(w[1]));
  }
  if (in.size() == 3 && !(in[2].shape == Shape{w[0]})) {
    throw ShapeError("linear: bias " + in[2].shape.to_string() + " does not match out_features " +
                     std::to_string(w[0]));
  }
  std::string act = attrs.s("activation", "none");
  if (act != "none" && act != "relu" && act != "gelu" && act != "gelu_tanh" && act != "silu") {
    throw FormatError("linear: unknown fused activation '" + act + "'");
  }
  Shape out = x;
  out[static_cast<std::size_t>(out.rank() - 1)] = w[0];
  return {{out, dt}};
}

std::vector<ValueInfo> infer_matmul(const std::vector<ValueInfo>& in, const Attrs&) {
  const Shape& a = in[0].shape;
  const Shape& b = in[1].shape;
  DType dt = common_float_dtype("matmul", in);
  if (a.rank() < 2 || b.rank() < 2) {
    throw ShapeError("matmul: both operands need rank >= 2, got " + a.to_string() + " and " +
                     b.to_string());
  }
  if (a.dim(-1) != b.dim(-2)) {
    throw ShapeError("matmul: inner dimensions differ: " + a.to_string() + " @ " + b.to_string() +
                     " (" + std::to_string(a.dim(-1)) + " vs " + std::to_string(b.dim(-2)) + ")");
  }
  Shape ab(std::vector<std::int64_t>(a.dims().begin(), a.dims().end() - 2));
  Shape bb(std::vector<std::int64_t>(b.dims().begin(), b.dims().end() - 2));
  Shape out = broadcast_shapes("matmul", ab, bb);
  out.dims().push_back(a.dim(-2));
  out.dims().push_back(b.dim(-1));
  return {{out, dt}};
}


// ---- reference ----

void store(Tensor& out, const std::vector<float>& v) {
  out.copy_from(Tensor::from_vector(v, out.shape(), out.dtype()));
}

double activate(const std::string& act, double v) {
  if (act == "none") return v;
  if (act == "relu") return std::isnan(v) ? v : (v > 0 ? v : 0.0);
  if (act == "gelu") return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
  if (act == "gelu_tanh") {
    const double k = std::sqrt(2.0 / std::numbers::pi);
    return 0.5 * v * (1.0 + std::tanh(k * (v + 0.044715 * v * v * v)));
  }
  if (act == "silu") return v / (1.0 + std::exp(-v));
  throw FormatError("linear: unknown fused activation '" + act + "'");
}

// y[m, n] = act(sum_k x[m, k] * w[n, k] + b[n]) over the flattened leading dims m.
void ref_linear(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs& attrs,
                const RefContext&) {
  const std::string act = attrs.s("activation", "none");
  const std::int64_t K = in[1].dim(1), N = in[1].dim(0);
  const std::int64_t M = K ? in[0].numel() / K : out[0].numel() / (N ? N : 1);
  auto x = in[0].to_float_vector();
  auto w = in[1].to_float_vector();
  std::vector<float> b;
  if (in.size() == 3) b = in[2].to_float_vector();
  std::vector<float> y(static_cast<std::size_t>(M * N));
  for (std::int64_t m = 0; m < M; ++m) {
    const float* xr = x.data() + m * K;
    for (std::int64_t n = 0; n < N; ++n) {
      const float* wr = w.data() + n * K;
      double acc = 0;
      for (std::int64_t k = 0; k < K; ++k) acc += static_cast<double>(xr[k]) * wr[k];
      if (!b.empty()) acc += b[static_cast<std::size_t>(n)];
      y[static_cast<std::size_t>(m * N + n)] = static_cast<float>(activate(act, acc));
    }
  }
  store(out[0], y);
}

// Batched matmul; the batch dims of a and b broadcast against the output's batch dims.
void ref_matmul(const std::vector<Tensor>& in, std::vector<Tensor>& out, const Attrs&,
                const RefContext&) {
  const Shape& as = in[0].shape();
  const Shape& bs = in[1].shape();
  const Shape& os = out[0].shape();
  const std::int64_t M = as.dim(-2), K = as.dim(-1), N = bs.dim(-1);
  const int ob = os.rank() - 2, ab = as.rank() - 2, bb = bs.rank() - 2;
  std::int64_t batches = 1;
  for (int i = 0; i < ob; ++i) batches *= os[static_cast<std::size_t>(i)];
  auto a = in[0].to_float_vector();
  auto b = in[1].to_float_vector();
  std::vector<float> y(static_cast<std::size_t>(os.numel()));
  std::vector<std::int64_t> idx(static_cast<std::size_t>(ob));
  for (std::int64_t bi = 0; bi < batches; ++bi) {
    // Unravel the output batch index, then map it onto a's and b's (size-1 dims broadcast).
    std::int64_t rem = bi;
    for (int i = ob - 1; i >= 0; --i) {
      idx[static_cast<std::size_t>(i)] = rem % os[static_cast<std::size_t>(i)];
      rem /= os[static_cast<std::size_t>(i)];
    }
    std::int64_t aoff = 0, boff = 0;
    for (int i = 0; i < ab; ++i) {
      std::int64_t d = as[static_cast<std::size_t>(i)];
      aoff = aoff * d + (d == 1 ? 0 : idx[static_cast<std::size_t>(ob - ab + i)]);
    }
    for (int i = 0; i < bb; ++i) {
      std::int64_t d = bs[static_cast<std::size_t>(i)];
      boff = boff * d + (d == 1 ? 0 : idx[static_cast<std::size_t>(ob - bb + i)]);
    }
    const float* ap = a.data() + aoff * M * K;
    const float* bp = b.data() + boff * K * N;
    float* yp = y.data() + bi * M * N;
    for (std::int64_t m = 0; m < M; ++m) {
      for (std::int64_t n = 0; n < N; ++n) {
        double acc = 0;
        for (std::int64_t k = 0; k < K; ++k) acc += static_cast<double>(ap[m * K + k]) * bp[k * N + n];
        yp[m * N + n] = static_cast<float>(acc);
      }
    }
  }
  store(out[0], y);
}

}  // namespace

namespace ops {
const OpDef kLinear{OpKind::Linear, "linear", 2, 3, infer_linear, ref_linear};
const OpDef kMatmul{OpKind::Matmul, "matmul", 2, 2, infer_matmul, ref_matmul};
}  // namespace ops
}  // namespace devpipe
