"""PyTorch adapter of the fused BatchNormalization + residual add + activation.

The ``keras_residual::`` ops of ``csrc/torch`` are compiled on first use (in a
separate process, against the installed torch) and cached; ``load()`` then
loads the library into this process and registers, in Python, their autograd
formulas and their fake (meta) kernels, so that they work under
``torch.autograd``, ``torch.compile`` and ``torch.library.opcheck``.

The CPU kernels are always compiled in; the CUDA kernels too when torch has
CUDA and ``nvcc`` is found (``torch.utils.cpp_extension.CUDA_HOME``), for the
architectures of ``$TORCH_CUDA_ARCH_LIST``, else those of the visible GPUs,
else those torch itself was built for.

Activations are passed as the int codes of ``keras_residual::Activation``
(see `ACTIVATIONS`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

from keras_residual import _device, _padding
from keras_residual.native import _build

ACTIVATIONS = _build.ACTIVATION_CODES
LIBRARY_NAME = "keras_residual_torch_ops"
_FLOAT_DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")

_lock = threading.RLock()
_state: dict[str, Any] = {
    "built": False,
    "loaded": False,
    "path": None,
    "reason": None,
    "cuda_compiled": False,
    "cuda_archs": None,
    "cuda_reason": None,
    "build_info": None,
}


# -- building -------------------------------------------------------------------


def cpu_sources() -> list[Path]:
    """The C++ sources of the CPU library: the CPU kernels and the op registration."""
    return [*_build.kernel_sources(), _build.CSRC / "torch" / "ops.cpp"]


def cuda_sources() -> list[Path]:
    """The extra sources compiled in when CUDA is available."""
    return [*sorted((_build.CSRC / "cuda").glob("*.cu")), _build.CSRC / "torch" / "ops_cuda.cpp"]


def _cuda_plan() -> tuple[str | None, str | None]:
    """(arch list, None) when the CUDA part can be compiled, else (None, why not)."""
    import torch
    from torch.utils import cpp_extension

    if not torch.version.cuda:
        return None, "torch is a CPU-only build"
    home = cpp_extension.CUDA_HOME
    if not home:
        return None, "no CUDA toolkit found (set CUDA_HOME)"
    if not (Path(home) / "bin" / "nvcc").is_file():
        return None, f"no nvcc in {home}/bin"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if archs and archs != "native":
        return archs, None
    found = set()
    try:
        if torch.cuda.is_available():
            for index in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(index)
                found.add((major, minor))
    except Exception:  # noqa: BLE001 - no usable driver: fall back to torch's archs
        found = set()
    if not found:
        for arch in torch.cuda.get_arch_list():
            if arch.startswith("sm_") and arch[3:].isdigit():
                number = int(arch[3:])
                found.add((number // 10, number % 10))
    if not found:
        return None, "no CUDA architecture to compile for (set TORCH_CUDA_ARCH_LIST)"
    names = [f"{major}.{minor}" for major, minor in sorted(found)]
    names[-1] += "+PTX"
    return ";".join(names), None


def _openmp_flags() -> list[str]:
    """`-fopenmp` where torch's intra-op pool is OpenMP's (Linux builds).

    The CPU kernels run their slices through `at::parallel_for`, a template
    in torch's headers that is parallel only in code compiled with OpenMP:
    without `-fopenmp` it runs every slice on the calling thread, so the
    kernels used one core. The library then links `libgomp.so.1`, which
    resolves to the copy torch has already loaded: one pool for both.
    """
    import torch

    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def _common_cflags() -> list[str]:
    # torch's extension builder adds -std=c++20 itself (its headers need it);
    # the kernels are C++17 code that compiles unchanged as C++20.
    return ["-O3", "-DNDEBUG", *_openmp_flags()]


def _compile_in_subprocess(
    out_path: Path, build_dir: Path, sources: list[Path], archs: str | None
) -> None:
    """Compiles with torch.utils.cpp_extension in a fresh interpreter.

    The CPU kernels are compiled first, on their own, for the host's vector
    ISA (`_build.compile_kernels`) and linked in; the sources that include
    torch's headers get torch's flags and no -march. The compiling
    interpreter loads the library once (which proves that it links); this
    process never does, so it can load the cached copy later. The whole
    output goes to the build log.
    """
    with_cuda = archs is not None
    kernels = _build.compile_kernels(build_dir)
    cflags = _common_cflags() + (["-DKERAS_RESIDUAL_WITH_CUDA"] if with_cuda else [])
    kernel_sources = set(_build.kernel_sources())
    spec = {
        "name": LIBRARY_NAME,
        "sources": [str(path) for path in sources if path not in kernel_sources],
        "build_dir": str(build_dir / "torch"),
        "out_path": str(out_path),
        "cflags": cflags,
        "cuda_cflags": ["-O3", "-DNDEBUG", "-DKERAS_RESIDUAL_WITH_CUDA"] if with_cuda else [],
        "ldflags": [str(path) for path in kernels] + _openmp_flags(),
        "include": [str(_build.CSRC / "include"), str(_build.CSRC / "torch")],
    }
    script = (
        "import json, os, shutil, sys\n"
        "from torch.utils import cpp_extension\n"
        "spec = json.loads(sys.argv[1])\n"
        "os.makedirs(spec['build_dir'], exist_ok=True)\n"
        "path = cpp_extension.load(name=spec['name'], sources=spec['sources'],\n"
        "    build_directory=spec['build_dir'], is_python_module=False,\n"
        "    extra_cflags=spec['cflags'], extra_cuda_cflags=spec['cuda_cflags'] or None,\n"
        "    extra_ldflags=spec['ldflags'],\n"
        "    extra_include_paths=spec['include'], verbose=True)\n"
        "shutil.copyfile(path, spec['out_path'])\n"
    )
    env = dict(os.environ)
    if with_cuda:
        env["TORCH_CUDA_ARCH_LIST"] = archs
    _build.run_compiler([sys.executable, "-c", script, json.dumps(spec)], cwd=build_dir, env=env)


def _framework_version() -> str:
    import torch

    return f"{torch.__version__}-cuda{torch.version.cuda or 'none'}"


def _extra_key(archs: str | None) -> str:
    import torch

    headers = sorted((_build.CSRC / "torch").glob("*.h"))
    header_text = "".join(path.read_text() for path in headers)
    return json.dumps(
        {
            "cuda_archs": archs,
            "cflags": _common_cflags(),
            "kernels": _build.kernel_key(),
            "cxx11_abi": bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)),
            "compiler": _build.compiler_version(os.environ.get("CXX") or shutil.which("c++")),
            "torch_headers": header_text,
        },
        sort_keys=True,
    )


def build(force: bool = False, cuda: bool | None = None) -> Path:
    """Compiles (or finds in the cache) the torch ops library; returns its path.

    Args:
        force: compile even if the cache holds a library or a recorded
            failure.
        cuda: compile the CUDA kernels in. `None` (the default) means
            whenever torch has CUDA and nvcc is found; `True` requires it;
            `False` leaves them out.

    Returns:
        The path of the library in the cache.

    Raises:
        NativeUnavailable: the library cannot be built (`BuildFailed`, with
            the compiler's first error and the log's path), or `cuda=True`
            and CUDA cannot be compiled for.
    """
    archs, cuda_reason = (None, "not requested") if cuda is False else _cuda_plan()
    if cuda and archs is None:
        raise _build.NativeUnavailable(f"cannot compile the CUDA kernels: {cuda_reason}")
    sources = cpu_sources() + (cuda_sources() if archs is not None else [])

    def compile_library(out_path: Path, build_dir: Path) -> None:
        _compile_in_subprocess(out_path, build_dir, sources, archs)

    path = _build.build_library(
        "torch_ops",
        sources,
        framework_version=_framework_version(),
        compile=compile_library,
        extra_key=_extra_key(archs),
        rebuild=force,
        description=f"the torch {_framework_version()} ops"
        + (f" with CUDA kernels for {archs}" if archs else ""),
        estimate="1 to 3 minutes" if archs else "1 minute",
    )
    _state.update(cuda_compiled=archs is not None, cuda_archs=archs, cuda_reason=cuda_reason)
    return path


def _build_with_fallback() -> Path:
    """build(), and if that fails with the CUDA kernels in, a CPU-only build."""
    return _build.build_with_cuda_fallback(build, _cuda_plan()[0] is not None, _state, "kernels")


def load() -> None:
    """Builds if needed, and loads once per process, the torch ops library.

    Then registers the autograd formulas and fake kernels of the ops.

    Raises:
        NativeUnavailable: the library cannot be built or loaded; the message
            says why.
    """
    with _lock:
        if _state["loaded"]:
            return
        try:
            import torch
        except ImportError as error:
            raise _build.NativeUnavailable(f"torch is not installed ({error})") from error
        try:
            path = _build_with_fallback()
            _state.update(built=True, path=str(path))
            try:
                torch.ops.load_library(str(path))
            except OSError:
                # A cached library that no longer loads (a changed system
                # library, say): compile it again once.
                path = build(force=True, cuda=bool(_state["cuda_compiled"]))
                _state["path"] = str(path)
                torch.ops.load_library(str(path))
            _register_python()
            _state["build_info"] = torch.ops.keras_residual.build_info()
        except _build.NativeUnavailable as error:
            _state["reason"] = str(error)
            raise
        except Exception as error:
            _state["reason"] = f"loading the torch ops failed: {type(error).__name__}: {error}"
            raise _build.NativeUnavailable(_state["reason"]) from error
        _state.update(loaded=True, reason=None)


def status() -> dict:
    """What is known about the torch ops in this process (builds nothing).

    Returns:
        A dict with `built`, `loaded`, `reason` (why not, or None), `path`,
        `cuda_compiled`, `cuda_archs`, `cuda_reason` (why CUDA is not
        compiled in, or None), `build_info`, `torch` and `build_seconds`
        (of the cached build).
    """
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "built": _state["built"],
        "loaded": _state["loaded"],
        "reason": _state["reason"]
        or (None if _state["loaded"] else "not loaded yet (it is compiled on first use)"),
        "path": _state["path"],
        "cuda_compiled": _state["cuda_compiled"],
        "cuda_archs": _state["cuda_archs"],
        "cuda_reason": None if _state["cuda_compiled"] else _state["cuda_reason"],
        "build_info": _state["build_info"],
        "torch": torch_version,
        "build_seconds": _build.read_record(Path(_state["path"])).get("build_seconds")
        if _state["path"]
        else None,
    }


def supports(device: Any) -> bool:
    """Whether the loaded ops have kernels for `device`.

    Args:
        device: a `torch.device` or a device string such as `"cpu"` or
            `"cuda:0"`.

    Returns:
        True for CPU once loaded, and for CUDA when the CUDA kernels are
        compiled in; False before `load()` and for any other device.
    """
    if not _state["loaded"]:
        return False
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return False
    if kind == "cpu":
        return True
    return kind == "cuda" and bool(_state["cuda_compiled"])


def graph_reason(x) -> str | None:
    """Why the graph being traced cannot hold the ops, or None: the meta device
    (symbolic shape inference) computes nothing, so it takes the composite path."""
    if str(getattr(x, "device", "")) == "meta":
        return "symbolic shape inference on the meta device"
    return None


def device_reason(x) -> str | None:
    """Why the loaded ops have no kernel for `x`'s device, or None."""
    device = getattr(x, "device", "cpu")
    if supports(device):
        return None
    why = "" if _state["cuda_compiled"] else f" ({_state['cuda_reason'] or 'CPU kernels only'})"
    return f"no native kernel for device {str(device)!r} on torch{why}"


