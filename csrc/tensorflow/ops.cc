// TensorFlow custom ops for the fused BatchNormalization + residual add +
// activation (CPU kernels). The kernels themselves live in csrc/cpu and know
// no framework; this file validates the tensors, allocates the outputs and
// hands flat pointers to keras_residual::cpu::*.
//
// Ops (T in {half, bfloat16, float, double}; U, the per-channel "parameter"
// type, is double for double tensors and float otherwise):
//
//   KerasResidualBnAddActTrain(x: T, gamma: U, beta: U, residual: T)
//       -> (y: T, mean: U, var: U)
//   KerasResidualBnAddActBackward(dy: T, x: T, residual: T, mean: U, var: U,
//                                 gamma: U, beta: U)
//       -> (dx: T, dgamma: U, dbeta: U, dresidual: T)
//   KerasResidualScaleShiftAddAct(x: T, scale: U, shift: U, residual: T) -> y: T
//   KerasResidualScaleShiftAddActBackward(dy: T, x: T, scale: U, shift: U,
//                                         residual: T)
//       -> (dx: T, dscale: U, dshift: U, dresidual: T)
//
// x is 4D: NHWC when channels_last, else NCHW. An absent residual (attr
// has_residual = false) or scale (has_scale = false) is passed as any empty
// tensor, and its gradient comes back as a tensor of shape [0].

#include "../include/keras_residual/kernels.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/platform/threadpool.h"

namespace keras_residual_tf {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::DimensionHandle;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace kr = ::keras_residual;

// ---------------------------------------------------------------------------
// Op registrations and shape functions.

// The channel dimension of the 4D x, merged with the length of each of the
// given per-channel inputs.
absl::Status ChannelDim(InferenceContext* c, ShapeHandle x, bool channels_last,
                        std::initializer_list<int> vector_inputs, DimensionHandle* channels) {
  *channels = c->Dim(x, channels_last ? 3 : 1);
  for (int i : vector_inputs) {
    ShapeHandle v;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 1, &v));
    TF_RETURN_IF_ERROR(c->Merge(*channels, c->Dim(v, 0), channels));
  }
  return absl::OkStatus();
}

absl::Status BnAddActTrainShape(InferenceContext* c) {
  bool channels_last, has_residual;
  TF_RETURN_IF_ERROR(c->GetAttr("channels_last", &channels_last));
  TF_RETURN_IF_ERROR(c->GetAttr("has_residual", &has_residual));
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  if (has_residual) TF_RETURN_IF_ERROR(c->Merge(x, c->input(3), &x));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelDim(c, x, channels_last, {1, 2}, &channels));
  c->set_output(0, x);
  c->set_output(1, c->Vector(channels));
  c->set_output(2, c->Vector(channels));
  return absl::OkStatus();
}

absl::Status BnAddActBackwardShape(InferenceContext* c) {
  bool channels_last, has_residual;
  TF_RETURN_IF_ERROR(c->GetAttr("channels_last", &channels_last));
  TF_RETURN_IF_ERROR(c->GetAttr("has_residual", &has_residual));
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &x));
  TF_RETURN_IF_ERROR(c->Merge(x, c->input(0), &x));
  if (has_residual) TF_RETURN_IF_ERROR(c->Merge(x, c->input(2), &x));
  DimensionHandle channels;
  TF_RETURN_IF_ERROR(ChannelDim(c, x, channels_last, {3, 4, 5, 6}, &channels));
  c->set_output(0, x);
  c->set_output(1, c->Vector(channels));
  c->set_output(2, c->Vector(channels));
  c->set_output(3, has_residual ? x : c->Vector(0));
  return absl::OkStatus();
}

absl::Status ScaleShiftAddActShape(InferenceContext* c) {
  bool channels_last, has_scale, has_residual;
  TF_RETURN_IF_ERROR(c->GetAttr("channels_last", &channels_last));
  TF_RETURN_IF_ERROR(c->GetAttr("has_scale", &has_scale));
  TF_RETURN_IF_ERROR(c->GetAttr("has_residual", &has_residual));
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 4, &x));
  if (has_residual) TF_RETURN_IF_ERROR(c->Merge(x, c->input(3), &x));
  DimensionHandle channels;
  if (has_scale) {
    TF_RETURN_IF_ERROR(ChannelDim(c, x, channels_last, {1, 2}, &channels));
  } else {
    TF_RETURN_IF_ERROR(ChannelDim(c, x, channels_last, {2}, &channels));
  }
  c->set_output(0, x);
  return absl::OkStatus();
}

