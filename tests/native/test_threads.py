"""The native op is thread-safe: concurrent calls give the sequential results.

Several Python threads call ``conv_bn_add_act(implementation="native")`` (and
the adapters' kernels directly) at once, each on its own inputs of its own
shape, many times over, and every result must equal, bit for bit, the one the
same call gives when the calls run one after another. The CPU kernels are
deterministic for a given thread count (``csrc/cpu/kernels.cpp``), and that
count depends only on the tensor's size and the configured maximum, never on
how many callers run at once; so any difference would come from state shared
between concurrent calls.

Which backend runs what (as ``tests/native/conftest.py`` does for the other
files):

- the op and adapter tests run on the active backend's adapter (TensorFlow
  or torch; each adapter's tests run under its own backend) and skip, with
  the reason, where it has no adapter or it cannot be built here;
- the NumPy core module tests are framework-free: they run once, under the
  default TensorFlow backend;
- the first-use build races (``slow``: they compile into a fresh cache) run
  one per target: the active backend's adapter, and the core module under
  TensorFlow.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import keras
import numpy as np
import pytest

from keras_residual import native
from keras_residual.native import _build
from keras_residual.ops import conv_bn_add_act
from tests.helpers import run_fresh_python

BACKEND = keras.config.backend()
THREADS = 4
ITERATIONS = 6  # passes of each thread over all the tasks

# ------------------------------------------------------------------ fixtures --


@pytest.fixture(scope="module")
def adapter():
    """The active backend's loaded adapter, or a skip that says why not."""
    if BACKEND not in native.ADAPTERS:
        pytest.skip(f"no native adapter on the {BACKEND} backend (composite only)")
    try:
        return native.adapter(BACKEND)
    except native.NativeUnavailable as error:
        pytest.skip(f"the {BACKEND} adapter is unavailable here: {str(error).splitlines()[0]}")


@pytest.fixture(scope="module")
def core():
    """The NumPy core module (framework-free: runs once, under TensorFlow)."""
    if BACKEND != "tensorflow":
        pytest.skip("framework-free: runs once, with the default backend")
    from keras_residual.native.core import load_core

    try:
        return load_core()
    except native.NativeUnavailable as error:
        pytest.skip(f"the native core module cannot be built here: {error}")


# ----------------------------------------------------------------- the cases --


@dataclass(frozen=True)
class Case:
    """One conv -> BN -> (+residual) -> activation call."""

    shape: tuple  # (n, h, w, in_channels)
    filters: int
    kernel_size: int = 3
    strides: int = 1
    activation: str = "relu"
    residual: bool = True
    channels_first: bool = False  # torch only: TensorFlow's CPU conv is NHWC only
    dtype: str = "float32"
    bn: bool = True  # False: the folded epilogue act(conv + bias + residual)


# Different channel counts and sizes, so that shared scratch state would
# show; the two largest outputs (65 536 and 76 800 values) are split over
# several kernel threads inside each call.
CASES = [
    Case((2, 8, 8, 3), 5),
    Case((1, 5, 7, 4), 17, kernel_size=1, activation="gelu", residual=False),
    Case((3, 12, 10, 6), 33, strides=2, activation="silu"),
    Case((4, 16, 16, 8), 64, kernel_size=1, activation="leaky_relu"),
    Case((2, 9, 9, 5), 7, activation="relu6", channels_first=True),
    Case((1, 3, 3, 2), 128, activation="linear", residual=False, dtype="float64"),
    Case((2, 20, 20, 16), 96, kernel_size=1, channels_first=True),
    Case((5, 6, 6, 7), 9, activation="gelu", bn=False),
]


def _cases():
    if BACKEND != "tensorflow":  # TensorFlow's CPU convolution has no NCHW
        return CASES
    return [case for case in CASES if not case.channels_first]


