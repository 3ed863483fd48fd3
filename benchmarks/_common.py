"""What the benchmark modules share: sizes, synchronization and timing."""

from __future__ import annotations

import os

import keras
import numpy as np

FULL = os.environ.get("KERAS_RESIDUAL_BENCH_FULL", "") not in ("", "0")
ROUNDS = int(os.environ.get("KERAS_RESIDUAL_BENCH_ROUNDS", "20" if FULL else "5"))
IMPLEMENTATIONS = ("composite", "native")


def sync(value):
    """Waits until `value` (a tensor or nested tensors) has been computed."""
    backend = keras.config.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return value
    if backend == "jax":
        import jax

        return jax.block_until_ready(value)
    if backend == "tensorflow":
        # TensorFlow's eager results are ready on CPU; on GPU, fetching one
        # value waits for the stream that produced it.
        leaves = keras.tree.flatten(value)
        if leaves:
            keras.ops.convert_to_numpy(leaves[-1])
    return value


def measure(benchmark, step):
    """Times `step` (which must wait for its own results) with fixed rounds."""
    step()  # first call: tracing and compilation, outside the timings
    return benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)


def random(shape, seed=0, low=None, high=None):
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, high, size=shape).astype("float32")
    return rng.normal(size=shape).astype("float32")
