"""The native kernels: whether they are usable here, and what was built.

The fused BatchNormalization + add + activation kernels of ``csrc/`` reach
Keras through one adapter per backend:

- ``tensorflow``: a custom op library (CPU kernels), with registered shape
  functions and gradients.
- ``torch``: ``torch.library`` ops (CPU, and CUDA when torch has CUDA and
  ``nvcc`` is present), with autograd and fake kernels for ``torch.compile``.
- ``jax``: none: XLA fuses the elementwise work itself, so the composite path
  is used.

Each adapter is compiled on first use against the installed framework and
cached (see ``keras_residual.native._build``). If it cannot be built or
loaded, ``implementation="auto"`` warns once and uses the composite path.

Examples:

>>> from keras_residual import native
>>> isinstance(native.available("jax"), bool)
True
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import warnings

from keras_residual.native._build import NativeUnavailable, cache_dir, compiler_version

__all__ = ["NativeUnavailable", "available", "info", "print_info"]

ADAPTERS = {
    "tensorflow": "keras_residual.native._tensorflow",
    "torch": "keras_residual.native._torch",
}
NO_ADAPTER = {
    "jax": "no native adapter for JAX: XLA fuses the elementwise work itself",
    "numpy": "the numpy backend has no gradients or native adapter",
    "openvino": "no native adapter for OpenVINO",
}

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


def adapter(backend: str | None = None):
    """The loaded adapter module of `backend`, compiling it on first use.

    Raises:
        NativeUnavailable: with the reason when there is none for this backend
            or it cannot be built or loaded. The failure is remembered: the
            build is tried once per process.
    """
    backend = _backend(backend)
    if backend in _loaded:
        return _loaded[backend]
    if backend in _failed:
        raise NativeUnavailable(_failed[backend])
    if backend not in ADAPTERS:
        reason = NO_ADAPTER.get(backend, f"no native adapter for the {backend} backend")
        _failed[backend] = reason
        raise NativeUnavailable(reason)
    try:
        module = importlib.import_module(ADAPTERS[backend])
        module.load()
    except NativeUnavailable as error:
        _failed[backend] = str(error)
        raise
    except Exception as error:  # noqa: BLE001 - a failed load must never crash a model
        _failed[backend] = f"loading the {backend} adapter failed: {type(error).__name__}: {error}"
        raise NativeUnavailable(_failed[backend]) from error
    _loaded[backend] = module
    return module


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

    Compiles the adapter on first use (a minute or two, then cached).

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


def _device(backend: str) -> str:
    from keras_residual.bench._env import device

    return device(backend)


def _nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        output = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line for line in output.splitlines() if "release" in line]
    return lines[0].strip() if lines else output.strip()


def info() -> dict:
    """What ``python -m keras_residual info`` prints, as a dict.

    Loads (compiling if needed) the active backend's adapter and the NumPy
    core module; the other adapters are reported from their status alone.
    """
    import keras

    backend = keras.config.backend()
    adapters = {}
    for name in ADAPTERS:
        status: dict = {}
        if name == backend:
            try:
                adapter(name)
            except NativeUnavailable:
                pass
        try:
            module = importlib.import_module(ADAPTERS[name])
            status = dict(module.status())
        except ImportError as error:
            status = {"built": False, "loaded": False, "reason": f"not installed ({error})"}
        except Exception as error:  # noqa: BLE001
            status = {"built": False, "loaded": False, "reason": f"{type(error).__name__}: {error}"}
        if name in _failed:
            status.setdefault("reason", _failed[name])
        adapters[name] = status
    for name, reason in NO_ADAPTER.items():
        if name == "jax":
            adapters[name] = {"built": False, "loaded": False, "reason": reason}
    from keras_residual import config

    try:
        from keras_residual.native.core import load_core

        core = {"loaded": True, **dict(load_core().build_info())}
    except NativeUnavailable as error:
        core = {"loaded": False, "reason": str(error).splitlines()[0]}
    try:
        cache = str(cache_dir())
    except NativeUnavailable as error:
        cache = f"unavailable ({error})"
    cuda_archs = None
    torch_status = adapters.get("torch", {})
    if torch_status.get("cuda_archs"):
        cuda_archs = torch_status["cuda_archs"]
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
        "nvcc": _nvcc_version(),
        "cuda_archs": cuda_archs,
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
