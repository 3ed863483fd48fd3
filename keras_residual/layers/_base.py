"""What ``ResidualBlock`` and ``BottleneckBlock`` share.

A block is a stack of conv -> BN units on the residual branch, an activation
after every unit but the last, an optional stochastic-depth drop on the
branch, the shortcut (identity or a 1x1 conv + BN projection), the add and a
final activation.

Saved format. The attribute names below are the paths under which a
``.keras`` file stores the weights, and the layer names are those of
``keras.applications`` (``{block}_{i}_conv``), so they are part of the file
format and never change:

=====================  ============================  =======================
attribute              layer name                    what
=====================  ============================  =======================
``conv1``, ``bn1``     ``{name}_1_conv``, ``_1_bn``  first unit
``conv2``, ``bn2``     ``{name}_2_conv``, ``_2_bn``  second unit
``conv3``, ``bn3``     ``{name}_3_conv``, ``_3_bn``  third unit (bottleneck)
``shortcut_pool``      ``{name}_0_pool``             ``avg_down`` pool
``shortcut_conv``      ``{name}_0_conv``             projection conv
``shortcut_bn``        ``{name}_0_bn``               projection BN
``preact_bn``          ``{name}_preact_bn``          only if preact
``se_reduce``          ``{name}_se_reduce``          only if se_ratio > 0
``se_expand``          ``{name}_se_expand``          only if se_ratio > 0
``drop_path``          ``{name}_drop_path``          only if drop_path_rate>0
=====================  ============================  =======================

The arguments besides ``filters`` and ``strides`` are declared once, in
``keras_residual.layers._args``.
"""

from __future__ import annotations

import functools
import math
import warnings

import keras
from keras import ops

from keras_residual import _padding
from keras_residual import _validation as check
from keras_residual._layout import Layout
from keras_residual.layers import _args
from keras_residual.ops import NATIVE_ACTIVATIONS, conv_bn_add_act


def batch_normalization(synchronized=False, **kwargs):
    """A ``keras.layers.BatchNormalization``; ``synchronized`` per backend.

    ``synchronized=True`` means batch statistics over the global batch of a
    data-parallel step:

    - TensorFlow: Keras' ``BatchNormalization(synchronized=True)``, which
      all-reduces the statistics across the replicas of a ``tf.distribute``
      strategy.
    - JAX: under ``keras.distribution`` the step is one program over the
      global, sharded batch, so the statistics are global whatever this flag
      says; Keras' own flag is refused there, and is not passed.
    - torch: Keras has no synchronized BatchNormalization; every DDP process
      uses its local batch. The flag is kept in the config (so files move
      between backends) and a warning says it has no effect.
    """
    backend = keras.config.backend()
    if synchronized and backend == "torch":
        warnings.warn(
            "synchronized=True has no effect on the torch backend: under DDP each "
            "process normalizes with its own batch statistics.",
            stacklevel=3,
        )
    return keras.layers.BatchNormalization(
        synchronized=bool(synchronized) and backend == "tensorflow", **kwargs
    )


def check_combination(owner):
    """Checks the arguments of a block or model against each other."""
    _check_implementation(owner.implementation, owner.activation)
    if owner.padding == "symmetric" and any(k % 2 == 0 for k in owner.kernel_size):
        raise ValueError(
            "`padding='symmetric'` pads `kernel_size // 2` on every side and needs an "
            f"odd `kernel_size`. Received: kernel_size={owner.kernel_size}"
        )
    if owner.preact and owner.zero_init_residual:
        raise ValueError(
            "`zero_init_residual=True` zeroes the gamma of the BN after the last "
            "convolution, and with `preact=True` there is none. "
            "Received: zero_init_residual=True, preact=True"
        )


def _check_implementation(implementation, activation):
    """Validates `implementation` against the activation it must run."""
    if implementation == "native" and activation not in NATIVE_ACTIVATIONS:
        raise ValueError(
            f"`implementation='native'` needs an activation with a native kernel "
            f"({', '.join(sorted(NATIVE_ACTIVATIONS))}); use 'auto' or 'composite' for "
            f"{activation!r}. Received: implementation={implementation!r}"
        )
    return implementation


