// Argument checks and small helpers shared by the CPU (ops.cpp) and CUDA
// (ops_cuda.cpp) registrations of the keras_residual:: torch ops. Defined in
// ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../include/keras_residual/kernels.h"

namespace keras_residual {
namespace torch_ops {

// The kernels' dtype of a tensor dtype; a ValueError for any other dtype.
DType to_kernel_dtype(at::ScalarType type);

// The "parameter type" of the per-channel arrays: float64 for float64 x,
// float32 otherwise.
at::ScalarType param_type(at::ScalarType type);

// x must be a 4D float tensor; returns its Shape in the given layout.
Shape check_x(const at::Tensor& x, bool channels_last, const char* op);

// t (dy, residual) must have the shape, dtype and device of x.
void check_like(const at::Tensor& t, const at::Tensor& x, const char* name, const char* op);

// t must be a (c,) tensor of x's parameter type on x's device.
void check_param(const at::Tensor& t, const at::Tensor& x, int64_t c, const char* name,
                 const char* op);

Act make_act(int64_t activation, double alpha, const char* op);

// Checked, contiguous arguments of the training ops.
struct TrainArgs {
  Shape shape;
  DType dtype;
  Act act;
  at::Tensor x, gamma, beta, residual;  // residual undefined when absent
};

TrainArgs check_train(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
                      const std::optional<at::Tensor>& residual, double epsilon,
                      int64_t activation, double alpha, bool channels_last, const char* op);

// Checked, contiguous arguments of the epilogue ops.
struct EpilogueArgs {
  Shape shape;
  DType dtype;
  Act act;
  at::Tensor x, scale, shift, residual;  // scale, residual undefined when absent
};

EpilogueArgs check_epilogue(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                            const at::Tensor& shift, const std::optional<at::Tensor>& residual,
                            int64_t activation, double alpha, bool channels_last, const char* op);

// Data pointer, or nullptr for an undefined (or, when mutable, empty) tensor.
const void* ptr_or_null(const at::Tensor& t);
void* mutable_ptr_or_null(at::Tensor& t);

}  // namespace torch_ops
}  // namespace keras_residual
