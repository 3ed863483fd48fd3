"""A short run of every keras_residual:: torch op, for compute-sanitizer.

Runs the training op (``bn_add_act_train``) and the epilogue
(``scale_shift_add_act``) through ``keras_residual.native._torch``, forward
and backward through autograd, in NHWC and NCHW, on the 128-bit vector path
(C or H*W a multiple of the vector width) and the scalar path (C = 67, odd
H*W, or a storage offset of one element), in float32 and bfloat16, with a
few rows and with enough rows for several reduction splits, with a residual
whose gradient is wanted (the backward writes dresidual), one whose gradient
is not, and none (the paths where g lives in dx, or is recomputed). Each result is
compared with a float64 reference of the composite formula (on the CPU, so
the device runs little besides the ops). Keras is not needed.

Under ``compute-sanitizer --tool memcheck|racecheck|synccheck|initcheck``
this is the workload; run plainly, ``--extra stream,compile`` adds two smoke
checks: the ops on a non-default stream (``with torch.cuda.stream(s):``,
queued behind a busy wait on that stream, so a kernel launched on the wrong
stream reads inputs not yet written) equal the default-stream results, and
``torch.compile`` of a block of the ops equals eager.

Usage: ``python benchmarks/gpu/sanitize_ops.py [--device cuda|cpu]
[--extra stream,compile] [--compile-backend inductor] [--json PATH]``.
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

from gpu_common import (
    EPSILON,
    dtype_name,
    epilogue_ref,
    excess_error,
    load_ops,
    train_ref,
    vector_path,
)

# (name, shape, channels_last, storage offset of x, residual and dy, residual):
# residual "grad" (its gradient wanted: the backward writes dresidual), "nograd"
# (given, gradient not wanted) or "none".
CASES = [
    ("nhwc_vector", (2, 5, 6, 64), True, 0, "grad"),
    ("nhwc_c67", (2, 5, 6, 67), True, 0, "none"),
    ("nhwc_offset1", (2, 5, 6, 64), True, 1, "nograd"),
    ("nhwc_splits", (8, 28, 28, 64), True, 0, "grad"),
    ("nhwc_splits_nr", (8, 28, 28, 64), True, 0, "none"),
    ("nchw_vector", (2, 64, 4, 8), False, 0, "none"),
    ("nchw_c67", (2, 67, 5, 7), False, 0, "grad"),
    ("nchw_offset1", (2, 64, 4, 8), False, 1, "grad"),
    ("nchw_splits", (8, 64, 28, 28), False, 0, "grad"),
    ("nchw_splits_ng", (8, 64, 28, 28), False, 0, "nograd"),
]


def make_inputs(shape, channels_last, dtype, seed=0):
    """x, gamma, beta, residual, dy on the CPU (x, residual, dy in dtype)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    c = shape[3] if channels_last else shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.7).to(dtype)
    gamma = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).float()
    beta = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).float()
    residual = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, gamma, beta, residual, dy


def place(t, device, offset):
    """t on device; with offset, a contiguous view starting `offset` elements into its storage."""
    import torch

    if not offset:
        return t.to(device).contiguous()
    storage = torch.zeros(t.numel() + offset, dtype=t.dtype, device=device)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


def ref_grads(fn, inputs, wanted, dy):
    """float64 outputs of fn(*inputs) and the gradients of sum(fn(...)[0] * dy).

    inputs: tensors or None; wanted: whether each one's gradient is wanted.
    """
    import torch

    leaves = [
        None if t is None else t.detach().double().requires_grad_(w)
        for t, w in zip(inputs, wanted, strict=True)
    ]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    targets = [t for t, w in zip(leaves, wanted, strict=True) if t is not None and w]
    grads = torch.autograd.grad((outs[0] * dy.double()).sum(), targets)
    return [o.detach() for o in outs], list(grads)


def _grad_names(prefix, residual_mode):
    names = [f"{prefix}_dx", f"{prefix}_dgamma" if prefix == "bn" else f"{prefix}_dscale"]
    names.append(f"{prefix}_dbeta" if prefix == "bn" else f"{prefix}_dshift")
    if residual_mode == "grad":
        names.append(f"{prefix}_dresidual")
    return names


