"""Whole networks, native against composite.

Inference is ``model.predict_on_batch``; training is ``model.train_on_batch``
(forward, cross-entropy, backward and an SGD update). By default a ResNet18
at batch 2 and 64x64; with ``KERAS_RESIDUAL_BENCH_FULL=1`` a ResNet50 at
batch 32 and 224x224.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from _common import FULL, measure, random

import keras_residual

BATCH = 32 if FULL else 2
SIZE = 224 if FULL else 64
NETWORK = "resnet50" if FULL else "resnet18"
CLASSES = 1000


def _model(implementation):
    cls = keras_residual.ResNet50 if FULL else keras_residual.ResNet18
    model = cls(
        weights=None,
        input_shape=(SIZE, SIZE, 3),
        classes=CLASSES,
        implementation=implementation,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    return model


@pytest.mark.benchmark(group="model")
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("network", [NETWORK])
def test_model(benchmark, network, mode, implementation):
    model = _model(implementation)
    x = random((BATCH, SIZE, SIZE, 3), seed=1, low=0.0, high=1.0)
    y = np.random.default_rng(2).integers(0, CLASSES, size=(BATCH,)).astype("int32")
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)  # on the device once
    benchmark.extra_info.update({"batch": BATCH, "size": SIZE, "full": FULL})
    if mode == "inference":
        result = measure(benchmark, lambda: model.predict_on_batch(x))
        # Softmax rows: probabilities that sum to one.
        assert result.shape == (BATCH, CLASSES)
        np.testing.assert_allclose(result.sum(axis=-1), 1.0, rtol=1e-3)
    else:
        result = measure(benchmark, lambda: model.train_on_batch(x, y))
        assert np.isfinite(result) and result > 0.0
