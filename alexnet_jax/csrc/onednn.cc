// oneDNN's convolutions and matrix products for XLA:CPU, as XLA FFI handlers
// (alexnet_jax/onednn.py builds them).
//
// AlexnetOnednnConv: one handler, three passes (attribute `which`) of a 2-D convolution on
// NHWC images and HWIO kernels (JAX's ("NHWC", "HWIO", "NHWC")), grouped as
// lax.conv_general_dilated's feature_group_count:
//   which 0, forward:          a = x (N,H,W,C),      b = kernel (KH,KW,C/G,O) -> y (N,OH,OW,O)
//   which 1, input gradient:   a = dy (N,OH,OW,O),   b = kernel               -> dx (N,H,W,C)
//   which 2, kernel gradient:  a = x,                b = dy                   -> dkernel
// Operands and results are float32 or bfloat16 (each may differ: oneDNN accumulates in
// float32 and rounds once). The images stay NHWC; the kernel is reordered into the layout
// oneDNN's primitive chose for this shape and CPU (and the kernel gradient back), as
// PyTorch's channels_last convolutions do. Primitives are made once per shape and reused.
//
// AlexnetOnednnMatmul: c (M,N) = op(a) @ op(b) for row-major a and b, where op(a) is a
// (M,K), or a (K,M) transposed when `transpose_a` is 1 (likewise b, (K,N) or (N,K)): the
// dense layers' forward (x @ kernel), input gradient (dy @ kernel.T) and kernel gradient
// (x.T @ dy), each read in place. Each operand and the result is read as a matrix: its first
// dimension by the product of the others, so a dense layer reads pooled (N,H,W,C) images as
// the (N,H*W*C) rows they are, with no reshape for XLA to fuse into their producer. a and b
// are both float32 or both bfloat16; c is float32 or bfloat16 (a bfloat16 product
// accumulates in float32 and rounds once, if at all).
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

// A buffer of two or more dimensions as a row-major matrix: (its first dimension, the
// product of the others). False for fewer dimensions.
bool AsMatrix(ffi::AnyBuffer::Dimensions d, int64_t& rows, int64_t& cols) {
  if (d.size() < 2) return false;
  rows = d[0];
  cols = 1;
  for (size_t i = 1; i < d.size(); ++i) cols *= d[i];
  return true;
}

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

// Plans by shape, shared by concurrent calls (each brings its own work space).
template <typename P>
class PlanCache {
 public:
  template <typename Make>
  std::shared_ptr<P> Get(const Key& key, Make make) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = plans_.find(key);
      if (found != plans_.end()) return found->second;
    }
    std::shared_ptr<P> plan = make();  // outside the lock: oneDNN may JIT-compile here
    std::lock_guard<std::mutex> lock(mutex_);
    return plans_.emplace(key, plan).first->second;
  }

 private:
  std::mutex mutex_;
  std::map<Key, std::shared_ptr<P>> plans_;
};

// oneDNN's exception as the FFI's error.
ffi::Error Failed(const dnnl::error& e) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
}

// Work space of one call (concurrent calls share plans, not buffers), left uninitialized:
// oneDNN writes before it reads.
struct Scratchpad {
  Scratchpad(const memory::desc& desc, const dnnl::engine& engine)
      : bytes(new uint8_t[desc.get_size()]), buffer(desc, engine, bytes.get()) {}
  std::unique_ptr<uint8_t[]> bytes;
  memory buffer;
};

