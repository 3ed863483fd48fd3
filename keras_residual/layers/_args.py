"""The one definition of a residual block's arguments.

Every keyword argument that ``ResidualBlock`` and ``BottleneckBlock`` take
besides ``filters`` and ``strides`` is declared once here: its default, its
check, how it is written to a config, and what it means. The blocks'
``__init__`` and ``get_config``, the ``ResNet`` constructor (which passes
them on to its blocks, with its own defaults where ``keras.applications``
differs) and ``get_config``, the docstrings of all three and the README tables
(checked by ``tests/test_arguments.py``) derive from this table.

The config keys are the argument names; they are the saved format, so a name
never changes, and an argument added later reads its default from older files.
"""

from __future__ import annotations

import dataclasses
import numbers
import textwrap
from collections.abc import Callable

import keras

from keras_residual import _validation as check
from keras_residual import config as config_lib

SHORTCUTS = ("auto", "projection", "identity", "avg_down")
STRIDE_ON = ("3x3", "1x1")
PADDINGS = ("same", "symmetric")

BASIC = "basic"
BOTTLENECK = "bottleneck"


def _bool(value, name):
    if not isinstance(value, (bool, numbers.Integral)):
        raise ValueError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return bool(value)


def _choice(allowed):
    def validate(value, name):
        return check.one_of(value, name, allowed)

    return validate


