"""`fold_batchnorm`: the same outputs in inference, fewer layers, saves and loads."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_residual
from keras_residual import BottleneckBlock, ResidualBlock, fold_batchnorm
from tests.helpers import randomize_bn_statistics


def _np(x):
    return ops.convert_to_numpy(x)


def _close(a, b):
    a, b = _np(a), _np(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def _batchnorms(model):
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def test_fold_a_resnet18():
    model = keras_residual.ResNet18(input_shape=(32, 32, 3), classes=7)
    randomize_bn_statistics(model, seed=0)
    folded = fold_batchnorm(model)
    assert isinstance(folded, keras_residual.ResNet18)
    assert folded.folded and not model.folded
    assert _batchnorms(model) and not _batchnorms(folded)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    _close(folded(x, training=False), model(x, training=False))
    # Fewer parameters: the BN variables are gone, each conv has a bias.
    assert folded.count_params() < model.count_params()


def test_fold_a_sequential_of_blocks_keeps_other_layers_and_their_weights():
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same", name="stem"),
            ResidualBlock(8, name="a"),
            BottleneckBlock(4, strides=2, name="b"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(5, name="head"),
        ]
    )
    randomize_bn_statistics(model, seed=2)
    folded = fold_batchnorm(model)
    assert [type(layer) for layer in folded.layers] == [type(layer) for layer in model.layers]
    assert all(block.folded for block in folded.layers[1:3])
    np.testing.assert_array_equal(_np(folded.layers[0].kernel), _np(model.layers[0].kernel))
    np.testing.assert_array_equal(_np(folded.layers[-1].kernel), _np(model.layers[-1].kernel))
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype("float32")
    _close(folded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_fold_a_functional_model_and_a_single_block():
    inputs = keras.Input((8, 8, 4))
    outputs = BottleneckBlock(2, name="b")(ResidualBlock(4, name="a")(inputs))
    model = keras.Model(inputs, outputs)
    randomize_bn_statistics(model, seed=4)
    x = np.random.default_rng(5).normal(size=(1, 8, 8, 4)).astype("float32")
    _close(fold_batchnorm(model)(x), model(x))
    block = model.get_layer("a")
    folded_block = fold_batchnorm(block)
    assert folded_block.folded and folded_block.bn1 is None
    _close(folded_block(x), block(x))


def test_folded_model_saves_and_loads(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 4)), ResidualBlock(8, strides=2)])
    randomize_bn_statistics(model, seed=6)
    folded = fold_batchnorm(model)
    folded.save(tmp_path / "folded.keras")
    loaded = keras.saving.load_model(tmp_path / "folded.keras")
    assert loaded.layers[0].folded
    x = np.random.default_rng(7).normal(size=(2, 8, 8, 4)).astype("float32")
    _close(loaded(x), model(x))


def test_fold_rejects_what_it_cannot_fold():
    class Custom(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="Received: model="):
        fold_batchnorm(Custom())
    with pytest.raises(ValueError, match="needs a built block"):
        fold_batchnorm(ResidualBlock(4))
