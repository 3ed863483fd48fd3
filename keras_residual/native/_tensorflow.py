"""The TensorFlow adapter: a custom op library over the CPU kernels.

``csrc/tensorflow/ops.cc`` registers four ops (training forward and backward,
epilogue forward and backward) with shape functions and CPU kernels for
float16, bfloat16, float32 and float64. This module compiles it on first use
against the installed TensorFlow, loads it once per process, registers the
gradients of the two forward ops and exposes them as differentiable functions
on TensorFlow tensors, usable eagerly, inside `tf.function` and in
`model.fit`. A custom op cannot run inside an XLA cluster: callers check
`in_xla_context()` and use the composite path there.

Examples:

>>> from keras_residual.native import _tensorflow
>>> sorted(_tensorflow.ACTIVATIONS)[:2]
['gelu', 'leaky_relu']
"""

from __future__ import annotations

from pathlib import Path

from keras_residual.native import _build, _stack

# The codes of keras_residual::Activation in csrc/include/keras_residual/kernels.h.
ACTIVATIONS = _build.ACTIVATION_CODES
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")

_loaded = _build.LoadOnce("the TensorFlow op library")


def sources() -> list[Path]:
    """The C++ files compiled into the op library."""
    return [*_build.kernel_sources(), _build.CSRC / "tensorflow" / "ops.cc"]


def _flags() -> list[str]:
    # ops.cc includes TensorFlow's headers: TensorFlow's own flags and no
    # -march (its Eigen fails under -march=native on AVX-512 FP16 CPUs). The
    # kernels get the host's ISA in their own translation unit.
    return ["-std=c++17", "-O3", "-fPIC", "-pthread"]


def _compile(out_path: Path, build_dir: Path) -> None:
    import tensorflow as tf

    cxx = _build.compiler()
    kernels = _build.compile_kernels(build_dir)
    # TensorFlow's headers are noisy under recent compilers.
    quiet = ["-Wno-deprecated-declarations", "-Wno-interference-size"]
    ops = build_dir / "tensorflow_ops.o"
    _build.run_compiler(
        [
            cxx,
            *_flags(),
            *quiet,
            *tf.sysconfig.get_compile_flags(),
            f"-I{_build.CSRC / 'include'}",
            "-c",
            str(_build.CSRC / "tensorflow" / "ops.cc"),
            "-o",
            str(ops),
        ],
        cwd=build_dir,
    )
    _build.run_compiler(
        [
            cxx,
            "-shared",
            *_flags(),
            str(ops),
            *map(str, kernels),
            *tf.sysconfig.get_link_flags(),
            "-o",
            str(out_path),
        ],
        cwd=build_dir,
    )


def build(force: bool = False, cuda: bool | None = None) -> Path:
    """Compiles (or finds in the cache) the op library; returns its path.

    Args:
        force: compile even if the cache holds a valid library or a
            recorded failure.
        cuda: must be None or False: the TensorFlow adapter has CPU kernels
            only.

    Returns:
        The path of the shared library.

    Raises:
        NativeUnavailable: TensorFlow, the compiler or the sources are
            missing, or compiling failed (`BuildFailed`, now or earlier).
    """
    if cuda:
        raise ValueError(
            "`cuda` must be None or False: the TensorFlow adapter has CPU kernels only. "
            f"Received: cuda={cuda!r}"
        )
    try:
        import tensorflow as tf
    except ImportError as error:
        raise _build.NativeUnavailable(f"tensorflow is not installed ({error})") from error
    extra = " ".join(
        [
            _build.compiler_version(),
            *_flags(),
            *tf.sysconfig.get_compile_flags(),
            *tf.sysconfig.get_link_flags(),
            _build.kernel_key(),
        ]
    )
    return _build.build_library(
        "tensorflow",
        sources(),
        framework_version=tf.__version__,
        compile=_compile,
        extra_key=extra,
        rebuild=force,
        description=f"the TensorFlow {tf.__version__} op library",
        estimate="1 minute",
    )


def load():
    """The loaded op library (a module of op wrappers), compiled on first use.

    The library is loaded and the gradients registered once per process; a
    failure is remembered and raised again without a second build.

    Returns:
        The module returned by `tf.load_op_library`.

    Raises:
        NativeUnavailable: why the library cannot be built or loaded.
    """
    return _loaded.get(_load)


