"""Which native tests run under which Keras backend.

Each adapter's own tests run under its backend (CI runs the suite once per
backend), and the framework-free ones (the kernels on NumPy, the build cache,
the CUDA compile check) once, under the default TensorFlow backend, so that
no test runs three times.
"""

import keras
import pytest

OWN_BACKEND = {
    "test_tensorflow_op.py": "tensorflow",
    "test_torch_op.py": "torch",
    "test_jax_ffi.py": "jax",
}
FRAMEWORK_FREE = {
    "test_kernels_numpy.py",
    "test_build.py",
    "test_cache_security.py",
    "test_cuda_compile.py",
}


def pytest_collection_modifyitems(config, items):
    backend = keras.config.backend()
    for item in items:
        name = item.path.name
        wanted = OWN_BACKEND.get(name)
        if wanted is not None and wanted != backend:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"tests the {wanted} adapter: runs with KERAS_BACKEND={wanted}"
                )
            )
        elif name in FRAMEWORK_FREE and backend != "tensorflow":
            item.add_marker(
                pytest.mark.skip(reason="framework-free: runs once, with the default backend")
            )
