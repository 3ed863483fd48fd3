"""ResNets from PyTorch: torchvision and timm models, state dicts and files.

``from_torchvision`` and ``from_timm`` read the weights of a torchvision or
timm ResNet (a live ``torch.nn.Module``, its state dict, or a ``.safetensors``
/ ``.pth`` file), infer the architecture from the names and shapes of the
weights, build the matching ``keras_residual`` model and copy the weights in.

The layout of those models is ResNet v1.5: the stride on the 3x3 convolution,
no conv biases, BatchNormalization epsilon 1e-5 and momentum 0.1 (0.9 in
Keras' convention), and symmetric padding. The converted model gets those
settings, so its outputs equal those of the torch model (within float
rounding) on any backend and in either data format.

Weights are converted as follows:

=========================================  ====================================
torch                                      Keras
=========================================  ====================================
``Conv2d.weight`` (out, in/groups, kh, kw)  ``Conv2D.kernel`` (kh, kw, in/groups,
                                           out): ``transpose(2, 3, 1, 0)``
``Conv2d.bias``                            ``Conv2D.bias``
``BatchNorm2d.weight``, ``.bias``,         ``gamma``, ``beta``, ``moving_mean``,
``.running_mean``, ``.running_var``        ``moving_variance``
``Linear.weight`` (out, in)                ``Dense.kernel`` (in, out)
``Linear.bias``                            ``Dense.bias``
=========================================  ====================================

``num_batches_tracked`` is ignored. Keras Conv2D kernels have the same layout
for ``channels_last`` and ``channels_first``, so one conversion serves both.
"""

from __future__ import annotations

import collections.abc
import os
import re
import sys

import keras
import numpy as np

from keras_residual.models.weights import assign_by_name, leaf_layers

# -- the architectures by name ------------------------------------------------

# What the state dict decides. Everything else is the torchvision/timm layout.
_DEFAULTS = {
    "block_type": "bottleneck",
    "stage_depths": (3, 4, 6, 3),
    "stage_filters": (64, 128, 256, 512),
    "groups": 1,
    "width_per_group": 64,
    "se_ratio": 0.0,
    "shortcut": "auto",
    "stem": "standard",
    "stem_width": 64,
}

_D18 = (2, 2, 2, 2)
_D34 = _D50 = (3, 4, 6, 3)
_D101 = (3, 4, 23, 3)
_D152 = (3, 8, 36, 3)
_BASIC = {"block_type": "basic"}
_D = {"stem": "deep", "shortcut": "avg_down"}
_SE = {"se_ratio": 1 / 16}


def _arch(depths, preset=None, **config):
    return {"config": {**_DEFAULTS, "stage_depths": depths, **config}, "preset": preset}


_TORCHVISION_ARCHS = {
    "resnet18": _arch(_D18, "ResNet18", **_BASIC),
    "resnet34": _arch(_D34, "ResNet34", **_BASIC),
    "resnet50": _arch(_D50, "ResNet50"),
    "resnet101": _arch(_D101, "ResNet101"),
    "resnet152": _arch(_D152, "ResNet152"),
    "resnext50_32x4d": _arch(_D50, "ResNeXt50_32x4d", groups=32, width_per_group=4),
    "resnext101_32x8d": _arch(_D101, "ResNeXt101_32x8d", groups=32, width_per_group=8),
    "resnext101_64x4d": _arch(_D101, None, groups=64, width_per_group=4),
    "wide_resnet50_2": _arch(_D50, "WideResNet50_2", width_per_group=128),
    "wide_resnet101_2": _arch(_D101, None, width_per_group=128),
}

_TIMM_ARCHS = {
    **_TORCHVISION_ARCHS,
    "resnet18d": _arch(_D18, None, **_BASIC, **_D),
    "resnet34d": _arch(_D34, None, **_BASIC, **_D),
    "resnet50d": _arch(_D50, "ResNet50D", **_D),
    "resnet101d": _arch(_D101, None, **_D),
    "resnet152d": _arch(_D152, None, **_D),
    "resnext50d_32x4d": _arch(_D50, None, groups=32, width_per_group=4, **_D),
    "resnext101_32x4d": _arch(_D101, None, groups=32, width_per_group=4),
    "seresnet18": _arch(_D18, None, **_BASIC, **_SE),
    "seresnet34": _arch(_D34, None, **_BASIC, **_SE),
    "seresnet50": _arch(_D50, "SEResNet50", **_SE),
    "seresnet101": _arch(_D101, None, **_SE),
    "seresnet152": _arch(_D152, None, **_SE),
    "seresnext50_32x4d": _arch(_D50, "SEResNeXt50_32x4d", groups=32, width_per_group=4, **_SE),
    "seresnext101_32x4d": _arch(_D101, None, groups=32, width_per_group=4, **_SE),
    "seresnext101_32x8d": _arch(_D101, None, groups=32, width_per_group=8, **_SE),
}