def run_ops(adapter, x, gamma, beta, residual, dy, channels_last, residual_mode="grad"):
    """Forward and backward (autograd) of both ops; returns the named outputs."""
    import torch

    def leaves():
        res = None
        if residual_mode != "none":
            res = residual.detach().requires_grad_(residual_mode == "grad")
        return [t.detach().requires_grad_(True) for t in (x, gamma, beta)] + [res]

    def targets(ls):
        return ls[:3] + ([ls[3]] if residual_mode == "grad" else [])

    out = {}
    ls = leaves()
    y, mean, var = adapter.bn_add_act_train(
        *ls, epsilon=EPSILON, activation="relu", channels_last=channels_last
    )
    grads = torch.autograd.grad(y, targets(ls), dy)
    out.update(bn_y=y, bn_mean=mean, bn_var=var)
    out.update(zip(_grad_names("bn", residual_mode), grads, strict=True))
    ls = leaves()
    y = adapter.scale_shift_add_act(*ls, activation="silu", channels_last=channels_last)
    grads = torch.autograd.grad(y, targets(ls), dy)
    out["ep_y"] = y
    out.update(zip(_grad_names("ep", residual_mode), grads, strict=True))
    return {name: t.detach() for name, t in out.items()}


def references(x, gamma, beta, residual, dy, channels_last, residual_mode="grad"):
    def bn(x_, g_, b_, r_):
        return train_ref(x_, g_, b_, r_, "relu", channels_last)

    def ep(x_, s_, h_, r_):
        return epilogue_ref(x_, s_, h_, r_, "silu", channels_last)

    inputs = (x, gamma, beta, None if residual_mode == "none" else residual)
    wanted = (True, True, True, residual_mode == "grad")
    ref = {}
    (y, mean, var), grads = ref_grads(bn, inputs, wanted, dy)
    ref.update(bn_y=y, bn_mean=mean, bn_var=var)
    ref.update(zip(_grad_names("bn", residual_mode), grads, strict=True))
    (y,), grads = ref_grads(ep, inputs, wanted, dy)
    ref["ep_y"] = y
    ref.update(zip(_grad_names("ep", residual_mode), grads, strict=True))
    return ref


def check_case(adapter, device, name, shape, channels_last, offset, residual_mode, dtype):
    x, gamma, beta, residual, dy = make_inputs(shape, channels_last, dtype)
    on_device = [
        place(x, device, offset),
        gamma.to(device),
        beta.to(device),
        place(residual, device, offset),
        place(dy, device, offset),
    ]
    got = run_ops(adapter, *on_device, channels_last, residual_mode)
    got = {key: t.cpu() for key, t in got.items()}
    expected = references(x, gamma, beta, residual, dy, channels_last, residual_mode)
    if sorted(got) != sorted(expected):
        raise AssertionError(f"outputs {sorted(got)} != {sorted(expected)}")
    failures, worst = [], 0.0
    for key, value in expected.items():
        # Per-channel outputs of bfloat16 runs sum bfloat16-rounded terms: the
        # bound of the input dtype applies to every output, as in the tests.
        excess, allowed = excess_error(got[key], value, dtype)
        worst = max(worst, excess / allowed)
        if not excess <= allowed:
            failures.append(f"{key}: excess {excess:.3g} > {allowed:.3g}")
    path = "vector" if vector_path(shape, channels_last, dtype, offset) else "scalar"
    return {
        "case": name,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
        "layout": "nhwc" if channels_last else "nchw",
        "offset": offset,
        "residual": residual_mode,
        "path": path,
        "worst_error_over_bound": round(worst, 4),
        "ok": not failures,
        "failures": failures,
    }


def check_stream(adapter, device):
    """The ops on a non-default stream, behind a busy wait there, equal the default stream."""
    import torch

    shape, channels_last = (8, 28, 28, 64), True
    x, gamma, beta, residual, dy = (
        t.to(device) for t in make_inputs(shape, channels_last, torch.float32)
    )
    expected = run_ops(adapter, x, gamma, beta, residual, dy, channels_last)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # some tens of ms of busy wait on `side`
        # Written on `side` after the wait: a kernel queued elsewhere reads them early.
        xs, rs, dys = x.clone(), residual.clone(), dy.clone()
        got = run_ops(adapter, xs, gamma, beta, rs, dys, channels_last)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    bad = [key for key in expected if not torch.equal(expected[key], got[key])]
    diffs = {key: (expected[key] - got[key]).abs().max().item() for key in bad}
    return {"check": "stream", "ok": not bad, "differs": diffs}


