"""The framework-free pybind11 module ``_core``: the CPU kernels on NumPy arrays.

It needs only a C++ compiler and pybind11, and exists so that the kernels are
tested without any framework. ``keras_residual._native`` re-exports it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import sysconfig
import threading
from pathlib import Path

from keras_residual.native import _build

MODULE_NAME = "keras_residual._native._core"
_lock = threading.Lock()
_loaded = None
_error: str | None = None


def sources() -> list[Path]:
    return [*_build.kernel_sources(), _build.CSRC / "python" / "core_module.cpp"]


def _flags() -> list[str]:
    # The module's own source includes Python and pybind11 headers: no -march.
    return ["-O3", "-std=c++17", "-fPIC", "-pthread"]


def _compile(out_path: Path, build_dir: Path) -> None:
    try:
        import pybind11
    except ImportError as error:
        raise _build.NativeUnavailable("pybind11 is not installed") from error
    kernels = _build.compile_kernels(build_dir)
    module = build_dir / "core_module.o"
    _build.run_compiler(
        [
            _build.compiler(),
            *_flags(),
            f"-I{_build.CSRC / 'include'}",
            f"-I{pybind11.get_include()}",
            f"-I{sysconfig.get_paths()['include']}",
            "-c",
            str(_build.CSRC / "python" / "core_module.cpp"),
            "-o",
            str(module),
        ],
        cwd=build_dir,
    )
    _build.run_compiler(
        [
            _build.compiler(),
            "-shared",
            *_flags(),
            str(module),
            *map(str, kernels),
            "-o",
            str(out_path),
        ],
        cwd=build_dir,
    )


def build(rebuild: bool = False) -> Path:
    """Compiles (or finds in the cache) the core module; returns its path."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    extra = " ".join([_build.compiler_version(), *_flags(), _build.kernel_key()])
    return _build.build_library(
        "core",
        sources(),
        framework_version="numpy",
        compile=_compile,
        extra_key=extra,
        suffix=suffix,
        rebuild=rebuild,
        description="the NumPy module of the CPU kernels",
        estimate="30 s",
    )


def _load_from(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[MODULE_NAME] = module
    return module


def load_core():
    """The loaded ``_core`` module, compiled on first use (once per process).

    Raises:
        NativeUnavailable: no compiler, no pybind11, an untrusted cache, or
            the build failed (now or, recorded, in an earlier process).
    """
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if _error is not None:
            raise _build.NativeUnavailable(_error)
        try:
            path = build()
            try:
                module = _load_from(path)
            except ImportError:
                # A library that passed its checks but does not load (a foreign
                # ABI, say): compile it afresh once.
                module = _load_from(build(rebuild=True))
        except _build.NativeUnavailable as error:
            _error = str(error)
            raise
        _loaded = module
    return _loaded
