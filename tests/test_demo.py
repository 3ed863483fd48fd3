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


def test_demo_fails_below_the_accuracy_target(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_residual",
            "demo",
            "--epochs",
            "1",
            "--quiet",
            "--min-accuracy",
            "1.01",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    assert "Demo FAILED" in done.stdout
