"""NaN and +-inf through the native kernels give what the composite path gives.

A diverging run must not look healthy on the native path: every activation
propagates NaN forward and backward, a NaN or inf in a channel makes its
batch statistics (and so all of its outputs) NaN, and the NaN / +inf / -inf
of every output and gradient sit where the composite path (Keras ops, the
framework's autodiff) puts them.

Three levels:

- the CPU kernels through the framework-free ``_core`` module, against NumPy
  formulas of the composite path (run once, under the default TensorFlow
  backend, like ``test_kernels_numpy.py``);
- the adapter of the active backend (TensorFlow ops under TensorFlow, torch
  ops under torch, FFI handlers under JAX) against the composite formulas
  run by that framework, the gradients by its autodiff;
- ``conv_bn_add_act`` native against composite, and a model trained with
  ``TerminateOnNaN`` on data holding a NaN.

The frameworks differ where a gradient meets a non-finite value, and each
adapter follows its own (``GradRule`` in ``kernels.h``): TensorFlow
multiplies, ``dy * relu'(z)`` (a NaN or inf ``dy`` gives NaN even where
``z <= 0``; ``relu'(NaN) = 0``), PyTorch selects (0 where ``z <= 0``; ``dy``
where ``z`` is NaN), JAX differentiates the composite formulas term by term
(relu selects ``dy`` where ``z > 0``, 0 elsewhere, NaN included; silu is
``dy * s + (dy * z) * s * (1 - s)``, NaN where an inf ``dy`` makes the terms
opposite infinities).
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from keras import ops

from keras_residual import native
from keras_residual.native._build import ACTIVATION_CODES, NativeUnavailable
from tests.helpers import backend_vjp

BACKEND = keras.config.backend()
ACTIVATIONS = ["linear", "relu", "leaky_relu", "relu6", "silu", "gelu"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
ALPHA = 0.2
EPSILON = 1e-3
NAN, INF = float("nan"), float("inf")
# z values: every special value, both zeros, both sides of the relu6 kink,
# and beyond the range where exp over- or underflows in float32.
SPECIAL_Z = [NAN, INF, -INF, 0.0, -0.0, 1.0, -1.0, 3.0, -3.0, 7.0, -7.0, 100.0, -100.0]
# dy values that meet every z: finite ones and the non-finite ones.
SPECIAL_DY = [1.0, NAN, INF, -INF, -2.0, 0.0, 0.5]

framework_free = pytest.mark.skipif(
    BACKEND != "tensorflow", reason="framework-free: runs once, with the default backend"
)
with_adapter = pytest.mark.skipif(
    BACKEND not in native.ADAPTERS, reason=f"no native adapter on the {BACKEND} backend"
)


@pytest.fixture(scope="module")
def core():
    from keras_residual.native.core import load_core

    try:
        return load_core()
    except NativeUnavailable as error:
        pytest.skip(f"the native core module cannot be built here: {error}")


@pytest.fixture(scope="module")
def adapter():
    try:
        return native.adapter(BACKEND)
    except NativeUnavailable as error:
        pytest.skip(f"native adapter unavailable here: {str(error).splitlines()[0]}")


# ------------------------------------------------------------------ helpers --


def to_bf16_bits(a):
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)


def from_bf16_bits(b):
    return (np.asarray(b).astype(np.uint32) << 16).view(np.float32)


def make(values, dtype):
    """Values in the kernels' storage (bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        return to_bf16_bits(values)
    return np.ascontiguousarray(values, dtype=dtype)


def as64(array, dtype):
    if dtype == "bfloat16":
        return from_bf16_bits(array).astype(np.float64)
    return np.asarray(array, dtype=np.float64)


def param_dtype(dtype):
    return np.float64 if dtype == "float64" else np.float32


def kinds(a):
    """Where an array is NaN, +inf and -inf (the thing every test compares)."""
    a = np.asarray(a, dtype=np.float64)
    return np.isnan(a), np.isposinf(a), np.isneginf(a)


def assert_same_nonfinite(actual, expected, name):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    for label, got, want in zip(
        ("NaN", "+inf", "-inf"), kinds(actual), kinds(expected), strict=True
    ):
        where = np.argwhere(got != want)
        assert not where.size, (
            f"{name}: {label} at {got.sum()} places, composite at {want.sum()}; first "
            f"difference at {tuple(where[0])}: {actual[tuple(where[0])]} vs "
            f"{expected[tuple(where[0])]}"
        )


