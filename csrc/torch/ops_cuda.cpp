// CUDA registration of the keras_residual:: torch ops (schema in ops.cpp):
// the CUDA kernels on the current stream of x's device, with their reduction
// workspace taken from torch's caching allocator. Compiled only when torch
// has CUDA and nvcc is present (with -DKERAS_RESIDUAL_WITH_CUDA).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>

#include "../include/keras_residual/kernels_cuda.h"
#include "ops_common.h"

namespace keras_residual {
namespace torch_ops {
namespace {

void check_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cuda(), op, ": expected CUDA tensors. Received: x.device=",
                    x.device());
}

void* current_stream(const at::Tensor& x) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
}

at::Tensor workspace(DType dtype, Shape shape, const at::Tensor& x) {
  const size_t bytes = std::max<size_t>(cuda::workspace_bytes(dtype, shape), 1);
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

void check_launch(int status, const char* op, const char* kernel) {
  TORCH_CHECK(status == 0, op, ": CUDA kernel ", kernel, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_act_train_cuda(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& residual, double epsilon, int64_t activation, double alpha,
    bool channels_last) {
  constexpr const char* op = "keras_residual::bn_add_act_train";
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  TrainArgs a =
      check_train(x, gamma, beta, residual, epsilon, activation, alpha, channels_last, op);
  void* stream = current_stream(a.x);
  auto param_options = a.x.options().dtype(param_type(a.x.scalar_type()));
  at::Tensor mean = at::empty({a.shape.c}, param_options);
  at::Tensor var = at::empty({a.shape.c}, param_options);
  at::Tensor ws = workspace(a.dtype, a.shape, a.x);
  at::Tensor y = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  check_launch(cuda::batch_norm_add_act(a.dtype, a.x.const_data_ptr(), ptr_or_null(a.residual),
                                        a.shape, a.gamma.const_data_ptr(),
                                        a.beta.const_data_ptr(), epsilon, a.act,
                                        y.mutable_data_ptr(), mean.mutable_data_ptr(),
                                        var.mutable_data_ptr(), ws.mutable_data_ptr(), stream),
               op, "batch_norm_add_act");
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_act_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
    const at::Tensor& beta, double epsilon, int64_t activation, double alpha, bool channels_last,
    bool need_residual_grad) {
  constexpr const char* op = "keras_residual::bn_add_act_backward";
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  TrainArgs a =
      check_train(x, gamma, beta, residual, epsilon, activation, alpha, channels_last, op);
  check_like(dy, x, "dy", op);
  check_param(mean, x, a.shape.c, "mean", op);
  check_param(var, x, a.shape.c, "var", op);
  void* stream = current_stream(a.x);
  at::Tensor dy_c = dy.contiguous();
  at::Tensor mean_c = mean.contiguous();
  at::Tensor var_c = var.contiguous();
  at::Tensor dx = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  at::Tensor dresidual = need_residual_grad && a.residual.defined()
                             ? at::empty_like(a.x, at::MemoryFormat::Contiguous)
                             : at::empty({0}, a.x.options());
  auto param_options = a.x.options().dtype(param_type(a.x.scalar_type()));
  at::Tensor dgamma = at::empty({a.shape.c}, param_options);
  at::Tensor dbeta = at::empty({a.shape.c}, param_options);
  at::Tensor ws = workspace(a.dtype, a.shape, a.x);
  check_launch(cuda::batch_norm_add_act_backward(
                   a.dtype, dy_c.const_data_ptr(), a.x.const_data_ptr(), ptr_or_null(a.residual),
                   a.shape, mean_c.const_data_ptr(), var_c.const_data_ptr(),
                   a.gamma.const_data_ptr(), a.beta.const_data_ptr(), epsilon, a.act,
                   dx.mutable_data_ptr(), mutable_ptr_or_null(dresidual),
                   dgamma.mutable_data_ptr(), dbeta.mutable_data_ptr(), ws.mutable_data_ptr(),
                   stream),
               op, "batch_norm_add_act_backward");
  return {dx, dresidual, dgamma, dbeta};
}

at::Tensor scale_shift_add_act_cuda(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                    const at::Tensor& shift,
                                    const std::optional<at::Tensor>& residual, int64_t activation,
                                    double alpha, bool channels_last) {
  constexpr const char* op = "keras_residual::scale_shift_add_act";
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  EpilogueArgs a =
      check_epilogue(x, scale, shift, residual, activation, alpha, channels_last, op);
  at::Tensor y = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  if (a.x.numel() == 0) return y;
  check_launch(cuda::scale_shift_add_act(a.dtype, a.x.const_data_ptr(), ptr_or_null(a.residual),
                                         a.shape, ptr_or_null(a.scale), a.shift.const_data_ptr(),
                                         a.act, y.mutable_data_ptr(), current_stream(a.x)),
               op, "scale_shift_add_act");
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_shift_add_act_backward_cuda(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual, int64_t activation,
    double alpha, bool channels_last, bool need_residual_grad, bool need_scale_grad) {
  constexpr const char* op = "keras_residual::scale_shift_add_act_backward";
  check_cuda(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  EpilogueArgs a =
      check_epilogue(x, scale, shift, residual, activation, alpha, channels_last, op);
  check_like(dy, x, "dy", op);
  at::Tensor dy_c = dy.contiguous();
  auto param_options = a.x.options().dtype(param_type(a.x.scalar_type()));
  at::Tensor dx = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  at::Tensor dresidual = need_residual_grad && a.residual.defined()
                             ? at::empty_like(a.x, at::MemoryFormat::Contiguous)
                             : at::empty({0}, a.x.options());
  at::Tensor dscale = need_scale_grad && a.scale.defined() ? at::empty({a.shape.c}, param_options)
                                                           : at::empty({0}, param_options);
  at::Tensor dshift = at::empty({a.shape.c}, param_options);
  if (a.x.numel() == 0) {
    dresidual.zero_();
    dscale.zero_();
    dshift.zero_();
    return {dx, dresidual, dscale, dshift};
  }
  at::Tensor ws = workspace(a.dtype, a.shape, a.x);
  check_launch(cuda::scale_shift_add_act_backward(
                   a.dtype, dy_c.const_data_ptr(), a.x.const_data_ptr(), ptr_or_null(a.residual),
                   a.shape, ptr_or_null(a.scale), a.shift.const_data_ptr(), a.act,
                   dx.mutable_data_ptr(), mutable_ptr_or_null(dresidual),
                   mutable_ptr_or_null(dscale), dshift.mutable_data_ptr(), ws.mutable_data_ptr(),
                   current_stream(a.x)),
               op, "scale_shift_add_act_backward");
  return {dx, dresidual, dscale, dshift};
}

}  // namespace
}  // namespace torch_ops
}  // namespace keras_residual

TORCH_LIBRARY_IMPL(keras_residual, CUDA, m) {
  using namespace keras_residual::torch_ops;
  m.impl("bn_add_act_train", &bn_add_act_train_cuda);
  m.impl("bn_add_act_backward", &bn_add_act_backward_cuda);
  m.impl("scale_shift_add_act", &scale_shift_add_act_cuda);
  m.impl("scale_shift_add_act_backward", &scale_shift_add_act_backward_cuda);
}
