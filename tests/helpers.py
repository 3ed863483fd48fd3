"""Test helpers, in the spirit of Keras' ``TestCase.run_layer_test``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np


def random_input(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def train_a_little(model, x):
    """One epoch of Adam towards zeros: moves the BN statistics and the weights.

    Adam, because its step is bounded by the learning rate. One plain SGD step
    on a batch of 2 whose last stage is 1x1 (two values per BN channel) can
    send the inference outputs to inf/NaN; keras.applications.ResNet50 does
    the same. Outputs that are not finite would make any comparison vacuous,
    so they fail here.
    """
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, np.zeros(model.compute_output_shape(x.shape)), epochs=1, verbose=0)
    y = keras.ops.convert_to_numpy(model(x, training=False))
    assert np.isfinite(y).all(), "training a little left outputs that are not finite"


def randomize_bn_statistics(layer, seed=0):
    """Non-trivial BN weights and statistics, as trained models have."""
    rng = np.random.default_rng(seed)
    for sub in layer._flatten_layers(include_self=False):
        if isinstance(sub, keras.layers.BatchNormalization):
            n = sub.gamma.shape[0]
            sub.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.normal(0, 0.1, n),
                    rng.normal(0, 0.1, n),
                    rng.uniform(0.5, 2.0, n),
                ]
            )


def config_round_trip(layer):
    """``from_config(get_config())`` gives the same config, also via JSON."""
    config = layer.get_config()
    json.dumps(config)  # JSON-ready values only
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    revived = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(revived) is type(layer)
    assert revived.get_config() == config
    return clone


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_output_shape,
    expected_num_trainable_weights,
    expected_num_non_trainable_weights,
    expected_num_params=None,
    run_training_check=True,
    run_mixed_precision_check=True,
    run_saving_check=True,
    tmp_path=None,
):
    """Checks a layer the way Keras checks its own.

    Config round trip; build with an explicit shape (weight counts, every
    sublayer built, ``compute_output_shape``); symbolic and eager calls; a fit
    step that moves the weights and the BN statistics; mixed precision
    (float16 compute, float32 variables); and a ``.keras`` save/load that
    restores every weight.
    """
    # 1. Config round trip.
    config_round_trip(layer_cls(**init_kwargs))

    # 2. Build with an explicit shape.
    layer = layer_cls(**init_kwargs)
    layer.build(input_shape)
    assert layer.built
    assert len(layer.trainable_weights) == expected_num_trainable_weights
    assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights
    if expected_num_params is not None:
        assert layer.count_params() == expected_num_params
    for sublayer in layer._flatten_layers(include_self=False):
        assert sublayer.built, f"{sublayer.name} was not built in build()"
    assert tuple(layer.compute_output_shape(input_shape)) == tuple(expected_output_shape)

    # 3. Symbolic call, with an unknown batch size.
    symbolic_in = keras.Input(shape=input_shape[1:])
    symbolic_out = layer_cls(**init_kwargs)(symbolic_in)
    assert tuple(symbolic_out.shape) == (None, *expected_output_shape[1:])

    # 4. Eager call, deterministic in inference.
    x = random_input(input_shape)
    eager = layer_cls(**init_kwargs)
    y = keras.ops.convert_to_numpy(eager(x, training=False))
    assert y.shape == tuple(expected_output_shape)
    assert y.dtype == np.float32
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, keras.ops.convert_to_numpy(eager(x, training=False)))

    # 5. A training step moves the kernels and the BN statistics.
    if run_training_check:
        model = keras.Sequential([keras.Input(input_shape[1:]), layer_cls(**init_kwargs)])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
        target = random_input(expected_output_shape, seed=1)
        history = model.fit(x, target, batch_size=len(x), epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
        after = [keras.ops.convert_to_numpy(w) for w in model.weights]
        changed = {
            w.path.split("/")[-1]
            for w, b, a in zip(model.weights, before, after, strict=True)
            if not np.array_equal(b, a)
        }
        assert {"kernel", "gamma", "beta", "moving_mean", "moving_variance"} <= changed

    # 6. Mixed precision: low-precision compute, float32 variables.
    if run_mixed_precision_check:
        mixed = layer_cls(**init_kwargs, dtype="mixed_float16")
        y16 = mixed(x, training=True)
        assert keras.backend.standardize_dtype(y16.dtype) == "float16"
        assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in mixed.weights)
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(y16)))

    # 7. Saving restores every weight.
    if run_saving_check and tmp_path is not None:
        model = keras.Sequential([keras.Input(input_shape[1:]), layer_cls(**init_kwargs)])
        path = os.path.join(tmp_path, "layer.keras")
        model.save(path)
        reloaded = keras.saving.load_model(path)
        for w, r in zip(model.weights, reloaded.weights, strict=True):
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(r)
            )
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(model(x)),
            keras.ops.convert_to_numpy(reloaded(x)),
            rtol=1e-6,
            atol=1e-6,
        )


def run_fresh_python(code: str, *args, env=None, timeout: int = 300) -> str:
    """Runs ``code`` in a new Python process; returns its stdout.

    ``env`` adds to (or overrides) this process' environment.
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def backend_vjp(fn, inputs, dy):
    """`fn(**inputs)` and the gradients of `sum(y * dy)` by the active backend's autodiff.

    `y` is fn's output, or the first of its outputs when it returns a tuple
    (the others get a zero cotangent). Inputs that are None are passed as
    None and get no gradient.

    Returns:
        `(outputs, {name: gradient})`.
    """
    backend = keras.config.backend()
    names = [k for k, v in inputs.items() if v is not None]
    if backend == "torch":
        leaves = {
            k: (v.detach().clone().requires_grad_(True) if v is not None else None)
            for k, v in inputs.items()
        }
        out = fn(**leaves)
        y = out[0] if isinstance(out, tuple) else out
        y.backward(dy)
        grads = {k: leaves[k].grad for k in names}
        out = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
        return out, grads
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def call(*values):
            return fn(**{**inputs, **dict(zip(names, values, strict=True))})

        out, pullback = jax.vjp(call, *[inputs[k] for k in names])
        cotangent = (dy, *map(jnp.zeros_like, out[1:])) if isinstance(out, tuple) else dy
        return out, dict(zip(names, pullback(cotangent), strict=True))
    import tensorflow as tf

    with tf.GradientTape() as tape:
        for k in names:
            tape.watch(inputs[k])
        out = fn(**inputs)
        y = out[0] if isinstance(out, tuple) else out
    grads = tape.gradient(y, [inputs[k] for k in names], output_gradients=dy)
    return out, dict(zip(names, grads, strict=True))
