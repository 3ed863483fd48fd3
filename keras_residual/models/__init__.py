"""The ResNet family as subclassed keras.Model classes."""

from keras_residual.models.resnet import (
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
)
from keras_residual.models.weights import from_keras_applications

__all__ = [
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "from_keras_applications",
]