# -- autograd and fake kernels ----------------------------------------------------


def _param_dtype(dtype):
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def _channels(x, channels_last: bool) -> int:
    return x.shape[3] if channels_last else x.shape[1]


def _bn_setup_context(ctx, inputs, output) -> None:
    x, gamma, beta, residual, epsilon, activation, alpha, channels_last = inputs
    _, mean, var = output
    ctx.save_for_backward(x, gamma, beta, residual, mean, var)
    ctx.options = (epsilon, activation, alpha, channels_last)
    ctx.mark_non_differentiable(mean, var)


def _bn_backward(ctx, dy, _dmean, _dvar):
    import torch

    x, gamma, beta, residual, mean, var = ctx.saved_tensors
    epsilon, activation, alpha, channels_last = ctx.options
    need_residual = residual is not None and ctx.needs_input_grad[3]
    dx, dresidual, dgamma, dbeta = torch.ops.keras_residual.bn_add_act_backward(
        dy,
        x,
        residual,
        mean,
        var,
        gamma,
        beta,
        epsilon,
        activation,
        alpha,
        channels_last,
        need_residual,
    )
    return (
        dx if ctx.needs_input_grad[0] else None,
        dgamma if ctx.needs_input_grad[1] else None,
        dbeta if ctx.needs_input_grad[2] else None,
        dresidual if need_residual else None,
        None,
        None,
        None,
        None,
    )


