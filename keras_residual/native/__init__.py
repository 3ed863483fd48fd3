"""The native kernels: whether they are usable here, and what was built.

The fused BatchNormalization + add + activation kernels of ``csrc/`` reach
Keras through one adapter per backend:

- ``tensorflow``: a custom op library (CPU kernels), with registered shape
  functions and gradients.
- ``torch``: ``torch.library`` ops (CPU, and CUDA when torch has CUDA and
  ``nvcc`` is present), with autograd and fake kernels for ``torch.compile``.
- ``jax``: typed XLA FFI handlers (CPU, and CUDA when JAX has CUDA devices
  and ``nvcc`` is present), registered as custom-call targets and
  differentiable through `jax.custom_vjp`.

Every adapter module offers the same interface (`Adapter`), and owns all the
knowledge of its backend: how to build and load it, which graphs cannot hold
its ops (XLA, SavedModel and JAX exports, the meta device), which devices it
runs on.

Each adapter is compiled on first use against the installed framework and
cached (see ``keras_residual.native._build``), or ahead of time with
``python -m keras_residual build``. If it cannot be built or loaded,
``implementation="auto"`` warns once and uses the composite path; a failed
build is recorded, so later processes fall back at once.

Examples:

>>> from keras_residual import native
>>> isinstance(native.available("jax"), bool)
True
"""

from __future__ import annotations

import importlib
import subprocess
import threading
import warnings
from pathlib import Path
from typing import Any, Protocol

from keras_residual.native._build import (
    BuildFailed,
    NativeUnavailable,
    UntrustedCache,
    cache_dir,
    compiler_version,
    cpu_arch,
    nvcc,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "BuildFailed",
    "NativeUnavailable",
    "OWN_OPS",
    "UntrustedCache",
    "adapter",
    "auto_inference",
    "available",
    "build",
    "graph_reason",
    "info",
    "own_op",
    "print_info",
]

ADAPTERS = {
    "tensorflow": "keras_residual.native._tensorflow",
    "torch": "keras_residual.native._torch",
    "jax": "keras_residual.native._jax",
}
# What `implementation="auto"` runs at inference (`training=False`), per
# backend, chosen from side-by-side benchmarks (README.md, "How auto
# chooses"):
# - "native": the adapter's fused epilogue where it loads, as in training;
# - "folded": each BatchNormalization folded into its convolution, in ops
#   that the framework's graph compiler fuses into it (grappler's oneDNN
#   `_FusedConv2D` on TensorFlow): by that compiler where no residual follows
#   and the backend has an op for it (`batch_norm_inference`), else into the
#   kernel and bias on the fly, then conv + bias + residual + activation
#   (`add_bias_residual`);
# - "composite": `keras.ops` as Keras' own layers compute it.
AUTO_INFERENCE = {
    "tensorflow": "folded",
    "torch": "native",
    "jax": "composite",
}
# The framework ops an adapter module may have its own version of (`own_op`).
OWN_OPS = (
    "conv2d",
    "max_pool2d",
    "add_bias_residual",
    "batch_norm_inference",
    "lay_out_kernels",
)
NO_ADAPTER = {
    "numpy": "the numpy backend has no gradients or native adapter",
    "openvino": "no native adapter for OpenVINO",
}


