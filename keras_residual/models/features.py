"""Multi-scale features from a `ResNet`, for an FPN or a detection head."""

from __future__ import annotations

import keras

from keras_residual.models.resnet import ResNet


def feature_extractor(model, levels=None, name=None):
    """A functional `keras.Model` that returns `model`'s stage outputs.

    The result takes the images `model` takes and returns a dict from level
    name to stage output: `"P2"` (stride 4, the output of stage `conv2`),
    `"P3"` (8), `"P4"` (16) and `"P5"` (32), keras-hub's `pyramid_outputs`
    naming. It calls `model` itself, with `pyramid_levels=levels`, so the
    weights are shared: training the extractor trains `model`. For a
    `ResNet50` these are the tensors that `keras.applications.ResNet50`
    names `conv2_block3_out`, `conv3_block4_out`, `conv4_block6_out` and
    `conv5_block3_out`.

    Args:
        model: a `ResNet` or preset (not a pre-activation one: its stride
            changes inside a stage). With or without its top, which is not
            run.
        levels: `None` for every level, or a list of level names such as
            `["P3", "P4", "P5"]`. Defaults to `None`.
        name: name of the functional model. Defaults to
            `f"{model.name}_features"`.

    Returns:
        A functional `keras.Model` with one input and a dict output. It
        saves to and loads from `.keras` files. Its layer
        `get_layer(model.name)` holds `model` and finds every layer of it
        by its `keras.applications` name (`.get_layer("conv4_block6")`).

    Raises:
        ValueError: when `model` is not a `ResNet`, is a pre-activation one,
            or `levels` names a level it does not have.

    Examples:

    >>> import keras_residual
    >>> backbone = keras_residual.ResNet18(include_top=False, input_shape=(64, 64, 3))
    >>> extractor = keras_residual.feature_extractor(backbone, levels=["P4", "P5"])
    >>> {k: v.shape for k, v in extractor.output.items()}
    {'P4': (None, 4, 4, 256), 'P5': (None, 2, 2, 512)}
    """
    if not isinstance(model, ResNet):
        raise ValueError(
            "`model` must be a keras_residual ResNet (or preset). "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    levels = tuple(model.pyramid_level_names() if levels is None else levels)
    model._check_levels(levels)
    inputs = keras.Input(model.image_shape, dtype=model.input_dtype, name="images")
    outputs = PyramidOutputs(model, levels)(inputs)
    return keras.Model(inputs, outputs, name=name or f"{model.name}_features")


@keras.saving.register_keras_serializable(package="keras_residual")
class PyramidOutputs(keras.layers.Layer):
    """`backbone(x, pyramid_levels=levels)` as one layer of a functional model.

    A Keras functional graph expects each layer to give outputs of one
    structure on every call, and a `ResNet` has already been called for
    its usual output; this layer is the node whose output is the dict. It
    holds `backbone` (its weights, shared) and takes the backbone's name.

    Args:
        backbone: a `ResNet`.
        levels: the level names to return.
        **kwargs: base layer arguments.
    """

    def __init__(self, backbone, levels, **kwargs):
        kwargs.setdefault("name", backbone.name)
        super().__init__(**kwargs)
        self.backbone = backbone
        self.levels = tuple(backbone._check_levels(levels))

    def build(self, input_shape):
        self.built = True

    def call(self, inputs, training=None):
        return self.backbone(inputs, training=training, pyramid_levels=list(self.levels))

    def compute_output_spec(self, inputs, training=None):
        return self.backbone.compute_output_spec(inputs, pyramid_levels=list(self.levels))

    def get_layer(self, name):
        """A layer of the backbone by its `keras.applications` name."""
        return self.backbone.get_layer(name)

    def get_config(self):
        config = super().get_config()
        config["backbone"] = keras.saving.serialize_keras_object(self.backbone)
        config["levels"] = list(self.levels)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
