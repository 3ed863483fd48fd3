"""The memory layout a block or model computes in.

TensorFlow's CPU convolution and pooling kernels only support NHWC, so on the
TensorFlow backend a ``channels_first`` layer transposes its input to NHWC
once, computes there, and transposes back. The weights are the same in both
layouts, so files move freely between backends and formats.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_residual import _validation as check


class Layout:
    """The user-facing ``data_format`` and the one the sublayers use."""

    def __init__(self, data_format: str):
        self.data_format = data_format
        self.transpose = data_format == "channels_first" and keras.config.backend() == "tensorflow"
        self.inner = "channels_last" if self.transpose else data_format
        self.channel_axis = -1 if self.inner == "channels_last" else 1

    def checked_shape(self, input_shape, layer_name: str) -> tuple:
        """Validates a 4D input shape; returns it in the inner layout."""
        shape = check.image_shape(input_shape, "input_shape", layer_name)
        check.channels(shape, self.data_format, "input_shape", layer_name)
        if self.transpose:
            shape = (shape[0], shape[2], shape[3], shape[1])
        return shape

    def outer_shape(self, shape: tuple) -> tuple:
        """A 4D shape of the inner layout in the user's layout."""
        if self.transpose:
            return (shape[0], shape[3], shape[1], shape[2])
        return shape

    def to_inner(self, x):
        return ops.transpose(x, (0, 2, 3, 1)) if self.transpose else x

    def to_outer(self, x):
        return ops.transpose(x, (0, 3, 1, 2)) if self.transpose else x
