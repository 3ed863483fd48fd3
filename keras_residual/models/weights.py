"""Loading ResNet weights: legacy HDF5 files, ImageNet, live keras.applications models.

Weights are matched by layer name (``conv2_block1_1_conv``), the one thing
that is the same in every Keras version, never by the names of the weight
datasets, which differ between versions. Within a layer, the values come in
the layer's own order: ``[kernel, bias]`` for convolutions and dense layers,
``[gamma, beta, moving_mean, moving_variance]`` for BatchNormalization.
"""

from __future__ import annotations

import os
import re
import warnings

import h5py
import keras
import numpy as np

# keras.applications' own download location and file hashes.
from keras.src.applications.resnet import BASE_WEIGHTS_PATH, WEIGHTS_HASHES

IMAGENET_MODELS = (
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet50v2",
    "resnet101v2",
    "resnet152v2",
)


def check_weights_argument(weights, model) -> None:
    """Validates ``weights`` before anything is built."""
    if weights is None:
        return
    if weights == "imagenet":
        key = getattr(model, "default_name", None)
        if key not in IMAGENET_MODELS:
            available = "ResNet50, ResNet101, ResNet152 and their V2"
            raise ValueError(
                f"ImageNet weights exist for {available} (keras.applications), not "
                f"for {type(model).__name__}. Received: weights='imagenet'"
            )
        if model.include_top and model.classes != 1000:
            raise ValueError(
                "With `weights='imagenet'` and `include_top=True`, `classes` must "
                f"be 1000. Received: classes={model.classes}"
            )
        if model.include_top and model.classifier_activation not in (None, "softmax"):
            raise ValueError(
                "With `weights='imagenet'`, `classifier_activation` must be None or "
                f"'softmax'. Received: classifier_activation={model.classifier_activation!r}"
            )
        # The files hold keras.applications' layout: the preset's defaults.
        layout = {"stage_filters": (64, 128, 256, 512), "stem": "standard", "stem_width": 64}
        layout.update(getattr(model, "preset_defaults", {}))
        layout.setdefault("stride_on", "1x1")
        layout.setdefault("use_bias", True)
        for arg, value in layout.items():
            if getattr(model, arg) != value:
                raise ValueError(
                    f"The ImageNet weights are those of the keras.applications layout, "
                    f"which needs {arg}={value!r}. Received: {arg}={getattr(model, arg)!r}"
                )
        return
    if not isinstance(weights, (str, os.PathLike)) or not os.path.isfile(weights):
        raise ValueError(
            "`weights` must be None, 'imagenet' or the path to an existing weights "
            f"file. Received: weights={weights!r}"
        )


def load_weights(model, weights) -> None:
    """Loads ``weights`` (``"imagenet"`` or a file path) into a built model."""
    if weights == "imagenet":
        weights = imagenet_weights_path(model.default_name, model.include_top)
    path = os.fspath(weights)
    if path.endswith(".weights.h5"):
        model.load_weights(path)
    else:
        load_legacy_h5_weights(model, path)


def imagenet_weights_path(key: str, include_top: bool) -> str:
    """Downloads (or finds in the Keras cache) keras.applications' weights file."""
    suffix = "" if include_top else "_notop"
    file_name = f"{key}_weights_tf_dim_ordering_tf_kernels{suffix}.h5"
    origin = f"{BASE_WEIGHTS_PATH}{file_name}"
    try:
        return keras.utils.get_file(
            file_name,
            origin,
            cache_subdir="models",
            file_hash=WEIGHTS_HASHES[key][0 if include_top else 1],
        )
    except Exception as error:
        raise OSError(
            f"Could not fetch the ImageNet weights for {key} from {origin}: {error}. "
            "Without network access, copy that file here and pass its path as "
            f"`weights='/path/to/{file_name}'`, or place it in ~/.keras/models/."
        ) from error


def _decode(names):
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def read_legacy_h5(filepath) -> dict[str, list[np.ndarray]]:
    """Reads a legacy (Keras 2 / keras.applications) HDF5 weights file.

    Accepts both a weights-only file and a whole-model ``.h5`` file (whose
    weights sit in its ``model_weights`` group).

    Returns:
        A dict from layer name to that layer's list of arrays, in order.
    """
    with h5py.File(filepath, "r") as file:
        group = file["model_weights"] if "model_weights" in file else file
        if "layer_names" not in group.attrs:
            raise ValueError(
                "`weights` is not a weights file in the legacy HDF5 layout (no "
                "'layer_names' attribute). Pass a file written by keras.applications "
                "or Keras 2, or a Keras 3 '.weights.h5' file. "
                f"Received: weights={os.fspath(filepath)!r}"
            )
        values = {}
        for name in _decode(group.attrs["layer_names"]):
            weight_names = _in_layer_order(_decode(group[name].attrs.get("weight_names", [])))
            if weight_names:
                values[name] = [np.asarray(group[name][w]) for w in weight_names]
        return values


# The order of a layer's weights in Keras: conv and dense, then BN.
_LAYER_ORDER = ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance")


