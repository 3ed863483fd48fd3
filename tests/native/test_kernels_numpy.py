"""The CPU kernels, through the pybind11 ``_core`` module, against NumPy.

Every kernel is compared with a float64 NumPy reference of the formulas in
``csrc/include/keras_residual/kernels.h``; the backward kernels also with
central finite differences in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from keras_residual.native._build import NativeUnavailable

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

try:
    import ml_dtypes
except ImportError:  # pragma: no cover - ml_dtypes comes with JAX and TensorFlow
    ml_dtypes = None

ACTIVATIONS = ["linear", "relu", "leaky_relu", "relu6", "silu", "gelu"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
# Error allowed relative to max(1, max |reference|).
TOLERANCE = {"float32": 2e-5, "float64": 1e-12, "float16": 5e-3, "bfloat16": 4e-2}
EPSILON = 1e-3


@pytest.fixture(scope="module")
def core():
    from keras_residual.native.core import load_core

    try:
        return load_core()
    except NativeUnavailable as error:
        pytest.skip(f"the native core module cannot be built here: {error}")


@pytest.fixture
def threads(core):
    """Restores the kernels' thread count after the test."""
    yield core
    core.set_num_threads(0)


# ----------------------------------------------------------------- helpers --


def to_bf16_bits(a):
    """float32 values -> bfloat16 bit patterns, round to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(b):
    return (np.asarray(b).astype(np.uint32) << 16).view(np.float32)


def make(values, dtype):
    """Values in the tensor dtype (bfloat16: uint16 bits), for the kernels."""
    if dtype == "bfloat16":
        return to_bf16_bits(values)
    return np.ascontiguousarray(values, dtype=dtype)


def as64(array, dtype):
    """A kernel tensor (input or output) as float64 values."""
    if dtype == "bfloat16":
        return from_bf16_bits(array).astype(np.float64)
    return np.asarray(array, dtype=np.float64)


def param_dtype(dtype):
    return np.float64 if dtype == "float64" else np.float32


def flags(dtype, channels_last):
    return {"channels_last": channels_last, "bfloat16": dtype == "bfloat16"}


def channel_axes(channels_last):
    return (0, 1, 2) if channels_last else (0, 2, 3)


def per_channel(v, channels_last):
    v = np.asarray(v, dtype=np.float64)
    return v.reshape((1, 1, 1, -1) if channels_last else (1, -1, 1, 1))


_erf = np.frompyfunc(math.erf, 1, 1)


def erf(z):
    return _erf(z).astype(np.float64)


def act_ref(z, name, alpha=0.2):
    if name == "linear":
        return z
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, alpha * z)
    if name == "relu6":
        return np.clip(z, 0.0, 6.0)
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
    raise AssertionError(name)


def act_grad_ref(z, name, alpha=0.2):
    if name == "linear":
        return np.ones_like(z)
    if name == "relu":
        return (z > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, alpha)
    if name == "relu6":
        return ((z > 0) & (z < 6)).astype(np.float64)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        return cdf + z * pdf
    raise AssertionError(name)


def affine_forward_ref(x, scale, shift, r, act, channels_last, alpha=0.2):
    scale = 1.0 if scale is None else per_channel(scale, channels_last)
    z = x * scale + per_channel(shift, channels_last)
    if r is not None:
        z = z + r
    return act_ref(z, act, alpha)


def affine_backward_ref(dy, x, scale, shift, r, act, channels_last, alpha=0.2):
    axes = channel_axes(channels_last)
    s = 1.0 if scale is None else per_channel(scale, channels_last)
    z = x * s + per_channel(shift, channels_last)
    if r is not None:
        z = z + r
    g = dy * act_grad_ref(z, act, alpha)
    return g * s, g, (g * x).sum(axes), g.sum(axes)


def bn_forward_ref(x, gamma, beta, r, act, channels_last, eps=EPSILON, alpha=0.2):
    axes = channel_axes(channels_last)
    mean = x.mean(axes, keepdims=True)
    var = x.var(axes, keepdims=True)
    z = per_channel(gamma, channels_last) * (x - mean) / np.sqrt(var + eps)
    z = z + per_channel(beta, channels_last)
    if r is not None:
        z = z + r
    return act_ref(z, act, alpha)


def bn_backward_ref(dy, x, mean, var, gamma, beta, r, act, channels_last, eps=EPSILON, alpha=0.2):
    axes = channel_axes(channels_last)
    mean, var = per_channel(mean, channels_last), per_channel(var, channels_last)
    gamma_b, beta_b = per_channel(gamma, channels_last), per_channel(beta, channels_last)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * invstd
    z = gamma_b * xhat + beta_b
    if r is not None:
        z = z + r
    g = dy * act_grad_ref(z, act, alpha)
    dbeta = g.sum(axes)
    dgamma = (g * xhat).sum(axes)
    m = x.size // x.shape[3 if channels_last else 1]
    dx = (
        gamma_b
        * invstd
        / m
        * (m * g - per_channel(dbeta, channels_last) - xhat * per_channel(dgamma, channels_last))
    )
    return dx, g, dgamma, dbeta


def assert_close(actual, expected, dtype, name, factor=1.0):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, name
    scale = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    error = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert error <= TOLERANCE[dtype] * factor * scale, (
        f"{name}: max error {error:.3g} > {TOLERANCE[dtype] * factor * scale:.3g} ({dtype})"
    )


def random_case(rng, shape, dtype, channels_last, residual=True):
    """Inputs rounded to the dtype, and their float64 values."""
    c = shape[3] if channels_last else shape[1]
    x = make(rng.normal(0.5, 1.5, shape), dtype)
    r = make(rng.normal(0.0, 1.0, shape), dtype) if residual else None
    dy = make(rng.normal(0.0, 1.0, shape), dtype)
    pd = param_dtype(dtype)
    gamma = rng.uniform(0.5, 1.5, c).astype(pd)
    beta = rng.normal(0.0, 0.5, c).astype(pd)
    return x, r, dy, gamma, beta


def nhwc(shape_nhwc, channels_last):
    n, h, w, c = shape_nhwc
    return shape_nhwc if channels_last else (n, c, h, w)


# ------------------------------------------------------------- statistics --

SHAPES = [(2, 5, 7, 17), (1, 1, 1, 3), (3, 1, 1, 5), (1, 4, 4, 33), (4, 6, 6, 8), (2, 3, 3, 1100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_stats(core, dtype, channels_last, shape):
    rng = np.random.default_rng(1)
    x = make(rng.normal(0.3, 2.0, nhwc(shape, channels_last)), dtype)
    mean, var = core.batch_stats(x, **flags(dtype, channels_last))
    assert mean.dtype == param_dtype(dtype) and var.dtype == param_dtype(dtype)
    x64 = as64(x, dtype)
    axes = channel_axes(channels_last)
    tol = "float64" if dtype == "float64" else "float32"
    assert_close(mean, x64.mean(axes), tol, "mean", factor=2)
    assert_close(var, x64.var(axes), tol, "var", factor=2)


@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_stats_large_offset(core, channels_last):
    rng = np.random.default_rng(2)
    shape = nhwc((8, 16, 16, 5), channels_last)
    noise = rng.normal(0.0, 1e-2, shape)
    x32 = (1000.0 + noise).astype(np.float32)
    mean, var = core.batch_stats(x32, channels_last=channels_last)
    axes = channel_axes(channels_last)
    ref = x32.astype(np.float64)
    np.testing.assert_allclose(mean, ref.mean(axes), rtol=1e-7)
    # The variance (1e-4) is 1e-10 of the squared values: it survives only
    # when accumulated around a shift.
    np.testing.assert_allclose(var, ref.var(axes), rtol=1e-4)

    x64 = 1e6 + rng.normal(0.0, 1e-3, shape)
    mean, var = core.batch_stats(x64, channels_last=channels_last)
    np.testing.assert_allclose(mean, x64.mean(axes), rtol=1e-14)
    np.testing.assert_allclose(var, x64.var(axes), rtol=1e-7)


def test_batch_stats_constant_channel_has_zero_variance(core):
    x = np.full((2, 3, 3, 4), 0.1, dtype=np.float32)
    mean, var = core.batch_stats(x)
    np.testing.assert_allclose(mean, np.float32(0.1))
    np.testing.assert_array_equal(var, 0.0)


# ---------------------------------------------------------------- forward --


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_scale_shift_add_act(core, dtype, act, residual, channels_last):
    rng = np.random.default_rng(3)
    shape = nhwc((2, 5, 3, 17), channels_last)
    x, r, _, scale, shift = random_case(rng, shape, dtype, channels_last, residual)
    y = core.scale_shift_add_act(
        x, scale, shift, r, activation=act, alpha=0.1, **flags(dtype, channels_last)
    )
    assert y.dtype == x.dtype and y.shape == x.shape
    expected = affine_forward_ref(
        as64(x, dtype),
        scale,
        shift,
        None if r is None else as64(r, dtype),
        act,
        channels_last,
        alpha=0.1,
    )
    assert_close(as64(y, dtype), expected, dtype, f"y ({act})")


@pytest.mark.parametrize("shape", SHAPES + [(5, 2, 3, 64), (2, 8, 8, 256)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_scale_shift_add_act_shapes(core, shape, channels_last):
    rng = np.random.default_rng(4)
    shape = nhwc(shape, channels_last)
    x, r, _, scale, shift = random_case(rng, shape, "float32", channels_last)
    y = core.scale_shift_add_act(x, scale, shift, r, activation="relu", channels_last=channels_last)
    expected = affine_forward_ref(
        x.astype(np.float64), scale, shift, r.astype(np.float64), "relu", channels_last
    )
    assert_close(y, expected, "float32", "y")


def test_scale_shift_add_act_without_scale(core):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 3, 3, 6)).astype(np.float32)
    shift = rng.normal(size=6).astype(np.float32)
    y = core.scale_shift_add_act(x, None, shift, activation="linear")
    np.testing.assert_allclose(y, x + shift, rtol=1e-6)


def test_layouts_agree(core):
    rng = np.random.default_rng(6)
    x, r, dy, gamma, beta = random_case(rng, (3, 4, 5, 7), "float32", True)
    to_nchw = (0, 3, 1, 2)
    xt, rt, dyt = (np.ascontiguousarray(a.transpose(to_nchw)) for a in (x, r, dy))
    mean, var = core.batch_stats(x)
    mean_t, var_t = core.batch_stats(xt, channels_last=False)
    np.testing.assert_allclose(mean_t, mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var_t, var, rtol=1e-5)
    out = core.batch_norm_add_act_backward(dy, x, mean, var, gamma, beta, r, activation="gelu")
    out_t = core.batch_norm_add_act_backward(
        dyt, xt, mean, var, gamma, beta, rt, activation="gelu", channels_last=False
    )
    np.testing.assert_allclose(out_t[0], out[0].transpose(to_nchw), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_t[2], out[2], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_t[3], out[3], rtol=1e-4, atol=1e-5)


def test_training_forward_matches_batch_normalization(core):
    """batch_stats + scale_shift_add_act compose into BN + add + act."""
    rng = np.random.default_rng(7)
    x, r, _, gamma, beta = random_case(rng, (4, 5, 5, 9), "float64", True)
    mean, var = core.batch_stats(x)
    scale = gamma / np.sqrt(var + EPSILON)
    shift = beta - mean * scale
    y = core.scale_shift_add_act(x, scale, shift, r, activation="silu")
    expected = bn_forward_ref(x, gamma, beta, r, "silu", True)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------- float16, bfloat16 --


def test_bfloat16_store_rounds_to_nearest_even(core):
    one = 1.0
    ulp = 2.0**-7
    values = np.array([one, one + ulp, 2.0, -one - ulp, -one - 2 * ulp], np.float32)
    x = to_bf16_bits(values).reshape(1, 1, 5, 1)
    # z = x + ulp / 2: halfway between two bfloat16 values for the values
    # near 1 in magnitude, a quarter of the spacing for 2.
    y = core.scale_shift_add_act(x, None, np.array([ulp / 2]), activation="linear", bfloat16=True)
    expected = np.array([one, one + 2 * ulp, 2.0, -one, -one - 2 * ulp], np.float32)
    np.testing.assert_array_equal(from_bf16_bits(y).ravel(), expected)


def test_float16_store_rounds_to_nearest_even_and_overflows(core):
    ulp = 2.0**-10
    x = np.array([1.0, 1.0 + ulp, 60000.0, np.nan, 2.0**-24], np.float16).reshape(1, 1, 5, 1)
    y = core.scale_shift_add_act(x, None, np.array([ulp / 2]), activation="linear")
    assert y.dtype == np.float16
    y = y.ravel()
    assert y[0] == np.float16(1.0)
    assert y[1] == np.float16(1.0 + 2 * ulp)
    assert y[2] == np.float16(60000.0)  # 60000 + 2**-11 rounds back
    assert np.isnan(y[3])
    big = core.scale_shift_add_act(x, None, np.array([10000.0]), activation="linear").ravel()
    assert np.isposinf(big[2])
    # Subnormals survive the round trip.
    sub = core.scale_shift_add_act(x, None, np.array([0.0]), activation="linear").ravel()
    assert sub[4] == np.float16(2.0**-24)


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_ml_dtypes_bfloat16_arrays(core):
    rng = np.random.default_rng(8)
    values = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    x = values.astype(ml_dtypes.bfloat16)
    shift = rng.normal(size=5).astype(np.float32)
    y = core.scale_shift_add_act(x, None, shift, activation="relu")
    assert y.dtype == x.dtype
    bits = core.scale_shift_add_act(
        x.view(np.uint16), None, shift, activation="relu", bfloat16=True
    )
    np.testing.assert_array_equal(y.view(np.uint16), bits)
    mean, _ = core.batch_stats(x)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean((0, 1, 2)), rtol=1e-6)


# --------------------------------------------------------------- backward --


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_norm_add_act_backward(core, dtype, act, residual, channels_last):
    rng = np.random.default_rng(9)
    shape = nhwc((3, 4, 3, 5), channels_last)
    x, r, dy, gamma, beta = random_case(rng, shape, dtype, channels_last, residual)
    mean, var = core.batch_stats(x, **flags(dtype, channels_last))
    dx, dr, dgamma, dbeta = core.batch_norm_add_act_backward(
        dy,
        x,
        mean,
        var,
        gamma,
        beta,
        r,
        epsilon=EPSILON,
        activation=act,
        alpha=0.3,
        **flags(dtype, channels_last),
    )
    assert dx.dtype == x.dtype and dgamma.dtype == param_dtype(dtype)
    x64, dy64 = as64(x, dtype), as64(dy, dtype)
    r64 = None if r is None else as64(r, dtype)
    e_dx, e_g, e_dgamma, e_dbeta = bn_backward_ref(
        dy64, x64, mean, var, gamma, beta, r64, act, channels_last, alpha=0.3
    )
    assert_close(as64(dx, dtype), e_dx, dtype, "dx", factor=2)
    assert_close(dgamma, e_dgamma, dtype, "dgamma", factor=2)
    assert_close(dbeta, e_dbeta, dtype, "dbeta", factor=2)
    if residual:
        assert_close(as64(dr, dtype), e_g, dtype, "dresidual")
    else:
        assert dr is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("with_scale", [True, False])
def test_scale_shift_add_act_backward(core, dtype, act, channels_last, with_scale):
    rng = np.random.default_rng(10)
    shape = nhwc((2, 3, 5, 6), channels_last)
    x, r, dy, scale, shift = random_case(rng, shape, dtype, channels_last)
    scale = scale if with_scale else None
    dx, dr, dscale, dshift = core.scale_shift_add_act_backward(
        dy, x, scale, shift, r, activation=act, **flags(dtype, channels_last)
    )
    e_dx, e_g, e_dscale, e_dshift = affine_backward_ref(
        as64(dy, dtype), as64(x, dtype), scale, shift, as64(r, dtype), act, channels_last
    )
    assert_close(as64(dx, dtype), e_dx, dtype, "dx")
    assert_close(as64(dr, dtype), e_g, dtype, "dresidual")
    assert_close(dshift, e_dshift, dtype, "dshift", factor=2)
    if with_scale:
        assert_close(dscale, e_dscale, dtype, "dscale", factor=2)
    else:
        assert dscale is None


def test_scale_shift_add_act_backward_without_residual(core):
    rng = np.random.default_rng(11)
    x, _, dy, scale, shift = random_case(rng, (2, 3, 3, 4), "float64", True, residual=False)
    dx, dr, dscale, dshift = core.scale_shift_add_act_backward(
        dy, x, scale, shift, activation="relu6"
    )
    assert dr is None
    e_dx, _, e_dscale, e_dshift = affine_backward_ref(dy, x, scale, shift, None, "relu6", True)
    np.testing.assert_allclose(dx, e_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dscale, e_dscale, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dshift, e_dshift, rtol=1e-12, atol=1e-12)


KINKS = {"relu": [0.0], "leaky_relu": [0.0], "relu6": [0.0, 6.0]}


def _away_from_kinks_mask(z, act, distance=1e-3):
    mask = np.ones(z.shape, dtype=bool)
    for k in KINKS.get(act, []):
        mask &= np.abs(z - k) > distance
    return mask


def _away_from_kinks(z, act):
    return bool(_away_from_kinks_mask(z, act).all())


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [True, False])
def test_batch_norm_backward_finite_differences(core, act, channels_last):
    """The training backward is the gradient of BN(x) + r -> act, in float64."""
    rng = np.random.default_rng(12)
    shape = nhwc((2, 2, 3, 3), channels_last)
    for _ in range(20):
        x, r, w, gamma, beta = random_case(rng, shape, "float64", channels_last)
        gamma = gamma * 3.0  # some z beyond 6 for relu6
        mean, var = core.batch_stats(x, channels_last=channels_last)
        z = (x - per_channel(mean, channels_last)) / np.sqrt(
            per_channel(var, channels_last) + EPSILON
        )
        z = per_channel(gamma, channels_last) * z + per_channel(beta, channels_last) + r
        if _away_from_kinks(z, act):
            break

    def loss(x_, r_, gamma_, beta_):
        y = bn_forward_ref(x_, gamma_, beta_, r_, act, channels_last)
        return float(np.sum(y * w))

    dx, dr, dgamma, dbeta = core.batch_norm_add_act_backward(
        w,
        x,
        mean,
        var,
        gamma,
        beta,
        r,
        epsilon=EPSILON,
        activation=act,
        channels_last=channels_last,
    )
    h = 1e-6

    def numeric(array, index):
        plus, minus = array.copy(), array.copy()
        plus[index] += h
        minus[index] -= h
        return plus, minus

    rng_idx = np.random.default_rng(0)
    for _ in range(6):
        index = tuple(int(rng_idx.integers(0, s)) for s in shape)
        xp, xm = numeric(x, index)
        fd = (loss(xp, r, gamma, beta) - loss(xm, r, gamma, beta)) / (2 * h)
        assert dx[index] == pytest.approx(fd, rel=1e-5, abs=1e-6), ("dx", index)
        rp, rm = numeric(r, index)
        fd = (loss(x, rp, gamma, beta) - loss(x, rm, gamma, beta)) / (2 * h)
        assert dr[index] == pytest.approx(fd, rel=1e-5, abs=1e-6), ("dresidual", index)
    for j in range(gamma.size):
        gp, gm = numeric(gamma, j)
        fd = (loss(x, r, gp, beta) - loss(x, r, gm, beta)) / (2 * h)
        assert dgamma[j] == pytest.approx(fd, rel=1e-5, abs=1e-6), ("dgamma", j)
        bp, bm = numeric(beta, j)
        fd = (loss(x, r, gamma, bp) - loss(x, r, gamma, bm)) / (2 * h)
        assert dbeta[j] == pytest.approx(fd, rel=1e-5, abs=1e-6), ("dbeta", j)


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_scale_shift_backward_finite_differences(core, act):
    rng = np.random.default_rng(13)
    shape = (2, 2, 2, 3)
    for _ in range(20):
        x, r, w, scale, shift = random_case(rng, shape, "float64", True)
        scale = scale * 4.0
        if _away_from_kinks(x * scale + shift + r, act):
            break

    def loss(x_, r_, scale_, shift_):
        return float(np.sum(affine_forward_ref(x_, scale_, shift_, r_, act, True) * w))

    dx, dr, dscale, dshift = core.scale_shift_add_act_backward(
        w, x, scale, shift, r, activation=act
    )
    h = 1e-6
    for index in [(0, 0, 0, 0), (1, 1, 0, 2), (0, 1, 1, 1)]:
        xp, xm = x.copy(), x.copy()
        xp[index] += h
        xm[index] -= h
        fd = (loss(xp, r, scale, shift) - loss(xm, r, scale, shift)) / (2 * h)
        assert dx[index] == pytest.approx(fd, rel=1e-5, abs=1e-6)
        rp, rm = r.copy(), r.copy()
        rp[index] += h
        rm[index] -= h
        fd = (loss(x, rp, scale, shift) - loss(x, rm, scale, shift)) / (2 * h)
        assert dr[index] == pytest.approx(fd, rel=1e-5, abs=1e-6)
    for j in range(3):
        sp, sm = scale.copy(), scale.copy()
        sp[j] += h
        sm[j] -= h
        fd = (loss(x, r, sp, shift) - loss(x, r, sm, shift)) / (2 * h)
        assert dscale[j] == pytest.approx(fd, rel=1e-5, abs=1e-6)
        bp, bm = shift.copy(), shift.copy()
        bp[j] += h
        bm[j] -= h
        fd = (loss(x, r, scale, bp) - loss(x, r, scale, bm)) / (2 * h)
        assert dshift[j] == pytest.approx(fd, rel=1e-5, abs=1e-6)


def test_batch_norm_backward_dx_sums_to_zero(core):
    """With the batch's own statistics, dx has no component along 1 or xhat."""
    rng = np.random.default_rng(14)
    x, r, dy, gamma, beta = random_case(rng, (4, 6, 6, 16), "float64", True)
    mean, var = core.batch_stats(x)
    dx, _, _, _ = core.batch_norm_add_act_backward(dy, x, mean, var, gamma, beta, r, epsilon=0.0)
    np.testing.assert_allclose(dx.sum((0, 1, 2)), 0.0, atol=1e-10)
    np.testing.assert_allclose((dx * (x - mean)).sum((0, 1, 2)), 0.0, atol=1e-10)