def _epilogue_setup_context(ctx, inputs, output) -> None:
    x, scale, shift, residual, activation, alpha, channels_last = inputs
    ctx.save_for_backward(x, scale, shift, residual)
    ctx.options = (activation, alpha, channels_last)


def _epilogue_backward(ctx, dy):
    import torch

    x, scale, shift, residual = ctx.saved_tensors
    activation, alpha, channels_last = ctx.options
    need_residual = residual is not None and ctx.needs_input_grad[3]
    need_scale = scale is not None and ctx.needs_input_grad[1]
    dx, dresidual, dscale, dshift = torch.ops.keras_residual.scale_shift_add_act_backward(
        dy, x, scale, shift, residual, activation, alpha, channels_last, need_residual, need_scale
    )
    return (
        dx if ctx.needs_input_grad[0] else None,
        dscale if need_scale else None,
        dshift if ctx.needs_input_grad[2] else None,
        dresidual if need_residual else None,
        None,
        None,
        None,
    )


def _transpose_backward(ctx, grad):
    # Contiguous, as the Keras kernel is, so that autograd's accumulation
    # takes it as it is. The view `grad.t()` left that copy to the
    # accumulation, whose strided copy of a 1x1 kernel's gradient (4D, not
    # reshaped) was slow: the 1x1x1024x2048 kernel's transpose forward and
    # back took 9-11 ms with it and 4.1-4.5 ms with this, on a 2-core AMD
    # EPYC. torch's copy here was as fast as a second `transpose_2d`.
    return grad.t().contiguous()


