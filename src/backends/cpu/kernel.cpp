#include "backends/cpu/kernel.h"

#include <cstdlib>

namespace devpipe::cpu {

namespace {

std::size_t round_up_64(std::size_t n) { return (n + 63) / 64 * 64; }

std::shared_ptr<void> aligned_block(std::size_t bytes) {
  void* p = std::aligned_alloc(64, round_up_64(bytes == 0 ? 1 : bytes));
  if (!p)
    throw OutOfMemory("cpu backend: allocation of " + std::to_string(bytes) + " bytes failed");
  return std::shared_ptr<void>(p, [](void* q) { std::free(q); });
}

void check(dnnl_status_t status, const std::string& where, const char* what) {
  if (status != dnnl_success) {
    throw Error("cpu backend: " + std::string(what) + " failed in " + where + " (oneDNN status " +
                std::to_string(static_cast<int>(status)) + ")");
  }
}

}  // namespace

std::size_t DnnlKernel::add_scratch(std::size_t bytes) {
  std::size_t off = scratch_;
  scratch_ += round_up_64(bytes);
  return off;
}

void DnnlKernel::add_step(const dnnl::primitive& prim, const std::vector<Arg>& args) {
  Step step;
  step.prim = prim;
  step.mems.reserve(args.size());
  step.args.reserve(args.size());
  for (const Arg& a : args) {
    dnnl::memory mem(a.md, cpu_engine(), DNNL_MEMORY_NONE);
    if (a.ref.kind == BufRef::Kind::Fixed) mem.set_data_handle(a.ref.fixed);
    step.args.push_back({a.arg, mem.get()});
    step.mems.push_back(std::move(mem));
    step.refs.push_back(a.ref);
  }
  steps_.push_back(std::move(step));
}

void DnnlKernel::bind(const BindContext& cx) {
  dynamic_.clear();
  for (Step& step : steps_) {
    for (std::size_t i = 0; i < step.mems.size(); ++i) {
      const BufRef& ref = step.refs[i];
      switch (ref.kind) {
        case BufRef::Kind::Value: {
          std::byte* base = cx.values[static_cast<std::size_t>(ref.value)];
          if (base) {
            step.mems[i].set_data_handle(base + ref.offset);
          } else {
            dynamic_.push_back({step.mems[i].get(), ref.value, ref.offset});
          }
          break;
        }
        case BufRef::Kind::Scratch:
          step.mems[i].set_data_handle(cx.scratch + ref.offset);
          break;
        case BufRef::Kind::Fixed:
          break;
      }
    }
  }
}

void DnnlKernel::run(const RunContext& cx) {
  for (const Dynamic& d : dynamic_) {
    check(dnnl_memory_set_data_handle_v2(d.mem, cx.values[d.value] + d.offset, nullptr), where,
          "setting a memory handle");
  }
  for (const Step& step : steps_) {
    check(dnnl_primitive_execute(step.prim.get(), cx.stream.get(),
                                 static_cast<int>(step.args.size()), step.args.data()),
          where, "executing a oneDNN primitive");
  }
}

dnnl::primitive_attr user_scratch_attr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

void add_reorder(DnnlKernel& k, const DnnlDesc& src_md, const BufRef& src, const DnnlDesc& dst_md,
                 const BufRef& dst) {
  dnnl::reorder::primitive_desc pd(cpu_engine(), src_md, cpu_engine(), dst_md, user_scratch_attr());
  std::vector<DnnlKernel::Arg> args{{DNNL_ARG_FROM, src_md, src}, {DNNL_ARG_TO, dst_md, dst}};
  DnnlDesc sp = pd.scratchpad_desc();
  if (sp.get_size() > 0) {
    args.push_back({DNNL_ARG_SCRATCHPAD, sp, BufRef::of_scratch(k.add_scratch(sp.get_size()))});
  }
  k.add_step(dnnl::reorder(pd), args);
}

void add_primitive(DnnlKernel& k, const BuildContext& cx, const dnnl::primitive_desc_base& pd,
                   const std::vector<Operand>& inputs, const std::vector<Operand>& outputs) {
  std::vector<DnnlKernel::Arg> args;
  struct Post {
    DnnlDesc from;
    std::size_t scratch;
    const Operand* to;
  };
  std::vector<Post> post;
  for (const Operand& op : inputs) {
    DnnlDesc want = pd.query_md(dnnl::query::exec_arg_md, op.arg);
    BufRef ref = BufRef::of_value(op.value, op.offset);
    if (want == op.md) {
      args.push_back({op.arg, want, ref});
      continue;
    }
    std::byte* fixed = cx.fixed[static_cast<std::size_t>(op.value)];
    if (fixed) {
      // Weights: convert once now into memory the kernel keeps.
      auto block = aligned_block(want.get_size());
      dnnl::memory from(op.md, cpu_engine(), fixed + op.offset);
      dnnl::memory to(want, cpu_engine(), block.get());
      dnnl::stream s(cpu_engine());
      dnnl::reorder(from, to).execute(s, from, to);
      s.wait();
      k.keep(block);
      args.push_back({op.arg, want, BufRef::of_fixed(block.get())});
    } else {
      std::size_t off = k.add_scratch(want.get_size());
      add_reorder(k, op.md, ref, want, BufRef::of_scratch(off));
      args.push_back({op.arg, want, BufRef::of_scratch(off)});
    }
  }
  for (const Operand& op : outputs) {
    DnnlDesc want = pd.query_md(dnnl::query::exec_arg_md, op.arg);
    if (want == op.md) {
      args.push_back({op.arg, want, BufRef::of_value(op.value, op.offset)});
      continue;
    }
    std::size_t off = k.add_scratch(want.get_size());
    args.push_back({op.arg, want, BufRef::of_scratch(off)});
    post.push_back({want, off, &op});
  }
  DnnlDesc sp = pd.scratchpad_desc();
  if (sp.get_size() > 0) {
    args.push_back({DNNL_ARG_SCRATCHPAD, sp, BufRef::of_scratch(k.add_scratch(sp.get_size()))});
  }
  k.add_step(dnnl::primitive(pd.get()), args);
  for (const Post& p : post) {
    add_reorder(k, p.from, BufRef::of_scratch(p.scratch), p.to->md,
                BufRef::of_value(p.to->value, p.to->offset));
  }
}

std::unique_ptr<Kernel> make_kernel(const BuildContext& cx) {
  switch (cx.node.op) {
    case OpKind::Linear:
      return make_linear_kernel(cx);
    case OpKind::Matmul:
      return make_matmul_kernel(cx);
    case OpKind::Conv2d:
      return make_conv2d_kernel(cx);
    case OpKind::Conv2dGlobalAvgPool:
      return make_conv_global_avg_pool_kernel(cx);
    case OpKind::ConvPatchMean:
      return make_conv_patch_mean_kernel(cx);
    case OpKind::AdaptiveAvgPool2d:
      return make_adaptive_avg_pool_kernel(cx);
    case OpKind::MaxPool2d:
      return make_max_pool_kernel(cx);
    case OpKind::Embedding:
      return make_embedding_kernel(cx);
    case OpKind::LayerNorm:
      return make_layer_norm_kernel(cx);
    case OpKind::RmsNorm:
      return make_rms_norm_kernel(cx);
    case OpKind::Permute:
      return make_permute_kernel(cx);
    case OpKind::Concat:
      return make_concat_kernel(cx);
    case OpKind::Slice:
      return make_slice_kernel(cx);
    case OpKind::Add:
    case OpKind::Mul:
    case OpKind::Sub:
    case OpKind::Div:
      return make_binary_kernel(cx);
    case OpKind::Softmax:
      return make_softmax_kernel(cx);
    case OpKind::Gelu:
    case OpKind::Silu:
    case OpKind::Relu:
    case OpKind::Exp:
    case OpKind::Tanh:
    case OpKind::Sigmoid:
      return make_eltwise_kernel(cx);
    case OpKind::Neg:
    case OpKind::AddScalar:
    case OpKind::MulScalar:
      if (cx.out().dtype == DType::Int64) return make_int64_affine_kernel(cx);
      return make_eltwise_kernel(cx);
    case OpKind::Full:
    case OpKind::Arange:
      return make_constant_kernel(cx);
    case OpKind::Sum:
    case OpKind::Mean:
      return make_reduce_kernel(cx);
    case OpKind::ArgMax:
      return make_argmax_kernel(cx);
    case OpKind::IndexSelect:
      return make_index_select_kernel(cx);
    case OpKind::Gather:
      return make_gather_kernel(cx);
    case OpKind::Where:
      return make_where_kernel(cx);
    case OpKind::MaskedFill:
      return make_masked_fill_kernel(cx);
    case OpKind::RotaryEmbedding:
      return make_rotary_kernel(cx);
    case OpKind::ScaledDotProductAttention:
    case OpKind::MaskedAttention:
      return make_attention_kernel(cx);
    case OpKind::AllReduce:
    case OpKind::AllGather:
      return make_collective_kernel(cx);
    case OpKind::StateWrite:
      return make_state_write_kernel(cx);
    case OpKind::Sample:
      return make_sample_kernel(cx);
    case OpKind::Reshape:
      break;  // an alias; the executor never asks for a kernel
  }
  throw Unsupported("cpu backend: no kernel for " + cx.where);
}

}  // namespace devpipe::cpu