def _load():
    import tensorflow as tf

    path = build()
    try:
        library = tf.load_op_library(str(path))
    except (tf.errors.NotFoundError, OSError):
        # A library that passed its checks but does not load (built against
        # another TensorFlow, say): compile it afresh once.
        path = build(force=True)
        library = tf.load_op_library(str(path))
    _register_gradients(tf, library)
    return path, library


def _register_gradients(tf, library) -> None:
    def bn_add_act_train_grad(op, dy, dmean, dvar):
        # mean and var are statistics for the moving averages: no gradient
        # flows back through them.
        del dmean, dvar
        has_residual = op.get_attr("has_residual")
        dx, dgamma, dbeta, dresidual = library.keras_residual_bn_add_act_backward(
            dy=dy,
            x=op.inputs[0],
            residual=op.inputs[3],
            mean=op.outputs[1],
            var=op.outputs[2],
            gamma=op.inputs[1],
            beta=op.inputs[2],
            epsilon=op.get_attr("epsilon"),
            activation=op.get_attr("activation"),
            alpha=op.get_attr("alpha"),
            channels_last=op.get_attr("channels_last"),
            has_residual=has_residual,
        )
        return [dx, dgamma, dbeta, dresidual if has_residual else None]

    def scale_shift_add_act_grad(op, dy):
        has_scale = op.get_attr("has_scale")
        has_residual = op.get_attr("has_residual")
        dx, dscale, dshift, dresidual = library.keras_residual_scale_shift_add_act_backward(
            dy=dy,
            x=op.inputs[0],
            scale=op.inputs[1],
            shift=op.inputs[2],
            residual=op.inputs[3],
            activation=op.get_attr("activation"),
            alpha=op.get_attr("alpha"),
            channels_last=op.get_attr("channels_last"),
            has_scale=has_scale,
            has_residual=has_residual,
        )
        return [
            dx,
            dscale if has_scale else None,
            dshift,
            dresidual if has_residual else None,
        ]

    for name, function in (
        ("KerasResidualBnAddActTrain", bn_add_act_train_grad),
        ("KerasResidualScaleShiftAddAct", scale_shift_add_act_grad),
    ):
        try:
            tf.RegisterGradient(name)(function)
        except KeyError:
            pass  # already registered in this process


def status() -> dict:
    """The state of the TensorFlow adapter, for ``python -m keras_residual info``.

    Does not build or load anything itself.

    Returns:
        A dict with `built` and `loaded` (bools), `tensorflow` (its version,
        if installed), `path` (the library, once loaded), `kernels` (the
        kernels' version string) and `reason` (why it is not loaded, if
        known).
    """
    info: dict = {"built": False, "loaded": False}
    try:
        import tensorflow as tf
    except ImportError as error:
        info["reason"] = f"tensorflow is not installed ({error})"
        return info
    info["tensorflow"] = tf.__version__
    return _loaded.status(info)


def in_xla_context() -> bool:
    """Whether the caller is being traced into a function compiled with XLA.

    True inside `tf.function(jit_compile=True)` (also in functions it calls
    while tracing), where a custom op cannot run.

    Returns:
        True under XLA compilation, False eagerly, in ordinary
        `tf.function`s, or if TensorFlow's internals cannot tell.
    """
    try:
        import tensorflow as tf

        if tf.executing_eagerly():
            return False
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()))
    except Exception:  # noqa: BLE001 - internal API: assume no XLA if it moved
        return False


def supports(device: str | None) -> bool:
    """Whether the op library has kernels for tensors on `device`.

    Args:
        device: a TensorFlow device string such as `x.device`
            ("/job:localhost/replica:0/task:0/device:CPU:0"), or `""`/None
            when unknown (inside a `tf.function` being traced).

    Returns:
        True on CPU. For an unknown device, True only if TensorFlow sees no
        GPU (where the op would otherwise be placed on the CPU, away from the
        data).
    """
    import tensorflow as tf

    if device:
        device_type = tf.DeviceSpec.from_string(device).device_type
        if device_type:
            return device_type.upper() == "CPU"
    return not tf.config.list_logical_devices("GPU")


