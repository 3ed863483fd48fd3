"""ResNeXt, SE, ResNet-D, pre-activation, the presets, the pyramid features."""

import math
import pathlib

import h5py
import keras
import numpy as np
import pytest
from helpers import config_round_trip, random_input, randomize_bn_statistics, run_layer_test

import keras_residual
from keras_residual import BottleneckBlock, ResidualBlock
from keras_residual.layers import _args
from keras_residual.layers._base import se_channels
from keras_residual.models import resnet as resnet_lib
from keras_residual.models import weights as weights_lib

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def trainable_count(model):
    return sum(math.prod(w.shape) for w in model.trainable_weights)


def assert_close(ours, theirs, rtol):
    ours, theirs = keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)
    assert ours.shape == theirs.shape
    scale = np.max(np.abs(theirs))
    assert scale > 0
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale)


def write_legacy_weights(model, path):
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


# -- one definition of the arguments ------------------------------------------


def test_blocks_and_model_configs_derive_from_one_definition():
    names = [a.name for a in _args.ARGUMENTS]
    basic = ResidualBlock(8).get_config()
    bottleneck = BottleneckBlock(8).get_config()
    assert [n for n in names if n in basic] == [a.name for a in _args.for_block("basic")]
    assert set(names) <= set(bottleneck)
    model = keras_residual.ResNet18(input_shape=(32, 32, 3)).get_config()
    assert set(names) <= set(model)
    for argument in _args.ARGUMENTS:
        assert argument.name in ResidualBlock.__doc__ or argument.blocks == ("bottleneck",)
        assert argument.name in BottleneckBlock.__doc__
        assert argument.name in keras_residual.ResNet.__doc__


def test_readme_tables_are_the_argument_definitions():
    text = README.read_text()
    for row in _args.table_rows(_args.ARGUMENTS):
        assert row in text, f"README block table lacks or differs in: {row}"
    differing = [a for a in _args.ARGUMENTS if a.default_for(True) != a.default_for(False)]
    for row in _args.table_rows(differing, model=True):
        assert row in text, f"README ResNet table lacks or differs in: {row}"


def test_config_keys_of_older_files_still_load():
    """A config written before the new arguments existed loads with defaults."""
    config = ResidualBlock(8).get_config()
    for key in ("groups", "width_per_group", "se_ratio", "padding", "preact", "stride_on"):
        config.pop(key, None)
    block = ResidualBlock.from_config(config)
    assert (block.se_ratio, block.padding, block.preact) == (0.0, "same", False)


# -- the new block arguments ---------------------------------------------------


def test_resnext_se_avg_down_block_contract(tmp_path):
    run_layer_test(
        BottleneckBlock,
        {
            "filters": 4,
            "strides": 2,
            "groups": 2,
            "width_per_group": 32,
            "se_ratio": 0.25,
            "shortcut": "avg_down",
            "padding": "symmetric",
        },
        input_shape=(2, 7, 7, 8),
        expected_output_shape=(2, 4, 4, 16),
        # 3 kernels, 3 BN (gamma, beta), SE 2 x (kernel, bias), projection conv + BN
        expected_num_trainable_weights=3 + 6 + 4 + 1 + 2,
        expected_num_non_trainable_weights=8,
        tmp_path=tmp_path,
    )


def test_preact_bottleneck_block_contract(tmp_path):
    run_layer_test(
        BottleneckBlock,
        {"filters": 4, "strides": 2, "preact": True, "padding": "symmetric"},
        input_shape=(2, 8, 8, 16),
        expected_output_shape=(2, 4, 4, 16),
        # preact BN, conv1 + BN, conv2 + BN, conv3 with bias; stride alone subsamples
        expected_num_trainable_weights=2 + 3 + 3 + 2,
        expected_num_non_trainable_weights=6,
        tmp_path=tmp_path,
    )


