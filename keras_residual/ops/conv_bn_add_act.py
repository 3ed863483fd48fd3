"""``conv_bn_add_act``: the one op under every conv -> BN (-> add) -> act unit."""

from __future__ import annotations

import keras
from keras import ops

from keras_residual import _padding, config
from keras_residual import native as native_lib
from keras_residual._validation import data_format as check_data_format
from keras_residual.native._build import ACTIVATION_CODES, NativeUnavailable

# Activation name -> code of keras_residual::Activation in csrc/include.
NATIVE_ACTIVATIONS = ACTIVATION_CODES
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def conv_bn_add_act(
    inputs,
    kernel,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    residual=None,
    *,
    bias=None,
    strides=1,
    padding="same",
    dilation_rate=1,
    activation="relu",
    negative_slope=0.2,
    epsilon=1e-5,
    training=False,
    data_format=None,
    synchronized=False,
    implementation="auto",
):
    """`act(BN(conv(inputs, kernel) + bias) + residual)`, fused where possible.

    The convolution is the framework's own: `keras.ops.conv`, or unless
    "composite" is asked for, the backend's own `conv2d` where it has one
    (`keras_residual.native.own_op`: torch's, without Keras' layout copies;
    on torch and JAX, 1x1 convolutions on the CPU as matrix products).
    What follows it, the BatchNormalization, the residual add and the
    activation, runs either as `keras.ops` (the composite path, the
    reference) or as the native kernels of `csrc/` (two passes over memory
    forward, two backward).

    With `gamma`, `beta`, `moving_mean` and `moving_variance` all `None` there
    is no BatchNormalization: `act(conv(inputs) + bias + residual)`, the
    inference epilogue of a folded model.

    Args:
        inputs: 4D tensor, `(batch, height, width, channels)` for
            channels_last, `(batch, channels, height, width)` otherwise.
        kernel: conv kernel `(kh, kw, in_channels, filters)`, Keras' layout.
        gamma, beta, moving_mean, moving_variance: 1D, `filters` values each:
            the BatchNormalization's variables, or all `None` for no BN.
        residual: `None` or a tensor of the output's shape, added before the
            activation.
        bias: `None` or the conv bias, `filters` values.
        strides, dilation_rate: as `keras.ops.conv`.
        padding: `"same"` or `"valid"`, as `keras.ops.conv`, or
            `"symmetric"`: `dilation_rate * (k - 1) // 2` zeros on every
            side, as PyTorch's `padding=k // 2` (torchvision, timm). The
            native torch path passes it to the convolution (no padded copy).
        activation: `"relu"`, `"leaky_relu"`, `"relu6"`, `"silu"`/`"swish"`,
            `"gelu"` or `"linear"` (all native), or the name of any other Keras
            activation (composite only). Defaults to `"relu"`.
        negative_slope: float. Slope of `"leaky_relu"`. Defaults to `0.2`
            (`keras.activations.leaky_relu`'s).
        epsilon: float. BatchNormalization epsilon. Defaults to `1e-5`.
        training: bool. With `True` the batch statistics normalize and are
            returned, so the caller updates its moving statistics exactly as
            `keras.layers.BatchNormalization` does; with `False` the moving
            statistics normalize. Defaults to `False`.
        data_format: `"channels_last"`, `"channels_first"` or `None` for
            `keras.config.image_data_format()`.
        synchronized: bool. Batch statistics over all replicas of a
            `tf.distribute` strategy (composite path). TensorFlow only: it is
            ignored on JAX, whose `keras.distribution` computes global
            statistics anyway, and on torch, which has none.
            Defaults to `False`.
        implementation: `"auto"`, `"native"` or `"composite"`. `"auto"` follows
            `keras_residual.config.get_implementation()`, which by default
            means native where the active backend has an adapter and the
            device and call fit it, composite elsewhere (with one warning if
            the adapter fails to build). At inference (`training=False`)
            `"auto"` follows `keras_residual.native.AUTO_INFERENCE`, chosen
            from benchmarks: native on torch; on TensorFlow the BN folded
            into the convolution in ops that grappler fuses into it (an
            inference BN op without a residual, else the BN folded into the
            kernel and bias on the fly); composite on JAX. `"native"` raises `NativeUnavailable`
            with the reason if it cannot run. Graphs that cannot hold a
            custom op use the composite path whatever was asked: XLA
            (`jit_compile=True`; Keras turns XLA off on CPU-only TensorFlow),
            a TensorFlow SavedModel or JAX export (so exported graphs contain
            only built-in ops) and symbolic shape inference. (JAX's own
            `jax.jit` holds the native handlers.) A global setting of
            `"composite"` (`KERAS_RESIDUAL_IMPLEMENTATION=composite`) turns
            the native path off everywhere. Defaults to `"auto"`.

    Returns:
        `outputs` with `training=False`; `(outputs, batch_mean,
        batch_variance)` with `training=True`, the statistics in float32 (the
        variance divided by the count, as Keras' BatchNormalization).

    Raises:
        ValueError: for bad ranks, channel counts, shapes or dtypes, before
            any kernel runs.
        NativeUnavailable: with `implementation="native"` when the native
            kernels cannot run this call; the message says why.

    Examples:

    >>> import numpy as np
    >>> x = np.random.rand(2, 8, 8, 4).astype("float32")
    >>> kernel = np.random.rand(1, 1, 4, 6).astype("float32")
    >>> ones, zeros = np.ones(6, "float32"), np.zeros(6, "float32")
    >>> y = conv_bn_add_act(x, kernel, ones, zeros, zeros, ones,
    ...                     implementation="composite")
    >>> tuple(y.shape)
    (2, 8, 8, 6)
    """
    data_format = check_data_format(data_format)
    # Keras' synchronized moments exist on TensorFlow only. Under JAX's
    # keras.distribution the statistics are global anyway; torch has none.
    synchronized = bool(synchronized) and keras.config.backend() == "tensorflow"
    has_bn = _check_bn_arguments(gamma, beta, moving_mean, moving_variance)
    if training and not has_bn:
        raise ValueError(
            "`training=True` needs the BatchNormalization variables; with `gamma`, `beta`, "
            "`moving_mean` and `moving_variance` all None there are no statistics to "
            f"compute. Received: training={training!r}"
        )
    config._check(implementation)
    _padding.check(padding)
    activation_name = _activation_name(activation)
    channel_axis = -1 if data_format == "channels_last" else 1
    filters = _validate_shapes(
        inputs, kernel, (gamma, beta, moving_mean, moving_variance), bias, channel_axis
    )

    # The graph and device checks look at `inputs`, which shares the conv
    # output's graph and device.
    if not isinstance(inputs, keras.KerasTensor):
        inputs = ops.convert_to_tensor(inputs)
    requested = _requested(implementation)
    backend = keras.config.backend()
    holds = _graph_holds(requested, inputs)
    conv = native_lib.own_op(backend, "conv2d") if holds else None
    fused_bn = None
    if not training and requested == "auto":
        # The written policy of "auto" at inference: `native.AUTO_INFERENCE`.
        policy = native_lib.auto_inference(backend)
        if policy != "native":
            requested = "composite"
            if has_bn and policy == "folded":
                # Without a residual the graph compiler folds the BN itself
                # where the backend has the op for it; else it is folded here.
                if holds and residual is None:
                    fused_bn = native_lib.own_op(backend, "batch_norm_inference")
                if fused_bn is None:
                    kernel, bias = _fold(
                        kernel, bias, gamma, beta, moving_mean, moving_variance, epsilon
                    )
                    gamma = beta = moving_mean = moving_variance = None
    adapter = _native_adapter(
        requested if holds else "composite",
        inputs,
        activation_name,
        synchronized and bool(training),
        data_format,
    )
    if conv is None:
        if padding == "symmetric":
            inputs = _pad_symmetric(inputs, kernel, dilation_rate, channel_axis)
        x = ops.conv(
            inputs,
            kernel,
            strides=strides,
            padding="valid" if padding == "symmetric" else padding,
            dilation_rate=dilation_rate,
            data_format=data_format,
        )
    else:
        x = conv(
            inputs,
            ops.convert_to_tensor(kernel),
            strides=strides,
            padding=padding,
            dilation_rate=dilation_rate,
            channels_last=data_format == "channels_last",
        )
    if residual is not None:
        _validate_residual(residual, x)
        residual = ops.cast(residual, x.dtype)

    if fused_bn is not None:
        if bias is not None:
            # BN(x + bias) is BN(x) with the mean less the bias.
            dtype = keras.backend.result_type(x.dtype, "float32")
            moving_mean = ops.cast(moving_mean, dtype) - ops.cast(bias, dtype)
        x = fused_bn(
            x,
            gamma,
            beta,
            moving_mean,
            moving_variance,
            epsilon=float(epsilon),
            channels_last=data_format == "channels_last",
        )
        return _apply_activation(x, activation_name, activation, negative_slope)
    if adapter is None:
        return _composite(
            x,
            gamma,
            beta,
            moving_mean,
            moving_variance,
            residual,
            bias,
            activation_name,
            activation,
            negative_slope,
            epsilon,
            training,
            channel_axis,
            synchronized,
            filters,
        )
    return _native(
        adapter,
        x,
        gamma,
        beta,
        moving_mean,
        moving_variance,
        residual,
        bias,
        activation_name,
        negative_slope,
        epsilon,
        training,
        data_format == "channels_last",
    )