def _arrays(case: Case, seed: int) -> dict:
    """NumPy inputs of one task: a case and a seed (two tasks per case)."""
    rng = np.random.default_rng(seed)
    n, h, w, c = case.shape
    f = case.filters
    x = rng.normal(size=case.shape)
    out_hw = (-(-h // case.strides), -(-w // case.strides))  # "same" padding
    out_shape = (n, *out_hw, f)
    if case.channels_first:
        x = x.transpose(0, 3, 1, 2)
        out_shape = (n, f, *out_hw)
    arrays = {
        "inputs": x.astype(case.dtype),
        "kernel": rng.normal(0, 0.3, (case.kernel_size, case.kernel_size, c, f)).astype(case.dtype),
        "bias": rng.normal(0, 0.2, f).astype("float32"),
        "weight": rng.normal(size=out_shape).astype(case.dtype),  # d loss / d y
    }
    if case.bn:
        arrays.update(
            gamma=rng.uniform(0.5, 1.5, f).astype("float32"),
            beta=rng.normal(0, 0.2, f).astype("float32"),
            moving_mean=rng.normal(0, 0.2, f).astype("float32"),
            moving_variance=rng.uniform(0.5, 2.0, f).astype("float32"),
        )
    if case.residual:
        arrays["residual"] = rng.normal(size=out_shape).astype(case.dtype)
    return arrays


def _tasks():
    """(case, arrays) pairs: every case with two different inputs."""
    return [(case, _arrays(case, seed)) for case in _cases() for seed in (11, 12)]


# ------------------------------------------------------------- backend glue --


def _numpy(tensor) -> np.ndarray:
    if BACKEND == "torch":
        return tensor.detach().cpu().numpy()
    if BACKEND == "jax":
        return np.asarray(tensor)
    return tensor.numpy()


def _gradients(fn, leaves: dict, weight: np.ndarray) -> dict:
    """Outputs of `fn(**leaves)` and the gradients of sum(outputs[0] * weight).

    Returns NumPy arrays: `out0`, `out1`, ... and `d<name>` for each leaf.
    """
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensors = {name: tf.constant(value) for name, value in leaves.items()}
        with tf.GradientTape() as tape:
            tape.watch(list(tensors.values()))
            outputs = fn(**tensors)
            loss = tf.reduce_sum(tf.cast(outputs[0], weight.dtype) * weight)
        grads = tape.gradient(loss, list(tensors.values()))
    elif BACKEND == "jax":
        import jax
        import jax.numpy as jnp

        tensors = {name: jnp.asarray(value) for name, value in leaves.items()}

        def loss_and_outputs(*values):
            outputs = fn(**dict(zip(tensors, values, strict=True)))
            return jnp.sum(outputs[0].astype(weight.dtype) * weight), outputs

        argnums = tuple(range(len(tensors)))
        grads, outputs = jax.grad(loss_and_outputs, argnums, has_aux=True)(*tensors.values())
    else:
        import torch

        tensors = {name: torch.tensor(value, requires_grad=True) for name, value in leaves.items()}
        outputs = fn(**tensors)
        loss = (outputs[0].to(torch.from_numpy(weight).dtype) * torch.from_numpy(weight)).sum()
        grads = torch.autograd.grad(loss, list(tensors.values()))
    result = {f"out{i}": _numpy(out) for i, out in enumerate(outputs)}
    for name, grad in zip(tensors, grads, strict=True):
        assert grad is not None, f"no gradient for {name}"
        result[f"d{name}"] = _numpy(grad)
    return result


def _call_kwargs(case: Case, arrays: dict) -> dict:
    kwargs = dict(
        kernel=arrays["kernel"],
        bias=arrays["bias"],
        strides=case.strides,
        activation=case.activation,
        data_format="channels_first" if case.channels_first else "channels_last",
        implementation="native",
    )
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        kwargs[name] = arrays.get(name)
    return kwargs


def _inference(case: Case, arrays: dict) -> dict:
    y = conv_bn_add_act(
        keras.ops.convert_to_tensor(arrays["inputs"]),
        residual=arrays.get("residual"),
        training=False,
        **_call_kwargs(case, arrays),
    )
    return {"y": _numpy(y)}


def _training(case: Case, arrays: dict) -> dict:
    """Forward (y, batch mean, batch variance) and the gradients of
    sum(y * weight) w.r.t. the inputs, gamma, beta and the residual."""
    kwargs = _call_kwargs(case, arrays)
    leaves = {
        name: arrays[name] for name in ("inputs", "gamma", "beta", "residual") if name in arrays
    }
    for name in leaves:
        kwargs.pop(name, None)

    def fn(inputs, gamma, beta, residual=None):
        return conv_bn_add_act(
            inputs, gamma=gamma, beta=beta, residual=residual, training=True, **kwargs
        )

    return _gradients(fn, leaves, arrays["weight"])


# ------------------------------------------------------------- the harness --


def _assert_same(got: dict, expected: dict, where: str) -> list[str]:
    """Bitwise comparison; returns a description of each mismatch."""
    problems = []
    assert set(got) == set(expected), where
    for name, value in expected.items():
        other = got[name]
        if other.shape != value.shape or other.dtype != value.dtype:
            problems.append(
                f"{where} {name}: {other.dtype}{other.shape} != {value.dtype}{value.shape}"
            )
        elif not np.array_equal(other, value, equal_nan=True):
            diff = np.abs(other.astype("float64") - value.astype("float64"))
            problems.append(
                f"{where} {name}: {int(np.sum(diff > 0))} of {value.size} values differ, "
                f"max |diff| {np.nanmax(diff):.3g}"
            )
    return problems


def _run_concurrently(run, tasks, threads=THREADS, iterations=ITERATIONS):
    """Runs every task sequentially, then on `threads` threads at once.

    Each thread starts at a different task and walks through all of them
    `iterations` times, so that at any moment the threads run different
    shapes. Returns the mismatches against the sequential results.
    """
    expected = [run(*task) for task in tasks]
    # The sequential results are themselves reproducible.
    again = run(*tasks[0])
    assert not _assert_same(again, expected[0], "sequential rerun")

    start = threading.Barrier(threads)

    def worker(index):
        start.wait(timeout=120)
        problems, calls = [], 0
        for iteration in range(iterations):
            for step in range(len(tasks)):
                k = (index * 3 + step + iteration) % len(tasks)
                where = f"thread {index} iteration {iteration} task {k} {tasks[k][0]}"
                problems += _assert_same(run(*tasks[k]), expected[k], where)
                calls += 1
        return problems, calls

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(worker, range(threads)))
    assert sum(calls for _, calls in outcomes) == threads * iterations * len(tasks)
    return [problem for problems, _ in outcomes for problem in problems]


# -------------------------------------------------------- the op, threaded --


def test_concurrent_inference_matches_sequential(adapter):
    problems = _run_concurrently(_inference, _tasks())
    assert not problems, "\n".join(problems[:20])


def test_concurrent_training_matches_sequential(adapter):
    tasks = [task for task in _tasks() if task[0].bn]
    problems = _run_concurrently(_training, tasks)
    assert not problems, "\n".join(problems[:20])


def test_concurrent_inference_and_training_mixed(adapter):
    """Threads running the inference and the training kernels side by side."""
    tasks = _tasks()
    mixed = [(_inference, task) for task in tasks] + [
        (_training, task) for task in tasks if task[0].bn
    ]
    problems = _run_concurrently(lambda run, task: run(*task), mixed, iterations=2)
    assert not problems, "\n".join(problems[:20])


# --------------------------------------------------- the kernels, directly --

# Tensors big enough that each call also forks kernel threads of its own.
KERNEL_SHAPES = [(8, 32, 32, 48), (2, 17, 13, 200), (16, 8, 8, 130), (1, 64, 64, 24)]


def _kernel_arrays(shape, seed):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    return {
        "x": rng.normal(1.0, 2.0, shape).astype("float32"),
        "gamma": rng.uniform(0.5, 1.5, c).astype("float32"),
        "beta": rng.normal(0, 0.2, c).astype("float32"),
        "residual": rng.normal(size=shape).astype("float32"),
        "weight": rng.normal(size=shape).astype("float32"),
    }


def _adapter_calls(adapter, kind, arrays):
    code = _build.ACTIVATION_CODES["silu" if kind == "train" else "leaky_relu"]
    leaves = {name: arrays[name] for name in ("x", "gamma", "beta", "residual")}
    if kind == "train":

        def fn(x, gamma, beta, residual):
            return adapter.bn_add_act_train(
                x,
                gamma,
                beta,
                residual,
                epsilon=1e-3,
                activation=code,
                alpha=0.2,
                channels_last=True,
            )

    else:

        def fn(x, gamma, beta, residual):
            y = adapter.scale_shift_add_act(
                x, gamma, beta, residual, activation=code, alpha=0.2, channels_last=True
            )
            return (y,)

    return _gradients(fn, leaves, arrays["weight"])


def test_adapter_kernels_concurrently(adapter):
    """The adapter's four ops (both forwards and both backwards) from threads,
    on tensors large enough to run several kernel threads per call."""
    tasks = [
        (kind, _kernel_arrays(shape, seed))
        for seed, shape in enumerate(KERNEL_SHAPES)
        for kind in ("train", "epilogue")
    ]
    problems = _run_concurrently(
        lambda kind, arrays: _adapter_calls(adapter, kind, arrays), tasks, iterations=3
    )
    assert not problems, "\n".join(problems[:20])


def test_threaded_results_are_correct(adapter):
    """The threaded results are also the right ones: the composite path agrees."""
    tasks = _tasks()

    def both(case, arrays):
        native_y = _inference(case, arrays)["y"]
        kwargs = {**_call_kwargs(case, arrays), "implementation": "composite"}
        composite_y = _numpy(
            conv_bn_add_act(
                keras.ops.convert_to_tensor(arrays["inputs"]),
                residual=arrays.get("residual"),
                training=False,
                **kwargs,
            )
        )
        return native_y, composite_y

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(lambda task: both(*task), tasks))
    for (case, _), (native_y, composite_y) in zip(tasks, results, strict=True):
        # 1e-4 for float64 too: Keras' torch composite is only about that close
        # to a float64 reference there.
        np.testing.assert_allclose(native_y, composite_y, rtol=1e-4, atol=1e-4, err_msg=str(case))