# ---------------------------------------------------------------- threads --


@pytest.mark.parametrize("channels_last", [True, False])
def test_thread_counts_agree(threads, channels_last):
    core = threads
    rng = np.random.default_rng(15)
    shape = nhwc((8, 16, 16, 48), channels_last)  # large enough to be split
    x, r, dy, gamma, beta = random_case(rng, shape, "float32", channels_last)
    results = []
    for n in (1, 2, 3):
        core.set_num_threads(n)
        assert core.num_threads() == n
        mean, var = core.batch_stats(x, channels_last=channels_last)
        dx, _, dgamma, dbeta = core.batch_norm_add_act_backward(
            dy, x, mean, var, gamma, beta, r, channels_last=channels_last
        )
        results.append((mean, var, dx, dgamma, dbeta))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    core.set_num_threads(0)
    assert core.num_threads() >= 1


def test_build_info(core):
    info = core.build_info()
    assert info["version"].startswith("keras_residual kernels ")
    assert info["cplusplus"] >= 201703
    assert isinstance(info["optimized"], bool)
    assert info["compiler"]
    assert core.version() == info["version"]


# -------------------------------------------------------------- bad input --


def test_bad_input(core):
    x = np.zeros((2, 3, 3, 4), np.float32)
    s = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=r"`x` must be a 4D array.*x.shape=\(3, 3, 4\)"):
        core.batch_stats(x[0])
    with pytest.raises(ValueError, match=r"x.dtype=int32"):
        core.batch_stats(x.astype(np.int32))
    with pytest.raises(ValueError, match=r"`scale` must be a 1D array of length 4.*\(3,\)"):
        core.scale_shift_add_act(x, s[:3], s)
    with pytest.raises(ValueError, match=r"`shift` must be a 1D array of length 4.*shift=None"):
        core.scale_shift_add_act(x, s, None)
    with pytest.raises(ValueError, match=r"`residual` must have the shape of `x`"):
        core.scale_shift_add_act(x, s, s, np.zeros((2, 3, 3, 5), np.float32))
    with pytest.raises(ValueError, match=r"residual.dtype=float64"):
        core.scale_shift_add_act(x, s, s, np.zeros(x.shape))
    with pytest.raises(ValueError, match=r"activation='tanh'"):
        core.scale_shift_add_act(x, s, s, activation="tanh")
    with pytest.raises(ValueError, match=r"bfloat16=True.*x.dtype=float32"):
        core.batch_stats(x, bfloat16=True)
    with pytest.raises(ValueError, match=r"`dy` must have the shape of `x`"):
        core.batch_norm_add_act_backward(x[:1], x, s, s, s, s)
    with pytest.raises(ValueError, match=r"`mean` must be a 1D array of length 4"):
        core.batch_norm_add_act_backward(x, x, s[:2], s, s, s)
    with pytest.raises(ValueError, match=r"`scale` must be a 1D array of length 3"):
        # NCHW: c is 3 here, so a length-4 scale no longer fits.
        core.scale_shift_add_act(x, s, s, channels_last=False)
    with pytest.raises(ValueError, match=r"epsilon=-1"):
        core.batch_norm_add_act_backward(x, x, s, s, s, s, epsilon=-1.0)
    with pytest.raises(ValueError, match=r"num_threads=-1"):
        core.set_num_threads(-1)
    with pytest.raises(ValueError, match=r"grad_rule='max'"):
        core.batch_norm_add_act_backward(x, x, s, s, s, s, grad_rule="max")