absl::Status ScaleShiftAddActBackwardShape(InferenceContext* c) {
  bool channels_last, has_scale, has_residual;
  TF_RETURN_IF_ERROR(c->GetAttr("channels_last", &channels_last));
  TF_RETURN_IF_ERROR(c->GetAttr("has_scale", &has_scale));
  TF_RETURN_IF_ERROR(c->GetAttr("has_residual", &has_residual));
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 4, &x));
  TF_RETURN_IF_ERROR(c->Merge(x, c->input(0), &x));
  if (has_residual) TF_RETURN_IF_ERROR(c->Merge(x, c->input(4), &x));
  DimensionHandle channels;
  if (has_scale) {
    TF_RETURN_IF_ERROR(ChannelDim(c, x, channels_last, {2, 3}, &channels));
  } else {
    TF_RETURN_IF_ERROR(ChannelDim(c, x, channels_last, {3}, &channels));
  }
  c->set_output(0, x);
  c->set_output(1, has_scale ? c->Vector(channels) : c->Vector(0));
  c->set_output(2, c->Vector(channels));
  c->set_output(3, has_residual ? x : c->Vector(0));
  return absl::OkStatus();
}

#define KR_COMMON_ATTRS                            \
  Attr("T: {half, bfloat16, float, double}")       \
      .Attr("U: {float, double}")                  \
      .Attr("activation: int = 0")                 \
      .Attr("alpha: float = 0.0")                  \
      .Attr("channels_last: bool = true")          \
      .Attr("has_residual: bool = true")

REGISTER_OP("KerasResidualBnAddActTrain")
    .Input("x: T")
    .Input("gamma: U")
    .Input("beta: U")
    .Input("residual: T")
    .Output("y: T")
    .Output("mean: U")
    .Output("var: U")
    .KR_COMMON_ATTRS.Attr("epsilon: float = 0.001")
    .SetShapeFn(BnAddActTrainShape)
    .Doc(R"doc(
Training-mode BatchNormalization (batch statistics) + residual add +
activation: y = act(gamma * (x - mean) / sqrt(var + epsilon) + beta + residual).
mean and var are the per-channel batch mean and biased variance.
)doc");

REGISTER_OP("KerasResidualBnAddActBackward")
    .Input("dy: T")
    .Input("x: T")
    .Input("residual: T")
    .Input("mean: U")
    .Input("var: U")
    .Input("gamma: U")
    .Input("beta: U")
    .Output("dx: T")
    .Output("dgamma: U")
    .Output("dbeta: U")
    .Output("dresidual: T")
    .KR_COMMON_ATTRS.Attr("epsilon: float = 0.001")
    .SetShapeFn(BnAddActBackwardShape)
    .Doc(R"doc(
Gradient of KerasResidualBnAddActTrain with respect to x (through the batch
statistics too), gamma, beta and residual.
)doc");

REGISTER_OP("KerasResidualScaleShiftAddAct")
    .Input("x: T")
    .Input("scale: U")
    .Input("shift: U")
    .Input("residual: T")
    .Output("y: T")
    .KR_COMMON_ATTRS.Attr("has_scale: bool = true")
    .SetShapeFn(ScaleShiftAddActShape)
    .Doc(R"doc(
Per-channel affine + residual add + activation:
y = act(x * scale + shift + residual).
)doc");

REGISTER_OP("KerasResidualScaleShiftAddActBackward")
    .Input("dy: T")
    .Input("x: T")
    .Input("scale: U")
    .Input("shift: U")
    .Input("residual: T")
    .Output("dx: T")
    .Output("dscale: U")
    .Output("dshift: U")
    .Output("dresidual: T")
    .KR_COMMON_ATTRS.Attr("has_scale: bool = true")
    .SetShapeFn(ScaleShiftAddActBackwardShape)
    .Doc(R"doc(
Gradient of KerasResidualScaleShiftAddAct, with scale and shift as
independent inputs.
)doc");

#undef KR_COMMON_ATTRS

// ---------------------------------------------------------------------------
// Kernels.

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr kr::DType value = kr::DType::kFloat32;
};
template <>
struct DTypeOf<double> {
  static constexpr kr::DType value = kr::DType::kFloat64;
};
template <>
struct DTypeOf<Eigen::half> {
  static constexpr kr::DType value = kr::DType::kFloat16;
};
template <>
struct DTypeOf<Eigen::bfloat16> {
  static constexpr kr::DType value = kr::DType::kBFloat16;
};

