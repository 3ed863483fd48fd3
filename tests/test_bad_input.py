"""Bad input raises a ValueError that names the argument and the value."""

import re

import keras
import numpy as np
import pytest

from keras_residual import BottleneckBlock, ResidualBlock, ResNet18, ResNet50

BLOCKS = [ResidualBlock, BottleneckBlock]


def raises(match):
    return pytest.raises(ValueError, match=re.escape(match))


@pytest.mark.parametrize("block_cls", BLOCKS)
@pytest.mark.parametrize("filters", [0, -3, 1.5, "64", None, True])
def test_filters_must_be_positive_integers(block_cls, filters):
    with raises(f"Received: filters={filters!r}"):
        block_cls(filters)


@pytest.mark.parametrize("block_cls", BLOCKS)
@pytest.mark.parametrize("strides", [0, -1, (1, 0), (2, 2, 2), 1.0])
def test_strides_below_one(block_cls, strides):
    with raises(f"Received: strides={strides!r}"):
        block_cls(8, strides=strides)


@pytest.mark.parametrize("block_cls", BLOCKS)
def test_kernel_size(block_cls):
    with raises("Received: kernel_size=0"):
        block_cls(8, kernel_size=0)


@pytest.mark.parametrize("block_cls", BLOCKS)
@pytest.mark.parametrize("activation", ["not_an_activation", keras.activations.relu, None])
def test_unknown_activation(block_cls, activation):
    with raises(f"Received: activation={activation!r}"):
        block_cls(8, activation=activation)


@pytest.mark.parametrize("block_cls", BLOCKS)
def test_unknown_shortcut(block_cls):
    with raises("Received: shortcut='conv'"):
        block_cls(8, shortcut="conv")


def test_unknown_stride_on():
    with raises("Received: stride_on='2x2'"):
        BottleneckBlock(8, stride_on="2x2")


@pytest.mark.parametrize("block_cls", BLOCKS)
def test_unknown_data_format(block_cls):
    with raises("Received: data_format='nchw'"):
        block_cls(8, data_format="NCHW")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"momentum": 1.5}, "Received: momentum=1.5"),
        ({"epsilon": 0}, "Received: epsilon=0"),
        ({"drop_path_rate": 1.0}, "Received: drop_path_rate=1.0"),
        ({"drop_path_rate": -0.1}, "Received: drop_path_rate=-0.1"),
        ({"seed": "x"}, "Received: seed='x'"),
    ],
)
def test_out_of_range_options(kwargs, message):
    with raises(message):
        ResidualBlock(8, **kwargs)


@pytest.mark.parametrize("block_cls", BLOCKS)
@pytest.mark.parametrize("shape", [(2, 8, 8), (2, 8, 8, 8, 8)])
def test_input_rank_not_4(block_cls, shape):
    with raises(f"Received: input_shape={shape!r}"):
        block_cls(8)(np.zeros(shape, "float32"))


@pytest.mark.parametrize("block_cls", BLOCKS)
def test_input_rank_not_4_symbolic(block_cls):
    with raises("Received: input_shape=(None, 8, 8)"):
        block_cls(8)(keras.Input((8, 8)))


@pytest.mark.parametrize("block_cls", BLOCKS)
def test_undefined_channel_dimension(block_cls):
    with raises("Received: input_shape=(None, 8, 8, None)"):
        block_cls(8)(keras.Input((8, 8, None)))


def test_undefined_channel_dimension_channels_first():
    with raises("Received: input_shape=(None, None, 8, 8)"):
        ResidualBlock(8, data_format="channels_first").build((None, None, 8, 8))


@pytest.mark.parametrize(
    "block, in_channels",
    [
        (lambda: ResidualBlock(8, shortcut="identity"), 4),  # width changes
        (lambda: ResidualBlock(8, strides=2, shortcut="identity"), 8),  # stride
        (lambda: BottleneckBlock(8, shortcut="identity"), 8),  # 8 -> 32 channels
    ],
)
def test_impossible_identity_shortcut(block, in_channels):
    with raises("Received: shortcut='identity'"):
        block().build((None, 8, 8, in_channels))


def test_possible_identity_shortcut_builds():
    block = BottleneckBlock(8, shortcut="identity")
    block.build((None, 8, 8, 32))
    assert block.shortcut_conv is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": 0}, "Received: classes=0"),
        ({"pooling": "mean", "include_top": False}, "Received: pooling='mean'"),
        ({"weights": "no/such/file.h5"}, "Received: weights='no/such/file.h5'"),
        ({"weights": "imagenet", "classes": 10}, "Received: classes=10"),
        ({"weights": "imagenet", "stride_on": "3x3"}, "Received: stride_on='3x3'"),
        ({"input_shape": (224, 224)}, "Received: input_shape=(224, 224)"),
        ({"input_shape": (224, 224, None)}, "Received: input_shape=(224, 224, None)"),
        ({"input_shape": (0, 224, 3)}, "Received: input_shape=0"),
        ({"data_format": "channels_middle"}, "Received: data_format='channels_middle'"),
        ({"classifier_activation": "nope"}, "Received: classifier_activation='nope'"),
    ],
)
def test_model_bad_arguments(kwargs, message):
    with raises(message):
        ResNet50(**kwargs)


def test_imagenet_weights_only_where_keras_applications_has_them():
    with raises("Received: weights='imagenet'"):
        ResNet18(weights="imagenet")


def test_model_input_rank_not_4():
    model = ResNet18(include_top=False, input_shape=(32, 32, 3))
    with raises("Received: input_shape=(2, 32, 32)"):
        model.compute_output_shape((2, 32, 32))