def assert_same_finiteness(actual, expected, name):
    """Non-finite in the same places (where NaN and inf may trade places)."""
    got = ~np.isfinite(np.asarray(actual, dtype=np.float64))
    want = ~np.isfinite(np.asarray(expected, dtype=np.float64))
    where = np.argwhere(got != want)
    assert not where.size, (
        f"{name}: non-finite at {got.sum()} places, composite at {want.sum()}; first "
        f"difference at {tuple(where[0])}"
    )


def assert_finite_close(actual, expected, name, tol):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    finite = np.isfinite(expected) & np.isfinite(actual)
    scale = max(1.0, float(np.max(np.abs(expected[finite]), initial=0.0)))
    error = float(np.max(np.abs(actual[finite] - expected[finite]), initial=0.0))
    assert error <= tol * scale, f"{name}: max error {error:.3g} on the finite values"


_erf = np.frompyfunc(math.erf, 1, 1)


def erf(z):
    return _erf(z).astype(z.dtype)


def compute(values, dtype):
    """values in the arithmetic type of the frameworks' float32 kernels (float64 for float64),
    so that exp over- and underflows where theirs does."""
    return np.asarray(values, dtype=np.float64 if dtype == "float64" else np.float32)


def act_np(z, name, alpha=ALPHA):
    """The composite forward (keras.activations) in NumPy, in z's precision."""
    alpha = z.dtype.type(alpha)
    with np.errstate(all="ignore"):
        if name == "linear":
            return z
        if name == "relu":
            return np.maximum(z, 0.0)
        if name == "leaky_relu":
            return np.where(z > 0, z, alpha * z)
        if name == "relu6":
            return np.minimum(np.maximum(z, 0.0), 6.0)
        one = z.dtype.type(1)
        if name == "silu":
            return z / (one + np.exp(-z))
        return z.dtype.type(0.5) * z * (one + erf(z / z.dtype.type(math.sqrt(2.0))))


def act_backward_np(dy, z, name, rule, alpha=ALPHA):
    """dy * act'(z) as PyTorch ("select"), TensorFlow ("multiply") or JAX ("termwise")
    computes it."""
    alpha = z.dtype.type(alpha)
    one = z.dtype.type(1)
    with np.errstate(all="ignore"):
        if name == "linear":
            return dy * one
        if name == "relu":
            if rule == "select":
                return np.where(z <= 0, 0.0, dy)
            if rule == "termwise":  # jax.nn.relu's select(z > 0, dy, 0)
                return np.where(z > 0, dy, 0.0)
            return dy * (z > 0)
        if name == "leaky_relu":
            return np.where(z >= 0 if rule == "termwise" else z > 0, dy, dy * alpha)
        if name == "relu6":
            if rule in ("select", "termwise"):  # (z = NaN gives 0, unlike relu)
                return np.where((z > 0) & (z < 6), dy, 0.0)
            return dy * ((z > 0) & (z < 6))
        if name == "silu":
            s = one / (one + np.exp(-z))
            if rule == "termwise":  # z * sigmoid(z) differentiated term by term
                return dy * s + (dy * z) * (s * (one - s))
            return dy * (s * (one + z * (one - s)))
        half = z.dtype.type(0.5)
        cdf = half * (one + erf(z / z.dtype.type(math.sqrt(2.0))))
        pdf = np.exp(-half * z * z) / z.dtype.type(math.sqrt(2.0 * math.pi))
        if rule == "select":
            return dy * (cdf + z * pdf)
        return dy * cdf + (dy * z) * pdf


