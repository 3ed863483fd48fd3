"""The ResNet family as subclassed ``keras.Model`` classes.

With its defaults, ``ResNet50`` is the network of
``keras.applications.ResNet50``: the same layers, the same layer names, the
same parameters (25,636,712 with the top, 23,587,712 with
``include_top=False, pooling="avg"``) and the same outputs for the same
weights. That means v1 with conv biases, BatchNormalization epsilon 1.001e-5
and momentum 0.99, and the stride of each stage's first block on its first
1x1 convolution.

ResNet v1.5 (torchvision, timm) is the same family with the stride on the 3x3
convolution, no conv biases and epsilon 1e-5::

    ResNet50(stride_on="3x3", use_bias=False, epsilon=1e-5)

Saved format: the stem is ``conv1_conv``/``conv1_bn``, the blocks are the
list attribute ``blocks`` with the layer names ``conv{stage}_block{index}``
(stage 2 to 5), and the head is ``predictions`` (or ``avg_pool``/``max_pool``).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_residual import _validation as check
from keras_residual._layout import Layout
from keras_residual.layers import BottleneckBlock, ResidualBlock
from keras_residual.layers._base import batch_normalization, check_implementation, run_unit
from keras_residual.models import weights as weights_lib

BLOCK_TYPES = {"basic": ResidualBlock, "bottleneck": BottleneckBlock}
POOLINGS = (None, "avg", "max")


@keras.saving.register_keras_serializable(package="keras_residual")
class ResNet(keras.Model):
    """A ResNet: a 7x7 stem, four stages of residual blocks, and a head.

    Args:
        block_type: `"bottleneck"` (`BottleneckBlock`) or `"basic"`
            (`ResidualBlock`). Defaults to `"bottleneck"`.
        stage_depths: tuple of ints. Number of blocks in each stage.
            Defaults to `(3, 4, 6, 3)`, ResNet50's.
        stage_filters: tuple of ints, one per stage. `filters` of the blocks
            of each stage. Defaults to `(64, 128, 256, 512)`.
        include_top: bool. Whether to end in global average pooling and a
            `classes`-way dense classifier. Defaults to `True`.
        weights: `None`, `"imagenet"` or the path to a weights file: the
            legacy HDF5 layout that `keras.applications` downloads, keyed by
            layer names such as `conv2_block1_1_conv`, or a Keras 3
            `.weights.h5` file of this model. Defaults to `None`.
        input_shape: tuple of 3 ints (or `None` for the spatial sizes), or
            `None` for an input of any size with 3 channels. The model is
            built at construction for this shape. Defaults to `None`.
        classes: int. Number of classes when `include_top=True`.
            Defaults to `1000`.
        pooling: `None`, `"avg"` or `"max"`. The pooling of the features
            when `include_top=False`; `None` returns the 4D feature map.
            Defaults to `None`.
        classifier_activation: str or `None`. Activation of the classifier.
            Defaults to `"softmax"`.
        activation: str. Activation of the stem and of every block.
            Defaults to `"relu"`.
        stride_on: `"1x1"` or `"3x3"`. Bottleneck blocks only: which
            convolution carries a stage's stride. Defaults to `"1x1"`, as
            `keras.applications`; `"3x3"` is v1.5.
        use_bias: bool. Whether the convolutions have biases.
            Defaults to `True`, as `keras.applications`.
        momentum: float. BatchNormalization momentum.
            Defaults to `0.99`, as `keras.applications`.
        epsilon: float. BatchNormalization epsilon.
            Defaults to `1.001e-5`, as `keras.applications`.
        kernel_initializer: initializer of the convolution and dense kernels.
            Defaults to `"glorot_uniform"`, as `keras.applications`.
        kernel_regularizer: regularizer of the convolution and dense kernels,
            or `None`. Defaults to `None`.
        zero_init_residual: bool. Start every block's last BN gamma at zero.
            Defaults to `False`.
        drop_path_rate: float in [0, 1). Stochastic depth rate of the last
            block; it grows linearly from 0 over the blocks.
            Defaults to `0.0`.
        seed: int or `None`. Seed of the stochastic depth draws.
            Defaults to `None`.
        data_format: `"channels_last"`, `"channels_first"` or `None` for
            `keras.config.image_data_format()`. Defaults to `None`.
        synchronized: bool. Synchronized BatchNormalization statistics in
            data-parallel training, as for `ResidualBlock`.
            Defaults to `False`.
        implementation: `"auto"`, `"native"` or `"composite"`: how the stem
            and every block run their conv -> BN (-> add) -> activation units,
            as for `ResidualBlock`. Defaults to `"auto"`.
        folded: bool. An inference model with every BatchNormalization
            folded into its conv, as `keras_residual.fold_batchnorm` makes.
            Defaults to `False`.
        name: str. Name of the model. Defaults to `"resnet"`.
        **kwargs: base model arguments, such as `dtype` and `trainable`.

    Raises:
        ValueError: for an argument out of range, a weights file that does
            not match the model, or an input that is not 4D.
        OSError: when `weights="imagenet"` cannot be downloaded.
    """

    def __init__(
        self,
        block_type="bottleneck",
        stage_depths=(3, 4, 6, 3),
        stage_filters=(64, 128, 256, 512),
        include_top=True,
        weights=None,
        input_shape=None,
        classes=1000,
        pooling=None,
        classifier_activation="softmax",
        activation="relu",
        stride_on="1x1",
        use_bias=True,
        momentum=0.99,
        epsilon=1.001e-5,
        kernel_initializer="glorot_uniform",
        kernel_regularizer=None,
        zero_init_residual=False,
        drop_path_rate=0.0,
        seed=None,
        data_format=None,
        synchronized=False,
        implementation="auto",
        folded=False,
        name="resnet",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.block_type = check.one_of(block_type, "block_type", tuple(BLOCK_TYPES))
        self.stage_depths = _int_tuple(stage_depths, "stage_depths")
        self.stage_filters = _int_tuple(stage_filters, "stage_filters")
        if len(self.stage_filters) != len(self.stage_depths):
            raise ValueError(
                "`stage_filters` must have one entry per stage of `stage_depths` "
                f"({len(self.stage_depths)}). Received: stage_filters={stage_filters!r}"
            )
        self.include_top = bool(include_top)
        self.classes = check.positive_int(classes, "classes")
        self.pooling = check.one_of(pooling, "pooling", POOLINGS)
        if classifier_activation is not None:
            check.activation(classifier_activation, "classifier_activation")
        self.classifier_activation = classifier_activation
        self.activation = check.activation(activation)
        self.stride_on = check.one_of(stride_on, "stride_on", ("1x1", "3x3"))
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
        self.image_shape = _image_shape(input_shape, self.data_format)
        weights_lib.check_weights_argument(weights, self)

        self._layout = Layout(self.data_format)
        inner = self._layout.inner
        self._activation_fn = keras.activations.get(self.activation)
        dtype = self.dtype_policy

        # Stem, as keras.applications names it.
        self.conv1_pad = keras.layers.ZeroPadding2D(
            3, data_format=inner, name="conv1_pad", dtype=dtype
        )
        self.conv1_conv = keras.layers.Conv2D(
            64,
            7,
            strides=2,
            use_bias=self.use_bias or self.folded,
            data_format=inner,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name="conv1_conv",
            dtype=dtype,
        )
        self.conv1_bn = None
        if not self.folded:
            self.conv1_bn = batch_normalization(
                axis=self._layout.channel_axis,
                momentum=self.momentum,
                epsilon=self.epsilon,
                synchronized=self.synchronized,
                name="conv1_bn",
                dtype=dtype,
            )
        self.pool1_pad = keras.layers.ZeroPadding2D(
            1, data_format=inner, name="pool1_pad", dtype=dtype
        )
        self.pool1_pool = keras.layers.MaxPooling2D(
            3, strides=2, data_format=inner, name="pool1_pool", dtype=dtype
        )

        block_cls = BLOCK_TYPES[self.block_type]
        block_kwargs = {
            "activation": self.activation,
            "use_bias": self.use_bias,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "kernel_initializer": self.kernel_initializer,
            "kernel_regularizer": self.kernel_regularizer,
            "zero_init_residual": self.zero_init_residual,
            "data_format": inner,
            "synchronized": self.synchronized,
            "implementation": self.implementation,
            "folded": self.folded,
            "dtype": dtype,
        }
        if block_cls is BottleneckBlock:
            block_kwargs["stride_on"] = self.stride_on
        total = sum(self.stage_depths)
        self.blocks = []
        for stage, (depth, filters) in enumerate(
            zip(self.stage_depths, self.stage_filters, strict=True)
        ):
            for index in range(depth):
                position = len(self.blocks)
                self.blocks.append(
                    block_cls(
                        filters,
                        strides=2 if stage > 0 and index == 0 else 1,
                        drop_path_rate=self.drop_path_rate * position / max(total - 1, 1),
                        seed=None if self.seed is None else self.seed + position,
                        name=f"conv{stage + 2}_block{index + 1}",
                        **block_kwargs,
                    )
                )

        self.avg_pool = self.max_pool = self.predictions = None
        if self.include_top or self.pooling == "avg":
            self.avg_pool = keras.layers.GlobalAveragePooling2D(
                data_format=inner, name="avg_pool", dtype=dtype
            )
        elif self.pooling == "max":
            self.max_pool = keras.layers.GlobalMaxPooling2D(
                data_format=inner, name="max_pool", dtype=dtype
            )
        if self.include_top:
            self.predictions = keras.layers.Dense(
                self.classes,
                activation=self.classifier_activation,
                kernel_initializer=self.kernel_initializer,
                kernel_regularizer=self.kernel_regularizer,
                name="predictions",
                dtype=dtype,
            )

        self.build((None, *self.image_shape))
        # One symbolic call (shape inference only, no compute) marks the model
        # as called, so `model.export()` and `summary()` work right away.
        self(keras.KerasTensor((None, *self.image_shape), dtype=self.input_dtype))
        if weights is not None:
            weights_lib.load_weights(self, weights)

    # -- structure ------------------------------------------------------------

    def _stem(self):
        layers = [self.conv1_pad, self.conv1_conv, self.conv1_bn, self.pool1_pad, self.pool1_pool]
        return [layer for layer in layers if layer is not None]

    def conv_bn_pairs(self):
        """The stem's (conv, BN) pair; BN is `None` when folded."""
        return [(self.conv1_conv, self.conv1_bn)]

    def _head(self):
        return [layer for layer in (self.avg_pool, self.max_pool, self.predictions) if layer]

    def build(self, input_shape):
        if self.built:
            return
        shape = self._layout.checked_shape(input_shape, type(self).__name__)
        for layer in [*self._stem(), *self.blocks, *self._head()]:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def compute_output_shape(self, input_shape):
        shape = self._layout.checked_shape(input_shape, type(self).__name__)
        for layer in [*self._stem(), *self.blocks, *self._head()]:
            shape = layer.compute_output_shape(shape)
        return self._layout.outer_shape(shape) if len(shape) == 4 else shape

    def call(self, inputs, training=None):
        x = self._layout.to_inner(ops.cast(inputs, self.compute_dtype))
        x = run_unit(
            self.conv1_conv,
            self.conv1_bn,
            self.conv1_pad(x),
            activation=self.activation,
            training=training,
            implementation=self.implementation,
            synchronized=self.synchronized,
            data_format=self._layout.inner,
        )
        x = self.pool1_pool(self.pool1_pad(x))
        for block in self.blocks:
            x = block(x, training=training)
        head = self._head()
        for layer in head:
            x = layer(x)
        return x if head else self._layout.to_outer(x)

    def get_layer(self, name=None, index=None):
        """A layer by index, or by name at any depth.

        Names are those of `keras.applications`, so
        `model.get_layer("conv2_block1_1_conv")` finds the convolution inside
        the block `conv2_block1`, as it does in `keras.applications.ResNet50`.
        """
        if name is not None and index is None:
            for layer in self._flatten_layers(include_self=False):
                if layer.name == name:
                    return layer
        return super().get_layer(name=name, index=index)

    # -- config ---------------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": keras.dtype_policies.serialize(self.dtype_policy),
            "block_type": self.block_type,
            "stage_depths": self.stage_depths,
            "stage_filters": self.stage_filters,
            "include_top": self.include_top,
            "weights": None,
            "input_shape": self.image_shape,
            "classes": self.classes,
            "pooling": self.pooling,
            "classifier_activation": self.classifier_activation,
            "activation": self.activation,
            "stride_on": self.stride_on,
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

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _Preset(ResNet):
    """A ResNet of fixed depth; its config leaves the architecture out."""

    block_type_preset = "bottleneck"
    stage_depths_preset = (3, 4, 6, 3)
    default_name = "resnet"

    def __init__(self, *, name=None, **kwargs):
        for key in ("block_type", "stage_depths"):
            if key in kwargs:
                raise ValueError(
                    f"{type(self).__name__} has a fixed architecture; use ResNet to "
                    f"choose it. Received: {key}={kwargs[key]!r}"
                )
        super().__init__(
            block_type=self.block_type_preset,
            stage_depths=self.stage_depths_preset,
            name=name or self.default_name,
            **kwargs,
        )

    def get_config(self):
        config = super().get_config()
        del config["block_type"], config["stage_depths"]
        return config


