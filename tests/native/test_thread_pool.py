"""Where the CPU kernels' parallel slices run.

Under an adapter they run on the framework's intra-op pool (torch's
``at::parallel_for``, TensorFlow's device thread pool, XLA's intra-op pool
through the FFI ``ThreadPool``), not on threads forked
per call, which would compete for the cores with the pool's spinning threads.
Measured from the outside, in a fresh process: the CPU time of the threads that
are still alive after many calls, against the process' CPU time, which also
counts threads that have exited. On the pool nearly all of it is on live
threads; forked per call, the forked slices' share is on threads gone by then.
The NumPy module, which has no pool and forks, is the control that shows the
measurement tells the two apart.
"""

import json
import os
import sys

import pytest
from helpers import run_fresh_python

pytestmark = [
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="reads per-thread CPU times in /proc"
    ),
    pytest.mark.skipif(
        (os.cpu_count() or 1) < 2, reason="needs 2 cores for the kernels to run slices at once"
    ),
]

MEASURE = """
import json, os, resource, sys

def live_seconds():
    seconds = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds[tid] = (int(fields[11]) + int(fields[12])) / tick

    return seconds

def process_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def unavailable(error):
    print(json.dumps({"skip": str(error)}))
    sys.exit(0)

def measure(call, seconds=1.0):
    # Calls until the process has spent `seconds` of CPU time, whatever the
    # speed of the machine.
    call()
    before, p0 = live_seconds(), process_seconds()
    while process_seconds() - p0 < seconds:
        for _ in range(20):
            call()
    after, p1 = live_seconds(), process_seconds()
    on_live = sum(t - before.get(tid, 0.0) for tid, t in after.items())
    print(json.dumps({"process": p1 - p0, "live": on_live}))
"""

TORCH = """
import torch
from keras_residual.native import _build, _torch
try:
    _torch.load()
except _build.NativeUnavailable as error:
    unavailable(error)
torch.set_num_threads(2)
x = torch.randn(16, 32, 32, 256)
gamma, beta = torch.ones(256), torch.zeros(256)
torch.relu(x)  # starts torch's pool
op = torch.ops.keras_residual.bn_add_act_train
measure(lambda: op(x, gamma, beta, None, 1e-3, 1, 0.0, True))
"""

TENSORFLOW = """
import numpy as np
import tensorflow as tf
from keras_residual.native import _build, _tensorflow
try:
    lib = _tensorflow.load()
except _build.NativeUnavailable as error:
    unavailable(error)
x = tf.constant(np.random.default_rng(0).normal(size=(16, 32, 32, 256)).astype("float32"))
gamma, beta = tf.ones(256), tf.zeros(256)
empty = tf.zeros((0,))

def call():
    lib.keras_residual_bn_add_act_train(
        x=x, gamma=gamma, beta=beta, residual=empty, epsilon=1e-3, activation=1,
        alpha=0.0, channels_last=True, has_residual=False)

measure(call)
"""

JAX = """
import jax
import jax.numpy as jnp
import numpy as np
from keras_residual.native import _build, _jax
try:
    _jax.load()
except _build.NativeUnavailable as error:
    unavailable(error)
x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 32, 32, 256)).astype("float32"))
gamma, beta = jnp.ones(256), jnp.zeros(256)
train = jax.jit(lambda x, gamma, beta: _jax.bn_add_act_train(
    x, gamma, beta, None, epsilon=1e-3, activation=1, alpha=0.0, channels_last=True))
measure(lambda: jax.block_until_ready(train(x, gamma, beta)))
"""

NUMPY_CONTROL = """
import numpy as np
from keras_residual.native import _build
from keras_residual.native.core import load_core
try:
    core = load_core()
except _build.NativeUnavailable as error:
    unavailable(error)
core.set_num_threads(2)
x = np.random.default_rng(0).normal(size=(16, 32, 32, 256)).astype("float32")
measure(lambda: core.batch_stats(x, channels_last=True))
"""


def share_on_live_threads(code, backend):
    out = run_fresh_python(MEASURE + code, env={"KERAS_BACKEND": backend})
    times = json.loads(out.strip().splitlines()[-1])
    if "skip" in times:
        pytest.skip(f"the native library cannot be built here: {times['skip']}")
    # /proc counts in ticks of 10 ms: a second (`measure`) keeps that error small.
    assert times["process"] >= 1.0, times
    return times["live"] / times["process"]


def test_torch_kernels_run_on_torchs_pool():
    pytest.importorskip("torch", reason="the torch adapter needs torch")
    assert share_on_live_threads(TORCH, "torch") > 0.9


def test_tensorflow_kernels_run_on_the_intra_op_pool():
    pytest.importorskip("tensorflow", reason="the TensorFlow adapter needs TensorFlow")
    assert share_on_live_threads(TENSORFLOW, "tensorflow") > 0.9


def test_jax_kernels_run_on_xlas_intra_op_pool():
    pytest.importorskip("jax", reason="the JAX adapter needs JAX")
    assert share_on_live_threads(JAX, "jax") > 0.9


def test_the_measurement_sees_threads_forked_per_call():
    assert share_on_live_threads(NUMPY_CONTROL, "tensorflow") < 0.75
