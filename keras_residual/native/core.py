"""The framework-free pybind11 module ``_core``: the CPU kernels on NumPy arrays.

It needs only a C++ compiler and pybind11, and exists so that the kernels are
tested without any framework. ``keras_residual._native`` re-exports it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import sysconfig
from pathlib import Path

from keras_residual.native import _build

MODULE_NAME = "keras_residual._native._core"
_loaded = None
_error: str | None = None


def sources() -> list[Path]:
    return [
        *sorted((_build.CSRC / "cpu").glob("*.cpp")),
        _build.CSRC / "python" / "core_module.cpp",
    ]


def _flags() -> list[str]:
    return ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]


def _compile(out_path: Path, build_dir: Path) -> None:
    try:
        import pybind11
    except ImportError as error:
        raise _build.NativeUnavailable("pybind11 is not installed") from error
    command = [
        _build.compiler(),
        *_flags(),
        f"-I{_build.CSRC / 'include'}",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
        *[str(path) for path in sources()],
        "-o",
        str(out_path),
    ]
    _build.run_compiler(command, cwd=build_dir)


def build(rebuild: bool = False) -> Path:
    """Compiles (or finds in the cache) the core module; returns its path."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    extra = " ".join([_build.compiler_version(), *_flags(), _build.cpu_signature()])
    return _build.build_library(
        "core",
        sources(),
        framework_version="numpy",
        compile=_compile,
        extra_key=extra,
        suffix=suffix,
        rebuild=rebuild,
    )


def _load_from(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[MODULE_NAME] = module
    return module


def load_core():
    """The loaded ``_core`` module, compiled on first use.

    Raises:
        NativeUnavailable: no compiler, no pybind11, or the build failed.
    """
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    if _error is not None:
        raise _build.NativeUnavailable(_error)
    try:
        path = build()
        try:
            _loaded = _load_from(path)
        except ImportError:
            # A library that passed its checks but does not load (a foreign
            # ABI, say): compile it afresh once.
            _loaded = _load_from(build(rebuild=True))
    except _build.NativeUnavailable as error:
        _error = str(error)
        raise
    return _loaded
