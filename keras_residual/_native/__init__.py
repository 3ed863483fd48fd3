"""The CPU kernels on NumPy arrays, compiled on first import.

``import keras_residual._native`` compiles (once, then from the cache) the
pybind11 module of ``csrc/python/core_module.cpp`` and re-exports it: the
kernels of ``csrc/cpu`` on NumPy arrays, and ``build_info()``. It raises
``ImportError`` with the reason when it cannot be built (no compiler, no
pybind11). Nothing else in the package needs it: it is how the kernels are
tested without a framework.
"""

from keras_residual.native._build import NativeUnavailable
from keras_residual.native.core import load_core

try:
    _core = load_core()
except NativeUnavailable as _error:
    raise ImportError(f"keras_residual._native is unavailable: {_error}") from _error

globals().update({name: getattr(_core, name) for name in dir(_core) if not name.startswith("_")})
