"""from_torchvision and from_timm: torch ResNets, state dicts and files to Keras.

Every reference model is built here with random weights (no downloads) and
random BN statistics and affine parameters, and the converted Keras model
must give its outputs within 1e-4 (relative to the largest logit) in eval
mode, on every backend. See tests/reference_models.py for the packages.
"""

import os
import sys

import keras
import numpy as np
import pytest
from reference_models import import_reference, randomize, torch_outputs

import keras_residual
from keras_residual import ResNet, from_timm, from_torchvision

# Keras "same" pads a stride-2 3x3 conv (0, 1) on even sizes, torch (1, 1):
# even sizes check ResNet(padding="symmetric"); odd ones, where the two
# paddings agree, run in the slow (TensorFlow-only) pass of CI.
SIZES = [64, pytest.param(65, marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def ref():
    torch, torchvision, timm = import_reference()
    return {"torch": torch, "torchvision": torchvision, "timm": timm}


def images(size, n=2, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype("float32")
    return x


def keras_outputs(model, x_nhwc):
    if model.data_format == "channels_first":
        x_nhwc = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))
    return keras.ops.convert_to_numpy(model(x_nhwc, training=False))


def assert_matches(model, torch_model, x):
    ours, theirs = keras_outputs(model, x), torch_outputs(torch_model, x)
    assert ours.shape == theirs.shape
    scale = np.max(np.abs(theirs))
    assert scale > 0
    error = np.max(np.abs(ours - theirs))
    assert error <= 1e-4 * scale, f"max abs error {error} for outputs up to {scale}"


def tv_resnet(ref, block="bottleneck", layers=(1, 1, 1, 1), num_classes=10, **kwargs):
    """A depth-reduced torchvision ResNet, randomised."""
    resnet = ref["torchvision"].models.resnet
    block_cls = resnet.Bottleneck if block == "bottleneck" else resnet.BasicBlock
    return randomize(resnet.ResNet(block_cls, list(layers), num_classes=num_classes, **kwargs))


def timm_resnet(ref, block="bottleneck", layers=(1, 1, 1, 1), num_classes=10, **kwargs):
    """A depth-reduced timm ResNet, randomised."""
    resnet = ref["timm"].models.resnet
    block_cls = resnet.Bottleneck if block == "bottleneck" else resnet.BasicBlock
    return randomize(resnet.ResNet(block_cls, list(layers), num_classes=num_classes, **kwargs))


def numpy_state_dict(torch_model):
    return {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}


# -- the generic path: depth-reduced models ------------------------------------


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("block", ["bottleneck", "basic"])
def test_torchvision_reduced_depth_matches(ref, block, size):
    torch_model = tv_resnet(ref, block)
    model = from_torchvision(torch_model)
    assert type(model) is ResNet
    assert model.block_type == block
    assert model.stage_depths == (1, 1, 1, 1)
    assert model.classes == 10 and model.include_top
    assert model.classifier_activation is None
    assert_matches(model, torch_model, images(size))


def test_torchvision_uneven_depths_and_widths(ref):
    torch_model = tv_resnet(ref, "bottleneck", layers=(2, 1, 3, 1), width_per_group=32)
    model = from_torchvision(torch_model)
    assert model.stage_depths == (2, 1, 3, 1)
    assert_matches(model, torch_model, images(65, n=1))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "variant",
    [
        {"stem_type": "deep", "stem_width": 32, "avg_down": True},  # ResNet-D
        {"block_args": {"attn_layer": "se"}},  # SE-ResNet
        {
            "stem_type": "deep",
            "stem_width": 32,
            "avg_down": True,
            "cardinality": 8,
            "base_width": 4,
            "block_args": {"attn_layer": "se"},
        },  # all at once
    ],
    ids=["resnet_d", "se", "se_resnext_d"],
)
def test_timm_reduced_depth_variants_match(ref, variant, size):
    # Odd sizes also check the ceil-mode average pooling of the D shortcut.
    torch_model = timm_resnet(ref, "bottleneck", **variant)
    model = from_timm(torch_model)
    assert_matches(model, torch_model, images(size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "variant",
    [
        {"stem_type": "deep", "stem_width": 32, "avg_down": True},
        # seresnet18's squeeze: 64 channels -> 8 (timm rounds up to a multiple of 8).
        {"block_args": {"attn_layer": "se"}},
    ],
    ids=["resnet_d", "se"],
)
def test_timm_basic_block_variants(ref, variant, size):
    torch_model = timm_resnet(ref, "basic", **variant)
    model = from_timm(torch_model)
    assert model.block_type == "basic"
    assert_matches(model, torch_model, images(size))


# -- the named architectures ------------------------------------------------------

TORCHVISION_NAMED = [
    ("resnet18", "ResNet18"),
    ("resnet34", "ResNet34"),
    ("resnet50", "ResNet50"),
    ("resnext50_32x4d", "ResNeXt50_32x4d"),
    pytest.param("resnet101", "ResNet101", marks=pytest.mark.slow),
    pytest.param("resnet152", "ResNet152", marks=pytest.mark.slow),
    pytest.param("resnext101_32x8d", "ResNeXt101_32x8d", marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", "WideResNet50_2", marks=pytest.mark.slow),
]


def expected_class(preset_name):
    """The preset class that the conversion must return."""
    return getattr(keras_residual, preset_name)


@pytest.mark.parametrize("name, preset", TORCHVISION_NAMED)
def test_torchvision_named_architectures(ref, name, preset):
    torch_model = randomize(getattr(ref["torchvision"].models, name)())
    model = from_torchvision(torch_model)
    assert type(model) is expected_class(preset)
    assert model.classes == 1000
    assert_matches(model, torch_model, images(64, n=1))


TIMM_NAMED = [
    ("resnet50d", "ResNet50D"),
    ("seresnet50", "SEResNet50"),
    ("resnext50_32x4d", "ResNeXt50_32x4d"),
]


@pytest.mark.parametrize("name, preset", TIMM_NAMED)
def test_timm_named_architectures(ref, name, preset):
    torch_model = randomize(ref["timm"].create_model(name, pretrained=False))
    model = from_timm(torch_model)
    assert type(model) is expected_class(preset)
    assert_matches(model, torch_model, images(64, n=1))


def test_arch_names_the_architecture(ref):
    torch_model = tv_resnet(ref, "basic", layers=(2, 2, 2, 2))
    model = from_torchvision(numpy_state_dict(torch_model), arch="resnet18")
    assert type(model) is keras_residual.ResNet18
    assert_matches(model, torch_model, images(65, n=1))


def test_user_kwargs_override_the_layout(ref):
    torch_model = tv_resnet(ref, "basic")
    model = from_torchvision(
        torch_model, classifier_activation="softmax", name="converted", input_shape=(65, 65, 3)
    )
    assert model.name == "converted"
    assert model.image_shape == (65, 65, 3)
    probabilities = keras_outputs(model, images(65))
    logits = torch_outputs(torch_model, images(65))
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


# -- layouts, sources and heads ----------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_channels_first(ref, size):
    torch_model = timm_resnet(ref, "bottleneck", stem_type="deep", stem_width=32, avg_down=True)
    model = from_timm(torch_model, data_format="channels_first")
    assert model.data_format == "channels_first"
    assert_matches(model, torch_model, images(size))


def test_numpy_state_dict(ref):
    torch_model = tv_resnet(ref, "bottleneck")
    model = from_torchvision(numpy_state_dict(torch_model))
    assert_matches(model, torch_model, images(65))


def test_safetensors_file(ref, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    torch_model = timm_resnet(ref, "bottleneck", block_args={"attn_layer": "se"})
    path = tmp_path / "model.safetensors"
    state = {k: v for k, v in numpy_state_dict(torch_model).items()}
    safetensors_numpy.save_file(state, str(path))
    model = from_timm(path)  # os.PathLike
    assert_matches(model, torch_model, images(65))
    assert_matches(from_timm(str(path)), torch_model, images(65, n=1))


@pytest.mark.skipif(
    keras.config.backend() == "torch", reason="the torch backend imports torch itself"
)
def test_safetensors_file_does_not_need_torch(ref, tmp_path, monkeypatch):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    torch_model = tv_resnet(ref, "basic")
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(numpy_state_dict(torch_model), str(path))
    expected = torch_outputs(torch_model, images(65))
    # `import torch` fails from here on, and no torch object is at hand.
    monkeypatch.setitem(sys.modules, "torch", None)
    model = from_torchvision(os.fspath(path))
    ours = keras_outputs(model, images(65))
    assert np.max(np.abs(ours - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_missing_safetensors_package_names_the_install(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        from_torchvision(path)


@pytest.mark.parametrize("wrap", ["plain", "checkpoint", "data_parallel"])
def test_pth_file(ref, tmp_path, wrap):
    torch = ref["torch"]
    torch_model = tv_resnet(ref, "basic")
    state = torch_model.state_dict()
    if wrap == "checkpoint":
        state = {"epoch": 3, "state_dict": state}
    elif wrap == "data_parallel":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "model.pth"
    torch.save(state, path)
    model = from_torchvision(path)
    assert_matches(model, torch_model, images(65, n=1))


def test_whole_model_pth_is_refused(ref, tmp_path):
    torch = ref["torch"]
    path = tmp_path / "whole.pt"
    torch.save(tv_resnet(ref, "basic"), path)
    with pytest.raises(ValueError, match=r"weights_only.*Received: source="):
        from_torchvision(path)


def test_no_classifier(ref):
    torch_model = timm_resnet(ref, "bottleneck", num_classes=0)  # pooled features
    assert "fc.weight" not in torch_model.state_dict()
    model = from_timm(torch_model, pooling="avg")
    assert not model.include_top
    assert_matches(model, torch_model, images(65))


def test_include_top_false_drops_the_classifier(ref):
    torch_model = tv_resnet(ref, "bottleneck")
    model = from_torchvision(torch_model, include_top=False)
    assert not model.include_top
    features = keras_outputs(model, images(65, n=1))
    assert features.shape == (1, 3, 3, 2048)


# -- bad input -----------------------------------------------------------------------


def test_unknown_key(ref):
    state = numpy_state_dict(tv_resnet(ref, "basic"))
    state["layer1.0.extra.weight"] = np.zeros((3,), "float32")
    with pytest.raises(ValueError, match=r"layer1\.0\.extra\.weight.*Received: source=<state"):
        from_torchvision(state)


def test_missing_key(ref):
    state = numpy_state_dict(tv_resnet(ref, "bottleneck"))
    del state["layer3.0.bn2.running_var"]
    with pytest.raises(ValueError, match=r"lacks 1 weight.*layer3\.0\.bn2\.running_var"):
        from_torchvision(state)


def test_shape_mismatch_names_the_key_and_both_shapes(ref):
    state = numpy_state_dict(tv_resnet(ref, "basic"))
    state["layer2.0.bn1.weight"] = np.ones((7,), "float32")
    with pytest.raises(
        ValueError,
        match=r"'layer2\.0\.bn1\.weight'.* shape \(7,\).*conv3_block1_1_bn.*\(128,\)",
    ):
        from_torchvision(state)


def test_shape_mismatch_with_arch(ref):
    state = numpy_state_dict(tv_resnet(ref, "basic", layers=(2, 2, 2, 2)))
    with pytest.raises(ValueError, match="Received: source="):
        from_torchvision(state, arch="resnet50")  # basic weights, bottleneck arch


def test_unknown_arch():
    with pytest.raises(ValueError, match=r"Received: arch='resnet9000'"):
        from_torchvision({}, arch="resnet9000")
    with pytest.raises(ValueError, match=r"Received: arch='resnet50d'"):
        from_torchvision({}, arch="resnet50d")  # timm only


def test_densenet_is_refused(ref):
    densenet = ref["torchvision"].models.DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3
    )
    with pytest.raises(ValueError, match=r"not a torchvision ResNet.*Received: source=<"):
        from_torchvision(densenet)
    with pytest.raises(ValueError, match=r"not a timm ResNet.*Received: source=<state"):
        from_timm(numpy_state_dict(densenet))


def test_dilation_is_refused(ref):
    torch_model = tv_resnet(ref, "bottleneck", replace_stride_with_dilation=[False, True, True])
    with pytest.raises(ValueError, match=r"dilat.*Received: source=<torchvision"):
        from_torchvision(torch_model)


def test_unsupported_deep_stem_is_refused(ref):
    torch_model = timm_resnet(ref, "basic", stem_type="deep_tiered", stem_width=32)
    with pytest.raises(ValueError, match=r"deep stem of widths 24-32-64.*Received: source="):
        from_timm(torch_model)


@pytest.mark.parametrize("source", [42, None, [1, 2], b"resnet50.pth"])
def test_wrong_source_type(source):
    with pytest.raises(ValueError, match=r"`source` must be .*Received: source="):
        from_torchvision(source)


def test_missing_path(tmp_path):
    path = tmp_path / "nowhere.safetensors"
    with pytest.raises(ValueError, match=r"no such file.*Received: source='.*nowhere"):
        from_timm(path)


def test_wrong_file_type(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"\x00")
    with pytest.raises(ValueError, match=r"\.safetensors, \.pth or \.pt.*Received: source="):
        from_timm(path)


def test_non_array_value():
    with pytest.raises(ValueError, match=r"'conv1\.weight' is not a numeric.*Received: source="):
        from_torchvision({"conv1.weight": "abc"})


def test_kwarg_that_the_weights_decide(ref):
    with pytest.raises(ValueError, match=r"Received: stage_depths=\(2, 2\)"):
        from_torchvision(tv_resnet(ref, "basic"), stage_depths=(2, 2))