class Adapter(Protocol):
    """What every adapter module (``_tensorflow``, ``_torch``, ``_jax``) provides.

    An adapter module may also offer, optionally (not members here, so that
    adapters without them still match), its own versions of four framework
    ops, and a layout of the kernels (`OWN_OPS`). They are plain framework
    code that needs no built library; `own_op(backend, name)` finds them.

    Its own convolution::

        def conv2d(inputs, kernel, *, strides, padding, dilation_rate,
                   channels_last): ...

    `keras.ops.conv` of a 4D input, equal to it within float rounding:
    `kernel` in Keras' layout `(kh, kw, in, out)`, `padding` `"same"`
    (TensorFlow's, asymmetric where it must be), `"valid"` or `"symmetric"`
    (`dilation * (k - 1) // 2` zeros on every side, PyTorch's), the result
    in the layout of `inputs` (NHWC when `channels_last`, else NCHW) and
    contiguous in it, as the native ops take it; differentiable with respect
    to `inputs` and `kernel`. `conv_bn_add_act` runs its convolution with it
    instead of `keras.ops.conv` unless "composite" is asked for or the graph
    cannot hold the adapter's ops (`graph_reason`). torch has one (its
    convolution without Keras' NHWC <-> NCHW copies; large 1x1 kernels as
    matrix products, or in training as transposed convolutions, which take
    the Keras kernel uncopied); JAX has one (every 1x1 kernel on the CPU as
    a matrix product); TensorFlow has none.

    Its own max pooling, for the stem::

        def max_pool2d(inputs, *, pool_size, strides, padding, channels_last,
                       nonnegative): ...

    `padding` zeros on every side (as `keras.layers.ZeroPadding2D`), then
    `keras.ops.max_pool` with `"valid"` padding, in the layout of `inputs`;
    differentiable. `nonnegative`: the inputs are known to be >= 0 (a
    relu's output), where zero padding changes no maximum.
    `keras_residual.ops.max_pool` runs it as `conv_bn_add_act` runs `conv2d`
    (torch: on the channels_last view, which Keras' pooling copies to
    contiguous NCHW and back; with `nonnegative`, with torch's own padding
    instead of a padded copy).

    Adapters of eager frameworks may also memoize what inference derives
    from variables (the epilogue's scale and shift)::

        def memo(compute, *tensors, extra=()): ...

    `compute(*tensors)`, computed once while every tensor (None allowed) is
    unchanged, and per call where autograd records a tensor that requires
    grad. torch has one (keyed on identity and version counter).

    The sum that follows a conv without BN::

        def add_bias_residual(x, bias, residual, *, channels_last): ...

    `x + bias + residual` (`bias` and `residual` may be None) in the ops the
    backend's graph compiler fuses into the convolution. The composite path
    uses it wherever there is no BN to run (folded models, and inference
    where `AUTO_INFERENCE` says "folded"). TensorFlow has one (BiasAdd and
    AddN); torch has none.

    The inference BatchNormalization that the graph compiler folds into the
    convolution before it::

        def batch_norm_inference(x, gamma, beta, mean, variance, *, epsilon,
                                 channels_last): ...

    `(x - mean) / sqrt(variance + epsilon) * gamma + beta` per channel, in
    `x`'s dtype. Where `AUTO_INFERENCE` says "folded", a unit without a
    residual runs it after its convolution instead of folding the BN into
    the kernel per call. TensorFlow has one (`FusedBatchNormV3`, which
    grappler's oneDNN remapper fuses, with a following Relu, into the conv);
    the others have none.

    The memory order of the conv kernels in training::

        def lay_out_kernels(kernels, optimizer_variables, *, channels_last): ...

    Stores the Keras kernels (the variables' tensors, shape
    `(kh, kw, in, out)`), and the optimizer's made for them, in the memory
    order the backend's convolution reads, in place: shapes and values are
    unchanged, and `conv2d` then needs no copy of a kernel or of its
    gradient. A `ResNet`
    calls it at its first training step with each optimizer. torch has one;
    the others have none (their arrays have no strides to choose).
    """

    def build(self, force: bool = False, cuda: bool | None = None) -> Path:
        """Compiles (or finds in the cache) the library; raises NativeUnavailable."""

    def load(self) -> None:
        """Builds if needed and loads the library once per process."""

    def status(self) -> dict:
        """`built`, `loaded`, `reason` and details, without building anything."""

    def graph_reason(self, x: Any) -> str | None:
        """Why the graph `x` is traced into cannot hold the ops (before loading)."""

    def device_reason(self, x: Any) -> str | None:
        """Why the loaded ops have no kernel for `x`'s device, or None."""

    def bn_add_act_train(self, x, gamma, beta, residual, **options):
        """Training BN + residual + activation: `(y, mean, var)`."""

    def scale_shift_add_act(self, x, scale, shift, residual, **options):
        """Inference epilogue `act(x * scale + shift + residual)`."""


