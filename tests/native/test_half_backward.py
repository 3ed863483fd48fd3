"""float16 / bfloat16 backward: dx is as accurate as rounding allows.

The training backward computes g = dy * act'(z) in a first pass and turns it
into dx = gamma * invstd / m * (m g - sum(g) - xhat sum(g xhat)) in a
second. Were the second pass to read g back rounded to the tensor dtype (as
dresidual or a scratch copy in dx), dx would carry that rounding, amplified
by the cancellation, and sum(dx) over a channel would no longer be ~0; the
kernels recompute g in float instead. Checked on the CPU kernels through the
framework-free ``_core`` module, against float64 NumPy computed from the same
rounded inputs: the kernels' error may be at most 1.5 times that of rounding
the float64 result itself to the dtype.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from keras_residual.native._build import NativeUnavailable

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="framework-free: runs once, with the default backend",
)

ACTIVATIONS = ["linear", "relu", "leaky_relu", "relu6", "silu", "gelu"]
EPSILON = 1e-3
ALPHA = 0.2
SHAPE = (8, 7, 5, 16)  # NHWC
FACTOR = 1.5


@pytest.fixture(scope="module")
def core():
    from keras_residual.native.core import load_core

    try:
        return load_core()
    except NativeUnavailable as error:
        pytest.skip(f"the native core module cannot be built here: {error}")


def round_to(values, dtype):
    """float64 values rounded to the dtype (as the kernels store them), as the
    kernels' input array and as float64."""
    values = np.asarray(values, dtype=np.float64)
    if dtype == "float16":
        stored = values.astype(np.float16)
        return stored, stored.astype(np.float64)
    f = values.astype(np.float32)
    u = f.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def as64(array, dtype):
    if dtype == "bfloat16":
        return (np.asarray(array).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(array, dtype=np.float64)


_erf = np.frompyfunc(math.erf, 1, 1)


def act_grad(z, name):
    if name == "linear":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, ALPHA)
    if name == "relu6":
        return ((z > 0) & (z < 6)).astype(np.float64)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64))
    return cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def bn_backward_reference(dy, x, r, gamma, beta, axes, shape_c):
    """float64 dx and g of the training forward, with the exact batch statistics."""
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    invstd = 1.0 / np.sqrt(var + EPSILON)
    xhat = (x - mean) * invstd
    z = gamma.reshape(shape_c) * xhat + beta.reshape(shape_c)
    if r is not None:
        z = z + r
    return z, xhat, invstd


def rms_relative(actual, reference):
    return float(np.sqrt(np.mean((actual - reference) ** 2)) / np.sqrt(np.mean(reference**2)))


def act_forward(z, name):
    if name == "linear":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, ALPHA * z)
    if name == "relu6":
        return np.clip(z, 0.0, 6.0)
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)).astype(np.float64))


def case(dtype, channels_last, residual, seed, name):
    """Inputs rounded to the dtype. dy = y + small noise, the gradient of a
    squared error near its minimum: g is then mostly along 1 and xhat, which
    the batch-norm backward removes, so dx is small next to g (where rounding
    g would show most)."""
    rng = np.random.default_rng(seed)
    shape = SHAPE if channels_last else (SHAPE[0], SHAPE[3], SHAPE[1], SHAPE[2])
    c = SHAPE[3]
    shape_c = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    x, x64 = round_to(rng.normal(0.5, 1.5, shape), dtype)
    r, r64 = round_to(rng.normal(0.0, 0.3, shape), dtype) if residual else (None, None)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.normal(0.0, 0.5, c).astype(np.float32)
    xhat = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True) + EPSILON)
    z = gamma.reshape(shape_c) * xhat + beta.reshape(shape_c) + (0.0 if r64 is None else r64)
    dy, dy64 = round_to(act_forward(z, name) + rng.normal(0.0, 0.05, shape), dtype)
    return (x, dy, r), (x64, dy64, r64), gamma, beta


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_batch_norm_backward_dx_is_rounding_accurate(core, dtype, act, channels_last, residual):
    (x, dy, r), (x64, dy64, r64), gamma, beta = case(dtype, channels_last, residual, 7, act)
    flags = {"channels_last": channels_last, "bfloat16": dtype == "bfloat16"}
    mean, var = core.batch_stats(x, **flags)
    dx, dr, _, _ = core.batch_norm_add_act_backward(
        dy, x, mean, var, gamma, beta, r, epsilon=EPSILON, activation=act, alpha=ALPHA, **flags
    )

    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    shape_c = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
    z, xhat, invstd = bn_backward_reference(dy64, x64, r64, gamma, beta, axes, shape_c)
    g = dy64 * act_grad(z, act)
    m = x64.size // gamma.size
    dbeta = g.sum(axes, keepdims=True)
    dgamma = (g * xhat).sum(axes, keepdims=True)
    ref = gamma.reshape(shape_c) * invstd / m * (m * g - dbeta - xhat * dgamma)

    _, rounded = round_to(ref, dtype)
    rounding_error = rms_relative(rounded, ref)
    error = rms_relative(as64(dx, dtype), ref)
    assert error <= FACTOR * rounding_error, (
        f"dx RMS relative error {error:.3g} > {FACTOR} x {rounding_error:.3g} (rounding alone)"
    )
    # With the batch's own statistics dx sums to 0 over each channel: the sums
    # of the kernels' dx stay within the spread of the sums of the rounded
    # reference (the float32 or rounded-g sums would drift).
    sums = as64(dx, dtype).sum(axes)
    rounded_sums = rounded.sum(axes)
    assert np.sqrt(np.mean(sums**2)) <= 2.0 * np.sqrt(np.mean(rounded_sums**2)) + 1e-6
    if residual:
        _, g_rounded = round_to(g, dtype)
        np.testing.assert_allclose(as64(dr, dtype), g_rounded, rtol=0, atol=1e-2 * np.abs(g).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_scale_shift_backward_dx_is_rounding_accurate(core, dtype, act, channels_last):
    (x, dy, r), (x64, dy64, r64), scale, shift = case(dtype, channels_last, True, 8, act)
    flags = {"channels_last": channels_last, "bfloat16": dtype == "bfloat16"}
    dx, dr, _, _ = core.scale_shift_add_act_backward(
        dy, x, scale, shift, r, activation=act, alpha=ALPHA, **flags
    )
    shape_c = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
    z = x64 * scale.reshape(shape_c) + shift.reshape(shape_c) + r64
    g = dy64 * act_grad(z, act)
    for name, got, ref in (("dx", dx, g * scale.reshape(shape_c)), ("dresidual", dr, g)):
        _, rounded = round_to(ref, dtype)
        rounding_error = rms_relative(rounded, ref)
        error = rms_relative(as64(got, dtype), ref)
        assert error <= FACTOR * rounding_error, (
            f"{name} RMS relative error {error:.3g} > {FACTOR} x {rounding_error:.3g}"
        )
