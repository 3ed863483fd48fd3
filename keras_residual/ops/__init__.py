"""Ops of keras_residual: ``conv_bn_add_act``, fused where the backend allows,
and ``max_pool``, the stem's pooling without layout copies where it can."""

from keras_residual.ops.conv_bn_add_act import NATIVE_ACTIVATIONS, conv_bn_add_act, max_pool

__all__ = ["NATIVE_ACTIVATIONS", "conv_bn_add_act", "max_pool"]
