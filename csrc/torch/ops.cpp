// PyTorch adapter of the fused BatchNormalization + residual add + activation
// kernels: the schema of the keras_residual:: ops, argument checks shared with
// the CUDA registration (ops_cuda.cpp), and the CPU kernels' registration.
//
// Ops (x is a contiguous 4D tensor, NHWC when channels_last else NCHW;
// per-channel tensors are float64 for float64 x and float32 otherwise;
// activation is the int of keras_residual::Activation):
//
//   bn_add_act_train(x, gamma, beta, residual?, epsilon, activation, alpha,
//                    channels_last) -> (y, mean, var)
//       Batch statistics of x (biased variance), then
//       y = act(gamma * (x - mean) / sqrt(var + epsilon) + beta + residual).
//       An empty batch gives NaN statistics and an empty y.
//   bn_add_act_backward(dy, x, residual?, mean, var, gamma, beta, epsilon,
//                       activation, alpha, channels_last, need_residual_grad)
//       -> (dx, dresidual, dgamma, dbeta)
//       dresidual is an empty (0-element) tensor unless need_residual_grad and
//       a residual was given.
//   scale_shift_add_act(x, scale?, shift, residual?, activation, alpha,
//                       channels_last) -> y
//       y = act(x * scale + shift + residual); no scale means 1.
//   scale_shift_add_act_backward(dy, x, scale?, shift, residual?, activation,
//                                alpha, channels_last, need_residual_grad,
//                                need_scale_grad)
//       -> (dx, dresidual, dscale, dshift)
//       dresidual / dscale are empty (0-element) tensors when not wanted.
//   transpose_2d(x) -> Tensor
//       The transpose of a 2D tensor of 2-, 4- or 8-byte elements, contiguous
//       (CPU): a conv kernel between Keras' (kh, kw, in, out) and the
//       (out, kh, kw, in) memory of a channels_last convolution, at close to
//       memory speed.
//   build_info() -> str
//       The kernels' version, whether the CUDA kernels are compiled in, and
//       whether the CPU kernels run on torch's intra-op threads.

#include "ops_common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "../include/keras_residual/kernels.h"

namespace keras_residual {
namespace torch_ops {

DType to_kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_VALUE(false, "keras_residual: `x` must be float32, float64, float16 or bfloat16. ",
                        "Received: x.dtype=", type);
  }
  return DType::kFloat32;  // unreachable
}

at::ScalarType param_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

Shape check_x(const at::Tensor& x, bool channels_last, const char* op) {
  TORCH_CHECK_VALUE(x.defined(), op, ": `x` is undefined.");
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": `x` must be a 4D tensor (",
                    channels_last ? "N, H, W, C" : "N, C, H, W", "). Received: x.shape=",
                    x.sizes());
  to_kernel_dtype(x.scalar_type());
  Shape shape;
  shape.n = x.size(0);
  shape.channels_last = channels_last;
  if (channels_last) {
    shape.hw = x.size(1) * x.size(2);
    shape.c = x.size(3);
  } else {
    shape.c = x.size(1);
    shape.hw = x.size(2) * x.size(3);
  }
  return shape;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK_VALUE(t.defined(), op, ": `", name, "` is undefined.");
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": `", name,
                    "` must have the shape of `x`. Received: ", name, ".shape=", t.sizes(),
                    ", x.shape=", x.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": `", name,
                    "` must have the dtype of `x`. Received: ", name, ".dtype=", t.scalar_type(),
                    ", x.dtype=", x.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": `", name,
                    "` must be on the device of `x`. Received: ", name, ".device=", t.device(),
                    ", x.device=", x.device());
}

void check_param(const at::Tensor& t, const at::Tensor& x, int64_t c, const char* name,
                 const char* op) {
  TORCH_CHECK_VALUE(t.defined(), op, ": `", name, "` is undefined.");
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == c, op, ": `", name,
                    "` must have shape (", c, ",), one value per channel of `x`. Received: ",
                    name, ".shape=", t.sizes());
  const at::ScalarType want = param_type(x.scalar_type());
  TORCH_CHECK_VALUE(t.scalar_type() == want, op, ": `", name, "` must be ", want, " for ",
                    x.scalar_type(), " `x`. Received: ", name, ".dtype=", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": `", name,
                    "` must be on the device of `x`. Received: ", name, ".device=", t.device(),
                    ", x.device=", x.device());
}

Act make_act(int64_t activation, double alpha, const char* op) {
  TORCH_CHECK_VALUE(activation >= static_cast<int64_t>(Activation::kLinear) &&
                        activation <= static_cast<int64_t>(Activation::kGelu),
                    op,
                    ": `activation` must be 0 (linear), 1 (relu), 2 (leaky_relu), 3 (relu6), "
                    "4 (silu) or 5 (gelu). Received: activation=",
                    activation);
  Act act;
  act.kind = static_cast<Activation>(activation);
  act.alpha = alpha;
  return act;
}

