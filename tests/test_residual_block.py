"""ResidualBlock: the layer contract, the math, and its options."""

import keras
import numpy as np
import pytest
from helpers import random_input, randomize_bn_statistics, run_layer_test

from keras_residual import ResidualBlock


def test_layer_contract_identity_shortcut(tmp_path):
    run_layer_test(
        ResidualBlock,
        {"filters": 8},
        input_shape=(2, 8, 8, 8),
        expected_output_shape=(2, 8, 8, 8),
        expected_num_trainable_weights=6,  # 2 kernels, 2 gammas, 2 betas
        expected_num_non_trainable_weights=4,  # 2 moving means and variances
        expected_num_params=2 * 3 * 3 * 8 * 8 + 2 * 4 * 8,
        tmp_path=tmp_path,
    )


def test_layer_contract_projection_shortcut(tmp_path):
    run_layer_test(
        ResidualBlock,
        {"filters": 16, "strides": 2},
        input_shape=(2, 9, 9, 8),
        expected_output_shape=(2, 5, 5, 16),
        expected_num_trainable_weights=9,
        expected_num_non_trainable_weights=6,
        expected_num_params=3 * 3 * 8 * 16 + 3 * 3 * 16 * 16 + 8 * 16 + 3 * 4 * 16,
        tmp_path=tmp_path,
    )


def test_layer_contract_channels_first(tmp_path):
    run_layer_test(
        ResidualBlock,
        {"filters": 4, "strides": 2, "data_format": "channels_first"},
        input_shape=(2, 3, 8, 8),
        expected_output_shape=(2, 4, 4, 4),
        expected_num_trainable_weights=9,
        expected_num_non_trainable_weights=6,
        tmp_path=tmp_path,
    )


def reference_block(block, x):
    """The block's inference output, recomputed from its weights with keras.ops."""
    ops = keras.ops

    def conv_bn(conv, bn, y, strides):
        y = ops.conv(y, conv.kernel, strides=strides, padding="same")
        if conv.use_bias:
            y = y + conv.bias
        scale = bn.gamma / ops.sqrt(bn.moving_variance + bn.epsilon)
        return (y - bn.moving_mean) * scale + bn.beta

    act = keras.activations.get(block.activation)
    x = keras.ops.convert_to_tensor(x)
    y = act(conv_bn(block.conv1, block.bn1, x, block.strides))
    y = conv_bn(block.conv2, block.bn2, y, 1)
    shortcut = x
    if block.shortcut_conv is not None:
        shortcut = conv_bn(block.shortcut_conv, block.shortcut_bn, x, block.strides)
    return keras.ops.convert_to_numpy(act(y + shortcut))


