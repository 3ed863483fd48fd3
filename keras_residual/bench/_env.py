"""Where a benchmark ran: host, library versions, device."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

from keras_residual._device import cpu_cores, cpu_device, cpu_model, device

__all__ = ["cpu_cores", "cpu_device", "cpu_model", "device", "host", "versions", "native_info"]


def host() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def versions(backend: str) -> dict:
    import keras
    import numpy

    import keras_residual

    found = {
        "python": sys.version.split()[0],
        "keras": keras.__version__,
        "keras_residual": keras_residual.__version__,
        "numpy": numpy.__version__,
    }
    if backend == "tensorflow":
        import tensorflow as tf

        found["tensorflow"] = tf.__version__
    elif backend == "torch":
        import torch

        found["torch"] = torch.__version__
        found["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            found["cudnn"] = torch.backends.cudnn.version()
    elif backend == "jax":
        import jax

        found["jax"] = jax.__version__
        found["jaxlib"] = _version("jaxlib")
    return found


def native_info() -> dict | None:
    """`keras_residual.native.info()`, or `None` where there is none."""
    try:
        from keras_residual import native

        return native.info()
    except Exception:  # noqa: BLE001 - optional information
        return None
