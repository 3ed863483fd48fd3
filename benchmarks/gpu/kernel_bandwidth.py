"""GB/s of each kernel of the keras_residual:: torch ops, against a device copy.

For each case (by default bfloat16 NHWC (128, 56, 56, 256) and
(128, 7, 7, 2048), and NCHW (128, 1024, 14, 14)) it times, with a
residual and relu:

- ``copy``: ``y.copy_(x)``, a device-to-device copy, the reference;
- ``bn_add_act_train``: forward statistics (reduce, reads x), finish, the
  per-channel scale and shift (small torch ops), fused forward (reads x and
  the residual, writes y);
- ``bn_add_act_backward`` (with the residual's gradient): pass 1 (reads dy,
  x, residual, writes g into dresidual), finish, pass 2 (reads g and x,
  writes dx);
- ``scale_shift_add_act``: the epilogue (reads x, residual, writes y);
- ``scale_shift_add_act_backward`` (with dresidual and dscale): one pass
  (reads dy, x, residual, writes dx and dresidual), finish.

Bytes moved are the reads plus the writes of the full-size tensors in each
pass (elements x element size x tensors); per-channel vectors and the
reduction partials (a few KB) are not counted, so GB/s is a lower bound. An
op's bytes are the sum over the kernels the profiler saw run (the batch-norm
backward's second pass differs by dtype: see KERNELS), else the expected ones.
Every timed call starts with a cold L2 (a 256 MB buffer is zeroed before it)
and behind a short busy wait on the stream, so that CUDA events measure the
device time of the call, not the Python launch. Op times come from CUDA
events (median over --reps); per-kernel times from the torch profiler's
device records (median per kernel over --profile-reps calls). Within one op,
a kernel after the first may find part of its input in L2 (all of it in the
small cases), as it would in a network.

Usage: ``python benchmarks/gpu/kernel_bandwidth.py [--device cuda]
[--cases nhwc:128x56x56x256,...] [--dtype bfloat16] [--reps 30] [--json PATH]``.
On a CPU (``--device cpu``) op times come from the wall clock and there is no
per-kernel split: only to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from gpu_common import EPSILON, dtype_name, load_ops, vector_path

DEFAULT_CASES = "nhwc:128x56x56x256,nhwc:128x7x7x2048,nchw:128x1024x14x14"
RELU = 1
ALPHA = 0.2

# op -> [(kernel name substring, label, full-size tensors read + written)],
# first match wins. The finish kernels and torch's per-channel ops move no
# full-size tensor. The batch-norm backward's second pass is one of two
# kernels: float32 / float64 read g back (written by pass 1 into dresidual or
# dx); float16 / bfloat16 recompute g from dy, x and the residual.
KERNELS = {
    "copy": [("", "copy x -> y", 2)],
    "bn_train": [
        ("reduce_kernel", "forward stats: x", 1),
        ("finish_stats_kernel", "finish stats", 0),
        ("forward_kernel", "fused forward: x, r -> y", 3),
    ],
    "bn_backward": [
        ("reduce_kernel", "backward pass 1: dy, x, r -> g (dresidual)", 4),
        ("finish_sums_kernel", "finish sums", 0),
        ("bn_dx_recompute_kernel", "backward pass 2: dy, x, r -> dx", 4),
        ("bn_dx_kernel", "backward pass 2: g, x -> dx", 3),
    ],
    "epilogue": [("forward_kernel", "epilogue: x, r -> y", 3)],
    "epilogue_backward": [
        ("reduce_kernel", "epilogue backward: dy, x, r -> dx, dr", 5),
        ("finish_sums_kernel", "finish sums", 0),
    ],
}
# Full-size tensors read + written by each op when no profile says which
# kernels ran (the batch-norm backward: 4 + 4 in 16-bit types, 4 + 3 else).
OP_TENSORS = {
    "copy": 2,
    "bn_train": 4,
    "bn_backward": (8, 7),
    "epilogue": 3,
    "epilogue_backward": 5,
}


# Kernels of the timing harness itself, left out of the per-kernel records.
HARNESS_KERNELS = ("FillFunctor", "spin_kernel", "sleep", "Memset")


def parse_cases(text: str):
    cases = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        layout, _, dims = item.partition(":")
        shape = tuple(int(v) for v in dims.split("x"))
        if layout not in ("nhwc", "nchw") or len(shape) != 4:
            raise argparse.ArgumentTypeError(f"cases look like nhwc:128x56x56x256, not {item!r}")
        cases.append((layout, shape))
    return cases


def op_bytes(op: str, numel: int, itemsize: int) -> int:
    """Bytes the op moves, by the kernels it is expected to run."""
    tensors = OP_TENSORS[op]
    if isinstance(tensors, tuple):
        tensors = tensors[0] if itemsize == 2 else tensors[1]
    return tensors * numel * itemsize


def kernel_label(op: str, name: str, numel: int, itemsize: int):
    """(label, bytes) of a kernel of `op`, by its name; bytes None when unknown."""
    for pattern, label, tensors in KERNELS[op]:
        if op == "copy" or pattern in name:
            return label, tensors * numel * itemsize
    base = name.replace("(anonymous namespace)::", "")
    short = base.split("<")[0].split("(")[0].split("::")[-1].strip() or name[:40]
    if "keras_residual" in name:
        return f"UNKNOWN keras_residual kernel: {short}", None
    return f"torch: {short}", 0


def make_calls(kr, x, residual, dy, gamma, beta, mean, var, channels_last, out):
    return {
        "copy": lambda: out.copy_(x),
        "bn_train": lambda: kr.bn_add_act_train(
            x, gamma, beta, residual, EPSILON, RELU, ALPHA, channels_last
        ),
        "bn_backward": lambda: kr.bn_add_act_backward(
            dy, x, residual, mean, var, gamma, beta, EPSILON, RELU, ALPHA, channels_last, True
        ),
        "epilogue": lambda: kr.scale_shift_add_act(
            x, gamma, beta, residual, RELU, ALPHA, channels_last
        ),
        "epilogue_backward": lambda: kr.scale_shift_add_act_backward(
            dy, x, gamma, beta, residual, RELU, ALPHA, channels_last, True, True
        ),
    }


def time_cuda(fn, reps, warmup, flush):
    """Median device seconds of fn() with a cold L2, from CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(reps):
        flush.zero_()
        torch.cuda._sleep(1_000_000)  # the launches below queue up behind it
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3


