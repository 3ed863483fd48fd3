"""Shared pytest setup: quiet backends and a fresh Keras state per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts with float32, channels_last and fresh layer names."""
    keras.config.set_dtype_policy("float32")
    keras.config.set_image_data_format("channels_last")
    # Without the full garbage collection (a quarter of a second with a
    # backend loaded, times two thousand tests): Python's own collector runs
    # as usual, and the names and global state are reset all the same.
    keras.utils.clear_session(free_memory=False)
    yield
    keras.config.set_dtype_policy("float32")
    keras.config.set_image_data_format("channels_last")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's test command): one worker per core, at most 4.

    Each worker imports a Keras backend and builds models; more than four
    add memory faster than they save time.
    """
    # sched_getaffinity (the cores this process may use) is Linux-only.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))
