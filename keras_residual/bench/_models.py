"""The models that the benchmark times, one per row label.

Every row of one run computes the same network on the same input shape:

- ``keras.applications``: the stock Keras graph. For ``resnet50`` it is
  ``keras.applications.ResNet50`` itself. ``keras.applications`` has no
  ResNet18 and no stand-alone block, so for ``resnet18`` and ``block`` it is
  the same kind of functional graph built here from stock layers with the
  conventions of ``keras.applications.resnet`` (conv biases,
  BatchNormalization epsilon 1.001e-5, ``Add`` and ``Activation`` layers).
- ``composite``, ``native`` and ``auto``: this package's model with that
  ``implementation`` (``auto``, the default, is what a user gets without
  choosing: see ``keras_residual.native.AUTO_INFERENCE``).
- ``folded``: ``keras_residual.fold_batchnorm`` of this package's model with
  the default implementation (inference only).
- ``limit``: the same convolutions and nothing of the work that fusion
  removes; see ``stock_network``.
- ``torchvision``: plain PyTorch, built and timed by ``_peer`` (not here).

``arch`` chooses the network of this package's rows (and the strides of the
limit): ``"keras"``, the ``keras.applications`` layout (v1: conv biases,
epsilon 1.001e-5, momentum 0.99, stride on the first 1x1), or ``"v1.5"``,
torchvision's exact layout (``ARCH_KWARGS``). The ``keras.applications`` row
stays the stock Keras network whatever ``arch`` is.
"""

from __future__ import annotations

import keras

# One definition of the rows, networks and architectures: the package's.
from keras_residual.bench import ARCHS, LABELS
from keras_residual.models.resnet import TORCHVISION_LAYOUT

# The rows that build this package's model, in the architecture `arch`.
KERAS_RESIDUAL_LABELS = ("composite", "native", "auto", "folded")

# The keras_residual arguments of each `arch`. "v1.5" is torchvision's
# ResNet: stride on the 3x3 convolution (bottlenecks), no conv biases, BN
# epsilon 1e-5 and momentum 0.9 (PyTorch's 0.1), and symmetric padding
# (kernel_size // 2 on every side, like PyTorch's Conv2d).
# "v1.5": the layout of torchvision's ResNets, which the presets of
# keras_residual that come from torchvision have.
ARCH_KWARGS = {"keras": {}, "v1.5": dict(TORCHVISION_LAYOUT)}

# keras.applications' conventions, which keras_residual's ResNet defaults keep.
APPLICATIONS_EPSILON = 1.001e-5
APPLICATIONS_MOMENTUM = 0.99
CLASSES = 1000
# The block row: conv2_block2 of ResNet50, a bottleneck of 64 filters with an
# identity shortcut on a 256-channel feature map (56x56 at 224x224 input).
BLOCK_FILTERS = 64
BLOCK_CHANNELS = 256
DEFAULT_IMAGE_SIZE = {"resnet50": 224, "resnet18": 224, "block": 56}

ARCHITECTURES = {
    "resnet50": {"block_type": "bottleneck", "depths": (3, 4, 6, 3)},
    "resnet18": {"block_type": "basic", "depths": (2, 2, 2, 2)},
}
STAGE_FILTERS = (64, 128, 256, 512)


class Unavailable(Exception):
    """A row that cannot run here; the message is the reason."""


def input_shape(model: str, image_size: int, data_format: str) -> tuple:
    """The per-sample input shape of `model`."""
    channels = BLOCK_CHANNELS if model == "block" else 3
    if data_format == "channels_first":
        return (channels, image_size, image_size)
    return (image_size, image_size, channels)


# -- stock-layer graphs: the keras.applications baseline and the limit --------