@keras.saving.register_keras_serializable(package="keras_residual")
class ResNet18(_Preset):
    """ResNet18: basic blocks, stages of (2, 2, 2, 2). Arguments as `ResNet`."""

    block_type_preset = "basic"
    stage_depths_preset = (2, 2, 2, 2)
    default_name = "resnet18"


@keras.saving.register_keras_serializable(package="keras_residual")
class ResNet34(_Preset):
    """ResNet34: basic blocks, stages of (3, 4, 6, 3). Arguments as `ResNet`."""

    block_type_preset = "basic"
    stage_depths_preset = (3, 4, 6, 3)
    default_name = "resnet34"


@keras.saving.register_keras_serializable(package="keras_residual")
class ResNet50(_Preset):
    """ResNet50: bottleneck blocks, stages of (3, 4, 6, 3).

    With the defaults it is exactly `keras.applications.ResNet50`.
    Arguments as `ResNet`.

    Examples:

    >>> model = ResNet50(weights=None)
    >>> model.count_params()
    25636712
    """

    block_type_preset = "bottleneck"
    stage_depths_preset = (3, 4, 6, 3)
    default_name = "resnet50"


@keras.saving.register_keras_serializable(package="keras_residual")
class ResNet101(_Preset):
    """ResNet101: bottleneck blocks, stages of (3, 4, 23, 3). Arguments as `ResNet`."""

    block_type_preset = "bottleneck"
    stage_depths_preset = (3, 4, 23, 3)
    default_name = "resnet101"