_LIBRARIES = {"torchvision": _TORCHVISION_ARCHS, "timm": _TIMM_ARCHS}


# -- public API -------------------------------------------------------------------


def from_torchvision(source, *, arch=None, **kwargs):
    """Converts a torchvision ResNet, ResNeXt or Wide ResNet into a Keras model.

    The architecture is read off the names and shapes of the weights: the
    block type (`conv3` or not), the stage depths, the groups and width per
    group of a ResNeXt or Wide ResNet, and whether there is a classifier
    (`fc`, and its number of classes). The result is the matching preset
    (`ResNet18` to `ResNet152`, `ResNeXt50_32x4d`, `ResNeXt101_32x8d`,
    `WideResNet50_2`) or a `ResNet` for other depths and widths, in the
    torchvision layout: `stride_on="3x3"`, `use_bias=False`, `epsilon=1e-5`,
    `momentum=0.9`, `padding="symmetric"`, and `classifier_activation=None`
    (logits, as torchvision returns). Its outputs equal those of the torch
    model in eval mode.

    Args:
        source: a torchvision `ResNet` (`torch.nn.Module`), its state dict (a
            mapping from names such as `"layer1.0.conv1.weight"` to torch
            tensors or NumPy arrays; a checkpoint dict with a `"state_dict"`
            or `"model"` entry is unwrapped), or the path (str or
            `os.PathLike`) to a `.safetensors` file (read with NumPy; torch
            is not needed) or a `.pth`/`.pt` file (read with
            `torch.load(..., weights_only=True)`). Names prefixed by
            `"module."` (DataParallel) or `"_orig_mod."` (`torch.compile`)
            are accepted.
        arch: str or `None`. The torchvision name of the architecture, such
            as `"resnet50"` or `"resnext50_32x4d"`, instead of inferring it;
            the weights must then fit it. Defaults to `None`.
        **kwargs: further `ResNet` arguments, such as `input_shape`,
            `data_format`, `dtype`, `classifier_activation` or `name`. They
            override the torchvision layout above. `include_top=False` drops
            a classifier that `source` has.

    Returns:
        A `keras_residual` ResNet (a `keras.Model`) holding the weights of
        `source`.

    Raises:
        ValueError: if `source` is of another type, a path that does not
            exist or is not a `.safetensors`/`.pth`/`.pt` file, not a ResNet
            (e.g. a DenseNet), a ResNet this package does not build (dilated
            convolutions, other stems), if its weights have names the model
            does not know, lack names the model needs, or have other shapes
            than the model's (the message names the weight and both shapes),
            or if `arch` is not a known name. Nothing is assigned then.
        ImportError: for a `.safetensors` file without the `safetensors`
            package, or a `.pth` file without torch.

    Examples:

    Without torch, from a `.safetensors` file:

    >>> model = from_torchvision("resnet50.safetensors")  # doctest: +SKIP

    From a live model, with an input shape and channels-first layout:

    >>> import torchvision  # doctest: +SKIP
    >>> torch_model = torchvision.models.resnet50().eval()  # doctest: +SKIP
    >>> model = from_torchvision(
    ...     torch_model, input_shape=(3, 224, 224), data_format="channels_first"
    ... )  # doctest: +SKIP

    A state dict that is not a ResNet is refused:

    >>> import numpy as np
    >>> from_torchvision({"features.conv0.weight": np.zeros((64, 3, 7, 7))})
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `source` is not a torchvision ResNet: ...
    """
    return _convert(source, "torchvision", arch, kwargs)


