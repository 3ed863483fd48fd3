"""The JAX adapter: XLA FFI handlers under `jax.jit`, `model.fit` and export.

Runs with ``KERAS_BACKEND=jax`` (``tests/native/conftest.py``). What the
other files check on every backend (native against composite eagerly, NaN
and inf, empty batches, threads) they check here too; this file holds what
only JAX has: the custom call inside a jitted program, a Keras fit whose
train step holds it, exports that must not, and the handlers' own checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

from keras_residual import ResidualBlock, native
from keras_residual.native import _build, _jax
from keras_residual.ops import conv_bn_add_act
from tests.helpers import run_fresh_python

TRAIN_TARGET = "keras_residual_bn_add_act_train"


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    try:
        native.adapter("jax")
    except native.NativeUnavailable as error:
        pytest.skip(f"the JAX adapter cannot be built here: {str(error).splitlines()[0]}")


def _case(seed=0, data_format="channels_last"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    residual = rng.normal(size=(2, 6, 6, 5)).astype("float32")
    if data_format == "channels_first":
        x, residual = x.transpose(0, 3, 1, 2), residual.transpose(0, 3, 1, 2)
    arrays = {
        "inputs": x,
        "kernel": rng.normal(0, 0.3, (3, 3, 3, 5)).astype("float32"),
        "gamma": rng.uniform(0.5, 1.5, 5).astype("float32"),
        "beta": rng.normal(0, 0.2, 5).astype("float32"),
        "residual": residual,
    }
    constants = {
        "moving_mean": np.zeros(5, "float32"),
        "moving_variance": np.ones(5, "float32"),
        "bias": rng.normal(0, 0.2, 5).astype("float32"),
    }
    return arrays, constants


def _loss_function(implementation, training, constants, data_format):
    def loss(arrays):
        out = conv_bn_add_act(
            **arrays,
            **constants,
            activation="silu",
            training=training,
            data_format=data_format,
            implementation=implementation,
        )
        y = out[0] if training else out
        # The statistics join the loss as Keras' moving averages use them:
        # without a gradient.
        stats = sum(jnp.sum(jax.lax.stop_gradient(s)) for s in out[1:]) if training else 0.0
        return jnp.sum(y * jnp.linspace(-1.0, 1.0, y.size).reshape(y.shape)) + stats

    return loss


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_jit_value_and_grad_equal_composite(training, data_format):
    arrays, constants = _case(data_format=data_format)
    results = {}
    for implementation in ("native", "composite"):
        loss = _loss_function(implementation, training, constants, data_format)
        step = jax.jit(jax.value_and_grad(loss))
        results[implementation] = step(arrays)
        hlo = step.lower(arrays).as_text()
        assert ("keras_residual_" in hlo) == (implementation == "native"), implementation
    (native_loss, native_grads), (composite_loss, composite_grads) = results.values()
    np.testing.assert_allclose(native_loss, composite_loss, rtol=1e-5)
    for name in arrays:
        np.testing.assert_allclose(
            native_grads[name], composite_grads[name], rtol=1e-4, atol=1e-5, err_msg=name
        )


def _fit(implementation):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 4)),
            ResidualBlock(4, activation="relu", implementation=implementation),
            ResidualBlock(6, strides=2, activation="gelu", implementation=implementation),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 8, 8, 4)).astype("float32")
    y = rng.integers(0, 3, size=(16,))
    history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    return model, history.history["loss"]


def test_fit_runs_the_handlers_and_equals_composite(monkeypatch):
    traced = []
    call = _jax._call
    monkeypatch.setattr(_jax, "_call", lambda target, *a: traced.append(target) or call(target, *a))
    native_model, native_losses = _fit("native")
    assert "bn_add_act_train" in traced and "bn_add_act_backward" in traced, traced
    traced.clear()
    composite_model, composite_losses = _fit("composite")
    assert not traced
    np.testing.assert_allclose(native_losses, composite_losses, rtol=1e-4)
    for a, b in zip(native_model.weights, composite_model.weights, strict=True):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5, err_msg=a.path
        )


def test_export_holds_no_custom_call():
    """An exported program must run without this package: the composite path is traced."""
    arrays, constants = _case()
    inputs = arrays.pop("inputs")

    def infer(x):
        return conv_bn_add_act(x, **arrays, **constants, implementation="native")

    exported = jax.export.export(jax.jit(infer))(inputs)
    assert "keras_residual_" not in exported.mlir_module()
    np.testing.assert_allclose(exported.call(inputs), infer(inputs), rtol=1e-5, atol=1e-6)


def test_adapter_checks_name_the_argument():
    x = np.zeros((2, 3, 3, 4), "float32")
    c = np.ones(4, "float32")
    options = dict(epsilon=1e-3, activation=1, alpha=0.2, channels_last=True)
    with pytest.raises(ValueError, match=r"Received: gamma.shape=\(3,\)"):
        _jax.bn_add_act_train(x, c[:3], c, None, **options)
    with pytest.raises(ValueError, match="Received: activation=9"):
        _jax.bn_add_act_train(x, c, c, None, **{**options, "activation": 9})
    with pytest.raises(ValueError, match="Received: epsilon=0"):
        _jax.bn_add_act_train(x, c, c, None, **{**options, "epsilon": 0})
    with pytest.raises(ValueError, match=r"Received: residual.shape=\(2, 3, 3, 5\)"):
        _jax.bn_add_act_train(x, c, c, np.zeros((2, 3, 3, 5), "float32"), **options)
    with pytest.raises(ValueError, match="Received: x.dtype=int32"):
        _jax.scale_shift_add_act(
            x.astype("int32"), None, c, None, **{k: v for k, v in options.items() if k != "epsilon"}
        )


def test_handler_checks_name_the_argument():
    """The C++ checks, reached by a call that bypasses the Python ones."""
    x = jnp.zeros((2, 3, 3, 4), jnp.float32)
    call = jax.ffi.ffi_call(
        TRAIN_TARGET,
        [jax.ShapeDtypeStruct(x.shape, x.dtype)] + [jax.ShapeDtypeStruct((4,), jnp.float32)] * 2,
    )
    attributes = dict(
        epsilon=np.float64(1e-3),
        activation=np.int32(1),
        alpha=np.float64(0.2),
        channels_last=True,
        has_residual=False,
    )
    with pytest.raises(
        Exception,
        match=r"gamma must be float32 of shape \(4,\).*Received: "
        r"gamma.shape=\(3,\)",
    ):
        jax.block_until_ready(call(x, jnp.ones(3), jnp.ones(4), jnp.zeros(0), **attributes))
    with pytest.raises(Exception, match="Received: activation=7"):
        jax.block_until_ready(
            call(
                x,
                jnp.ones(4),
                jnp.ones(4),
                jnp.zeros(0),
                **{**attributes, "activation": np.int32(7)},
            )
        )


def test_tracers_run_on_the_cpu_handlers():
    seen = []

    @jax.jit
    def f(x):
        seen.append((_jax.device_reason(x), _jax.graph_reason(x)))
        return x

    f(jnp.zeros(3))
    assert seen == [(None, None)]


def test_a_failed_build_falls_back_with_one_warning(tmp_path):
    code = """
        import warnings
        import numpy as np
        from keras_residual.ops import conv_bn_add_act
        rng = np.random.default_rng(0)
        args = dict(
            kernel=rng.normal(size=(3, 3, 3, 4)).astype("float32"),
            gamma=np.ones(4, "float32"), beta=np.zeros(4, "float32"),
            moving_mean=np.zeros(4, "float32"), moving_variance=np.ones(4, "float32"),
            training=True,
        )
        x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            auto = [conv_bn_add_act(x, **args)[0] for _ in range(2)]
        composite = conv_bn_add_act(x, **args, implementation="composite")[0]
        for y in auto:
            np.testing.assert_allclose(y, composite, rtol=1e-6)
        messages = [str(w.message) for w in caught if "native kernels" in str(w.message)]
        print(len(messages), messages[0])
    """
    out = run_fresh_python(
        code,
        env={
            "KERAS_BACKEND": "jax",
            "CXX": "/nonexistent",
            "KERAS_RESIDUAL_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    assert out.startswith("1 keras_residual: native kernels unavailable on jax"), out
    assert "composite path" in out


# -- the CUDA handlers: compiled and linked here, run only where JAX has CUDA --


def test_gencode_flags_give_machine_code_per_arch_and_ptx_for_the_newest():
    assert _jax.gencode_flags(["80", "90"]) == [
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-gencode",
        "arch=compute_90,code=compute_90",
    ]


def test_without_cuda_devices_the_status_says_why_and_gpu_arrays_fall_back():
    if jax.default_backend() != "cpu":
        pytest.skip("this JAX has a GPU: the CUDA handlers are what it loads")
    info = _jax.status()
    assert info["loaded"] and not info["cuda_compiled"]
    assert info["cuda_reason"] == "jax has no CUDA devices"
    assert _jax.device_reason(jnp.ones(2)) is None
    assert _jax.CUDA_SYMBOLS["KrJaxBnAddActTrain"] == "KrJaxCudaBnAddActTrain"


@pytest.mark.skipif(
    _build.nvcc() is None, reason="nvcc not found: the CUDA handlers cannot be compiled here"
)
def test_the_library_with_cuda_handlers_compiles_links_and_exports_every_handler(tmp_path):
    """What build() does on a machine where JAX has CUDA devices, for sm_80:
    nvcc compiles csrc/cuda and ffi_cuda.cc, and the library links with the
    CUDA runtime in. It loads without a GPU (nothing runs until a handler
    is called), so its eight handler symbols can be looked up here."""
    import ctypes

    library_path = tmp_path / "libkr_jax_cuda.so"
    _jax._compile(library_path, tmp_path, archs=["80"])
    log = (tmp_path / _build.LOG_FILE).read_text()
    assert "ffi_cuda.cc" in log and "kernels.cu" in log and "code=sm_80" in log
    library = ctypes.CDLL(str(library_path))
    for symbol in [*_jax.TARGETS, *_jax.CUDA_SYMBOLS.values()]:
        assert getattr(library, symbol) is not None
    assert len(set(_jax.CUDA_SYMBOLS.values())) == len(_jax.TARGETS) == 4