PlanCache<Plan>& ConvPlans() {
  static auto* plans = new PlanCache<Plan>();
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
    std::shared_ptr<Plan> plan = ConvPlans().Get(key, [&] {
      memory::dims strides = {stride_h, stride_w};
      memory::dims pad_lo = {pad_top, pad_left}, pad_hi = {pad_bottom, pad_right};
      if (pass == 0) {
        return MakePlan(pass, ad, bd, od, at, bt, ot, strides, pad_lo, pad_hi, groups);
      } else if (pass == 1) {
        return MakePlan(pass, od, bd, ad, ot, bt, at, strides, pad_lo, pad_hi, groups);
      }
      return MakePlan(pass, ad, od, bd, at, ot, bt, strides, pad_lo, pad_hi, groups);
    });
    auto& engine = Engine();
    dnnl::stream stream(engine);
    Scratchpad scratchpad(plan->scratchpad, engine);
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
                                       {DNNL_ARG_SCRATCHPAD, scratchpad.buffer}});
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
                                         {DNNL_ARG_SCRATCHPAD, scratchpad.buffer}});
      } else {
        memory dy(plan->output, engine, a.untyped_data());
        memory dx(plan->image, engine, out->untyped_data());
        plan->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, dy},
                                         {DNNL_ARG_WEIGHTS, kernel},
                                         {DNNL_ARG_DIFF_SRC, dx},
                                         {DNNL_ARG_SCRATCHPAD, scratchpad.buffer}});
      }
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failed(e);
  }
  return ffi::Error::Success();
}

struct MatmulPlan {
  dnnl::matmul primitive;
  memory::desc a, b, c, scratchpad;
};

PlanCache<MatmulPlan>& MatmulPlans() {
  static auto* plans = new PlanCache<MatmulPlan>();
  return *plans;
}

// A row-major (rows, cols) buffer read as its (rows, cols) matrix, or as the transposed
// (cols, rows) one.
memory::desc Matrix(int64_t rows, int64_t cols, Type type, bool transposed) {
  return transposed ? memory::desc({cols, rows}, type, memory::dims{1, cols})
                    : memory::desc({rows, cols}, type, memory::dims{cols, 1});
}

// c = a @ b on a matmul primitive, with work space of its own.
void RunMatmul(const dnnl::matmul& primitive, const memory::desc& scratch, const memory& a,
               const memory& b, const memory& c) {
  auto& engine = Engine();
  dnnl::stream stream(engine);
  Scratchpad scratchpad(scratch, engine);
  primitive.execute(stream, {{DNNL_ARG_SRC, a},
                             {DNNL_ARG_WEIGHTS, b},
                             {DNNL_ARG_DST, c},
                             {DNNL_ARG_SCRATCHPAD, scratchpad.buffer}});
  stream.wait();
}

ffi::Error Multiply(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::AnyBuffer> out,
                    int64_t transpose_a, int64_t transpose_b) {
  int64_t ad[2], bd[2], cd[2];  // each read as a matrix
  if (!AsMatrix(a.dimensions(), ad[0], ad[1]) || !AsMatrix(b.dimensions(), bd[0], bd[1]) ||
      !AsMatrix(out->dimensions(), cd[0], cd[1])) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "operands and result must have at least 2 dimensions");
  }
  int64_t m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  int64_t kb = transpose_b ? bd[1] : bd[0], n = transpose_b ? bd[0] : bd[1];
  if (k != kb || cd[0] != m || cd[1] != n) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "shapes do not multiply: (" + std::to_string(m) + "," +
                          std::to_string(k) + ") @ (" + std::to_string(kb) + "," +
                          std::to_string(n) + ") -> (" + std::to_string(cd[0]) + "," +
                          std::to_string(cd[1]) + ")");
  }
  Type at = ToDnnl(a.element_type()), bt = ToDnnl(b.element_type());
  Type ct = ToDnnl(out->element_type());
  if (at == Type::undef || at != bt || ct == Type::undef) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "operands must be both float32 or both bfloat16, the result either");
  }
  Key key = {transpose_a != 0, transpose_b != 0, m, k, n, static_cast<int64_t>(at),
             static_cast<int64_t>(ct)};
  try {
    std::shared_ptr<MatmulPlan> plan = MatmulPlans().Get(key, [&] {
      auto plan = std::make_shared<MatmulPlan>();
      plan->a = Matrix(ad[0], ad[1], at, transpose_a != 0);
      plan->b = Matrix(bd[0], bd[1], bt, transpose_b != 0);
      plan->c = Matrix(m, n, ct, false);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      dnnl::matmul::primitive_desc pd(Engine(), plan->a, plan->b, plan->c, attr);
      plan->primitive = dnnl::matmul(pd);
      plan->scratchpad = pd.scratchpad_desc();
      return plan;
    });
    auto& engine = Engine();
    memory am(plan->a, engine, a.untyped_data()), bm(plan->b, engine, b.untyped_data());
    memory cm(plan->c, engine, out->untyped_data());
    RunMatmul(plan->primitive, plan->scratchpad, am, bm, cm);
  } catch (const dnnl::error& e) {
    return Failed(e);
  }
  return ffi::Error::Success();
}


