"""The bench's torchvision row: a plain-PyTorch peer timed beside the Keras rows.

It runs on the torch backend only, where torchvision is importable (CI may
not install it: these tests then skip, saying why). No timings asserted.
"""

from __future__ import annotations

import importlib.util
import json

import keras
import numpy as np
import pytest

from keras_residual import bench
from keras_residual.bench import _peer

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="the torchvision row runs on the torch backend only",
)


@pytest.fixture
def torchvision():
    pytest.importorskip("torch", reason="the torchvision row needs torch")
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("the torchvision row needs torchvision (pip install --no-deps torchvision)")
    try:
        return _peer.import_torchvision()
    except ImportError as error:
        pytest.skip(f"torchvision is not importable: {error}")


def test_import_torchvision_gives_its_models(torchvision):
    assert _peer.import_torchvision() is torchvision  # imported once, then reused
    network = torchvision.models.resnet18(weights=None)
    assert sum(p.numel() for p in network.parameters()) == 11_689_512


def test_torchvision_row_runs_beside_the_v15_rows(tmp_path, torchvision):
    results = bench.run(
        model="resnet18",
        mode="both",
        batch_size=2,
        image_size=32,
        implementations=("torchvision", "auto"),
        repeats=1,
        steps=1,
        warmup=1,
        arch="v1.5",
        out=str(tmp_path),
        log=lambda message: None,
    )
    records = {(r["mode"], r["implementation"]): r for r in results["records"]}
    assert len(records) == 4
    assert results["arch"] == results["config"]["arch"] == "v1.5"
    assert results["versions"]["torchvision"] == torchvision.__version__
    for mode in ("inference", "train"):
        peer, auto = records[mode, "torchvision"], records[mode, "auto"]
        for record in (peer, auto):
            assert record["skipped"] is None and not record["error"], record["skipped"]
            assert record["images_per_second"] > 0 and record["warmup_seconds"] > 0
            assert record["arch"] == "v1.5"
            assert record["ratio_vs_keras_applications"] is None  # that row did not run
        assert peer["ratio_vs_torchvision"] == 1.0
        np.testing.assert_allclose(
            auto["ratio_vs_torchvision"], auto["images_per_second"] / peer["images_per_second"]
        )
        # The same network: torchvision's parameters and BN statistics, counted
        # as Keras counts them, are the v1.5 model's weights.
        assert peer["notes"]["params"] == auto["notes"]["params"] == 11_699_112
    assert "channels_last" in records["inference", "torchvision"]["notes"]["source"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| vs torchvision |" in markdown
    assert "| torchvision | " in markdown and "| 1.00x |" in markdown
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["implementation"] for r in saved["records"]} == {"torchvision", "auto"}


def test_torchvision_row_trains_and_infers(torchvision):
    import torch

    peer, notes = _peer.build("resnet18", "float32", "torch")
    assert "autocast" not in notes
    x = torch.rand(2, 32, 32, 3)
    y = torch.tensor([1, 7], dtype=torch.int32)
    peer_x, peer_y = peer.bind(x, y, "channels_last")
    assert tuple(peer_x.shape) == (2, 3, 32, 32)
    assert peer_x.is_contiguous(memory_format=torch.channels_last)
    assert peer_y.dtype == torch.int64
    assert tuple(peer.inference_step(peer_x)().shape) == (2, 1000)
    before = peer.network.fc.weight.detach().clone()
    loss = peer.train_step(peer_x, peer_y)()
    assert np.isfinite(loss)
    assert not torch.equal(before, peer.network.fc.weight.detach())  # one SGD step


def test_mixed_bfloat16_runs_under_autocast(torchvision):
    import torch

    peer, notes = _peer.build("resnet18", "mixed_bfloat16", "torch")
    assert "bfloat16" in notes["autocast"]
    peer_x, _ = peer.bind(torch.rand(1, 3, 32, 32), None, "channels_first")
    assert peer.inference_step(peer_x)().dtype == torch.bfloat16