_lock = threading.RLock()
_loaded: dict = {}
_failed: dict = {}
_warned: set = set()


def _backend(backend: str | None) -> str:
    if backend is None:
        import keras

        return keras.config.backend()
    if not isinstance(backend, str):
        raise ValueError(f"`backend` must be a backend name or None. Received: backend={backend!r}")
    return backend


def _module(backend: str):
    """The adapter module of `backend` (imported, nothing built), or None."""
    if backend not in ADAPTERS:
        return None
    return importlib.import_module(ADAPTERS[backend])


def adapter(backend: str | None = None) -> Adapter:
    """The loaded adapter module of `backend`, compiling it on first use.

    Raises:
        NativeUnavailable: with the reason when there is none for this backend
            or it cannot be built or loaded. The failure is remembered: the
            build is tried once per process (and a failed build once per
            machine, until its inputs change).
    """
    backend = _backend(backend)
    if backend in _loaded:
        return _loaded[backend]
    with _lock:
        if backend in _loaded:
            return _loaded[backend]
        if backend in _failed:
            raise NativeUnavailable(_failed[backend])
        if backend not in ADAPTERS:
            reason = NO_ADAPTER.get(backend, f"no native adapter for the {backend} backend")
            _failed[backend] = reason
            raise NativeUnavailable(reason)
        try:
            module = _module(backend)
            module.load()
        except NativeUnavailable as error:
            _failed[backend] = str(error)
            raise
        except Exception as error:  # noqa: BLE001 - a failed load must never crash a model
            _failed[backend] = (
                f"loading the {backend} adapter failed: {type(error).__name__}: {error}"
            )
            raise NativeUnavailable(_failed[backend]) from error
        _loaded[backend] = module
    return module


def graph_reason(backend: str, x: Any) -> str | None:
    """Why the graph being traced cannot hold the native ops of `backend`, or None.

    Asked before anything is built: symbolic shape inference (a
    `keras.KerasTensor`) and the adapter's own cases (TensorFlow XLA and
    SavedModel export, torch's meta device).
    """
    import keras

    if isinstance(x, keras.KerasTensor):
        return "symbolic shape inference"
    module = _module(backend)
    return None if module is None else module.graph_reason(x)


def auto_inference(backend: str) -> str:
    """What `"auto"` runs at inference on `backend`: see `AUTO_INFERENCE`.

    Returns `"native"`, `"folded"` or `"composite"` (the last for backends
    that `AUTO_INFERENCE` does not list).
    """
    return AUTO_INFERENCE.get(backend, "composite")


def own_op(backend: str, name: str):
    """`backend`'s own version of the framework op `name`, or None.

    `name` is one of `OWN_OPS`: the adapter module's optional `conv2d`,
    `max_pool2d`, `add_bias_residual`, `batch_norm_inference` or
    `lay_out_kernels` (see `Adapter`). Needs no built library: nothing is
    compiled or loaded.

    Raises:
        ValueError: if `name` is not in `OWN_OPS`.
    """
    if name not in OWN_OPS:
        raise ValueError(f"`name` must be one of {OWN_OPS}. Received: name={name!r}")
    return getattr(_module(backend), name, None)


def no_adapter_reason(backend: str) -> str | None:
    """Why `backend` has no native adapter at all, or None if it has one."""
    if backend in ADAPTERS:
        return None
    return NO_ADAPTER.get(backend, f"no native adapter for the {backend} backend")


def warn_unavailable(backend: str, reason: str) -> None:
    """One short warning per backend and process that the fallback is used."""
    if backend in _warned:
        return
    _warned.add(backend)
    first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown reason"
    warnings.warn(
        f"keras_residual: native kernels unavailable on {backend} ({first_line}); "
        "using the composite path.",
        RuntimeWarning,
        stacklevel=4,
    )