def test_preact_basic_block_and_se_basic_block(tmp_path):
    run_layer_test(
        ResidualBlock,
        {"filters": 8, "strides": 2, "preact": True},
        input_shape=(2, 8, 8, 4),
        expected_output_shape=(2, 4, 4, 8),
        # preact BN, conv1 + BN, conv2 with bias, projection conv with bias (no BN)
        expected_num_trainable_weights=2 + 3 + 2 + 2,
        expected_num_non_trainable_weights=4,
        tmp_path=tmp_path,
    )
    run_layer_test(
        ResidualBlock,
        {"filters": 8, "strides": 2, "se_ratio": 0.5},
        input_shape=(2, 8, 8, 4),
        expected_output_shape=(2, 4, 4, 8),
        expected_num_trainable_weights=3 + 3 + 4 + 3,
        expected_num_non_trainable_weights=6,
        tmp_path=tmp_path,
    )


def test_grouped_width_and_kernel_shapes():
    block = BottleneckBlock(64, groups=32, width_per_group=4)
    block.build((None, 8, 8, 256))
    assert block.width == 128
    assert tuple(block.conv2.kernel.shape) == (3, 3, 4, 128)  # 128 / 32 per group
    wide = BottleneckBlock(64, width_per_group=128)
    wide.build((None, 8, 8, 256))
    assert tuple(wide.conv2.kernel.shape) == (3, 3, 128, 128)


def test_squeeze_excitation_follows_timm_se_module():
    assert [se_channels(c, 1 / 16) for c in (256, 512, 1024, 2048)] == [16, 32, 64, 128]
    block = ResidualBlock(8, se_ratio=0.5, use_bias=True)
    x = random_input((2, 5, 5, 8))
    y = keras.ops.convert_to_numpy(block(x))
    # The same in NumPy: branch, SE scale, add, relu.
    branch = keras.ops.convert_to_numpy(
        block.bn2(block.conv2(keras.ops.relu(block.bn1(block.conv1(x)))))
    )
    pooled = branch.mean(axis=(1, 2), keepdims=True)
    w1, b1 = (keras.ops.convert_to_numpy(v) for v in block.se_reduce.weights)
    w2, b2 = (keras.ops.convert_to_numpy(v) for v in block.se_expand.weights)
    hidden = np.maximum(pooled @ w1[0, 0] + b1, 0)
    scale = 1 / (1 + np.exp(-(hidden @ w2[0, 0] + b2)))
    np.testing.assert_allclose(y, np.maximum(branch * scale + x, 0), rtol=1e-5, atol=1e-5)


def test_symmetric_padding_differs_from_same_only_when_strided_on_even_sizes():
    x = random_input((1, 8, 8, 4))
    for strides, differ in ((1, False), (2, True)):
        outs = []
        for padding in ("same", "symmetric"):
            block = ResidualBlock(4, strides=strides, padding=padding, shortcut="projection")
            block.build(x.shape)
            if outs:
                block.set_weights(outs[0][0].get_weights())
            outs.append((block, keras.ops.convert_to_numpy(block(x))))
        assert outs[0][1].shape == outs[1][1].shape
        assert (not np.allclose(outs[0][1], outs[1][1])) == differ


def test_avg_down_pools_then_projects():
    block = BottleneckBlock(4, strides=2, shortcut="avg_down")
    block.build((None, 8, 8, 8))
    assert block.shortcut_pool.name == "bottleneck_block_0_pool" or block.shortcut_pool
    assert block.shortcut_conv.strides == (1, 1)
    unstrided = BottleneckBlock(4, shortcut="avg_down")
    unstrided.build((None, 8, 8, 8))
    assert unstrided.shortcut_pool is None and unstrided.shortcut_conv is not None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"groups": 0}, "groups"),
        ({"width_per_group": -1}, "width_per_group"),
        ({"se_ratio": 1.5}, "se_ratio"),
        ({"se_ratio": "big"}, "se_ratio"),
        ({"shortcut": "avg"}, "shortcut"),
        ({"padding": "valid"}, "padding"),
        ({"padding": "symmetric", "kernel_size": 2}, "kernel_size"),
        ({"preact": True, "zero_init_residual": True}, "zero_init_residual"),
        ({"preact": "yes"}, "preact"),
        ({"filters": 1, "width_per_group": 4}, "width_per_group"),
    ],
)
def test_bad_block_arguments(kwargs, message):
    kwargs = {"filters": 8, **kwargs}
    with pytest.raises(ValueError, match=f"{message}.*Received"):
        BottleneckBlock(**kwargs)