# -- validation -----------------------------------------------------------------


def _check_bn_arguments(gamma, beta, moving_mean, moving_variance) -> bool:
    given = [value is not None for value in (gamma, beta, moving_mean, moving_variance)]
    if all(given):
        return True
    if not any(given):
        return False
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    missing = [name for name, present in zip(names, given, strict=True) if not present]
    raise ValueError(
        "`gamma`, `beta`, `moving_mean` and `moving_variance` must be given together, or "
        f"all be None. Received: {', '.join(f'{name}=None' for name in missing)}"
    )


def _activation_name(activation):
    if activation is None:
        return "linear"
    if isinstance(activation, str):
        keras.activations.get(activation)  # raises a ValueError for unknown names
        return activation
    name = getattr(activation, "__name__", None)
    if name in NATIVE_ACTIVATIONS and activation is keras.activations.get(name):
        return name
    if callable(activation):
        return activation
    raise ValueError(
        "`activation` must be the name of a Keras activation, a callable or None. "
        f"Received: activation={activation!r}"
    )


def _static_shape(tensor):
    return tuple(None if dim is None else int(dim) for dim in tensor.shape)


def _validate_shapes(inputs, kernel, bn_variables, bias, channel_axis):
    for name, tensor, rank in (("inputs", inputs, 4), ("kernel", kernel, 4)):
        shape = _static_shape(tensor)
        if len(shape) != rank:
            raise ValueError(f"`{name}` must be {rank}D. Received: {name}.shape={shape}")
    dtype = keras.backend.standardize_dtype(inputs.dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"`inputs` must be float16, bfloat16, float32 or float64. Received: "
            f"inputs.dtype={dtype}"
        )
    in_channels = _static_shape(inputs)[channel_axis]
    kh, kw, kernel_in, filters = _static_shape(kernel)
    if in_channels is not None and kernel_in is not None and in_channels % kernel_in:
        raise ValueError(
            f"`kernel` expects {kernel_in} input channels (per group) but `inputs` has "
            f"{in_channels}, not a multiple. "
            f"Received: inputs.shape={_static_shape(inputs)}, kernel.shape={_static_shape(kernel)}"
        )
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    for name, value in (*zip(names, bn_variables, strict=True), ("bias", bias)):
        if value is None:
            continue
        shape = _static_shape(value)
        if len(shape) != 1 or (filters is not None and shape[0] not in (None, filters)):
            raise ValueError(
                f"`{name}` must have one value per output channel ({filters}). "
                f"Received: {name}.shape={shape}"
            )
    return filters


