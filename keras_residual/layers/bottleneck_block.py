"""The bottleneck residual block: 1x1 -> 3x3 -> 1x1 conv -> BN units."""

from __future__ import annotations

import keras

from keras_residual import _validation as check
from keras_residual.layers._base import BaseResidualBlock

STRIDE_ON = ("3x3", "1x1")


@keras.saving.register_keras_serializable(package="keras_residual")
class BottleneckBlock(BaseResidualBlock):
    """The bottleneck block of ResNet50, ResNet101 and ResNet152.

    A 1x1 convolution narrows to `filters` channels, a 3x3 convolution works
    there, and a 1x1 convolution widens to `expansion * filters` (4x)
    channels; each is followed by BatchNormalization. The shortcut is the
    identity, or a 1x1 conv + BN projection when the stride or the width
    changes.

    Args:
        filters: int. Channels of the inner convolutions. The output has
            `4 * filters` channels.
        strides: int or tuple of 2 ints. Stride of the block.
            Defaults to `1`.
        stride_on: `"3x3"` or `"1x1"`. Which convolution carries the stride.
            `"3x3"` is ResNet v1.5, as in torchvision and timm; `"1x1"` is
            the original v1 layout of `keras.applications`.
            Defaults to `"3x3"`.
        kernel_size: int or tuple of 2 ints. Size of the middle convolution.
            Defaults to `3`.
        **kwargs: every other argument of `ResidualBlock` (`activation`,
            `shortcut`, `use_bias`, `momentum`, `epsilon`,
            `kernel_initializer`, `kernel_regularizer`, `zero_init_residual`,
            `drop_path_rate`, `seed`, `data_format`, `synchronized`, `implementation`,
            `folded`), with the same
            defaults, and the base layer arguments.

    Input shape:
        4D tensor `(batch, height, width, channels)` for `"channels_last"`,
        `(batch, channels, height, width)` for `"channels_first"`.

    Output shape:
        4D tensor with `4 * filters` channels and the spatial size divided by
        `strides`, rounded up.

    Raises:
        ValueError: for an argument out of range, or, at build, for an input
            that is not 4D, an undefined channel dimension, or an impossible
            identity shortcut.

    Examples:

    >>> block = BottleneckBlock(64, strides=2)
    >>> block.compute_output_shape((None, 56, 56, 256))
    (None, 28, 28, 256)
    """

    expansion = 4

    def __init__(self, filters, strides=1, stride_on="3x3", kernel_size=3, **kwargs):
        self.stride_on = check.one_of(stride_on, "stride_on", STRIDE_ON)
        super().__init__(filters, kernel_size=kernel_size, strides=strides, **kwargs)

    def _unit_specs(self):
        on_1x1 = self.stride_on == "1x1"
        return [
            (self.filters, 1, self.strides if on_1x1 else 1),
            (self.filters, self.kernel_size, 1 if on_1x1 else self.strides),
            (self.output_channels, 1, 1),
        ]

    def get_config(self):
        config = super().get_config()
        config["stride_on"] = self.stride_on
        return config