def test_groups_are_bottleneck_only():
    with pytest.raises(ValueError, match="groups"):
        ResidualBlock(8, groups=2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stem": "wide"}, "stem"),
        ({"stem": "deep", "stem_width": 1}, "stem_width"),
        ({"stem_width": 0}, "stem_width"),
    ],
)
def test_bad_model_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"{message}.*Received"):
        keras_residual.ResNet18(**kwargs)


def test_new_blocks_in_sequential_save_and_load(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(16, 3, padding="same"),
            BottleneckBlock(8, strides=2, groups=4, width_per_group=16, se_ratio=0.25),
            BottleneckBlock(8, strides=2, shortcut="avg_down", padding="symmetric"),
            ResidualBlock(16, preact=True),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )
    for layer in model.layers:
        randomize_bn_statistics(layer)
    x = random_input((2, 16, 16, 3))
    path = tmp_path / "variants.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(reloaded(x)), atol=1e-6
    )
    for layer in model.layers[2:5]:
        config_round_trip(layer)


# -- presets -------------------------------------------------------------------

# (preset, parameters of the reference: torch's parameters are the trainable
# ones, its BN running statistics are buffers; keras.applications counts all)
TORCH_PRESETS = [
    ("ResNeXt50_32x4d", 25_028_904),
    ("ResNeXt101_32x8d", 88_791_336),
    ("WideResNet50_2", 68_883_240),
    ("ResNet50D", 25_576_264),
    ("SEResNet50", 28_088_024),
    ("SEResNeXt50_32x4d", 27_559_896),
]
REFERENCE_NAMES = {
    "ResNeXt50_32x4d": ("torchvision", "resnext50_32x4d"),
    "ResNeXt101_32x8d": ("torchvision", "resnext101_32x8d"),
    "WideResNet50_2": ("torchvision", "wide_resnet50_2"),
    "ResNet50D": ("timm", "resnet50d"),
    "SEResNet50": ("timm", "seresnet50"),
    "SEResNeXt50_32x4d": ("timm", "seresnext50_32x4d"),
}


# The parameter counts do not depend on the backend: they run in the slow
# pass, which CI runs once, on TensorFlow.
@pytest.mark.slow
@pytest.mark.parametrize("name, params", TORCH_PRESETS)
def test_torch_presets_parameter_counts(name, params):
    model = getattr(keras_residual, name)()
    assert trainable_count(model) == params
    assert model.name == name.lower()


@pytest.mark.slow
@pytest.mark.parametrize("name, params", TORCH_PRESETS)
def test_torch_presets_parameter_counts_against_the_reference_library(name, params):
    from reference_models import import_reference

    _, torchvision, timm = import_reference()
    library, reference_name = REFERENCE_NAMES[name]
    if library == "torchvision":
        reference = getattr(torchvision.models, reference_name)(weights=None)
    else:
        reference = timm.create_model(reference_name, pretrained=False)
    assert sum(p.numel() for p in reference.parameters()) == params
    assert trainable_count(getattr(keras_residual, name)()) == params


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, params",
    [("ResNet50V2", 25_613_800), ("ResNet101V2", 44_675_560), ("ResNet152V2", 60_380_648)],
)
def test_v2_presets_parameter_counts_match_keras_applications(name, params):
    ours = getattr(keras_residual, name)()
    reference = getattr(keras.applications, name)(weights=None)
    assert ours.count_params() == reference.count_params() == params
    assert sorted(weights_lib.leaf_layers(ours)) == sorted(
        layer.name for layer in reference.layers if layer.weights
    )