def _register_python() -> None:
    import torch

    def fake_bn_train(x, gamma, beta, residual, epsilon, activation, alpha, channels_last):
        torch._check(x.dim() == 4, lambda: f"`x` must be 4D. Received: x.shape={tuple(x.shape)}")
        c = _channels(x, channels_last)
        param = _param_dtype(x.dtype)
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        return y, x.new_empty((c,), dtype=param), x.new_empty((c,), dtype=param)

    def fake_bn_backward(
        dy,
        x,
        residual,
        mean,
        var,
        gamma,
        beta,
        epsilon,
        activation,
        alpha,
        channels_last,
        need_residual_grad,
    ):
        c = _channels(x, channels_last)
        param = _param_dtype(x.dtype)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        if need_residual_grad and residual is not None:
            dresidual = torch.empty_like(x, memory_format=torch.contiguous_format)
        else:
            dresidual = x.new_empty((0,))
        return dx, dresidual, x.new_empty((c,), dtype=param), x.new_empty((c,), dtype=param)

    def fake_epilogue(x, scale, shift, residual, activation, alpha, channels_last):
        torch._check(x.dim() == 4, lambda: f"`x` must be 4D. Received: x.shape={tuple(x.shape)}")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def fake_epilogue_backward(
        dy,
        x,
        scale,
        shift,
        residual,
        activation,
        alpha,
        channels_last,
        need_residual_grad,
        need_scale_grad,
    ):
        c = _channels(x, channels_last)
        param = _param_dtype(x.dtype)
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        if need_residual_grad and residual is not None:
            dresidual = torch.empty_like(x, memory_format=torch.contiguous_format)
        else:
            dresidual = x.new_empty((0,))
        dscale = x.new_empty((c if need_scale_grad and scale is not None else 0,), dtype=param)
        return dx, dresidual, dscale, x.new_empty((c,), dtype=param)

    def fake_transpose(x):
        torch._check(x.dim() == 2, lambda: f"`x` must be 2D. Received: x.shape={tuple(x.shape)}")
        return x.new_empty((x.shape[1], x.shape[0]))

    fakes = {
        "bn_add_act_train": fake_bn_train,
        "bn_add_act_backward": fake_bn_backward,
        "scale_shift_add_act": fake_epilogue,
        "scale_shift_add_act_backward": fake_epilogue_backward,
        "transpose_2d": fake_transpose,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"keras_residual::{name}", fake)
    torch.library.register_autograd(
        "keras_residual::bn_add_act_train", _bn_backward, setup_context=_bn_setup_context
    )
    torch.library.register_autograd(
        "keras_residual::scale_shift_add_act",
        _epilogue_backward,
        setup_context=_epilogue_setup_context,
    )
    torch.library.register_autograd(
        "keras_residual::transpose_2d",
        _transpose_backward,
        setup_context=lambda ctx, inputs, output: None,
    )


# -- the functions the dispatcher calls ------------------------------------------


