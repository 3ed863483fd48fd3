"""A 1x1 convolution against one matrix product, on JAX and torch (CPU).

For each 1x1 convolution shape of ResNet50 (batch 16, 128x128, NHWC,
float32), times interleaved, median of `--repeats`:

- forward: the backend's convolution and `_padding.pointwise`, the one
  matrix product that the adapters' `conv2d` may run instead;
- forward and backward: the gradients of `sum(y * w)` with respect to the
  input and the kernel, for both.

The convolution is XLA's (`keras.ops.conv` under `jax.jit`) on JAX, and on
torch `F.conv2d` on the channels_last view with the kernel copied into
channels_last per call, as `_torch.conv2d` runs it in training. It checks once
per shape that both compute the same output and gradients (to 1e-4
relative), then prints a table of milliseconds and ratios (above 1: the
matrix product is faster) and, with `--out DIR`, writes it to
`DIR/pointwise.txt` and `DIR/pointwise.json`:

    KERAS_BACKEND=jax python benchmarks/pointwise.py --out DIR
    KERAS_BACKEND=torch python benchmarks/pointwise.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# (n, h, w, in, out) of ResNet50's 1x1 convolutions at batch 16, 128x128.
SHAPES = [
    (16, 32, 32, 64, 64),
    (16, 32, 32, 256, 64),
    (16, 32, 32, 64, 256),
    (16, 16, 16, 512, 128),
    (16, 16, 16, 128, 512),
    (16, 8, 8, 1024, 256),
    (16, 8, 8, 256, 1024),
    (16, 4, 4, 2048, 512),
    (16, 4, 4, 512, 2048),
]


def _jax_functions():
    import jax
    import keras

    from keras_residual import _padding

    def conv(x, k):
        return keras.ops.conv(x, k, padding="valid")

    def pointwise(x, k):
        return _padding.pointwise(x, k, (1, 1))

    def backward(f):
        return jax.jit(jax.grad(lambda x, k, w: (f(x, k) * w).sum(), argnums=(0, 1)))

    return {
        "conv": jax.jit(conv),
        "matmul": jax.jit(pointwise),
        "conv fwd+bwd": backward(conv),
        "matmul fwd+bwd": backward(pointwise),
    }


def _torch_functions():
    import torch
    import torch.nn.functional as F

    from keras_residual import _padding

    def conv(x, k):
        weight = k.permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        return F.conv2d(x.permute(0, 3, 1, 2), weight).permute(0, 2, 3, 1)

    def pointwise(x, k):
        return _padding.pointwise(x, k, (1, 1))

    def forward(f):
        def run(x, k):
            with torch.no_grad():
                return f(x, k)

        return run

    def backward(f):
        def run(x, k, w):
            x, k = x.detach().requires_grad_(), k.detach().requires_grad_()
            return torch.autograd.grad((f(x, k) * w).sum(), (x, k))

        return run

    return {
        "conv": forward(conv),
        "matmul": forward(pointwise),
        "conv fwd+bwd": backward(conv),
        "matmul fwd+bwd": backward(pointwise),
    }


def _functions():
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        return _jax_functions()
    if backend == "torch":
        return _torch_functions()
    raise ValueError(f"runs on the jax or torch backend. Received: KERAS_BACKEND={backend!r}")


def _ready(result):
    import keras

    if keras.config.backend() == "jax":
        import jax

        jax.block_until_ready(result)
    return result


def _check(functions, x, k, w):
    import keras
    import numpy as np

    def close(a, b, what):
        a, b = keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b)
        error = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        if error > 1e-4:
            raise AssertionError(f"{what}: relative error {error:.2e} between conv and matmul")

    close(functions["matmul"](x, k), functions["conv"](x, k), "output")
    for mine, theirs, what in zip(
        functions["matmul fwd+bwd"](x, k, w),
        functions["conv fwd+bwd"](x, k, w),
        ("d input", "d kernel"),
        strict=True,
    ):
        close(mine, theirs, what)


def measure(shape, repeats: int) -> dict:
    import keras
    import numpy as np

    n, h, w_, cin, cout = shape
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.normal(size=(n, h, w_, cin)).astype("float32"))
    k = keras.ops.convert_to_tensor(rng.normal(0, 0.1, size=(1, 1, cin, cout)).astype("float32"))
    w = keras.ops.convert_to_tensor(rng.normal(size=(n, h, w_, cout)).astype("float32"))
    functions = _functions()
    _check(functions, x, k, w)  # also compiles each function: untimed
    arguments = {"conv": (x, k), "matmul": (x, k)}
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, f in functions.items():
            args = arguments.get(name, (x, k, w))
            start = time.perf_counter()
            _ready(f(*args))
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    return {
        "shape": list(shape),
        "ms": medians,
        "forward_ratio": medians["conv"] / medians["matmul"],
        "fwd_bwd_ratio": medians["conv fwd+bwd"] / medians["matmul fwd+bwd"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per function")
    parser.add_argument("--out", type=Path, default=None, help="folder for the table and JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1. Received: --repeats={args.repeats}")
    import keras

    from keras_residual.bench import _env

    backend = keras.config.backend()
    version = _env.versions(backend).get(backend)
    records = [measure(shape, args.repeats) for shape in SHAPES]
    lines = [
        f"# {backend} conv vs matmul for 1x1 kernels: {_env.host()['cpu']}, {backend} {version}",
        "",
        "| n, h, w, in, out | conv ms | matmul ms | forward x | conv fwd+bwd ms "
        "| matmul fwd+bwd ms | fwd+bwd x |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ms = r["ms"]
        lines.append(
            f"| {', '.join(map(str, r['shape']))} | {ms['conv']:.2f} | {ms['matmul']:.2f} "
            f"| {r['forward_ratio']:.2f} | {ms['conv fwd+bwd']:.2f} | {ms['matmul fwd+bwd']:.2f} "
            f"| {r['fwd_bwd_ratio']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "pointwise.txt").write_text(table + "\n")
        run = {"host": _env.host(), backend: version, "repeats": args.repeats}
        (args.out / "pointwise.json").write_text(
            json.dumps({**run, "records": records}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