def test_non_contiguous_input_is_copied(core):
    rng = np.random.default_rng(16)
    x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    xt = x.transpose(0, 2, 1, 3)  # a view: not C-contiguous
    mean, var = core.batch_stats(xt)
    np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("shape", [(0, 3, 3, 4), (2, 0, 3, 4)], ids=["n0", "h0"])
def test_empty_batch(core, dtype, shape):
    """As the composite path: NaN statistics, empty outputs, dbeta = 0 and
    dgamma = (sum of nothing) * invstd = NaN, zero epilogue gradients."""
    x = np.zeros(shape, dtype)
    mean, var = core.batch_stats(x)
    assert np.isnan(mean).all() and np.isnan(var).all()
    y = core.scale_shift_add_act(x, np.ones(4), np.zeros(4))
    assert y.shape == x.shape
    gamma, beta = np.ones(4), np.zeros(4)
    dx, dr, dgamma, dbeta = core.batch_norm_add_act_backward(
        x, x, mean, var, gamma, beta, x, activation="gelu"
    )
    assert dx.shape == x.shape and dr.shape == x.shape
    np.testing.assert_array_equal(dbeta, np.zeros(4))
    assert np.isnan(dgamma).all()
    dx, dr, dscale, dshift = core.scale_shift_add_act_backward(
        x, x, gamma, beta, x, activation="silu"
    )
    assert dx.shape == x.shape and dr.shape == x.shape
    np.testing.assert_array_equal(dscale, np.zeros(4))
    np.testing.assert_array_equal(dshift, np.zeros(4))