const void* Ptr(const Tensor& t) { return t.tensor_data().data(); }
void* Ptr(Tensor* t) { return const_cast<char*>(t->tensor_data().data()); }

// The CPU kernels run their slices on the intra-op thread pool of the device
// that runs the op (with threads of their own, they would share the cores
// with that pool's spinning threads). The pool is the calling thread's, set
// for the duration of a Compute by IntraOpPool.
thread_local tensorflow::thread::ThreadPool* tl_pool = nullptr;

void RunOnIntraOpPool(int n, void* ctx, void (*body)(void*, int)) {
  tensorflow::thread::ThreadPool* pool = tl_pool;
  if (pool == nullptr) {
    for (int t = 0; t < n; ++t) body(ctx, t);
    return;
  }
  // A cost per slice far above the sharding threshold: one shard per slice.
  pool->ParallelFor(n, int64_t{1} << 30, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) body(ctx, static_cast<int>(t));
  });
}

class IntraOpPool {
 public:
  explicit IntraOpPool(OpKernelContext* ctx) : previous_(tl_pool) {
    static const bool installed = [] {
      kr::cpu::set_parallel_runner(&RunOnIntraOpPool);
      return true;
    }();
    (void)installed;
    const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
    tl_pool = workers != nullptr ? workers->workers : nullptr;
  }
  ~IntraOpPool() { tl_pool = previous_; }
  IntraOpPool(const IntraOpPool&) = delete;
  IntraOpPool& operator=(const IntraOpPool&) = delete;

 private:
  tensorflow::thread::ThreadPool* previous_;
};

// Attributes and validation shared by the four kernels.
class FusedOpBase : public OpKernel {
 public:
  explicit FusedOpBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    int activation;
    float alpha;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("activation", &activation));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("alpha", &alpha));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("channels_last", &channels_last_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_residual", &has_residual_));
    OP_REQUIRES(ctx,
                activation >= static_cast<int>(kr::Activation::kLinear) &&
                    activation <= static_cast<int>(kr::Activation::kGelu),
                absl::InvalidArgumentError(
                    "activation must be an activation code in [0, 5]. Received: activation=" +
                    std::to_string(activation)));
    act_ = kr::Act{static_cast<kr::Activation>(activation), static_cast<double>(alpha)};
    // TensorFlow's gradients multiply (ReluGrad and Relu6Grad: dy *
    // act'(z); gelu's term by term): with its rule the native gradients
    // carry the NaN and inf of the composite path.
    act_.grad_rule = kr::GradRule::kMultiply;
  }

 protected:
  // Checks that x is 4D and returns its Shape.
  absl::Status GetShape(const Tensor& x, kr::Shape* shape) const {
    if (x.dims() != 4) {
      return absl::InvalidArgumentError("x must be a 4D tensor. Received: x.shape=" +
                                        x.shape().DebugString());
    }
    const int64_t n = x.dim_size(0);
    const int64_t c = x.dim_size(channels_last_ ? 3 : 1);
    const int64_t hw = channels_last_ ? x.dim_size(1) * x.dim_size(2)
                                      : x.dim_size(2) * x.dim_size(3);
    *shape = kr::Shape{n, c, hw, channels_last_};
    return absl::OkStatus();
  }

  static absl::Status CheckSameShape(const char* name, const Tensor& t, const Tensor& x) {
    if (t.shape() != x.shape()) {
      return absl::InvalidArgumentError(std::string(name) + " must have the shape of x, " +
                                        x.shape().DebugString() + ". Received: " + name +
                                        ".shape=" + t.shape().DebugString());
    }
    return absl::OkStatus();
  }

  static absl::Status CheckChannels(const char* name, const Tensor& t, int64_t c) {
    if (t.dims() != 1 || t.dim_size(0) != c) {
      return absl::InvalidArgumentError(std::string(name) + " must have shape [" +
                                        std::to_string(c) +
                                        "], one value per channel of x. Received: " + name +
                                        ".shape=" + t.shape().DebugString());
    }
    return absl::OkStatus();
  }

  template <typename U>
  void Fill(Tensor* t, U value) {
    U* p = static_cast<U*>(Ptr(t));
    for (int64_t i = 0; i < t->NumElements(); ++i) p[i] = value;
  }

  kr::Act act_;
  bool channels_last_;
  bool has_residual_;
};

