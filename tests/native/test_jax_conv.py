"""The JAX adapter's own convolution (`_jax.conv2d`) against `keras.ops.conv`.

Forward and gradients (input and kernel) under `jax.jit`, both layouts, every
padding, strides and dilations; that a 1x1 kernel on NHWC input runs as one
matrix product (no convolution in the jitted program) and any other as XLA's
convolution; and which calls of `conv_bn_add_act` run it. Needs no built
library. Runs with KERAS_BACKEND=jax.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="tests the JAX adapter's convolution: runs with KERAS_BACKEND=jax",
)

jax = pytest.importorskip("jax", reason="the JAX adapter needs jax installed")

from keras_residual import native  # noqa: E402
from keras_residual.native import _jax  # noqa: E402
from keras_residual.ops import conv_bn_add_act  # noqa: E402

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

# (input n, h, w, c), (kh, kw), filters, strides, padding, dilation
CASES = [
    ((2, 7, 9, 3), (3, 3), 5, 1, "same", 1),
    ((2, 8, 8, 4), (3, 3), 6, 2, "same", 1),
    ((2, 8, 8, 4), (1, 1), 8, 1, "same", 1),
    ((2, 8, 8, 4), (1, 1), 8, 2, "same", 1),  # the projection shortcut
    ((2, 9, 7, 4), (1, 1), 8, 2, "valid", 1),  # odd sizes
    ((2, 9, 8, 4), (1, 1), 8, (1, 2), "symmetric", 1),
    ((2, 16, 16, 3), (7, 7), 8, 2, "same", 1),  # the stem
    ((2, 16, 16, 3), (7, 7), 8, 2, "symmetric", 1),
    ((2, 10, 9, 4), (3, 3), 4, 1, "same", (2, 1)),
    ((2, 9, 8, 4), (3, 3), 5, 2, "valid", 1),
    ((2, 9, 8, 4), (3, 3), 5, 1, "symmetric", 2),
]


def _tensors(shape, kernel_size, filters, channels_last, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype("float32")
    if not channels_last:
        x = x.transpose(0, 3, 1, 2)
    k = rng.normal(0, 0.3, size=(*kernel_size, shape[-1], filters)).astype("float32")
    return jax.numpy.asarray(x, dtype), jax.numpy.asarray(k, dtype)


def _forward_backward(conv, x, k, seed=1):
    weights = None

    def loss(x, k):
        y = conv(x, k)
        return jax.numpy.sum(y.astype("float32") * weights), y

    y = jax.eval_shape(conv, x, k)
    weights = jax.numpy.asarray(np.random.default_rng(seed).normal(size=y.shape), "float32")
    (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, k)
    return [np.asarray(a, "float32") for a in (y, *grads)]


def _reference(x, k, strides, padding, dilation, data_format):
    """`keras.ops.conv`; "symmetric" as explicit zeros, then "valid"."""
    if padding == "symmetric":
        pad_h, pad_w = (d * (s - 1) // 2 for s, d in zip(k.shape[:2], dilation, strict=True))
        spatial = [(pad_h, pad_h), (pad_w, pad_w)]
        if data_format == "channels_last":
            x = keras.ops.pad(x, [(0, 0), *spatial, (0, 0)])
        else:
            x = keras.ops.pad(x, [(0, 0), (0, 0), *spatial])
        padding = "valid"
    return keras.ops.conv(
        x, k, strides=strides, padding=padding, dilation_rate=dilation, data_format=data_format
    )


def _conv(strides, padding, dilation, channels_last):
    def conv(x, k):
        return _jax.conv2d(
            x,
            k,
            strides=strides,
            padding=padding,
            dilation_rate=dilation,
            channels_last=channels_last,
        )

    return conv


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case[1:])))
def test_equals_keras_conv(case, data_format, dtype):
    shape, kernel_size, filters, strides, padding, dilation = case
    channels_last = data_format == "channels_last"
    dilation = (dilation, dilation) if isinstance(dilation, int) else dilation
    x, k = _tensors(shape, kernel_size, filters, channels_last, dtype)
    ours = _forward_backward(_conv(strides, padding, dilation, channels_last), x, k)
    theirs = _forward_backward(
        lambda x, k: _reference(x, k, strides, padding, dilation, data_format), x, k
    )
    assert ours[0].shape == theirs[0].shape
    for actual, expected, what in zip(ours, theirs, ("output", "d input", "d kernel"), strict=True):
        scale = max(float(np.abs(expected).max()), 1.0)
        error = float(np.abs(actual - expected).max())
        assert error <= TOLERANCE[dtype] * scale, f"{what}: max error {error} > {TOLERANCE[dtype]}"


def _primitives(function, *args):
    jaxpr = jax.make_jaxpr(function)(*args)
    return {equation.primitive.name for equation in jaxpr.jaxpr.eqns}


@pytest.mark.parametrize("strides", [1, 2])
def test_a_1x1_kernel_on_nhwc_is_one_matrix_product(strides):
    x, k = _tensors((2, 6, 6, 8), (1, 1), 16, True, "float32")
    forward = _primitives(_conv(strides, "same", 1, True), x, k)
    assert "dot_general" in forward and "conv_general_dilated" not in forward
    gradient = _primitives(
        jax.grad(lambda x, k: _conv(strides, "same", 1, True)(x, k).sum(), argnums=(0, 1)), x, k
    )
    assert "conv_general_dilated" not in gradient


@pytest.mark.parametrize(
    "kernel_size, channels_last", [((3, 3), True), ((1, 1), False)], ids=["3x3", "1x1-nchw"]
)
def test_other_convolutions_stay_xlas(kernel_size, channels_last):
    x, k = _tensors((2, 6, 6, 8), kernel_size, 16, channels_last, "float32")
    primitives = _primitives(_conv(1, "same", 1, channels_last), x, k)
    assert "conv_general_dilated" in primitives and "dot_general" not in primitives


def test_bad_padding_names_the_argument():
    x, k = _tensors((1, 4, 4, 2), (1, 1), 2, True, "float32")
    with pytest.raises(ValueError, match="padding='causal'"):
        _jax.conv2d(x, k, padding="causal")


def _unit(implementation, training):
    x, k = _tensors((2, 6, 6, 8), (1, 1), 16, True, "float32", seed=3)
    ones, zeros = np.ones(16, "float32"), np.zeros(16, "float32")

    def unit(x, k):
        out = conv_bn_add_act(
            x, k, ones, zeros, zeros, ones, training=training, implementation=implementation
        )
        return out[0] if training else out

    return _primitives(unit, x, k)


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_conv_bn_add_act_runs_it_unless_composite_is_asked_for(training):
    """ "auto" runs the own convolution at inference too, where the epilogue
    stays composite (`AUTO_INFERENCE`); "composite" is Keras' convolution."""
    assert native.own_op("jax", "conv2d") is _jax.conv2d
    assert "conv_general_dilated" not in _unit("auto", training)
    assert "conv_general_dilated" in _unit("composite", training)
