// CUDA versions of the kernels in kernels.h: the same arguments and the same
// semantics, on device pointers, enqueued on `stream` (a cudaStream_t passed
// as void* so that this header needs no CUDA headers).
//
// Reductions are two-level (per-block partials, then one finishing pass) and
// need a device workspace of workspace_bytes(...) bytes, which the caller
// allocates (for example from its framework's caching allocator). No
// function allocates, synchronizes or uses atomics on its hot path.
//
// Every function returns 0 (cudaSuccess) or the cudaError_t of the failed
// launch, as an int.
#pragma once

#include <cstddef>

#include "kernels.h"

namespace keras_residual {
namespace cuda {

// Bytes of workspace the reductions and the training forward of this shape
// and dtype need.
size_t workspace_bytes(DType dtype, Shape shape);

int batch_stats(DType dtype, const void* x, Shape shape, void* mean, void* var,
                void* workspace, void* stream);

int scale_shift_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                        const void* scale, const void* shift, Act act, void* y, void* stream);

// The training forward, as cpu::batch_norm_add_act: batch_stats, then
// scale_shift_add_act with scale and shift computed on the device in the
// workspace (workspace_bytes(dtype, shape) covers them).
int batch_norm_add_act(DType dtype, const void* x, const void* residual, Shape shape,
                       const void* gamma, const void* beta, double epsilon, Act act, void* y,
                       void* mean, void* var, void* workspace, void* stream);

int scale_shift_add_act_backward(DType dtype, const void* dy, const void* x,
                                 const void* residual, Shape shape, const void* scale,
                                 const void* shift, Act act, void* dx, void* dresidual,
                                 void* dscale, void* dshift, void* workspace, void* stream);

int batch_norm_add_act_backward(DType dtype, const void* dy, const void* x,
                                const void* residual, Shape shape, const void* mean,
                                const void* var, const void* gamma, const void* beta,
                                double epsilon, Act act, void* dx, void* dresidual,
                                void* dgamma, void* dbeta, void* workspace, void* stream);

}  // namespace cuda
}  // namespace keras_residual