def from_timm(source, *, arch=None, **kwargs):
    """Converts a timm ResNet (and its -D, SE and ResNeXt variants) into Keras.

    As `from_torchvision`, and also for the timm variants built from the same
    parts: the deep stem of three 3x3 convolutions (`resnet50d`), the
    average-pool shortcut of ResNet-D (`shortcut="avg_down"`), and
    squeeze-excitation (`seresnet50`, `seresnext50_32x4d`). The result is
    the matching preset (`ResNet18` to `ResNet152`, `ResNeXt50_32x4d`,
    `ResNeXt101_32x8d`, `WideResNet50_2`, `ResNet50D`, `SEResNet50`,
    `SEResNeXt50_32x4d`) or a `ResNet` with the inferred arguments, in the
    timm layout (`stride_on="3x3"`, `use_bias=False`, `epsilon=1e-5`,
    `momentum=0.9`, `padding="symmetric"`, `classifier_activation=None`).

    Only the ReLU ResNets with BatchNorm and average pooling are built. A
    state dict does not record activations, pooling or dilation; a live
    module is checked for dilation and for timm's `global_pool`.

    Args:
        source: a timm `ResNet` (`torch.nn.Module`), its state dict, or the
            path to a `.safetensors` or `.pth`/`.pt` file, as for
            `from_torchvision`. A model created with `num_classes=0` has no
            `fc`: the result then has `include_top=False` (pass
            `pooling="avg"` for timm's pooled features).
        arch: str or `None`. The timm name of the architecture, such as
            `"resnet50d"`, `"seresnet50"` or `"resnext50_32x4d"`, instead of
            inferring it. Defaults to `None`.
        **kwargs: further `ResNet` arguments, as for `from_torchvision`.

    Returns:
        A `keras_residual` ResNet holding the weights of `source`.

    Raises:
        ValueError: as `from_torchvision`.
        ImportError: as `from_torchvision`.

    Examples:

    >>> import timm  # doctest: +SKIP
    >>> model = from_timm(timm.create_model("resnet50d").eval())  # doctest: +SKIP
    >>> model = from_timm("seresnet50.safetensors", arch="seresnet50")  # doctest: +SKIP
    """
    return _convert(source, "timm", arch, kwargs)


# -- reading the source ---------------------------------------------------------