def _activation_code(activation: int | str) -> int:
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {sorted(ACTIVATIONS)} or its int code. "
                f"Received: activation={activation!r}"
            )
        return ACTIVATIONS[activation]
    if isinstance(activation, bool) or not isinstance(activation, int):
        raise ValueError(
            f"`activation` must be an int code or a name. Received: activation={activation!r}"
        )
    return activation


def bn_add_act_train(
    x,
    gamma,
    beta,
    residual=None,
    *,
    epsilon: float,
    activation: int | str,
    alpha: float = 0.2,
    channels_last: bool = True,
):
    """Training BatchNormalization + residual add + activation, differentiable.

    Args:
        x: 4D float tensor (NHWC when `channels_last`, else NCHW).
        gamma: per-channel scale, shape `(C,)`; float64 for float64 `x`,
            float32 otherwise (cast if it is not).
        beta: per-channel offset, like `gamma`.
        residual: tensor of the shape and dtype of `x`, or None.
        epsilon: added to the variance.
        activation: int code of the activation (see `ACTIVATIONS`) or its name.
        alpha: negative slope of `leaky_relu`. Defaults to `0.2`.
        channels_last: the layout of `x`. Defaults to `True`.

    Returns:
        `(y, mean, var)`: `y` like `x`; the batch mean and biased variance
        per channel (not differentiable).

    Raises:
        NativeUnavailable: the library cannot be loaded.
        ValueError: bad shapes, dtypes, devices or arguments.
    """
    import torch

    if not _state["loaded"]:  # a constant check, so that torch.compile traces through
        load()
    param = _param_dtype(x.dtype)
    return torch.ops.keras_residual.bn_add_act_train(
        x,
        gamma.to(param),
        beta.to(param),
        residual,
        float(epsilon),
        _activation_code(activation),
        float(alpha),
        bool(channels_last),
    )


def scale_shift_add_act(
    x,
    scale,
    shift,
    residual=None,
    *,
    activation: int | str,
    alpha: float = 0.2,
    channels_last: bool = True,
):
    """`act(x * scale + shift + residual)` per channel, differentiable.

    Args:
        x: 4D float tensor (NHWC when `channels_last`, else NCHW).
        scale: per-channel scale, shape `(C,)`, or None for 1; float64 for
            float64 `x`, float32 otherwise (cast if it is not).
        shift: per-channel shift, like `scale` (not None).
        residual: tensor of the shape and dtype of `x`, or None.
        activation: int code of the activation (see `ACTIVATIONS`) or its name.
        alpha: negative slope of `leaky_relu`. Defaults to `0.2`.
        channels_last: the layout of `x`. Defaults to `True`.

    Returns:
        A tensor like `x`.

    Raises:
        NativeUnavailable: the library cannot be loaded.
        ValueError: bad shapes, dtypes, devices or arguments.
    """
    import torch

    if not _state["loaded"]:  # a constant check, so that torch.compile traces through
        load()
    param = _param_dtype(x.dtype)
    if shift is None:
        raise ValueError("`shift` must be a tensor of shape (C,). Received: shift=None")
    return torch.ops.keras_residual.scale_shift_add_act(
        x,
        None if scale is None else scale.to(param),
        shift.to(param),
        residual,
        _activation_code(activation),
        float(alpha),
        bool(channels_last),
    )