# ---------------------------------------------------------------- property --


if given is not None:

    @settings(max_examples=25, deadline=None)
    @given(
        n=st.integers(1, 3),
        h=st.integers(1, 6),
        w=st.integers(1, 6),
        c=st.integers(1, 40),
        channels_last=st.booleans(),
        act=st.sampled_from(ACTIVATIONS),
        spread=st.floats(0.01, 50.0),
        seed=st.integers(0, 2**32 - 1),
    )
    def test_property_forward_and_backward(core, n, h, w, c, channels_last, act, spread, seed):
        rng = np.random.default_rng(seed)
        shape = nhwc((n, h, w, c), channels_last)
        x = rng.normal(0.0, spread, shape).astype(np.float32)
        r = rng.normal(0.0, 1.0, shape).astype(np.float32)
        dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
        gamma = rng.uniform(0.5, 2.0, c).astype(np.float32)
        beta = rng.normal(0.0, 1.0, c).astype(np.float32)
        mean, var = core.batch_stats(x, channels_last=channels_last)
        x64 = x.astype(np.float64)
        axes = channel_axes(channels_last)
        # The relu family's gradients jump at the kinks, where float32 and
        # float64 may fall on different sides: no gradient flows there.
        z = bn_forward_ref(x64, gamma, beta, r.astype(np.float64), "linear", channels_last)
        dy[~_away_from_kinks_mask(z, act)] = 0.0
        np.testing.assert_allclose(mean, x64.mean(axes), rtol=1e-5, atol=1e-5 * spread)
        np.testing.assert_allclose(var, x64.var(axes), rtol=1e-4, atol=1e-6 * spread**2)
        scale = (gamma / np.sqrt(var.astype(np.float64) + EPSILON)).astype(np.float32)
        shift = (beta - mean * scale).astype(np.float32)
        y = core.scale_shift_add_act(
            x, scale, shift, r, activation=act, channels_last=channels_last
        )
        expected = affine_forward_ref(x64, scale, shift, r.astype(np.float64), act, channels_last)
        assert_close(y, expected, "float32", "y", factor=5)
        dx, dr, dgamma, dbeta = core.batch_norm_add_act_backward(
            dy, x, mean, var, gamma, beta, r, activation=act, channels_last=channels_last
        )
        e_dx, e_g, e_dgamma, e_dbeta = bn_backward_ref(
            dy.astype(np.float64),
            x64,
            mean,
            var,
            gamma,
            beta,
            r.astype(np.float64),
            act,
            channels_last,
        )
        assert_close(dr, e_g, "float32", "dresidual", factor=5)
        assert_close(dbeta, e_dbeta, "float32", "dbeta", factor=20)
        assert_close(dgamma, e_dgamma, "float32", "dgamma", factor=20)
        assert_close(dx, e_dx, "float32", "dx", factor=20)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_forward_and_backward():
        pass
