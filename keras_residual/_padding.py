"""The convolution paddings: one definition for the op, the blocks and the
torch adapter.

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
