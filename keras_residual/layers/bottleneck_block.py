"""The bottleneck residual block: 1x1 -> 3x3 -> 1x1 conv -> BN units."""

from __future__ import annotations

import keras

from keras_residual.layers import _args
from keras_residual.layers._base import BaseResidualBlock


@keras.saving.register_keras_serializable(package="keras_residual")
class BottleneckBlock(BaseResidualBlock):
    """The bottleneck block of ResNet50, ResNet101, ResNet152 and ResNeXt.

    A 1x1 convolution narrows to the inner width (`filters`, or
    `int(filters * width_per_group / 64) * groups`), a 3x3 convolution
    (grouped, for ResNeXt) works there, and a 1x1 convolution widens to
    `expansion * filters` (4x) channels; each is followed by
    BatchNormalization. The shortcut is the identity, or a 1x1 conv + BN
    projection when the stride or the width changes.

    Args:
        filters: int. Channels of the inner convolutions (with the default
            `groups` and `width_per_group`). The output has `4 * filters`
            channels.
        strides: int or tuple of 2 ints. Stride of the block.
            Defaults to `1`.
    ARGUMENTS
        **kwargs: base layer arguments, such as `name`, `dtype` and
            `trainable`.

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
    >>> BottleneckBlock(64, groups=32, width_per_group=4).width  # ResNeXt 32x4d
    128
    """

    expansion = 4
    kind = _args.BOTTLENECK

    def __init__(
        self,
        filters,
        strides=1,
        stride_on=_args.BY_NAME["stride_on"].default,
        kernel_size=_args.BY_NAME["kernel_size"].default,
        **kwargs,
    ):
        super().__init__(
            filters, strides=strides, stride_on=stride_on, kernel_size=kernel_size, **kwargs
        )

    @property
    def width(self) -> int:
        """Channels of the inner convolutions, as torchvision computes them."""
        return int(self.filters * self.width_per_group / 64) * self.groups

    def _unit_specs(self):
        if int(self.filters * self.width_per_group / 64) < 1:
            raise ValueError(
                "`filters * width_per_group / 64` must be at least 1, so that every group "
                f"has a channel. Received: filters={self.filters}, "
                f"width_per_group={self.width_per_group}"
            )
        on_1x1 = self.stride_on == "1x1"
        return [
            (self.width, 1, self.strides if on_1x1 else 1, 1),
            (self.width, self.kernel_size, 1 if on_1x1 else self.strides, self.groups),
            (self.output_channels, 1, 1, 1),
        ]


BottleneckBlock.__doc__ = BottleneckBlock.__doc__.replace(
    "    ARGUMENTS\n", _args.docstring(_args.for_block(_args.BOTTLENECK)) + "\n"
)
