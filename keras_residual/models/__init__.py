"""The ResNet family as subclassed keras.Model classes."""

from keras_residual.models.convert import from_timm, from_torchvision
from keras_residual.models.features import feature_extractor
from keras_residual.models.resnet import (
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
)
from keras_residual.models.weights import from_keras_applications

__all__ = [
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
    "feature_extractor",
    "from_keras_applications",
    "from_timm",
    "from_torchvision",
]
