// XLA FFI handlers (JAX, CUDA): the handlers of ffi.cc, with the same
// buffers, attributes and checks (ffi_common.h), on the CUDA kernels of
// csrc/cuda (kernels_cuda.h). Each runs on the stream XLA gives it and takes
// the reductions' workspace from XLA's scratch allocator, so nothing here
// allocates or synchronizes.
//
// Handlers: KrJaxCuda<Name> for each KrJax<Name> of ffi.cc.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#include "../include/keras_residual/kernels_cuda.h"
#include "ffi_common.h"

namespace keras_residual_jax {
namespace {

using Stream = ffi::PlatformStream<cudaStream_t>;

ffi::Error Launched(int status, const char* kernel) {
  if (status == 0) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("CUDA kernel ") + kernel +
                              " failed: " + cudaGetErrorString(static_cast<cudaError_t>(status)));
}

// The reductions' workspace for this call, from XLA's scratch allocator.
ffi::Error Workspace(ffi::ScratchAllocator& scratch, const Call& call, void** workspace) {
  const size_t bytes = kr::cuda::workspace_bytes(call.dtype, call.shape);
  *workspace = nullptr;
  if (bytes == 0) return ffi::Error::Success();
  auto allocated = scratch.Allocate(bytes, alignof(double));
  if (!allocated.has_value()) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "cannot allocate the " + std::to_string(bytes) +
                          "-byte workspace of the CUDA kernels");
  }
  *workspace = *allocated;
  return ffi::Error::Success();
}

ffi::Error BnAddActTrain(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                         ffi::AnyBuffer gamma, ffi::AnyBuffer beta, ffi::AnyBuffer residual,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                         ffi::Result<ffi::AnyBuffer> var, ffi::Dictionary attrs) {
  Checked c;
  void* workspace;
  KR_RETURN_IF_ERROR(CheckTrain(x, gamma, beta, residual, attrs, &c));
  KR_RETURN_IF_ERROR(Workspace(scratch, c.call, &workspace));
  return Launched(
      kr::cuda::batch_norm_add_act(c.call.dtype, x.untyped_data(), c.residual, c.call.shape,
                                   gamma.untyped_data(), beta.untyped_data(), c.epsilon,
                                   c.call.act, y->untyped_data(), mean->untyped_data(),
                                   var->untyped_data(), workspace, stream),
      "batch_norm_add_act");
}

ffi::Error BnAddActBackward(cudaStream_t stream, ffi::ScratchAllocator scratch,
                            ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer residual,
                            ffi::AnyBuffer mean, ffi::AnyBuffer var, ffi::AnyBuffer gamma,
                            ffi::AnyBuffer beta, ffi::Result<ffi::AnyBuffer> dx,
                            ffi::Result<ffi::AnyBuffer> dgamma, ffi::Result<ffi::AnyBuffer> dbeta,
                            ffi::Result<ffi::AnyBuffer> dresidual, ffi::Dictionary attrs) {
  Checked c;
  void* workspace;
  KR_RETURN_IF_ERROR(CheckTrainBackward(dy, x, residual, mean, var, gamma, beta, attrs, &c));
  KR_RETURN_IF_ERROR(Workspace(scratch, c.call, &workspace));
  return Launched(kr::cuda::batch_norm_add_act_backward(
                      c.call.dtype, dy.untyped_data(), x.untyped_data(), c.residual,
                      c.call.shape, mean.untyped_data(), var.untyped_data(),
                      gamma.untyped_data(), beta.untyped_data(), c.epsilon, c.call.act,
                      dx->untyped_data(), c.residual ? dresidual->untyped_data() : nullptr,
                      dgamma->untyped_data(), dbeta->untyped_data(), workspace, stream),
                  "batch_norm_add_act_backward");
}

ffi::Error ScaleShiftAddAct(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                            ffi::AnyBuffer shift, ffi::AnyBuffer residual,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Dictionary attrs) {
  Checked c;
  KR_RETURN_IF_ERROR(CheckEpilogue(x, scale, shift, residual, attrs, &c));
  return Launched(kr::cuda::scale_shift_add_act(c.call.dtype, x.untyped_data(), c.residual,
                                                c.call.shape, c.scale, shift.untyped_data(),
                                                c.call.act, y->untyped_data(), stream),
                  "scale_shift_add_act");
}

ffi::Error ScaleShiftAddActBackward(cudaStream_t stream, ffi::ScratchAllocator scratch,
                                    ffi::AnyBuffer dy, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                                    ffi::AnyBuffer shift, ffi::AnyBuffer residual,
                                    ffi::Result<ffi::AnyBuffer> dx,
                                    ffi::Result<ffi::AnyBuffer> dscale,
                                    ffi::Result<ffi::AnyBuffer> dshift,
                                    ffi::Result<ffi::AnyBuffer> dresidual,
                                    ffi::Dictionary attrs) {
  Checked c;
  void* workspace;
  KR_RETURN_IF_ERROR(CheckEpilogueBackward(dy, x, scale, shift, residual, attrs, &c));
  KR_RETURN_IF_ERROR(Workspace(scratch, c.call, &workspace));
  // With an empty batch the kernel writes dscale = dshift = 0 itself.
  return Launched(kr::cuda::scale_shift_add_act_backward(
                      c.call.dtype, dy.untyped_data(), x.untyped_data(), c.residual,
                      c.call.shape, c.scale, shift.untyped_data(), c.call.act,
                      dx->untyped_data(), c.residual ? dresidual->untyped_data() : nullptr,
                      c.scale ? dscale->untyped_data() : nullptr, dshift->untyped_data(),
                      workspace, stream),
                  "scale_shift_add_act_backward");
}

}  // namespace
}  // namespace keras_residual_jax

namespace ffi = ::xla::ffi;

#define KR_JAX_CUDA ffi::Ffi::Bind().Ctx<keras_residual_jax::Stream>()
#define KR_JAX_CUDA_SCRATCH KR_JAX_CUDA.Ctx<ffi::ScratchAllocator>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxCudaBnAddActTrain, keras_residual_jax::BnAddActTrain,
                              KR_JAX_BIND_TRAIN(KR_JAX_CUDA_SCRATCH));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxCudaBnAddActBackward, keras_residual_jax::BnAddActBackward,
                              KR_JAX_BIND_TRAIN_BACKWARD(KR_JAX_CUDA_SCRATCH));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxCudaScaleShiftAddAct, keras_residual_jax::ScaleShiftAddAct,
                              KR_JAX_BIND_EPILOGUE(KR_JAX_CUDA));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxCudaScaleShiftAddActBackward,
                              keras_residual_jax::ScaleShiftAddActBackward,
                              KR_JAX_BIND_EPILOGUE_BACKWARD(KR_JAX_CUDA_SCRATCH));
