"""The ResNet family: counts, keras.applications parity, weights, config."""

import math

import h5py
import keras
import numpy as np
import pytest
from helpers import config_round_trip, random_input, randomize_bn_statistics

import keras_residual
from keras_residual import (
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet101,
    ResNet152,
    from_keras_applications,
)
from keras_residual.models import weights as weights_lib


def trainable_count(model):
    return sum(math.prod(w.shape) for w in model.trainable_weights)


def images(n=2, size=64, seed=0):
    """Inputs as keras.applications expects them after preprocess_input."""
    raw = np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")
    return keras_residual.preprocess_input(raw)


def write_legacy_weights(model, path):
    """The legacy HDF5 weights layout that keras.applications downloads."""
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


def assert_close(ours, theirs, rtol=1e-4):
    ours, theirs = keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs)
    assert ours.shape == theirs.shape
    scale = np.max(np.abs(theirs))
    assert scale > 0
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * scale)


def test_resnet50_is_a_subclassed_model():
    model = ResNet50()
    assert isinstance(model, keras.Model)
    assert not isinstance(model, keras.Sequential)
    assert type(model).__mro__[1:3] == (keras_residual.models.resnet._Preset, ResNet)
    assert model.name == "resnet50"


def test_resnet50_parameter_counts_match_keras_applications():
    assert ResNet50(weights=None).count_params() == 25_636_712
    assert ResNet50(include_top=False, pooling="avg").count_params() == 23_587_712
    reference = keras.applications.ResNet50(weights=None)
    assert reference.count_params() == 25_636_712
    ours = ResNet50(weights=None)
    assert sorted(layer.name for layer in weights_lib.leaf_layers(ours).values()) == sorted(
        layer.name for layer in reference.layers if layer.weights
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_cls, params",
    [(ResNet101, 44_707_176), (ResNet152, 60_419_944)],  # keras.applications' counts
)
def test_deep_resnet_parameter_counts(model_cls, params):
    assert model_cls().count_params() == params


@pytest.mark.parametrize(
    "model_cls, trainable",
    [  # torchvision's resnet18/34/50 counts: v1.5, no conv biases
        (ResNet18, 11_689_512),
        (ResNet34, 21_797_672),
        (ResNet50, 25_557_032),
    ],
)
def test_v15_layout_matches_torchvision_counts(model_cls, trainable):
    model = model_cls(stride_on="3x3", use_bias=False, epsilon=1e-5)
    assert trainable_count(model) == trainable


@pytest.mark.parametrize("include_top, pooling", [(True, None), (False, "avg"), (False, None)])
def test_resnet50_parity_from_legacy_weights_file(tmp_path, include_top, pooling):
    reference = keras.applications.ResNet50(
        weights=None, include_top=include_top, pooling=pooling, input_shape=(64, 64, 3)
    )
    randomize_bn_statistics(reference)
    path = write_legacy_weights(reference, tmp_path / "resnet50_legacy.h5")
    ours = ResNet50(include_top=include_top, pooling=pooling, weights=str(path))
    x = images()
    assert_close(ours.predict(x, verbose=0), reference.predict(x, verbose=0))


def test_whole_model_legacy_h5_file(tmp_path):
    """A whole-model .h5 file keeps its weights under 'model_weights'."""
    reference = keras.applications.ResNet50(
        weights=None, include_top=False, input_shape=(64, 64, 3)
    )
    path = str(tmp_path / "whole.h5")
    reference.save(path)
    with h5py.File(path) as file:
        assert "model_weights" in file
    ours = ResNet50(include_top=False, weights=path)
    x = images()
    assert_close(ours(x), reference(x))


def test_mismatched_weights_file_is_a_clear_error(tmp_path):
    notop = keras.applications.ResNet50(weights=None, include_top=False)
    path = write_legacy_weights(notop, tmp_path / "notop.h5")
    with pytest.raises(ValueError, match="has no weights for 1 layer.*predictions"):
        ResNet50(include_top=True, weights=str(path))
    with pytest.raises(ValueError, match="conv1_conv"):
        ResNet50(include_top=False, use_bias=False, weights=str(path))


def test_not_a_legacy_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as file:
        file["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="legacy HDF5 layout"):
        ResNet18(weights=str(path))


def test_imagenet_uses_keras_applications_url_and_hash(tmp_path, monkeypatch):
    reference = keras.applications.ResNet50(weights=None, include_top=False)
    path = write_legacy_weights(reference, tmp_path / "notop.h5")
    calls = []

    def fake_get_file(fname, origin, cache_subdir, file_hash):
        calls.append((fname, origin, cache_subdir, file_hash))
        return str(path)

    monkeypatch.setattr(keras.utils, "get_file", fake_get_file)
    ours = ResNet50(include_top=False, weights="imagenet")
    from keras.src.applications import resnet as ka_resnet

    name = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert calls == [
        (
            name,
            ka_resnet.BASE_WEIGHTS_PATH + name,
            "models",
            ka_resnet.WEIGHTS_HASHES["resnet50"][1],
        )
    ]
    x = images()
    assert_close(ours(x), reference(x))


def test_imagenet_offline_fails_with_a_clear_message(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(
        OSError,
        match=r"Could not fetch the ImageNet weights for resnet101.*"
        r"pass its path as `weights=",
    ):
        ResNet101(weights="imagenet")


def test_keras3_weights_file(tmp_path):
    model = ResNet18(input_shape=(32, 32, 3), classes=4)
    path = str(tmp_path / "r18.weights.h5")
    model.save_weights(path)
    clone = ResNet18(input_shape=(32, 32, 3), classes=4, weights=path)
    x = random_input((2, 32, 32, 3))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x)), keras.ops.convert_to_numpy(clone(x))
    )