# -- the convolution ----------------------------------------------------------------


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(before, after) of TensorFlow's and Keras' "same" padding along one axis."""
    effective = (kernel - 1) * dilation + 1
    out = -(-size // stride)  # ceil(size / stride)
    total = max((out - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


# What inference derives from variables (the kernel in the convolution's
# layout, the epilogue's scale and shift) is reused while they are unchanged:
# keyed by the identity of each tensor (checked through a weak reference, so
# a new tensor at a reused id never matches) and torch's version counter,
# which every in-place write (an optimizer step, `assign`) bumps.
_CACHE: dict = {}
_CACHE_SIZE = 1024


def memo(compute, *tensors, extra=()):
    """`compute(*tensors)`, computed once while every tensor is unchanged.

    Where autograd records a tensor that requires grad (training, or a
    gradient through inference), it is computed per call, so that the
    gradient flows back to the variables. `tensors` may hold None; `extra`
    (hashable) joins the key.
    """
    import torch

    live = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in live):
        return compute(*tensors)
    key = (tuple(id(t) for t in tensors), extra)
    versions = tuple(t._version for t in live)
    cached = _CACHE.get(key)
    if cached is not None:
        refs, cached_versions, value = cached
        if cached_versions == versions and all(r() is t for r, t in zip(refs, live, strict=True)):
            return value
    with torch.no_grad():
        value = compute(*tensors)
    if len(_CACHE) >= _CACHE_SIZE:
        _CACHE.clear()
    _CACHE[key] = (tuple(weakref.ref(t) for t in live), versions, value)
    return value


def _conv_weight(kernel, memory_format):
    """The Keras kernel `(kh, kw, in, out)` as torch's `(out, in, kh, kw)`.

    In the memory format of the input: oneDNN would otherwise make this copy
    itself. Where autograd records (training), it is made per call, so that
    the gradient flows back to the Keras variable; in inference the copy is
    cached until the variable changes (`memo`).
    """
    return memo(
        lambda kernel: _to_conv_layout(kernel, memory_format), kernel, extra=(memory_format,)
    )


# From this many elements (256 KB of float32) the native transpose copies a
# kernel and its gradient back faster than torch's permuted copy, whose
# gradient reaches the variable through autograd's strided copy. Forward and
# back, on a 2-core AMD EPYC: 1.0-1.1x at 2^16 elements, 1.1-1.4x from 2^17,
# 1.2-2.8x from 2^19 (ResNet50's kernels); torch's copy was faster below
# 2^15, where the native op's fixed cost per call dominates.
_NATIVE_TRANSPOSE_MIN = 1 << 16


def _to_conv_layout(kernel, memory_format):
    """The copy of `_conv_weight`, differentiable.

    A channels_last `(out, in, kh, kw)` weight is `(out, kh, kw, in)` in
    memory: the transpose of the Keras kernel seen as a `(kh * kw * in, out)`
    matrix, which the native `transpose_2d` copies in cache-sized tiles
    where torch's strided copy slows down; its gradient comes back
    contiguous, as the variable is (`_transpose_backward`). Smaller
    kernels, other layouts and devices, or a library not loaded (a direct
    call of `conv2d`), take torch's copy.
    """
    import torch

    native = _state["loaded"] and kernel.device.type == "cpu" and kernel.dim() == 4
    if native and memory_format is torch.channels_last and kernel.numel() >= _NATIVE_TRANSPOSE_MIN:
        kh, kw, cin, cout = kernel.shape
        rows = torch.ops.keras_residual.transpose_2d(kernel.reshape(kh * kw * cin, cout))
        return rows.view(cout, kh, kw, cin).permute(0, 3, 1, 2)
    return kernel.permute(3, 2, 0, 1).contiguous(memory_format=memory_format)


# From this many kernel elements a 1x1 convolution of an NHWC tensor on CPU
# runs as one matrix product with the Keras kernel as it is, where torch's
# matrix product is fast (`_matmul_beats_conv`): no kernel copy forward or
# backward, and no reorder inside oneDNN. Training step of the 1x1 convs of
# ResNet50's last two stages (batch 16, 128x128) on a 2-core Intel Xeon:
# 1.1-1.2x faster at 2^18 elements (1024 <-> 256 channels), about 2x at 2^20
# (2048 <-> 512); below 2^17 the convolution was as fast or faster.
_MATMUL_MIN = 1 << 18


# From this many kernel elements a stride-1 1x1 convolution in training runs
# as a transposed convolution (`_pointwise_as_transpose`). Forward and
# backward of ResNet50's 1x1 shapes on a 2-core AMD EPYC (batch 16,
# 128x128, channels_last), against the kernel copy and `F.conv2d`: 1.06-1.66x
# from 2^18 elements (1024 <-> 256 channels and up; 1.01-1.56x in two more
# runs), 0.82-1.11x below (`benchmarks/pointwise.py`).
_TRANSPOSED_MIN = 1 << 18


@functools.cache
def _matmul_beats_conv() -> bool:
    """Whether torch's CPU matrix product beats its convolution on large 1x1 kernels.

    On x86 torch's matrix product is MKL's sgemm and its convolution
    oneDNN's. MKL takes its fast paths on Intel CPUs only: on a 2-core AMD
    EPYC (AVX-512) the matrix product was slower forward and backward on
    all 9 of ResNet50's 1x1 shapes, at 0.52-0.93x the convolution's speed
    (0.57-0.90x from `_MATMUL_MIN`; `benchmarks/pointwise.py`). So MKL on an
    Intel CPU only; other BLAS libraries were not measured and keep the
    convolution.
    """
    import torch

    return torch.backends.mkl.is_available() and _device.cpu_vendor() == "GenuineIntel"


def _pointwise_as_transpose(x, kernel, strides) -> bool:
    """Whether `conv2d` runs this NCHW-shaped call as `F.conv_transpose2d`.

    In training, a 1x1, stride-1, ungrouped convolution on the CPU of a
    large kernel (`_TRANSPOSED_MIN`) that is not in the convolution's memory
    order (`conv2d` asks only then): the kernel then needs no copy into
    torch's layout, and its gradient none back (`_conv_weight` copies both
    per step). At inference the copy is made once (`memo`), and the
    convolution stays. CUDA keeps the convolution: not measured there.
    """
    import torch

    return (
        x.device.type == "cpu"
        and tuple(kernel.shape[:2]) == (1, 1)
        and strides == (1, 1)
        and kernel.shape[2] == x.shape[1]
        and kernel.numel() >= _TRANSPOSED_MIN
        and torch.is_grad_enabled()
        and kernel.requires_grad
    )


def lay_out_kernels(kernels, optimizer_variables=(), *, channels_last=True) -> int:
    """Stores conv kernels in the memory order torch's convolution reads.

    `kernels` and `optimizer_variables` are the variables' tensors
    (`variable.value`). Each Keras kernel keeps its shape `(kh, kw, in, out)`
    and its values; only its strides change, to those of its view
    `(out, in, kh, kw)` in the input's memory format, so that `conv2d`
    passes that view to the convolution, forward, and the gradient, which
    autograd gives the strides of the variable, comes back without a copy.
    Keras' layout needs a copy of the kernel into torch's per training step,
    and one of its gradient back.

    An optimizer's elementwise update of a variable and its slots (SGD's
    momentum, Adam's moments) is 12-60x slower when their memory orders
    differ (a 3x3x512x512 kernel on a 2-core AMD EPYC), so the 4D
    `optimizer_variables` of a laid-out kernel's shape are laid out too
    (the slots Keras makes from a variable, `add_variable_from_reference`,
    have its shape).

    The tensors change in place (their `.data`), so every reference to the
    variables (Keras', the optimizer's, the module's parameters) holds;
    values, saving and loading (`assign` copies in place) are unchanged.
    Nothing is done while torch.compile traces. Returns how many tensors
    were laid out.
    """
    import torch

    if torch.compiler.is_compiling():
        return 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def lay_out(value) -> int:
        weight = value.permute(3, 2, 0, 1)
        if weight.is_contiguous(memory_format=memory_format):
            return 0
        value.data = weight.detach().contiguous(memory_format=memory_format).permute(2, 3, 1, 0)
        return 1

    kernels = [k for k in kernels if k.dim() == 4]
    shapes = {tuple(k.shape) for k in kernels}
    slots = [v for v in optimizer_variables if v.dim() == 4 and tuple(v.shape) in shapes]
    return sum(lay_out(v) for v in [*kernels, *slots])


def conv2d(inputs, kernel, *, strides=1, padding="valid", dilation_rate=1, channels_last=True):
    """`keras.ops.conv` of a 4D input, without its layout copies.

    Keras' own torch convolution copies an NHWC input to NCHW
    (`permute(...).contiguous()`) and then back to channels_last memory,
    forward and backward. An NHWC tensor permuted to NCHW already *is* a
    channels_last NCHW tensor, which `torch.nn.functional.conv2d` takes as
    it is (oneDNN on CPU, cuDNN on CUDA), and its channels_last output
    permuted back is a contiguous NHWC tensor: the activations are never
    copied (except by the explicit pad of an asymmetric "same", as in Keras).
    A kernel stored in the memory order the convolution reads
    (`lay_out_kernels`) is passed to it as a view. Any other is copied into
    that layout (torch would make the same copy): once per call in training,
    where its gradient flows back to the Keras variable through that copy,
    and once per change of the variable in inference (`_conv_weight`). A 1x1
    kernel on the CPU needs no copy where it runs as one matrix product of
    an NHWC input (a large one, `_MATMUL_MIN`, on an Intel CPU:
    `_padding.pointwise`), or in training as a transposed convolution,
    whose weight layout is the Keras kernel's (a large one of stride 1 in
    Keras' order: `_pointwise_as_transpose`).

    Args:
        inputs: 4D tensor, NHWC when `channels_last`, else NCHW.
        kernel: `(kh, kw, in_channels, filters)`, Keras' layout; with
            `in_channels` dividing the input's channels (grouped convolution,
            as in Keras).
        strides, dilation_rate: an int or 2 ints.
        padding: `"same"` (TensorFlow's, asymmetric where it must be),
            `"valid"`, or `"symmetric"` (`dilation * (k - 1) // 2` on every
            side, PyTorch's `padding=k // 2`).
        channels_last: the layout of `inputs` and of the result.

    Returns:
        The convolution, in the layout of `inputs` and contiguous in it (for
        the usual shapes; the native ops copy whatever is not).
    """
    import torch
    import torch.nn.functional as F

    strides = _padding.pair(strides, "strides")
    dilation = _padding.pair(dilation_rate, "dilation_rate")
    _padding.check(padding)
    if (
        channels_last
        and inputs.device.type == "cpu"
        and kernel.shape[:2] == (1, 1)
        and kernel.shape[2] == inputs.shape[-1]
        and kernel.numel() >= _MATMUL_MIN
        and _matmul_beats_conv()
    ):
        return _padding.pointwise(inputs, kernel, strides)
    x = inputs.permute(0, 3, 1, 2) if channels_last else inputs
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    weight = kernel.permute(3, 2, 0, 1)
    if not weight.is_contiguous(memory_format=memory_format):
        if _pointwise_as_transpose(x, kernel, strides):
            # conv_transpose2d's weight is `(in, out, kh, kw)`: the Keras 1x1
            # kernel `(1, 1, in, out)` permuted, with no copy, in either memory
            # format; and a stride-1 1x1 transposed convolution is the
            # convolution.
            y = F.conv_transpose2d(x, kernel.permute(2, 3, 0, 1))
            return y.permute(0, 2, 3, 1) if channels_last else y
        weight = _conv_weight(kernel, memory_format)
    groups = x.shape[1] // weight.shape[1]
    pad = (0, 0)
    if padding == "symmetric":
        pad = _padding.symmetric(weight.shape[2:], dilation)
    elif padding == "same":
        (top, bottom), (left, right) = (
            _same_padding(x.shape[2 + i], weight.shape[2 + i], strides[i], dilation[i])
            for i in range(2)
        )
        if top == bottom and left == right:
            pad = (top, left)
        else:
            # Only an asymmetric "same" (stride 2 on an even size, an even
            # kernel) pads explicitly, as Keras does; channels_last is kept.
            x = F.pad(x, (left, right, top, bottom))
            if channels_last and not x.is_contiguous(memory_format=torch.channels_last):
                x = x.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, weight, None, strides, pad, dilation, groups)
    return y.permute(0, 2, 3, 1) if channels_last else y


def max_pool2d(inputs, *, pool_size, strides, padding=0, channels_last=True, nonnegative=False):
    """Zero padding and `keras.ops.max_pool` ("valid"), without layout copies.

    Keras' torch pooling copies an NHWC input to contiguous NCHW and back;
    the permuted view is channels_last memory, which torch's pooling takes
    as it is. With `nonnegative`, no padded copy either: torch's own
    padding never wins a maximum, and neither do zeros when no input is
    below 0, so both give the same result.

    Args:
        inputs: 4D tensor, NHWC when `channels_last`, else NCHW.
        pool_size, strides: an int or 2 ints.
        padding: int or 2 ints: zeros on each side of each spatial axis, as
            `keras.layers.ZeroPadding2D` adds them (not PyTorch's -inf).
        channels_last: the layout of `inputs` and of the result.
        nonnegative: bool. The caller knows every input is >= 0 or NaN (a
            relu's output). Only a padding of at most half the window is
            left to torch's pooling (torch's limit); a larger one is padded.

    Returns:
        The pooled tensor, in the layout of `inputs`.
    """
    import torch.nn.functional as F

    pad_h, pad_w = _padding.pair(padding, "padding")
    window = _padding.pair(pool_size, "pool_size")
    x = inputs.permute(0, 3, 1, 2) if channels_last else inputs
    implicit = nonnegative and pad_h <= window[0] // 2 and pad_w <= window[1] // 2
    if (pad_h or pad_w) and not implicit:
        x = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
        pad_h = pad_w = 0
    y = F.max_pool2d(x, window, _padding.pair(strides, "strides"), (pad_h, pad_w))
    return y.permute(0, 2, 3, 1) if channels_last else y
