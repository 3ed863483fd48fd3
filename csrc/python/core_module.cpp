// pybind11 module `_core`: the CPU kernels of keras_residual/kernels.h on
// NumPy arrays.
//
// Tensors are 4D arrays, NHWC when channels_last=True and NCHW otherwise, of
// dtype float32, float64, float16 or bfloat16. NumPy has no bfloat16 of its
// own: pass either an ml_dtypes.bfloat16 array (the dtype JAX and TensorFlow
// use) or a uint16 array of bfloat16 bit patterns together with
// bfloat16=True; results come back in the same form. Arrays that are not
// C-contiguous are copied first.
//
// Per-channel arrays (mean, var, scale, shift, gamma, beta) are 1D of length
// c and are converted to the parameter dtype: float64 for float64 tensors,
// float32 otherwise; the per-channel results come back in that dtype.
//
// Bad arguments raise ValueError naming the argument and the value received.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "../include/keras_residual/kernels.h"

namespace py = pybind11;
namespace kr = keras_residual;

namespace {

std::string shape_str(const py::array& a) {
  std::ostringstream os;
  os << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) os << ", ";
    os << a.shape(i);
  }
  if (a.ndim() == 1) os << ",";
  os << ")";
  return os.str();
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype().attr("name")); }

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

const char* dtype_label(kr::DType d) {
  switch (d) {
    case kr::DType::kFloat32: return "float32";
    case kr::DType::kFloat64: return "float64";
    case kr::DType::kFloat16: return "float16";
    case kr::DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

// A validated 4D tensor argument.
struct Tensor {
  py::array array;  // C-contiguous
  kr::DType dtype;
  kr::Shape shape;
};

py::array as_array(const py::object& obj, const char* name) {
  if (obj.is_none()) fail(std::string("`") + name + "` must be an array. Received: " + name + "=None");
  py::array a = py::array::ensure(obj);
  if (!a) {
    fail(std::string("`") + name + "` must be an array. Received: " + name + "=" +
         std::string(py::repr(obj)));
  }
  return a;
}

kr::DType dtype_of(const py::array& a, const char* name, bool bfloat16) {
  const std::string dn = dtype_name(a);
  if (bfloat16) {
    if (dn == "uint16" || dn == "bfloat16") return kr::DType::kBFloat16;
    fail(std::string("With bfloat16=True, `") + name +
         "` must be a uint16 array of bfloat16 bit patterns or an ml_dtypes.bfloat16 array. "
         "Received: " + name + ".dtype=" + dn);
  }
  if (dn == "float32") return kr::DType::kFloat32;
  if (dn == "float64") return kr::DType::kFloat64;
  if (dn == "float16") return kr::DType::kFloat16;
  if (dn == "bfloat16" && a.itemsize() == 2) return kr::DType::kBFloat16;
  fail(std::string("`") + name +
       "` must be float32, float64, float16 or bfloat16 (ml_dtypes.bfloat16, or uint16 bit "
       "patterns with bfloat16=True). Received: " + name + ".dtype=" + dn);
}

Tensor tensor_arg(const py::object& obj, const char* name, bool channels_last, bool bfloat16) {
  py::array a = as_array(obj, name);
  const kr::DType dt = dtype_of(a, name, bfloat16);
  if (a.ndim() != 4) {
    fail(std::string("`") + name + "` must be a 4D array (" +
         (channels_last ? "NHWC, channels_last=True" : "NCHW, channels_last=False") +
         "). Received: " + name + ".shape=" + shape_str(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    a = py::array::ensure(a, py::array::c_style);
    if (!a) throw py::error_already_set();
  }
  kr::Shape s{};
  s.n = a.shape(0);
  s.channels_last = channels_last;
  if (channels_last) {
    s.hw = a.shape(1) * a.shape(2);
    s.c = a.shape(3);
  } else {
    s.c = a.shape(1);
    s.hw = a.shape(2) * a.shape(3);
  }
  return Tensor{a, dt, s};
}

// A second tensor (residual, dy) that must match x exactly.
Tensor like_arg(const py::object& obj, const char* name, const Tensor& x, bool channels_last,
                bool bfloat16) {
  Tensor t = tensor_arg(obj, name, channels_last, bfloat16);
  bool same_shape = true;
  for (int i = 0; i < 4; ++i) same_shape = same_shape && t.array.shape(i) == x.array.shape(i);
  if (!same_shape) {
    fail(std::string("`") + name + "` must have the shape of `x`. Received: " + name +
         ".shape=" + shape_str(t.array) + ", x.shape=" + shape_str(x.array));
  }
  if (t.dtype != x.dtype) {
    fail(std::string("`") + name + "` must have the dtype of `x` (" + dtype_label(x.dtype) +
         "). Received: " + name + ".dtype=" + dtype_label(t.dtype));
  }
  return t;
}

bool is_double(kr::DType d) { return d == kr::DType::kFloat64; }

// A per-channel array of length c, converted to the parameter dtype; None
// (where allowed) gives None, passed to the kernels as nullptr.
py::object param_arg(const py::object& obj, const char* name, int64_t c, kr::DType dt,
                    bool allow_none) {
  if (obj.is_none()) {
    if (allow_none) return py::none();
    fail(std::string("`") + name + "` must be a 1D array of length " + std::to_string(c) +
         ". Received: " + name + "=None");
  }
  py::array a;
  if (is_double(dt)) {
    a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(obj);
  } else {
    a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(obj);
  }
  if (!a) {
    PyErr_Clear();
    fail(std::string("`") + name + "` must be a 1D array of numbers. Received: " + name + "=" +
         std::string(py::repr(obj)));
  }
  if (a.ndim() != 1 || a.shape(0) != c) {
    fail(std::string("`") + name + "` must be a 1D array of length " + std::to_string(c) +
         " (the channel count of `x`). Received: " + name + ".shape=" + shape_str(a));
  }
  return a;
}

py::array new_param(int64_t c, kr::DType dt) {
  if (is_double(dt)) return py::array_t<double>(c);
  return py::array_t<float>(c);
}

const void* ptr_or_null(const py::object& a) {
  return a.is_none() ? nullptr : a.cast<py::array>().data();
}

kr::GradRule grad_rule_arg(const std::string& rule) {
  if (rule == "select") return kr::GradRule::kSelect;
  if (rule == "multiply") return kr::GradRule::kMultiply;
  if (rule == "termwise") return kr::GradRule::kTermwise;
  fail("`grad_rule` must be 'select' (PyTorch's), 'multiply' (TensorFlow's) or 'termwise' "
       "(JAX's). Received: grad_rule='" + rule + "'");
}

kr::Activation activation_kind(const py::object& activation) {
  if (activation.is_none()) return kr::Activation::kLinear;
  if (!py::isinstance<py::str>(activation)) {
    fail("`activation` must be a string. Received: activation=" +
         std::string(py::repr(activation)));
  }
  const std::string a = activation.cast<std::string>();
  if (a == "linear") return kr::Activation::kLinear;
  if (a == "relu") return kr::Activation::kRelu;
  if (a == "leaky_relu") return kr::Activation::kLeakyRelu;
  if (a == "relu6") return kr::Activation::kRelu6;
  if (a == "silu" || a == "swish") return kr::Activation::kSilu;
  if (a == "gelu") return kr::Activation::kGelu;
  fail("`activation` must be one of 'linear', 'relu', 'leaky_relu', 'relu6', 'silu' ('swish'), "
       "'gelu' or None. Received: activation=" + std::string(py::repr(activation)));
}

kr::Act act_arg(const py::object& activation, double alpha,
                const std::string& grad_rule = "select") {
  kr::Act act{activation_kind(activation), alpha};
  act.grad_rule = grad_rule_arg(grad_rule);
  return act;
}

py::array empty_like(const Tensor& t) {
  std::vector<py::ssize_t> shape(t.array.shape(), t.array.shape() + 4);
  return py::array(t.array.dtype(), shape);
}

// ------------------------------------------------------------- functions --

py::tuple batch_stats(const py::object& x_obj, bool channels_last, bool bfloat16) {
  Tensor x = tensor_arg(x_obj, "x", channels_last, bfloat16);
  py::array mean = new_param(x.shape.c, x.dtype);
  py::array var = new_param(x.shape.c, x.dtype);
  {
    py::gil_scoped_release release;
    kr::cpu::batch_stats(x.dtype, x.array.data(), x.shape, mean.mutable_data(),
                         var.mutable_data());
  }
  return py::make_tuple(mean, var);
}

py::array scale_shift_add_act(const py::object& x_obj, const py::object& scale_obj,
                              const py::object& shift_obj, const py::object& residual_obj,
                              const py::object& activation, double alpha, bool channels_last,
                              bool bfloat16) {
  Tensor x = tensor_arg(x_obj, "x", channels_last, bfloat16);
  const kr::Act act = act_arg(activation, alpha);
  py::object scale = param_arg(scale_obj, "scale", x.shape.c, x.dtype, true);
  py::object shift = param_arg(shift_obj, "shift", x.shape.c, x.dtype, false);
  Tensor r{};
  const bool has_r = !residual_obj.is_none();
  if (has_r) r = like_arg(residual_obj, "residual", x, channels_last, bfloat16);
  py::array y = empty_like(x);
  const void* scale_p = ptr_or_null(scale);
  const void* shift_p = ptr_or_null(shift);
  {
    py::gil_scoped_release release;
    kr::cpu::scale_shift_add_act(x.dtype, x.array.data(), has_r ? r.array.data() : nullptr,
                                 x.shape, scale_p, shift_p, act,
                                 y.mutable_data());
  }
  return y;
}

py::tuple scale_shift_add_act_backward(const py::object& dy_obj, const py::object& x_obj,
                                       const py::object& scale_obj, const py::object& shift_obj,
                                       const py::object& residual_obj,
                                       const py::object& activation, double alpha,
                                       bool channels_last, bool bfloat16,
                                       const std::string& grad_rule) {
  Tensor x = tensor_arg(x_obj, "x", channels_last, bfloat16);
  Tensor dy = like_arg(dy_obj, "dy", x, channels_last, bfloat16);
  const kr::Act act = act_arg(activation, alpha, grad_rule);
  py::object scale = param_arg(scale_obj, "scale", x.shape.c, x.dtype, true);
  py::object shift = param_arg(shift_obj, "shift", x.shape.c, x.dtype, false);
  Tensor r{};
  const bool has_r = !residual_obj.is_none();
  if (has_r) r = like_arg(residual_obj, "residual", x, channels_last, bfloat16);
  py::array dx = empty_like(x);
  py::object dr = py::none();
  py::object dscale = py::none();
  py::array dshift = new_param(x.shape.c, x.dtype);
  void* dr_ptr = nullptr;
  void* dscale_ptr = nullptr;
  if (has_r) {
    py::array a = empty_like(x);
    dr_ptr = a.mutable_data();
    dr = a;
  }
  if (!scale.is_none()) {
    py::array a = new_param(x.shape.c, x.dtype);
    dscale_ptr = a.mutable_data();
    dscale = a;
  }
  const void* scale_p = ptr_or_null(scale);
  const void* shift_p = ptr_or_null(shift);
  {
    py::gil_scoped_release release;
    kr::cpu::scale_shift_add_act_backward(
        x.dtype, dy.array.data(), x.array.data(), has_r ? r.array.data() : nullptr, x.shape,
        scale_p, shift_p, act, dx.mutable_data(), dr_ptr, dscale_ptr,
        dshift.mutable_data());
  }
  return py::make_tuple(dx, dr, dscale, dshift);
}

py::tuple batch_norm_add_act_backward(const py::object& dy_obj, const py::object& x_obj,
                                      const py::object& mean_obj, const py::object& var_obj,
                                      const py::object& gamma_obj, const py::object& beta_obj,
                                      const py::object& residual_obj, double epsilon,
                                      const py::object& activation, double alpha,
                                      bool channels_last, bool bfloat16,
                                      const std::string& grad_rule) {
  Tensor x = tensor_arg(x_obj, "x", channels_last, bfloat16);
  Tensor dy = like_arg(dy_obj, "dy", x, channels_last, bfloat16);
  const kr::Act act = act_arg(activation, alpha, grad_rule);
  if (!(epsilon >= 0.0) || !std::isfinite(epsilon)) {
    std::ostringstream os;
    os << "`epsilon` must be a finite number >= 0. Received: epsilon=" << epsilon;
    fail(os.str());
  }
  const int64_t c = x.shape.c;
  py::object mean = param_arg(mean_obj, "mean", c, x.dtype, false);
  py::object var = param_arg(var_obj, "var", c, x.dtype, false);
  py::object gamma = param_arg(gamma_obj, "gamma", c, x.dtype, true);
  py::object beta = param_arg(beta_obj, "beta", c, x.dtype, true);
  Tensor r{};
  const bool has_r = !residual_obj.is_none();
  if (has_r) r = like_arg(residual_obj, "residual", x, channels_last, bfloat16);
  py::array dx = empty_like(x);
  py::object dr = py::none();
  void* dr_ptr = nullptr;
  if (has_r) {
    py::array a = empty_like(x);
    dr_ptr = a.mutable_data();
    dr = a;
  }
  py::array dgamma = new_param(c, x.dtype);
  py::array dbeta = new_param(c, x.dtype);
  const void* mean_p = ptr_or_null(mean);
  const void* var_p = ptr_or_null(var);
  const void* gamma_p = ptr_or_null(gamma);
  const void* beta_p = ptr_or_null(beta);
  {
    py::gil_scoped_release release;
    kr::cpu::batch_norm_add_act_backward(
        x.dtype, dy.array.data(), x.array.data(), has_r ? r.array.data() : nullptr, x.shape,
        mean_p, var_p, gamma_p, beta_p, epsilon, act,
        dx.mutable_data(), dr_ptr, dgamma.mutable_data(), dbeta.mutable_data());
  }
  return py::make_tuple(dx, dr, dgamma, dbeta);
}

void set_num_threads(int n) {
  if (n < 0) fail("`num_threads` must be >= 0 (0: one per core). Received: num_threads=" +
                  std::to_string(n));
  kr::cpu::set_num_threads(n);
}

py::dict build_info() {
  py::dict d;
  d["version"] = kr::version();
#if defined(__VERSION__)
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __VERSION__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string(__VERSION__);
#endif
#else
  d["compiler"] = "unknown";
#endif
  d["cplusplus"] = static_cast<long>(__cplusplus);
#if defined(__OPTIMIZE__)
  d["optimized"] = true;
#else
  d["optimized"] = false;
#endif
  py::list simd;
#if defined(__SSE2__)
  simd.append("sse2");
#endif
#if defined(__AVX__)
  simd.append("avx");
#endif
#if defined(__AVX2__)
  simd.append("avx2");
#endif
#if defined(__FMA__)
  simd.append("fma");
#endif
#if defined(__F16C__)
  simd.append("f16c");
#endif
#if defined(__AVX512F__)
  simd.append("avx512f");
#endif
#if defined(__ARM_NEON)
  simd.append("neon");
#endif
  d["simd"] = simd;  // of the module's translation unit
  d["num_threads"] = kr::cpu::num_threads();
  return d;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() =
      "CPU kernels of the fused BatchNormalization + residual add + activation, on NumPy "
      "arrays.\n\nTensors are 4D (NHWC with channels_last=True, NCHW otherwise), float32, "
      "float64, float16 or bfloat16 (an ml_dtypes.bfloat16 array, or uint16 bit patterns with "
      "bfloat16=True). Per-channel arrays are float64 for float64 tensors, float32 otherwise.";

  m.def("batch_stats", &batch_stats, py::arg("x"), py::kw_only(), py::arg("channels_last") = true,
        py::arg("bfloat16") = false,
        R"doc(Per-channel mean and biased variance of a 4D tensor.

Args:
    x: 4D array, NHWC (channels_last=True) or NCHW.
    channels_last: layout of `x`.
    bfloat16: `x` holds bfloat16 bit patterns in a uint16 array.

Returns:
    Tuple `(mean, var)` of 1D arrays of length c; var is divided by
    n * h * w (the biased variance BatchNormalization uses).

Raises:
    ValueError: if `x` is not a 4D array of a supported dtype.)doc");

  m.def("scale_shift_add_act", &scale_shift_add_act, py::arg("x"), py::arg("scale"),
        py::arg("shift"), py::arg("residual") = py::none(), py::kw_only(),
        py::arg("activation") = "relu", py::arg("alpha") = 0.2, py::arg("channels_last") = true,
        py::arg("bfloat16") = false,
        R"doc(y = act(x * scale + shift + residual), per channel.

Args:
    x: 4D array, NHWC (channels_last=True) or NCHW.
    scale: per-channel scale of length c, or None (1).
    shift: per-channel shift of length c.
    residual: array like `x`, or None (no residual).
    activation: "linear", "relu", "leaky_relu", "relu6", "silu"/"swish",
        "gelu" (exact, erf form) or None (linear).
    alpha: negative slope of "leaky_relu".
    channels_last: layout of the tensors.
    bfloat16: the tensors hold bfloat16 bit patterns in uint16 arrays.

Returns:
    `y`, an array like `x`.

Raises:
    ValueError: on a bad shape, dtype or activation.)doc");

  m.def("scale_shift_add_act_backward", &scale_shift_add_act_backward, py::arg("dy"),
        py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("residual") = py::none(),
        py::kw_only(), py::arg("activation") = "relu", py::arg("alpha") = 0.2,
        py::arg("channels_last") = true, py::arg("bfloat16") = false,
        py::arg("grad_rule") = "select",
        R"doc(Gradients of scale_shift_add_act with scale and shift as inputs.

Args:
    dy: gradient of `y`, an array like `x`.
    x, scale, shift, residual, activation, alpha, channels_last, bfloat16:
        as given to `scale_shift_add_act`.
    grad_rule: how the relu, relu6 and gelu gradients treat non-finite
        values (GradRule in kernels.h): "select", PyTorch's (relu: 0 where
        z <= 0, dy where z is NaN), or "multiply", TensorFlow's (dy *
        act'(z) with act'(NaN) = 0: a NaN or inf dy gives NaN everywhere).

Returns:
    Tuple `(dx, dresidual, dscale, dshift)`; dresidual is None when
    `residual` is None and dscale is None when `scale` is None.

Raises:
    ValueError: on a bad shape, dtype or activation.)doc");

  m.def("batch_norm_add_act_backward", &batch_norm_add_act_backward, py::arg("dy"), py::arg("x"),
        py::arg("mean"), py::arg("var"), py::arg("gamma"), py::arg("beta"),
        py::arg("residual") = py::none(), py::kw_only(), py::arg("epsilon") = 1e-3,
        py::arg("activation") = "relu", py::arg("alpha") = 0.2, py::arg("channels_last") = true,
        py::arg("bfloat16") = false, py::arg("grad_rule") = "select",
        R"doc(Gradients of the training forward
act(gamma * (x - mean) / sqrt(var + epsilon) + beta + residual), where mean
and var are the batch statistics of `x`.

Args:
    dy: gradient of the output, an array like `x`.
    x: 4D array, NHWC (channels_last=True) or NCHW.
    mean, var: the batch statistics of `x` (as from `batch_stats`).
    gamma, beta: per-channel arrays of length c, or None (1 and 0).
    residual: array like `x`, or None.
    epsilon: added to var.
    activation, alpha, channels_last, bfloat16: as for
        `scale_shift_add_act`.
    grad_rule: as for `scale_shift_add_act_backward`.

Returns:
    Tuple `(dx, dresidual, dgamma, dbeta)`; dresidual is None when
    `residual` is None.

Raises:
    ValueError: on a bad shape, dtype, activation or epsilon.)doc");

  m.def("set_num_threads", &set_num_threads, py::arg("num_threads"),
        "Sets the number of threads of the kernels; 0 means one per core.");
  m.def("num_threads", &kr::cpu::num_threads, "Number of threads the kernels use.");
  m.def("version", &kr::version, "Version string of the kernels.");
  m.def("build_info", &build_info,
        "Dict of the build: kernels version, compiler, C++ standard, optimisation, SIMD.");
}
