"""The device a backend computes on, in words (for `info` and the benchmarks)."""

from __future__ import annotations

import os
import platform


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in Linux's /proc/cpuinfo, or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip().lower() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The processor's marketing name, as the OS reports it."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown cpu"


def cpu_vendor() -> str | None:
    """The x86 vendor string ("GenuineIntel", "AuthenticAMD") on Linux, else None."""
    return _cpuinfo("vendor_id")


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_device() -> str:
    return f"cpu ({cpu_model()}, {cpu_cores()} cores)"


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