def _se_ratio(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(
            f"`{name}` must be a float in [0, 1] (0 turns squeeze-excitation off). "
            f"Received: {name}={value!r}"
        )
    return float(value)


def _serialize_regularizer(value):
    return None if value is None else keras.regularizers.serialize(value)


def _identity(value):
    return value


_SAME = object()  # `model_default`: the same as the blocks' default


@dataclasses.dataclass(frozen=True)
class Argument:
    """One block argument.

    Attributes:
        name: the keyword and the config key.
        default: the blocks' default.
        validate: `(value, name) -> value`, raising `ValueError` with the
            name and the value received.
        doc: what it means, for the docstrings and the README.
        model_default: `ResNet`'s default where it differs from the blocks'
            (the layout of `keras.applications`).
        serialize: the value as written to a config.
        blocks: the block kinds that take it.
    """

    name: str
    default: object
    validate: Callable
    doc: str
    model_default: object = _SAME
    serialize: Callable = _identity
    blocks: tuple = (BASIC, BOTTLENECK)

    def default_for(self, model: bool):
        if model and self.model_default is not _SAME:
            return self.model_default
        return self.default


ARGUMENTS = (
    Argument(
        "kernel_size",
        3,
        check.int_pair,
        "int or tuple of 2 ints. Size of the k x k convolutions "
        "(`BottleneckBlock`: the middle one).",
    ),
    Argument(
        "stride_on",
        "3x3",
        _choice(STRIDE_ON),
        '`"3x3"` or `"1x1"`. Bottleneck blocks: which convolution carries the '
        'stride. `"3x3"` is ResNet v1.5 (torchvision, timm); `"1x1"` the v1 '
        "layout of `keras.applications`.",
        model_default="1x1",
        blocks=(BOTTLENECK,),
    ),
    Argument(
        "groups",
        1,
        check.positive_int,
        "int. Groups of the 3x3 convolution (ResNeXt's cardinality); it must "
        "divide the inner width.",
        blocks=(BOTTLENECK,),
    ),
    Argument(
        "width_per_group",
        64,
        check.positive_int,
        "int. Inner width per group: the 1x1 and 3x3 convolutions have "
        "`int(filters * width_per_group / 64) * groups` channels, as in "
        "torchvision (ResNeXt50_32x4d: `groups=32, width_per_group=4`; "
        "WideResNet50_2: `width_per_group=128`).",
        blocks=(BOTTLENECK,),
    ),
    Argument(
        "activation",
        "relu",
        check.activation,
        'str. Name of a Keras activation (`"relu"`, `"silu"`, `"gelu"`, '
        '`"mish"`, ...); names only, so configs stay JSON and load in safe mode.',
    ),
    Argument(
        "shortcut",
        "auto",
        _choice(SHORTCUTS),
        '`"auto"`: a 1x1 conv + BN projection when the stride is not 1 or the '
        "channel count changes, the identity otherwise (with `preact=True`, a "
        "stride alone subsamples, as `keras.applications`' ResNetV2); "
        '`"projection"`: always; `"identity"`: never, `ValueError` at build if '
        'the shapes cannot match; `"avg_down"` (ResNet-D): where `"auto"` '
        "projects, a 2x2 average pool with the stride, then a stride-1 1x1 "
        "conv + BN, as timm's `avg_down`.",
    ),
    Argument(
        "padding",
        "same",
        _choice(PADDINGS),
        '`"same"` (Keras: for a stride 2 on an even size, one row and column '
        'more at the end) or `"symmetric"` (`kernel_size // 2` on every side, '
        "as PyTorch's `padding=k // 2`; needs an odd `kernel_size`). They differ "
        "only for strided convolutions on even sizes.",
    ),
    Argument(
        "se_ratio",
        0.0,
        _se_ratio,
        "float in [0, 1]. Squeeze-excitation after the last BN, before the "
        "add, laid out as timm's `SEModule`: global average, 1x1 conv with bias "
        "to `se_ratio * channels` (rounded to a multiple of 8), ReLU, 1x1 conv "
        "with bias, sigmoid, scale. `0` turns it off (SE-ResNet: `1 / 16`).",
    ),
    Argument(
        "preact",
        False,
        _bool,
        "bool. Pre-activation (ResNet v2), the layout of "
        "`keras.applications.ResNet50V2`: BN and activation on the block's "
        "input (`{name}_preact_bn`), units conv -> BN -> activation, and a last "
        "convolution with a bias and no BN or activation after the add.",
    ),
    Argument(
        "use_bias",
        False,
        _bool,
        "bool. Whether the convolutions followed by a BN have a bias.",
        model_default=True,
    ),
    Argument(
        "momentum",
        0.9,
        check.fraction,
        "float. Momentum of the BN moving statistics (PyTorch's 0.1; Keras' "
        "0.99 adapts too slowly for short trainings).",
        model_default=0.99,
    ),
    Argument(
        "epsilon",
        1e-5,
        check.positive_float,
        "float. BN epsilon.",
        model_default=1.001e-5,
    ),
    Argument(
        "kernel_initializer",
        "he_normal",
        lambda value, name: keras.initializers.get(value),
        "initializer name, config or instance for the convolution kernels.",
        model_default="glorot_uniform",
        serialize=keras.initializers.serialize,
    ),
    Argument(
        "kernel_regularizer",
        None,
        lambda value, name: keras.regularizers.get(value),
        "regularizer name, config or instance for the convolution kernels, or `None`.",
        serialize=_serialize_regularizer,
    ),
    Argument(
        "zero_init_residual",
        False,
        _bool,
        "bool. Start the last BN's gamma at zero, so the block starts as its shortcut.",
    ),
    Argument(
        "drop_path_rate",
        0.0,
        check.fraction,
        "float in [0, 1). Stochastic depth: Keras' seeded `Dropout` with "
        "`noise_shape=(None, 1, 1, 1)`, so one draw per sample drops that "
        "sample's residual branch in training (kept ones scaled by "
        "`1 / (1 - rate)`); the identity in inference. In `ResNet`, the rate of "
        "the last block, growing linearly from 0.",
    ),
    Argument(
        "seed",
        None,
        check.optional_int,
        "int or `None`. Seed of the stochastic depth draws (`ResNet`: block `i` uses `seed + i`).",
    ),
    Argument(
        "data_format",
        None,
        lambda value, name: check.data_format(value),
        '`"channels_last"`, `"channels_first"`, or `None` for `keras.config.image_data_format()`.',
    ),
    Argument(
        "synchronized",
        False,
        _bool,
        "bool. BN statistics over the global batch in data-parallel training: "
        "Keras' synchronized BN under `tf.distribute` on TensorFlow; global "
        "either way under `keras.distribution` on JAX; no effect on torch "
        "(each DDP process uses its own batch), with a warning.",
    ),
    Argument(
        "implementation",
        "auto",
        lambda value, name: config_lib._check(value, name),
        '`"auto"`, `"native"` or `"composite"`: how each conv -> BN (-> add) -> '
        "activation unit runs, through `keras_residual.ops.conv_bn_add_act` "
        '(`"auto"`: the native kernels where the backend and device have '
        "them, and at inference what `keras_residual.native.AUTO_INFERENCE` "
        'says for the backend; `"native"`: raise if they cannot run; `"composite"`: '
        "`keras.ops` only). Saved in the config; files never need the native library.",
    ),
    Argument(
        "folded",
        False,
        _bool,
        "bool. Inference layout with every BN that follows a conv folded into "
        "the conv's kernel and bias, as `keras_residual.fold_batchnorm` makes.",
    ),
)

BY_NAME = {argument.name: argument for argument in ARGUMENTS}


def for_block(kind: str) -> tuple[Argument, ...]:
    """The arguments a block kind takes, in declaration order."""
    return tuple(a for a in ARGUMENTS if kind in a.blocks)


def resolve(kwargs: dict, arguments, model: bool = False) -> dict:
    """Pops `arguments` out of `kwargs`; returns them validated, defaults filled in."""
    return {a.name: a.validate(kwargs.pop(a.name, a.default_for(model)), a.name) for a in arguments}


def serialize(owner, arguments) -> dict:
    """The config entries of `arguments`, read off the attributes of `owner`."""
    return {a.name: a.serialize(getattr(owner, a.name)) for a in arguments}


def show(value) -> str:
    """A default as the docs write it: `"relu"`, `0.9`, `None`."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


def table_rows(arguments, model: bool = False) -> list[str]:
    """The README table rows of `arguments`: name, default, meaning."""
    return [f"| `{a.name}` | `{show(a.default_for(model))}` | {a.doc} |" for a in arguments]


def docstring(arguments, model: bool = False, indent: int = 8) -> str:
    """The `Args:` entries of `arguments`, with their defaults."""
    lines = []
    for a in arguments:
        default = a.default_for(model)
        text = f"{a.name}: {a.doc} Defaults to `{show(default)}`."
        lines.append(
            textwrap.fill(
                text,
                width=79,
                initial_indent=" " * indent,
                subsequent_indent=" " * (indent + 4),
            )
        )
    return "\n".join(lines)