class _Parts:
    """What a stock graph keeps: the full network, or the limit."""

    def __init__(self, limit: bool, data_format: str):
        self.limit = limit
        self.data_format = data_format
        self.axis = -1 if data_format == "channels_last" else 1
        self.projection_adds = 0

    def conv(self, x, filters, kernel_size, strides, name, padding="same"):
        return keras.layers.Conv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=not self.limit,
            data_format=self.data_format,
            name=name,
        )(x)

    def bn(self, x, name):
        if self.limit:
            return x
        return keras.layers.BatchNormalization(
            axis=self.axis,
            epsilon=APPLICATIONS_EPSILON,
            momentum=APPLICATIONS_MOMENTUM,
            name=name,
        )(x)

    def act(self, x, name):
        return x if self.limit else keras.layers.Activation("relu", name=name)(x)

    def add(self, shortcut, x, name, projected):
        if not self.limit:
            return keras.layers.Add(name=name)([shortcut, x])
        if projected:
            # Without this one add the projection conv would be dead code and
            # drop out of the graph (and out of the backward pass). It is the
            # cheapest op that keeps it: one per projection block.
            self.projection_adds += 1
            return keras.layers.Add(name=name)([shortcut, x])
        return x


def _bottleneck(parts, x, filters, strides, project, name, stride_on="1x1"):
    shortcut = x
    if project:
        shortcut = parts.conv(x, 4 * filters, 1, strides, f"{name}_0_conv")
        shortcut = parts.bn(shortcut, f"{name}_0_bn")
    first, middle = (strides, 1) if stride_on == "1x1" else (1, strides)
    x = parts.conv(x, filters, 1, first, f"{name}_1_conv")
    x = parts.act(parts.bn(x, f"{name}_1_bn"), f"{name}_1_relu")
    x = parts.conv(x, filters, 3, middle, f"{name}_2_conv")
    x = parts.act(parts.bn(x, f"{name}_2_bn"), f"{name}_2_relu")
    x = parts.conv(x, 4 * filters, 1, 1, f"{name}_3_conv")
    x = parts.bn(x, f"{name}_3_bn")
    x = parts.add(shortcut, x, f"{name}_add", project)
    return parts.act(x, f"{name}_out")


def _basic(parts, x, filters, strides, project, name):
    shortcut = x
    if project:
        shortcut = parts.conv(x, filters, 1, strides, f"{name}_0_conv")
        shortcut = parts.bn(shortcut, f"{name}_0_bn")
    x = parts.conv(x, filters, 3, strides, f"{name}_1_conv")
    x = parts.act(parts.bn(x, f"{name}_1_bn"), f"{name}_1_relu")
    x = parts.conv(x, filters, 3, 1, f"{name}_2_conv")
    x = parts.bn(x, f"{name}_2_bn")
    x = parts.add(shortcut, x, f"{name}_add", project)
    return parts.act(x, f"{name}_out")


def arch_kwargs(model: str, arch: str) -> dict:
    """The keras_residual arguments that build `model` in `arch`.

    Examples:

    >>> arch_kwargs("resnet18", "v1.5")["padding"]
    'symmetric'
    >>> "stride_on" in arch_kwargs("resnet18", "v1.5")  # basic blocks: no 1x1
    False
    """
    if arch not in ARCHS:
        raise ValueError(f"`arch` must be one of {ARCHS}. Received: arch={arch!r}")
    kwargs = dict(ARCH_KWARGS[arch])
    if model == "resnet18":
        kwargs.pop("stride_on", None)
    return kwargs


def row_arch(label: str, arch: str) -> str:
    """The architecture that the row `label` computes when the run asks `arch`."""
    if label == "keras.applications":
        return "keras"
    if label == "torchvision":
        return "v1.5"
    return arch


