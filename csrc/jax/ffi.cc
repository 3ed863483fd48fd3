// XLA FFI handlers (JAX, CPU) for the fused BatchNormalization + residual add
// + activation. The kernels themselves live in csrc/cpu and know no
// framework; this file validates the buffers and attributes and hands flat
// pointers to keras_residual::cpu::*. keras_residual/native/_jax.py declares
// the result shapes and calls them with jax.ffi.ffi_call.
//
// Handlers (T in {f16, bf16, f32, f64}; U, the per-channel "parameter" type,
// is f64 for f64 tensors and f32 otherwise):
//
//   KrJaxBnAddActTrain(x: T, gamma: U, beta: U, residual: T)
//       -> (y: T, mean: U, var: U)
//   KrJaxBnAddActBackward(dy: T, x: T, residual: T, mean: U, var: U,
//                         gamma: U, beta: U)
//       -> (dx: T, dgamma: U, dbeta: U, dresidual: T)
//   KrJaxScaleShiftAddAct(x: T, scale: U, shift: U, residual: T) -> y: T
//   KrJaxScaleShiftAddActBackward(dy: T, x: T, scale: U, shift: U, residual: T)
//       -> (dx: T, dscale: U, dshift: U, dresidual: T)
//
// Attributes: activation (s32, a keras_residual::Activation code), alpha
// (f64), channels_last (bool), has_residual (bool); epsilon (f64) for the
// training pair, has_scale (bool) for the epilogue pair. x is 4D: NHWC when
// channels_last, else NCHW. An absent residual or scale is passed as any
// empty buffer, and its gradient comes back with shape [0].
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "../include/keras_residual/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace keras_residual_jax {
namespace {

namespace ffi = ::xla::ffi;
namespace kr = ::keras_residual;

#define KR_RETURN_IF_ERROR(expr)              \
  do {                                        \
    ffi::Error kr_error_ = (expr);            \
    if (kr_error_.failure()) return kr_error_; \
  } while (0)

// ---------------------------------------------------------------------------
// XLA's intra-op thread pool.

// The pool of the handler running on this thread, set for the duration of a
// call by IntraOpPool; nullptr runs every slice on the calling thread.
thread_local ffi::ThreadPool* tl_pool = nullptr;

// The slices of one parallel call, shared with the tasks it schedules. A
// task may start after the call has returned: it then finds no slice left
// and touches nothing but this object.
struct Slices {
  Slices(int n, void* ctx, void (*body)(void*, int)) : n(n), ctx(ctx), body(body) {}

  // Runs unclaimed slices until none is left.
  void Work() {
    for (int t = next.fetch_add(1); t < n; t = next.fetch_add(1)) {
      body(ctx, t);
      std::lock_guard<std::mutex> lock(mutex);
      if (++done == n) finished.notify_all();
    }
  }

  void Wait() {
    std::unique_lock<std::mutex> lock(mutex);
    finished.wait(lock, [this] { return done == n; });
  }

  const int n;
  void* const ctx;
  void (*const body)(void*, int);
  std::atomic<int> next{0};
  std::mutex mutex;
  std::condition_variable finished;
  int done = 0;
};

// The calling thread claims slices too, so that a call finishes even when
// every pool thread is busy (with other handlers waiting for theirs, say).
void RunOnIntraOpPool(int n, void* ctx, void (*body)(void*, int)) {
  auto slices = std::make_shared<Slices>(n, ctx, body);
  if (ffi::ThreadPool* pool = tl_pool) {
    for (int t = 1; t < n; ++t) pool->Schedule([slices] { slices->Work(); });
  }
  slices->Work();
  slices->Wait();
}

class IntraOpPool {
 public:
  explicit IntraOpPool(ffi::ThreadPool& pool) : previous_(tl_pool) {
    static const bool installed = [] {
      kr::cpu::set_parallel_runner(&RunOnIntraOpPool);
      return true;
    }();
    (void)installed;
    tl_pool = pool.num_threads() > 0 ? &pool : nullptr;
  }
  ~IntraOpPool() { tl_pool = previous_; }
  IntraOpPool(const IntraOpPool&) = delete;
  IntraOpPool& operator=(const IntraOpPool&) = delete;