def graph_reason(x) -> str | None:
    """Why the graph being traced cannot hold the custom ops, or None.

    XLA clusters (`jit_compile=True`) cannot run a custom op, and a
    SavedModel export should hold built-in ops only, so that it loads with
    TensorFlow alone.
    """
    if in_xla_context():
        return "XLA compilation cannot run a custom op"
    if _tracing_for_export():
        return "a SavedModel export holds built-in ops only"
    return None


def device_reason(x) -> str | None:
    """Why the loaded op library has no kernel for `x`'s device, or None."""
    device = getattr(x, "device", "") or ""
    if supports(device):
        return None
    return f"no native kernel for device {device!r} on tensorflow (CPU kernels only)"


def _tracing_for_export() -> bool:
    """Whether TensorFlow is tracing this call for a SavedModel export.

    Checked only while tracing a graph (never per step). Keras' `export()`
    and `ExportArchive` trace their endpoints before `tf.saved_model.save`
    runs, so TensorFlow's save context does not cover them, and neither
    offers a public "exporting" flag: the frames of their modules on the
    stack are the signal. `tests/native/test_dispatch.py` pins it: an
    exported graph must hold no KerasResidual op.
    """
    import tensorflow as tf

    if tf.executing_eagerly():
        return False
    return _stack.called_from("/keras/src/export/", "/tensorflow/python/saved_model/")


def _param_dtype(tf, x_dtype):
    return tf.float64 if x_dtype == tf.float64 else tf.float32


def _check_x(tf, x, name: str) -> None:
    if x.dtype.name not in _FLOAT_DTYPES:
        raise ValueError(
            f"`x` must be float16, bfloat16, float32 or float64 for {name}. "
            f"Received: x.dtype={x.dtype.name}"
        )
    if x.shape.rank is not None and x.shape.rank != 4:
        raise ValueError(f"`x` must be a 4D tensor for {name}. Received: x.shape={x.shape}")


def _residual(tf, residual, x):
    if residual is None:
        return tf.zeros([0], x.dtype), False
    residual = tf.convert_to_tensor(residual)
    if residual.dtype != x.dtype:
        residual = tf.cast(residual, x.dtype)
    if (
        residual.shape.rank is not None
        and x.shape.rank is not None
        and not residual.shape.is_compatible_with(x.shape)
    ):
        raise ValueError(
            f"`residual` must have the shape of `x`, {x.shape}. "
            f"Received: residual.shape={residual.shape}"
        )
    return residual, True


def add_bias_residual(x, bias, residual, *, channels_last: bool):
    """`x + bias + residual` in the ops that grappler fuses into the conv before.

    With oneDNN (TensorFlow's default on x86-64), Conv2D, BiasAdd, AddN and
    Relu become one `_MklNativeFusedConv2D`: one pass over the conv output
    instead of three. The residual added with `AddV2` (`keras.ops.add`), the
    remapper fuses only the bias. The sums are the same floats as
    `keras.ops.add`'s; `bias` and `residual` may each be None.
    """
    import tensorflow as tf

    if bias is not None:
        x = tf.nn.bias_add(
            x, tf.cast(bias, x.dtype), data_format="NHWC" if channels_last else "NCHW"
        )
    if residual is not None:
        x = tf.math.add_n([x, tf.cast(residual, x.dtype)])
    return x


def batch_norm_inference(x, gamma, beta, mean, variance, *, epsilon: float, channels_last: bool):
    """Inference BatchNormalization in the op that grappler fuses into the conv before.

    `FusedBatchNormV3` with `is_training=False`: with oneDNN (TensorFlow's
    default on x86-64), Conv2D, this op and a following Relu become one
    `_MklNativeFusedConv2D`, which applies the per-channel scale and shift
    to the conv output in place; the kernel is not rewritten. The statistics
    and parameters are float32 (as Keras' BatchNormalization computes them);
    `x` float16, bfloat16 or float32 (float64, which the op does not take,
    runs as `tf.nn.batch_normalization`). The result is `x`'s dtype.
    """
    import tensorflow as tf

    if x.dtype == tf.float64:
        shape = [-1] if channels_last else [-1, 1, 1]
        gamma, beta, mean, variance = (
            tf.reshape(tf.cast(v, tf.float64), shape) for v in (gamma, beta, mean, variance)
        )
        return tf.nn.batch_normalization(x, mean, variance, beta, gamma, epsilon)
    params = [tf.cast(v, tf.float32) for v in (gamma, beta, mean, variance)]
    y, *_ = tf.raw_ops.FusedBatchNormV3(
        x=x,
        scale=params[0],
        offset=params[1],
        mean=params[2],
        variance=params[3],
        epsilon=float(epsilon),
        data_format="NHWC" if channels_last else "NCHW",
        is_training=False,
    )
    return y