# ------------------------------------------------ the core module, threaded --


def _core_reference(x, scale, shift, residual):
    """float64 NumPy leaky_relu(x * scale + shift + residual), NHWC."""
    z = x.astype("float64") * scale + shift + residual
    return np.where(z >= 0, z, 0.2 * z)


def test_core_module_concurrently(core):
    """The NumPy core module's kernels (they release the GIL) from threads."""
    tasks = []
    for seed, shape in enumerate([(2, 5, 7, 3), (8, 32, 32, 48), (1, 64, 64, 24), (4, 9, 9, 130)]):
        rng = np.random.default_rng(seed)
        c = shape[-1]
        x = rng.normal(1.0, 2.0, shape).astype("float32")
        tasks.append(
            (
                x,
                rng.uniform(0.5, 1.5, c).astype("float32"),
                rng.normal(0, 0.2, c).astype("float32"),
                rng.normal(size=shape).astype("float32"),
                rng.normal(size=shape).astype("float32"),
            )
        )

    def run(x, gamma, beta, residual, dy):
        mean, var = core.batch_stats(x)
        y = core.scale_shift_add_act(x, gamma, beta, residual, activation="leaky_relu")
        dx, dr, dgamma, dbeta = core.batch_norm_add_act_backward(
            dy, x, mean, var, gamma, beta, residual, activation="silu"
        )
        return {"mean": mean, "var": var, "y": y, "dx": dx, "dr": dr, "dg": dgamma, "db": dbeta}

    problems = _run_concurrently(run, tasks, iterations=10)
    assert not problems, "\n".join(problems[:20])
    for x, gamma, beta, residual, _ in tasks:
        y = core.scale_shift_add_act(x, gamma, beta, residual, activation="leaky_relu")
        np.testing.assert_allclose(
            y, _core_reference(x, gamma, beta, residual), rtol=2e-5, atol=2e-5
        )


