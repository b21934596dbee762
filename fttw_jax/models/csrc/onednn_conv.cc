// oneDNN convolutions for XLA:CPU as XLA FFI custom calls (conv_impl='onednn').
//
// Why: XLA:CPU runs convolutions, and above all their backward passes, through Eigen,
// several times slower than oneDNN on the same CPU (bench/RESULTS.md, issue 18). This
// jaxlib has no oneDNN rewriter of its own, so each conv of a train step calls oneDNN
// here: forward, backward-data and backward-weights of a 2-D float32 convolution,
// groups=1, no dilation.
//
// Layout: activations NHWC, kernels HWIO (Flax's), as XLA passes them; oneDNN picks
// the kernel's layout (format_tag::any) and the HWIO kernel, or its gradient, is
// reordered to and from it per call (kernels are small next to activations).
// Attributes: sh, sw (strides), pt, pb, pl, pr (top/bottom/left/right zero padding).
//   FttwOnednnConvFwd(x (N,H,W,Ci), w (KH,KW,Ci,Co)) -> y (N,Ho,Wo,Co)
//   FttwOnednnConvBwdData(dy (N,Ho,Wo,Co), w) -> dx (N,H,W,Ci)
//   FttwOnednnConvBwdWeights(x, dy) -> dw (KH,KW,Ci,Co)
//
// Primitives are built once per shape and kept (a map under a mutex), each with its own
// scratchpad: oneDNN's library-managed one is per thread, and XLA runs a call on
// whichever of its threads is free, not the one that built the primitive. Threads: this
// oneDNN build runs on OpenMP; calls are serialised by one mutex, so that the
// devices of a shard_map (XLA runs each on its own thread) never start several
// OpenMP teams on the same cores at once.

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

struct Geometry {
  memory::dims src, wei, dst, strides, pad_l, pad_r;  // logical dims: NCHW / OIHW
};

// One prepared call: the conv primitive and, when oneDNN's kernel layout is not
// HWIO, the reorder between the two and a buffer for the reordered kernel.
struct Plan {
  dnnl::primitive conv;
  std::vector<char> scratch;  // the conv's and the reorder's scratchpad (mode user)
  memory::desc wei_md;  // the conv's kernel layout
  bool reorder = false;
  dnnl::reorder wei_reorder;
  std::vector<float> wei_buf;
};

struct Runtime {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::mutex mu;
  std::map<std::tuple<int, std::vector<int64_t>>, std::unique_ptr<Plan>> plans;
};

Runtime& GetRuntime() {
  static Runtime* rt = new Runtime();  // never destroyed: outlives XLA's last call
  return *rt;
}

memory::desc Md(const memory::dims& d, tag t) {
  return memory::desc(d, memory::data_type::f32, t);
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc FwdPd(const dnnl::engine& e, const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      e, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Md(g.src, tag::nhwc), Md(g.wei, tag::any), Md(g.dst, tag::nhwc), g.strides, g.pad_l,
      g.pad_r, UserScratchpad());
}

std::unique_ptr<Plan> MakePlan(const dnnl::engine& e, Kind kind, const Geometry& g) {
  auto plan = std::make_unique<Plan>();
  auto fwd = FwdPd(e, g);
  memory::desc hwio = Md(g.wei, tag::hwio);
  size_t scratch = 0;
  if (kind == kFwd) {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->wei_md = fwd.weights_desc();
    scratch = fwd.scratchpad_desc().get_size();
  } else if (kind == kBwdData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        e, dnnl::algorithm::convolution_direct, Md(g.src, tag::nhwc), Md(g.wei, tag::any),
        Md(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd, UserScratchpad());
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->wei_md = pd.weights_desc();
    scratch = pd.scratchpad_desc().get_size();
  } else {
    dnnl::convolution_backward_weights::primitive_desc pd(
        e, dnnl::algorithm::convolution_direct, Md(g.src, tag::nhwc), Md(g.wei, tag::any),
        Md(g.dst, tag::nhwc), g.strides, g.pad_l, g.pad_r, fwd, UserScratchpad());
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->wei_md = pd.diff_weights_desc();
    scratch = pd.scratchpad_desc().get_size();
  }
  plan->reorder = plan->wei_md != hwio;
  if (plan->reorder) {
    plan->wei_buf.resize(plan->wei_md.get_size() / sizeof(float));
    auto pd = kind == kBwdWeights
                  ? dnnl::reorder::primitive_desc(e, plan->wei_md, e, hwio, UserScratchpad())
                  : dnnl::reorder::primitive_desc(e, hwio, e, plan->wei_md, UserScratchpad());
    plan->wei_reorder = dnnl::reorder(pd);
    scratch = std::max(scratch, pd.scratchpad_desc().get_size());
  }
  plan->scratch.resize(std::max<size_t>(scratch, 1));
  return plan;
}