def stock_network(
    model: str,
    image_size: int,
    *,
    limit: bool = False,
    data_format: str | None = None,
    stride_on: str = "1x1",
) -> keras.Model:
    """A functional ResNet of stock Keras layers, or its limit.

    With `limit=False` it is the network of `keras.applications.resnet`
    (v1: conv biases, BatchNormalization epsilon 1.001e-5, the stride of a
    bottleneck stage on its first 1x1 convolution), generalized to the basic
    blocks of ResNet18.

    With `limit=True` it keeps every convolution (same filters, kernel
    sizes, strides and count, the projection shortcuts included) plus the
    padding, pooling and classifier, and drops the conv and dense biases,
    every BatchNormalization, every activation (softmax included: the model
    returns logits) and every residual add but one per projection block,
    which keeps the projection convolution in the graph. No implementation of
    BN + add + activation can be faster than removing that work, so the
    limit's speed bounds what fusing it can win.

    Args:
        model: `"resnet50"`, `"resnet18"` or `"block"`.
        image_size: int. Height and width of the input.
        limit: bool. Build the limit. Defaults to `False`.
        data_format: `"channels_last"`, `"channels_first"` or `None` for
            `keras.config.image_data_format()`. Defaults to `None`.
        stride_on: `"1x1"` or `"3x3"`: the convolution of a strided
            bottleneck that carries the stride (`"3x3"`: v1.5). Defaults to
            `"1x1"`.

    Returns:
        A `keras.Model`; its attribute `projection_adds` counts the adds that
        the limit keeps.
    """
    data_format = data_format or keras.config.image_data_format()
    parts = _Parts(limit, data_format)
    inputs = keras.Input(input_shape(model, image_size, data_format))
    if model == "block":
        x = _bottleneck(parts, inputs, BLOCK_FILTERS, 1, False, "conv2_block2")
        name = "block_limit" if limit else "block_keras_applications"
    else:
        arch = ARCHITECTURES[model]
        pad = {"data_format": data_format}
        x = keras.layers.ZeroPadding2D(3, name="conv1_pad", **pad)(inputs)
        x = parts.conv(x, 64, 7, 2, "conv1_conv", padding="valid")
        x = parts.act(parts.bn(x, "conv1_bn"), "conv1_relu")
        x = keras.layers.ZeroPadding2D(1, name="pool1_pad", **pad)(x)
        x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool", **pad)(x)
        channels = 64
        for stage, (depth, filters) in enumerate(zip(arch["depths"], STAGE_FILTERS, strict=True)):
            for index in range(depth):
                strides = 2 if stage > 0 and index == 0 else 1
                name = f"conv{stage + 2}_block{index + 1}"
                if arch["block_type"] == "bottleneck":
                    project = strides != 1 or channels != 4 * filters
                    x = _bottleneck(parts, x, filters, strides, project, name, stride_on)
                    channels = 4 * filters
                else:
                    project = strides != 1 or channels != filters
                    x = _basic(parts, x, filters, strides, project, name)
                    channels = filters
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool", **pad)(x)
        x = keras.layers.Dense(
            CLASSES,
            use_bias=not limit,
            activation=None if limit else "softmax",
            name="predictions",
        )(x)
        name = f"{model}_limit" if limit else f"{model}_keras_applications"
    network = keras.Model(inputs, x, name=name)
    network.projection_adds = parts.projection_adds
    return network


# -- the rows -------------------------------------------------------------------


def _keras_residual_model(model, image_size, data_format, implementation, arch="keras"):
    """This package's network; `implementation=None` leaves the default."""
    import keras_residual

    kwargs = {} if implementation is None else {"implementation": implementation}
    kwargs.update(arch_kwargs(model, arch))
    if model == "block":
        block_kwargs = {
            "stride_on": "1x1",
            "use_bias": True,
            "epsilon": APPLICATIONS_EPSILON,
            "momentum": APPLICATIONS_MOMENTUM,
            **kwargs,
        }
        block = keras_residual.BottleneckBlock(
            BLOCK_FILTERS,
            data_format=data_format,
            name="conv2_block2",
            **block_kwargs,
        )
        inputs = keras.Input(input_shape(model, image_size, data_format))
        return keras.Model(inputs, block(inputs), name="block")
    cls = keras_residual.ResNet50 if model == "resnet50" else keras_residual.ResNet18
    return cls(
        weights=None,
        input_shape=input_shape(model, image_size, data_format),
        classes=CLASSES,
        data_format=data_format,
        **kwargs,
    )


def _implementation_unsupported(error: TypeError) -> bool:
    return "implementation" in str(error)


def native_unavailable_reason() -> str | None:
    """Why the native kernels cannot run on the active backend, or `None`."""
    try:
        from keras_residual import native
    except ImportError as error:
        return f"keras_residual.native is not importable ({error})"
    try:
        if native.available():
            return None
    except Exception as error:  # noqa: BLE001 - a row is skipped, never the run
        return f"native.available() failed: {type(error).__name__}: {error}"
    reason = None
    try:
        native.adapter()
    except Exception as error:  # noqa: BLE001
        reason = str(error).strip().splitlines()[0] if str(error).strip() else None
    backend = keras.config.backend()
    return f"native kernels unavailable on {backend}" + (f": {reason}" if reason else "")