def test_load_core_from_threads_returns_the_loaded_module(core):
    """Once loaded, every thread gets the very same module."""
    from keras_residual.native.core import load_core

    start = threading.Barrier(THREADS)

    def get(_):
        start.wait(timeout=60)
        return [load_core() for _ in range(200)]

    with ThreadPoolExecutor(THREADS) as pool:
        modules = [module for batch in pool.map(get, range(THREADS)) for module in batch]
    assert all(module is core for module in modules)


# ------------------------------------------------ the first-use build races --

# Run in a fresh process with an empty cache: counts every compile, starts
# `threads` threads that all make their first native call at the same moment
# (half of them training), and prints what they got as JSON.
ADAPTER_BUILD_RACE = """
import json, sys, threading
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import keras
from keras_residual import native
from keras_residual.native import _build
from keras_residual.ops import conv_bn_add_act

compiles, lock = [], threading.Lock()
original = _build.build_library

def counting_build_library(target, sources, framework_version, compile, **kwargs):
    def counted(out_path, build_dir):
        with lock:
            compiles.append(target)
        return compile(out_path, build_dir)
    return original(target, sources, framework_version, counted, **kwargs)

_build.build_library = counting_build_library

threads = int(sys.argv[1])
cases = []
for index in range(threads):
    rng = np.random.default_rng(index)
    c, f, hw = 3 + index, 5 + 4 * index, 6 + index  # a different shape per thread
    cases.append(dict(
        inputs=rng.normal(size=(2, hw, hw, c)).astype("float32"),
        kernel=rng.normal(0, 0.3, (3, 3, c, f)).astype("float32"),
        gamma=rng.uniform(0.5, 1.5, f).astype("float32"),
        beta=rng.normal(0, 0.2, f).astype("float32"),
        moving_mean=rng.normal(0, 0.2, f).astype("float32"),
        moving_variance=rng.uniform(0.5, 2.0, f).astype("float32"),
        residual=rng.normal(size=(2, hw, hw, f)).astype("float32"),
        training=bool(index % 2),
    ))

def run(case, implementation):
    out = conv_bn_add_act(**case, implementation=implementation)
    out = out if case["training"] else (out,)
    return [np.asarray(keras.ops.convert_to_numpy(value)).tolist() for value in out]

# The references use the composite path: nothing native is built or loaded yet.
references = [run(case, "composite") for case in cases]
assert not native._loaded and not compiles, (native._loaded, compiles)

start = threading.Barrier(threads)

def first_use(index):
    start.wait(timeout=60)
    try:
        return run(cases[index], "native")
    except Exception as error:
        return f"{type(error).__name__}: {error}"

with ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(first_use, range(threads)))

errors = []
for index, (got, want) in enumerate(zip(results, references)):
    if isinstance(got, str):
        errors.append(f"thread {index}: {got}")
        continue
    for value, reference in zip(got, want):
        diff = float(np.max(np.abs(np.asarray(value) - np.asarray(reference))))
        if not diff <= 1e-4:
            errors.append(f"thread {index}: max |native - composite| = {diff}")
print(json.dumps({"compiles": compiles, "errors": errors, "loaded": sorted(native._loaded)}))
"""