@pytest.mark.parametrize(
    "kwargs, in_channels",
    [
        ({"filters": 6}, 6),
        ({"filters": 6, "strides": 2}, 6),
        ({"filters": 6}, 3),
        ({"filters": 6, "activation": "leaky_relu", "use_bias": True}, 6),
        ({"filters": 6, "activation": "gelu", "shortcut": "projection"}, 6),
    ],
)
def test_matches_reference_math(kwargs, in_channels):
    block = ResidualBlock(**kwargs)
    x = random_input((2, 7, 7, in_channels))
    block.build(x.shape)
    randomize_bn_statistics(block)
    expected = reference_block(block, x)
    got = keras.ops.convert_to_numpy(block(x, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, in_channels, projects",
    [
        ({"filters": 8}, 8, False),
        ({"filters": 8}, 4, True),  # width changes
        ({"filters": 8, "strides": 2}, 8, True),  # stride changes
        ({"filters": 8, "shortcut": "projection"}, 8, True),
        ({"filters": 8, "shortcut": "identity"}, 8, False),
    ],
)
def test_shortcut_projection_added_by_itself(kwargs, in_channels, projects):
    block = ResidualBlock(**kwargs, name="blk")
    block.build((None, 8, 8, in_channels))
    assert (block.shortcut_conv is not None) == projects
    names = {w.path for w in block.weights}
    assert ("blk/blk_0_conv/kernel" in names) == projects


def test_weight_paths_are_stable_and_documented():
    block = ResidualBlock(8, strides=2, name="conv2_block1")
    block.build((None, 8, 8, 4))
    assert [w.path for w in block.weights] == [
        "conv2_block1/conv2_block1_1_conv/kernel",
        "conv2_block1/conv2_block1_1_bn/gamma",
        "conv2_block1/conv2_block1_1_bn/beta",
        "conv2_block1/conv2_block1_1_bn/moving_mean",
        "conv2_block1/conv2_block1_1_bn/moving_variance",
        "conv2_block1/conv2_block1_2_conv/kernel",
        "conv2_block1/conv2_block1_2_bn/gamma",
        "conv2_block1/conv2_block1_2_bn/beta",
        "conv2_block1/conv2_block1_2_bn/moving_mean",
        "conv2_block1/conv2_block1_2_bn/moving_variance",
        "conv2_block1/conv2_block1_0_conv/kernel",
        "conv2_block1/conv2_block1_0_bn/gamma",
        "conv2_block1/conv2_block1_0_bn/beta",
        "conv2_block1/conv2_block1_0_bn/moving_mean",
        "conv2_block1/conv2_block1_0_bn/moving_variance",
    ]


@pytest.mark.parametrize(
    "activation, fn",
    [
        ("relu", lambda v: np.maximum(v, 0)),
        ("relu6", lambda v: np.clip(v, 0, 6)),
        ("leaky_relu", lambda v: np.where(v > 0, v, 0.2 * v)),
        ("linear", lambda v: v),
        ("silu", lambda v: v / (1 + np.exp(-v))),
        ("swish", lambda v: v / (1 + np.exp(-v))),
        ("gelu", None),
    ],
)
def test_activations(activation, fn):
    """With a zero residual branch the block is act(x): the activation shows."""
    block = ResidualBlock(4, activation=activation, zero_init_residual=True)
    x = random_input((2, 5, 5, 4)) * 8
    y = keras.ops.convert_to_numpy(block(x, training=False))
    expected = keras.ops.convert_to_numpy(keras.activations.gelu(x)) if fn is None else fn(x)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_zero_init_residual_starts_as_the_shortcut():
    block = ResidualBlock(4, zero_init_residual=True)
    block.build((None, 5, 5, 4))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(block.bn2.gamma), 0)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(block.bn1.gamma), 1)
    plain = ResidualBlock(4)
    plain.build((None, 5, 5, 4))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(plain.bn2.gamma), 1)


def test_drop_path_drops_whole_branches_in_training_only():
    block = ResidualBlock(4, drop_path_rate=0.5, seed=7, activation="linear")
    x = np.abs(random_input((64, 4, 4, 4)))
    block.build(x.shape)
    randomize_bn_statistics(block)
    inference = keras.ops.convert_to_numpy(block(x, training=False))
    branch = inference - x  # residual branch in inference (linear activation)
    # Nothing is dropped in inference: a second call gives the same output.
    np.testing.assert_array_equal(inference, keras.ops.convert_to_numpy(block(x, training=False)))
    trained = keras.ops.convert_to_numpy(block(x, training=True))
    # In training the BN uses batch statistics, so compare the structure:
    # a dropped sample's output is exactly its input.
    dropped = np.all(np.isclose(trained, x, atol=1e-6), axis=(1, 2, 3))
    assert 10 < dropped.sum() < 54  # about half of 64 samples, per sample
    assert not np.any(np.all(np.isclose(branch, 0), axis=(1, 2, 3)))