def special_grid(channels_last=True, with_dy=True):
    """x of shape (2, 1, 13, 3) NHWC holding SPECIAL_Z along W, and dy meeting them."""
    z = np.asarray(SPECIAL_Z, dtype=np.float64)
    x = np.broadcast_to(z[None, None, :, None], (2, 1, z.size, 3)).copy()
    n, h, w, c = x.shape
    idx = np.arange(n * h * w * c).reshape(x.shape)
    dy = np.asarray(SPECIAL_DY)[(idx * 5 + idx // 7) % len(SPECIAL_DY)]
    if not with_dy:
        dy = np.asarray([1.0, -2.0, 0.5, 0.0])[idx % 4]
    if not channels_last:
        x, dy = (np.ascontiguousarray(a.transpose(0, 3, 1, 2)) for a in (x, dy))
    return x, dy


# ======================================================== 1. the CPU kernels --


@framework_free
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_kernel_forward(core, dtype, act, channels_last):
    x64, _ = special_grid(channels_last)
    x = make(x64, dtype)
    c = 3
    shift = np.zeros(c, param_dtype(dtype))
    flags = {"channels_last": channels_last, "bfloat16": dtype == "bfloat16"}
    y = core.scale_shift_add_act(x, None, shift, None, activation=act, alpha=ALPHA, **flags)
    expected = act_np(compute(as64(x, dtype), dtype), act)
    assert_same_nonfinite(as64(y, dtype), expected, f"y ({act}, {dtype})")
    assert_finite_close(as64(y, dtype), expected, "y", 1e-2)


@framework_free
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("rule", ["select", "multiply", "termwise"])
@pytest.mark.parametrize("nonfinite_dy", [False, True], ids=["finite_dy", "nonfinite_dy"])
def test_kernel_backward(core, dtype, act, rule, nonfinite_dy):
    x64, dy64 = special_grid(with_dy=nonfinite_dy)
    x, dy = make(x64, dtype), make(dy64, dtype)
    # A residual that adds a NaN, an inf and -inf + inf = NaN of its own.
    r64 = np.zeros(x64.shape)
    r64[1, 0, 3, :] = NAN
    r64[1, 0, 5, :] = INF
    r64[1, 0, 2, :] = INF
    r = make(r64, dtype)
    pd = param_dtype(dtype)
    scale = np.array([1.0, 0.5, 2.0], pd)
    shift = np.array([0.0, 0.25, -0.5], pd)
    flags = {"bfloat16": dtype == "bfloat16"}
    dx, dr, dscale, dshift = core.scale_shift_add_act_backward(
        dy, x, scale, shift, r, activation=act, alpha=ALPHA, grad_rule=rule, **flags
    )
    xv, dyv, rv = (compute(as64(a, dtype), dtype) for a in (x, dy, r))
    with np.errstate(all="ignore"):
        z = xv * scale + shift + rv
        g = act_backward_np(dyv, z, act, rule)
        expected = {
            "dx": g * scale,
            "dresidual": g,
            "dscale": (g * xv).sum((0, 1, 2)),
            "dshift": g.sum((0, 1, 2)),
        }
    got = {"dx": as64(dx, dtype), "dresidual": as64(dr, dtype), "dscale": dscale, "dshift": dshift}
    for name, value in got.items():
        assert_same_nonfinite(value, expected[name], f"{name} ({act}, {rule}, {dtype})")
    assert_finite_close(got["dresidual"], expected["dresidual"], "dresidual", 1e-2)


def _channel_cases():
    """x (4, 3, 2, 6) NHWC: channel 0 NaN inside, 1 +inf inside, 2 +inf first,
    3 -inf first, 4 +inf and -inf, 5 finite; and the composite statistics."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, (4, 3, 2, 6))
    x[2, 1, 0, 0] = NAN
    x[3, 2, 1, 1] = INF
    x[0, 0, 0, 2] = INF
    x[0, 0, 0, 3] = -INF
    x[1, 0, 0, 4], x[2, 2, 1, 4] = INF, -INF
    mean = np.array([NAN, INF, INF, -INF, NAN, x[..., 5].mean()])
    var = np.array([NAN] * 5 + [x[..., 5].var()])
    return x, mean, var


@framework_free
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_kernel_batch_stats_keep_nan_and_inf(core, dtype, channels_last):
    x64, expected_mean, expected_var = _channel_cases()
    if not channels_last:
        x64 = np.ascontiguousarray(x64.transpose(0, 3, 1, 2))
    x = make(x64, dtype)
    mean, var = core.batch_stats(x, channels_last=channels_last, bfloat16=dtype == "bfloat16")
    # The composite path: mean = sum / m, var = mean((x - mean)^2) (or E[x^2] - mean^2).
    assert_same_nonfinite(mean, expected_mean, "mean")
    assert_same_nonfinite(var, expected_var, "var")
    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    finite = as64(x, dtype)[..., 5] if channels_last else as64(x, dtype)[:, 5]
    np.testing.assert_allclose(mean[5], finite.mean(), rtol=1e-5)
    np.testing.assert_allclose(var[5], finite.var(), rtol=1e-4)
    del axes


@framework_free
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_kernel_training_nan_channel_is_all_nan(core, act, dtype):
    """A NaN or inf in a channel: its statistics, outputs and gradients are NaN."""
    x64, _, _ = _channel_cases()
    x = make(x64, dtype)
    rng = np.random.default_rng(1)
    dy = make(rng.normal(size=x64.shape), dtype)
    gamma = np.full(6, 1.5, np.float32)
    beta = np.full(6, 0.1, np.float32)
    mean, var = core.batch_stats(x)
    scale = (gamma / np.sqrt(var + EPSILON)).astype(np.float32)
    shift = (beta - mean * scale).astype(np.float32)
    y = as64(core.scale_shift_add_act(x, scale, shift, activation=act), dtype)
    assert np.isnan(y[..., :5]).all()
    assert np.isfinite(y[..., 5]).all()
    for rule in ("select", "multiply", "termwise"):
        dx, _, dgamma, dbeta = core.batch_norm_add_act_backward(
            dy, x, mean, var, gamma, beta, epsilon=EPSILON, activation=act, grad_rule=rule
        )
        dx = as64(dx, dtype)
        assert np.isnan(dx[..., :5]).all(), rule
        assert np.isfinite(dx[..., 5]).all(), rule
        assert np.isnan(dgamma[:5]).all() and np.isfinite(dgamma[5]), rule
        # dbeta = sum(dy * act'(z)) with z = NaN: finite where act'(NaN) is
        # (relu family, linear), NaN for silu and gelu.
        expected_dbeta_nan = act in ("silu", "gelu")
        assert np.isnan(dbeta[:5]).all() == expected_dbeta_nan, (rule, dbeta)
        assert np.isfinite(dbeta[5]), rule


# ============================================== 2. the adapter of the backend --


def _tensor(values, dtype):
    return ops.cast(ops.convert_to_tensor(np.asarray(values, dtype=np.float64)), dtype)


def _np64(t):
    if t is None:
        return None
    if ops.is_tensor(t) and keras.backend.standardize_dtype(t.dtype) != "float64":
        t = ops.cast(t, "float32")
    return np.asarray(ops.convert_to_numpy(t), dtype=np.float64)


def _torch_gelu(x):
    """torch's gelu, with its float64 forward.

    torch's vectorised float32 / float16 / bfloat16 gelu gives NaN at +inf
    where its float64 and scalar paths (and TensorFlow, and the exact
    function) give inf, which the kernels give too. Its backward is torch's
    own.
    """
    import torch

    class Gelu(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            ctx.save_for_backward(z)
            return torch.nn.functional.gelu(z.double()).to(z.dtype)

        @staticmethod
        def backward(ctx, dy):
            (z,) = ctx.saved_tensors
            return torch.ops.aten.gelu_backward(dy, z)

    return Gelu.apply(x)


def _act(name, x):
    if name == "leaky_relu":
        return keras.activations.leaky_relu(x, negative_slope=ALPHA)
    if name == "gelu" and BACKEND == "torch":
        return _torch_gelu(x)
    return keras.activations.get(name)(x)


def _epilogue_inputs(dtype, nonfinite_dy):
    x64, dy64 = special_grid(with_dy=nonfinite_dy)
    r64 = np.zeros(x64.shape)
    r64[1, 0, 3, :] = NAN
    r64[1, 0, 5, :] = INF
    r64[1, 0, 2, :] = INF
    pd = "float64" if dtype == "float64" else "float32"
    return {
        "x": _tensor(x64, dtype),
        "scale": _tensor([1.0, 0.5, 2.0], pd),
        "shift": _tensor([0.0, 0.25, -0.5], pd),
        "residual": _tensor(r64, dtype),
    }, _tensor(dy64, dtype)


# The activations whose composite gradient the backend computes in float16 /
# bfloat16 term by term, where a term underflows to 0 (inf * 0 = NaN for an
# inf dy) that the kernels, computing in float32, keep.
HALF_UNDERFLOW = {
    "tensorflow": {"gelu": "phi(z) underflows to 0 beyond |z| ~ 6"},
    "jax": {
        "gelu": "phi(z) underflows to 0 beyond |z| ~ 6",
        "silu": "1 - s rounds to 0 beyond z ~ 6 (bfloat16) or 8 (float16)",
    },
}


def _skip_inf_dy_through_half_composite(act, dtype, nonfinite_dy):
    underflow = HALF_UNDERFLOW.get(BACKEND, {}).get(act)
    if underflow and nonfinite_dy and dtype in ("float16", "bfloat16"):
        pytest.skip(
            f"{BACKEND} differentiates the composite {act} in float16 / bfloat16, where "
            f"{underflow} (inf * 0 = NaN for an inf dy); the kernels compute in float32"
        )


@with_adapter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("nonfinite_dy", [False, True], ids=["finite_dy", "nonfinite_dy"])
def test_adapter_epilogue(adapter, dtype, act, nonfinite_dy):
    _skip_inf_dy_through_half_composite(act, dtype, nonfinite_dy)
    inputs, dy = _epilogue_inputs(dtype, nonfinite_dy)
    code = ACTIVATION_CODES[act]

    def run_native(x, scale, shift, residual):
        return adapter.scale_shift_add_act(
            x, scale, shift, residual, activation=code, alpha=ALPHA, channels_last=True
        )

    def run_composite(x, scale, shift, residual):
        z = ops.cast(ops.cast(x, scale.dtype) * scale + shift, x.dtype)
        return _act(act, z + residual)

    y, grads = backend_vjp(run_native, inputs, dy)
    y_ref, grads_ref = backend_vjp(run_composite, inputs, dy)
    assert_same_nonfinite(_np64(y), _np64(y_ref), f"y ({act}, {dtype})")
    assert_finite_close(_np64(y), _np64(y_ref), "y", 5e-2)
    for name in grads_ref:
        assert_same_nonfinite(
            _np64(grads[name]), _np64(grads_ref[name]), f"d{name} ({act}, {dtype})"
        )


def _train_inputs(dtype, dy_kind):
    x64, _, _ = _channel_cases()
    rng = np.random.default_rng(2)
    dy64 = rng.normal(size=x64.shape)
    if dy_kind == "nan_dy":
        dy64[0, 1, 0, :] = NAN
        dy64[2, 0, 1, :] = NAN
    elif dy_kind == "inf_dy":
        dy64[1, 1, 1, :] = INF
        dy64[3, 0, 1, :] = -INF
    pd = "float64" if dtype == "float64" else "float32"
    return {
        "x": _tensor(x64, dtype),
        "gamma": _tensor(np.linspace(0.5, 1.5, 6), pd),
        "beta": _tensor(np.linspace(-0.2, 0.3, 6), pd),
        "residual": _tensor(rng.normal(size=x64.shape), dtype),
    }, _tensor(dy64, dtype)


@with_adapter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dy_kind", ["finite_dy", "nan_dy", "inf_dy"])
def test_adapter_training(adapter, dtype, act, dy_kind):
    inputs, dy = _train_inputs(dtype, dy_kind)
    code = ACTIVATION_CODES[act]

    def run_native(x, gamma, beta, residual):
        return adapter.bn_add_act_train(
            x,
            gamma,
            beta,
            residual,
            epsilon=EPSILON,
            activation=code,
            alpha=ALPHA,
            channels_last=True,
        )

    def run_composite(x, gamma, beta, residual):
        # As conv_bn_add_act's composite path: BatchNormalization in float32
        # (float64 for float64), then the add and the activation in x's dtype.
        compute = "float64" if dtype == "float64" else "float32"
        xc = ops.cast(x, compute)
        mean, var = ops.moments(xc, axes=[0, 1, 2])
        z = ops.batch_normalization(
            xc, mean, var, axis=-1, offset=beta, scale=gamma, epsilon=EPSILON
        )
        return _act(act, ops.cast(z, x.dtype) + residual), mean, var

    (y, mean, var), grads = backend_vjp(run_native, inputs, dy)
    (y_ref, mean_ref, var_ref), grads_ref = backend_vjp(run_composite, inputs, dy)
    assert_same_nonfinite(_np64(mean), _np64(mean_ref), "mean")
    assert_same_nonfinite(_np64(var), _np64(var_ref), "var")
    assert_same_nonfinite(_np64(y), _np64(y_ref), f"y ({act}, {dtype})")
    assert np.isnan(_np64(y)[..., :5]).all()
    # An inf dy turns the batch-norm gradients of its channel into inf - inf
    # or inf * x, NaN or +-inf depending on how the formula is written (the
    # composite paths differentiate x * inv + (beta - mean * inv) and, on
    # torch, var = E[x^2] - mean^2; the kernels sum g * (x - mean)). There
    # non-finite must stay non-finite; NaN may read inf.
    same = assert_same_finiteness if dy_kind == "inf_dy" else None
    for name in grads_ref:
        check = same if same is not None and name in ("x", "gamma") else assert_same_nonfinite
        check(_np64(grads[name]), _np64(grads_ref[name]), f"d{name} ({act}, {dtype})")


# ========================================= 3. conv_bn_add_act and training --


def _formats():
    return ["channels_last"] if BACKEND == "tensorflow" else ["channels_last", "channels_first"]


def _conv_case(data_format, value, seed=0):
    from keras_residual.ops import conv_bn_add_act  # noqa: F401 - import check

    rng = np.random.default_rng(seed)
    n, h, w, c, filters = 2, 5, 5, 3, 4
    x = rng.normal(size=(n, h, w, c))
    x[1, 2, 3, 1] = value
    if data_format == "channels_first":
        x = x.transpose(0, 3, 1, 2)
    out_shape = (n, h, w, filters) if data_format == "channels_last" else (n, filters, h, w)
    inputs = {
        "inputs": _tensor(x, "float32"),
        "kernel": _tensor(rng.normal(0, 0.3, (3, 3, c, filters)), "float32"),
        "gamma": _tensor(rng.uniform(0.5, 1.5, filters), "float32"),
        "beta": _tensor(rng.normal(0, 0.2, filters), "float32"),
        "residual": _tensor(rng.normal(size=out_shape), "float32"),
    }
    constants = {
        "moving_mean": rng.normal(0, 0.2, filters).astype("float32"),
        "moving_variance": rng.uniform(0.5, 2.0, filters).astype("float32"),
        "bias": rng.normal(0, 0.2, filters).astype("float32"),
    }
    dy = _tensor(rng.normal(size=out_shape), "float32")
    return inputs, constants, dy


@with_adapter
@pytest.mark.parametrize("data_format", _formats())
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_conv_bn_add_act_native_equals_composite(adapter, data_format, act, training, value):
    from keras_residual.ops import conv_bn_add_act

    inputs, constants, dy = _conv_case(data_format, value)
    results = {}
    for implementation in ("native", "composite"):

        def run(implementation=implementation, **tensors):
            return conv_bn_add_act(
                **tensors,
                **constants,
                activation=act,
                negative_slope=ALPHA,
                epsilon=EPSILON,
                training=training,
                data_format=data_format,
                implementation=implementation,
            )

        results[implementation] = backend_vjp(run, inputs, dy)
    (native_out, native_grads), (composite_out, composite_grads) = results.values()
    native_out = native_out if training else (native_out,)
    composite_out = composite_out if training else (composite_out,)
    check = assert_same_nonfinite
    if BACKEND == "torch" and act == "gelu" and np.isinf(value):
        # torch's vectorised float32 gelu is NaN at +inf, the kernels (and
        # torch's float64 gelu, and TensorFlow) inf: both non-finite.
        check = assert_same_finiteness
    for name, a, b in zip(("y", "mean", "var"), native_out, composite_out, strict=False):
        check(_np64(a), _np64(b), f"{name} ({act})")
    if np.isnan(value):
        assert np.isnan(_np64(native_out[0])).any()  # the NaN reached the output
    for name in composite_grads:
        check(_np64(native_grads[name]), _np64(composite_grads[name]), f"d{name} ({act})")


@with_adapter
@pytest.mark.parametrize("act", ["relu", "relu6", "gelu"])
def test_terminate_on_nan_stops_native_like_composite(adapter, act):
    """A NaN in the third batch: the loss is NaN there and training stops, natively too."""
    from keras_residual import ResidualBlock

    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 6, 6, 4)).astype("float32")
    x[9, 2, 2, 1] = np.nan  # batch 2 of 3 (batch size 4)
    y = rng.integers(0, 3, size=(12,))
    seen = {}
    for implementation in ("native", "composite"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6, 6, 4)),
                ResidualBlock(4, activation=act, implementation=implementation),
                keras.layers.GlobalAveragePooling2D(),
                keras.layers.Dense(3),
            ]
        )
        model.compile(
            optimizer="sgd",
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses = seen[implementation] = []
        history = model.fit(
            x,
            y,
            batch_size=4,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[
                keras.callbacks.LambdaCallback(
                    on_train_batch_end=lambda batch, logs, out=losses: out.append(
                        float(logs["loss"])
                    )
                ),
                keras.callbacks.TerminateOnNaN(),
            ],
        )
        assert len(history.epoch) == 1, implementation  # stopped in the first epoch
    native_losses, composite_losses = seen["native"], seen["composite"]
    assert len(native_losses) == len(composite_losses) == 3
    assert np.isnan(native_losses[2]) and np.isnan(composite_losses[2])
    assert np.isfinite(native_losses[:2]).all()
    np.testing.assert_allclose(native_losses[:2], composite_losses[:2], rtol=1e-4)
