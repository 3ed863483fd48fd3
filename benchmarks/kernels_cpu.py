"""Micro-benchmark of the CPU kernels through the ``_core`` module.

Times the training forward (batch_stats + scale_shift_add_act) and the
training backward (batch_norm_add_act_backward) of the fused
BatchNormalization + residual add + activation on one tensor, and relates
them to the time of one pass over the tensor's memory, measured here as the
median of a NumPy sum (one read).

Usage:
    python benchmarks/kernels_cpu.py [--shape 16 28 28 256] [--activation relu]
        [--dtype float32] [--channels-first] [--no-residual] [--repeats 21]
        [--threads 0]

A pass count is the number of times a kernel reads or writes a tensor-sized
array: statistics 1 read, forward 2 reads + 1 write (3 with a residual: x,
residual, y), backward 3 + 1 (pass 1) and 2 + 1 (pass 2). The ideal total
with a residual is 1 + 3 + 4 + 3 = 11 passes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from keras_residual.native.core import load_core


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up: first-touch page faults, thread start-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[16, 28, 28, 256])
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16"])
    parser.add_argument("--channels-first", action="store_true")
    parser.add_argument("--no-residual", action="store_true")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    core = load_core()
    core.set_num_threads(args.threads)
    channels_last = not args.channels_first
    n, h, w, c = args.shape
    shape = (n, h, w, c) if channels_last else (n, c, h, w)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(args.dtype)
    r = None if args.no_residual else rng.standard_normal(shape).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    pdt = np.float64 if args.dtype == "float64" else np.float32
    gamma = rng.uniform(0.5, 1.5, c).astype(pdt)
    beta = rng.standard_normal(c).astype(pdt)
    eps = 1e-3
    kw = {"channels_last": channels_last}
    act = args.activation

    def forward():
        mean, var = core.batch_stats(x, **kw)
        scale = (gamma / np.sqrt(var + eps)).astype(pdt)
        shift = (beta - mean * scale).astype(pdt)
        return core.scale_shift_add_act(x, scale, shift, r, activation=act, **kw), mean, var

    _, mean, var = forward()
    scale = (gamma / np.sqrt(var + eps)).astype(pdt)
    shift = (beta - mean * scale).astype(pdt)

    def backward():
        return core.batch_norm_add_act_backward(
            dy, x, mean, var, gamma, beta, r, epsilon=eps, activation=act, **kw
        )

    def train_step():
        forward()
        backward()

    results = {
        "one pass (numpy sum, 1 read)": median_ms(lambda: x.sum(), args.repeats),
        "numpy copy (1 read + 1 write)": median_ms(lambda: x.copy(), args.repeats),
        "batch_stats": median_ms(lambda: core.batch_stats(x, **kw), args.repeats),
        "scale_shift_add_act": median_ms(
            lambda: core.scale_shift_add_act(x, scale, shift, r, activation=act, **kw),
            args.repeats,
        ),
        "batch_norm_add_act_backward": median_ms(backward, args.repeats),
        "training forward + backward": median_ms(train_step, args.repeats),
    }
    one_pass = results["one pass (numpy sum, 1 read)"]
    residual_passes = 0 if r is None else 1
    ideal = 1 + (2 + residual_passes) + (3 + residual_passes) + 3
    print(
        f"shape={shape} dtype={args.dtype} activation={act} residual={r is not None} "
        f"threads={core.num_threads()} ({core.build_info()['compiler']})"
    )
    for name, ms in results.items():
        print(f"  {name:32s} {ms:8.3f} ms  = {ms / one_pass:5.1f} passes")
    total = results["training forward + backward"]
    print(f"  ideal training passes: {ideal}; measured {total / one_pass:.1f}")
    return results


if __name__ == "__main__":
    main()