CORE_BUILD_RACE = """
import json, sys, threading
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from keras_residual.native import _build, core

compiles, lock = [], threading.Lock()
original = _build.build_library

def counting_build_library(target, sources, framework_version, compile, **kwargs):
    def counted(out_path, build_dir):
        with lock:
            compiles.append(target)
        return compile(out_path, build_dir)
    return original(target, sources, framework_version, counted, **kwargs)

_build.build_library = counting_build_library

threads = int(sys.argv[1])
start = threading.Barrier(threads)

def first_use(index):
    start.wait(timeout=60)
    try:
        module = core.load_core()
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"
    rng = np.random.default_rng(index)
    x = rng.normal(size=(2, 4 + index, 5, 3 + 2 * index)).astype("float32")
    mean, var = module.batch_stats(x)
    ok = np.allclose(mean, x.mean(axis=(0, 1, 2)), atol=1e-5) and np.allclose(
        var, x.var(axis=(0, 1, 2)), atol=1e-5)
    return module, None if ok else f"thread {index}: wrong batch statistics"

with ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(first_use, range(threads)))
modules = [module for module, _ in results if module is not None]
print(json.dumps({
    "compiles": compiles,
    "errors": [error for _, error in results if error],
    "distinct_modules": len({id(module) for module in modules}),
    "final_is_loaded": all(module is core.load_core() for module in modules),
}))
"""


