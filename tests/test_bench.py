"""``python -m keras_residual bench``: its outputs, rows and ratios (no timings asserted)."""

from __future__ import annotations

import importlib.util
import json

import keras
import numpy as np
import pytest

import keras_residual
from keras_residual import __main__ as cli
from keras_residual import bench
from keras_residual.bench import _models, _report

RECORD_KEYS = {
    "model",
    "mode",
    "implementation",
    "backend",
    "device",
    "dtype",
    "batch_size",
    "image_size",
    "images_per_second",
    "ratio_vs_keras_applications",
    "ratio_vs_limit",
    "spread",
    "warmup_seconds",
    "skipped",
}


@pytest.mark.slow
def test_block_run_writes_every_row_of_both_modes(tmp_path):
    keras.config.set_dtype_policy("float32")
    status = cli.main(
        [
            "bench",
            "--model",
            "block",
            "--batch-size",
            "2",
            "--image-size",
            "8",
            "--repeats",
            "2",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--dtype",
            "mixed_bfloat16",
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0
    # The run's dtype policy is set for the run only.
    assert keras.config.dtype_policy().name == "float32"

    results = json.loads((tmp_path / "results.json").read_text())
    if importlib.util.find_spec("matplotlib") is None:
        # The chart needs the optional matplotlib; the other two files do not.
        assert not (tmp_path / "results.png").exists()
    else:
        assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "results.md").read_text()

    assert results["backend"] == keras.config.backend()
    assert {"cpu", "cores", "platform"} <= set(results["host"])
    assert results["versions"]["keras"] == keras.__version__
    assert results["versions"]["keras_residual"] == keras_residual.__version__
    assert {"python", "numpy"} <= set(results["versions"])
    assert results["device"] in markdown

    records = {(r["mode"], r["implementation"]): r for r in results["records"]}
    assert len(records) == len(results["records"]) == 10
    for mode in ("inference", "train"):
        assert f"## {mode}" in markdown
        limit = records[mode, "limit"]
        baseline = records[mode, "keras.applications"]
        assert limit["ratio_vs_limit"] == 1.0
        assert baseline["ratio_vs_keras_applications"] == 1.0
        for label in bench.LABELS:
            record = records[mode, label]
            assert RECORD_KEYS <= set(record)
            assert (record["model"], record["dtype"], record["batch_size"]) == (
                "block",
                "mixed_bfloat16",
                2,
            )
            assert record["image_size"] == 8
            assert record["device"] == results["device"]
            assert f"| {label} |" in markdown
            if record["images_per_second"] is None:
                assert isinstance(record["skipped"], str) and record["skipped"]
                assert record["ratio_vs_limit"] is None
                continue
            assert record["skipped"] is None
            spread = record["spread"]
            assert spread["min"] <= spread["q1"] <= record["images_per_second"] <= spread["q3"]
            assert spread["q3"] <= spread["max"]
            assert record["warmup_seconds"] > 0
            np.testing.assert_allclose(
                record["ratio_vs_limit"], record["images_per_second"] / limit["images_per_second"]
            )
            np.testing.assert_allclose(
                record["ratio_vs_keras_applications"],
                record["images_per_second"] / baseline["images_per_second"],
            )
    # Folding is for inference: the train row says why it is skipped.
    assert "inference-only" in records["train", "folded"]["skipped"]
    # Only the native row may be skipped otherwise, and only for a reason.
    for (mode, label), record in records.items():
        if record["skipped"] and (mode, label) != ("train", "folded"):
            assert label == "native" and "native" in record["skipped"]
    # Every timed row computed the same network; the limit has fewer weights.
    params = {label: records["inference", label]["notes"].get("params") for label in bench.LABELS}
    assert params["keras.applications"] == params["composite"] == 71_552
    assert params["limit"] == 69_632  # the three convolution kernels only


def test_quick_fills_only_what_is_not_given(monkeypatch):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"records": [{"error": False}]}

    monkeypatch.setattr(bench, "run", fake_run)
    assert cli.main(["bench", "--quick", "--batch-size", "8", "--out", "x"]) == 0
    assert seen == {
        "model": "resnet18",
        "batch_size": 8,
        "image_size": 64,
        "repeats": 5,
        "steps": 2,
        "warmup": 2,
        "out": "x",
    }
    seen.clear()
    assert cli.main(["bench", "--implementations", "limit,composite"]) == 0
    assert seen == {"implementations": ("limit", "composite")}


