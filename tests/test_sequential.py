"""The answer to "is ResNet50 just a Sequential stack?": the drop-in program."""

import keras
import numpy as np
import pytest
from helpers import random_input

import keras_residual


def layers():
    return [
        keras.layers.Conv2D(64, 3, padding="same"),
        keras_residual.ResidualBlock(64),
        keras_residual.ResidualBlock(128, strides=2),  # projection shortcut
        keras_residual.BottleneckBlock(64, strides=2),  # outputs 4 * 64 channels
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ]


@pytest.mark.parametrize("with_input", [True, False])
def test_sequential_drop_in(with_input):
    stack = layers()
    model = keras.Sequential(([keras.Input((32, 32, 3))] if with_input else []) + stack)
    x = random_input((4, 32, 32, 3))
    y = model(x)
    assert tuple(y.shape) == (4, 10)
    assert tuple(stack[2](keras.Input((32, 32, 64))).shape) == (None, 16, 16, 128)
    assert stack[2].shortcut_conv is not None and stack[1].shortcut_conv is None
    assert stack[3].output_channels == 256
    model.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())
    history = model.fit(x, np.zeros((4, 10)), epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
