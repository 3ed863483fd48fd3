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
``shortcut_conv``      ``{name}_0_conv``             projection conv
``shortcut_bn``        ``{name}_0_bn``               projection BN
``drop_path``          ``{name}_drop_path``          only if drop_path_rate>0
=====================  ============================  =======================
"""

from __future__ import annotations

import functools
import math
import warnings

import keras
from keras import ops

from keras_residual import _validation as check
from keras_residual import config as config_lib
from keras_residual._layout import Layout
from keras_residual.ops import NATIVE_ACTIVATIONS, conv_bn_add_act

SHORTCUTS = ("auto", "projection", "identity")


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


def check_implementation(implementation, activation):
    """Validates `implementation` against the activation it must run."""
    config_lib._check(implementation)
    if implementation == "native" and activation not in NATIVE_ACTIVATIONS:
        raise ValueError(
            f"`implementation='native'` needs an activation with a native kernel "
            f"({', '.join(sorted(NATIVE_ACTIVATIONS))}); use 'auto' or 'composite' for "
            f"{activation!r}. Received: implementation={implementation!r}"
        )
    return implementation


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
):
    """One conv -> BN (-> add) -> activation unit through `conv_bn_add_act`.

    `conv` is a built `keras.layers.Conv2D` and `bn` a built
    `keras.layers.BatchNormalization` (or `None` in a folded model): they hold
    the variables, under the names the saved format uses, and this function
    does their work. In training the moving statistics are updated exactly
    as `BatchNormalization` does it; a BN that is not trainable (a frozen
    block) runs in inference mode, also as Keras does.
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
        padding=conv.padding,
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

    Subclasses set ``expansion`` and implement ``_unit_specs()``, the list of
    ``(filters, kernel_size, strides)`` of the conv -> BN units on the
    residual branch.
    """

    expansion = 1

    def __init__(
        self,
        filters,
        kernel_size=3,
        strides=1,
        activation="relu",
        shortcut="auto",
        use_bias=False,
        momentum=0.9,
        epsilon=1e-5,
        kernel_initializer="he_normal",
        kernel_regularizer=None,
        zero_init_residual=False,
        drop_path_rate=0.0,
        seed=None,
        data_format=None,
        synchronized=False,
        implementation="auto",
        folded=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = check.positive_int(filters, "filters")
        self.kernel_size = check.int_pair(kernel_size, "kernel_size")
        self.strides = check.int_pair(strides, "strides")
        self.activation = check.activation(activation)
        self.shortcut = check.one_of(shortcut, "shortcut", SHORTCUTS)
        self.use_bias = bool(use_bias)
        self.momentum = check.fraction(momentum, "momentum")
        self.epsilon = check.positive_float(epsilon, "epsilon")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.zero_init_residual = bool(zero_init_residual)
        self.drop_path_rate = check.fraction(drop_path_rate, "drop_path_rate")
        self.seed = check.optional_int(seed, "seed")
        self.data_format = check.data_format(data_format)
        self.synchronized = bool(synchronized)
        self.implementation = check_implementation(implementation, self.activation)
        self.folded = bool(folded)

        # On TensorFlow, channels_first is computed in NHWC between two
        # transposes; the sublayers then work channels_last.
        self._layout = Layout(self.data_format)
        self._activation_fn = keras.activations.get(self.activation)

        specs = self._unit_specs()
        for index, (unit_filters, unit_kernel, unit_strides) in enumerate(specs, 1):
            last = index == len(specs)
            setattr(
                self,
                f"conv{index}",
                self._make_conv(unit_filters, unit_kernel, unit_strides, f"_{index}_conv"),
            )
            setattr(
                self,
                f"bn{index}",
                None
                if self.folded
                else self._make_bn(f"_{index}_bn", zero_gamma=last and self.zero_init_residual),
            )
        self._num_units = len(specs)

        # Whether `shortcut="auto"` projects depends on the input's channel
        # count, which is known only in build(); the projection is created
        # there, with these fixed names.
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

    def _make_conv(self, filters, kernel_size, strides, suffix):
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding="same",
            data_format=self._layout.inner,
            # A folded block carries each BatchNormalization in its conv bias.
            use_bias=self.use_bias or self.folded,
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
        mismatch = self.strides != (1, 1) or in_channels != self.output_channels
        if self.shortcut == "identity" and mismatch:
            raise ValueError(
                f"`shortcut='identity'` needs the output to have the input's "
                f"shape, but {type(self).__name__} '{self.name}' maps "
                f"{in_channels} to {self.output_channels} channels with "
                f"strides={self.strides}. Use shortcut='auto' or 'projection'. "
                f"Received: shortcut='identity'"
            )
        return self.shortcut == "projection" or (self.shortcut == "auto" and mismatch)

    def build(self, input_shape):
        if self.built:
            return
        shape = self._layout.checked_shape(input_shape, type(self).__name__)
        in_channels = shape[self._layout.channel_axis]
        branch_shape = shape
        for conv, bn in self._units():
            conv.build(branch_shape)
            branch_shape = conv.compute_output_shape(branch_shape)
            if bn is not None:
                bn.build(branch_shape)
        if self._needs_projection(in_channels):
            self.shortcut_conv = self._make_conv(self.output_channels, 1, self.strides, "_0_conv")
            self.shortcut_conv.build(shape)
            if not self.folded:
                self.shortcut_bn = self._make_bn("_0_bn")
                self.shortcut_bn.build(self.shortcut_conv.compute_output_shape(shape))
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
        """The (conv, BN) pairs of the block; BN is `None` when folded."""
        pairs = self._units()
        if self.shortcut_conv is not None:
            pairs.append((self.shortcut_conv, self.shortcut_bn))
        return pairs

    def call(self, inputs, training=None):
        x = self._layout.to_inner(ops.cast(inputs, self.compute_dtype))
        unit = functools.partial(
            run_unit,
            training=training,
            implementation=self.implementation,
            synchronized=self.synchronized,
            data_format=self._layout.inner,
        )
        shortcut = x
        if self.shortcut_conv is not None:
            shortcut = unit(self.shortcut_conv, self.shortcut_bn, x, activation="linear")
        units = self._units()
        for conv, bn in units[:-1]:
            x = unit(conv, bn, x, activation=self.activation)
        conv, bn = units[-1]
        if self.drop_path is not None and training:
            # Stochastic depth drops the branch before the add, so the add
            # and the activation cannot join the last unit.
            x = self.drop_path(unit(conv, bn, x, activation="linear"), training=training)
            outputs = self._activation_fn(ops.add(x, shortcut))
        else:
            # Both branches are in the compute dtype, so under mixed precision
            # the add runs in float16/bfloat16 like the rest of the block.
            outputs = unit(conv, bn, x, residual=shortcut, activation=self.activation)
        return self._layout.to_outer(outputs)

    # -- config ---------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "activation": self.activation,
                "shortcut": self.shortcut,
                "use_bias": self.use_bias,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer)
                if self.kernel_regularizer is not None
                else None,
                "zero_init_residual": self.zero_init_residual,
                "drop_path_rate": self.drop_path_rate,
                "seed": self.seed,
                "data_format": self.data_format,
                "synchronized": self.synchronized,
                "implementation": self.implementation,
                "folded": self.folded,
            }
        )
        return config