@pytest.mark.parametrize("include_top, pooling", [(True, None), (False, "max")])
def test_from_keras_applications(include_top, pooling):
    reference = keras.applications.ResNet50(
        weights=None,
        include_top=include_top,
        pooling=pooling,
        classes=7,
        classifier_activation=None,
        input_shape=(48, 48, 3),
    )
    ours = from_keras_applications(reference)
    assert type(ours) is ResNet50
    assert ours.include_top == include_top
    assert ours.pooling == pooling
    if include_top:
        assert ours.classes == 7 and ours.classifier_activation == "linear"
    x = images(size=48)
    assert_close(ours(x), reference(x))


def test_from_keras_applications_rejects_other_models():
    with pytest.raises(ValueError, match="Received: model="):
        from_keras_applications(keras.applications.MobileNetV2(weights=None))


def test_channels_first_model_matches_channels_last():
    last = ResNet18(input_shape=(32, 32, 3), classes=5, classifier_activation=None)
    first = ResNet18(
        input_shape=(3, 32, 32),
        classes=5,
        classifier_activation=None,
        data_format="channels_first",
    )
    first.set_weights(last.get_weights())
    x = random_input((2, 32, 32, 3))
    assert_close(first(x.transpose(0, 3, 1, 2)), last(x), rtol=1e-5)
    features = ResNet18(include_top=False, input_shape=(3, 32, 32), data_format="channels_first")
    assert tuple(features(x.transpose(0, 3, 1, 2)).shape) == (2, 512, 1, 1)
    assert features.compute_output_shape((2, 3, 32, 32)) == (2, 512, 1, 1)


def test_config_round_trip():
    model = ResNet50(include_top=False, pooling="avg", drop_path_rate=0.1, seed=3)
    config = model.get_config()
    assert "block_type" not in config and "stage_depths" not in config
    config_round_trip(model)
    generic = ResNet(
        block_type="basic",
        stage_depths=(1, 1),
        stage_filters=(8, 16),
        input_shape=(16, 16, 3),
        classes=3,
    )
    assert generic.get_config()["stage_depths"] == (1, 1)
    config_round_trip(generic)


def test_block_names_and_strides_follow_keras_applications():
    model = ResNet50()
    names = [block.name for block in model.blocks]
    assert names[:4] == ["conv2_block1", "conv2_block2", "conv2_block3", "conv3_block1"]
    assert len(names) == 16 and names[-1] == "conv5_block3"
    strides = [block.strides for block in model.blocks]
    assert [i for i, s in enumerate(strides) if s == (2, 2)] == [3, 7, 13]
    assert all(block.stride_on == "1x1" for block in model.blocks)
    assert model.blocks[0].shortcut_conv is not None  # 64 -> 256 channels
    assert model.blocks[1].shortcut_conv is None


def test_drop_path_grows_linearly_over_the_blocks():
    model = ResNet18(drop_path_rate=0.3, seed=1)
    rates = [block.drop_path_rate for block in model.blocks]
    np.testing.assert_allclose(rates, np.linspace(0, 0.3, 8))
    assert [block.seed for block in model.blocks] == list(range(1, 9))


def test_fit_a_small_resnet():
    model = ResNet18(input_shape=(32, 32, 3), classes=3, momentum=0.9)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    x = random_input((8, 32, 32, 3))
    y = np.arange(8) % 3
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_mixed_precision_model():
    model = ResNet18(input_shape=(32, 32, 3), classes=3, dtype="mixed_bfloat16")
    y = model(random_input((2, 32, 32, 3)), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert {keras.backend.standardize_dtype(w.dtype) for w in model.weights} == {"float32"}


def test_preset_arguments_are_keyword_only():
    """keras.applications' positional order differs; no silent misbinding."""
    with pytest.raises(TypeError):
        ResNet50(False)


def test_get_layer_finds_nested_layers_by_keras_applications_name():
    model = ResNet50()
    assert model.get_layer("conv2_block1_1_conv") is model.blocks[0].conv1
    assert model.get_layer("conv5_block3_3_bn") is model.blocks[-1].bn3
    assert model.get_layer("conv1_conv") is model.conv1_conv
    assert model.get_layer(index=0) is model.conv1_pad
    with pytest.raises(ValueError, match="No such layer"):
        model.get_layer("conv4_block6_out")


def test_legacy_file_weight_order_is_by_name_not_position(tmp_path):
    """A file listing a BN's weights in another order still loads right."""
    source = keras.applications.ResNet50(weights=None, include_top=False)
    rng = np.random.default_rng(0)
    for layer in source.layers:
        if layer.weights:
            layer.set_weights([rng.normal(size=w.shape) for w in layer.weights])
    path = write_legacy_weights(source, tmp_path / "w.h5")
    with h5py.File(path, "r+") as file:
        group = file["conv1_bn"]
        names = list(group.attrs["weight_names"])
        group.attrs["weight_names"] = names[::-1]  # variance, mean, beta, gamma
    ours = ResNet50(include_top=False, weights=str(path))
    for ours_w, source_w in zip(
        ours.get_layer("conv1_bn").weights, source.get_layer("conv1_bn").weights, strict=True
    ):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(ours_w), keras.ops.convert_to_numpy(source_w)
        )