def test_a_failed_row_gives_exit_status_1(monkeypatch):
    monkeypatch.setattr(bench, "run", lambda **kwargs: {"records": [{"error": True}]})
    assert cli.main(["bench"]) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--implementations", "composite,fused"],
        ["--implementations", ""],
        ["--model", "vgg16"],
        ["--batch-size", "0"],
        ["--dtype", "float64"],
    ],
)
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "vgg16"}, "Received: model='vgg16'"),
        ({"implementations": ("native", "fused")}, "Received: implementations='fused'"),
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"repeats": 1.5}, "Received: repeats=1.5"),
        ({"model": "resnet18", "image_size": 16}, "Received: image_size=16"),
    ],
)
def test_run_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        bench.run(out=None, **kwargs)


def _convolutions(network):
    """(kernel shape, strides) of every Conv2D, and the layers' kinds."""
    kinds = {type(layer).__name__ for layer in network._flatten_layers(include_self=False)}
    return _models.conv_signature(network), kinds


@pytest.mark.parametrize(
    "model, builder, projections",
    [
        ("block", None, 0),
        ("resnet18", keras_residual.ResNet18, 3),
    ],
)
def test_limit_keeps_the_convolutions_and_drops_the_rest(model, builder, projections):
    size = 16 if model == "block" else 32
    limit = _models.stock_network(model, size, limit=True)
    if builder is None:
        ours, _ = _models.build("composite", model, size, "channels_last")
    else:
        ours = builder(weights=None, input_shape=(size, size, 3), implementation="composite")
    signature, kinds = _convolutions(limit)
    assert signature == _models.conv_signature(ours)
    assert len(signature) == (3 if model == "block" else 20)
    assert not kinds & {"BatchNormalization", "Activation"}
    assert limit.projection_adds == projections
    assert sum(isinstance(layer, keras.layers.Add) for layer in limit.layers) == projections
    assert all(not getattr(layer, "use_bias", False) for layer in limit.layers)


@pytest.mark.slow
def test_resnet50_rows_are_the_same_network():
    applications = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3))
    stock = _models.stock_network("resnet50", 64)
    limit = _models.stock_network("resnet50", 64, limit=True)
    ours = keras_residual.ResNet50(
        weights=None, input_shape=(64, 64, 3), implementation="composite"
    )
    assert stock.count_params() == applications.count_params() == 25_636_712
    signature = _models.conv_signature(applications)
    assert len(signature) == 53
    assert _models.conv_signature(stock) == signature
    assert _models.conv_signature(limit) == signature
    assert _models.conv_signature(ours) == signature
    assert limit.projection_adds == 4


def _fake_results():
    record = {
        "model": "block",
        "mode": "inference",
        "images_per_second": 100.0,
        "spread": {"q1": 90.0, "q3": 110.0, "min": 80.0, "max": 120.0},
        "warmup_seconds": 1.5,
        "skipped": None,
        "notes": {"params": 10, "jit_compile": False},
    }
    records = [
        {**record, "implementation": "keras.applications"},
        {
            **record,
            "implementation": "limit",
            "images_per_second": 200.0,
            "spread": {"q1": 190.0, "q3": 210.0, "min": 180.0, "max": 220.0},
        },
        {
            **record,
            "implementation": "native",
            "images_per_second": None,
            "spread": None,
            "skipped": "no kernels here",
        },
    ]
    bench._add_ratios(records)
    return {
        "backend": "tensorflow",
        "device": "cpu (Test CPU, 2 cores)",
        "versions": {"keras": "3"},
        "config": {
            "model": "block",
            "modes": ["inference"],
            "implementations": ["keras.applications", "native", "limit"],
            "dtype": "float32",
            "data_format": "channels_last",
            "batch_size": 2,
            "image_size": 8,
            "repeats": 3,
            "steps": 1,
            "warmup": 1,
        },
        "records": records,
    }


def test_ratios_and_markdown_of_given_records(tmp_path):
    results = _fake_results()
    by_label = {r["implementation"]: r for r in results["records"]}
    assert by_label["keras.applications"]["ratio_vs_limit"] == 0.5
    assert by_label["limit"]["ratio_vs_keras_applications"] == 2.0
    assert by_label["native"]["ratio_vs_limit"] is None
    table = _report.markdown(results)
    assert "| keras.applications | 100.0 | 90.0-110.0 | 80.0-120.0 | 1.00x | 0.50x | 1.5 |" in table
    assert "| native | skipped: no kernels here |" in table
    assert "| limit | 200.0 |" in table and "| 2.00x | 1.00x |" in table
    paths = _report.write(results, str(tmp_path))
    assert json.loads(open(paths["json"]).read())["records"][2]["skipped"] == "no kernels here"