// The layout oneDNN's matmul chooses for a (K,N) kernel multiplied by `rows` rows.
memory::desc PackedKernel(int64_t rows, int64_t k, int64_t n, Type type) {
  dnnl::matmul::primitive_desc pd(Engine(), Matrix(rows, k, type, false),
                                  memory::desc({k, n}, type, Tag::any),
                                  Matrix(rows, n, type, false));
  return pd.weights_desc();
}

struct PackedPlan {
  dnnl::matmul primitive;
  memory::desc a, packed, kernel, c, scratchpad;  // kernel: the primitive's layout
  dnnl::reorder to_primitive;                     // where it differs from the packed one
};

PlanCache<PackedPlan>& PackedPlans() {
  static auto* plans = new PlanCache<PackedPlan>();
  return *plans;
}

// A (K,N) kernel, row-major, into the layout PackedKernel(rows, K, N) (a flat byte buffer).
ffi::Error Pack(ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> out, int64_t rows) {
  auto kd = kernel.dimensions();
  Type type = ToDnnl(kernel.element_type());
  if (kd.size() != 2 || type == Type::undef || rows < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "pack takes a 2-D float32 or bfloat16 kernel and rows >= 1");
  }
  try {
    memory::desc packed = PackedKernel(rows, kd[0], kd[1], type);
    if (out->size_bytes() != packed.get_size()) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "packed buffer of the wrong size");
    }
    auto& engine = Engine();
    dnnl::stream stream(engine);
    memory user(Matrix(kd[0], kd[1], type, false), engine, kernel.untyped_data());
    memory dst(packed, engine, out->untyped_data());
    dnnl::reorder(user, dst).execute(stream, user, dst);
    stream.wait();
  } catch (const dnnl::error& e) {
    return Failed(e);
  }
  return ffi::Error::Success();
}

// c (M,N) = a (M,K) @ the kernel Pack(rows) wrote; `features` is N. a and c are read as
// matrices (AsMatrix). Where no optimized kernel takes the packed layout for this M, it is
// reordered at each call.
ffi::Error MultiplyPacked(ffi::AnyBuffer a, ffi::AnyBuffer packed,
                          ffi::Result<ffi::AnyBuffer> out, int64_t rows, int64_t features) {
  int64_t ad[2], cd[2];
  Type type = ToDnnl(a.element_type()), ct = ToDnnl(out->element_type());
  if (!AsMatrix(a.dimensions(), ad[0], ad[1]) || !AsMatrix(out->dimensions(), cd[0], cd[1]) ||
      cd[0] != ad[0] || cd[1] != features || type == Type::undef || ct == Type::undef ||
      rows < 1) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "packed product: a (M,K) float32 or bfloat16, a result (M,features)");
  }
  int64_t m = ad[0], k = ad[1], n = features;
  Key key = {rows, m, k, n, static_cast<int64_t>(type), static_cast<int64_t>(ct)};
  try {
    std::shared_ptr<PackedPlan> plan = PackedPlans().Get(key, [&] {
      auto plan = std::make_shared<PackedPlan>();
      plan->a = Matrix(m, k, type, false);
      plan->c = Matrix(m, n, ct, false);
      plan->packed = PackedKernel(rows, k, n, type);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      // The packed layout as it is, where an optimized kernel takes it for this M (the
      // layout is chosen by the kernel's shape, so another M usually takes it too); else
      // the layout oneDNN prefers for this M, reordered into at each call.
      dnnl::matmul::primitive_desc pd;
      try {
        pd = dnnl::matmul::primitive_desc(Engine(), plan->a, plan->packed, plan->c, attr);
      } catch (const dnnl::error&) {
      }
      if (!pd || std::string(pd.impl_info_str()).rfind("ref", 0) == 0) {
        pd = dnnl::matmul::primitive_desc(Engine(), plan->a,
                                          memory::desc({k, n}, type, Tag::any), plan->c, attr);
      }
      plan->primitive = dnnl::matmul(pd);
      plan->kernel = pd.weights_desc();
      plan->scratchpad = pd.scratchpad_desc();
      if (plan->kernel != plan->packed) {
        plan->to_primitive = dnnl::reorder(dnnl::reorder::primitive_desc(
            Engine(), plan->packed, Engine(), plan->kernel));
      }
      return plan;
    });
    if (packed.size_bytes() != plan->packed.get_size()) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                        "the packed kernel was packed for another shape or type");
    }
    auto& engine = Engine();
    memory kernel(plan->packed, engine, packed.untyped_data());
    std::unique_ptr<uint8_t[]> reordered;
    if (plan->kernel != plan->packed) {
      reordered.reset(new uint8_t[plan->kernel.get_size()]);
      memory target(plan->kernel, engine, reordered.get());
      dnnl::stream stream(engine);
      plan->to_primitive.execute(stream, kernel, target);
      stream.wait();
      kernel = target;
    }
    memory am(plan->a, engine, a.untyped_data()), cm(plan->c, engine, out->untyped_data());
    RunMatmul(plan->primitive, plan->scratchpad, am, kernel, cm);
  } catch (const dnnl::error& e) {
    return Failed(e);
  }
  return ffi::Error::Success();
}

}  // namespace

