"""The convolution paddings, and the 1x1 convolution that needs none: one
definition for the op, the blocks and the adapters.

`"same"` and `"valid"` are Keras'. `"symmetric"` is PyTorch's
`padding=k // 2` (torchvision, timm): `dilation * (k - 1) // 2` zeros on every
side, which differs from `"same"` for a stride-2 conv on an even size.
"""

from __future__ import annotations

PADDINGS = ("same", "valid", "symmetric")


def check(padding) -> str:
    """`padding` itself, or a `ValueError` naming the value received."""
    if padding not in PADDINGS:
        raise ValueError(
            f"`padding` must be 'same', 'valid' or 'symmetric'. Received: padding={padding!r}"
        )
    return padding


def symmetric(kernel_size, dilation_rate=1) -> tuple[int, int]:
    """Zeros on each side of the two spatial axes for `padding="symmetric"`."""
    dilation = (dilation_rate,) * 2 if isinstance(dilation_rate, int) else tuple(dilation_rate)
    return tuple(d * (int(k) - 1) // 2 for k, d in zip(kernel_size, dilation, strict=True))


def pair(value, name: str) -> tuple[int, int]:
    """An int or 1 or 2 ints as 2 ints, or a `ValueError` naming `name`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise ValueError(f"`{name}` must be an int or 2 ints. Received: {name}={value!r}")
    return values


def pointwise(inputs, kernel, strides: tuple[int, int]):
    """The 1x1 convolution of NHWC `inputs` as one `(n*h*w, in) @ (in, out)` product.

    A 1x1 kernel pads nothing under any padding here, and its dilation does
    nothing; a stride subsamples the input first. `kernel` is Keras'
    `(1, 1, in, out)`, used as it is: no copy into another layout, forward or
    backward. The adapters choose where this beats their convolution.
    """
    from keras import ops

    if strides != (1, 1):
        inputs = inputs[:, :: strides[0], :: strides[1], :]
    _, h, w, in_channels = inputs.shape
    filters = kernel.shape[-1]
    outputs = ops.matmul(
        ops.reshape(inputs, (-1, in_channels)), ops.reshape(kernel, (in_channels, filters))
    )
    return ops.reshape(outputs, (-1, h, w, filters))
