// oneDNN convolutions for XLA:CPU, as an XLA FFI handler (alexnet_jax/onednn.py builds it).
//
// One handler, three passes (attribute `which`) of a 2-D convolution on NHWC images and
// HWIO kernels (JAX's ("NHWC", "HWIO", "NHWC")), grouped as lax.conv_general_dilated's
// feature_group_count:
//   which 0, forward:          a = x (N,H,W,C),      b = kernel (KH,KW,C/G,O) -> y (N,OH,OW,O)
//   which 1, input gradient:   a = dy (N,OH,OW,O),   b = kernel               -> dx (N,H,W,C)
//   which 2, kernel gradient:  a = x,                b = dy                   -> dkernel
// Operands and results are float32 or bfloat16 (each may differ: oneDNN accumulates in
// float32 and rounds once). The images stay NHWC; the kernel is reordered into the layout
// oneDNN's primitive chose for this shape and CPU (and the kernel gradient back), as
// PyTorch's channels_last convolutions do. Primitives are made once per shape and reused.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

#if DNNL_VERSION_MAJOR < 3
#error "oneDNN 3.0 or newer is needed (pip install onednn-devel-cpu-gomp)"
#endif

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;
using Type = dnnl::memory::data_type;

namespace {

struct Plan {
  dnnl::primitive primitive;
  memory::desc image, output;        // x and y (or their gradients), NHWC
  memory::desc user_kernel, kernel;  // HWIO (HWIGO with groups) and the primitive's layout
  dnnl::reorder to_primitive, to_user;
  memory::desc scratchpad;
};

using Key = std::vector<int64_t>;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

Type ToDnnl(ffi::DataType type) {
  if (type == ffi::DataType::F32) return Type::f32;
  if (type == ffi::DataType::BF16) return Type::bf16;
  return Type::undef;
}

memory::dims Dims(ffi::AnyBuffer::Dimensions d) { return memory::dims(d.begin(), d.end()); }

std::shared_ptr<Plan> MakePlan(int64_t pass, const memory::dims& x, const memory::dims& k,
                               const memory::dims& y, Type xt, Type kt, Type yt,
                               const memory::dims& strides, const memory::dims& pad_lo,
                               const memory::dims& pad_hi, int64_t groups) {
  auto& engine = Engine();
  auto plan = std::make_shared<Plan>();
  memory::dims xd = {x[0], x[3], x[1], x[2]}, yd = {y[0], y[3], y[1], y[2]};
  memory::dims kd = groups == 1 ? memory::dims{k[3], k[2], k[0], k[1]}
                                : memory::dims{groups, k[3] / groups, k[2], k[0], k[1]};
  Tag user_tag = groups == 1 ? Tag::hwio : Tag::hwigo;
  plan->image = memory::desc(xd, xt, Tag::nhwc);
  plan->output = memory::desc(yd, yt, Tag::nhwc);
  plan->user_kernel = memory::desc(kd, kt, user_tag);
  memory::desc any_kernel(kd, kt, Tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto direct = dnnl::algorithm::convolution_direct;
  if (pass == 0) {
    dnnl::convolution_forward::primitive_desc pd(
        engine, dnnl::prop_kind::forward_training, direct, plan->image, any_kernel,
        plan->output, strides, pad_lo, pad_hi, attr);
    plan->primitive = dnnl::convolution_forward(pd);
    plan->kernel = pd.weights_desc();
    plan->scratchpad = pd.scratchpad_desc();
  } else {
    // The backward passes take the forward's description as a hint, in the gradients' types.
    Type ft = pass == 1 ? yt : xt;
    dnnl::convolution_forward::primitive_desc hint(
        engine, dnnl::prop_kind::forward_training, direct, memory::desc(xd, ft, Tag::nhwc),
        memory::desc(kd, ft, Tag::any), memory::desc(yd, ft, Tag::nhwc), strides, pad_lo,
        pad_hi);
    if (pass == 1) {
      dnnl::convolution_backward_data::primitive_desc pd(engine, direct, plan->image,
                                                         any_kernel, plan->output, strides,
                                                         pad_lo, pad_hi, hint, attr);
      plan->primitive = dnnl::convolution_backward_data(pd);
      plan->kernel = pd.weights_desc();
      plan->scratchpad = pd.scratchpad_desc();
    } else {
      dnnl::convolution_backward_weights::primitive_desc pd(engine, direct, plan->image,
                                                            any_kernel, plan->output, strides,
                                                            pad_lo, pad_hi, hint, attr);
      plan->primitive = dnnl::convolution_backward_weights(pd);
      plan->kernel = pd.diff_weights_desc();
      plan->scratchpad = pd.scratchpad_desc();
    }
  }
  if (plan->kernel != plan->user_kernel) {
    if (pass == 2) {
      plan->to_user = dnnl::reorder(
          dnnl::reorder::primitive_desc(engine, plan->kernel, engine, plan->user_kernel));
    } else {
      plan->to_primitive = dnnl::reorder(
          dnnl::reorder::primitive_desc(engine, plan->user_kernel, engine, plan->kernel));
    }
  }
  return plan;
}

std::mutex plans_mutex;
std::map<Key, std::shared_ptr<Plan>>& Plans() {
  static auto* plans = new std::map<Key, std::shared_ptr<Plan>>();
  return *plans;
}

ffi::Error Convolve(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                    int64_t pass, int64_t stride_h, int64_t stride_w, int64_t pad_top,
                    int64_t pad_bottom, int64_t pad_left, int64_t pad_right, int64_t groups) {
  if (pass < 0 || pass > 2) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attribute which must be 0, 1 or 2");
  }
  if (a.dimensions().size() != 4 || b.dimensions().size() != 4 ||
      out->dimensions().size() != 4 || groups < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "operands and result must be 4-D, groups at least 1");
  }
  Type at = ToDnnl(a.element_type()), bt = ToDnnl(b.element_type());
  Type ot = ToDnnl(out->element_type());
  if (at == Type::undef || bt == Type::undef || ot == Type::undef) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dtypes must be float32 or bfloat16");
  }
  memory::dims ad = Dims(a.dimensions()), bd = Dims(b.dimensions());
  memory::dims od = Dims(out->dimensions());
  Key key = {pass, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, groups,
             static_cast<int64_t>(at), static_cast<int64_t>(bt), static_cast<int64_t>(ot)};
  for (const auto* dims : {&ad, &bd, &od}) key.insert(key.end(), dims->begin(), dims->end());
  try {
    std::shared_ptr<Plan> plan;
    {
      std::lock_guard<std::mutex> lock(plans_mutex);
      auto found = Plans().find(key);
      if (found != Plans().end()) plan = found->second;
    }
    if (!plan) {
      memory::dims strides = {stride_h, stride_w};
      memory::dims pad_lo = {pad_top, pad_left}, pad_hi = {pad_bottom, pad_right};
      if (pass == 0) {
        plan = MakePlan(pass, ad, bd, od, at, bt, ot, strides, pad_lo, pad_hi, groups);
      } else if (pass == 1) {
        plan = MakePlan(pass, od, bd, ad, ot, bt, at, strides, pad_lo, pad_hi, groups);
      } else {
        plan = MakePlan(pass, ad, od, bd, at, ot, bt, strides, pad_lo, pad_hi, groups);
      }
      std::lock_guard<std::mutex> lock(plans_mutex);
      Plans().emplace(key, plan);
    }
    auto& engine = Engine();
    dnnl::stream stream(engine);
    // Work space of this call alone (concurrent calls share plans, not buffers), left
    // uninitialized: oneDNN writes before it reads.
    std::unique_ptr<uint8_t[]> scratch(new uint8_t[plan->scratchpad.get_size()]);
    memory scratchpad(plan->scratchpad, engine, scratch.get());
    std::unique_ptr<uint8_t[]> reordered;
    if (pass == 2) {
      memory x(plan->image, engine, a.untyped_data());
      memory dy(plan->output, engine, b.untyped_data());
      memory user_dk(plan->user_kernel, engine, out->untyped_data());
      memory dk = user_dk;
      if (plan->kernel != plan->user_kernel) {
        reordered.reset(new uint8_t[plan->kernel.get_size()]);
        dk = memory(plan->kernel, engine, reordered.get());
      }
      plan->primitive.execute(stream, {{DNNL_ARG_SRC, x},
                                       {DNNL_ARG_DIFF_DST, dy},
                                       {DNNL_ARG_DIFF_WEIGHTS, dk},
                                       {DNNL_ARG_SCRATCHPAD, scratchpad}});
      if (plan->kernel != plan->user_kernel) plan->to_user.execute(stream, dk, user_dk);
    } else {
      memory user_kernel(plan->user_kernel, engine, b.untyped_data());
      memory kernel = user_kernel;
      if (plan->kernel != plan->user_kernel) {
        reordered.reset(new uint8_t[plan->kernel.get_size()]);
        kernel = memory(plan->kernel, engine, reordered.get());
        plan->to_primitive.execute(stream, user_kernel, kernel);
      }
      if (pass == 0) {
        memory x(plan->image, engine, a.untyped_data());
        memory y(plan->output, engine, out->untyped_data());
        plan->primitive.execute(stream, {{DNNL_ARG_SRC, x},
                                         {DNNL_ARG_WEIGHTS, kernel},
                                         {DNNL_ARG_DST, y},
                                         {DNNL_ARG_SCRATCHPAD, scratchpad}});
      } else {
        memory dy(plan->output, engine, a.untyped_data());
        memory dx(plan->image, engine, out->untyped_data());
        plan->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, dy},
                                         {DNNL_ARG_WEIGHTS, kernel},
                                         {DNNL_ARG_DIFF_SRC, dx},
                                         {DNNL_ARG_SCRATCHPAD, scratchpad}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 when oneDNN convolves bfloat16 with a kernel of its own on this CPU (AVX512-BF16, AMX,
// AVX2-VNNI-2); 0 when it would fall back to its reference loops, far slower than XLA's.
extern "C" int AlexnetOnednnFastBf16() {
  try {
    memory::desc x({2, 32, 8, 8}, Type::bf16, Tag::nhwc), y({2, 32, 8, 8}, Type::bf16, Tag::nhwc);
    memory::desc k({32, 32, 3, 3}, Type::bf16, Tag::any);
    dnnl::convolution_forward::primitive_desc pd(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x, k,
        y, {1, 1}, {1, 1}, {1, 1});
    return std::string(pd.impl_info_str()).rfind("ref", 0) == 0 ? 0 : 1;
  } catch (const dnnl::error&) {
    return 0;
  }
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnConv, Convolve,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("which")
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("groups"));
