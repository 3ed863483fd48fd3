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

Saved format: the stem is ``conv1_conv``/``conv1_bn`` (the deep stem:
``conv1_1_conv``/``conv1_1_bn`` to ``conv1_3_conv``/``conv1_3_bn``), the
blocks are the list attribute ``blocks`` with the layer names
``conv{stage}_block{index}`` (stage 2 to 5), a pre-activation model ends them
with ``post_bn``, and the head is ``predictions`` (or ``avg_pool``/``max_pool``).

Every block argument (``keras_residual.layers._args``) is also a ``ResNet``
argument, passed on to every block; the presets below set the layouts of
torchvision, timm and ``keras.applications``.
"""

from __future__ import annotations

import weakref

import keras
from keras import ops

from keras_residual import _validation as check
from keras_residual import native
from keras_residual._layout import Layout
from keras_residual.layers import BottleneckBlock, ResidualBlock, _args
from keras_residual.layers._base import (
    batch_normalization,
    check_combination,
    run_unit,
    symmetric_pad_shape,
)
from keras_residual.models import weights as weights_lib
from keras_residual.ops import max_pool

BLOCK_TYPES = {_args.BASIC: ResidualBlock, _args.BOTTLENECK: BottleneckBlock}
POOLINGS = (None, "avg", "max")
STEMS = ("standard", "deep")
# Passed to each block by the model itself, block by block.
_PER_BLOCK = ("drop_path_rate", "seed", "data_format")

_DOC = """A ResNet: a stem, stages of residual blocks, and a head.

    The stem is a 7x7/2 conv -> BN -> activation (`stem="deep"`: three 3x3
    ones) and a 3x3/2 max pool. Each stage but the first halves the size in
    its first block (with `preact=True`, as `keras.applications`' ResNetV2:
    every stage but the last halves it in its last block, and a BN and
    activation, `post_bn`, follow the last block).

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
        stem: `"standard"` (7x7/2 conv) or `"deep"` (three 3x3 convs of
            `stem_width // 2`, `stem_width // 2` and `stem_width` channels,
            the first with stride 2, as ResNet-C/D and timm's `deep` stem).
            Defaults to `"standard"`.
        stem_width: int. Channels of the stem's output. Defaults to `64`.
    ARGUMENTS
        name: str. Name of the model. Defaults to `"resnet"`.
        **kwargs: base model arguments, such as `dtype` and `trainable`.

    Call arguments:
        inputs: 4D images.
        training: bool or `None`, as for any Keras model.
        pyramid_levels: `None` for the usual output, or level names among
            `"P2"` (stride 4, the first stage's output) to `"P5"` (stride 32):
            then the call returns a dict of those stage outputs, keras-hub's
            `pyramid_outputs` naming, to feed an FPN. See
            `keras_residual.feature_extractor`.

    Raises:
        ValueError: for an argument out of range, a weights file that does
            not match the model, or an input that is not 4D.
        OSError: when `weights="imagenet"` cannot be downloaded.
    """


# The optimizer (a weak reference) and its number of variables that each
# model's kernels were last laid out for (`ResNet._lay_out_kernels`): a new
# optimizer, or one that has made its slots since, gets them laid out.
_LAID_OUT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@keras.saving.register_keras_serializable(package="keras_residual")
class ResNet(keras.Model):
    __doc__ = _DOC.replace("    ARGUMENTS\n", _args.docstring(_args.ARGUMENTS, model=True) + "\n")

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
        stem="standard",
        stem_width=64,
        name="resnet",
        **kwargs,
    ):
        values = _args.resolve(kwargs, _args.ARGUMENTS, model=True)
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
        self.stem = check.one_of(stem, "stem", STEMS)
        self.stem_width = check.positive_int(stem_width, "stem_width")
        if self.stem == "deep" and self.stem_width < 2:
            raise ValueError(
                "`stem='deep'` needs `stem_width` of at least 2 (its first convs have "
                f"`stem_width // 2` channels). Received: stem_width={stem_width!r}"
            )
        for key, value in values.items():
            setattr(self, key, value)
        check_combination(self)
        self.image_shape = _image_shape(input_shape, self.data_format)
        weights_lib.check_weights_argument(weights, self)

        self._layout = Layout(self.data_format)
        inner = self._layout.inner
        self._activation_fn = keras.activations.get(self.activation)
        dtype = self.dtype_policy

        self.conv1_pad = None
        self._stem_units = []
        if self.stem == "standard":
            self.conv1_pad = keras.layers.ZeroPadding2D(
                3, data_format=inner, name="conv1_pad", dtype=dtype
            )
            self.conv1_conv, self.conv1_bn = self._stem_unit(self.stem_width, 7, 2, "conv1", True)
            self._stem_units.append((self.conv1_conv, self.conv1_bn))
        else:
            half = self.stem_width // 2
            for index, (width, strides) in enumerate(
                ((half, 2), (half, 1), (self.stem_width, 1)), 1
            ):
                conv, bn = self._stem_unit(width, 3, strides, f"conv1_{index}", index == 3)
                setattr(self, f"conv1_{index}_conv", conv)
                setattr(self, f"conv1_{index}_bn", bn)
                self._stem_units.append((conv, bn))
        self.pool1_pad = keras.layers.ZeroPadding2D(
            1, data_format=inner, name="pool1_pad", dtype=dtype
        )
        self.pool1_pool = keras.layers.MaxPooling2D(
            3, strides=2, data_format=inner, name="pool1_pool", dtype=dtype
        )

        block_cls = BLOCK_TYPES[self.block_type]
        block_kwargs = {
            key: value
            for key, value in values.items()
            if key in {a.name for a in _args.for_block(self.block_type)} and key not in _PER_BLOCK
        }
        total = sum(self.stage_depths)
        last_stage = len(self.stage_depths) - 1
        self.blocks = []
        for stage, (depth, filters) in enumerate(
            zip(self.stage_depths, self.stage_filters, strict=True)
        ):
            for index in range(depth):
                position = len(self.blocks)
                if self.preact:
                    # keras.applications' ResNetV2: the last block of every
                    # stage but the last carries the stride.
                    strided = stage < last_stage and index == depth - 1
                else:
                    strided = stage > 0 and index == 0
                self.blocks.append(
                    block_cls(
                        filters,
                        strides=2 if strided else 1,
                        drop_path_rate=self.drop_path_rate * position / max(total - 1, 1),
                        seed=None if self.seed is None else self.seed + position,
                        data_format=inner,
                        name=f"conv{stage + 2}_block{index + 1}",
                        dtype=dtype,
                        **block_kwargs,
                    )
                )
        self._stage_ends = [sum(self.stage_depths[: i + 1]) - 1 for i in range(last_stage + 1)]

        self.post_bn = None
        if self.preact:
            self.post_bn = self._bn("post_bn")

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

    def _bn(self, name):
        return batch_normalization(
            axis=self._layout.channel_axis,
            momentum=self.momentum,
            epsilon=self.epsilon,
            synchronized=self.synchronized,
            name=name,
            dtype=self.dtype_policy,
        )

    def _stem_unit(self, filters, kernel_size, strides, prefix, last):
        # With preact, the stem's last conv has no BN or activation (the
        # first block normalizes), and so has a bias, as keras.applications.
        has_bn = not (last and self.preact)
        conv = keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            use_bias=self.use_bias or self.folded or not has_bn,
            data_format=self._layout.inner,
            kernel_initializer=self.kernel_initializer,
            kernel_regularizer=self.kernel_regularizer,
            name=f"{prefix}_conv",
            dtype=self.dtype_policy,
        )
        return conv, self._bn(f"{prefix}_bn") if has_bn and not self.folded else None

    def conv_bn_pairs(self):
        """The stem's (conv, BN) pairs; BN is `None` when folded or absent."""
        return list(self._stem_units)

    def _head(self):
        return [layer for layer in (self.avg_pool, self.max_pool, self.predictions) if layer]

    def build(self, input_shape):
        if self.built:
            return
        shape = self._layout.checked_shape(input_shape, type(self).__name__)
        for layer in self._shape_chain():
            if isinstance(layer, tuple):
                conv, bn = layer
                shape = self._stem_padded(conv, shape)
                conv.build(shape)
                shape = conv.compute_output_shape(shape)
                if bn is not None:
                    bn.build(shape)
                continue
            layer.build(shape)
            shape = layer.compute_output_shape(shape)

    def _shape_chain(self):
        pad = [self.conv1_pad] if self.conv1_pad is not None else []
        post = [self.post_bn] if self.post_bn is not None else []
        return [
            *pad,
            *self._stem_units,
            self.pool1_pad,
            self.pool1_pool,
            *self.blocks,
            *post,
            *self._head(),
        ]

    def _stem_padded(self, conv, shape):
        if self.stem == "deep":
            return symmetric_pad_shape(shape, conv, self._layout.inner)
        return shape

    def compute_output_shape(self, input_shape):
        shape = self._layout.checked_shape(input_shape, type(self).__name__)
        for layer in self._shape_chain():
            if isinstance(layer, tuple):
                shape = layer[0].compute_output_shape(self._stem_padded(layer[0], shape))
            else:
                shape = layer.compute_output_shape(shape)
        return self._layout.outer_shape(shape) if len(shape) == 4 else shape

    def compute_output_spec(self, inputs, training=None, pyramid_levels=None):
        if pyramid_levels is None:
            return super().compute_output_spec(inputs, training=training)
        levels = self._check_levels(pyramid_levels)
        shape = self._layout.checked_shape(inputs.shape, type(self).__name__)
        shapes = {}
        for layer in self._shape_chain():
            if isinstance(layer, tuple):
                shape = layer[0].compute_output_shape(self._stem_padded(layer[0], shape))
                continue
            shape = layer.compute_output_shape(shape)
            if layer in self.blocks and self.blocks.index(layer) in self._stage_ends:
                shapes[f"P{self._stage_ends.index(self.blocks.index(layer)) + 2}"] = shape
        return {
            level: keras.KerasTensor(self._layout.outer_shape(shapes[level]), self.compute_dtype)
            for level in levels
        }

    def pyramid_level_names(self):
        """The level names of the stage outputs: `"P2"` (stride 4) upwards."""
        return tuple(f"P{stage + 2}" for stage in range(len(self.stage_depths)))

    def _check_levels(self, levels):
        names = self.pyramid_level_names()
        if isinstance(levels, str) or not all(level in names for level in levels) or not levels:
            raise ValueError(
                f"`pyramid_levels` must be a non-empty list of level names among {names}. "
                f"Received: pyramid_levels={levels!r}"
            )
        if self.preact:
            raise ValueError(
                "`pyramid_levels` needs the stride to change at the start of a stage; a "
                "pre-activation (ResNetV2) model changes it in the last block of a stage. "
                f"Received: pyramid_levels={levels!r} for a model with preact=True"
            )
        return tuple(levels)

    def call(self, inputs, training=None, pyramid_levels=None):
        levels = None if pyramid_levels is None else self._check_levels(pyramid_levels)
        x = self._layout.to_inner(ops.cast(inputs, self.compute_dtype))
        # The layers conv1_pad, pool1_pad and pool1_pool name the stem's steps
        # as keras.applications does and give its shapes; the ops below do
        # their work, without layout copies where the native path runs:
        # conv1_pad + a "valid" 7x7 conv is the 7x7 conv with symmetric
        # padding 3, and the pool is zero padding 1 + a 3x3/2 max pool.
        for index, (conv, bn) in enumerate(self._stem_units):
            last = index == len(self._stem_units) - 1
            x = run_unit(
                conv,
                bn,
                x,
                activation="linear" if last and self.preact else self.activation,
                training=training,
                implementation=self.implementation,
                synchronized=self.synchronized,
                data_format=self._layout.inner,
                symmetric=True,
            )
        x = max_pool(
            x,
            self.pool1_pool.pool_size,
            self.pool1_pool.strides,
            padding=self.pool1_pad.padding[0][0],
            data_format=self._layout.inner,
            implementation=self.implementation,
            nonnegative=not self.preact and self.activation in ("relu", "relu6"),
        )
        features = {}
        for position, block in enumerate(self.blocks):
            x = block(x, training=training)
            if levels is not None and position in self._stage_ends:
                level = f"P{self._stage_ends.index(position) + 2}"
                if level in levels:
                    features[level] = self._layout.to_outer(x)
        if levels is not None:
            return {level: features[level] for level in levels}
        if self.post_bn is not None:
            x = self._activation_fn(self.post_bn(x, training=training))
        head = self._head()
        for layer in head:
            x = layer(x)
        return x if head else self._layout.to_outer(x)

    # -- training -------------------------------------------------------------

    def train_step(self, *args, **kwargs):
        self._lay_out_kernels()
        return super().train_step(*args, **kwargs)

    def _lay_out_kernels(self):
        """Has the backend lay out the conv kernels for its convolution, once.

        On torch (the only backend with a `lay_out_kernels`), at the first
        training step with each optimizer (`fit`, `train_on_batch`): the
        kernels, and the optimizer's slots for them, are stored in the
        memory order torch's convolution reads, values unchanged. The native
        path then passes each kernel to the convolution, and takes its
        gradient back, without a copy. "composite" runs Keras' own ops and
        keeps Keras' layout. A training loop of one's own runs with the
        layout the model has.
        """
        if self.implementation == "composite" or self.optimizer is None:
            return
        lay_out = native.own_op(keras.config.backend(), "lay_out_kernels")
        if lay_out is None:
            return
        optimizer_variables = list(self.optimizer.variables)
        done = _LAID_OUT.get(self)
        if done and done[0]() is self.optimizer and done[1] == len(optimizer_variables):
            return
        pairs = self.conv_bn_pairs() + [p for block in self.blocks for p in block.conv_bn_pairs()]
        lay_out(
            [conv.kernel.value for conv, _ in pairs],
            [variable.value for variable in optimizer_variables],
            channels_last=self._layout.inner == "channels_last",
        )
        _LAID_OUT[self] = (weakref.ref(self.optimizer), len(optimizer_variables))

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
        config = {
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
            "stem": self.stem,
            "stem_width": self.stem_width,
        }
        config.update(_args.serialize(self, _args.ARGUMENTS))
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class _Preset(ResNet):
    """A ResNet of fixed depth; its config leaves the fixed architecture out.

    `preset_defaults` are the preset's own defaults, which arguments override
    (they stay in the config); `block_type` and `stage_depths` are fixed.
    """

    block_type_preset = "bottleneck"
    stage_depths_preset = (3, 4, 6, 3)
    default_name = "resnet"
    preset_defaults: dict = {}

    def __init__(self, *, name=None, **kwargs):
        for key in ("block_type", "stage_depths"):
            if key in kwargs:
                raise ValueError(
                    f"{type(self).__name__} has a fixed architecture; use ResNet to "
                    f"choose it. Received: {key}={kwargs[key]!r}"
                )
        for key, value in self.preset_defaults.items():
            kwargs.setdefault(key, value)
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


def _preset(class_name, block_type, stage_depths, summary, defaults=None, example=""):
    """Defines and registers a preset class."""
    doc = f"{summary}\n\n    Arguments as `ResNet`, with the preset's defaults"
    if defaults:
        doc += " " + ", ".join(f"`{k}={v!r}`" for k, v in defaults.items())
    doc += ".\n" + example
    cls = type(
        class_name,
        (_Preset,),
        {
            "__doc__": doc,
            "__module__": __name__,
            "block_type_preset": block_type,
            "stage_depths_preset": stage_depths,
            "default_name": class_name.lower(),
            "preset_defaults": dict(defaults or {}),
        },
    )
    return keras.saving.register_keras_serializable(package="keras_residual")(cls)


# The layout of torchvision's and timm's ResNets (v1.5): stride on the 3x3,
# no conv bias, BN momentum 0.9 (PyTorch's 0.1) and epsilon 1e-5, symmetric
# padding, He initialisation.
TORCHVISION_LAYOUT = {
    "stride_on": "3x3",
    "use_bias": False,
    "momentum": 0.9,
    "epsilon": 1e-5,
    "padding": "symmetric",
    "kernel_initializer": "he_normal",
}
# keras.applications' ResNetV2: pre-activation, stride on the 3x3 with
# symmetric padding, biases only where no BN follows.
KERAS_V2_LAYOUT = {"preact": True, "stride_on": "3x3", "padding": "symmetric", "use_bias": False}
_RESNEXT_32X4D = {"groups": 32, "width_per_group": 4}
_SE = {"se_ratio": 1 / 16}

ResNet18 = _preset(
    "ResNet18", "basic", (2, 2, 2, 2), "ResNet18: basic blocks, stages of (2, 2, 2, 2)."
)
ResNet34 = _preset(
    "ResNet34", "basic", (3, 4, 6, 3), "ResNet34: basic blocks, stages of (3, 4, 6, 3)."
)
ResNet50 = _preset(
    "ResNet50",
    "bottleneck",
    (3, 4, 6, 3),
    "ResNet50: bottleneck blocks, stages of (3, 4, 6, 3).\n\n"
    "    With the defaults it is exactly `keras.applications.ResNet50`.",
    example="""
    Examples:

    >>> model = ResNet50(weights=None)
    >>> model.count_params()
    25636712
    """,
)
ResNet101 = _preset(
    "ResNet101",
    "bottleneck",
    (3, 4, 23, 3),
    "ResNet101: bottleneck blocks, stages of (3, 4, 23, 3).",
)
ResNet152 = _preset(
    "ResNet152",
    "bottleneck",
    (3, 8, 36, 3),
    "ResNet152: bottleneck blocks, stages of (3, 8, 36, 3).",
)
ResNeXt50_32x4d = _preset(
    "ResNeXt50_32x4d",
    "bottleneck",
    (3, 4, 6, 3),
    "ResNeXt50 (32x4d): 32 groups of width 4 in the 3x3, torchvision's layout.",
    {**TORCHVISION_LAYOUT, **_RESNEXT_32X4D},
)
ResNeXt101_32x8d = _preset(
    "ResNeXt101_32x8d",
    "bottleneck",
    (3, 4, 23, 3),
    "ResNeXt101 (32x8d): 32 groups of width 8 in the 3x3, torchvision's layout.",
    {**TORCHVISION_LAYOUT, "groups": 32, "width_per_group": 8},
)
WideResNet50_2 = _preset(
    "WideResNet50_2",
    "bottleneck",
    (3, 4, 6, 3),
    "Wide ResNet50-2: inner convolutions twice as wide, torchvision's layout.",
    {**TORCHVISION_LAYOUT, "width_per_group": 128},
)
ResNet50D = _preset(
    "ResNet50D",
    "bottleneck",
    (3, 4, 6, 3),
    "ResNet50-D: deep stem and average-pool shortcuts, timm's `resnet50d`.",
    {**TORCHVISION_LAYOUT, "stem": "deep", "shortcut": "avg_down"},
)
SEResNet50 = _preset(
    "SEResNet50",
    "bottleneck",
    (3, 4, 6, 3),
    "SE-ResNet50: squeeze-excitation in every block, timm's `seresnet50`.",
    {**TORCHVISION_LAYOUT, **_SE},
)
SEResNeXt50_32x4d = _preset(
    "SEResNeXt50_32x4d",
    "bottleneck",
    (3, 4, 6, 3),
    "SE-ResNeXt50 (32x4d), timm's `seresnext50_32x4d`.",
    {**TORCHVISION_LAYOUT, **_RESNEXT_32X4D, **_SE},
)
ResNet50V2 = _preset(
    "ResNet50V2",
    "bottleneck",
    (3, 4, 6, 3),
    "ResNet50V2 (pre-activation): `keras.applications.ResNet50V2`.",
    KERAS_V2_LAYOUT,
)
ResNet101V2 = _preset(
    "ResNet101V2",
    "bottleneck",
    (3, 4, 23, 3),
    "ResNet101V2 (pre-activation): `keras.applications.ResNet101V2`.",
    KERAS_V2_LAYOUT,
)
ResNet152V2 = _preset(
    "ResNet152V2",
    "bottleneck",
    (3, 8, 36, 3),
    "ResNet152V2 (pre-activation): `keras.applications.ResNet152V2`.",
    KERAS_V2_LAYOUT,
)

PRESETS = (
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    ResNeXt50_32x4d,
    ResNeXt101_32x8d,
    WideResNet50_2,
    ResNet50D,
    SEResNet50,
    SEResNeXt50_32x4d,
    ResNet50V2,
    ResNet101V2,
    ResNet152V2,
)


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