def available(backend: str | None = None) -> bool:
    """Whether the native path is usable here for `backend`.

    Compiles the adapter on first use (about a minute, then cached).

    Args:
        backend: `"tensorflow"`, `"torch"` or `"jax"`, or `None` for the
            active Keras backend. Defaults to `None`.

    Returns:
        True if the adapter of that backend is built and loaded.
    """
    try:
        adapter(backend)
        return True
    except NativeUnavailable:
        return False


def build(backend: str, force: bool = False, cuda: bool | None = None) -> Path:
    """Compiles the library of `backend` ahead of time (or finds it cached).

    Args:
        backend: `"tensorflow"`, `"torch"`, `"jax"` or `"core"` (the NumPy
            module).
        force: compile even if the cache holds a library or a recorded
            failure. Defaults to `False`.
        cuda: torch and jax: `True` requires the CUDA kernels, `False`
            leaves them out, `None` compiles them when the framework has CUDA
            (JAX: CUDA devices) and nvcc is found. Defaults to `None`.

    Returns:
        The path of the library in the cache.

    Raises:
        ValueError: an unknown `backend`, or `cuda=True` for a backend
            without CUDA kernels.
        NativeUnavailable: the build failed; `BuildFailed` carries the
            first error and the log's path.
    """
    if backend == "core":
        from keras_residual.native import core

        if cuda:
            raise ValueError("`cuda` must be None or False for the core module. Received: True")
        return core.build(rebuild=force)
    module = _module(backend)
    if module is None:
        raise ValueError(
            f"`backend` must be one of {sorted([*ADAPTERS, 'core'])}. Received: backend={backend!r}"
        )
    return module.build(force=force, cuda=cuda)


def _device(backend: str) -> str:
    from keras_residual._device import device

    return device(backend)


def _nvcc_version() -> str | None:
    executable = nvcc()
    if executable is None:
        return None
    try:
        output = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in output.splitlines() if "release" in line]
    return lines[0].strip() if lines else output.strip()


def info() -> dict:
    """What ``python -m keras_residual info`` prints, as a dict.

    Loads (compiling if needed) the active backend's adapter and the NumPy
    core module; the other adapters are reported from their status alone.
    A failed build is reported with its first error and its log.
    """
    import keras

    backend = keras.config.backend()
    adapters = {}
    for name in ADAPTERS:
        if name == backend:
            available(name)
        try:
            status = dict(_module(name).status())
        except ImportError as error:
            status = {"built": False, "loaded": False, "reason": f"not installed ({error})"}
        except Exception as error:  # noqa: BLE001
            status = {"built": False, "loaded": False, "reason": f"{type(error).__name__}: {error}"}
        if name in _failed and not status.get("loaded"):
            status["reason"] = _failed[name].splitlines()[0]
        adapters[name] = status
    from keras_residual import config

    try:
        from keras_residual.native.core import load_core

        core = {"loaded": True, **dict(load_core().build_info())}
    except NativeUnavailable as error:
        core = {"loaded": False, "reason": str(error).splitlines()[0]}
    try:
        cache = str(cache_dir())
    except NativeUnavailable as error:
        cache = f"unusable: {str(error).splitlines()[0]}"
    try:
        arch = cpu_arch()
    except ValueError as error:
        arch = str(error)
    return {
        "keras_residual": _version(),
        "keras": keras.__version__,
        "backend": backend,
        "device": _device(backend),
        "implementation": config.get_implementation(),
        "native_available": backend in _loaded,
        "adapters": adapters,
        "core": core,
        "compiler": compiler_version(),
        "cpu_kernels_arch": arch,
        "nvcc": _nvcc_version(),
        "cuda_archs": adapters.get("torch", {}).get("cuda_archs"),
        "cache_dir": cache,
    }


def _version() -> str:
    from keras_residual import __version__

    return __version__


def print_info() -> None:
    """Prints ``info()`` as aligned lines."""
    details = info()
    for key, value in details.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for name, sub in value.items():
                if isinstance(sub, dict):
                    text = ", ".join(f"{k}={v}" for k, v in sub.items())
                    print(f"  {name}: {text}")
                else:
                    print(f"  {name}: {sub}")
        else:
            print(f"{key}: {value}")