def symmetric_pad_shape(shape, conv, data_format):
    """The input shape padded as `padding="symmetric"` pads it."""
    axes = (1, 2) if data_format == "channels_last" else (2, 3)
    shape = list(shape)
    pads = _padding.symmetric(conv.kernel_size, conv.dilation_rate)
    for axis, pad in zip(axes, pads, strict=True):
        if shape[axis] is not None:
            shape[axis] += 2 * pad
    return tuple(shape)


def run_unit(
    conv,
    bn,
    x,
    *,
    residual=None,
    activation="relu",
    training=None,
    implementation="auto",
    synchronized=False,
    data_format="channels_last",
    symmetric=False,
):
    """One conv -> BN (-> add) -> activation unit through `conv_bn_add_act`.

    `conv` is a built `keras.layers.Conv2D` and `bn` a built
    `keras.layers.BatchNormalization` (or `None` in a folded model): they hold
    the variables, under the names the saved format uses, and this function
    does their work. In training the moving statistics are updated exactly
    as `BatchNormalization` does it; a BN that is not trainable (a frozen
    block) runs in inference mode, also as Keras does. `symmetric` pads
    `kernel_size // 2` on every side, in the op (the conv layer itself is a
    "valid" one that only holds the variables).
    """
    train_bn = bool(training) and bn is not None and bn.trainable
    if bn is not None:
        variables = (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
    else:
        variables = (None, None, None, None)
    result = conv_bn_add_act(
        x,
        conv.kernel,
        *variables,
        residual,
        bias=conv.bias if conv.use_bias else None,
        strides=conv.strides,
        padding="symmetric" if symmetric else conv.padding,
        dilation_rate=conv.dilation_rate,
        activation=activation,
        epsilon=bn.epsilon if bn is not None else 1e-5,
        training=train_bn,
        data_format=data_format,
        synchronized=synchronized,
        implementation=implementation,
    )
    if not train_bn:
        return result
    outputs, mean, variance = result
    momentum = bn.momentum
    moving_mean = ops.cast(bn.moving_mean, "float32")
    moving_variance = ops.cast(bn.moving_variance, "float32")
    bn.moving_mean.assign(moving_mean * momentum + ops.cast(mean, "float32") * (1.0 - momentum))
    bn.moving_variance.assign(
        moving_variance * momentum + ops.cast(variance, "float32") * (1.0 - momentum)
    )
    return outputs


class BaseResidualBlock(keras.layers.Layer):
    """Base class of the residual blocks; not meant to be used directly.

    Subclasses set ``expansion`` and ``kind`` (which arguments of
    ``keras_residual.layers._args`` they take) and implement
    ``_unit_specs()``, the list of ``(filters, kernel_size, strides, groups)``
    of the conv -> BN units on the residual branch.
    """

    expansion = 1
    kind = _args.BASIC

    def __init__(self, filters, strides=1, **kwargs):
        values = _args.resolve(kwargs, _args.for_block(self.kind))
        super().__init__(**kwargs)
        self.filters = check.positive_int(filters, "filters")
        self.strides = check.int_pair(strides, "strides")
        for name, value in values.items():
            setattr(self, name, value)
        check_combination(self)

        # On TensorFlow, channels_first is computed in NHWC between two
        # transposes; the sublayers then work channels_last.
        self._layout = Layout(self.data_format)
        self._activation_fn = keras.activations.get(self.activation)
        self._symmetric = self.padding == "symmetric"

        self.preact_bn = self._make_bn("_preact_bn") if self.preact else None
        specs = self._unit_specs()
        for index, (unit_filters, unit_kernel, unit_strides, unit_groups) in enumerate(specs, 1):
            last = index == len(specs)
            # With preact, nothing normalizes the last conv: it has a bias.
            has_bn = not (last and self.preact)
            setattr(
                self,
                f"conv{index}",
                self._make_conv(
                    unit_filters,
                    unit_kernel,
                    unit_strides,
                    f"_{index}_conv",
                    groups=unit_groups,
                    has_bn=has_bn,
                ),
            )
            setattr(
                self,
                f"bn{index}",
                self._make_bn(f"_{index}_bn", zero_gamma=last and self.zero_init_residual)
                if has_bn and not self.folded
                else None,
            )
        self._num_units = len(specs)

        self.se_reduce = self.se_expand = None
        if self.se_ratio > 0:
            self.se_reduce = self._make_conv(
                se_channels(self.output_channels, self.se_ratio), 1, 1, "_se_reduce", bias=True
            )
            self.se_expand = self._make_conv(self.output_channels, 1, 1, "_se_expand", bias=True)

        # Whether `shortcut="auto"` projects depends on the input's channel
        # count, which is known only in build(); the projection is created
        # there, with these fixed names.
        self.shortcut_pool = None
        self.shortcut_conv = None
        self.shortcut_bn = None

        self.drop_path = None
        if self.drop_path_rate > 0:
            # Stochastic depth: Keras' seeded Dropout with one draw per sample
            # drops the whole residual branch of that sample and scales the
            # kept ones by 1 / (1 - rate). It is the identity in inference.
            self.drop_path = keras.layers.Dropout(
                self.drop_path_rate,
                noise_shape=(None, 1, 1, 1),
                seed=self.seed,
                name=f"{self.name}_drop_path",
                dtype=self.dtype_policy,
            )

    # -- subclasses -----------------------------------------------------------

    def _unit_specs(self):
        raise NotImplementedError

    @property
    def output_channels(self) -> int:
        """Channels of the output: ``expansion * filters``."""
        return self.expansion * self.filters

    # -- sublayer factories ---------------------------------------------------

    def _make_conv(self, filters, kernel_size, strides, suffix, groups=1, has_bn=True, bias=None):
        if bias is None:
            # A folded block carries each BatchNormalization in its conv bias;
            # a conv that no BN follows always has a bias.
            bias = self.use_bias or self.folded or not has_bn
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="valid" if self._symmetric else "same",
            groups=groups,
            data_format=self._layout.inner,
            use_bias=bias,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name=f"{self.name}{suffix}",
            dtype=self.dtype_policy,
        )

    def _make_bn(self, suffix, zero_gamma=False):
        return batch_normalization(
            axis=self._layout.channel_axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
            gamma_initializer="zeros" if zero_gamma else "ones",
            name=f"{self.name}{suffix}",
            dtype=self.dtype_policy,
        )

    def _units(self):
        return [
            (getattr(self, f"conv{i}"), getattr(self, f"bn{i}"))
            for i in range(1, self._num_units + 1)
        ]

    # -- shapes ---------------------------------------------------------------

    def _needs_projection(self, in_channels):
        channels_change = in_channels != self.output_channels
        strided = self.strides != (1, 1)
        if self.shortcut == "identity" and (channels_change or strided):
            raise ValueError(
                f"`shortcut='identity'` needs the output to have the input's "
                f"shape, but {type(self).__name__} '{self.name}' maps "
                f"{in_channels} to {self.output_channels} channels with "
                f"strides={self.strides}. Use shortcut='auto' or 'projection'. "
                f"Received: shortcut='identity'"
            )
        if self.shortcut == "projection":
            return True
        if self.shortcut == "identity":
            return False
        # "auto" and "avg_down": a pre-activation block subsamples for a
        # stride alone, as keras.applications' ResNetV2 does.
        return channels_change or (strided and not self.preact)

    def _padded(self, conv, shape):
        if self._symmetric:
            return symmetric_pad_shape(shape, conv, self._layout.inner)
        return shape

    def build(self, input_shape):
        if self.built:
            return
        shape = self._layout.checked_shape(input_shape, type(self).__name__)
        in_channels = shape[self._layout.channel_axis]
        if self.preact_bn is not None:
            self.preact_bn.build(shape)
        branch_shape = shape
        for conv, bn in self._units():
            branch_shape = self._padded(conv, branch_shape)
            conv.build(branch_shape)
            branch_shape = conv.compute_output_shape(branch_shape)
            if bn is not None:
                bn.build(branch_shape)
        if self.se_reduce is not None:
            self.se_reduce.build(branch_shape)
            self.se_expand.build(self.se_reduce.compute_output_shape(branch_shape))
        if self._needs_projection(in_channels):
            projection_shape = shape
            strides = self.strides
            if self.shortcut == "avg_down" and self.strides != (1, 1):
                # timm's avg_down: AvgPool2d(2, stride, ceil_mode=True,
                # count_include_pad=False), which "same" pooling is.
                self.shortcut_pool = keras.layers.AveragePooling2D(
                    self.strides,
                    strides=self.strides,
                    padding="same",
                    data_format=self._layout.inner,
                    name=f"{self.name}_0_pool",
                    dtype=self.dtype_policy,
                )
                projection_shape = self.shortcut_pool.compute_output_shape(shape)
                strides = 1
            # A pre-activation block's projection is a conv with a bias and
            # no BN, as in keras.applications' ResNetV2.
            has_bn = not self.preact
            self.shortcut_conv = self._make_conv(
                self.output_channels, 1, strides, "_0_conv", has_bn=has_bn
            )
            self.shortcut_conv.build(projection_shape)
            if has_bn and not self.folded:
                self.shortcut_bn = self._make_bn("_0_bn")
                self.shortcut_bn.build(self.shortcut_conv.compute_output_shape(projection_shape))
        if self.drop_path is not None:
            self.drop_path.build(branch_shape)
        channel_axis = -1 if self.data_format == "channels_last" else 1
        self.input_spec = keras.InputSpec(ndim=4, axes={channel_axis: in_channels})

    def compute_output_shape(self, input_shape):
        shape = check.image_shape(input_shape, "input_shape", type(self).__name__)
        if self.data_format == "channels_last":
            batch, height, width, _ = shape
        else:
            batch, _, height, width = shape
        height, width = (
            None if size is None else math.ceil(size / stride)
            for size, stride in zip((height, width), self.strides, strict=True)
        )
        if self.data_format == "channels_last":
            return (batch, height, width, self.output_channels)
        return (batch, self.output_channels, height, width)

    # -- forward --------------------------------------------------------------

    def conv_bn_pairs(self):
        """The (conv, BN) pairs of the block; BN is `None` when folded or absent."""
        pairs = self._units()
        if self.shortcut_conv is not None:
            pairs.append((self.shortcut_conv, self.shortcut_bn))
        return pairs

    def _squeeze_excite(self, x):
        spatial = (1, 2) if self._layout.inner == "channels_last" else (2, 3)
        scale = ops.mean(x, axis=spatial, keepdims=True)
        scale = ops.relu(self.se_reduce(scale))
        return x * ops.sigmoid(self.se_expand(scale))

    def call(self, inputs, training=None):
        x = self._layout.to_inner(ops.cast(inputs, self.compute_dtype))
        inner = self._layout.inner
        unit = functools.partial(
            run_unit,
            training=training,
            implementation=self.implementation,
            synchronized=self.synchronized,
            data_format=inner,
            symmetric=self._symmetric,
        )
        branch = x
        if self.preact_bn is not None:
            branch = self._activation_fn(self.preact_bn(x, training=training))

        shortcut = x
        if self.shortcut_conv is not None:
            source = branch if self.preact else x
            if self.shortcut_pool is not None:
                source = self.shortcut_pool(source)
            shortcut = unit(self.shortcut_conv, self.shortcut_bn, source, activation="linear")
        elif self.strides != (1, 1):
            # Pre-activation with a stride alone: keras.applications' ResNetV2
            # subsamples with a 1x1 max pool.
            shortcut = ops.max_pool(x, 1, strides=self.strides, data_format=inner)

        units = self._units()
        for conv, bn in units[:-1]:
            branch = unit(conv, bn, branch, activation=self.activation)
        conv, bn = units[-1]
        # After the add: the activation, but nothing with pre-activation.
        final = "linear" if self.preact else self.activation
        drop = self.drop_path is not None and training
        if drop or self.se_reduce is not None:
            # Squeeze-excitation and stochastic depth act between the last BN
            # and the add: the last unit is conv -> BN, fused, and the add
            # and the activation follow as keras.ops.
            branch = unit(conv, bn, branch, activation="linear")
            if self.se_reduce is not None:
                branch = self._squeeze_excite(branch)
            if drop:
                branch = self.drop_path(branch, training=training)
            outputs = ops.add(branch, shortcut)
            if not self.preact:
                outputs = self._activation_fn(outputs)
        else:
            # Both branches are in the compute dtype, so under mixed precision
            # the add runs in float16/bfloat16 like the rest of the block.
            outputs = unit(conv, bn, branch, residual=shortcut, activation=final)
        return self._layout.to_outer(outputs)

    # -- config ---------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update({"filters": self.filters, "strides": self.strides})
        config.update(_args.serialize(self, _args.for_block(self.kind)))
        return config


def se_channels(channels, ratio, divisor=8):
    """Channels of the squeeze: `channels * ratio` to a multiple of 8, as timm."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)