def _validate_residual(residual, x):
    expected, shape = _static_shape(x), _static_shape(residual)
    if len(shape) != 4 or any(
        a is not None and b is not None and a != b for a, b in zip(shape, expected, strict=True)
    ):
        raise ValueError(
            f"`residual` must have the shape of the conv output {expected}. "
            f"Received: residual.shape={shape}"
        )


# -- dispatch -------------------------------------------------------------------


def _requested(implementation):
    """`implementation` after the global setting: "auto", "native" or "composite"."""
    if config.get_implementation() == "composite":
        return "composite"
    return config.get_implementation() if implementation == "auto" else implementation


def _native_adapter(requested, x, activation_name, synchronized, data_format):
    """The adapter to run this call natively, or None for composite.

    `requested` is `_requested(implementation)`, or "composite" where the
    graph cannot hold the adapter's ops (`_graph_holds`). Backend knowledge
    stays in the adapters (`keras_residual.native`): this asks them whether
    they load and whether they run on `x`'s device.
    """
    if requested == "composite":
        return None
    backend = keras.config.backend()
    reason = _unsupported_reason(backend, activation_name, synchronized)
    if reason is None:
        try:
            adapter = native_lib.adapter(backend)
        except NativeUnavailable as error:
            if requested == "native":
                raise
            native_lib.warn_unavailable(backend, str(error))
            return None
        reason = adapter.device_reason(x)
        if reason is None:
            return adapter
    if requested == "native":
        raise NativeUnavailable(f"implementation='native' cannot run this call: {reason}")
    return None