def _describe(source) -> str:
    """A short ``repr`` of ``source`` for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if isinstance(source, collections.abc.Mapping):
        return f"<state dict of {len(source)} entries>"
    if _is_torch_module(source):
        return f"<{type(source).__module__}.{type(source).__qualname__} object>"
    text = repr(source)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_torch_module(source) -> bool:
    # Without torch imported there can be no torch module: never import it here.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(source, torch.nn.Module)


def _read_source(source, received):
    """``source`` as a dict from name to NumPy array, and the module if any."""
    module = None
    if _is_torch_module(source):
        module = source
        state = source.state_dict()
    elif isinstance(source, collections.abc.Mapping):
        state = source
    elif isinstance(source, (str, os.PathLike)):
        state = _read_file(os.fspath(source), received)
    else:
        raise ValueError(
            "`source` must be a torch.nn.Module, a state dict (a mapping from names to "
            "torch tensors or NumPy arrays), or the path to a .safetensors or .pth file. "
            f"Received: source={received} of type {type(source).__name__}"
        )
    state = _unwrap(state)
    arrays = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(
                f"The names of a state dict must be strings; {key!r} is a "
                f"{type(key).__name__}. Received: source={received}"
            )
        if key.endswith("num_batches_tracked"):
            continue
        arrays[key] = _to_numpy(value, key, received)
    return _strip_prefix(arrays), module


def _unwrap(state):
    """The state dict inside a training checkpoint."""
    for key in ("state_dict", "model", "model_state_dict"):
        inner = state.get(key) if isinstance(state, collections.abc.Mapping) else None
        if isinstance(inner, collections.abc.Mapping):
            return inner
    return state


def _strip_prefix(arrays):
    for prefix in ("module.", "_orig_mod."):
        if arrays and all(key.startswith(prefix) for key in arrays):
            arrays = {key[len(prefix) :]: value for key, value in arrays.items()}
    return arrays


def _to_numpy(value, key, received):
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.element_size() < 4:
            # bfloat16 has no NumPy dtype; the model casts to its own dtype.
            value = value.float()
        return value.numpy()
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - any unconvertible value
        raise ValueError(
            f"The value of {key!r} is not an array or tensor ({type(value).__name__}). "
            f"Received: source={received}"
        ) from error
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(
            f"The value of {key!r} is not a numeric array or tensor "
            f"({type(value).__name__} of dtype {array.dtype}). Received: source={received}"
        )
    return array


def _read_file(path, received):
    if not os.path.isfile(path):
        raise ValueError(
            f"`source` is a path, but no such file exists. Received: source={received}"
        )
    lower = path.lower()
    if lower.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(
                "Reading a .safetensors file needs the `safetensors` package: "
                "`pip install safetensors`."
            ) from error
        return load_file(path)
    if lower.endswith((".pth", ".pt", ".bin")):
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                "Reading a .pth/.pt file needs PyTorch (`pip install torch`); "
                "a .safetensors file needs only `pip install safetensors`."
            ) from error
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises several types
            raise ValueError(
                "`source` could not be read with torch.load(weights_only=True); save "
                "`model.state_dict()` rather than the whole model. "
                f"({type(error).__name__}: {error}) Received: source={received}"
            ) from error
    raise ValueError(
        f"`source` must be a .safetensors, .pth or .pt file. Received: source={received}"
    )


def _check_module(module, library, received):
    """What a live module shows and a state dict does not: dilation, pooling."""
    for name, sub in module.named_modules():
        dilation = getattr(sub, "dilation", None)
        if dilation is not None and type(sub).__name__ == "Conv2d" and tuple(dilation) != (1, 1):
            raise ValueError(
                f"`source` is a {library} ResNet with dilated convolutions ({name!r} has "
                f"dilation={tuple(dilation)}), which keras_residual does not build. "
                f"Received: source={received}"
            )
    pool_type = getattr(getattr(module, "global_pool", None), "pool_type", "avg")
    if pool_type not in ("avg", "", None):
        raise ValueError(
            f"`source` uses global_pool={pool_type!r}; keras_residual builds average "
            f"pooling only. Received: source={received}"
        )


# -- the architecture -------------------------------------------------------------

_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


def _infer(arrays, library, received):
    """The ResNet arguments that the names and shapes of the weights decide."""

    def unsupported(why):
        return ValueError(f"`source` is a {library} ResNet {why}. Received: source={received}")

    def shape(key):
        if key not in arrays:
            raise ValueError(
                f"`source` lacks the weight {key!r} that a {library} ResNet has. "
                f"Received: source={received}"
            )
        return tuple(arrays[key].shape)

    depths = {}
    for key in arrays:
        match = _BLOCK_KEY.match(key)
        if match:
            stage, index = int(match.group(1)), int(match.group(2))
            depths[stage] = max(depths.get(stage, 0), index + 1)
    config = dict(_DEFAULTS)
    stages = sorted(depths)
    if stages != list(range(1, len(stages) + 1)):
        raise unsupported(f"with the stages {stages} (they must be layer1, layer2, ...)")
    config["stage_depths"] = tuple(depths[s] for s in stages)

    bottleneck = "layer1.0.conv3.weight" in arrays
    config["block_type"] = "bottleneck" if bottleneck else "basic"
    filters, groups, widths = [], [], []
    for stage in stages:
        block = f"layer{stage}.0"
        if bottleneck:
            out_channels = shape(f"{block}.conv3.weight")[0]
            width, in_per_group = shape(f"{block}.conv2.weight")[:2]
            filters.append(out_channels // 4)
            groups.append(width // in_per_group)
            widths.append(width)
        else:
            filters.append(shape(f"{block}.conv2.weight")[0])
    config["stage_filters"] = tuple(filters)
    if bottleneck:
        if len(set(groups)) != 1:
            raise unsupported(f"with different groups per stage ({groups})")
        config["groups"] = groups[0]
        per_group = widths[0] // groups[0]
        config["width_per_group"] = round(per_group * 64 / filters[0])

    se_shapes = [
        tuple(value.shape[:2]) for key, value in arrays.items() if key.endswith(".se.fc1.weight")
    ]
    if se_shapes:
        config["se_ratio"] = _se_ratio(se_shapes)

    if any(key.startswith("conv1.0.") for key in arrays):
        first, second, last = (shape(f"conv1.{i}.weight")[0] for i in (0, 3, 6))
        if not first == second == last // 2:
            raise unsupported(
                f"with a deep stem of widths {first}-{second}-{last}; keras_residual "
                "builds stem_width//2, stem_width//2, stem_width (e.g. 32-32-64)"
            )
        config["stem"] = "deep"
        config["stem_width"] = last
    elif "conv1.weight" in arrays:
        config["stem_width"] = shape("conv1.weight")[0]

    avg_down = [key for key in arrays if re.match(r"^layer\d+\.\d+\.downsample\.2\.", key)]
    if avg_down:
        config["shortcut"] = "avg_down"
    return config


def _se_channels(channels, ratio, divisor=8):
    """The squeeze width of `ResNet(se_ratio=ratio)`, as timm's `make_divisible`."""
    return max(divisor, int(channels * ratio + divisor / 2) // divisor * divisor)


def _se_ratio(shapes):
    """The SE ratio that gives every block its ``(reduced, channels)``: 1/16 in timm."""
    for denominator in (16, 8, 4, 2, 32, 64):
        if all(_se_channels(c, 1 / denominator) == r for r, c in shapes):
            return 1 / denominator
    reduced, channels = shapes[0]
    return reduced / channels  # what it would be; the shapes then tell what differs


def _looks_like_resnet(arrays):
    stem = "conv1.weight" in arrays or "conv1.0.weight" in arrays
    return stem and "layer1.0.conv1.weight" in arrays and "bn1.weight" in arrays


def _build(config, preset, kwargs):
    """The model: the preset if there is one, else a ResNet of ``config``."""
    from keras_residual.models import resnet

    kwargs = {**resnet.TORCHVISION_LAYOUT, "classifier_activation": None, **kwargs}
    arch_kwargs = {
        key: value
        for key, value in config.items()
        if key in ("block_type", "stage_depths", "stage_filters") or value != _DEFAULTS[key]
    }
    for key in arch_kwargs:
        if key in kwargs:
            raise ValueError(
                f"`{key}` is read off the weights of `source` and cannot be passed. "
                f"Received: {key}={kwargs[key]!r}"
            )
    if preset:
        return getattr(resnet, preset)(**kwargs)
    return resnet.ResNet(**arch_kwargs, **kwargs)


# -- Keras layer names <-> torch names -------------------------------------------

_BLOCK_LAYER = re.compile(r"^conv(\d+)_block(\d+)_(\d|se_reduce|se_expand)(?:_(conv|bn))?$")
_STEM_LAYER = re.compile(r"^conv1_(?:(\d)_)?(conv|bn)$")


def _torch_prefix(layer_name, avg_down):
    """The torch module name of a Keras layer, or ``None`` if it has none."""
    if layer_name == "predictions":
        return "fc"
    match = _STEM_LAYER.match(layer_name)
    if match:
        index, kind = match.groups()
        if index is None:
            return "conv1" if kind == "conv" else "bn1"
        if kind == "bn" and index == "3":
            return "bn1"
        return f"conv1.{(int(index) - 1) * 3 + (0 if kind == 'conv' else 1)}"
    match = _BLOCK_LAYER.match(layer_name)
    if match:
        stage, index, unit, kind = match.groups()
        block = f"layer{int(stage) - 1}.{int(index) - 1}"
        if unit == "se_reduce":
            return f"{block}.se.fc1"
        if unit == "se_expand":
            return f"{block}.se.fc2"
        if unit == "0":
            offset = 1 if avg_down else 0
            return f"{block}.downsample.{offset + (0 if kind == 'conv' else 1)}"
        return f"{block}.{kind}{unit}"
    return None


def _layer_params(layer):
    """(torch parameter name, to-Keras function, Keras shape) per weight."""
    shapes = [tuple(w.shape) for w in layer.weights]
    if isinstance(layer, keras.layers.BatchNormalization):
        names = ["weight", "bias", "running_mean", "running_var"]
        return [(n, _identity, s) for n, s in zip(names, shapes, strict=True)]
    if isinstance(layer, keras.layers.Conv2D):
        params = [("weight", _conv_kernel, shapes[0])]
        if len(shapes) > 1:
            params.append(("bias", _identity, shapes[1]))
        return params
    if isinstance(layer, keras.layers.Dense):
        return [("weight", _dense_kernel, shapes[0]), ("bias", _identity, shapes[1])]
    return None


def _identity(array):
    return array


def _conv_kernel(array):
    return np.transpose(array, (2, 3, 1, 0))


def _dense_kernel(array):
    return np.transpose(array)


def _torch_shape(function, keras_shape):
    if function is _conv_kernel:
        kh, kw, cin, cout = keras_shape
        return (cout, cin, kh, kw)
    if function is _dense_kernel:
        return tuple(reversed(keras_shape))
    return keras_shape


def _list(keys, limit=5):
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"{shown}{more}"


def _values_by_layer(model, arrays, config, drop_head, library, received, arch):
    """Maps ``arrays`` onto the layers of ``model``; raises on any mismatch."""
    avg_down = config["shortcut"] == "avg_down"
    target = f"the model of arch={arch!r}" if arch else "the matching keras_residual model"
    plan = {}  # Keras layer name -> [(torch key, function, Keras shape)]
    for name, layer in leaf_layers(model).items():
        prefix = _torch_prefix(name, avg_down)
        params = _layer_params(layer)
        if prefix is None or params is None:
            raise ValueError(
                f"The model's layer {name!r} has no counterpart in a {library} ResNet. "
                f"Received: source={received}"
            )
        plan[name] = [(f"{prefix}.{param}", fn, shape) for param, fn, shape in params]
    expected = {key for entries in plan.values() for key, _, _ in entries}
    given = set(arrays)
    if drop_head:
        given = {key for key in given if not key.startswith("fc.")}
    unknown = given - expected
    if unknown:
        raise ValueError(
            f"`source` has {len(unknown)} weight(s) that {target} does not have: "
            f"{_list(unknown)}. It is not a {library} ResNet that "
            f"keras_residual builds, or `arch` names another architecture. "
            f"Received: source={received}"
        )
    missing = expected - given
    if missing:
        raise ValueError(
            f"`source` lacks {len(missing)} weight(s) that {target} needs: "
            f"{_list(missing)}. Received: source={received}"
        )
    values = {}
    for name, entries in plan.items():
        values[name] = []
        for key, function, keras_shape in entries:
            array = arrays[key]
            wanted = _torch_shape(function, keras_shape)
            if tuple(array.shape) != wanted:
                raise ValueError(
                    f"The weight {key!r} of `source` has shape {tuple(array.shape)}, but "
                    f"the layer {name!r} of the model needs {wanted} (Keras shape "
                    f"{keras_shape}). Received: source={received}"
                )
            values[name].append(function(array))
    return values


def _convert(source, library, arch, kwargs):
    received = _describe(source)
    archs = _LIBRARIES[library]
    if arch is not None and arch not in archs:
        raise ValueError(
            f"`arch` must be None (inferred from the weights) or the {library} name of a "
            f"ResNet that keras_residual builds: {', '.join(sorted(archs))}. "
            f"Received: arch={arch!r}"
        )
    arrays, module = _read_source(source, received)
    if not _looks_like_resnet(arrays):
        raise ValueError(
            f"`source` is not a {library} ResNet: it lacks 'conv1.weight' (or a deep "
            f"stem's 'conv1.0.weight'), 'bn1.weight' and 'layer1.0.conv1.weight'. Its "
            f"first names are {_list(list(arrays)[:3])}. Received: source={received}"
        )
    if module is not None:
        _check_module(module, library, received)

    kwargs = dict(kwargs)
    has_head = "fc.weight" in arrays
    drop_head = has_head and kwargs.get("include_top", True) is False
    if "include_top" not in kwargs:
        kwargs["include_top"] = has_head
    if has_head and kwargs["include_top"]:
        kwargs.setdefault("classes", int(arrays["fc.weight"].shape[0]))

    if arch is None:
        config = _infer(arrays, library, received)
        preset = next(
            (entry["preset"] for entry in archs.values() if entry["config"] == config), None
        )
    else:
        config, preset = archs[arch]["config"], archs[arch]["preset"]
    model = _build(config, preset, kwargs)
    values = _values_by_layer(model, arrays, config, drop_head, library, received, arch)
    assign_by_name(model, values, f"The {library} weights {received}")
    return model