// 1 when this CPU has bfloat16 arithmetic oneDNN uses (AVX512-BF16, which AMX CPUs have too,
// or AVX2-VNNI-2) and oneDNN's bfloat16 convolution and matmul are kernels of its own there;
// 0 otherwise. Without those instructions oneDNN still runs bfloat16, but emulated (on an
// AVX-512 Ice Lake Xeon 2.5-4x slower than its float32 kernels) or in its reference loops, so
// onednn.py hands it bfloat16 values widened to float32 instead.
extern "C" int AlexnetOnednnNativeBf16() {
  auto isa = static_cast<unsigned>(dnnl::get_effective_cpu_isa());
  // Each ISA's value holds the bits of every ISA it includes.
  auto has = [isa](dnnl_cpu_isa_t wanted) {
    return (isa & static_cast<unsigned>(wanted)) == static_cast<unsigned>(wanted);
  };
  bool bf16_isa = has(dnnl_cpu_isa_avx512_core_bf16);
#if DNNL_VERSION_MAJOR > 3 || DNNL_VERSION_MINOR >= 2
  bf16_isa = bf16_isa || has(dnnl_cpu_isa_avx2_vnni_2);
#endif
  if (!bf16_isa) return 0;
  auto native = [](const char* impl) { return std::string(impl).rfind("ref", 0) != 0; };
  try {
    memory::desc x({2, 32, 8, 8}, Type::bf16, Tag::nhwc), y({2, 32, 8, 8}, Type::bf16, Tag::nhwc);
    memory::desc k({32, 32, 3, 3}, Type::bf16, Tag::any);
    dnnl::convolution_forward::primitive_desc conv(
        Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x, k,
        y, {1, 1}, {1, 1}, {1, 1});
    dnnl::matmul::primitive_desc matmul(Engine(), Matrix(32, 64, Type::bf16, false),
                                        Matrix(64, 64, Type::bf16, false),
                                        Matrix(32, 64, Type::bf16, false));
    return native(conv.impl_info_str()) && native(matmul.impl_info_str()) ? 1 : 0;
  } catch (const dnnl::error&) {
    return 0;
  }
}

// Bytes of a (k,n) kernel packed for `rows` rows (bfloat16 if `bf16`, else float32); 0 if
// oneDNN cannot multiply it.
extern "C" int64_t AlexnetOnednnPackedBytes(int64_t rows, int64_t k, int64_t n, int bf16) {
  try {
    return static_cast<int64_t>(PackedKernel(rows, k, n, bf16 ? Type::bf16 : Type::f32).get_size());
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnMatmul, Multiply,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("transpose_a")
                                  .Attr<int64_t>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnPack, Pack,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("rows"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnPackedMatmul, MultiplyPacked,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("features"));
