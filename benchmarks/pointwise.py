"""A 1x1 convolution against what the adapters may run instead (CPU).

For each 1x1 convolution shape of ResNet50 (batch 16, 128x128, NHWC,
float32), times interleaved, median of `--repeats`, the backend's
convolution and each alternative:

- forward;
- forward and backward: the gradients of `sum(y * w)` with respect to the
  input and the kernel.

The convolution is XLA's (`keras.ops.conv` under `jax.jit`) on JAX, and on
torch `F.conv2d` on the channels_last view with the kernel in channels_last
(`_torch._conv_weight`) as `_torch.conv2d` runs it: copied per call in
training (the native transpose where the library loads), once at inference
(the forward here, under `torch.no_grad`). The
alternatives: `matmul`, one matrix product (`_padding.pointwise`), on both;
on torch also `conv_transpose`, `F.conv_transpose2d` with the Keras kernel
permuted and not copied. It checks once per shape that all compute the same
output and gradients (to 1e-4 relative), then prints a table of
milliseconds and ratios (above 1: the alternative is faster than the
convolution) and, with `--out DIR`, writes it to `DIR/pointwise.txt` and
`DIR/pointwise.json`:

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

    return {name: (jax.jit(f), backward(f)) for name, f in (("conv", conv), ("matmul", pointwise))}


def _torch_functions():
    import torch
    import torch.nn.functional as F

    from keras_residual import _padding, native
    from keras_residual.native import _torch

    try:
        native.adapter("torch")  # the native kernel transpose, where it loads
    except native.NativeUnavailable as error:
        print(f"native library unavailable ({error}): torch's kernel copy", file=sys.stderr)

    def conv(x, k):
        weight = _torch._conv_weight(k, torch.channels_last)
        return F.conv2d(x.permute(0, 3, 1, 2), weight).permute(0, 2, 3, 1)

    def pointwise(x, k):
        return _padding.pointwise(x, k, (1, 1))

    def transposed(x, k):
        return F.conv_transpose2d(x.permute(0, 3, 1, 2), k.permute(2, 3, 0, 1)).permute(0, 2, 3, 1)

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

    candidates = (("conv", conv), ("matmul", pointwise), ("conv_transpose", transposed))
    return {name: (forward(f), backward(f)) for name, f in candidates}


def _functions():
    """`{name: (forward, forward_and_backward)}`, the convolution first."""
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
            raise AssertionError(f"{what}: relative error {error:.2e} against the convolution")

    conv, conv_grads = functions["conv"]
    for name, (forward, backward) in functions.items():
        close(forward(x, k), conv(x, k), f"{name} output")
        for mine, theirs, what in zip(
            backward(x, k, w), conv_grads(x, k, w), ("d input", "d kernel"), strict=True
        ):
            close(mine, theirs, f"{name} {what}")


def measure(shape, repeats: int) -> dict:
    """Median milliseconds per function on `shape` `(n, h, w, in, out)`, and
    each alternative's speed-up over the convolution (`ratios`)."""
    import keras
    import numpy as np

    n, h, w_, cin, cout = shape
    rng = np.random.default_rng(0)
    x = keras.ops.convert_to_tensor(rng.normal(size=(n, h, w_, cin)).astype("float32"))
    k = keras.ops.convert_to_tensor(rng.normal(0, 0.1, size=(1, 1, cin, cout)).astype("float32"))
    w = keras.ops.convert_to_tensor(rng.normal(size=(n, h, w_, cout)).astype("float32"))
    functions = _functions()
    _check(functions, x, k, w)  # also compiles each function: untimed
    calls = {}
    for name, (forward, backward) in functions.items():
        calls[name] = (forward, (x, k))
        calls[f"{name} fwd+bwd"] = (backward, (x, k, w))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (f, args) in calls.items():
            start = time.perf_counter()
            _ready(f(*args))
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    ratios = {
        name: {
            "forward": ms["conv"] / ms[name],
            "fwd_bwd": ms["conv fwd+bwd"] / ms[f"{name} fwd+bwd"],
        }
        for name in functions
        if name != "conv"
    }
    return {"shape": list(shape), "ms": ms, "ratios": ratios}


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
    alternatives = list(records[0]["ratios"])
    header = ["n, h, w, in, out", "conv ms", "conv fwd+bwd ms"]
    for name in alternatives:
        header += [f"{name} ms", f"{name} fwd+bwd ms", f"{name} forward x", f"{name} fwd+bwd x"]
    lines = [
        f"# {backend}: a 1x1 conv against {', '.join(alternatives)}: "
        f"{_env.host()['cpu']}, {backend} {version}",
        "",
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
    ]
    for r in records:
        ms = r["ms"]
        cells = [", ".join(map(str, r["shape"])), f"{ms['conv']:.2f}", f"{ms['conv fwd+bwd']:.2f}"]
        for name in alternatives:
            ratio = r["ratios"][name]
            cells += [
                f"{ms[name]:.2f}",
                f"{ms[name + ' fwd+bwd']:.2f}",
                f"{ratio['forward']:.2f}",
                f"{ratio['fwd_bwd']:.2f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
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