@keras.saving.register_keras_serializable(package="keras_residual")
class ResNet152(_Preset):
    """ResNet152: bottleneck blocks, stages of (3, 8, 36, 3). Arguments as `ResNet`."""

    block_type_preset = "bottleneck"
    stage_depths_preset = (3, 8, 36, 3)
    default_name = "resnet152"


PRESETS = (ResNet18, ResNet34, ResNet50, ResNet101, ResNet152)


def _int_tuple(value, name):
    try:
        items = tuple(check.positive_int(item, name) for item in value)
    except (TypeError, ValueError):
        items = ()
    if items:
        return items
    raise ValueError(
        f"`{name}` must be a non-empty tuple of positive integers. Received: {name}={value!r}"
    )


def _image_shape(input_shape, data_format):
    """The per-sample input shape, 3 channels and any size by default."""
    if input_shape is None:
        return (None, None, 3) if data_format == "channels_last" else (3, None, None)
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(
            "`input_shape` must be a tuple of 3 values, (height, width, channels) or "
            f"(channels, height, width). Received: input_shape={input_shape!r}"
        )
    channel = shape[-1] if data_format == "channels_last" else shape[0]
    if channel is None:
        raise ValueError(
            f"The channel dimension of `input_shape` must be defined for "
            f"data_format={data_format!r}. Received: input_shape={input_shape!r}"
        )
    for size in shape:
        if size is not None:
            check.positive_int(size, "input_shape")
    return tuple(None if size is None else int(size) for size in shape)
