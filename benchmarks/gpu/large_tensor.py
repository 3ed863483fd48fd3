"""The torch ops on a bfloat16 tensor of more than 2**31 elements, against a reference.

For each case (by default NHWC (2, 33, 32768, 1000), the vector path, and
NCHW (2, 1000, 33, 32767), the scalar path: 2,162,688,000 and 2,162,622,000
elements, about 4.3 GB each in bfloat16), it runs the training op
(``bn_add_act_train``, relu, with a residual) and the epilogue
(``scale_shift_add_act``, relu, scale and residual), forward and backward
through autograd, then checks:

- the per-channel outputs (mean, var, dgamma, dbeta, dscale, dshift) for
  every channel, against float64 sums over the whole tensor, in chunks;
- y, dx and dresidual of both ops on windows of the flat index: the first
  elements, both sides of element 2**31 and the last elements, against the
  composite formula in float64 (gradients where the pre-activation is within
  1e-4 of 0 are left out: there the relu's side is a rounding matter).

Peak device memory is about 7 tensors of the case (x, residual, dy, y or
dx and dresidual, and the saved ones): about 30 GB.

Usage: ``python benchmarks/gpu/large_tensor.py [--device cuda] [--cases nhwc,nchw]
[--nhwc-shape 2,33,32768,1000] [--nchw-shape 2,1000,33,32767] [--json PATH]``;
``--device cpu`` with small shapes and ``--boundary`` checks the logic on a CPU.
Exit status 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from gpu_common import EPSILON, excess_error, load_ops, vector_path

NEAR_ZERO = 1e-4
# (rtol, atol) of the per-channel gradient sums.
SUMS = (1e-3, 1e-3)


def parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    if len(shape) != 4 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"a 4D shape like 2,33,32768,1000, not {text!r}")
    return shape


def windows(total: int, boundary: int, width: int) -> list[tuple[int, int]]:
    """Flat index ranges: the start, both sides of `boundary`, the end (merged, in range)."""
    half = width // 2
    spans = [(0, width), (boundary - half, boundary + half), (total - width, total)]
    spans = sorted((max(0, lo), min(total, hi)) for lo, hi in spans if hi > 0 and lo < total)
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def channel_of(flat, shape, channels_last: bool):
    """Channel index of flat (contiguous) element indices."""
    n, d1, d2, d3 = shape
    if channels_last:
        return flat % d3
    return (flat // (d2 * d3)) % d1


def row_chunks(shape, channels_last: bool, rows: int):
    """Keys that cut a tensor of `shape` into chunks of at most `rows` rows per channel."""
    n, d1, d2, d3 = shape
    if channels_last:
        m = n * d1 * d2
        for lo in range(0, m, rows):
            yield ("nhwc", lo, min(m, lo + rows))
    else:
        hw = d2 * d3
        for b in range(n):
            for lo in range(0, hw, rows):
                yield ("nchw", b, lo, min(hw, lo + rows))


def take(t, key, shape):
    """The chunk of t for a key of row_chunks: (rows, C) in NHWC, (C, rows) in NCHW.

    Both are views with a contiguous last dimension, so that the float64
    copies read memory in order.
    """
    n, d1, d2, d3 = shape
    if key[0] == "nhwc":
        return t.view(-1, d3)[key[1] : key[2]]
    return t.view(n, d1, d2 * d3)[key[1], :, key[2] : key[3]]


def channel_sum(t, key):
    """Per-channel sum of a chunk of take()."""
    return t.sum(0) if key[0] == "nhwc" else t.sum(1)


def per_row(v, key):
    """A per-channel vector shaped to broadcast over a chunk of take()."""
    return v if key[0] == "nhwc" else v[:, None]


def reference_sums(x, residual, dy, gamma, beta, shape, channels_last, rows):
    """Per-channel float64 statistics and gradient sums over the whole tensor."""
    import torch

    c = shape[3] if channels_last else shape[1]
    dev = x.device
    s1 = torch.zeros(c, dtype=torch.float64, device=dev)
    m = x.numel() // c
    keys = list(row_chunks(shape, channels_last, rows))
    for key in keys:
        s1 += channel_sum(take(x, key, shape).double(), key)
    mean = s1 / m
    s2 = torch.zeros_like(s1)
    for key in keys:
        s2 += channel_sum((take(x, key, shape).double() - per_row(mean, key)) ** 2, key)
    var = s2 / m
    invstd = torch.rsqrt(var + EPSILON)
    g64, b64 = gamma.double(), beta.double()
    sc = g64 * invstd
    sums = {k: torch.zeros_like(s1) for k in ("dbeta", "sgx", "dshift", "dscale")}
    for key in keys:
        xc = take(x, key, shape).double()
        rc = take(residual, key, shape).double()
        dyc = take(dy, key, shape).double()
        centred = xc - per_row(mean, key)
        g = dyc * ((centred * per_row(sc, key) + per_row(b64, key) + rc) > 0)
        sums["dbeta"] += channel_sum(g, key)
        sums["sgx"] += channel_sum(g * centred, key)
        g = dyc * ((xc * per_row(g64, key) + per_row(b64, key) + rc) > 0)
        sums["dshift"] += channel_sum(g, key)
        sums["dscale"] += channel_sum(g * xc, key)
        del xc, rc, dyc, centred, g
    return {
        "mean": mean,
        "var": var,
        "invstd": invstd,
        "dgamma": sums["sgx"] * invstd,
        "dbeta": sums["dbeta"],
        "dscale": sums["dscale"],
        "dshift": sums["dshift"],
        "m": m,
    }


def compare(name, actual, expected, dtype, results, mask=None, tolerance=None):
    actual = actual.detach()
    if mask is not None:
        actual, expected = actual[mask], expected[mask]
    excess, allowed = excess_error(actual, expected, dtype, tolerance)
    ok = excess <= allowed
    results.append({"check": name, "ok": ok, "excess": excess, "allowed": allowed})
    print(
        f"  {'ok  ' if ok else 'FAIL'} {name:30s} excess {excess:.3g} (allowed {allowed:.3g})",
        flush=True,
    )
    return ok


def run_case(adapter, name, shape, channels_last, device, boundary, width, rows):
    import torch

    dtype = torch.bfloat16
    total = math.prod(shape)
    c = shape[3] if channels_last else shape[1]
    path = "vector" if vector_path(shape, channels_last, dtype) else "scalar"
    print(
        f"{name}: shape {shape} ({total:,} elements, {total * 2 / 1e9:.2f} GB each), "
        f"{'NHWC' if channels_last else 'NCHW'}, {path} path",
        flush=True,
    )
    start = time.perf_counter()
    torch.manual_seed(0)
    x = torch.empty(shape, dtype=dtype, device=device).normal_(0.7, 1.5)
    residual = torch.empty(shape, dtype=dtype, device=device).normal_()
    dy = torch.empty(shape, dtype=dtype, device=device).normal_()
    gamma = torch.rand(c, device=device) + 0.5
    beta = torch.randn(c, device=device) * 0.5
    checks: list[dict] = []
    ok = True
    ref = reference_sums(x, residual, dy, gamma, beta, shape, channels_last, rows)
    spans = windows(total, boundary, width)
    flat_idx = torch.cat([torch.arange(lo, hi, device=device) for lo, hi in spans])
    ch = channel_of(flat_idx, shape, channels_last)

    def flat(t):
        return torch.cat([t.detach().reshape(-1)[lo:hi] for lo, hi in spans]).double()

    xs, rs, dys = flat(x), flat(residual), flat(dy)
    g64, b64 = gamma.double(), beta.double()

    # -- the training op ------------------------------------------------------------
    leaves = [t.requires_grad_(True) for t in (x, gamma, beta, residual)]
    y, mean, var = adapter.bn_add_act_train(
        *leaves, epsilon=EPSILON, activation="relu", channels_last=channels_last
    )
    dx, dgamma, dbeta, dres = torch.autograd.grad(y, leaves, dy)
    ok &= compare("bn mean (all channels)", mean, ref["mean"], torch.float32, checks)
    ok &= compare("bn var (all channels)", var, ref["var"], torch.float32, checks)
    # Sums over m rows: a pre-activation within float32 rounding of 0 may take
    # the other side of the relu (a term of about 1 in sums of about sqrt(m)).
    ok &= compare("bn dgamma (all channels)", dgamma, ref["dgamma"], dtype, checks, None, SUMS)
    ok &= compare("bn dbeta (all channels)", dbeta, ref["dbeta"], dtype, checks, None, SUMS)
    sc = (g64 * ref["invstd"])[ch]
    z = (xs - ref["mean"][ch]) * sc + b64[ch] + rs
    clear = z.abs() > NEAR_ZERO
    g = dys * (z > 0)
    m = ref["m"]
    dx_ref = sc * g - sc * ref["dbeta"][ch] / m
    dx_ref = dx_ref - sc * ref["invstd"][ch] * (xs - ref["mean"][ch]) * ref["dgamma"][ch] / m
    ok &= compare("bn y (windows)", flat(y), torch.relu(z), dtype, checks)
    ok &= compare("bn dx (windows)", flat(dx), dx_ref, dtype, checks, clear)
    ok &= compare("bn dresidual (windows)", flat(dres), g, dtype, checks, clear)
    del y, mean, var, dx, dgamma, dbeta, dres, z, g, dx_ref

    # -- the epilogue -----------------------------------------------------------------
    y = adapter.scale_shift_add_act(*leaves, activation="relu", channels_last=channels_last)
    dx, dscale, dshift, dres = torch.autograd.grad(y, leaves, dy)
    ok &= compare(
        "epilogue dscale (all channels)", dscale, ref["dscale"], dtype, checks, None, SUMS
    )
    ok &= compare(
        "epilogue dshift (all channels)", dshift, ref["dshift"], dtype, checks, None, SUMS
    )
    z = xs * g64[ch] + b64[ch] + rs
    clear = z.abs() > NEAR_ZERO
    g = dys * (z > 0)
    ok &= compare("epilogue y (windows)", flat(y), torch.relu(z), dtype, checks)
    ok &= compare("epilogue dx (windows)", flat(dx), g * g64[ch], dtype, checks, clear)
    ok &= compare("epilogue dresidual (windows)", flat(dres), g, dtype, checks, clear)
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    del y, dx, dscale, dshift, dres, leaves, x, residual, dy
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    seconds = time.perf_counter() - start
    print(
        f"{name}: {'ok' if ok else 'FAILED'} in {seconds:.1f}s"
        + (f", peak {peak:.1f} GB" if peak else ""),
        flush=True,
    )
    return {
        "case": name,
        "shape": list(shape),
        "elements": total,
        "layout": "nhwc" if channels_last else "nchw",
        "path": path,
        "windows": spans,
        "ok": bool(ok),
        "checks": checks,
        "seconds": round(seconds, 1),
        "peak_gb": peak,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default="nhwc,nchw")
    parser.add_argument("--nhwc-shape", type=parse_shape, default=(2, 33, 32768, 1000))
    parser.add_argument("--nchw-shape", type=parse_shape, default=(2, 1000, 33, 32767))
    parser.add_argument(
        "--boundary",
        type=int,
        default=2**31,
        help="flat index whose neighbourhood is checked (default 2**31)",
    )
    parser.add_argument("--window", type=int, default=8192, help="elements per window")
    parser.add_argument(
        "--chunk-rows", type=int, default=65536, help="rows per chunk of the reference sums"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    adapter = load_ops(require_cuda=device.type == "cuda")
    results = {"device": str(device), "boundary": args.boundary, "cases": []}
    ok = True
    for name in [n.strip() for n in args.cases.split(",") if n.strip()]:
        if name not in ("nhwc", "nchw"):
            parser.error(f"unknown case {name!r}")
        shape = args.nhwc_shape if name == "nhwc" else args.nchw_shape
        total = math.prod(shape)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info()
            need = 7.5 * total * 2
            if free < need:
                print(
                    f"{name}: needs about {need / 1e9:.0f} GB, {free / 1e9:.0f} GB free",
                    file=sys.stderr,
                )
                ok = False
                results["cases"].append({"case": name, "ok": False, "error": "out of memory"})
                continue
        try:
            record = run_case(
                adapter,
                name,
                shape,
                name == "nhwc",
                device,
                args.boundary,
                args.window,
                args.chunk_rows,
            )
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            import traceback

            traceback.print_exc()
            record = {"case": name, "ok": False, "error": f"{type(error).__name__}: {error}"}
        ok &= record["ok"]
        results["cases"].append(record)
    results["ok"] = bool(ok)
    summary = ", ".join(
        f"{r['case']} {r.get('elements', 0):,} elements {'ok' if r['ok'] else 'FAILED'}"
        for r in results["cases"]
    )
    print(f"large_tensor: {summary}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
