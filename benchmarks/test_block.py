"""The blocks, native against composite, inside a one-block Keras model.

Inference is ``model.predict_on_batch``; training is ``model.train_on_batch``
(forward, mean squared error, backward and an SGD update). The shapes are
ResNet50's ``conv2_block2`` (a 64-filter bottleneck on 256 channels) and
ResNet18's ``conv2_block2`` (a 64-filter basic block): by default at batch 2
and 28x28, with ``KERAS_RESIDUAL_BENCH_FULL=1`` at batch 32 and 56x56.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from _common import FULL, measure, random

import keras_residual

BATCH = 32 if FULL else 2
SIZE = 56 if FULL else 28
BLOCKS = {
    "bottleneck64": (keras_residual.BottleneckBlock, 256),
    "basic64": (keras_residual.ResidualBlock, 64),
}


def _model(block, implementation):
    cls, channels = BLOCKS[block]
    inputs = keras.Input((SIZE, SIZE, channels))
    outputs = cls(64, implementation=implementation, name="block")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mean_squared_error")
    return model, channels


@pytest.mark.benchmark(group="block")
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_block(benchmark, block, mode, implementation):
    model, channels = _model(block, implementation)
    x = random((BATCH, SIZE, SIZE, channels), seed=1, low=0.0, high=1.0)
    y = random((BATCH, SIZE, SIZE, channels), seed=2)
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)  # on the device once
    benchmark.extra_info.update({"batch": BATCH, "size": SIZE, "full": FULL})
    if mode == "inference":
        result = measure(benchmark, lambda: model.predict_on_batch(x))
        # A ReLU output of the input's shape, not all zeros.
        assert result.shape == (BATCH, SIZE, SIZE, channels)
        assert float(np.min(result)) >= 0.0 and float(np.max(result)) > 0.0
    else:
        result = measure(benchmark, lambda: model.train_on_batch(x, y))
        assert np.isfinite(result) and result > 0.0
