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
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
    keras.config.set_image_data_format("channels_last")
