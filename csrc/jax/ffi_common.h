// What the JAX FFI handlers share across platforms (csrc/jax/ffi.cc for the
// CPU, csrc/jax/ffi_cuda.cc for CUDA): the validation of their buffers and
// attributes, and their bindings. The handlers' contract is documented at the
// top of ffi.cc.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "../include/keras_residual/kernels.h"
#include "xla/ffi/api/ffi.h"

namespace keras_residual_jax {

namespace ffi = ::xla::ffi;
namespace kr = ::keras_residual;

#define KR_RETURN_IF_ERROR(expr)              \
  do {                                        \
    ffi::Error kr_error_ = (expr);            \
    if (kr_error_.failure()) return kr_error_; \
  } while (0)

// ---------------------------------------------------------------------------
// Validation.

inline std::string DTypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    default: return "XLA type " + std::to_string(static_cast<int>(dtype));
  }
}

inline std::string ShapeString(const ffi::AnyBuffer& buffer) {
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
inline ffi::Error GetAttr(const ffi::Dictionary& attrs, const char* name, T* value) {
  auto found = attrs.get<T>(name);
  if (found.has_error()) {
    return ffi::Error::InvalidArgument(std::string("attribute `") + name +
                                       "`: " + found.error().message());
  }
  *value = *found;
  return ffi::Error::Success();
}

inline ffi::Error KernelDType(const ffi::AnyBuffer& x, Call* call) {
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

inline ffi::Error Prepare(const ffi::AnyBuffer& x, const ffi::Dictionary& attrs, Call* call) {
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

inline ffi::Error CheckLikeX(const char* name, const ffi::AnyBuffer& t, const ffi::AnyBuffer& x) {
  const auto a = t.dimensions(), b = x.dimensions();
  if (t.element_type() != x.element_type() || !std::equal(a.begin(), a.end(), b.begin(), b.end())) {
    return ffi::Error::InvalidArgument(std::string(name) + " must have the shape and dtype of x, " +
                                       ShapeString(x) + " " + DTypeName(x.element_type()) +
                                       ". Received: " + name + ".shape=" + ShapeString(t) + ", " +
                                       name + ".dtype=" + DTypeName(t.element_type()));
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckChannels(const char* name, const ffi::AnyBuffer& t, const Call& call) {
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
inline ffi::Error Residual(const ffi::AnyBuffer& residual, const ffi::AnyBuffer& x, const Call& call,
                    const void** data) {
  *data = nullptr;
  if (!call.has_residual) return ffi::Error::Success();
  KR_RETURN_IF_ERROR(CheckLikeX("residual", residual, x));
  *data = residual.untyped_data();
  return ffi::Error::Success();
}

// The epilogue's scale, checked, or nullptr (1) without one.
inline ffi::Error Scale(const ffi::AnyBuffer& scale, const ffi::Dictionary& attrs,
                        const Call& call, const void** data) {
  bool has_scale;
  KR_RETURN_IF_ERROR(GetAttr(attrs, "has_scale", &has_scale));
  *data = nullptr;
  if (!has_scale) return ffi::Error::Success();
  KR_RETURN_IF_ERROR(CheckChannels("scale", scale, call));
  *data = scale.untyped_data();
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Each handler's checks: what its kernel call needs, or the error.

struct Checked {
  Call call;
  double epsilon = 0.0;             // the training pair
  const void* residual = nullptr;   // nullptr without one
  const void* scale = nullptr;      // the epilogue pair; nullptr means 1
};

inline ffi::Error Epsilon(const ffi::Dictionary& attrs, Checked* checked) {
  KR_RETURN_IF_ERROR(GetAttr(attrs, "epsilon", &checked->epsilon));
  if (!(checked->epsilon > 0.0)) {
    return ffi::Error::InvalidArgument("epsilon must be positive. Received: epsilon=" +
                                       std::to_string(checked->epsilon));
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckTrain(const ffi::AnyBuffer& x, const ffi::AnyBuffer& gamma,
                             const ffi::AnyBuffer& beta, const ffi::AnyBuffer& residual,
                             const ffi::Dictionary& attrs, Checked* checked) {
  KR_RETURN_IF_ERROR(Prepare(x, attrs, &checked->call));
  KR_RETURN_IF_ERROR(Epsilon(attrs, checked));
  KR_RETURN_IF_ERROR(CheckChannels("gamma", gamma, checked->call));
  KR_RETURN_IF_ERROR(CheckChannels("beta", beta, checked->call));
  return Residual(residual, x, checked->call, &checked->residual);
}

inline ffi::Error CheckTrainBackward(const ffi::AnyBuffer& dy, const ffi::AnyBuffer& x,
                                     const ffi::AnyBuffer& residual, const ffi::AnyBuffer& mean,
                                     const ffi::AnyBuffer& var, const ffi::AnyBuffer& gamma,
                                     const ffi::AnyBuffer& beta, const ffi::Dictionary& attrs,
                                     Checked* checked) {
  KR_RETURN_IF_ERROR(Prepare(x, attrs, &checked->call));
  KR_RETURN_IF_ERROR(Epsilon(attrs, checked));
  KR_RETURN_IF_ERROR(CheckLikeX("dy", dy, x));
  KR_RETURN_IF_ERROR(Residual(residual, x, checked->call, &checked->residual));
  KR_RETURN_IF_ERROR(CheckChannels("mean", mean, checked->call));
  KR_RETURN_IF_ERROR(CheckChannels("var", var, checked->call));
  KR_RETURN_IF_ERROR(CheckChannels("gamma", gamma, checked->call));
  return CheckChannels("beta", beta, checked->call);
}

inline ffi::Error CheckEpilogue(const ffi::AnyBuffer& x, const ffi::AnyBuffer& scale,
                                const ffi::AnyBuffer& shift, const ffi::AnyBuffer& residual,
                                const ffi::Dictionary& attrs, Checked* checked) {
  KR_RETURN_IF_ERROR(Prepare(x, attrs, &checked->call));
  KR_RETURN_IF_ERROR(Scale(scale, attrs, checked->call, &checked->scale));
  KR_RETURN_IF_ERROR(CheckChannels("shift", shift, checked->call));
  return Residual(residual, x, checked->call, &checked->residual);
}

inline ffi::Error CheckEpilogueBackward(const ffi::AnyBuffer& dy, const ffi::AnyBuffer& x,
                                        const ffi::AnyBuffer& scale, const ffi::AnyBuffer& shift,
                                        const ffi::AnyBuffer& residual,
                                        const ffi::Dictionary& attrs, Checked* checked) {
  KR_RETURN_IF_ERROR(CheckEpilogue(x, scale, shift, residual, attrs, checked));
  return CheckLikeX("dy", dy, x);
}

// ---------------------------------------------------------------------------
// Bindings: the buffers of each handler, after the platform's context
// (`binding` is ffi::Ffi::Bind() with its .Ctx<...>() calls).

#define KR_JAX_BIND_TRAIN(binding)  \
  binding.Arg<ffi::AnyBuffer>()     /* x */ \
      .Arg<ffi::AnyBuffer>()        /* gamma */ \
      .Arg<ffi::AnyBuffer>()        /* beta */ \
      .Arg<ffi::AnyBuffer>()        /* residual */ \
      .Ret<ffi::AnyBuffer>()        /* y */ \
      .Ret<ffi::AnyBuffer>()        /* mean */ \
      .Ret<ffi::AnyBuffer>()        /* var */ \
      .Attrs<ffi::Dictionary>()

#define KR_JAX_BIND_TRAIN_BACKWARD(binding) \
  binding.Arg<ffi::AnyBuffer>()     /* dy */ \
      .Arg<ffi::AnyBuffer>()        /* x */ \
      .Arg<ffi::AnyBuffer>()        /* residual */ \
      .Arg<ffi::AnyBuffer>()        /* mean */ \
      .Arg<ffi::AnyBuffer>()        /* var */ \
      .Arg<ffi::AnyBuffer>()        /* gamma */ \
      .Arg<ffi::AnyBuffer>()        /* beta */ \
      .Ret<ffi::AnyBuffer>()        /* dx */ \
      .Ret<ffi::AnyBuffer>()        /* dgamma */ \
      .Ret<ffi::AnyBuffer>()        /* dbeta */ \
      .Ret<ffi::AnyBuffer>()        /* dresidual */ \
      .Attrs<ffi::Dictionary>()

#define KR_JAX_BIND_EPILOGUE(binding) \
  binding.Arg<ffi::AnyBuffer>()     /* x */ \
      .Arg<ffi::AnyBuffer>()        /* scale */ \
      .Arg<ffi::AnyBuffer>()        /* shift */ \
      .Arg<ffi::AnyBuffer>()        /* residual */ \
      .Ret<ffi::AnyBuffer>()        /* y */ \
      .Attrs<ffi::Dictionary>()

#define KR_JAX_BIND_EPILOGUE_BACKWARD(binding) \
  binding.Arg<ffi::AnyBuffer>()     /* dy */ \
      .Arg<ffi::AnyBuffer>()        /* x */ \
      .Arg<ffi::AnyBuffer>()        /* scale */ \
      .Arg<ffi::AnyBuffer>()        /* shift */ \
      .Arg<ffi::AnyBuffer>()        /* residual */ \
      .Ret<ffi::AnyBuffer>()        /* dx */ \
      .Ret<ffi::AnyBuffer>()        /* dscale */ \
      .Ret<ffi::AnyBuffer>()        /* dshift */ \
      .Ret<ffi::AnyBuffer>()        /* dresidual */ \
      .Attrs<ffi::Dictionary>()

}  // namespace keras_residual_jax
