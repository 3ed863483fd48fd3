"""keras_residual: residual networks for Keras 3.

``ResidualBlock`` and ``BottleneckBlock`` are Keras layers that carry their
own skip connection, so a ResNet is nearly a ``keras.Sequential`` of them.
``ResNet50`` and its family are subclassed ``keras.Model`` classes; with the
defaults, ``ResNet50`` is ``keras.applications.ResNet50`` and loads its
weights.

Every conv -> BN (-> add) -> activation unit runs through one op,
``keras_residual.ops.conv_bn_add_act``: the native kernels of ``csrc/`` where
the backend and device have them (see ``keras_residual.native``), plain
``keras.ops`` elsewhere (``keras_residual.config``).
"""

from keras.applications.resnet import decode_predictions, preprocess_input

from keras_residual import config, native, ops
from keras_residual.folding import fold_batchnorm
from keras_residual.layers import BottleneckBlock, ResidualBlock
from keras_residual.models import (
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet50D,
    ResNet50V2,
    ResNet101,
    ResNet101V2,
    ResNet152,
    ResNet152V2,
    ResNeXt50_32x4d,
    ResNeXt101_32x8d,
    SEResNet50,
    SEResNeXt50_32x4d,
    WideResNet50_2,
    feature_extractor,
    from_keras_applications,
    from_timm,
    from_torchvision,
)

__version__ = "0.1.0"

__all__ = [
    "BottleneckBlock",
    "ResidualBlock",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ResNet50D",
    "ResNet50V2",
    "ResNet101V2",
    "ResNet152V2",
    "ResNeXt50_32x4d",
    "ResNeXt101_32x8d",
    "SEResNet50",
    "SEResNeXt50_32x4d",
    "WideResNet50_2",
    "config",
    "decode_predictions",
    "feature_extractor",
    "fold_batchnorm",
    "from_keras_applications",
    "from_timm",
    "from_torchvision",
    "native",
    "ops",
    "preprocess_input",
]