 private:
  ffi::ThreadPool* previous_;
};

// ---------------------------------------------------------------------------
// Validation.

std::string DTypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    default: return "XLA type " + std::to_string(static_cast<int>(dtype));
  }
}

std::string ShapeString(const ffi::AnyBuffer& buffer) {
  std::string text = "(";
  for (int64_t dim : buffer.dimensions()) {
    text += (text.size() > 1 ? ", " : "") + std::to_string(dim);
  }
  return text + (buffer.dimensions().size() == 1 ? ",)" : ")");
}

// What every handler needs: the kernels' dtype, the parameter type, x's
// Shape, the activation and whether there is a residual.
struct Call {
  kr::DType dtype;
  ffi::DataType param;
  kr::Shape shape;
  kr::Act act;
  bool has_residual;
};

template <typename T>
ffi::Error GetAttr(const ffi::Dictionary& attrs, const char* name, T* value) {
  auto found = attrs.get<T>(name);
  if (found.has_error()) {
    return ffi::Error::InvalidArgument(std::string("attribute `") + name +
                                       "`: " + found.error().message());
  }
  *value = *found;
  return ffi::Error::Success();
}

ffi::Error KernelDType(const ffi::AnyBuffer& x, Call* call) {
  switch (x.element_type()) {
    case ffi::DataType::F32: call->dtype = kr::DType::kFloat32; break;
    case ffi::DataType::F64: call->dtype = kr::DType::kFloat64; break;
    case ffi::DataType::F16: call->dtype = kr::DType::kFloat16; break;
    case ffi::DataType::BF16: call->dtype = kr::DType::kBFloat16; break;
    default:
      return ffi::Error::InvalidArgument(
          "x must be float16, bfloat16, float32 or float64. Received: x.dtype=" +
          DTypeName(x.element_type()));
  }
  call->param = x.element_type() == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
  return ffi::Error::Success();
}

ffi::Error Prepare(const ffi::AnyBuffer& x, const ffi::Dictionary& attrs, Call* call) {
  KR_RETURN_IF_ERROR(KernelDType(x, call));
  if (x.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("x must be 4D. Received: x.shape=" + ShapeString(x));
  }
  int32_t activation;
  double alpha;
  bool channels_last;
  KR_RETURN_IF_ERROR(GetAttr(attrs, "activation", &activation));
  KR_RETURN_IF_ERROR(GetAttr(attrs, "alpha", &alpha));
  KR_RETURN_IF_ERROR(GetAttr(attrs, "channels_last", &channels_last));
  KR_RETURN_IF_ERROR(GetAttr(attrs, "has_residual", &call->has_residual));
  if (activation < static_cast<int>(kr::Activation::kLinear) ||
      activation > static_cast<int>(kr::Activation::kGelu)) {
    return ffi::Error::InvalidArgument(
        "activation must be an activation code in [0, 5]. Received: activation=" +
        std::to_string(activation));
  }
  // JAX differentiates the composite path's activations term by term
  // (kernels.h, GradRule::kTermwise): with its rule the native gradients
  // carry the NaN and inf of the composite path.
  call->act = kr::Act{static_cast<kr::Activation>(activation), alpha, kr::GradRule::kTermwise};
  const auto d = x.dimensions();
  call->shape = channels_last ? kr::Shape{d[0], d[3], d[1] * d[2], true}
                              : kr::Shape{d[0], d[1], d[2] * d[3], false};
  return ffi::Error::Success();
}

ffi::Error CheckLikeX(const char* name, const ffi::AnyBuffer& t, const ffi::AnyBuffer& x) {
  const auto a = t.dimensions(), b = x.dimensions();
  if (t.element_type() != x.element_type() || !std::equal(a.begin(), a.end(), b.begin(), b.end())) {
    return ffi::Error::InvalidArgument(std::string(name) + " must have the shape and dtype of x, " +
                                       ShapeString(x) + " " + DTypeName(x.element_type()) +
                                       ". Received: " + name + ".shape=" + ShapeString(t) + ", " +
                                       name + ".dtype=" + DTypeName(t.element_type()));
  }
  return ffi::Error::Success();
}