void check_epsilon(double epsilon, const char* op) {
  TORCH_CHECK_VALUE(epsilon >= 0.0, op, ": `epsilon` must be >= 0. Received: epsilon=", epsilon);
}

TrainArgs check_train(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                      const std::optional<at::Tensor>& residual, double epsilon,
                      int64_t activation, double alpha, bool channels_last, const char* op) {
  TrainArgs args;
  // An empty batch (m = 0) is allowed, as on the composite path: its
  // statistics are NaN, y is empty, dbeta = 0 and dgamma = 0 * invstd (NaN).
  args.shape = check_x(x, channels_last, op);
  check_param(gamma, x, args.shape.c, "gamma", op);
  check_param(beta, x, args.shape.c, "beta", op);
  if (residual.has_value() && residual->defined()) {
    check_like(*residual, x, "residual", op);
    args.residual = residual->contiguous();
  }
  check_epsilon(epsilon, op);
  args.dtype = to_kernel_dtype(x.scalar_type());
  args.act = make_act(activation, alpha, op);
  args.x = x.contiguous();
  args.gamma = gamma.contiguous();
  args.beta = beta.contiguous();
  return args;
}

EpilogueArgs check_epilogue(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                            int64_t activation, double alpha, bool channels_last,
                            const char* op) {
  EpilogueArgs args;
  args.shape = check_x(x, channels_last, op);
  if (scale.has_value() && scale->defined()) {
    check_param(*scale, x, args.shape.c, "scale", op);
    args.scale = scale->contiguous();
  }
  check_param(shift, x, args.shape.c, "shift", op);
  if (residual.has_value() && residual->defined()) {
    check_like(*residual, x, "residual", op);
    args.residual = residual->contiguous();
  }
  args.dtype = to_kernel_dtype(x.scalar_type());
  args.act = make_act(activation, alpha, op);
  args.x = x.contiguous();
  args.shift = shift.contiguous();
  return args;
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void* mutable_ptr_or_null(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.mutable_data_ptr() : nullptr;
}

namespace {

// Runs the CPU kernels' slices on torch's intra-op pool: with threads of
// their own, the kernels would share the cores with the pool's threads,
// which keep spinning for a while after each torch op.
void run_on_torch_pool(int n, void* ctx, void (*body)(void*, int)) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(ctx, static_cast<int>(t));
  });
}

// The CPU kernels use as many threads as torch's intra-op pool, so that
// torch.set_num_threads() governs them as well, and run on that pool.
void sync_threads() {
  static const bool pool_installed = [] {
    cpu::set_parallel_runner(&run_on_torch_pool);
    return true;
  }();
  (void)pool_installed;
  static std::atomic<int> current{-1};
  const int wanted = at::get_num_threads();
  if (current.load(std::memory_order_relaxed) != wanted) {
    cpu::set_num_threads(wanted);
    current.store(wanted, std::memory_order_relaxed);
  }
}