def _graph_holds(requested, x) -> bool:
    """Whether this call may run the adapter's ops: its own framework ops
    (`native.own_op`, which need no built library) and its native kernels.

    Never for "composite", which is `keras.ops` as Keras' layers compute it;
    nor, whatever was asked for, where the graph being traced cannot hold
    (or need not run) them: symbolic shape inference, XLA, SavedModel export
    (`native.graph_reason`, asked once per call).
    """
    if requested == "composite":
        return False
    return native_lib.graph_reason(keras.config.backend(), x) is None


def _unsupported_reason(backend, activation_name, synchronized):
    if not isinstance(activation_name, str) or activation_name not in NATIVE_ACTIVATIONS:
        return f"activation {activation_name!r} has no native kernel"
    if synchronized:
        return "synchronized batch statistics run on the composite path"
    return native_lib.no_adapter_reason(backend)


# -- the two paths ----------------------------------------------------------------


def _pad_symmetric(x, kernel, dilation_rate, channel_axis):
    pad_h, pad_w = _padding.symmetric(_static_shape(kernel)[:2], dilation_rate)
    if not (pad_h or pad_w):
        return x
    spatial = [(pad_h, pad_h), (pad_w, pad_w)]
    if channel_axis == -1:
        return ops.pad(x, [(0, 0), *spatial, (0, 0)])
    return ops.pad(x, [(0, 0), (0, 0), *spatial])


def _bias_shape(channel_axis, filters):
    return (filters,) if channel_axis == -1 else (1, filters, 1, 1)


def _composite(
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    residual,
    bias,
    activation_name,
    activation,
    negative_slope,
    epsilon,
    training,
    channel_axis,
    synchronized,
    filters,
):
    """keras.ops only, computed exactly as Conv2D + BatchNormalization do."""
    if gamma is None:
        # No BN between them: the bias and the residual are added in the ops
        # the backend's graph compiler fuses into the conv, where it says so.
        add = native_lib.own_op(keras.config.backend(), "add_bias_residual")
        if add is not None:
            x = add(x, bias, residual, channels_last=channel_axis == -1)
            bias = residual = None
    if bias is not None:
        x = ops.add(x, ops.reshape(ops.cast(bias, x.dtype), _bias_shape(channel_axis, filters)))
    mean = variance = None
    if gamma is not None:
        out_dtype = x.dtype
        # Keras' BatchNormalization computes in float32 for float16/bfloat16.
        compute_dtype = keras.backend.result_type(x.dtype, "float32")
        x = ops.cast(x, compute_dtype)
        if training:
            axes = [0, 1, 2] if channel_axis == -1 else [0, 2, 3]
            mean, variance = ops.moments(x, axes=axes, synchronized=synchronized)
            norm_mean, norm_variance = mean, variance
        else:
            norm_mean = ops.cast(moving_mean, compute_dtype)
            norm_variance = ops.cast(moving_variance, compute_dtype)
        x = ops.batch_normalization(
            x,
            norm_mean,
            norm_variance,
            axis=channel_axis,
            offset=ops.cast(beta, compute_dtype),
            scale=ops.cast(gamma, compute_dtype),
            epsilon=epsilon,
        )
        x = ops.cast(x, out_dtype)
    if residual is not None:
        x = ops.add(x, residual)
    x = _apply_activation(x, activation_name, activation, negative_slope)
    if training:
        return x, mean, variance
    return x


def _apply_activation(x, activation_name, activation, negative_slope):
    if activation_name == "leaky_relu":
        return keras.activations.leaky_relu(x, negative_slope=negative_slope)
    if isinstance(activation_name, str):
        return keras.activations.get(activation_name)(x)
    return activation(x)


