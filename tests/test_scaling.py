"""Mixed precision, data-parallel training and files that cross backends."""

import importlib.util
import json

import keras
import numpy as np
import pytest
from helpers import random_input, run_fresh_python, train_a_little

import keras_residual


def small_resnet(num_classes=3, **block_kwargs):
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same"),
            keras_residual.ResidualBlock(8, **block_kwargs),
            keras_residual.BottleneckBlock(4, strides=2, **block_kwargs),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ]
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_training_under_mixed_precision(policy):
    keras.config.set_dtype_policy(policy)
    compute = policy.split("_")[1]
    model = small_resnet()
    blocks = [layer for layer in model.layers if "block" in layer.name]
    assert [block.compute_dtype for block in blocks] == [compute, compute]
    assert {keras.backend.standardize_dtype(w.dtype) for w in model.weights} == {"float32"}
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    if policy == "mixed_float16":  # Keras scales the loss for float16
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    x = random_input((16, 16, 16, 3))
    y = np.arange(16) % 3
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    after = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))
    features = keras.Sequential(model.layers[:-2])(x)
    assert keras.backend.standardize_dtype(features.dtype) == compute


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_resnet_model_under_mixed_precision(policy):
    model = keras_residual.ResNet18(input_shape=(32, 32, 3), classes=3, dtype=policy)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = model.fit(random_input((4, 32, 32, 3)), np.arange(4) % 3, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert {keras.backend.standardize_dtype(w.dtype) for w in model.weights} == {"float32"}


def test_synchronized_is_kept_in_the_config():
    block = keras_residual.ResidualBlock(8, synchronized=True)
    assert block.get_config()["synchronized"] is True
    assert keras_residual.ResNet18(synchronized=True).get_config()["synchronized"] is True
    assert keras_residual.ResidualBlock(8).get_config()["synchronized"] is False


# Two replicas see the two halves of one batch of 16; the second half is
# shifted and scaled, so per-replica statistics differ from global ones. With
# momentum 0 and a learning rate of 0, after one step the first BN's moving
# variance is a batch variance of conv1's output: which one tells whether the
# statistics were synchronized.
BN_STATISTICS = """
import json, sys
import numpy as np
import keras
import keras_residual

def check_statistics(make_scope, synchronized):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 4)).astype("float32")
    x[8:] = x[8:] * 3 + 2
    y = rng.normal(size=(16, 8, 8, 8)).astype("float32")
    with make_scope():
        block = keras_residual.ResidualBlock(8, momentum=0.0, synchronized=synchronized)
        model = keras.Sequential([keras.Input((8, 8, 4)), block])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    h = keras.ops.convert_to_numpy(block.conv1(x))
    moving = keras.ops.convert_to_numpy(block.bn1.moving_variance)
    candidates = {
        "global": h.var(axis=(0, 1, 2)),
        "first replica": h[:8].var(axis=(0, 1, 2)),
        "mean of replicas": (h[:8].var(axis=(0, 1, 2)) + h[8:].var(axis=(0, 1, 2))) / 2,
    }
    return [k for k, v in candidates.items() if np.allclose(moving, v, rtol=1e-3)]

def train_small_resnet(make_scope):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 16, 16, 3)).astype("float32")
    y = np.arange(32) % 3
    with make_scope():
        model = keras.Sequential([
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same"),
            keras_residual.ResidualBlock(8, synchronized=True),
            keras_residual.BottleneckBlock(4, strides=2, drop_path_rate=0.1, seed=0),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3, activation="softmax"),
        ])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    losses = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history["loss"]
    return [float(v) for v in losses]
"""

MIRRORED = """
import contextlib
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "synchronized": check_statistics(strategy.scope, True),
    "unsynchronized": check_statistics(strategy.scope, False),
    "losses": train_small_resnet(strategy.scope),
}))
"""

DATA_PARALLEL = """
import contextlib
devices = keras.distribution.list_devices("cpu")
keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
print(json.dumps({
    "replicas": len(devices),
    "synchronized": check_statistics(contextlib.nullcontext, True),
    "unsynchronized": check_statistics(contextlib.nullcontext, False),
    "losses": train_small_resnet(contextlib.nullcontext),
}))
"""


def needs(module):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None, reason=f"{module} is not installed"
    )


