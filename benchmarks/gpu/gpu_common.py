"""Shared by the GPU checks: the torch ops without Keras, float64 references, tolerances.

``keras_residual/__init__.py`` imports Keras, but the torch adapter
(``keras_residual.native._torch`` and ``_build``) needs only torch and the
standard library. `load_adapter` imports the adapter without running the
package's ``__init__`` files (unless the package is imported already), so
these scripts run where Keras is not installed.

As a script it builds (or finds in the cache) the torch ops and prints their
status as JSON: ``python benchmarks/gpu/gpu_common.py [--require-cuda]
[--json PATH]``. With ``--require-cuda`` it exits with status 2, printing
``cuda_reason``, when the CUDA kernels are not compiled in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EPSILON = 1e-3
ALPHA = 0.3

# (rtol, atol) per dtype name; atol is scaled by max(1, max|expected|), as in
# tests/native/test_torch_op.py.
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-5, 2e-5),
    "bfloat16": (2e-2, 3e-2),
    "float16": (4e-3, 6e-3),
}
# Elements per 128-bit vector of the CUDA kernels (csrc/cuda/common.cuh).
VECTOR_WIDTH = {"float64": 2, "float32": 4, "bfloat16": 8, "float16": 8}


def load_adapter():
    """`keras_residual.native._torch`, imported without Keras."""
    name = "keras_residual.native._torch"
    if name in sys.modules:
        return sys.modules[name]
    if "keras_residual" not in sys.modules:
        # Namespace stand-ins for the two packages: their submodules import
        # as usual, their __init__ files (which import Keras) never run.
        for package, folder in (
            ("keras_residual", ROOT / "keras_residual"),
            ("keras_residual.native", ROOT / "keras_residual" / "native"),
        ):
            module = types.ModuleType(package)
            module.__path__ = [str(folder)]
            module.__file__ = str(folder / "__init__.py")
            sys.modules[package] = module
    from keras_residual.native import _torch

    return _torch


def load_ops(require_cuda: bool = False):
    """Loads the torch ops (building them if needed); returns the adapter module.

    Raises SystemExit(2) with `cuda_reason` when `require_cuda` and the CUDA
    kernels are not compiled in.
    """
    adapter = load_adapter()
    adapter.load()
    status = adapter.status()
    if require_cuda and not status["cuda_compiled"]:
        print(f"CUDA kernels not compiled in: {status['cuda_reason']}", file=sys.stderr)
        raise SystemExit(2)
    return adapter


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def vector_path(shape, channels_last: bool, dtype, offset: int = 0) -> bool:
    """Whether the CUDA kernels take their 128-bit path for a contiguous tensor.

    The rule of csrc/cuda/kernels.cu: the contiguous dimension (C in NHWC,
    H*W in NCHW) is a multiple of the vector width and the pointers are
    16-byte aligned (offset: the storage offset, in elements, of x).
    """
    width = VECTOR_WIDTH[dtype_name(dtype)]
    inner = shape[3] if channels_last else shape[2] * shape[3]
    item = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[dtype_name(dtype)]
    return inner % width == 0 and (offset * item) % 16 == 0


# -- float64 references: the composite formula ----------------------------------------


def act_ref(z, activation: str, alpha: float = ALPHA):
    import torch

    if activation == "linear":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "leaky_relu":
        return torch.where(z >= 0, z, alpha * z)
    if activation == "relu6":
        return torch.clamp(z, 0.0, 6.0)
    if activation == "silu":
        return z * torch.sigmoid(z)
    if activation == "gelu":
        return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))
    raise ValueError(f"unknown activation {activation!r}")


def per_channel(v, channels_last: bool):
    return v if channels_last else v.reshape(1, -1, 1, 1)


def train_ref(x, gamma, beta, residual, activation, channels_last, epsilon=EPSILON):
    """(y, mean, var) of the training op, by the composite formula."""
    import torch

    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    mean = x.mean(dim=axes)
    var = ((x - per_channel(mean, channels_last)) ** 2).mean(dim=axes)
    invstd = torch.rsqrt(var + epsilon)
    z = (x - per_channel(mean, channels_last)) * per_channel(invstd * gamma, channels_last)
    z = z + per_channel(beta, channels_last)
    if residual is not None:
        z = z + residual
    return act_ref(z, activation), mean, var


def epilogue_ref(x, scale, shift, residual, activation, channels_last):
    z = x if scale is None else x * per_channel(scale, channels_last)
    z = z + per_channel(shift, channels_last)
    if residual is not None:
        z = z + residual
    return act_ref(z, activation)


def excess_error(actual, expected, dtype, tolerance=None) -> tuple[float, float]:
    """(worst excess error, allowed) of |a - e| - rtol |e| against atol * max(1, max|e|).

    `tolerance`: (rtol, atol), by default those of `dtype` (TOLERANCES).
    """
    rtol, atol = tolerance or TOLERANCES[dtype_name(dtype)]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if expected.numel() == 0:
        return 0.0, atol
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs() - rtol * expected.abs()
    worst = error.max().item()
    if math.isnan(worst) or actual.isnan().any().item() != expected.isnan().any().item():
        worst = math.inf
    return worst, atol * scale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true")
    parser.add_argument("--json", help="also write the status here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    adapter = load_adapter()
    try:
        adapter.load()
    except Exception as error:  # noqa: BLE001 - report why, whatever it is
        print(f"the torch ops cannot be built or loaded: {error}", file=sys.stderr)
        return 1
    status = adapter.status()
    status["seconds"] = round(time.perf_counter() - start, 1)
    status["keras_imported"] = "keras" in sys.modules
    text = json.dumps(status, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    if args.require_cuda and not status["cuda_compiled"]:
        print(f"CUDA kernels NOT compiled in: {status['cuda_reason']}", file=sys.stderr)
        return 2
    print(
        f"cuda_compiled={status['cuda_compiled']} archs={status['cuda_archs']} "
        f"cuda_reason={status['cuda_reason']}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
