"""The basic residual block: two k x k conv -> BN units and a skip connection."""

from __future__ import annotations

import keras

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
        activation: str. Name of a Keras activation, such as `"relu"`,
            `"leaky_relu"`, `"relu6"`, `"silu"` (`"swish"`), `"gelu"` or
            `"linear"`. Defaults to `"relu"`.
        shortcut: str. `"auto"` projects when the stride is not 1 or the
            channel count changes, and is the identity otherwise;
            `"projection"` always projects; `"identity"` never does, and
            raises a `ValueError` at build when the shapes cannot match.
            Defaults to `"auto"`.
        use_bias: bool. Whether the convolutions have a bias.
            Defaults to `False`.
        momentum: float. Momentum of the moving statistics of every
            BatchNormalization. Defaults to `0.9` (the Keras default of 0.99
            adapts too slowly for short trainings).
        epsilon: float. Epsilon of every BatchNormalization.
            Defaults to `1e-5`.
        kernel_initializer: initializer name, config or instance for the
            convolution kernels. Defaults to `"he_normal"`.
        kernel_regularizer: regularizer name, config or instance for the
            convolution kernels, or `None`. Defaults to `None`.
        zero_init_residual: bool. Whether the last BatchNormalization's gamma
            starts at zero, so the block starts as its shortcut.
            Defaults to `False`.
        drop_path_rate: float in [0, 1). Stochastic depth: the probability of
            dropping the residual branch of a sample in training. The kept
            branches are scaled by `1 / (1 - drop_path_rate)`; inference is
            unaffected. Defaults to `0.0`.
        seed: int or `None`. Seed of the stochastic depth draws.
            Defaults to `None`.
        data_format: `"channels_last"`, `"channels_first"` or `None` for
            `keras.config.image_data_format()`. Defaults to `None`.
        synchronized: bool. Whether BatchNormalization uses the statistics of
            the global batch in data-parallel training. On TensorFlow this is
            Keras' synchronized BatchNormalization under `tf.distribute`; on
            JAX, `keras.distribution` computes global statistics either way;
            on torch it has no effect (each DDP process uses its own batch)
            and warns. Defaults to `False`.
        implementation: `"auto"`, `"native"` or `"composite"`. How each
            conv -> BN (-> add) -> activation unit runs, through
            `keras_residual.ops.conv_bn_add_act`: `"auto"` follows
            `keras_residual.config.get_implementation()` (native kernels
            where the backend and device have them, `keras.ops` elsewhere);
            `"native"` raises if they cannot run; `"composite"` is
            `keras.ops` only. Saved in the config; files never need the
            native library. Defaults to `"auto"`.
        folded: bool. An inference block whose BatchNormalizations are
            folded into the conv kernels and biases: no BN layers, conv
            biases. Made by `keras_residual.fold_batchnorm`.
            Defaults to `False`.
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

    def _unit_specs(self):
        return [
            (self.filters, self.kernel_size, self.strides),
            (self.filters, self.kernel_size, 1),
        ]
