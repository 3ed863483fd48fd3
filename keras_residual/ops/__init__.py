"""Ops of keras_residual: ``conv_bn_add_act``, fused where the backend allows."""

from keras_residual.ops.conv_bn_add_act import NATIVE_ACTIVATIONS, conv_bn_add_act

__all__ = ["NATIVE_ACTIVATIONS", "conv_bn_add_act"]
