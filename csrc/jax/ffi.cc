// XLA FFI handlers (JAX, CPU) for the fused BatchNormalization + residual add
// + activation. The kernels themselves live in csrc/cpu and know no
// framework; the handlers check the buffers and attributes (ffi_common.h)
// and hand flat pointers to keras_residual::cpu::*. ffi_cuda.cc has the same
// handlers on the CUDA kernels. keras_residual/native/_jax.py declares the
// result shapes and calls them with jax.ffi.ffi_call.
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
#include <memory>
#include <mutex>

#include "ffi_common.h"

namespace keras_residual_jax {
namespace {

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

void FillZeros(ffi::AnyBuffer buffer) {
  std::fill_n(static_cast<char*>(buffer.untyped_data()), buffer.size_bytes(), char{0});
}

// ---------------------------------------------------------------------------
// Handlers.

ffi::Error BnAddActTrain(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer gamma,
                         ffi::AnyBuffer beta, ffi::AnyBuffer residual,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                         ffi::Result<ffi::AnyBuffer> var, ffi::Dictionary attrs) {
  Checked c;
  KR_RETURN_IF_ERROR(CheckTrain(x, gamma, beta, residual, attrs, &c));
  IntraOpPool scope(pool);
  kr::cpu::batch_norm_add_act(c.call.dtype, x.untyped_data(), c.residual, c.call.shape,
                              gamma.untyped_data(), beta.untyped_data(), c.epsilon, c.call.act,
                              y->untyped_data(), mean->untyped_data(), var->untyped_data());
  return ffi::Error::Success();
}

ffi::Error BnAddActBackward(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                            ffi::AnyBuffer residual, ffi::AnyBuffer mean, ffi::AnyBuffer var,
                            ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                            ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> dgamma,
                            ffi::Result<ffi::AnyBuffer> dbeta,
                            ffi::Result<ffi::AnyBuffer> dresidual, ffi::Dictionary attrs) {
  Checked c;
  KR_RETURN_IF_ERROR(CheckTrainBackward(dy, x, residual, mean, var, gamma, beta, attrs, &c));
  IntraOpPool scope(pool);
  // An empty batch runs too: the kernels give dbeta = 0 and dgamma = 0 *
  // invstd, NaN with the NaN statistics of an empty batch, as the composite
  // path's gradients are.
  kr::cpu::batch_norm_add_act_backward(
      c.call.dtype, dy.untyped_data(), x.untyped_data(), c.residual, c.call.shape,
      mean.untyped_data(), var.untyped_data(), gamma.untyped_data(), beta.untyped_data(),
      c.epsilon, c.call.act, dx->untyped_data(), c.residual ? dresidual->untyped_data() : nullptr,
      dgamma->untyped_data(), dbeta->untyped_data());
  return ffi::Error::Success();
}

ffi::Error ScaleShiftAddAct(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                            ffi::AnyBuffer shift, ffi::AnyBuffer residual,
                            ffi::Result<ffi::AnyBuffer> y, ffi::Dictionary attrs) {
  Checked c;
  KR_RETURN_IF_ERROR(CheckEpilogue(x, scale, shift, residual, attrs, &c));
  IntraOpPool scope(pool);
  kr::cpu::scale_shift_add_act(c.call.dtype, x.untyped_data(), c.residual, c.call.shape, c.scale,
                               shift.untyped_data(), c.call.act, y->untyped_data());
  return ffi::Error::Success();
}

ffi::Error ScaleShiftAddActBackward(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer x,
                                    ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                                    ffi::AnyBuffer residual, ffi::Result<ffi::AnyBuffer> dx,
                                    ffi::Result<ffi::AnyBuffer> dscale,
                                    ffi::Result<ffi::AnyBuffer> dshift,
                                    ffi::Result<ffi::AnyBuffer> dresidual,
                                    ffi::Dictionary attrs) {
  Checked c;
  KR_RETURN_IF_ERROR(CheckEpilogueBackward(dy, x, scale, shift, residual, attrs, &c));
  if (c.call.shape.size() == 0) {
    FillZeros(*dscale);
    FillZeros(*dshift);
    return ffi::Error::Success();
  }
  IntraOpPool scope(pool);
  kr::cpu::scale_shift_add_act_backward(
      c.call.dtype, dy.untyped_data(), x.untyped_data(), c.residual, c.call.shape, c.scale,
      shift.untyped_data(), c.call.act, dx->untyped_data(),
      c.residual ? dresidual->untyped_data() : nullptr, c.scale ? dscale->untyped_data() : nullptr,
      dshift->untyped_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace keras_residual_jax

namespace ffi = ::xla::ffi;

#define KR_JAX_CPU ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxBnAddActTrain, keras_residual_jax::BnAddActTrain,
                              KR_JAX_BIND_TRAIN(KR_JAX_CPU));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxBnAddActBackward, keras_residual_jax::BnAddActBackward,
                              KR_JAX_BIND_TRAIN_BACKWARD(KR_JAX_CPU));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxScaleShiftAddAct, keras_residual_jax::ScaleShiftAddAct,
                              KR_JAX_BIND_EPILOGUE(KR_JAX_CPU));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KrJaxScaleShiftAddActBackward,
                              keras_residual_jax::ScaleShiftAddActBackward,
                              KR_JAX_BIND_EPILOGUE_BACKWARD(KR_JAX_CPU));