def _auto_note() -> str:
    """What `implementation="auto"` runs here, for the record's notes."""
    try:
        from keras_residual import config

        default = config.get_implementation()
    except Exception:  # noqa: BLE001 - optional information
        default = None
    if default == "composite":
        return (
            "auto: composite everywhere (keras_residual.config.get_implementation() is 'composite')"
        )
    from keras_residual import native

    reason = native_unavailable_reason()
    training = "native kernels" if reason is None else f"composite ({reason})"
    inference = native.auto_inference(keras.config.backend())
    if inference == "folded":
        inference = "BN folded into the conv (by the graph compiler, or on the fly)"
    elif inference == "native" and reason is None:
        inference = "native epilogue"
    else:
        inference = "composite"
    return f"auto: training: {training}; inference: {inference}"


def build(label: str, model: str, image_size: int, data_format: str, arch: str = "keras") -> tuple:
    """The Keras model of one row (every label of `LABELS` but `"torchvision"`).

    Args:
        label: one of `LABELS`, except `"torchvision"` (see `_peer.build`).
        model: one of `MODELS`.
        image_size: int. Height and width of the input.
        data_format: `"channels_last"` or `"channels_first"`.
        arch: one of `ARCHS`: the architecture of this package's rows and
            of the limit's strides. Defaults to `"keras"`.

    Returns:
        `(keras_model, notes)`: `notes` is a dict of facts for the record.

    Raises:
        Unavailable: with the reason, when the row cannot run here.
    """
    notes: dict = {}
    if arch not in ARCHS:
        raise ValueError(f"`arch` must be one of {ARCHS}. Received: arch={arch!r}")
    if label == "torchvision":
        raise ValueError("the torchvision row is not a Keras model: build it with `_peer.build`")
    if label == "keras.applications":
        if model == "resnet50":
            previous = keras.config.image_data_format()
            keras.config.set_image_data_format(data_format)
            try:
                network = keras.applications.ResNet50(
                    weights=None,
                    input_shape=input_shape(model, image_size, data_format),
                    classes=CLASSES,
                )
            finally:
                keras.config.set_image_data_format(previous)
            notes["source"] = "keras.applications.ResNet50"
        else:
            network = stock_network(model, image_size, data_format=data_format)
            notes["source"] = (
                "stock Keras layers with the conventions of keras.applications.resnet "
                f"(keras.applications has no {'ResNet18' if model == 'resnet18' else 'block'})"
            )
        return network, notes
    if label == "limit":
        stride_on = ARCH_KWARGS[arch].get("stride_on", "1x1")
        network = stock_network(
            model, image_size, limit=True, data_format=data_format, stride_on=stride_on
        )
        notes["projection_adds_kept"] = network.projection_adds
        if arch != "keras" and model == "resnet50":
            notes["strides"] = f"on the 3x3 convolutions, like the {arch} rows"
        return network, notes
    if label == "native":
        reason = native_unavailable_reason()
        if reason is not None:
            raise Unavailable(reason)
    if label == "auto":
        notes["implementation"] = _auto_note()
    if label in ("composite", "native", "auto"):
        try:
            return _keras_residual_model(model, image_size, data_format, label, arch), notes
        except TypeError as error:
            if not _implementation_unsupported(error):
                raise
            if label == "native":
                raise Unavailable(
                    "this keras_residual has no `implementation` argument yet"
                ) from error
            notes["implementation"] = (
                "built without the `implementation` argument, which this keras_residual "
                "does not have yet (its layers are composite)"
            )
            return _keras_residual_model(model, image_size, data_format, None, arch), notes
    if label == "folded":
        try:
            from keras_residual import fold_batchnorm
        except ImportError as error:
            raise Unavailable(
                f"keras_residual.fold_batchnorm is not importable ({error})"
            ) from None
        base = _keras_residual_model(model, image_size, data_format, None, arch)
        notes["folded_from"] = "the default implementation"
        return fold_batchnorm(base), notes
    raise ValueError(f"`label` must be one of {LABELS}. Received: label={label!r}")


def conv_signature(network) -> list:
    """Sorted `(kernel shape, strides)` of every Conv2D inside `network`."""
    signature = []
    for layer in network._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.Conv2D):
            kernel = tuple(int(d) for d in layer.kernel.shape)
            signature.append((kernel, tuple(layer.strides)))
    return sorted(signature)