def time_cpu(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def profile_kernels(fn, reps, flush):
    """{kernel name: [device seconds per call]} of fn(), from the torch profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    events = prof.events()
    for event in events:
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if not any(h in event.name for h in HARNESS_KERNELS):
            kernels.setdefault(event.name, []).append(event.time_range.elapsed_us() / 1e6)
    if not kernels:  # older layouts: the kernels hang off the CPU events that launched them
        for event in events:
            for kernel in getattr(event, "kernels", []) or []:
                if not any(h in kernel.name for h in HARNESS_KERNELS):
                    kernels.setdefault(kernel.name, []).append(kernel.duration / 1e6)
    if not kernels:
        raise RuntimeError("the profiler recorded no CUDA kernels")
    return kernels


def run_case(kr, layout, shape, dtype, device, args, flush):
    import torch

    channels_last = layout == "nhwc"
    c = shape[3] if channels_last else shape[1]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    residual = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    dy = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    out = torch.empty_like(x)
    gamma = torch.rand(c, device=device, generator=gen) + 0.5
    beta = torch.randn(c, device=device, generator=gen)
    _, mean, var = kr.bn_add_act_train(
        x, gamma, beta, residual, EPSILON, RELU, ALPHA, channels_last
    )
    calls = make_calls(kr, x, residual, dy, gamma, beta, mean, var, channels_last, out)
    numel, itemsize = x.numel(), x.element_size()
    path = "vector" if vector_path(shape, channels_last, dtype) else "scalar"
    record = {
        "layout": layout,
        "shape": list(shape),
        "dtype": dtype_name(dtype),
        "path": path,
        "bytes_per_tensor": numel * itemsize,
        "ops": [],
    }
    for op, fn in calls.items():
        if device.type == "cuda":
            seconds = time_cuda(fn, args.reps, args.warmup, flush)
        else:
            seconds = time_cpu(fn, args.reps, args.warmup)
        moved = op_bytes(op, numel, itemsize)
        entry = {
            "op": op,
            "seconds": seconds,
            "bytes": moved,
            "gbps": moved / seconds / 1e9,
            "kernels": [],
        }
        if device.type == "cuda" and not args.no_profile:
            try:
                for name, times in profile_kernels(fn, args.profile_reps, flush).items():
                    label, kbytes = kernel_label(op, name, numel, itemsize)
                    median = statistics.median(times)
                    entry["kernels"].append(
                        {
                            "label": label,
                            "name": name[:200],
                            "calls": len(times),
                            "seconds": median,
                            "bytes": kbytes,
                            "gbps": kbytes / median / 1e9 if kbytes else None,
                        }
                    )
            except Exception as error:  # noqa: BLE001 - the op times stand on their own
                entry["profile_error"] = f"{type(error).__name__}: {error}"
        entry["bytes_from"] = "the kernels expected"
        seen = [k["bytes"] for k in entry["kernels"]]
        if seen and None not in seen and sum(seen) != moved:
            # The kernels that ran say otherwise (the kernels changed): trust them.
            entry["bytes_expected"] = moved
            entry["bytes"] = moved = sum(seen)
            entry["gbps"] = moved / seconds / 1e9
            entry["bytes_from"] = "the kernels that ran"
        elif None in seen:
            entry["bytes_from"] = "the kernels expected; an unknown keras_residual kernel ran"
        record["ops"].append(entry)
    copy = record["ops"][0]["gbps"]
    for entry in record["ops"]:
        entry["of_copy"] = entry["gbps"] / copy
        for kernel in entry["kernels"]:
            kernel["of_copy"] = kernel["gbps"] / copy if kernel["gbps"] else None
    return record


def table(records) -> str:
    lines = [
        f"{'case':36s} {'op / kernel':44s} {'us':>9s} {'MB':>8s} {'GB/s':>7s} {'% copy':>7s}",
    ]
    for r in records:
        name = f"{r['layout']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['path']}"
        for entry in r["ops"]:
            lines.append(
                f"{name:36s} {entry['op'] + ' (op)':44s} {entry['seconds'] * 1e6:9.1f} "
                f"{entry['bytes'] / 1e6:8.1f} {entry['gbps']:7.0f} {100 * entry['of_copy']:6.0f}%"
            )
            name = ""
            for k in sorted(entry["kernels"], key=lambda k: -k["seconds"]):
                gbps = f"{k['gbps']:7.0f}" if k["gbps"] else f"{'-':>7s}"
                share = f"{100 * k['of_copy']:6.0f}%" if k["of_copy"] else f"{'-':>7s}"
                mb = f"{k['bytes'] / 1e6:8.1f}" if k["bytes"] is not None else f"{'?':>8s}"
                lines.append(
                    f"{'':36s}   {k['label'][:42]:42s} {k['seconds'] * 1e6:9.1f} "
                    f"{mb} {gbps} {share}  x{k['calls']}"
                )
            if entry.get("profile_error"):
                lines.append(f"{'':36s}   profiler: {entry['profile_error']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", type=parse_cases, default=parse_cases(DEFAULT_CASES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-reps", type=int, default=10)
    parser.add_argument("--no-profile", action="store_true", help="op times only")
    parser.add_argument("--flush-mb", type=int, default=256)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    load_ops(require_cuda=device.type == "cuda")
    kr = torch.ops.keras_residual
    dtype = getattr(torch, args.dtype)
    flush = None
    if device.type == "cuda":
        flush = torch.empty(args.flush_mb * 2**20, dtype=torch.uint8, device=device)
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = "cpu"
    records = []
    for layout, shape in args.cases:
        records.append(run_case(kr, layout, shape, dtype, device, args, flush))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    text = table(records)
    print(
        f"kernel bandwidth on {device_name}, {args.dtype}, median of {args.reps} "
        f"{'cold-L2 CUDA-event' if device.type == 'cuda' else 'wall-clock'} timings"
    )
    print(text)
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "reps": args.reps,
        "flush_mb": args.flush_mb if device.type == "cuda" else None,
        "method": "CUDA events per op (cold L2, queued behind a busy wait); torch profiler "
        "device records per kernel"
        if device.type == "cuda"
        else "wall clock (CPU)",
        "bytes": "reads + writes of full-size tensors per pass; per-channel data not counted",
        "cases": records,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