ffi::Error CheckChannels(const char* name, const ffi::AnyBuffer& t, const Call& call) {
  if (t.element_type() != call.param || t.dimensions().size() != 1 ||
      t.dimensions()[0] != call.shape.c) {
    return ffi::Error::InvalidArgument(
        std::string(name) + " must be " + DTypeName(call.param) + " of shape (" +
        std::to_string(call.shape.c) + ",), one value per channel of x. Received: " + name +
        ".shape=" + ShapeString(t) + ", " + name + ".dtype=" + DTypeName(t.element_type()));
  }
  return ffi::Error::Success();
}

// The residual's data, checked against x, or nullptr without one.
ffi::Error Residual(const ffi::AnyBuffer& residual, const ffi::AnyBuffer& x, const Call& call,
                    const void** data) {
  *data = nullptr;
  if (!call.has_residual) return ffi::Error::Success();
  KR_RETURN_IF_ERROR(CheckLikeX("residual", residual, x));
  *data = residual.untyped_data();
  return ffi::Error::Success();
}

void FillZeros(ffi::AnyBuffer buffer) {
  std::fill_n(static_cast<char*>(buffer.untyped_data()), buffer.size_bytes(), char{0});
}

// ---------------------------------------------------------------------------
// Handlers.

ffi::Error BnAddActTrain(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                         ffi::AnyBuffer beta, ffi::AnyBuffer residual,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                         ffi::Result<ffi::AnyBuffer> var, ffi::Dictionary attrs) {
  Call call;
  double epsilon;
  const void* r;
  KR_RETURN_IF_ERROR(Prepare(x, attrs, &call));
  KR_RETURN_IF_ERROR(GetAttr(attrs, "epsilon", &epsilon));
  if (!(epsilon > 0.0)) {
    return ffi::Error::InvalidArgument("epsilon must be positive. Received: epsilon=" +
                                       std::to_string(epsilon));
  }
  KR_RETURN_IF_ERROR(CheckChannels("gamma", gamma, call));
  KR_RETURN_IF_ERROR(CheckChannels("beta", beta, call));
  KR_RETURN_IF_ERROR(Residual(residual, x, call, &r));
  IntraOpPool scope(pool);
  kr::cpu::batch_norm_add_act(call.dtype, x.untyped_data(), r, call.shape, gamma.untyped_data(),
                              beta.untyped_data(), epsilon, call.act, y->untyped_data(),
                              mean->untyped_data(), var->untyped_data());
  return ffi::Error::Success();
}

ffi::Error BnAddActBackward(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                            ffi::AnyBuffer residual, ffi::AnyBuffer mean, ffi::AnyBuffer var,
                            ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                            ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dgamma,
                            ffi::Result<ffi::AnyBuffer> dbeta,
                            ffi::Result<ffi::AnyBuffer> dresidual, ffi::Dictionary attrs) {
  Call call;
  double epsilon;
  const void* r;
  KR_RETURN_IF_ERROR(Prepare(x, attrs, &call));
  KR_RETURN_IF_ERROR(GetAttr(attrs, "epsilon", &epsilon));
  KR_RETURN_IF_ERROR(CheckLikeX("dy", dy, x));
  KR_RETURN_IF_ERROR(Residual(residual, x, call, &r));
  KR_RETURN_IF_ERROR(CheckChannels("mean", mean, call));
  KR_RETURN_IF_ERROR(CheckChannels("var", var, call));
  KR_RETURN_IF_ERROR(CheckChannels("gamma", gamma, call));
  KR_RETURN_IF_ERROR(CheckChannels("beta", beta, call));
  IntraOpPool scope(pool);
  // An empty batch runs too: the kernels give dbeta = 0 and dgamma = 0 *
  // invstd, NaN with the NaN statistics of an empty batch, as the composite
  // path's gradients are.
  kr::cpu::batch_norm_add_act_backward(
      call.dtype, dy.untyped_data(), x.untyped_data(), r, call.shape, mean.untyped_data(),
      var.untyped_data(), gamma.untyped_data(), beta.untyped_data(), epsilon, call.act,
      dx->untyped_data(), r ? dresidual->untyped_data() : nullptr, dgamma->untyped_data(),
      dbeta->untyped_data());
  return ffi::Error::Success();
}