@pytest.mark.parametrize(
    "name, include_top, pooling",
    [
        ("ResNet50V2", True, None),
        ("ResNet50V2", False, "avg"),
        pytest.param("ResNet101V2", False, None, marks=pytest.mark.slow),
        pytest.param("ResNet152V2", True, None, marks=pytest.mark.slow),
    ],
)
def test_v2_matches_keras_applications_with_its_legacy_weights(
    tmp_path, name, include_top, pooling
):
    reference = getattr(keras.applications, name)(
        weights=None, include_top=include_top, pooling=pooling, input_shape=(64, 64, 3)
    )
    randomize_bn_statistics(reference)
    path = write_legacy_weights(reference, tmp_path / f"{name}.h5")
    ours = getattr(keras_residual, name)(
        include_top=include_top, pooling=pooling, weights=str(path)
    )
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    assert_close(ours.predict(x, verbose=0), reference.predict(x, verbose=0), rtol=1e-4)


def test_v2_imagenet_weights_use_keras_applications_files(monkeypatch):
    seen = {}

    def fake_get_file(name, origin, **kwargs):
        seen.update(name=name, origin=origin, **kwargs)
        raise OSError("offline")

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    with pytest.raises(OSError, match="resnet50v2"):
        keras_residual.ResNet50V2(weights="imagenet")
    assert seen["name"] == "resnet50v2_weights_tf_dim_ordering_tf_kernels.h5"
    with pytest.raises(ValueError, match="preact"):
        keras_residual.ResNet50V2(weights="imagenet", preact=False)


def test_presets_keep_user_overrides_and_config():
    model = keras_residual.ResNeXt50_32x4d(groups=16, input_shape=(32, 32, 3), classes=10)
    assert model.groups == 16 and model.width_per_group == 4
    config = model.get_config()
    assert "block_type" not in config and config["groups"] == 16
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    with pytest.raises(ValueError, match="fixed architecture"):
        keras_residual.ResNet50D(stage_depths=(1, 1, 1, 1))


def test_deep_stem_layout():
    model = keras_residual.ResNet50D(include_top=False, input_shape=(64, 64, 3))
    widths = [model.get_layer(f"conv1_{i}_conv").filters for i in (1, 2, 3)]
    assert widths == [32, 32, 64]
    assert model.get_layer("conv1_1_conv").strides == (2, 2)
    assert model.compute_output_shape((None, 64, 64, 3)) == (None, 2, 2, 2048)
    narrow = keras_residual.ResNet18(stem_width=32, input_shape=(32, 32, 3))
    assert narrow.get_layer("conv1_conv").filters == 32


@pytest.mark.parametrize(
    "name",
    [
        "ResNet18",
        "SEResNeXt50_32x4d",
        "ResNet50V2",
        pytest.param("ResNet50", marks=pytest.mark.slow),
        pytest.param("ResNeXt50_32x4d", marks=pytest.mark.slow),
        pytest.param("ResNet50D", marks=pytest.mark.slow),
        pytest.param("SEResNet50", marks=pytest.mark.slow),
        pytest.param("WideResNet50_2", marks=pytest.mark.slow),
        pytest.param("ResNeXt101_32x8d", marks=pytest.mark.slow),
        pytest.param("ResNet101V2", marks=pytest.mark.slow),
    ],
)
def test_fold_batchnorm_on_every_preset(name):
    model = getattr(keras_residual, name)(input_shape=(32, 32, 3), classifier_activation=None)
    randomize_bn_statistics(model)
    folded = keras_residual.fold_batchnorm(model)
    x = random_input((2, 32, 32, 3))
    # Folding reorders the float32 arithmetic of 50+ layers whose randomized
    # BN statistics grow the logits to about 1e3: seen up to 1.4e-4 of the
    # largest logit (SEResNeXt50, oneDNN); a wrong fold is off by O(1).
    assert_close(folded(x), model(x), rtol=1e-3)


# -- multi-scale features ------------------------------------------------------

APPLICATIONS_OUTPUTS = {
    "P2": "conv2_block3_out",
    "P3": "conv3_block4_out",
    "P4": "conv4_block6_out",
    "P5": "conv5_block3_out",
}