def check_compile(adapter, device, backend):
    """torch.compile(fullgraph) of bn -> epilogue equals eager, forward and gradients."""
    import torch

    shape, channels_last = (4, 6, 6, 32), True
    x, gamma, beta, residual, dy = (
        t.to(device) for t in make_inputs(shape, channels_last, torch.float32, seed=3)
    )

    def block(x_, g_, b_, r_):
        y, mean, _ = adapter.bn_add_act_train(
            x_, g_, b_, r_, epsilon=EPSILON, activation="relu", channels_last=channels_last
        )
        y = adapter.scale_shift_add_act(y, g_, b_, None, activation="silu", channels_last=True)
        return y, mean

    note = None
    if backend == "inductor" and device.type == "cuda":
        try:
            import triton  # noqa: F401 - inductor's CUDA code generator
        except ImportError as error:
            backend, note = "aot_eager", f"inductor needs triton ({error}): aot_eager instead"
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    results = []
    start = time.perf_counter()
    for fn in (block, compiled):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, gamma, beta, residual)]
        y, mean = fn(*leaves)
        grads = torch.autograd.grad(y, leaves, dy)
        results.append([y.detach(), mean.detach(), *grads])
    names = ["y", "mean", "dx", "dgamma", "dbeta", "dresidual"]
    diffs, bad = {}, []
    for name, eager, traced in zip(names, *results, strict=True):
        diffs[name] = (eager - traced).abs().max().item()
        if not torch.allclose(traced, eager, rtol=1e-5, atol=1e-5):
            bad.append(name)
    return {
        "check": "compile",
        "backend": backend,
        "note": note,
        "ok": not bad,
        "max_abs_diff": diffs,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--extra", default="", help="comma list of: stream, compile")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="inductor (aot_eager where triton is missing), aot_eager, eager",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    extra = {e.strip() for e in args.extra.split(",") if e.strip()}
    unknown = extra - {"stream", "compile"}
    if unknown:
        parser.error(f"unknown --extra checks: {sorted(unknown)}")

    import torch

    device = torch.device(args.device)
    adapter = load_ops(require_cuda=device.type == "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",") if name.strip()]
    results = {"device": str(device), "cases": [], "extra": []}
    ok = True
    for name, shape, channels_last, offset, residual_mode in CASES:
        for dtype in dtypes:
            try:
                record = check_case(
                    adapter, device, name, shape, channels_last, offset, residual_mode, dtype
                )
            except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                traceback.print_exc()
                record = {
                    "case": name,
                    "dtype": dtype_name(dtype),
                    "ok": False,
                    "failures": [f"{type(error).__name__}: {error}"],
                }
            ok &= record["ok"]
            results["cases"].append(record)
            print(
                f"{'ok  ' if record['ok'] else 'FAIL'} {name:15s} {record['dtype']:9s} "
                f"{record.get('path', '?'):6s} worst error/bound "
                f"{record.get('worst_error_over_bound', float('nan')):.3f} "
                + "; ".join(record["failures"]),
                flush=True,
            )
    for check in sorted(extra):
        if check == "stream" and device.type != "cuda":
            record = {"check": "stream", "ok": True, "skipped": "streams need CUDA"}
        else:
            try:
                if check == "stream":
                    record = check_stream(adapter, device)
                else:
                    record = check_compile(adapter, device, args.compile_backend)
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                record = {"check": check, "ok": False, "error": f"{type(error).__name__}: {error}"}
        ok &= record["ok"]
        results["extra"].append(record)
        print(f"{'ok  ' if record['ok'] else 'FAIL'} {check}: {json.dumps(record)}", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    failed = sum(not r["ok"] for r in results["cases"] + results["extra"])
    total = len(results["cases"]) + len(results["extra"])
    results["ok"] = ok
    print(f"sanitize_ops: {total - failed}/{total} checks passed on {device}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