template <typename T, typename U>
class BnAddActTrainOp : public FusedOpBase {
 public:
  explicit BnAddActTrainOp(OpKernelConstruction* ctx) : FusedOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
    OP_REQUIRES(ctx, epsilon_ > 0.0f,
                absl::InvalidArgumentError("epsilon must be positive. Received: epsilon=" +
                                           std::to_string(epsilon_)));
  }

  void Compute(OpKernelContext* ctx) override {
    IntraOpPool pool(ctx);
    const Tensor& x = ctx->input(0);
    const Tensor& gamma = ctx->input(1);
    const Tensor& beta = ctx->input(2);
    const Tensor& residual = ctx->input(3);
    kr::Shape shape;
    OP_REQUIRES_OK(ctx, GetShape(x, &shape));
    OP_REQUIRES_OK(ctx, CheckChannels("gamma", gamma, shape.c));
    OP_REQUIRES_OK(ctx, CheckChannels("beta", beta, shape.c));
    if (has_residual_) OP_REQUIRES_OK(ctx, CheckSameShape("residual", residual, x));

    Tensor *y, *mean, *var;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({shape.c}), &mean));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({shape.c}), &var));
    // An empty batch gives NaN statistics, as FusedBatchNorm does.
    kr::cpu::batch_norm_add_act(DTypeOf<T>::value, Ptr(x),
                                has_residual_ ? Ptr(residual) : nullptr, shape, Ptr(gamma),
                                Ptr(beta), static_cast<double>(epsilon_), act_, Ptr(y), Ptr(mean),
                                Ptr(var));
  }

 private:
  float epsilon_;
};

template <typename T, typename U>
class BnAddActBackwardOp : public FusedOpBase {
 public:
  explicit BnAddActBackwardOp(OpKernelConstruction* ctx) : FusedOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &epsilon_));
  }

  void Compute(OpKernelContext* ctx) override {
    IntraOpPool pool(ctx);
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& residual = ctx->input(2);
    const Tensor& mean = ctx->input(3);
    const Tensor& var = ctx->input(4);
    const Tensor& gamma = ctx->input(5);
    const Tensor& beta = ctx->input(6);
    kr::Shape shape;
    OP_REQUIRES_OK(ctx, GetShape(x, &shape));
    OP_REQUIRES_OK(ctx, CheckSameShape("dy", dy, x));
    if (has_residual_) OP_REQUIRES_OK(ctx, CheckSameShape("residual", residual, x));
    OP_REQUIRES_OK(ctx, CheckChannels("mean", mean, shape.c));
    OP_REQUIRES_OK(ctx, CheckChannels("var", var, shape.c));
    OP_REQUIRES_OK(ctx, CheckChannels("gamma", gamma, shape.c));
    OP_REQUIRES_OK(ctx, CheckChannels("beta", beta, shape.c));

    Tensor *dx, *dgamma, *dbeta, *dresidual;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({shape.c}), &dgamma));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({shape.c}), &dbeta));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            3, has_residual_ ? x.shape() : TensorShape({0}), &dresidual));
    // An empty batch runs too: the kernels give dbeta = 0 and dgamma = 0 *
    // invstd, NaN with the NaN statistics of an empty batch, as the
    // composite path's gradients are.
    kr::cpu::batch_norm_add_act_backward(
        DTypeOf<T>::value, Ptr(dy), Ptr(x), has_residual_ ? Ptr(residual) : nullptr, shape,
        Ptr(mean), Ptr(var), Ptr(gamma), Ptr(beta), static_cast<double>(epsilon_), act_, Ptr(dx),
        has_residual_ ? Ptr(dresidual) : nullptr, Ptr(dgamma), Ptr(dbeta));
  }

 private:
  float epsilon_;
};

template <typename T, typename U>
class ScaleShiftAddActOp : public FusedOpBase {
 public:
  explicit ScaleShiftAddActOp(OpKernelConstruction* ctx) : FusedOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_scale", &has_scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    IntraOpPool pool(ctx);
    const Tensor& x = ctx->input(0);
    const Tensor& scale = ctx->input(1);
    const Tensor& shift = ctx->input(2);
    const Tensor& residual = ctx->input(3);
    kr::Shape shape;
    OP_REQUIRES_OK(ctx, GetShape(x, &shape));
    if (has_scale_) OP_REQUIRES_OK(ctx, CheckChannels("scale", scale, shape.c));
    OP_REQUIRES_OK(ctx, CheckChannels("shift", shift, shape.c));
    if (has_residual_) OP_REQUIRES_OK(ctx, CheckSameShape("residual", residual, x));