ffi::Error Run(Kind kind, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t sh, int64_t sw, int64_t pt,
               int64_t pb, int64_t pl, int64_t pr) {
  // NHWC activations and the HWIO kernel, whichever of them are inputs or the output.
  auto x_dims = kind == kBwdData ? out->dimensions() : a.dimensions();
  auto w_dims = kind == kBwdWeights ? out->dimensions() : b.dimensions();
  auto y_dims = kind == kFwd ? out->dimensions() : kind == kBwdData ? a.dimensions()
                                                                     : b.dimensions();
  if (x_dims.size() != 4 || w_dims.size() != 4 || y_dims.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: expected 4-D NHWC / HWIO operands");
  if (x_dims[3] != w_dims[2] || y_dims[3] != w_dims[3] || x_dims[0] != y_dims[0])
    return ffi::Error::InvalidArgument("onednn_conv: operand shapes do not match");
  Geometry g{{x_dims[0], x_dims[3], x_dims[1], x_dims[2]},
             {w_dims[3], w_dims[2], w_dims[0], w_dims[1]},
             {y_dims[0], y_dims[3], y_dims[1], y_dims[2]},
             {sh, sw}, {pt, pl}, {pb, pr}};
  std::vector<int64_t> key;
  for (const auto* d : {&g.src, &g.wei, &g.dst, &g.strides, &g.pad_l, &g.pad_r})
    key.insert(key.end(), d->begin(), d->end());

  Runtime& rt = GetRuntime();
  std::lock_guard<std::mutex> lock(rt.mu);
  try {
    auto& slot = rt.plans[{kind, key}];
    if (!slot) slot = MakePlan(rt.engine, kind, g);
    Plan& p = *slot;
    const auto& e = rt.engine;
    auto mem = [&e](const memory::dims& d, tag t, const float* ptr) {
      return memory(Md(d, t), e, const_cast<float*>(ptr));
    };
    memory hwio = mem(g.wei, tag::hwio, kind == kBwdWeights ? out->typed_data() : b.typed_data());
    memory wei = p.reorder ? memory(p.wei_md, e, p.wei_buf.data()) : hwio;
    memory scratch(memory::desc({static_cast<int64_t>(p.scratch.size())},
                                memory::data_type::u8, tag::a), e, p.scratch.data());
    auto reorder = [&](memory& from, memory& to) {
      p.wei_reorder.execute(rt.stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to},
                                        {DNNL_ARG_SCRATCHPAD, scratch}});
    };
    if (p.reorder && kind != kBwdWeights) reorder(hwio, wei);
    if (kind == kFwd) {
      p.conv.execute(rt.stream, {{DNNL_ARG_SCRATCHPAD, scratch},
                                 {DNNL_ARG_SRC, mem(g.src, tag::nhwc, a.typed_data())},
                                 {DNNL_ARG_WEIGHTS, wei},
                                 {DNNL_ARG_DST, mem(g.dst, tag::nhwc, out->typed_data())}});
    } else if (kind == kBwdData) {
      p.conv.execute(rt.stream, {{DNNL_ARG_SCRATCHPAD, scratch},
                                 {DNNL_ARG_DIFF_DST, mem(g.dst, tag::nhwc, a.typed_data())},
                                 {DNNL_ARG_WEIGHTS, wei},
                                 {DNNL_ARG_DIFF_SRC, mem(g.src, tag::nhwc, out->typed_data())}});
    } else {
      p.conv.execute(rt.stream, {{DNNL_ARG_SCRATCHPAD, scratch},
                                 {DNNL_ARG_SRC, mem(g.src, tag::nhwc, a.typed_data())},
                                 {DNNL_ARG_DIFF_DST, mem(g.dst, tag::nhwc, b.typed_data())},
                                 {DNNL_ARG_DIFF_WEIGHTS, wei}});
      if (p.reorder) reorder(wei, hwio);
    }
    rt.stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN: ") + err.what());
  }
  return ffi::Error::Success();
}

template <Kind kind>
ffi::Error Handler(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                   ffi::Result<ffi::Buffer<ffi::F32>> out, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  return Run(kind, a, b, out, sh, sw, pt, pb, pl, pr);
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("pt")
      .Attr<int64_t>("pb")
      .Attr<int64_t>("pl")
      .Attr<int64_t>("pr");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FttwOnednnConvFwd, Handler<kFwd>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FttwOnednnConvBwdData, Handler<kBwdData>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FttwOnednnConvBwdWeights, Handler<kBwdWeights>, Binding());