// The epilogue's scale, checked, or nullptr (1) without one.
ffi::Error Scale(const ffi::AnyBuffer& scale, const ffi::Dictionary& attrs, const Call& call,
                 const void** data) {
  bool has_scale;
  KR_RETURN_IF_ERROR(GetAttr(attrs, "has_scale", &has_scale));
  *data = nullptr;
  if (!has_scale) return ffi::Error::Success();
  KR_RETURN_IF_ERROR(CheckChannels("scale", scale, call));
  *data = scale.untyped_data();
  return ffi::Error::Success();
}

ffi::Error ScaleShiftAddAct(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                            ffi::AnyBuffer shift, ffi::AnyBuffer residual,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Dictionary attrs) {
  Call call;
  const void *s, *r;
  KR_RETURN_IF_ERROR(Prepare(x, attrs, &call));
  KR_RETURN_IF_ERROR(Scale(scale, attrs, call, &s));
  KR_RETURN_IF_ERROR(CheckChannels("shift", shift, call));
  KR_RETURN_IF_ERROR(Residual(residual, x, call, &r));
  IntraOpPool scope(pool);
  kr::cpu::scale_shift_add_act(call.dtype, x.untyped_data(), r, call.shape, s,
                               shift.untyped_data(), call.act, y->untyped_data());
  return ffi::Error::Success();
}

ffi::Error ScaleShiftAddActBackward(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                                    ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                                    ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> dx,
                                    ffi::Result<ffi::AnyBuffer> dscale,
                                    ffi::Result<ffi::AnyBuffer> dshift,
                                    ffi::Result<ffi::AnyBuffer> dresidual,
                                    ffi::Dictionary attrs) {
  Call call;
  const void *s, *r;
  KR_RETURN_IF_ERROR(Prepare(x, attrs, &call));
  KR_RETURN_IF_ERROR(CheckLikeX("dy", dy, x));
  KR_RETURN_IF_ERROR(Scale(scale, attrs, call, &s));
  KR_RETURN_IF_ERROR(CheckChannels("shift", shift, call));
  KR_RETURN_IF_ERROR(Residual(residual, x, call, &r));
  if (call.shape.size() == 0) {
    FillZeros(*dscale);
    FillZeros(*dshift);
    return ffi::Error::Success();
  }
  IntraOpPool scope(pool);
  kr::cpu::scale_shift_add_act_backward(
      call.dtype, dy.untyped_data(), x.untyped_data(), r, call.shape, s, shift.untyped_data(),
      call.act, dx->untyped_data(), r ? dresidual->untyped_data() : nullptr,
      s ? dscale->untyped_data() : nullptr, dshift->untyped_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace keras_residual_jax

namespace ffi = ::xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxBnAddActTrain, keras_residual_jax::BnAddActTrain,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // gamma
                                  .Arg<ffi::AnyBuffer>()  // beta
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // mean
                                  .Ret<ffi::AnyBuffer>()  // var
                                  .Attrs<ffi::Dictionary>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxBnAddActBackward, keras_residual_jax::BnAddActBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Arg<ffi::AnyBuffer>()  // mean
                                  .Arg<ffi::AnyBuffer>()  // var
                                  .Arg<ffi::AnyBuffer>()  // gamma
                                  .Arg<ffi::AnyBuffer>()  // beta
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dgamma
                                  .Ret<ffi::AnyBuffer>()  // dbeta
                                  .Ret<ffi::AnyBuffer>()  // dresidual
                                  .Attrs<ffi::Dictionary>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxScaleShiftAddAct, keras_residual_jax::ScaleShiftAddAct,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // scale
                                  .Arg<ffi::AnyBuffer>()  // shift
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attrs<ffi::Dictionary>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxScaleShiftAddActBackward,
                              keras_residual_jax::ScaleShiftAddActBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // scale
                                  .Arg<ffi::AnyBuffer>()  // shift
                                  .Arg<ffi::AnyBuffer>()  // residual
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // dscale
                                  .Ret<ffi::AnyBuffer>()  // dshift
                                  .Ret<ffi::AnyBuffer>()  // dresidual
                                  .Attrs<ffi::Dictionary>());