def _in_layer_order(weight_names):
    """Sorts names such as ``conv1_bn/beta:0`` into the layer's own order.

    Files list them in that order already; this keeps a file whose writer
    listed them otherwise from swapping, say, a BN's gamma and beta, which
    have the same shape. Unknown names keep the file's order.
    """
    bases = [n.rsplit("/", 1)[-1].split(":", 1)[0] for n in weight_names]
    if not set(bases) <= set(_LAYER_ORDER):
        return weight_names
    order = sorted(range(len(bases)), key=lambda i: _LAYER_ORDER.index(bases[i]))
    return [weight_names[i] for i in order]


def leaf_layers(model) -> dict:
    """The layers of ``model`` that own weights directly, by name."""
    return {
        layer.name: layer
        for layer in model._flatten_layers(include_self=False)
        if layer.weights and not layer._layers
    }


def assign_by_name(model, values: dict, source: str) -> None:
    """Sets every weighted layer of ``model`` from ``values[layer.name]``.

    Raises:
        ValueError: when a layer has no values in ``values``, or values of
            another count or shape. Nothing is assigned then.
    """
    targets = leaf_layers(model)
    missing = sorted(set(targets) - set(values))
    if missing:
        raise ValueError(
            f"{source} has no weights for {len(missing)} layer(s) of "
            f"{model.name}, such as {missing[:3]}. Check that the architecture "
            "(depth, include_top, use_bias) matches the one that wrote it."
        )
    for name, layer in targets.items():
        arrays = values[name]
        shapes = [tuple(v.shape) for v in layer.weights]
        if [tuple(a.shape) for a in arrays] != shapes:
            raise ValueError(
                f"{source} holds weights of shapes {[tuple(a.shape) for a in arrays]} "
                f"for layer '{name}', which expects {shapes}."
            )
    for name, layer in targets.items():
        layer.set_weights(values[name])
    extra = sorted(set(values) - set(targets))
    if extra:
        warnings.warn(
            f"{source} has weights for {len(extra)} layer(s) that {model.name} does "
            f"not have, which were skipped: {extra[:3]}",
            stacklevel=3,
        )


def load_legacy_h5_weights(model, filepath) -> None:
    """Loads a legacy-layout HDF5 weights file into ``model`` by layer name."""
    assign_by_name(model, read_legacy_h5(filepath), f"The weights file {os.fspath(filepath)!r}")


_BLOCK = re.compile(r"^conv(\d+)_block(\d+)_1_conv$")


def from_keras_applications(model, **kwargs):
    """Converts a live ``keras.applications`` ResNet (v1) into ours.

    The stage depths, ``include_top``, ``classes``, ``pooling``, the
    classifier activation, the input shape and the data format are read off
    ``model``; its weights are copied by layer name.

    Args:
        model: a `keras.applications.ResNet50`, `ResNet101` or `ResNet152`.
        **kwargs: further `ResNet` arguments, such as `dtype`.

    Returns:
        A `ResNet50`, `ResNet101` or `ResNet152` (a `ResNet` for other depths)
        whose outputs equal those of ``model``.

    Raises:
        ValueError: if ``model`` is not a ResNet v1 of keras.applications.

    Examples:

    >>> source = keras.applications.ResNet50(weights=None)
    >>> ours = from_keras_applications(source)
    """
    from keras_residual.models import resnet

    names = [layer.name for layer in model.layers]
    depths = {}
    for name in names:
        match = _BLOCK.match(name)
        if match:
            stage = int(match.group(1))
            depths[stage] = max(depths.get(stage, 0), int(match.group(2)))
    if "conv1_conv" not in names or sorted(depths) != [2, 3, 4, 5]:
        raise ValueError(
            "`model` must be a ResNet v1 from keras.applications (ResNet50, "
            f"ResNet101 or ResNet152). Received: model={model.name!r}"
        )
    stage_depths = tuple(depths[s] for s in (2, 3, 4, 5))
    include_top = "predictions" in names
    if include_top:
        head = model.get_layer("predictions")
        kwargs.setdefault("classes", head.units)
        kwargs.setdefault("classifier_activation", keras.activations.serialize(head.activation))
    elif "avg_pool" in names:
        kwargs.setdefault("pooling", "avg")
    elif "max_pool" in names:
        kwargs.setdefault("pooling", "max")
    conv1 = model.get_layer("conv1_conv")
    kwargs.setdefault("data_format", conv1.data_format)
    kwargs.setdefault("input_shape", tuple(model.input_shape[1:]))
    kwargs.setdefault("use_bias", conv1.use_bias)
    kwargs.setdefault("epsilon", float(model.get_layer("conv1_bn").epsilon))
    kwargs.setdefault("momentum", float(model.get_layer("conv1_bn").momentum))

    presets = {
        cls.stage_depths_preset: cls
        for cls in resnet.PRESETS
        if cls.block_type_preset == "bottleneck" and not cls.preset_defaults
    }
    if stage_depths in presets:
        ours = presets[stage_depths](include_top=include_top, **kwargs)
    else:
        ours = resnet.ResNet(
            block_type="bottleneck",
            stage_depths=stage_depths,
            include_top=include_top,
            **kwargs,
        )
    values = {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
    assign_by_name(ours, values, f"keras.applications model {model.name!r}")
    return ours