void check_cpu(const at::Tensor& x, const char* op) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": expected CPU tensors. Received: x.device=",
                    x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_add_act_train_cpu(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
    const std::optional<at::Tensor>& residual, double epsilon, int64_t activation, double alpha,
    bool channels_last) {
  constexpr const char* op = "keras_residual::bn_add_act_train";
  check_cpu(x, op);
  TrainArgs a =
      check_train(x, gamma, beta, residual, epsilon, activation, alpha, channels_last, op);
  sync_threads();
  auto param_options = a.x.options().dtype(param_type(a.x.scalar_type()));
  at::Tensor mean = at::empty({a.shape.c}, param_options);
  at::Tensor var = at::empty({a.shape.c}, param_options);
  at::Tensor y = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  cpu::batch_norm_add_act(a.dtype, a.x.const_data_ptr(), ptr_or_null(a.residual), a.shape,
                          a.gamma.const_data_ptr(), a.beta.const_data_ptr(), epsilon, a.act,
                          y.mutable_data_ptr(), mean.mutable_data_ptr(), var.mutable_data_ptr());
  return {y, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_add_act_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& gamma,
    const at::Tensor& beta, double epsilon, int64_t activation, double alpha, bool channels_last,
    bool need_residual_grad) {
  constexpr const char* op = "keras_residual::bn_add_act_backward";
  check_cpu(x, op);
  TrainArgs a =
      check_train(x, gamma, beta, residual, epsilon, activation, alpha, channels_last, op);
  check_like(dy, x, "dy", op);
  check_param(mean, x, a.shape.c, "mean", op);
  check_param(var, x, a.shape.c, "var", op);
  sync_threads();
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
  cpu::batch_norm_add_act_backward(
      a.dtype, dy_c.const_data_ptr(), a.x.const_data_ptr(), ptr_or_null(a.residual), a.shape,
      mean_c.const_data_ptr(), var_c.const_data_ptr(), a.gamma.const_data_ptr(),
      a.beta.const_data_ptr(), epsilon, a.act, dx.mutable_data_ptr(),
      mutable_ptr_or_null(dresidual), dgamma.mutable_data_ptr(), dbeta.mutable_data_ptr());
  return {dx, dresidual, dgamma, dbeta};
}

at::Tensor scale_shift_add_act_cpu(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                   const at::Tensor& shift,
                                   const std::optional<at::Tensor>& residual, int64_t activation,
                                   double alpha, bool channels_last) {
  constexpr const char* op = "keras_residual::scale_shift_add_act";
  check_cpu(x, op);
  EpilogueArgs a =
      check_epilogue(x, scale, shift, residual, activation, alpha, channels_last, op);
  at::Tensor y = at::empty_like(a.x, at::MemoryFormat::Contiguous);
  if (a.x.numel() == 0) return y;
  sync_threads();
  cpu::scale_shift_add_act(a.dtype, a.x.const_data_ptr(), ptr_or_null(a.residual), a.shape,
                           ptr_or_null(a.scale), a.shift.const_data_ptr(), a.act,
                           y.mutable_data_ptr());
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scale_shift_add_act_backward_cpu(
    const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& scale,
    const at::Tensor& shift, const std::optional<at::Tensor>& residual, int64_t activation,
    double alpha, bool channels_last, bool need_residual_grad, bool need_scale_grad) {
  constexpr const char* op = "keras_residual::scale_shift_add_act_backward";
  check_cpu(x, op);
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
  sync_threads();
  cpu::scale_shift_add_act_backward(
      a.dtype, dy_c.const_data_ptr(), a.x.const_data_ptr(), ptr_or_null(a.residual), a.shape,
      ptr_or_null(a.scale), a.shift.const_data_ptr(), a.act, dx.mutable_data_ptr(),
      mutable_ptr_or_null(dresidual), mutable_ptr_or_null(dscale), dshift.mutable_data_ptr());
  return {dx, dresidual, dscale, dshift};
}

at::Tensor transpose_2d_cpu(const at::Tensor& x) {
  constexpr const char* op = "keras_residual::transpose_2d";
  check_cpu(x, op);
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": `x` must be a 2D tensor. Received: x.shape=", x.sizes());
  const int64_t bytes = x.element_size();
  TORCH_CHECK_VALUE(bytes == 2 || bytes == 4 || bytes == 8, op,
                    ": `x` must have 2-, 4- or 8-byte elements. Received: x.dtype=",
                    x.scalar_type());
  at::Tensor in = x.contiguous();
  at::Tensor out = at::empty({x.size(1), x.size(0)}, x.options());
  cpu::transpose(static_cast<int>(bytes), in.const_data_ptr(), x.size(0), x.size(1),
                 out.mutable_data_ptr());
  return out;
}

std::string build_info() {
  std::string info = version();
#ifdef KERAS_RESIDUAL_WITH_CUDA
  info += "; cuda";
#else
  info += "; cpu only";
#endif
  // at::parallel_for is parallel only where torch's headers see an
  // intra-op pool (OpenMP builds: this file compiled with -fopenmp).
#ifdef INTRA_OP_PARALLEL
  info += "; cpu threads: torch intra-op pool";
#else
  info += "; cpu threads: none (at::parallel_for runs serially)";
#endif
  return info;
}

}  // namespace
}  // namespace torch_ops
}  // namespace keras_residual

TORCH_LIBRARY(keras_residual, m) {
  m.def(
      "bn_add_act_train(Tensor x, Tensor gamma, Tensor beta, Tensor? residual, float epsilon, "
      "int activation, float alpha, bool channels_last) -> (Tensor y, Tensor mean, Tensor var)");
  m.def(
      "bn_add_act_backward(Tensor dy, Tensor x, Tensor? residual, Tensor mean, Tensor var, "
      "Tensor gamma, Tensor beta, float epsilon, int activation, float alpha, "
      "bool channels_last, bool need_residual_grad) "
      "-> (Tensor dx, Tensor dresidual, Tensor dgamma, Tensor dbeta)");
  m.def(
      "scale_shift_add_act(Tensor x, Tensor? scale, Tensor shift, Tensor? residual, "
      "int activation, float alpha, bool channels_last) -> Tensor");
  m.def(
      "scale_shift_add_act_backward(Tensor dy, Tensor x, Tensor? scale, Tensor shift, "
      "Tensor? residual, int activation, float alpha, bool channels_last, "
      "bool need_residual_grad, bool need_scale_grad) "
      "-> (Tensor dx, Tensor dresidual, Tensor dscale, Tensor dshift)");
  m.def("transpose_2d(Tensor x) -> Tensor");
  m.def("build_info() -> str", &keras_residual::torch_ops::build_info);
}

TORCH_LIBRARY_IMPL(keras_residual, CPU, m) {
  using namespace keras_residual::torch_ops;
  m.impl("bn_add_act_train", &bn_add_act_train_cpu);
  m.impl("bn_add_act_backward", &bn_add_act_backward_cpu);
  m.impl("scale_shift_add_act", &scale_shift_add_act_cpu);
  m.impl("scale_shift_add_act_backward", &scale_shift_add_act_backward_cpu);
  m.impl("transpose_2d", &transpose_2d_cpu);
}