def test_feature_extractor_equals_keras_applications_stage_outputs(tmp_path):
    reference = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(64, 64, 3)
    )
    randomize_bn_statistics(reference)
    path = write_legacy_weights(reference, tmp_path / "resnet50.h5")
    backbone = keras_residual.ResNet50(include_top=False, weights=str(path))
    extractor = keras_residual.feature_extractor(backbone)
    taps = keras.Model(
        reference.input,
        {level: reference.get_layer(name).output for level, name in APPLICATIONS_OUTPUTS.items()},
    )
    x = keras_residual.preprocess_input(
        np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    )
    ours, theirs = extractor.predict(x, verbose=0), taps.predict(x, verbose=0)
    assert list(ours) == ["P2", "P3", "P4", "P5"]
    for level in APPLICATIONS_OUTPUTS:
        assert_close(ours[level], theirs[level], rtol=1e-5)
    assert [ours[level].shape[1] for level in ours] == [16, 8, 4, 2]  # strides 4 to 32


def test_feature_extractor_levels_save_load_and_shared_weights(tmp_path):
    backbone = keras_residual.ResNet18(input_shape=(32, 32, 3))
    extractor = keras_residual.feature_extractor(backbone, levels=["P3", "P5"])
    assert extractor.get_layer("resnet18").backbone is backbone
    assert extractor.get_layer("resnet18").get_layer("conv3_block1") is backbone.blocks[2]
    x = random_input((2, 32, 32, 3))
    before = extractor(x)
    assert sorted(before) == ["P3", "P5"]
    assert tuple(before["P5"].shape) == (2, 1, 1, 512)
    direct = backbone(x, pyramid_levels=["P3", "P5"])
    assert_close(before["P3"], direct["P3"], rtol=1e-6)
    path = tmp_path / "features.keras"
    extractor.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    after = reloaded(x)
    for level in ("P3", "P5"):
        assert_close(after[level], before[level], rtol=1e-6)
    assert reloaded.get_layer("resnet18").get_layer("conv3_block1").name == "conv3_block1"


def test_feature_extractor_channels_first():
    backbone = keras_residual.ResNet18(
        include_top=False, input_shape=(3, 32, 32), data_format="channels_first"
    )
    out = keras_residual.feature_extractor(backbone, levels=["P2"])(random_input((1, 3, 32, 32)))
    assert tuple(out["P2"].shape) == (1, 64, 8, 8)


def test_feature_extractor_bad_input():
    backbone = keras_residual.ResNet18(input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="pyramid_levels.*Received"):
        keras_residual.feature_extractor(backbone, levels=["P6"])
    with pytest.raises(ValueError, match="model.*Received"):
        keras_residual.feature_extractor(keras.Sequential([keras.Input((4,))]))
    v2 = resnet_lib.ResNet(
        block_type="basic", stage_depths=(1, 1), stage_filters=(8, 16), preact=True
    )
    with pytest.raises(ValueError, match="preact"):
        keras_residual.feature_extractor(v2)


# -- the README's examples -----------------------------------------------------

WEIGHTS_SECTION = "## Weights from torchvision, timm and safetensors"
README_SECTIONS = (
    "## ResNeXt, SE, ResNet-D and pre-activation",
    "## Multi-scale features",
    WEIGHTS_SECTION,
)


def _python_blocks(section):
    text = README.read_text()
    start = text.index(section)
    end = text.find("\n## ", start + len(section))
    body = text[start : end if end != -1 else None]
    blocks = body.split("```python\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


@pytest.mark.slow
@pytest.mark.parametrize("section", README_SECTIONS)
def test_readme_examples_run(section, tmp_path, monkeypatch):
    if section == WEIGHTS_SECTION:
        from reference_models import import_reference

        import_reference()  # torchvision importable, or a skip that says why
    monkeypatch.chdir(tmp_path)
    blocks = _python_blocks(section)
    assert blocks, f"no python example under {section}"
    for block in blocks:
        exec(compile(block, f"README {section}", "exec"), {})
