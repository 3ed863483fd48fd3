"""Argument checks shared by the layers and the models.

Every check raises a ``ValueError`` that names the argument and the value it
received, in the Keras style: ``"... Received: filters=0"``.
"""

from __future__ import annotations

import numbers

import keras

DATA_FORMATS = ("channels_last", "channels_first")


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def int_pair(value, name: str) -> tuple[int, int]:
    """An int or a pair of ints, each at least 1, as a tuple of two ints."""
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise ValueError(
            f"`{name}` must be an integer or a tuple of 2 integers. Received: {name}={value!r}"
        )
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral) or item < 1:
            raise ValueError(
                f"`{name}` must be an integer or a tuple of 2 integers, each at "
                f"least 1. Received: {name}={value!r}"
            )
    return int(items[0]), int(items[1])


def one_of(value, name: str, allowed) -> str:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return value


def data_format(value) -> str:
    """Resolves ``None`` to ``keras.config.image_data_format()``."""
    if value is None:
        return keras.config.image_data_format()
    if isinstance(value, str):
        value = value.lower()
    return one_of(value, "data_format", DATA_FORMATS)


def activation(value, name: str = "activation") -> str:
    """An activation must be the name of a Keras activation function.

    Only names are accepted, so configs stay JSON-ready and load with
    ``safe_mode=True``.
    """
    if not isinstance(value, str):
        raise ValueError(
            f"`{name}` must be the name of a Keras activation, such as 'relu', "
            f"'leaky_relu', 'relu6', 'silu', 'gelu' or 'linear'. "
            f"Received: {name}={value!r}"
        )
    try:
        keras.activations.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` is not a known Keras activation. Received: {name}={value!r}"
        ) from error
    return value


def fraction(value, name: str) -> float:
    """A float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={value!r}")
    return float(value)


def positive_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    return float(value)


def optional_int(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer or None. Received: {name}={value!r}")
    return int(value)


def image_shape(input_shape, name: str, layer_name: str) -> tuple:
    """Checks a 4D ``(batch, ...)`` shape and returns it as a tuple."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"{layer_name} expects a 4D input (batch, height, width, channels) "
            f"or (batch, channels, height, width). Received: {name}={input_shape!r}"
        )
    return shape


def channels(shape: tuple, data_format_: str, name: str, layer_name: str) -> int:
    """The channel dimension of a 4D shape, which must be known."""
    value = shape[-1] if data_format_ == "channels_last" else shape[1]
    if value is None:
        raise ValueError(
            f"{layer_name} needs a defined channel dimension (axis "
            f"{-1 if data_format_ == 'channels_last' else 1} for "
            f"data_format={data_format_!r}). Received: {name}={shape!r}"
        )
    return int(value)
