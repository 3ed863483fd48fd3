"""pytest-benchmark suite: fused (`native`) against unfused (`composite`).

Run with ``pytest benchmarks --benchmark-only`` on the active Keras backend
(``KERAS_BACKEND``). Sizes are small by default so the suite takes a couple
of minutes on a laptop CPU; ``KERAS_RESIDUAL_BENCH_FULL=1`` uses ResNet50's
real activation shapes and batch 32. ``KERAS_RESIDUAL_BENCH_ROUNDS`` sets
the timed rounds per benchmark.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402
from _common import FULL, IMPLEMENTATIONS  # noqa: E402


def pytest_benchmark_update_machine_info(config, machine_info):
    """Records the backend and device, so saved runs compare like with like."""
    from keras_residual.bench import _env

    backend = keras.config.backend()
    machine_info["keras_backend"] = backend
    machine_info["keras_device"] = _env.device(backend)
    machine_info["keras_residual_versions"] = _env.versions(backend)
    machine_info["keras_residual_bench_full"] = FULL


def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """By default, one table per case, holding its native and composite rows."""
    if group_by != "group":
        return None
    groups: dict = {}
    for bench in benchmarks:
        params = bench.get("params") or {}
        case = " ".join(
            f"{key}={value}" for key, value in sorted(params.items()) if key != "implementation"
        )
        groups.setdefault(f"{bench['group']} {case}".strip(), []).append(bench)
    for grouped in groups.values():
        grouped.sort(key=lambda bench: bench["name"])
    return sorted(groups.items())


@pytest.fixture(autouse=True)
def _float32_channels_last():
    keras.config.set_dtype_policy("float32")
    keras.config.set_image_data_format("channels_last")
    yield


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request):
    """`composite` and `native`; `native` skips where it cannot run."""
    if request.param == "native":
        from keras_residual.bench._models import native_unavailable_reason

        reason = native_unavailable_reason()
        if reason is not None:
            pytest.skip(reason)
    return request.param