def test_drop_path_is_seeded():
    x = random_input((32, 4, 4, 4))
    outs = []
    for _ in range(2):
        keras.utils.set_random_seed(1)
        block = ResidualBlock(4, drop_path_rate=0.5, seed=3)
        outs.append(keras.ops.convert_to_numpy(block(x, training=True)))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_frozen_block_freezes_bn_statistics():
    x = random_input((8, 6, 6, 4)) * 3 + 1
    y = random_input((8, 6, 6, 4))

    def train(trainable):
        keras.utils.set_random_seed(0)
        block = ResidualBlock(4)
        model = keras.Sequential([keras.Input((6, 6, 4)), block])
        block.trainable = trainable
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [keras.ops.convert_to_numpy(w).copy() for w in block.weights]
        model.fit(x, y, batch_size=8, epochs=3, verbose=0)
        after = [keras.ops.convert_to_numpy(w) for w in block.weights]
        moved = [not np.array_equal(b, a) for b, a in zip(before, after, strict=True)]
        return block, moved

    frozen, moved = train(trainable=False)
    assert not any(moved), "a frozen block changed its weights or BN statistics"
    # Frozen BN runs in inference mode even when called with training=True.
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(frozen(x, training=True)),
        keras.ops.convert_to_numpy(frozen(x, training=False)),
    )
    # The same training on a trainable block does move the statistics.
    trained, moved = train(trainable=True)
    assert all(moved)
    assert not np.allclose(
        keras.ops.convert_to_numpy(trained(x, training=True)),
        keras.ops.convert_to_numpy(trained(x, training=False)),
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_residual_add_in_compute_dtype(policy):
    block = ResidualBlock(8, strides=2, dtype=policy)
    x = random_input((2, 8, 8, 4))
    y = block(x, training=True)
    compute = policy.split("_")[1]
    assert keras.backend.standardize_dtype(y.dtype) == compute
    assert block.compute_dtype == compute
    for sub in block._flatten_layers(include_self=False):
        assert sub.compute_dtype == compute, sub.name
    assert {keras.backend.standardize_dtype(w.dtype) for w in block.weights} == {"float32"}


def test_sequential_without_input_builds_on_first_call():
    model = keras.Sequential([ResidualBlock(8), ResidualBlock(16, strides=2)])
    y = model(random_input((2, 8, 8, 8)))
    assert tuple(y.shape) == (2, 4, 4, 16)
    assert len(model.weights) == 10 + 15


def test_channels_first_matches_channels_last():
    """Same weights, transposed input: the same output, transposed."""
    x = random_input((2, 9, 9, 4))
    last = ResidualBlock(8, strides=2, data_format="channels_last")
    first = ResidualBlock(8, strides=2, data_format="channels_first")
    last.build(x.shape)
    first.build((2, 4, 9, 9))
    randomize_bn_statistics(last)
    first.set_weights(last.get_weights())
    y_last = keras.ops.convert_to_numpy(last(x, training=False))
    y_first = keras.ops.convert_to_numpy(first(x.transpose(0, 3, 1, 2), training=False))
    np.testing.assert_allclose(y_first.transpose(0, 2, 3, 1), y_last, rtol=1e-5, atol=1e-5)


def test_data_format_none_follows_keras_config():
    keras.config.set_image_data_format("channels_first")
    block = ResidualBlock(4)
    assert block.data_format == "channels_first"
    assert tuple(block(random_input((1, 2, 5, 5))).shape) == (1, 4, 5, 5)


def test_regularizer_and_initializer_serialize():
    block = ResidualBlock(
        4,
        kernel_initializer=keras.initializers.HeUniform(seed=3),
        kernel_regularizer=keras.regularizers.L2(1e-4),
    )
    config = block.get_config()
    assert config["kernel_initializer"]["class_name"] == "HeUniform"
    assert config["kernel_regularizer"]["class_name"] == "L2"
    clone = ResidualBlock.from_config(config)
    clone.build((None, 4, 4, 2))
    assert len(clone.losses) == 3  # one L2 penalty per kernel, projection included