@pytest.mark.slow
@needs("tensorflow")
def test_mirrored_strategy_on_two_logical_cpus():
    out = run_fresh_python(BN_STATISTICS + MIRRORED, env={"KERAS_BACKEND": "tensorflow"})
    result = json.loads(out.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["synchronized"] == ["global"]
    # Unsynchronized, each replica normalizes with its own half of the batch
    # and keeps its own moving statistics; reading them gives replica 0's.
    assert result["unsynchronized"] == ["first replica"]
    assert np.all(np.isfinite(result["losses"]))
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.slow
@needs("jax")
def test_keras_distribution_data_parallel_on_two_jax_devices():
    out = run_fresh_python(
        BN_STATISTICS + DATA_PARALLEL,
        env={"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["replicas"] == 2
    # One program over the global, sharded batch: global statistics either way.
    assert result["synchronized"] == ["global"]
    assert result["unsynchronized"] == ["global"]
    assert np.all(np.isfinite(result["losses"]))
    assert result["losses"][-1] < result["losses"][0]


LOAD_ON_BACKEND = """
import sys
import numpy as np
import keras
import keras_residual

assert keras.config.backend() == sys.argv[4], keras.config.backend()
for name in ("sequential", "resnet"):
    model = keras.saving.load_model(f"{sys.argv[1]}/{name}.keras")
    y = keras.ops.convert_to_numpy(model(np.load(sys.argv[2]), training=False))
    np.save(f"{sys.argv[3]}/{name}_{sys.argv[4]}.npy", y)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("tensorflow", marks=needs("tensorflow")),
        pytest.param("torch", marks=needs("torch")),
        pytest.param("jax", marks=needs("jax")),
    ],
)
def test_saved_files_predict_the_same_on_every_backend(tmp_path, backend):
    x = random_input((2, 3, 16, 16))
    sequential = keras.Sequential(
        [
            keras.Input((3, 16, 16)),
            keras_residual.ResidualBlock(8, data_format="channels_first"),
            keras_residual.BottleneckBlock(4, strides=2, data_format="channels_first"),
        ]
    )
    resnet = keras_residual.ResNet18(
        input_shape=(3, 16, 16), classes=5, data_format="channels_first"
    )
    for model in (sequential, resnet):
        train_a_little(model, x)
    sequential.save(tmp_path / "sequential.keras")
    resnet.save(tmp_path / "resnet.keras")
    np.save(tmp_path / "x.npy", x)
    run_fresh_python(
        LOAD_ON_BACKEND,
        tmp_path,
        tmp_path / "x.npy",
        tmp_path,
        backend,
        env={"KERAS_BACKEND": backend},
    )
    for name, model in (("sequential", sequential), ("resnet", resnet)):
        np.testing.assert_allclose(
            np.load(tmp_path / f"{name}_{backend}.npy"),
            keras.ops.convert_to_numpy(model(x, training=False)),
            rtol=1e-4,
            atol=1e-5,
        )


@pytest.mark.slow
@needs("torch")
def test_torch_ddp_example_with_torchrun(tmp_path):
    """examples/torch_ddp.py trains under torchrun with 2 processes (gloo)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ddp.keras"
    env = dict(os.environ, KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            os.path.join(root, "examples", "torch_ddp.py"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 1: loss" in done.stdout
    losses = [float(line.split()[-1]) for line in done.stdout.splitlines() if "loss" in line]
    assert np.all(np.isfinite(losses))
    code = """
    import sys, keras, keras_residual
    model = keras.saving.load_model(sys.argv[1])
    print(type(model).__name__, model.count_params())
    """
    assert run_fresh_python(code, out, env={"KERAS_BACKEND": "torch"}).split()[0] == "ResNet18"
