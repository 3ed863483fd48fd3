"""BottleneckBlock: the layer contract, stride placement and expansion."""

import keras
import numpy as np
import pytest
from helpers import random_input, run_layer_test

from keras_residual import BottleneckBlock


def test_expansion_is_a_class_attribute():
    assert BottleneckBlock.expansion == 4
    assert BottleneckBlock(16).output_channels == 64


def test_layer_contract_identity_shortcut(tmp_path):
    run_layer_test(
        BottleneckBlock,
        {"filters": 4},
        input_shape=(2, 6, 6, 16),
        expected_output_shape=(2, 6, 6, 16),
        expected_num_trainable_weights=9,
        expected_num_non_trainable_weights=6,
        expected_num_params=16 * 4 + 9 * 4 * 4 + 4 * 16 + 4 * (4 + 4 + 16),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("stride_on", ["3x3", "1x1"])
def test_layer_contract_projection_shortcut(tmp_path, stride_on):
    run_layer_test(
        BottleneckBlock,
        {"filters": 4, "strides": 2, "stride_on": stride_on},
        input_shape=(2, 7, 7, 8),
        expected_output_shape=(2, 4, 4, 16),
        expected_num_trainable_weights=12,
        expected_num_non_trainable_weights=8,
        tmp_path=tmp_path,
    )


def test_layer_contract_channels_first(tmp_path):
    run_layer_test(
        BottleneckBlock,
        {"filters": 2, "strides": 2, "data_format": "channels_first"},
        input_shape=(2, 4, 8, 8),
        expected_output_shape=(2, 8, 4, 4),
        expected_num_trainable_weights=12,
        expected_num_non_trainable_weights=8,
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize(
    "stride_on, conv_strides",
    [("3x3", [(1, 1), (2, 2), (1, 1)]), ("1x1", [(2, 2), (1, 1), (1, 1)])],
)
def test_stride_on(stride_on, conv_strides):
    block = BottleneckBlock(4, strides=2, stride_on=stride_on)
    block.build((None, 8, 8, 16))
    assert [c.strides for c in (block.conv1, block.conv2, block.conv3)] == conv_strides
    assert [c.kernel_size for c in (block.conv1, block.conv2, block.conv3)] == [
        (1, 1),
        (3, 3),
        (1, 1),
    ]
    assert block.shortcut_conv.strides == (2, 2)
    assert block.get_config()["stride_on"] == stride_on


def test_stride_placement_changes_the_function():
    """v1 and v1.5 with the same weights compute different functions."""
    x = random_input((2, 8, 8, 16))
    v15 = BottleneckBlock(4, strides=2, stride_on="3x3")
    v1 = BottleneckBlock(4, strides=2, stride_on="1x1")
    v15.build(x.shape)
    v1.build(x.shape)
    v1.set_weights(v15.get_weights())
    a = keras.ops.convert_to_numpy(v15(x, training=False))
    b = keras.ops.convert_to_numpy(v1(x, training=False))
    assert a.shape == b.shape == (2, 4, 4, 16)
    assert not np.allclose(a, b)


def test_zero_init_residual_zeroes_the_last_bn_only():
    block = BottleneckBlock(4, zero_init_residual=True)
    block.build((None, 4, 4, 16))
    gammas = [keras.ops.convert_to_numpy(bn.gamma) for bn in (block.bn1, block.bn2, block.bn3)]
    assert np.all(gammas[0] == 1) and np.all(gammas[1] == 1) and np.all(gammas[2] == 0)
    x = np.abs(random_input((2, 4, 4, 16)))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x)), x, atol=1e-6)


def test_config_keeps_every_argument():
    block = BottleneckBlock(
        8,
        strides=(2, 2),
        stride_on="1x1",
        kernel_size=5,
        activation="silu",
        shortcut="projection",
        use_bias=True,
        momentum=0.95,
        epsilon=1e-3,
        drop_path_rate=0.1,
        seed=4,
        data_format="channels_first",
        name="b",
        trainable=False,
    )
    config = block.get_config()
    for key, value in {
        "filters": 8,
        "strides": (2, 2),
        "stride_on": "1x1",
        "kernel_size": (5, 5),
        "activation": "silu",
        "shortcut": "projection",
        "use_bias": True,
        "momentum": 0.95,
        "epsilon": 1e-3,
        "drop_path_rate": 0.1,
        "seed": 4,
        "data_format": "channels_first",
        "name": "b",
        "trainable": False,
    }.items():
        assert config[key] == value, key
    assert BottleneckBlock.from_config(config).get_config() == config


def test_defaults():
    config = BottleneckBlock(8).get_config()
    assert config["momentum"] == 0.9
    assert config["epsilon"] == 1e-5
    assert config["use_bias"] is False
    assert config["activation"] == "relu"
    assert config["shortcut"] == "auto"
    assert config["stride_on"] == "3x3"
    assert config["kernel_initializer"]["class_name"] == "HeNormal"
    assert config["kernel_regularizer"] is None
    assert config["zero_init_residual"] is False
    assert config["drop_path_rate"] == 0.0
    assert config["data_format"] == "channels_last"
