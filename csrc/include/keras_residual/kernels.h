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

// How the activation gradients treat non-finite values, where the two
// frameworks differ; each adapter asks for its own framework's rule, so that
// the native path gives the NaN and inf of the composite one.
//   kSelect    PyTorch: relu and relu6 g = (z in the zero region) ? 0 : dy,
//              so a NaN or inf dy in the zero region gives 0; z = NaN passes
//              dy through relu (z <= 0 ? 0 : dy) but not through relu6
//              ((0 < z < 6) ? dy : 0, as torch's vectorised CPU kernel);
//              gelu g = dy * gelu'(z).
//   kMultiply  TensorFlow: relu and relu6 g = dy * act'(z), act'(NaN) = 0: a
//              NaN or inf dy gives NaN in the zero region too, z = NaN gives
//              0 * dy; gelu g = dy * Phi(z) + (dy * z) * phi(z) (NaN for an
//              inf dy at z = 0, say).
//   kTermwise  JAX: its autodiff of the composite formulas. relu and relu6
//              g = (z in the pass region) ? dy : 0, so z = NaN gives 0 for
//              both (jax.nn.relu's and relu6's select); leaky_relu
//              z >= 0 ? dy : dy * alpha (jnp.where(z >= 0, ...)); silu term
//              by term, as z * sigmoid(z) differentiates: dy * s + (dy * z) *
//              (s * (1 - s)) (NaN for an inf dy where the terms are opposite
//              infinities); gelu as kMultiply.
// The other activations compute g = dy * act'(z) under every rule; leaky_relu
// z > 0 ? dy : dy * alpha under the first two.
enum class GradRule : int { kSelect = 0, kMultiply = 1, kTermwise = 2 };

// Non-finite values: every activation propagates NaN (act(NaN) = NaN) and
// maps +-inf as Keras' composite path does: relu(-inf) = 0, relu6(+-inf) =
// 6 / 0, leaky_relu(-inf) = -inf, silu(-inf) = gelu(-inf) = NaN (-inf * 0,
// as z * sigmoid(z) and z * Phi(z) give), silu(+inf) = gelu(+inf) = inf. The
// derivatives: silu' and gelu' are NaN at +-inf (inf * 0 in their formulas).
struct Act {
  Activation kind;
  double alpha;  // leaky_relu's negative slope; ignored otherwise
  GradRule grad_rule = GradRule::kSelect;
};

const char* version();  // "keras_residual kernels <semver>"

namespace cpu {

// Per-channel mean and biased variance (divided by m, as Keras'
// BatchNormalization uses), accumulated in at least the parameter type.
// As on the composite path: a NaN in a channel makes its mean and variance
// NaN, an inf its mean +-inf (NaN with both signs) and its variance NaN;
// m == 0 gives NaN for both.
void batch_stats(DType dtype, const void* x, Shape shape, void* mean, void* var);

// y = act(x * scale + shift + residual). scale may be nullptr (1),
// residual may be nullptr (0). y may alias neither x nor residual.
void scale_shift_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                         const void* scale, const void* shift, Act act, void* y);

// The training forward: the batch statistics of x (batch_stats), then
// scale_shift_add_act with scale = gamma / sqrt(var + epsilon) and shift =
// beta - mean * scale, computed in the parameter type. An empty batch gives
// NaN mean and var and writes no y.
void batch_norm_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                        const void* gamma, const void* beta, double epsilon, Act act, void* y,
                        void* mean, void* var);

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
// dresidual, or for float32 / float64 into dx when dresidual is nullptr) and
// reduces dbeta and dgamma; the second turns g into dx. For float16 and
// bfloat16 the second pass recomputes g in float from dy, x and residual
// rather than reading it back rounded, so that dx is as accurate as its own
// rounding allows. m == 0 (an empty batch) gives dbeta = 0 and dgamma =
// 0 * invstd (NaN with the NaN statistics of an empty batch), as the
// composite path does.
void batch_norm_add_act_backward(DType dtype, const void* dy, const void* x,
                                 const void* residual, Shape shape, const void* mean,
                                 const void* var, const void* gamma, const void* beta,
                                 double epsilon, Act act, void* dx, void* dresidual,
                                 void* dgamma, void* dbeta);

// out = the transpose of the row-major rows x cols matrix `in`:
// out[c * rows + r] = in[r * cols + c], for elements of `element_bytes`
// (2, 4 or 8) bytes, copied bit for bit. Blocked by tiles that stay in the
// L1 cache, so it reads and writes at close to memory speed where a strided
// element-wise copy does not (a conv kernel between Keras' (kh, kw, in, out)
// and the (out, kh, kw, in) memory of a channels_last convolution).
// `in` and `out` must not overlap.
void transpose(int element_bytes, const void* in, int64_t rows, int64_t cols, void* out);

// Number of threads the CPU kernels use; 0 (the default) means
// std::thread::hardware_concurrency().
void set_num_threads(int num_threads);
int num_threads();

// How the kernels run their slices of work in parallel. A runner must call
// body(ctx, t) exactly once for every t in [0, n), on any threads, and return
// when all calls have returned. nullptr (the default) forks and joins plain
// std::threads per call. A framework adapter installs its own thread pool
// here, so that the kernels share the pool's threads rather than compete
// with them (an OpenMP pool spins for a while after each of its parallel
// regions). Slice t always gets the same part of the work, so results do
// not depend on the runner.
using ParallelRunner = void (*)(int n, void* ctx, void (*body)(void* ctx, int t));
void set_parallel_runner(ParallelRunner runner);

}  // namespace cpu
}  // namespace keras_residual
