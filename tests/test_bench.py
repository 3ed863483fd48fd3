"""``python -m keras_residual bench``: its outputs, rows and ratios (no timings asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
import pytest

import keras_residual
from keras_residual import __main__ as cli
from keras_residual import bench
from keras_residual.bench import _models, _peer, _report

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
    "ratio_vs_torchvision",
    "arch",
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
    assert len(records) == len(results["records"]) == 2 * len(bench.LABELS) == 14
    assert results["arch"] == results["config"]["arch"] == "keras"
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
            # torchvision has no stand-alone block: no ratio to it anywhere.
            assert record["ratio_vs_torchvision"] is None
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
    # Only the native and torchvision rows may be skipped otherwise, and only
    # for a reason.
    for (mode, label), record in records.items():
        if record["skipped"] and (mode, label) != ("train", "folded"):
            assert label in ("native", "torchvision"), record["skipped"]
            assert label in record["skipped"]
    assert "vs torchvision" not in markdown
    # Every timed row computed the same network; the limit has fewer weights.
    params = {label: records["inference", label]["notes"].get("params") for label in bench.LABELS}
    assert params["keras.applications"] == params["composite"] == params["auto"] == 71_552
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
    seen.clear()
    assert cli.main(["bench", "--arch", "v1.5", "--implementations", "auto,torchvision"]) == 0
    assert seen == {"arch": "v1.5", "implementations": ("auto", "torchvision")}


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
        ["--arch", "v2"],
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
        ({"arch": "v2"}, "Received: arch='v2'"),
    ],
)
def test_run_validates_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        bench.run(out=None, **kwargs)


def _tiny_run(tmp_path, **kwargs):
    options = {
        "model": "block",
        "mode": "inference",
        "batch_size": 2,
        "image_size": 8,
        "repeats": 1,
        "steps": 1,
        "warmup": 1,
        "out": str(tmp_path),
        "log": lambda message: None,
    }
    return bench.run(**{**options, **kwargs})


def test_auto_row_is_timed_with_a_well_formed_record(tmp_path):
    results = _tiny_run(tmp_path, implementations=("keras.applications", "auto"))
    records = {r["implementation"]: r for r in results["records"]}
    assert set(records) == {"keras.applications", "auto"}
    auto = records["auto"]
    assert RECORD_KEYS <= set(auto)
    assert auto["mode"] == "inference" and auto["skipped"] is None and not auto["error"]
    assert auto["images_per_second"] > 0
    assert auto["arch"] == "keras"
    np.testing.assert_allclose(
        auto["ratio_vs_keras_applications"],
        auto["images_per_second"] / records["keras.applications"]["images_per_second"],
    )
    assert auto["ratio_vs_torchvision"] is None
    # The record says what "auto" runs here: native kernels or composite.
    assert auto["notes"]["implementation"].startswith("auto: ")
    assert auto["notes"]["params"] == records["keras.applications"]["notes"]["params"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| auto |" in markdown and "arch of the keras_residual rows" in markdown
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["records"][1]["implementation"] == "auto"


def test_torchvision_row_is_skipped_for_the_block(tmp_path):
    results = _tiny_run(tmp_path, implementations=("torchvision",), mode="both")
    assert [r["mode"] for r in results["records"]] == ["inference", "train"]
    for record in results["records"]:
        assert record["images_per_second"] is None and not record["error"]
        assert "block" in record["skipped"] or "torch backend only" in record["skipped"]
        assert record["arch"] == "v1.5"
    assert "| torchvision | skipped: " in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(
    keras.config.backend() == "torch", reason="the torchvision row runs on the torch backend"
)
def test_torchvision_row_is_skipped_off_the_torch_backend(tmp_path):
    results = _tiny_run(
        tmp_path,
        model="resnet18",
        image_size=32,
        implementations=("torchvision",),
        out=None,
    )
    (record,) = results["records"]
    assert record["images_per_second"] is None and not record["error"]
    assert "torch backend only" in record["skipped"]
    assert keras.config.backend() in record["skipped"]
    assert "torchvision" not in results["versions"]


def test_block_and_other_backends_are_unavailable():
    with pytest.raises(_models.Unavailable, match="no stand-alone block"):
        _peer.build("block", "float32", "torch")
    assert "torch backend only" in _peer.unavailable_reason("resnet50", "jax")


def test_torchvision_row_says_why_when_torchvision_does_not_import(monkeypatch):
    def missing():
        raise ImportError("torchvision is not installed")

    monkeypatch.setattr(_peer, "import_torchvision", missing)
    with pytest.raises(_models.Unavailable, match="torchvision is not importable"):
        _peer.build("resnet18", "float32", "torch")


def _bias_free_v15(network):
    layers = list(network._flatten_layers(include_self=False))
    convs = [layer for layer in layers if isinstance(layer, keras.layers.Conv2D)]
    norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert convs and len(norms) == len(convs)
    assert not any(conv.use_bias for conv in convs)
    assert {(bn.epsilon, bn.momentum) for bn in norms} == {(1e-5, 0.9)}
    assert network.padding == "symmetric"
    return convs


def _trainable_count(network):
    return sum(int(np.prod(weight.shape)) for weight in network.trainable_weights)


def test_arch_v15_builds_resnet18_as_torchvision():
    v15, _ = _models.build("composite", "resnet18", 32, "channels_last", arch="v1.5")
    _bias_free_v15(v15)
    # torchvision.models.resnet18's parameter count (its BN statistics are buffers).
    assert _trainable_count(v15) == 11_689_512
    auto, notes = _models.build("auto", "resnet18", 32, "channels_last", arch="v1.5")
    assert auto.implementation == "auto" and auto.padding == "symmetric"
    assert notes["implementation"].startswith("auto: ")
    limit = _models.stock_network("resnet18", 32, limit=True)
    assert _models.conv_signature(limit) == _models.conv_signature(v15)
    # The default arch is the keras.applications network, biases included.
    keras_arch, _ = _models.build("composite", "resnet18", 32, "channels_last")
    assert keras_arch.count_params() == _models.stock_network("resnet18", 32).count_params()


@pytest.mark.slow
def test_arch_v15_builds_resnet50_with_the_stride_on_the_3x3():
    v15, _ = _models.build("composite", "resnet50", 32, "channels_last", arch="v1.5")
    convs = _bias_free_v15(v15)
    assert v15.stride_on == "3x3"
    strided = {tuple(conv.kernel_size) for conv in convs if tuple(conv.strides) == (2, 2)}
    # The stem's 7x7, the 3x3 of each strided block and the projections' 1x1.
    assert strided == {(7, 7), (3, 3), (1, 1)}
    strided_1x1 = [conv for conv in convs if conv.kernel_size == (1, 1) and conv.strides == (2, 2)]
    assert len(strided_1x1) == 3  # the projection shortcuts only
    assert _trainable_count(v15) == 25_557_032  # torchvision.models.resnet50's
    limit, _ = _models.build("limit", "resnet50", 32, "channels_last", arch="v1.5")
    assert _models.conv_signature(limit) == _models.conv_signature(v15)
    keras_limit = _models.stock_network("resnet50", 32, limit=True)
    assert _models.conv_signature(keras_limit) != _models.conv_signature(v15)


def test_arch_v15_block_row():
    block, _ = _models.build("composite", "block", 8, "channels_last", arch="v1.5")
    convs = [layer for layer in block._flatten_layers() if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 3 and not any(conv.use_bias for conv in convs)
    assert block.count_params() == 69_632 + 4 * (64 + 64 + 256)


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
    assert all(r["ratio_vs_torchvision"] is None for r in results["records"])
    by_label = {r["implementation"]: r for r in results["records"]}
    assert by_label["keras.applications"]["ratio_vs_limit"] == 0.5
    assert by_label["limit"]["ratio_vs_keras_applications"] == 2.0
    assert by_label["native"]["ratio_vs_limit"] is None
    table = _report.markdown(results)
    assert "| keras.applications | 100.0 | 90.0-110.0 | 80.0-120.0 | 1.00x | 0.50x | 1.5 |" in table
    assert "| native | skipped: no kernels here |" in table
    assert "| limit | 200.0 |" in table and "| 2.00x | 1.00x |" in table
    assert "vs torchvision" not in table
    paths = _report.write(results, str(tmp_path))
    assert json.loads(open(paths["json"]).read())["records"][2]["skipped"] == "no kernels here"


def test_ratio_to_torchvision_of_given_records(tmp_path):
    results = _fake_results()
    records = [
        {k: v for k, v in r.items() if not k.startswith("ratio_")} for r in results["records"]
    ]
    peer = {
        **records[0],
        "implementation": "torchvision",
        "images_per_second": 50.0,
        "spread": {"q1": 45.0, "q3": 55.0, "min": 40.0, "max": 60.0},
    }
    train = {**records[0], "mode": "train", "images_per_second": 10.0}
    results["records"] = [*records, peer, train]
    results["config"]["implementations"].insert(1, "torchvision")
    results["config"]["modes"].append("train")
    results["config"]["arch"] = "v1.5"
    bench._add_ratios(results["records"])
    by_key = {(r["mode"], r["implementation"]): r for r in results["records"]}
    assert by_key["inference", "keras.applications"]["ratio_vs_torchvision"] == 2.0
    assert by_key["inference", "limit"]["ratio_vs_torchvision"] == 4.0
    assert by_key["inference", "torchvision"]["ratio_vs_torchvision"] == 1.0
    assert by_key["inference", "torchvision"]["ratio_vs_keras_applications"] == 0.5
    assert by_key["inference", "native"]["ratio_vs_torchvision"] is None
    # No torchvision record in the train mode: no ratio to it there.
    assert by_key["train", "keras.applications"]["ratio_vs_torchvision"] is None
    table = _report.markdown(results)
    assert "| vs keras.applications | vs torchvision | vs limit | warm-up s |" in table
    assert "|---|---:|---:|---:|---:|---:|---:|---:|" in table
    assert (
        "| keras.applications | 100.0 | 90.0-110.0 | 80.0-120.0 | 1.00x | 2.00x | 0.50x | 1.5 |"
        in (table)
    )
    assert "| torchvision | 50.0 | 45.0-55.0 | 40.0-60.0 | 0.50x | 1.00x | 0.25x | 1.5 |" in table
    assert "| native | skipped: no kernels here | | | | | | |" in table
    assert "| keras.applications | 10.0 | 90.0-110.0 | 80.0-120.0 | 1.00x | - | - | 1.5 |" in table
    assert "v1.5, torchvision's network" in table
    paths = _report.write(results, str(tmp_path))
    saved = json.loads(open(paths["json"]).read())
    assert saved["records"][0]["ratio_vs_torchvision"] == 2.0
    if "chart" in paths:  # with matplotlib: the chart has the ratio panel
        assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(keras.config.backend() != "torch", reason="the per-shape table is torch's")
def test_op_targets_per_shape_records_both_directions_against_plain_torch():
    from keras_residual import native

    if not native.available():
        pytest.skip("the native path does not load here")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "op_targets.py"
    spec = importlib.util.spec_from_file_location("op_targets", path)
    op_targets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(op_targets)
    # Small tensors: the records' shape and the target's rule, not speed.
    records = op_targets.per_shape([(4, 4, 8)], repeats=1, batch=2)
    assert [r["direction"] for r in records] == ["forward", "backward"]
    for record in records:
        assert record["shape"] == [2, 4, 4, 8]
        assert set(record["median_ms"]) == {"native", "torch"}
        assert all(ms > 0 for ms in record["median_ms"].values())
        assert record["target"] == 1.0  # below 4 MB: never slower
        assert record["met"] == (record["native_speedup"] >= 1.0)


@pytest.mark.skipif(
    keras.config.backend() not in ("jax", "torch"),
    reason="the adapters with a 1x1 matmul: JAX, torch",
)
def test_pointwise_checks_and_times_every_function():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pointwise.py"
    spec = importlib.util.spec_from_file_location("pointwise", path)
    pointwise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pointwise)
    # A small shape: the record and the equality check, not speed.
    record = pointwise.measure((2, 4, 4, 8, 16), repeats=1)
    assert record["shape"] == [2, 4, 4, 8, 16]
    alternatives = {"matmul", "conv_transpose"} if keras.config.backend() == "torch" else {"matmul"}
    assert set(record["ratios"]) == alternatives
    names = {"conv", *alternatives}
    assert set(record["ms"]) == names | {f"{name} fwd+bwd" for name in names}
    assert all(ms > 0 for ms in record["ms"].values())
    for name in alternatives:
        ms = record["ms"]
        assert record["ratios"][name] == {
            "forward": ms["conv"] / ms[name],
            "fwd_bwd": ms["conv fwd+bwd"] / ms[f"{name} fwd+bwd"],
        }
