"""An empty batch (N = 0) on the native path gives what the composite path gives.

Under ``tf.distribute`` with data that does not split evenly a replica can
see an empty last batch. The composite path then returns an empty output,
NaN batch statistics (0 / 0) and gradients of the right shapes: zeros, but a
NaN dgamma in training (its sum of no terms is multiplied by the NaN inverse
standard deviation); the moving statistics take the NaN. The native path must
not raise, nor divide into garbage, nor differ.

Runs under the backend with a native adapter (TensorFlow, torch or JAX). The
convolution is the framework's own; TensorFlow's returns the input's channel
count for an empty batch, so the cases keep in_channels == filters.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from keras_residual import ResidualBlock, native
from keras_residual.native._build import ACTIVATION_CODES, NativeUnavailable
from keras_residual.ops import conv_bn_add_act
from tests.helpers import backend_vjp

BACKEND = keras.config.backend()
EPSILON = 1e-3

pytestmark = pytest.mark.skipif(
    BACKEND not in native.ADAPTERS, reason=f"no native adapter on the {BACKEND} backend"
)


@pytest.fixture(scope="module")
def adapter():
    try:
        return native.adapter(BACKEND)
    except NativeUnavailable as error:
        pytest.skip(f"native adapter unavailable here: {str(error).splitlines()[0]}")


def _formats():
    return ["channels_last"] if BACKEND == "tensorflow" else ["channels_last", "channels_first"]


def _np(t):
    if t is None:
        return None
    if keras.backend.standardize_dtype(t.dtype) != "float64":
        t = ops.cast(t, "float32")
    return np.asarray(ops.convert_to_numpy(t), dtype=np.float64)


def _same(actual, expected, name):
    actual, expected = _np(actual), _np(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    np.testing.assert_array_equal(np.isnan(actual), np.isnan(expected), err_msg=name)
    finite = ~np.isnan(expected)
    np.testing.assert_allclose(actual[finite], expected[finite], rtol=1e-6, err_msg=name)


def _tensor(values, dtype="float32"):
    return ops.cast(ops.convert_to_tensor(np.asarray(values)), dtype)


@pytest.mark.parametrize("data_format", _formats())
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "gelu"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("shape", [(0, 5, 5, 4), (2, 0, 5, 4)], ids=["n0", "h0"])
def test_conv_bn_add_act_native_equals_composite(
    adapter, data_format, activation, training, with_residual, shape
):
    rng = np.random.default_rng(0)
    n, h, w, c = shape
    if BACKEND == "torch" and h == 0:
        pytest.skip("torch's conv rejects an empty spatial size (on both paths)")
    filters = c
    x = np.zeros(shape, "float32")
    if data_format == "channels_first":
        x = x.transpose(0, 3, 1, 2)
    out_shape = (n, h, w, filters) if data_format == "channels_last" else (n, filters, h, w)
    inputs = {
        "inputs": _tensor(x),
        "kernel": _tensor(rng.normal(0, 0.3, (3, 3, c, filters))),
        "gamma": _tensor(rng.uniform(0.5, 1.5, filters)),
        "beta": _tensor(rng.normal(0, 0.2, filters)),
        "residual": _tensor(np.zeros(out_shape)) if with_residual else None,
    }
    constants = {
        "moving_mean": rng.normal(0, 0.2, filters).astype("float32"),
        "moving_variance": rng.uniform(0.5, 2.0, filters).astype("float32"),
        "bias": rng.normal(0, 0.2, filters).astype("float32"),
    }
    dy = _tensor(np.zeros(out_shape))
    results = {}
    for implementation in ("native", "composite"):

        def run(implementation=implementation, **tensors):
            return conv_bn_add_act(
                **tensors,
                **constants,
                activation=activation,
                epsilon=EPSILON,
                training=training,
                data_format=data_format,
                implementation=implementation,
            )

        results[implementation] = backend_vjp(run, inputs, dy)
    (native_out, native_grads), (composite_out, composite_grads) = results.values()
    if not training:
        native_out, composite_out = (native_out,), (composite_out,)
    assert tuple(native_out[0].shape) == out_shape
    for name, a, b in zip(("y", "mean", "var"), native_out, composite_out, strict=False):
        _same(a, b, name)
    if training:
        assert np.isnan(_np(native_out[1])).all() and np.isnan(_np(native_out[2])).all()
    assert native_grads.keys() == composite_grads.keys()
    for name in composite_grads:
        _same(native_grads[name], composite_grads[name], f"d{name}")


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("nhw", [(0, 3, 3), (2, 0, 3)], ids=["n0", "h0"])
def test_adapter_ops(adapter, dtype, channels_last, nhw):
    """The adapter's own ops on an empty batch: no error, the composite's values."""
    n, h, w = nhw
    shape = (n, h, w, 5) if channels_last else (n, 5, h, w)
    pd = "float64" if dtype == "float64" else "float32"
    x = _tensor(np.zeros(shape), dtype)
    gamma, beta = _tensor(np.ones(5), pd), _tensor(np.zeros(5), pd)
    inputs = {"x": x, "gamma": gamma, "beta": beta, "residual": _tensor(np.zeros(shape), dtype)}

    def train(x, gamma, beta, residual):
        return adapter.bn_add_act_train(
            x,
            gamma,
            beta,
            residual,
            epsilon=EPSILON,
            activation=ACTIVATION_CODES["relu"],
            alpha=0.2,
            channels_last=channels_last,
        )

    (y, mean, var), grads = backend_vjp(train, inputs, _tensor(np.zeros(shape), dtype))
    assert tuple(y.shape) == shape
    assert np.isnan(_np(mean)).all() and np.isnan(_np(var)).all()
    assert tuple(grads["x"].shape) == shape and tuple(grads["residual"].shape) == shape
    # As the composite path: dbeta = sum of nothing, dgamma = 0 * invstd = NaN.
    np.testing.assert_array_equal(_np(grads["beta"]), np.zeros(5))
    assert np.isnan(_np(grads["gamma"])).all()

    def epilogue(x, gamma, beta, residual):
        return adapter.scale_shift_add_act(
            x,
            gamma,
            beta,
            residual,
            activation=ACTIVATION_CODES["silu"],
            alpha=0.2,
            channels_last=channels_last,
        )

    y, grads = backend_vjp(epilogue, inputs, _tensor(np.zeros(shape), dtype))
    assert tuple(y.shape) == shape
    np.testing.assert_array_equal(_np(grads["gamma"]), np.zeros(5))
    np.testing.assert_array_equal(_np(grads["beta"]), np.zeros(5))
    assert tuple(grads["x"].shape) == shape


def test_block_moving_statistics_match_composite(adapter):
    """A training step on an empty batch leaves the same moving statistics."""
    blocks = []
    for implementation in ("native", "composite"):
        block = ResidualBlock(4, implementation=implementation)
        block.build((None, 5, 5, 4))
        blocks.append(block)
    blocks[1].set_weights(blocks[0].get_weights())
    x = _tensor(np.zeros((0, 5, 5, 4)))
    outputs = [block(x, training=True) for block in blocks]
    assert tuple(outputs[0].shape) == tuple(outputs[1].shape) == (0, 5, 5, 4)
    native_weights = [_np(w) for w in blocks[0].weights]
    composite_weights = [_np(w) for w in blocks[1].weights]
    names = [w.path for w in blocks[0].weights]
    for name, a, b in zip(names, native_weights, composite_weights, strict=True):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_allclose(a[~np.isnan(b)], b[~np.isnan(b)], rtol=1e-6, err_msg=name)