def bn_add_act_train(
    x,
    gamma,
    beta,
    residual,
    *,
    epsilon: float,
    activation: int,
    alpha: float,
    channels_last: bool,
):
    """Training-mode BatchNormalization + residual add + activation.

    `y = act(gamma * (x - mean) / sqrt(var + epsilon) + beta + residual)` with
    the per-channel batch mean and biased variance of `x`. Differentiable
    with respect to `x` (through the statistics too), `gamma`, `beta` and
    `residual`; `mean` and `var` carry no gradient.

    Args:
        x: 4D float tensor, NHWC if `channels_last` else NCHW.
        gamma: per-channel scale, shape `(channels,)`.
        beta: per-channel offset, shape `(channels,)`.
        residual: tensor of the shape of `x`, or None.
        epsilon: added to the variance.
        activation: activation code (see `ACTIVATIONS`).
        alpha: negative slope of leaky_relu (ignored otherwise).
        channels_last: the layout of `x`.

    Returns:
        `(y, mean, var)`: `y` of the shape and dtype of `x`; `mean` and `var`
        of shape `(channels,)`, float64 for float64 `x` and float32 otherwise.

    Raises:
        ValueError: bad dtype, rank, activation or shapes.
        NativeUnavailable: the op library cannot be built or loaded.
    """
    library = load()
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    _check_x(tf, x, "the fused BatchNormalization op")
    activation = _build.check_activation_code(activation)
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon!r}")
    param = _param_dtype(tf, x.dtype)
    gamma = tf.cast(gamma, param)
    beta = tf.cast(beta, param)
    residual, has_residual = _residual(tf, residual, x)
    y, mean, var = library.keras_residual_bn_add_act_train(
        x=x,
        gamma=gamma,
        beta=beta,
        residual=residual,
        epsilon=float(epsilon),
        activation=activation,
        alpha=float(alpha),
        channels_last=bool(channels_last),
        has_residual=has_residual,
    )
    return y, mean, var


def scale_shift_add_act(
    x,
    scale,
    shift,
    residual,
    *,
    activation: int,
    alpha: float,
    channels_last: bool,
):
    """Per-channel affine + residual add + activation.

    `y = act(x * scale + shift + residual)`, differentiable with respect to
    `x`, `scale`, `shift` and `residual` (`scale` and `shift` as independent
    inputs, as in inference or a folded model).

    Args:
        x: 4D float tensor, NHWC if `channels_last` else NCHW.
        scale: per-channel scale, shape `(channels,)`, or None for 1.
        shift: per-channel offset, shape `(channels,)`.
        residual: tensor of the shape of `x`, or None.
        activation: activation code (see `ACTIVATIONS`).
        alpha: negative slope of leaky_relu (ignored otherwise).
        channels_last: the layout of `x`.

    Returns:
        `y`, of the shape and dtype of `x`.

    Raises:
        ValueError: bad dtype, rank, activation or shapes.
        NativeUnavailable: the op library cannot be built or loaded.
    """
    library = load()
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    _check_x(tf, x, "the fused epilogue op")
    activation = _build.check_activation_code(activation)
    param = _param_dtype(tf, x.dtype)
    has_scale = scale is not None
    scale = tf.cast(scale, param) if has_scale else tf.zeros([0], param)
    shift = tf.cast(shift, param)
    residual, has_residual = _residual(tf, residual, x)
    return library.keras_residual_scale_shift_add_act(
        x=x,
        scale=scale,
        shift=shift,
        residual=residual,
        activation=activation,
        alpha=float(alpha),
        channels_last=bool(channels_last),
        has_scale=has_scale,
        has_residual=has_residual,
    )
