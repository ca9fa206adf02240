// kernels_bare: the workloads' oneDNN primitives run bare in a loop (see kernels_bare.h).
#include "kernels_bare.h"

#include "core/pool.h"

#include <omp.h>

#include <oneapi/dnnl/dnnl.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <utility>
#include <memory>
#include <new>

namespace devpipe::bench {

namespace {

using dnnl::algorithm;
using dnnl::memory;
using dnnl::prop_kind;
using tag = memory::format_tag;
using dt = memory::data_type;

/// One primitive with its bound arguments (memories own their buffers; all preallocated).
struct Step {
  dnnl::primitive prim;
  std::unordered_map<int, memory> args;
};

}  // namespace

struct KernelsBare::Plan {
  dnnl::engine eng{dnnl::engine::kind::cpu, 0};
  dnnl::stream strm{eng};
  std::vector<Step> steps;
  std::ostringstream what;
  std::vector<std::unique_ptr<void, void (*)(void*)>> buffers;  // owned by the plan
  const BareData* data = nullptr;
  memory output;  // the final output (plain row-major)
};

namespace {

using Plan = KernelsBare::Plan;

/// A memory whose buffer comes from devpipe's host allocator (2 MiB-aligned, huge-page advised
/// from 2 MiB on), so the floor runs with the same memory policy as the runtime's arenas.
memory alloc(Plan& plan, const memory::desc& md) {
  void* p = devpipe::detail::host_alloc(md.get_size());
  if (!p) throw std::bad_alloc();
  plan.buffers.emplace_back(p, [](void* q) { std::free(q); });
  return memory(md, plan.eng, p);
}

/// Fills `m` (a plain layout) with `key`'s values from the plan's data (which must have them
/// when it is not empty), else with deterministic pseudo-random values in [-scale, scale].
void fill(const Plan& plan, const memory& m, const std::string& key, std::uint32_t seed, float scale = 0.1f) {
  auto* p = static_cast<float*>(m.get_data_handle());
  const std::size_t n = m.get_desc().get_size() / sizeof(float);
  if (plan.data) {
    auto it = plan.data->find(key);
    if (it != plan.data->end()) {
      if (it->second.size() != n) {
        throw std::invalid_argument("kernels_bare: '" + key + "' has " + std::to_string(it->second.size()) +
                                    " values, the primitive needs " + std::to_string(n));
      }
      std::memcpy(p, it->second.data(), n * sizeof(float));
      return;
    }
    if (!plan.data->empty()) throw std::invalid_argument("kernels_bare: the data has no values for '" + key + "'");
  }
  std::uint32_t s = seed * 2654435761u + 12345u;
  for (std::size_t i = 0; i < n; ++i) {
    s = s * 1664525u + 1013904223u;
    p[i] = scale * (static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f);
  }
}

memory new_mem(Plan& plan, const memory::desc& md, const std::string& key, std::uint32_t seed) {
  memory m = alloc(plan, md);
  fill(plan, m, key, seed);
  return m;
}

/// Random weights in the plain (user) layout `user_md`, reordered once into `want` if the
/// primitive prefers another layout. The reorder runs here, outside the timed loop.
memory prepare_weights(Plan& plan, const memory::desc& user_md, const memory::desc& want,
                       const std::string& key, std::uint32_t seed) {
  memory user = new_mem(plan, user_md, key, seed);
  if (want == user_md) return user;
  memory packed = alloc(plan, want);
  dnnl::reorder(user, packed).execute(plan.strm, user, packed);
  plan.strm.wait();
  return packed;
}

template <class PD>
std::string impl(const PD& pd) {
  return pd.impl_info_str();
}

/// dst = src[m,k] x W[k,n] + bias[1,n] (optionally followed by exact GELU), as a matmul with the
/// weights in the layout oneDNN picks (format_tag::any), reordered once. `src`/`dst` are given.
void add_linear(Plan& plan, const memory& src, const memory& dst, memory::dim m, memory::dim k,
                memory::dim n, bool gelu, std::uint32_t seed, const std::string& name,
                const std::string& key) {
  dnnl::primitive_attr attr;
  if (gelu) {
    dnnl::post_ops po;
    po.append_eltwise(1.f, algorithm::eltwise_gelu_erf, 0.f, 0.f);
    attr.set_post_ops(po);
  }
  const memory::desc src_md = src.get_desc(), dst_md = dst.get_desc();
  const memory::desc bias_md({1, n}, dt::f32, tag::ab);
  // PyTorch stores Linear weights as [n, k]; viewed as [k, n] that is format "ba".
  const memory::desc user_w({k, n}, dt::f32, tag::ba);
  dnnl::matmul::primitive_desc pd;
  try {
    pd = dnnl::matmul::primitive_desc(
        dnnl::matmul::desc(src_md, memory::desc({k, n}, dt::f32, tag::any), bias_md, dst_md), attr,
        plan.eng);
  } catch (const dnnl::error&) {  // no implementation takes "any" weights: use them as stored
    pd = dnnl::matmul::primitive_desc(dnnl::matmul::desc(src_md, user_w, bias_md, dst_md), attr,
                                      plan.eng);
  }
  memory w = prepare_weights(plan, user_w, pd.weights_desc(), key + ".weight", seed);
  memory b = new_mem(plan, bias_md, key + ".bias", seed + 1);
  plan.steps.push_back({dnnl::matmul(pd), {{DNNL_ARG_SRC, src},
                                           {DNNL_ARG_WEIGHTS, w},
                                           {DNNL_ARG_BIAS, b},
                                           {DNNL_ARG_DST, dst}}});
  plan.what << name << "[matmul " << m << "x" << k << "x" << n << (gelu ? "+gelu_erf" : "")
            << " " << impl(pd) << "] ";
}

// seed: conv(3->64, 3x3, pad 1) -> global avg pool -> fc(64->512) | embedding(256->512)
//       -> concat -> fusion(1024->1024), batch 32, 224x224.
void build_seed(Plan& plan) {
  const memory::dim N = 32, IC = 3, OC = 64, H = 224, W = 224;
  const memory::dim VIS = 512, TXT_IN = 256, TXT = 512, OUT = 1024;

  // conv: src is the user's plain NCHW image; weights and dst in oneDNN's preferred layouts.
  memory image = new_mem(plan, memory::desc({N, IC, H, W}, dt::f32, tag::nchw), "input0", 100);
  const memory::desc conv_bias_md({OC}, dt::f32, tag::x);
  const memory::desc conv_w_user({OC, IC, 3, 3}, dt::f32, tag::oihw);
  auto conv_pd = dnnl::convolution_forward::primitive_desc(
      dnnl::convolution_forward::desc(
          prop_kind::forward_inference, algorithm::convolution_direct, image.get_desc(),
          memory::desc({OC, IC, 3, 3}, dt::f32, tag::any), conv_bias_md,
          memory::desc({N, OC, H, W}, dt::f32, tag::any), {1, 1}, {1, 1}, {1, 1}),
      plan.eng);
  if (conv_pd.src_desc() != image.get_desc())
    throw std::runtime_error("kernels_bare: the convolution wants a non-NCHW source layout");
  memory conv_w = prepare_weights(plan, conv_w_user, conv_pd.weights_desc(), "vision_model.conv.weight", 101);
  memory conv_b = new_mem(plan, conv_bias_md, "vision_model.conv.bias", 102);
  memory conv_dst = alloc(plan, conv_pd.dst_desc());
  plan.steps.push_back({dnnl::convolution_forward(conv_pd), {{DNNL_ARG_SRC, image},
                                                             {DNNL_ARG_WEIGHTS, conv_w},
                                                             {DNNL_ARG_BIAS, conv_b},
                                                             {DNNL_ARG_DST, conv_dst}}});
  plan.what << "conv[3->64 3x3 " << impl(conv_pd) << "] ";

  // global average pool on the conv's dst layout (224x224 window -> 1x1)
  auto pool_pd = dnnl::pooling_forward::primitive_desc(
      dnnl::pooling_forward::desc(prop_kind::forward_inference, algorithm::pooling_avg_exclude_padding,
                                  conv_dst.get_desc(), memory::desc({N, OC, 1, 1}, dt::f32, tag::any),
                                  {1, 1}, {H, W}, {0, 0}, {0, 0}),
      plan.eng);
  memory pooled = alloc(plan, pool_pd.dst_desc());
  plan.steps.push_back(
      {dnnl::pooling_forward(pool_pd), {{DNNL_ARG_SRC, conv_dst}, {DNNL_ARG_DST, pooled}}});
  plan.what << "pool[avg 224x224 " << impl(pool_pd) << "] ";

  // flatten: with a 1x1 window, nchw / nhwc / nChw{8,16}c (channels a multiple of the block)
  // all lay [N, C, 1, 1] out exactly as a row-major [N, C], so the pooled buffer is used as
  // the fc's 2-D source in place; any other layout gets a (timed) reorder to nchw first.
  const memory::desc flat_md({N, OC}, dt::f32, tag::ab);
  memory flat;
  bool in_place = false;
  for (auto [t, block] : {std::pair{tag::nchw, 1}, {tag::nhwc, 1}, {tag::nChw8c, 8},
                          {tag::nChw16c, 16}}) {
    if (OC % block == 0 && pool_pd.dst_desc() == memory::desc({N, OC, 1, 1}, dt::f32, t))
      in_place = true;
  }
  if (in_place) {
    flat = memory(flat_md, plan.eng, pooled.get_data_handle());
    plan.what << "flatten[in place] ";
  } else {
    flat = alloc(plan, flat_md);
    memory flat4(memory::desc({N, OC, 1, 1}, dt::f32, tag::nchw), plan.eng,
                 flat.get_data_handle());
    auto re_pd = dnnl::reorder::primitive_desc(pooled, flat4);
    plan.steps.push_back(
        {dnnl::reorder(re_pd), {{DNNL_ARG_FROM, pooled}, {DNNL_ARG_TO, flat4}}});
    plan.what << "flatten[reorder " << impl(re_pd) << "] ";
  }

  // concat sources: fc and embedding write straight into them.
  memory vis_feat = alloc(plan, memory::desc({N, VIS}, dt::f32, tag::ab));
  memory txt_feat = alloc(plan, memory::desc({N, TXT}, dt::f32, tag::ab));

  // fc (64->512)
  add_linear(plan, flat, vis_feat, N, OC, VIS, /*gelu=*/false, 103, "fc", "vision_model.fc");

  // embedding (256->512) on the text input
  memory text = new_mem(plan, memory::desc({N, TXT_IN}, dt::f32, tag::ab), "input1", 105);
  add_linear(plan, text, txt_feat, N, TXT_IN, TXT, /*gelu=*/false, 106, "embedding", "text_model.embedding");

  // concat [32,512] + [32,512] -> [32,1024]
  memory combined = alloc(plan, memory::desc({N, VIS + TXT}, dt::f32, tag::ab));
  auto cat_pd = dnnl::concat::primitive_desc(combined.get_desc(), 1,
                                             {vis_feat.get_desc(), txt_feat.get_desc()}, plan.eng);
  plan.steps.push_back({dnnl::concat(cat_pd), {{DNNL_ARG_MULTIPLE_SRC + 0, vis_feat},
                                               {DNNL_ARG_MULTIPLE_SRC + 1, txt_feat},
                                               {DNNL_ARG_DST, combined}}});
  plan.what << "concat[" << impl(cat_pd) << "] ";

  // fusion (1024->1024)
  memory out = alloc(plan, memory::desc({N, OUT}, dt::f32, tag::ab));
  add_linear(plan, combined, out, N, VIS + TXT, OUT, /*gelu=*/false, 108, "fusion", "text_model.fusion");
  plan.output = out;
}

// large: [46080,8] -> Linear(8,1280) -> Linear(1280,8)  (x is [32,1440,8] flattened)
void build_large(Plan& plan) {
  const memory::dim M = 32 * 1440, IN = 8, HID = 1280;
  memory x = new_mem(plan, memory::desc({M, IN}, dt::f32, tag::ab), "input0", 200);
  memory h = alloc(plan, memory::desc({M, HID}, dt::f32, tag::ab));
  memory y = alloc(plan, memory::desc({M, IN}, dt::f32, tag::ab));
  add_linear(plan, x, h, M, IN, HID, /*gelu=*/false, 201, "expand", "expand.proj");
  add_linear(plan, h, y, M, HID, IN, /*gelu=*/false, 203, "reduce", "reduce.proj");
  plan.output = y;
}

// chain8: 8 x (Linear(64,64) + exact GELU) on [1,64]: stage 0 reads the input, the next stages
// ping-pong between two buffers (the input is never overwritten, so every run computes the same).
void build_chain8(Plan& plan) {
  const memory::desc md({1, 64}, dt::f32, tag::ab);
  memory x = new_mem(plan, md, "input0", 300);
  memory a = alloc(plan, md);
  memory b = alloc(plan, md);
  for (int i = 0; i < 8; ++i) {
    const std::string name = "stage" + std::to_string(i);
    const memory& src = i == 0 ? x : (i % 2 == 1 ? a : b);
    const memory& dst = i % 2 == 0 ? a : b;
    add_linear(plan, src, dst, 1, 64, 64, /*gelu=*/true, 301 + 2 * static_cast<std::uint32_t>(i), name,
               name + ".fc");
  }
  plan.output = b;  // stage 7 wrote into b
}

void run_once(Plan& plan) {
  for (Step& s : plan.steps) s.prim.execute(plan.strm, s.args);
  plan.strm.wait();
}

/// Sets the OpenMP team size of the calling thread for a scope; restores it on the way out.
struct ThreadsGuard {
  int saved = omp_get_max_threads();
  explicit ThreadsGuard(int threads) {
    if (threads > 0) omp_set_num_threads(threads);
  }
  ~ThreadsGuard() { omp_set_num_threads(saved); }
};

}  // namespace

KernelsBare::KernelsBare(const std::string& workload, int threads, const BareData& data)
    : plan_(std::make_unique<Plan>()), threads_(threads) {
  if (workload != "seed" && workload != "large" && workload != "chain8")
    throw std::invalid_argument("kernels_bare: unknown workload '" + workload +
                                "' (expected seed, large or chain8)");
  // Set the team size before creating primitives (some implementations pick their blocking
  // from the thread count at creation time).
  ThreadsGuard guard(threads_);
  plan_->data = &data;
  if (workload == "seed") build_seed(*plan_);
  else if (workload == "large") build_large(*plan_);
  else build_chain8(*plan_);
  plan_->data = nullptr;

  const dnnl_version_t* v = dnnl_version();
  std::ostringstream what;
  what << "kernels_bare " << workload << ": oneDNN " << v->major << "." << v->minor << "."
       << v->patch << ", " << omp_get_max_threads() << " threads, " << plan_->steps.size()
       << " primitives: " << plan_->what.str();
  what_ = what.str();
  while (!what_.empty() && what_.back() == ' ') what_.pop_back();
}

KernelsBare::~KernelsBare() = default;

std::vector<double> KernelsBare::run(int iters) {
  if (iters < 1) throw std::invalid_argument("kernels_bare: iters must be >= 1, got " + std::to_string(iters));
  ThreadsGuard guard(threads_);
  std::vector<double> samples;
  samples.reserve(static_cast<std::size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    run_once(*plan_);
    const auto t1 = std::chrono::steady_clock::now();
    samples.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return samples;
}

std::vector<float> KernelsBare::output() const {
  const auto* p = static_cast<const float*>(plan_->output.get_data_handle());
  return {p, p + plan_->output.get_desc().get_size() / sizeof(float)};
}

}  // namespace devpipe::bench
