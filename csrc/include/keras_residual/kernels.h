// Framework-neutral kernels of the fused BatchNormalization + residual add +
// activation. They know raw pointers, sizes and (on GPU) a stream, and no
// framework: the TensorFlow, PyTorch and pybind11 adapters all call these.
//
// Terms used below:
//   x         the convolution output, a contiguous 4D tensor.
//   Shape     its batch size n, channel count c and spatial size hw = H * W,
//             in NHWC (channels_last, channel fastest) or NCHW layout.
//   m         n * hw, the number of values per channel.
//   residual  the shortcut, same shape and dtype as x, or nullptr for none.
//   scale, shift
//             per-channel affine of the epilogue:
//               z = x * scale[c] + shift[c] + residual
//               y = act(z)
//             Training uses scale = gamma * invstd, shift = beta - mean *
//             scale; inference the same from the moving statistics; a folded
//             model scale = nullptr (meaning 1) and shift = the conv bias.
//
// Storage dtypes: float32, float64 (for gradient checks), float16 and
// bfloat16 (IEEE half and bfloat16 bit patterns in uint16). Every per-channel
// array (mean, var, gamma, beta, scale, shift, dgamma, dbeta, dscale,
// dshift) is float64 when the tensors are float64 and float32 otherwise;
// arithmetic and reductions run in that "parameter type".
//
// Validation of ranks, shapes and dtypes is the adapters' job: kernels trust
// their arguments.
#pragma once

#include <cstddef>
#include <cstdint>

namespace keras_residual {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Keras names: "linear", "relu", "leaky_relu" (slope alpha), "relu6",
// "silu" (= "swish"), "gelu" (the exact, erf form: keras.activations.gelu).
enum class Activation : int {
  kLinear = 0,
  kRelu = 1,
  kLeakyRelu = 2,
  kRelu6 = 3,
  kSilu = 4,
  kGelu = 5,
};

struct Shape {
  int64_t n;
  int64_t c;
  int64_t hw;
  bool channels_last;
  int64_t m() const { return n * hw; }
  int64_t size() const { return n * c * hw; }
};

struct Act {
  Activation kind;
  double alpha;  // leaky_relu's negative slope; ignored otherwise
};

const char* version();  // "keras_residual kernels <semver>"

namespace cpu {

// Per-channel mean and biased variance (divided by m, as Keras'
// BatchNormalization uses), accumulated in at least the parameter type.
void batch_stats(DType dtype, const void* x, Shape shape, void* mean, void* var);

// y = act(x * scale + shift + residual). scale may be nullptr (1),
// residual may be nullptr (0). y may alias neither x nor residual.
void scale_shift_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                         const void* scale, const void* shift, Act act, void* y);

// Backward of scale_shift_add_act with scale/shift as independent inputs
// (inference and folded models, where the statistics are constants):
//   g = dy * act'(z)            (z recomputed from x, residual, scale, shift)
//   dx = g * scale, dresidual = g,
//   dscale[c] = sum(g * x), dshift[c] = sum(g).
// dresidual may be nullptr (not wanted); dscale may be nullptr (not wanted,
// for example scale == nullptr).
void scale_shift_add_act_backward(DType dtype, const void* dy, const void* x,
                                  const void* residual, Shape shape, const void* scale,
                                  const void* shift, Act act, void* dx, void* dresidual,
                                  void* dscale, void* dshift);

// Backward of the training forward
//   xhat = (x - mean) * invstd, invstd = 1 / sqrt(var + epsilon)
//   y = act(gamma * xhat + beta + residual)
// where mean and var are the batch statistics of x (so they depend on x):
//   g = dy * act'(z), dbeta = sum(g), dgamma = sum(g * xhat), dresidual = g,
//   dx = gamma * invstd / m * (m * g - dbeta - xhat * dgamma).
// dresidual may be nullptr. Two passes over memory: the first writes g (into
// dresidual, or into dx when dresidual is nullptr) and reduces dbeta and
// dgamma; the second turns g into dx.
void batch_norm_add_act_backward(DType dtype, const void* dy, const void* x,
                                 const void* residual, Shape shape, const void* mean,
                                 const void* var, const void* gamma, const void* beta,
                                 double epsilon, Act act, void* dx, void* dresidual,
                                 void* dgamma, void* dbeta);

// Number of threads the CPU kernels use; 0 (the default) means
// std::thread::hardware_concurrency().
void set_num_threads(int num_threads);
int num_threads();

}  // namespace cpu
}  // namespace keras_residual
