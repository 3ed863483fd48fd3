"""`conv_bn_add_act`'s composite path is Conv2D + BatchNormalization + add + act.

These run on every backend with `implementation="composite"`; the native
path is compared against this one in `tests/native/test_dispatch.py`.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_residual import config
from keras_residual.native import NativeUnavailable
from keras_residual.ops import conv_bn_add_act
from tests.helpers import run_fresh_python

CHANNELS_FIRST_OK = keras.config.backend() != "tensorflow"  # TF's CPU conv is NHWC only


def _layers(filters, kernel_size=3, strides=1, use_bias=True, data_format="channels_last"):
    axis = -1 if data_format == "channels_last" else 1
    conv = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        data_format=data_format,
        bias_initializer="random_normal",
    )
    bn = keras.layers.BatchNormalization(
        axis=axis,
        momentum=0.9,
        epsilon=1e-3,
        beta_initializer="random_normal",
        gamma_initializer="random_uniform",
    )
    return conv, bn


def randomize_bn_statistics(bn, seed):
    rng = np.random.default_rng(seed)
    n = bn.gamma.shape[0]
    bn.set_weights(
        [
            rng.uniform(0.5, 1.5, n),
            rng.normal(0, 0.1, n),
            rng.normal(0, 0.1, n),
            rng.uniform(0.5, 2.0, n),
        ]
    )


def _op_args(conv, bn):
    return dict(
        kernel=conv.kernel,
        gamma=bn.gamma,
        beta=bn.beta,
        moving_mean=bn.moving_mean,
        moving_variance=bn.moving_variance,
        bias=conv.bias if conv.use_bias else None,
        strides=conv.strides,
        epsilon=bn.epsilon,
        data_format=conv.data_format,
    )


def _formats():
    return ["channels_last", "channels_first"] if CHANNELS_FIRST_OK else ["channels_last"]


@pytest.mark.parametrize("data_format", _formats())
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu", "leaky_relu", "elu"])
@pytest.mark.parametrize("implementation", ["composite", "auto"])
def test_inference_equals_keras_layers(data_format, with_residual, activation, implementation):
    """Composite, and "auto" whatever its policy picks here (native.AUTO_INFERENCE)."""
    rng = np.random.default_rng(0)
    shape = (2, 6, 6, 5) if data_format == "channels_last" else (2, 5, 6, 6)
    x = rng.normal(size=shape).astype("float32")
    conv, bn = _layers(7, data_format=data_format)
    y_conv = conv(x)
    bn(y_conv)
    randomize_bn_statistics(bn, seed=1)
    residual = rng.normal(size=tuple(y_conv.shape)).astype("float32") if with_residual else None
    expected = bn(conv(x), training=False)
    if with_residual:
        expected = ops.add(expected, residual)
    expected = keras.activations.get(activation)(expected)
    got = conv_bn_add_act(
        x,
        residual=residual,
        activation=activation,
        implementation=implementation,
        **_op_args(conv, bn),
    )
    # "auto" may fold the BN into the kernel (other roundings) or run native.
    tolerance = 1e-5 if implementation == "composite" else 1e-4
    np.testing.assert_allclose(
        ops.convert_to_numpy(got), ops.convert_to_numpy(expected), rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize("strides", [1, 2])
def test_composite_training_returns_the_batch_statistics_keras_uses(strides):
    rng = np.random.default_rng(1)
    x = rng.normal(2.0, 3.0, size=(4, 8, 8, 3)).astype("float32")
    conv, bn = _layers(6, strides=strides)
    conv_out = conv(x)
    bn(conv_out)
    randomize_bn_statistics(bn, seed=2)
    y, mean, variance = conv_bn_add_act(
        x, training=True, activation="linear", implementation="composite", **_op_args(conv, bn)
    )
    conv_np = ops.convert_to_numpy(conv_out)
    np.testing.assert_allclose(
        ops.convert_to_numpy(mean), conv_np.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5
    )
    # Keras' BatchNormalization: the biased variance (divided by the count).
    np.testing.assert_allclose(
        ops.convert_to_numpy(variance), conv_np.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    expected = bn(conv(x), training=True)
    np.testing.assert_allclose(
        ops.convert_to_numpy(y), ops.convert_to_numpy(expected), rtol=1e-4, atol=1e-4
    )


def test_no_batchnorm_is_conv_plus_bias_plus_residual():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 5, 5, 2)).astype("float32")
    kernel = rng.normal(size=(3, 3, 2, 4)).astype("float32")
    bias = rng.normal(size=(4,)).astype("float32")
    residual = rng.normal(size=(1, 5, 5, 4)).astype("float32")
    got = conv_bn_add_act(
        x,
        kernel,
        None,
        None,
        None,
        None,
        residual,
        bias=bias,
        activation="relu6",
        implementation="composite",
    )
    expected = keras.activations.relu6(
        ops.add(ops.add(ops.conv(x, kernel, padding="same"), bias), residual)
    )
    np.testing.assert_allclose(
        ops.convert_to_numpy(got), ops.convert_to_numpy(expected), rtol=1e-6, atol=1e-6
    )


def test_leaky_relu_uses_the_given_slope():
    x = -np.ones((1, 1, 1, 1), "float32")
    one = np.ones((1,), "float32")
    zero = np.zeros((1,), "float32")
    kernel = np.ones((1, 1, 1, 1), "float32")
    got = conv_bn_add_act(
        x,
        kernel,
        one,
        zero,
        zero,
        one - 1e-5 + 0.0,
        activation="leaky_relu",
        negative_slope=0.1,
        epsilon=1e-5,
        implementation="composite",
    )
    np.testing.assert_allclose(ops.convert_to_numpy(got).ravel(), [-0.1], rtol=1e-4)


# -- bad input: a ValueError before any kernel runs ------------------------------


def _valid():
    return dict(
        inputs=np.zeros((1, 4, 4, 3), "float32"),
        kernel=np.zeros((1, 1, 3, 2), "float32"),
        gamma=np.ones(2, "float32"),
        beta=np.zeros(2, "float32"),
        moving_mean=np.zeros(2, "float32"),
        moving_variance=np.ones(2, "float32"),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"inputs": np.zeros((4, 4, 3), "float32")},
            r"`inputs` must be 4D. Received: inputs.shape",
        ),
        ({"kernel": np.zeros((3, 2), "float32")}, r"`kernel` must be 4D"),
        ({"kernel": np.zeros((1, 1, 5, 2), "float32")}, r"expects 5 input channels.*has 3"),
        ({"inputs": np.zeros((1, 4, 4, 3), "int32")}, r"Received: inputs.dtype=int32"),
        ({"gamma": np.ones(3, "float32")}, r"`gamma` must have one value per output channel"),
        ({"bias": np.ones((2, 1), "float32")}, r"Received: bias.shape=\(2, 1\)"),
        (
            {"residual": np.zeros((1, 4, 4, 3), "float32")},
            r"Received: residual.shape=\(1, 4, 4, 3\)",
        ),
        ({"beta": None}, r"Received: beta=None"),
        ({"padding": "full"}, r"Received: padding='full'"),
        ({"implementation": "fast"}, r"Received: implementation='fast'"),
        ({"activation": "no_such_activation"}, r"no_such_activation"),
        ({"data_format": "NHWC"}, r"data_format"),
    ],
)
def test_bad_input_is_a_value_error(change, message):
    arguments = {**_valid(), **change}
    with pytest.raises(ValueError, match=message):
        conv_bn_add_act(**arguments)


def test_training_without_batchnorm_is_a_value_error():
    arguments = {
        **_valid(),
        "gamma": None,
        "beta": None,
        "moving_mean": None,
        "moving_variance": None,
    }
    with pytest.raises(ValueError, match="Received: training=True"):
        conv_bn_add_act(**arguments, training=True)


# -- choosing the path -------------------------------------------------------------


def test_set_implementation_validates_and_scopes():
    with pytest.raises(ValueError, match="Received: implementation='turbo'"):
        config.set_implementation("turbo")
    before = config.get_implementation()
    with config.implementation_scope("composite"):
        assert config.get_implementation() == "composite"
    assert config.get_implementation() == before


@pytest.mark.skipif(keras.config.backend() != "numpy", reason="the NumPy backend's case")
def test_native_on_numpy_says_why_it_cannot_run():
    with pytest.raises(NativeUnavailable, match="no gradients or native adapter"):
        conv_bn_add_act(**_valid(), implementation="native")


def test_a_global_composite_wins_over_native():
    # The kill switch: a file saved from a model built with
    # implementation="native" still runs where nothing native can.
    with config.implementation_scope("composite"):
        y = conv_bn_add_act(**_valid(), implementation="native")
    assert tuple(y.shape) == (1, 4, 4, 2)


def test_environment_variable_sets_the_default():
    code = "from keras_residual import config; print(config.get_implementation())"
    out = run_fresh_python(code, env={"KERAS_RESIDUAL_IMPLEMENTATION": "composite"})
    assert out.strip().splitlines()[-1] == "composite"
    with pytest.raises(Exception, match="Received: KERAS_RESIDUAL_IMPLEMENTATION='fast'"):
        run_fresh_python(code, env={"KERAS_RESIDUAL_IMPLEMENTATION": "fast"})


def test_native_with_a_non_native_activation_is_refused_by_blocks():
    from keras_residual import ResidualBlock

    with pytest.raises(ValueError, match="Received: implementation='native'"):
        ResidualBlock(8, activation="elu", implementation="native")


def test_info_command_prints_backend_and_adapters():
    out = run_fresh_python(
        "import sys; from keras_residual.__main__ import main; sys.exit(main(['info']))"
    )
    assert f"backend: {keras.config.backend()}" in out
    assert "adapters:" in out and "tensorflow:" in out and "torch:" in out
    assert "compiler:" in out


def test_synchronized_statistics_run_on_every_backend():
    # Keras' synchronized moments are TensorFlow's; elsewhere the flag is
    # ignored (one replica here: the statistics are the batch's either way).
    arguments = _valid()
    arguments["inputs"] = np.random.default_rng(3).normal(size=(2, 4, 4, 3)).astype("float32")
    plain = conv_bn_add_act(**arguments, training=True, implementation="composite")
    synced = conv_bn_add_act(
        **arguments, training=True, synchronized=True, implementation="composite"
    )
    for a, b in zip(plain, synced, strict=True):
        np.testing.assert_allclose(ops.convert_to_numpy(a), ops.convert_to_numpy(b), rtol=1e-5)
