"""The op's speed targets, measured side by side in one process.

Training forward + backward of `conv_bn_add_act` (relu, with residual) on a
(16, 28, 28, 256) float32 activation, native against composite, and on torch
against `F.conv2d` + `F.batch_norm` + add + relu on the same tensors:

- "fused work": a negligible 1x1 conv from 8 channels, so the BN, add and
  activation dominate;
- "whole op": a 1x1 256 -> 256 conv, which both paths share.

On torch it then measures the fused work alone on every BatchNormalization
shape of ResNet50 (batch 16, 128x128, NHWC; `--arch v1.5` adds the shapes
of the stride on the 3x3), forward and backward apart: the native op
against `F.batch_norm` + add + relu on the same memory (NCHW views in
channels_last), with a residual on every shape. The backward is timed
alone: each repeat runs the forward untimed, then times autograd's
backward from the same `dy`. The targets: native never slower, and at
least 1.3x faster from 4 MB up.

The variants alternate repeat by repeat; the table gives each one's median
and its speedup over the others. Run with the backend to measure:

    KERAS_BACKEND=torch python benchmarks/op_targets.py --out op_targets.json
    KERAS_BACKEND=tensorflow python benchmarks/op_targets.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_residual import native  # noqa: E402
from keras_residual.bench import _env  # noqa: E402
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


# (h, w, channels) of every BatchNormalization output of ResNet50 at 128x128:
# the stem, then per stage the bottleneck width and the stage's output.
RESNET50_SHAPES = [
    (64, 64, 64),
    (32, 32, 64),
    (32, 32, 256),
    (16, 16, 128),
    (16, 16, 512),
    (8, 8, 256),
    (8, 8, 1024),
    (4, 4, 512),
    (4, 4, 2048),
]
# With the stride on the 3x3 (v1.5), each later stage's first 1x1 runs at
# the size of the stage before.
V15_SHAPES = [(32, 32, 128), (16, 16, 256), (8, 8, 512)]
TARGET_FROM_BYTES = 4 << 20
TARGET_SPEEDUP = 1.3


def _torch_shape_variants(h, w, channels, batch=16, seed=0):
    """Forward and backward of the fused work alone, native and plain torch.

    Raises:
        AssertionError: the two differ beyond float rounding.
    """
    import torch
    import torch.nn.functional as F

    from keras_residual.native import _torch

    gen = torch.Generator().manual_seed(seed)
    shape = (batch, h, w, channels)
    x = torch.randn(shape, generator=gen)
    residual = torch.randn(shape, generator=gen)
    dy = torch.randn(shape, generator=gen)
    gamma = torch.rand(channels, generator=gen) + 0.5
    beta = torch.randn(channels, generator=gen) * 0.1
    leaves = [t.clone().requires_grad_(True) for t in (x, gamma, beta, residual)]

    def native_forward():
        xl, gl, bl, rl = leaves
        return _torch.bn_add_act_train(xl, gl, bl, rl, epsilon=1e-5, activation="relu")[0]

    def plain_forward():
        # The same NHWC memory seen as NCHW in channels_last, as torchvision runs.
        xl, gl, bl, rl = leaves
        nchw = xl.permute(0, 3, 1, 2)
        y = F.batch_norm(nchw, None, None, gl, bl, training=True, eps=1e-5)
        return F.relu(y + rl.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def timed_backward(forward):
        def run():
            y = forward()
            start = time.perf_counter()
            torch.autograd.grad(y, leaves, dy)
            return time.perf_counter() - start

        return run

    def timed_forward(forward):
        def run():
            with torch.no_grad():
                start = time.perf_counter()
                forward()
                return time.perf_counter() - start

        return run

    # Both compute the same thing, forward and backward: checked once here.
    # Where z rounds to the other side of relu's kink, the two gradients
    # differ by dy there (and the per-channel sums a little): a few such
    # values in a million are rounding, not a different computation.
    expected = plain_forward()
    got = native_forward()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(got, leaves, dy), torch.autograd.grad(expected, leaves, dy)
    for name, g_native, g_plain in zip(("x", "gamma", "beta", "residual"), *grads, strict=True):
        error = float((g_native - g_plain).norm() / g_plain.norm())
        assert error <= 1e-3, f"d{name} differs: relative error {error:.2e}"

    forward = {"native": timed_forward(native_forward), "torch": timed_forward(plain_forward)}
    backward = {"native": timed_backward(native_forward), "torch": timed_backward(plain_forward)}
    return forward, backward, x.numel() * x.element_size()


def per_shape(shapes, repeats, batch=16):
    """One record per shape and direction: medians and native's speedup."""
    records = []
    for h, w, channels in shapes:
        forward, backward, nbytes = _torch_shape_variants(h, w, channels, batch)
        for direction, variants in (("forward", forward), ("backward", backward)):
            medians = measure(variants, repeats, timed=True)
            speedup = medians["torch"] / medians["native"]
            target = TARGET_SPEEDUP if nbytes >= TARGET_FROM_BYTES else 1.0
            record = {
                "shape": [batch, h, w, channels],
                "megabytes": nbytes / 2**20,
                "direction": direction,
                "median_ms": medians,
                "native_speedup": speedup,
                "target": target,
                "met": speedup >= target,
            }
            records.append(record)
            print(
                f"  ({batch}, {h:2d}, {w:2d}, {channels:4d}) {nbytes / 2**20:5.1f} MB "
                f"{direction:8s} "
                f"native {medians['native']:7.3f} ms  torch {medians['torch']:7.3f} ms  "
                f"speedup {speedup:5.2f}x  target {target:.1f}x  "
                f"{'met' if record['met'] else 'MISSED'}"
            )
    return records


def measure(variants, repeats, warmup=3, timed=False):
    """Medians in ms of the variants, called in turn, repeat by repeat.

    With `timed`, each variant times itself and returns its seconds (to
    leave untimed set-up out); otherwise the whole call is timed.
    """

    def seconds(fn):
        if timed:
            return fn()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    times = {name: [] for name in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--arch",
        choices=["keras", "v1.5"],
        default="v1.5",
        help="whose ResNet50 shapes to measure per shape (torch; default v1.5)",
    )
    parser.add_argument("--no-shapes", action="store_true", help="skip the per-shape table (torch)")
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
    shape_records = []
    if backend == "torch" and not args.no_shapes:
        shapes = RESNET50_SHAPES + (V15_SHAPES if args.arch == "v1.5" else [])
        shapes = sorted(shapes, key=lambda s: s[0] * s[1] * s[2])
        print(f"fused work per ResNet50 shape ({args.arch}), batch 16, float32, relu, residual:")
        shape_records = per_shape(shapes, args.repeats)
        missed = sum(not r["met"] for r in shape_records)
        print(f"  targets met on {len(shape_records) - missed} of {len(shape_records)}")
    if args.out:
        result = {
            "host": _env.host(),
            "versions": _env.versions(backend),
            "repeats": args.repeats,
            "records": records,
            "per_shape": {"arch": args.arch, "records": shape_records},
        }
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