def _check_cache(cache, target: str) -> None:
    """The cache holds exactly one complete entry for `target` and no leftovers."""
    entries = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert [p.name.split("-")[0] for p in entries] == [target], sorted(cache.iterdir())
    scratch = [p.name for p in cache.iterdir() if p.name.startswith(".build-")]
    assert not scratch, f"scratch folders left behind: {scratch}"
    entry = entries[0]
    record = json.loads((entry / _build.INFO_FILE).read_text())
    assert record["target"] == target
    libraries = list(entry.glob(f"lib{target}*"))
    assert len(libraries) == 1, sorted(entry.iterdir())
    assert _build.file_hash(libraries[0]) == record["library_sha256"]


def _race_result(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


ADAPTER_TARGETS = {"tensorflow": "tensorflow", "torch": "torch_ops", "jax": "jax"}


@pytest.mark.slow
def test_first_use_build_race_in_threads_compiles_once(tmp_path):
    """N threads whose first native call is at the same moment, with an empty
    cache: all get correct results and the adapter is compiled exactly once."""
    if BACKEND not in ADAPTER_TARGETS:
        pytest.skip(f"no native adapter on the {BACKEND} backend (composite only)")
    if not native.available(BACKEND):
        pytest.skip(f"the {BACKEND} adapter cannot be built here: {native._failed.get(BACKEND)}")
    cache = tmp_path / "cache"
    output = run_fresh_python(
        ADAPTER_BUILD_RACE,
        THREADS,
        env={"KERAS_BACKEND": BACKEND, "KERAS_RESIDUAL_CACHE_DIR": str(cache)},
        timeout=1500,
    )
    result = _race_result(output)
    target = ADAPTER_TARGETS[BACKEND]
    assert not result["errors"], "\n".join(result["errors"])
    assert result["compiles"] == [target], f"compiled {result['compiles']}, expected once"
    assert result["loaded"] == [BACKEND]
    _check_cache(cache, target)


@pytest.mark.slow
def test_first_use_of_core_module_in_threads(tmp_path):
    """N threads calling load_core() at once as its first use, empty cache: one
    compile, correct kernels in every thread, and one module for all."""
    if BACKEND != "tensorflow":
        pytest.skip("framework-free: runs once, with the default backend")
    if _build.compiler_version() == "none":
        pytest.skip("no C++ compiler on this machine")
    cache = tmp_path / "cache"
    output = run_fresh_python(
        CORE_BUILD_RACE, THREADS, env={"KERAS_RESIDUAL_CACHE_DIR": str(cache)}, timeout=900
    )
    result = _race_result(output)
    if result["errors"] and all("NativeUnavailable" in e for e in result["errors"]):
        pytest.skip(f"the core module cannot be built here: {result['errors'][0]}")
    assert not result["errors"], "\n".join(result["errors"])
    assert result["compiles"] == ["core"], f"compiled {result['compiles']}, expected once"
    _check_cache(cache, "core")
    # load_core() is a per-process singleton: every racing thread must get
    # the same module object, and the one later calls return.
    assert result["distinct_modules"] == 1 and result["final_is_loaded"], (
        f"{THREADS} threads racing on the first load_core() got "
        f"{result['distinct_modules']} distinct module objects "
        f"(final_is_loaded={result['final_is_loaded']}): the extension was loaded more "
        "than once (keras_residual/native/core.py, load_core)"
    )
