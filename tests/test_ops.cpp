// Every op (except the collectives) against PyTorch: tests/reference/ops_ref.py writes the
// cases (inputs and float64-computed expected outputs) into one safetensors file; each case is
// traced with the F:: functions (every operand a graph input) and run (a) with the reference
// implementation and (b) on the cpu backend.
//
// One test per (op, arm): OpsVsTorch/OpVsTorch.Run/<op>_<arm>; each case inside is reported
// with its description (op, dtype, shapes, attributes) through SCOPED_TRACE.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/functional.h"
#include "devpipe/safetensors.h"
#include "devpipe/tensor.h"
#include "devpipe/trace.h"
#include "graph/reference.h"
#include "runtime/backend.h"
#include "runtime/run_graph.h"
#include "test_util.h"

using namespace devpipe;
using nlohmann::json;

namespace {

// ---- tolerances: |actual - expected| <= atol + rtol * |expected| ----
// float32: both sides start from the same float32 inputs; what remains is float32 rounding of
// the result and the kernels' float32 accumulation order (relative error ~1e-6 for short
// reductions).
constexpr double kF32Rtol = 1e-5;
constexpr double kF32Atol = 1e-5;
// float32 linear/matmul/conv reducing over K >= 256 terms: float32 accumulation error grows
// with K (~sqrt(K) * 6e-8 * sum|terms|), which exceeds 1e-5 absolute near zero outputs.
constexpr double kF32LongReductionAtol = 1e-4;
constexpr std::int64_t kLongReduction = 256;
// bfloat16: the expected value is float64 math on the bf16 inputs; bf16 has 8 mantissa bits,
// so rounding the output alone costs 2^-9 ~ 2e-3 relative, and kernels that accumulate in f32
// and round intermediates (e.g. a bias add or an activation) to bf16 add a few more ulps.
constexpr double kBf16Rtol = 2e-2;
constexpr double kBf16Atol = 2e-2;

struct OpCase {
  int index = 0;
  std::string op;
  std::string dtype;
  std::string desc;
  json attrs;
  std::vector<Tensor> inputs;
  Tensor expected;
};

std::vector<OpCase> load_cases(const std::string& path) {
  auto file = safetensors::File::open(path);
  std::map<std::string, Tensor> tensors;
  for (const auto& name : file.names()) tensors.emplace(name, file.get(name).clone());
  json list = json::parse(file.metadata().at("cases"));
  std::vector<OpCase> cases;
  for (std::size_t i = 0; i < list.size(); ++i) {
    const json& c = list[i];
    OpCase oc;
    oc.index = static_cast<int>(i);
    oc.op = c.at("op").get<std::string>();
    oc.dtype = c.at("dtype").get<std::string>();
    oc.desc = c.at("desc").get<std::string>();
    oc.attrs = c.at("attrs");
    std::string prefix = "case" + std::to_string(i);
    for (int j = 0; j < c.at("n_inputs").get<int>(); ++j) {
      oc.inputs.push_back(tensors.at(prefix + ".in" + std::to_string(j)));
    }
    oc.expected = tensors.at(prefix + ".out");
    cases.push_back(std::move(oc));
  }
  return cases;
}

// ---- tracing a case with the F:: functions ----
std::vector<std::int64_t> ints(const json& attrs, const char* name) {
  return attrs.at(name).get<std::vector<std::int64_t>>();
}
// A number attribute; JSON has no infinities, so the script spells them "inf" / "-inf".
double number(const json& attrs, const char* name) {
  const json& v = attrs.at(name);
  if (v.is_string()) return std::stod(v.get<std::string>());
  return v.get<double>();
}
std::optional<Var> opt(const std::vector<Var>& v, std::size_t i) {
  return i < v.size() ? std::optional<Var>(v[i]) : std::nullopt;
}

Var apply_op(const OpCase& c, const std::vector<Var>& v) {
  const json& a = c.attrs;
  const std::string& op = c.op;
  if (op == "linear") {
    std::string act = a.at("activation").get<std::string>();
    if (act == "none") return F::linear(v[0], v[1], opt(v, 2));
    // The fused activation is an attribute of the Linear node (set by the compiler's fusion).
    Attrs attrs;
    attrs.set("activation", act);
    return Tracer::current().emit(OpKind::Linear, v, attrs);
  }
  if (op == "matmul") return F::matmul(v[0], v[1]);
  if (op == "conv2d") {
    return F::conv2d(v[0], v[1], opt(v, 2), ints(a, "stride"), ints(a, "padding"),
                     ints(a, "dilation"), a.at("groups").get<std::int64_t>());
  }
  if (op == "conv2d_global_avg_pool") {
    // The fused op as the compiler's pass makes it from conv2d + adaptive_avg_pool2d((1, 1)).
    Attrs attrs;
    attrs.set("stride", ints(a, "stride"))
        .set("padding", ints(a, "padding"))
        .set("dilation", ints(a, "dilation"))
        .set("groups", a.at("groups").get<std::int64_t>());
    return Tracer::current().emit(OpKind::Conv2dGlobalAvgPool, v, attrs);
  }
  if (op == "conv_patch_mean") {
    // The op as the compiler's fold_linear_chains makes it from conv2d + adaptive_avg_pool2d.
    Attrs attrs;
    attrs.set("kernel_size", ints(a, "kernel_size"))
        .set("stride", ints(a, "stride"))
        .set("padding", ints(a, "padding"))
        .set("dilation", ints(a, "dilation"));
    return Tracer::current().emit(OpKind::ConvPatchMean, v, attrs);
  }
  if (op == "adaptive_avg_pool2d") return F::adaptive_avg_pool2d(v[0], ints(a, "output_size"));
  if (op == "max_pool2d") {
    return F::max_pool2d(v[0], ints(a, "kernel_size"), ints(a, "stride"), ints(a, "padding"),
                         ints(a, "dilation"));
  }
  if (op == "embedding") return F::embedding(v[0], v[1], a.at("vocab_per_rank").get<std::int64_t>());
  if (op == "layer_norm") {
    return F::layer_norm(v[0], ints(a, "normalized_shape"), opt(v, 1), opt(v, 2),
                         a.at("eps").get<double>());
  }
  if (op == "rms_norm") {
    return F::rms_norm(v[0], ints(a, "normalized_shape"), opt(v, 1), a.at("eps").get<double>());
  }
  if (op == "reshape") return F::reshape(v[0], ints(a, "shape"));
  if (op == "permute") return F::permute(v[0], ints(a, "dims"));
  if (op == "concat") return F::concat(v, a.at("dim").get<int>());
  if (op == "slice") {
    return F::slice(v[0], a.at("dim").get<int>(), a.at("start").get<std::int64_t>(),
                    a.at("end").get<std::int64_t>(), a.at("step").get<std::int64_t>());
  }
  if (op == "add") return F::add(v[0], v[1]);
  if (op == "mul") return F::mul(v[0], v[1]);
  if (op == "softmax") return F::softmax(v[0], a.at("dim").get<int>());
  if (op == "gelu") return F::gelu(v[0], a.at("approximate").get<std::string>());
  if (op == "silu") return F::silu(v[0]);
  if (op == "relu") return F::relu(v[0]);
  if (op == "sub") return F::sub(v[0], v[1]);
  if (op == "div") return F::div(v[0], v[1]);
  if (op == "exp") return F::exp(v[0]);
  if (op == "tanh") return F::tanh(v[0]);
  if (op == "sigmoid") return F::sigmoid(v[0]);
  if (op == "neg") return F::neg(v[0]);
  if (op == "add_scalar") return F::add(v[0], a.at("value").get<double>());
  if (op == "mul_scalar") return F::mul(v[0], a.at("value").get<double>());
  if (op == "full") {
    return F::full(ints(a, "shape"), a.at("value").get<double>(),
                   dtype_from_name(a.at("dtype").get<std::string>()));
  }
  if (op == "arange") {
    return F::arange(a.at("n").get<std::int64_t>(), dtype_from_name(a.at("dtype").get<std::string>()));
  }
  if (op == "sum") return F::sum(v[0], ints(a, "dims"), a.at("keepdim").get<int>() != 0);
  if (op == "mean") return F::mean(v[0], ints(a, "dims"), a.at("keepdim").get<int>() != 0);
  if (op == "argmax") return F::argmax(v[0], a.at("dim").get<int>(), a.at("keepdim").get<int>() != 0);
  if (op == "index_select") return F::index_select(v[0], a.at("dim").get<int>(), v[1]);
  if (op == "gather") return F::gather(v[0], a.at("dim").get<int>(), v[1]);
  if (op == "where") return F::where(v[0], v[1], v[2]);
  if (op == "masked_fill") return F::masked_fill(v[0], v[1], number(a, "value"));
  if (op == "rotary_embedding") return F::rotary_embedding(v[0], v[1], a.at("theta").get<double>());
  if (op == "scaled_dot_product_attention") {
    std::optional<double> scale;
    if (a.contains("scale")) scale = a.at("scale").get<double>();
    return F::scaled_dot_product_attention(v[0], v[1], v[2], opt(v, 3),
                                           a.at("is_causal").get<int>() != 0, scale);
  }
  if (op == "masked_attention") {
    std::optional<double> scale;
    if (a.contains("scale")) scale = a.at("scale").get<double>();
    return F::masked_attention(v[0], v[1], v[2], v[3], v[4], scale);
  }
  if (op == "sample") return F::sample(v[0], v[1], v[2]);
  throw std::runtime_error("test_ops: no tracing rule for op '" + op + "'");
}

// state_write updates a state in place: its first operand is traced as a state (which comes
// after the data inputs), so the graph's inputs are (values, positions, state).
bool is_state_case(const OpCase& c) { return c.op == "state_write"; }

std::vector<Tensor> graph_inputs(const OpCase& c) {
  if (!is_state_case(c)) return c.inputs;
  return {c.inputs[1], c.inputs[2], c.inputs[0].clone()};  // a clone: the cpu arm writes it
}

Graph trace_case(const OpCase& c) {
  if (is_state_case(c)) {
    Tracer tracer({});
    Var values = tracer.input("in1", c.inputs[1].shape(), c.inputs[1].dtype());
    Var positions = tracer.input("in2", c.inputs[2].shape(), c.inputs[2].dtype());
    Var state = tracer.state("in0", c.inputs[0].shape(), c.inputs[0].dtype());
    return tracer.finish({F::state_write(state, values, positions, c.attrs.at("dim").get<int>())});
  }
  std::vector<std::pair<std::string, ValueInfo>> ins;
  for (std::size_t j = 0; j < c.inputs.size(); ++j) {
    ins.push_back({"in" + std::to_string(j), {c.inputs[j].shape(), c.inputs[j].dtype()}});
  }
  return trace_function({}, ins, [&](const std::vector<Var>& v) {
    return std::vector<Var>{apply_op(c, v)};
  });
}

// Length of the longest dot product the op computes (for the float32 tolerance).
std::int64_t reduction_length(const OpCase& c) {
  if (c.op == "linear") return c.inputs[1].dim(1);
  if (c.op == "matmul") return c.inputs[0].dim(-1);
  if (c.op == "conv2d" || c.op == "conv2d_global_avg_pool") {
    return c.inputs[1].dim(1) * c.inputs[1].dim(2) * c.inputs[1].dim(3);
  }
  if (c.op == "sum" || c.op == "mean") return c.inputs[0].numel() / std::max<std::int64_t>(c.expected.numel(), 1);
  return 0;
}

::testing::AssertionResult check_output(const OpCase& c, const Tensor& actual) {
  const Tensor& e = c.expected;
  if (c.dtype == "int64" || e.dtype() == DType::Int64) {  // int64 results (argmax) are exact
    if (actual.dtype() != DType::Int64 || actual.shape() != e.shape()) {
      return ::testing::AssertionFailure()
             << "got " << actual.shape().to_string() << " " << dtype_name(actual.dtype())
             << ", expected " << e.shape().to_string() << " int64";
    }
    const auto* pa = actual.data<std::int64_t>();
    const auto* pe = e.data<std::int64_t>();
    for (std::int64_t i = 0; i < e.numel(); ++i) {
      if (pa[i] != pe[i]) {
        return ::testing::AssertionFailure()
               << "int64 mismatch at flat index " << i << ": got " << pa[i] << ", expected " << pe[i];
      }
    }
    return ::testing::AssertionSuccess();
  }
  DType want = dtype_from_name(c.dtype);
  if (actual.dtype() != want) {
    return ::testing::AssertionFailure()
           << "output dtype " << dtype_name(actual.dtype()) << ", expected " << dtype_name(want);
  }
  double rtol = kF32Rtol, atol = kF32Atol;
  if (want == DType::BFloat16) {
    rtol = kBf16Rtol;
    atol = kBf16Atol;
  } else if (reduction_length(c) >= kLongReduction) {
    atol = kF32LongReductionAtol;
  }
  return devpipe::testing::tensors_close(actual, e, rtol, atol);
}

// ---- the suite ----
using Param = std::tuple<std::string, std::string>;  // op name, arm ("reference" | "cpu")

class OpVsTorch : public ::testing::TestWithParam<Param> {
 public:
  // ctest runs every (op, arm) in its own process: the cases are generated once per version
  // of the script (its content hash names the file in the working directory) and reused;
  // written beside and renamed, so concurrent processes never read a partial file.
  static void SetUpTestSuite() {
    std::ifstream script(std::string(DEVPIPE_REFERENCE_DIR) + "/ops_ref.py", std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(script)), std::istreambuf_iterator<char>());
    const std::string path = (std::filesystem::current_path() /
                              ("ops_ref." + std::to_string(std::hash<std::string>{}(text)) +
                               ".safetensors"))
                                 .string();
    if (!std::filesystem::exists(path)) {
      const std::string tmp = path + ".tmp" + std::to_string(::getpid());
      if (!devpipe::testing::run_torch_script("ops_ref.py", tmp)) return;
      std::filesystem::rename(tmp, path);
    }
    try {
      cases_ = std::make_unique<std::vector<OpCase>>(load_cases(path));
    } catch (const std::exception& e) {
      load_error_ = e.what();
    }
  }
  static void TearDownTestSuite() { cases_.reset(); }