    Tensor* y;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &y));
    if (shape.size() == 0) return;
    kr::cpu::scale_shift_add_act(DTypeOf<T>::value, Ptr(x),
                                 has_residual_ ? Ptr(residual) : nullptr, shape,
                                 has_scale_ ? Ptr(scale) : nullptr, Ptr(shift), act_, Ptr(y));
  }

 private:
  bool has_scale_;
};

template <typename T, typename U>
class ScaleShiftAddActBackwardOp : public FusedOpBase {
 public:
  explicit ScaleShiftAddActBackwardOp(OpKernelConstruction* ctx) : FusedOpBase(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("has_scale", &has_scale_));
  }

  void Compute(OpKernelContext* ctx) override {
    IntraOpPool pool(ctx);
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    const Tensor& scale = ctx->input(2);
    const Tensor& shift = ctx->input(3);
    const Tensor& residual = ctx->input(4);
    kr::Shape shape;
    OP_REQUIRES_OK(ctx, GetShape(x, &shape));
    OP_REQUIRES_OK(ctx, CheckSameShape("dy", dy, x));
    if (has_scale_) OP_REQUIRES_OK(ctx, CheckChannels("scale", scale, shape.c));
    OP_REQUIRES_OK(ctx, CheckChannels("shift", shift, shape.c));
    if (has_residual_) OP_REQUIRES_OK(ctx, CheckSameShape("residual", residual, x));

    Tensor *dx, *dscale, *dshift, *dresidual;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &dx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, has_scale_ ? TensorShape({shape.c}) : TensorShape({0}), &dscale));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({shape.c}), &dshift));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            3, has_residual_ ? x.shape() : TensorShape({0}), &dresidual));
    if (shape.size() == 0) {
      Fill<U>(dscale, U(0));
      Fill<U>(dshift, U(0));
      return;
    }
    kr::cpu::scale_shift_add_act_backward(
        DTypeOf<T>::value, Ptr(dy), Ptr(x), has_residual_ ? Ptr(residual) : nullptr, shape,
        has_scale_ ? Ptr(scale) : nullptr, Ptr(shift), act_, Ptr(dx),
        has_residual_ ? Ptr(dresidual) : nullptr, has_scale_ ? Ptr(dscale) : nullptr,
        Ptr(dshift));
  }

 private:
  bool has_scale_;
};

#define KR_REGISTER(T, U)                                                                      \
  REGISTER_KERNEL_BUILDER(Name("KerasResidualBnAddActTrain")                                  \
                              .Device(DEVICE_CPU)                                             \
                              .TypeConstraint<T>("T")                                         \
                              .TypeConstraint<U>("U"),                                        \
                          BnAddActTrainOp<T, U>);                                             \
  REGISTER_KERNEL_BUILDER(Name("KerasResidualBnAddActBackward")                               \
                              .Device(DEVICE_CPU)                                             \
                              .TypeConstraint<T>("T")                                         \
                              .TypeConstraint<U>("U"),                                        \
                          BnAddActBackwardOp<T, U>);                                          \
  REGISTER_KERNEL_BUILDER(Name("KerasResidualScaleShiftAddAct")                               \
                              .Device(DEVICE_CPU)                                             \
                              .TypeConstraint<T>("T")                                         \
                              .TypeConstraint<U>("U"),                                        \
                          ScaleShiftAddActOp<T, U>);                                          \
  REGISTER_KERNEL_BUILDER(Name("KerasResidualScaleShiftAddActBackward")                       \
                              .Device(DEVICE_CPU)                                             \
                              .TypeConstraint<T>("T")                                         \
                              .TypeConstraint<U>("U"),                                        \
                          ScaleShiftAddActBackwardOp<T, U>);

// The parameter type is double for double tensors and float otherwise.
KR_REGISTER(float, float)
KR_REGISTER(double, double)
KR_REGISTER(Eigen::half, float)
KR_REGISTER(Eigen::bfloat16, float)

#undef KR_REGISTER

}  // namespace keras_residual_tf
