"""The basic residual block: two k x k conv -> BN units and a skip connection."""

from __future__ import annotations

import keras

from keras_residual.layers import _args
from keras_residual.layers._base import BaseResidualBlock


@keras.saving.register_keras_serializable(package="keras_residual")
class ResidualBlock(BaseResidualBlock):
    """The basic residual block of ResNet18 and ResNet34.

    ``act(BN(conv(act(BN(conv(x))))) + shortcut(x))``, where ``shortcut`` is
    the identity, or a 1x1 conv + BN projection when the stride or the width
    changes. The block adds that projection by itself, so it drops into a
    ``keras.Sequential`` like any other layer.

    Args:
        filters: int. Channels of both convolutions and of the output.
        kernel_size: int or tuple of 2 ints. Size of both convolutions.
            Defaults to `3`.
        strides: int or tuple of 2 ints. Stride of the first convolution and
            of the projection shortcut. Defaults to `1`.
    ARGUMENTS
        **kwargs: base layer arguments, such as `name`, `dtype` and
            `trainable`.

    Input shape:
        4D tensor `(batch, height, width, channels)` for `"channels_last"`,
        `(batch, channels, height, width)` for `"channels_first"`.

    Output shape:
        4D tensor with `filters` channels and the spatial size divided by
        `strides`, rounded up.

    Raises:
        ValueError: for an argument out of range, or, at build, for an input
            that is not 4D, an undefined channel dimension, or an impossible
            identity shortcut.

    Examples:

    >>> model = keras.Sequential([
    ...     keras.Input((32, 32, 16)),
    ...     ResidualBlock(16),
    ...     ResidualBlock(32, strides=2),  # adds a projection shortcut
    ... ])
    >>> model.output_shape
    (None, 16, 16, 32)
    """

    expansion = 1
    kind = _args.BASIC

    def __init__(
        self, filters, kernel_size=_args.BY_NAME["kernel_size"].default, strides=1, **kwargs
    ):
        super().__init__(filters, strides=strides, kernel_size=kernel_size, **kwargs)

    def _unit_specs(self):
        return [
            (self.filters, self.kernel_size, self.strides, 1),
            (self.filters, self.kernel_size, 1, 1),
        ]


ResidualBlock.__doc__ = ResidualBlock.__doc__.replace(
    "    ARGUMENTS\n",
    _args.docstring(a for a in _args.for_block(_args.BASIC) if a.name != "kernel_size") + "\n",
)