 protected:
  static std::unique_ptr<std::vector<OpCase>> cases_;
  static std::string load_error_;
};

std::unique_ptr<std::vector<OpCase>> OpVsTorch::cases_;
std::string OpVsTorch::load_error_;

TEST_P(OpVsTorch, Run) {
  const auto& [op, arm] = GetParam();
  ASSERT_TRUE(cases_) << "no cases: the reference script failed or its output did not load "
                      << load_error_;
  int n_f32 = 0, n_bf16 = 0;
  for (const OpCase& c : *cases_) {
    if (c.op != op) continue;
    n_f32 += c.dtype == "float32";
    n_bf16 += c.dtype == "bfloat16";
    SCOPED_TRACE("[" + arm + "] " + c.desc);
    Graph graph;
    try {
      graph = trace_case(c);
    } catch (const std::exception& e) {
      ADD_FAILURE() << "tracing failed: " << e.what();
      continue;
    }
    if (graph.nodes.size() != 1 || std::string(op_name(graph.nodes[0].op)) != op) {
      ADD_FAILURE() << "expected a single " << op << " node, traced:\n" << graph.to_text();
      continue;
    }
    std::vector<Tensor> outs;
    try {
      if (arm == "reference") {
        outs = run_reference(graph, graph_inputs(c), {});
      } else {
        outs = run_graph_once(backend_for(DeviceKind::Cpu), graph, graph_inputs(c), {});
      }
    } catch (const std::exception& e) {
      ADD_FAILURE() << "run failed: " << e.what();
      continue;
    }
    if (outs.size() != 1) {
      ADD_FAILURE() << "got " << outs.size() << " outputs, expected 1";
      continue;
    }
    EXPECT_TRUE(check_output(c, outs[0]));
  }
  EXPECT_GT(n_f32, 0) << "no float32 case for " << op;
  EXPECT_GT(n_bf16, 0) << "no bfloat16 case for " << op;
}

std::vector<std::string> tested_ops() {
  std::vector<std::string> names;
  for (int i = 0; i < kNumOpKinds; ++i) {
    auto op = static_cast<OpKind>(i);
    if (op == OpKind::AllReduce || op == OpKind::AllGather) continue;  // need several ranks
    names.emplace_back(op_name(op));
  }
  return names;
}

INSTANTIATE_TEST_SUITE_P(Ops, OpVsTorch,
                         ::testing::Combine(::testing::ValuesIn(tested_ops()),
                                            ::testing::Values(std::string("reference"),
                                                              std::string("cpu"))),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return std::get<0>(info.param) + "_" + std::get<1>(info.param);
                         });

}  // namespace