def _native(
    adapter,
    x,
    gamma,
    beta,
    moving_mean,
    moving_variance,
    residual,
    bias,
    activation_name,
    negative_slope,
    epsilon,
    training,
    channels_last,
):
    code = NATIVE_ACTIVATIONS[activation_name]
    alpha = float(negative_slope)
    param_dtype = "float64" if keras.backend.standardize_dtype(x.dtype) == "float64" else "float32"
    if training:
        # The conv bias shifts the batch mean and cancels in the normalization,
        # so the kernels normalize conv(x) and the bias joins the mean only.
        # Its gradient is exactly zero; `bias * 0` in beta says so to the
        # framework (as Keras' own layers do, it then gets a gradient).
        beta = ops.cast(beta, param_dtype)
        if bias is not None:
            beta = beta + ops.cast(bias, param_dtype) * 0.0
        outputs, mean, variance = adapter.bn_add_act_train(
            x,
            ops.cast(gamma, param_dtype),
            beta,
            residual,
            epsilon=float(epsilon),
            activation=code,
            alpha=alpha,
            channels_last=channels_last,
        )
        if bias is not None:
            mean = ops.add(mean, ops.cast(bias, mean.dtype))
        return outputs, mean, variance
    scale = None  # 1: no BN left (a folded model)
    if gamma is not None:

        def scale_shift(*variables):
            return _scale_shift(*variables, epsilon, param_dtype)

        variables = (gamma, beta, moving_mean, moving_variance, bias)
        memo = getattr(adapter, "memo", None)
        if memo is None:
            scale, shift = scale_shift(*variables)
        else:
            # Eager torch: computed once while the variables are unchanged.
            variables = [None if v is None else ops.convert_to_tensor(v) for v in variables]
            scale, shift = memo(scale_shift, *variables, extra=(float(epsilon), param_dtype))
    elif bias is not None:
        shift = ops.cast(bias, param_dtype)
    else:
        shift = ops.zeros((x.shape[-1 if channels_last else 1],), param_dtype)
    return adapter.scale_shift_add_act(
        x, scale, shift, residual, activation=code, alpha=alpha, channels_last=channels_last
    )


def _scale_shift(gamma, beta, moving_mean, moving_variance, bias, epsilon, dtype):
    """Inference BN (after the conv bias) as `x * scale + shift`, in `dtype`."""
    scale = ops.cast(gamma, dtype) * ops.rsqrt(ops.cast(moving_variance, dtype) + epsilon)
    shift = ops.cast(beta, dtype) - ops.cast(moving_mean, dtype) * scale
    if bias is not None:
        shift = shift + ops.cast(bias, dtype) * scale
    return scale, shift


def _fold(kernel, bias, gamma, beta, moving_mean, moving_variance, epsilon):
    """The kernel and bias of conv -> inference BN as one conv, as `fold_batchnorm` folds.

    Computed in float32 (float64 for a float64 kernel) and returned in the
    kernel's dtype; the kernel's last axis is its output channels.
    """
    dtype = keras.backend.standardize_dtype(kernel.dtype)
    param_dtype = "float64" if dtype == "float64" else "float32"
    scale, shift = _scale_shift(
        gamma, beta, moving_mean, moving_variance, bias, epsilon, param_dtype
    )
    kernel = ops.cast(ops.cast(kernel, param_dtype) * scale, dtype)
    return kernel, shift


def max_pool(
    inputs,
    pool_size,
    strides,
    *,
    padding=0,
    data_format=None,
    implementation="auto",
    nonnegative=False,
):
    """Zero padding, then a "valid" max pooling: the ResNet stem's pool.

    The same as `keras.layers.ZeroPadding2D(padding)` followed by
    `keras.ops.max_pool(..., padding="valid")`. Unless "composite" is asked
    for, the backend's own pooling runs where it has one (torch's, without
    Keras' layout copies; `keras_residual.native.own_op`).

    Args:
        inputs: 4D tensor.
        pool_size, strides: an int or 2 ints.
        padding: int: zeros added on every side first. Defaults to `0`.
        data_format: `"channels_last"`, `"channels_first"` or `None` for
            `keras.config.image_data_format()`.
        implementation: `"auto"`, `"native"` or `"composite"`, as for
            `conv_bn_add_act`; `"auto"` and `"native"` are the same here (the
            pooling needs no built library).
        nonnegative: bool. Every input is known to be >= 0 or NaN (the
            output of a relu), so that zero padding changes no maximum: the
            backend's own pooling may then pad implicitly instead of copying
            the input padded (torch). The result is the same. Defaults to
            `False`.

    Returns:
        The pooled tensor.
    """
    data_format = check_data_format(data_format)
    if not isinstance(inputs, keras.KerasTensor):
        inputs = ops.convert_to_tensor(inputs)
    own = _graph_holds(_requested(implementation), inputs)
    pool = native_lib.own_op(keras.config.backend(), "max_pool2d") if own else None
    if pool is not None:
        return pool(
            inputs,
            pool_size=pool_size,
            strides=strides,
            padding=padding,
            channels_last=data_format == "channels_last",
            nonnegative=bool(nonnegative),
        )
    if padding:
        spatial = [(padding, padding)] * 2
        if data_format == "channels_last":
            inputs = ops.pad(inputs, [(0, 0), *spatial, (0, 0)])
        else:
            inputs = ops.pad(inputs, [(0, 0), (0, 0), *spatial])
    return ops.max_pool(inputs, pool_size, strides, padding="valid", data_format=data_format)
