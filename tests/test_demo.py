"""The demo command end to end, in a short form (CI also runs the full one)."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_trains_saves_and_reloads(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_residual",
            "demo",
            "--epochs",
            "2",
            "--quiet",
            "--min-accuracy",
            "0.5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "demo_result.json").read_text())
    assert result["reload_agree"] is True
    assert result["reload_max_abs_diff"] <= 1e-5
    assert 0.5 <= result["test_accuracy"] <= 1.0
    assert (tmp_path / "digits_resnet.keras").is_file()
    for step in ("[1/4] Data", "[2/4] Model", "[3/4] Training", "[4/4] Saved", "Demo PASSED"):
        assert step in done.stdout


def test_demo_exit_status_follows_its_verdict(monkeypatch):
    from keras_residual import __main__ as cli
    from keras_residual import demo

    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return {"passed": kwargs["min_accuracy"] <= 0.9}

    monkeypatch.setattr(demo, "run", fake_run)
    assert cli.main(["demo", "--min-accuracy", "0.95", "--epochs", "3", "--quiet"]) == 1
    assert seen["epochs"] == 3 and seen["verbose"] == 0
    assert cli.main(["demo", "--min-accuracy", "0.5"]) == 0
    assert seen["epochs"] == 20 and seen["verbose"] == 1 and seen["min_accuracy"] == 0.5
