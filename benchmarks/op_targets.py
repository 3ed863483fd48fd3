"""The op's speed targets, measured side by side in one process.

Training forward + backward of `conv_bn_add_act` (relu, with residual) on a
(16, 28, 28, 256) float32 activation, native against composite, and on torch
against `F.conv2d` + `F.batch_norm` + add + relu on the same tensors:

- "fused work": a negligible 1x1 conv from 8 channels, so the BN, add and
  activation dominate;
- "whole op": a 1x1 256 -> 256 conv, which both paths share.

The variants alternate repeat by repeat; the table gives each one's median
and its speedup over the others. Run with the backend to measure:

    KERAS_BACKEND=torch python benchmarks/op_targets.py --out op_targets.json
    KERAS_BACKEND=tensorflow python benchmarks/op_targets.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_residual import native  # noqa: E402
from keras_residual.ops import conv_bn_add_act  # noqa: E402

CASES = {"fused work (1x1 conv 8->256)": 8, "whole op (1x1 conv 256->256)": 256}


def _arrays(in_channels, batch=16, size=28, filters=256, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(batch, size, size, in_channels)).astype("float32"),
        "kernel": rng.normal(0, 0.1, size=(1, 1, in_channels, filters)).astype("float32"),
        "gamma": rng.uniform(0.5, 1.5, filters).astype("float32"),
        "beta": rng.normal(0, 0.1, filters).astype("float32"),
        "residual": rng.normal(size=(batch, size, size, filters)).astype("float32"),
    }


def _tensorflow_variants(arrays):
    import tensorflow as tf

    v = {name: tf.Variable(value) for name, value in arrays.items()}
    zeros = tf.zeros_like(v["gamma"])
    ones = tf.ones_like(v["gamma"])

    def make(implementation):
        @tf.function
        def step():
            with tf.GradientTape() as tape:
                y, _, _ = conv_bn_add_act(
                    v["x"],
                    v["kernel"],
                    v["gamma"],
                    v["beta"],
                    zeros,
                    ones,
                    v["residual"],
                    training=True,
                    implementation=implementation,
                )
                loss = tf.reduce_sum(y)
            return tape.gradient(loss, list(v.values()))

        return lambda: [g.numpy() for g in step()][0]

    return {"native": make("native"), "composite": make("composite")}


def _torch_variants(arrays):
    import torch
    import torch.nn.functional as F

    t = {name: torch.tensor(value, requires_grad=True) for name, value in arrays.items()}
    zeros = torch.zeros_like(t["gamma"])
    ones = torch.ones_like(t["gamma"])

    def make(implementation):
        def step():
            y, _, _ = conv_bn_add_act(
                t["x"],
                t["kernel"],
                t["gamma"],
                t["beta"],
                zeros,
                ones,
                t["residual"],
                training=True,
                implementation=implementation,
            )
            grads = torch.autograd.grad(y.sum(), list(t.values()))
            return grads[0]

        return step

    # Plain torch on the same NHWC memory: an NCHW view in channels_last format.
    x_nchw = t["x"].detach().permute(0, 3, 1, 2).requires_grad_(True)
    w = t["kernel"].detach().permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    w.requires_grad_(True)
    r_nchw = t["residual"].detach().permute(0, 3, 1, 2).requires_grad_(True)
    gamma = t["gamma"].detach().clone().requires_grad_(True)
    beta = t["beta"].detach().clone().requires_grad_(True)

    def plain():
        y = F.conv2d(x_nchw, w)
        y = F.relu(F.batch_norm(y, None, None, gamma, beta, training=True, eps=1e-5) + r_nchw)
        return torch.autograd.grad(y.sum(), [x_nchw, w, gamma, beta, r_nchw])[0]

    return {"native": make("native"), "composite": make("composite"), "torch F.batch_norm": plain}


def measure(variants, repeats, warmup=3):
    times = {name: [] for name in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    backend = keras.config.backend()
    if not native.available():
        print(f"native path unavailable on {backend}: nothing to compare", file=sys.stderr)
        return 1
    records = []
    for case, in_channels in CASES.items():
        arrays = _arrays(in_channels)
        make = _torch_variants if backend == "torch" else _tensorflow_variants
        medians = measure(make(arrays), args.repeats)
        record = {"case": case, "backend": backend, "median_ms": medians}
        record["native_speedup_vs"] = {
            name: medians[name] / medians["native"] for name in medians if name != "native"
        }
        records.append(record)
        print(
            f"{backend:10s} {case:32s} "
            + "  ".join(f"{name} {ms:7.2f} ms" for name, ms in medians.items())
            + "  | native speedup: "
            + ", ".join(
                f"{name} {ratio:.2f}x" for name, ratio in record["native_speedup_vs"].items()
            )
        )
    if args.out:
        result = {
            "host": {
                "machine": platform.machine(),
                "processor": platform.processor(),
                "cores": os.cpu_count(),
            },
            "versions": {"python": platform.python_version(), "keras": keras.__version__},
            "repeats": args.repeats,
            "records": records,
        }
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
