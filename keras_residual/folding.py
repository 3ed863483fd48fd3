"""``fold_batchnorm``: inference models with BatchNormalization folded into conv."""

from __future__ import annotations

import keras
import numpy as np

from keras_residual.layers._base import BaseResidualBlock
from keras_residual.models.resnet import ResNet


def fold_batchnorm(model):
    """Returns an inference copy of `model` with every BN folded into its conv.

    For each conv -> BN pair of the blocks (and of a `ResNet`'s stem), with
    `s = gamma / sqrt(moving_variance + epsilon)`, the copy's conv has the
    kernel `kernel * s` (per output channel) and the bias
    `(bias - moving_mean) * s + beta`. What is left of a unit is the conv and
    one epilogue pass: bias, residual add and activation, which the native
    kernels run as one pass where they are available.

    In inference the copy's outputs equal the original's up to float
    rounding. It is a model like any other: it saves, loads and exports.
    Training it trains convs without BatchNormalization; it is meant for
    inference.

    Args:
        model: a `ResNet` (or preset such as `ResNet50`), a `ResidualBlock` or
            `BottleneckBlock`, or a `keras.Sequential` or functional model
            whose blocks are these. Other layers are copied unchanged, with
            their weights. It must be built.

    Returns:
        A new model (or block) of the same kind with `folded=True` blocks.

    Raises:
        ValueError: for a subclassed model other than `ResNet`, or a block or
            model that is not built.

    Examples:

    >>> import numpy as np
    >>> from keras_residual import ResidualBlock
    >>> model = keras.Sequential([keras.Input((8, 8, 16)), ResidualBlock(16)])
    >>> folded = fold_batchnorm(model)
    >>> x = np.random.rand(2, 8, 8, 16).astype("float32")
    >>> np.allclose(model.predict(x, verbose=0), folded.predict(x, verbose=0), atol=1e-4)
    True
    """
    if isinstance(model, BaseResidualBlock):
        return _fold_block(model)
    if isinstance(model, ResNet):
        return _fold_resnet(model)
    if isinstance(model, keras.Model) and _is_graph_model(model):
        return _fold_graph_model(model)
    raise ValueError(
        "`model` must be a ResNet, a residual block, or a Sequential or functional model. "
        f"Received: model={model!r} of type {type(model).__name__}"
    )


def _is_graph_model(model) -> bool:
    return isinstance(model, keras.Sequential) or type(model).__name__ == "Functional"


def _folded_config(layer):
    config = layer.get_config()
    config["folded"] = True
    return config


def _fold_block(block):
    if not block.built:
        raise ValueError(
            f"`fold_batchnorm` needs a built block; call it on an input first. "
            f"Received: an unbuilt {type(block).__name__} named {block.name!r}"
        )
    folded = type(block).from_config(_folded_config(block))
    folded.build(_input_shape(block))
    _fold_pairs(block.conv_bn_pairs(), folded.conv_bn_pairs())
    _copy_unfolded(block, folded)
    return folded


def _input_shape(block):
    shapes = getattr(block, "_build_shapes_dict", None) or {}
    if len(shapes) == 1:
        return next(iter(shapes.values()))
    spec = block.input_spec
    raise ValueError(
        f"cannot tell the input shape of the built block {block.name!r}. "
        f"Received: input_spec={spec}"
    )


def _fold_resnet(model):
    folded = type(model).from_config(_folded_config(model))
    pairs, folded_pairs = list(model.conv_bn_pairs()), list(folded.conv_bn_pairs())
    for block, folded_block in zip(model.blocks, folded.blocks, strict=True):
        pairs += block.conv_bn_pairs()
        folded_pairs += folded_block.conv_bn_pairs()
    _fold_pairs(pairs, folded_pairs)
    _copy_unfolded(model, folded)
    return folded


def _fold_graph_model(model):
    def clone(layer):
        if isinstance(layer, BaseResidualBlock | ResNet):
            return fold_batchnorm(layer)
        return layer.__class__.from_config(layer.get_config())

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer, folded_layer in zip(model.layers, folded.layers, strict=True):
        if not isinstance(layer, BaseResidualBlock | ResNet):
            folded_layer.set_weights(layer.get_weights())
    return folded


def _leaf_layers(layer):
    return {
        sub.name: sub
        for sub in layer._flatten_layers(include_self=False)
        if sub.weights and not sub._layers
    }


def _copy_unfolded(original, folded):
    """Copies the weights that folding leaves as they are.

    Those of the layers of `folded` that have the same weights in `original`:
    the classifier, squeeze-excitation convs and BNs that follow no conv
    (pre-activation, `post_bn`). The folded convs have a bias more.
    """
    sources = _leaf_layers(original)
    for name, layer in _leaf_layers(folded).items():
        source = sources.get(name)
        if source is None:
            continue
        shapes = [tuple(w.shape) for w in source.weights]
        if shapes == [tuple(w.shape) for w in layer.weights] and not (
            isinstance(layer, keras.layers.Conv2D) and layer.use_bias != source.use_bias
        ):
            if not _is_folded_conv(layer, folded):
                layer.set_weights(source.get_weights())


def _is_folded_conv(layer, folded):
    pairs = list(folded.conv_bn_pairs())
    for block in getattr(folded, "blocks", []):
        pairs += block.conv_bn_pairs()
    return any(layer is conv for conv, _ in pairs)


def _fold_pairs(pairs, folded_pairs):
    for (conv, bn), (folded_conv, folded_bn) in zip(pairs, folded_pairs, strict=True):
        assert folded_bn is None
        kernel = keras.ops.convert_to_numpy(conv.kernel).astype("float64")
        filters = kernel.shape[-1]
        if conv.use_bias:
            bias = keras.ops.convert_to_numpy(conv.bias).astype("float64")
        else:
            bias = np.zeros(filters)
        if bn is not None:
            gamma, beta, mean, variance = (
                keras.ops.convert_to_numpy(v).astype("float64")
                for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance)
            )
            scale = gamma / np.sqrt(variance + bn.epsilon)
            kernel = kernel * scale
            bias = (bias - mean) * scale + beta
        folded_conv.kernel.assign(kernel.astype(folded_conv.kernel.dtype))
        folded_conv.bias.assign(bias.astype(folded_conv.bias.dtype))
