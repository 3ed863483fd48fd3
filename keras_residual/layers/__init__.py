"""Residual blocks as Keras 3 layers."""

from keras_residual.layers.bottleneck_block import BottleneckBlock
from keras_residual.layers.residual_block import ResidualBlock

__all__ = ["BottleneckBlock", "ResidualBlock"]
