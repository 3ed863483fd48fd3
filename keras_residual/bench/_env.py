"""Where a benchmark ran: host, library versions, device."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def cpu_model() -> str:
    """The processor's marketing name, as the OS reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_device() -> str:
    return f"cpu ({cpu_model()}, {cpu_cores()} cores)"


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


def device(backend: str) -> str:
    """The device the active backend computes on, in words."""
    try:
        if backend == "torch":
            import torch

            if torch.cuda.is_available():
                return f"cuda:0 ({torch.cuda.get_device_name(0)})"
        elif backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            if gpus:
                details = tf.config.experimental.get_device_details(gpus[0])
                return f"gpu:0 ({details.get('device_name', gpus[0].name)})"
        elif backend == "jax":
            import jax

            first = jax.devices()[0]
            if first.platform != "cpu":
                return f"{first.platform}:{first.id} ({first.device_kind})"
    except Exception as error:  # noqa: BLE001 - the run goes on with a plain name
        return f"unknown ({type(error).__name__}: {error})"
    return cpu_device()


def native_info() -> dict | None:
    """`keras_residual.native.info()`, or `None` where there is none."""
    try:
        from keras_residual import native

        return native.info()
    except Exception:  # noqa: BLE001 - optional information
        return None
