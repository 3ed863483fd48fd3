"""``python -m keras_residual build``: ahead-of-time compiles that say what they do."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="framework-free: runs once, with the default backend",
)

FAKE_COMPILER = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake-c++ 1.0"; exit 0; fi
echo run >> "{count}"
echo "ops.cc:12:5: error: simulated failure" >&2
exit 1
"""


def _build(args, env_extra=None, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "keras_residual", "build", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT,
    )


def test_a_failed_build_exits_non_zero_with_the_first_error_and_the_log(tmp_path):
    fake = tmp_path / "fake-c++"
    count = tmp_path / "runs.txt"
    fake.write_text(FAKE_COMPILER.format(count=count))
    fake.chmod(0o755)
    env = {"CXX": str(fake), "KERAS_RESIDUAL_CACHE_DIR": str(tmp_path / "cache")}
    result = _build(["--backend", "tensorflow"], env)
    assert result.returncode == 1
    assert "[1/2] tensorflow: FAILED" in result.stderr
    assert "ops.cc:12:5: error: simulated failure" in result.stderr
    log_lines = [line for line in result.stderr.splitlines() if line.strip().startswith("log:")]
    assert log_lines and Path(log_lines[0].split("log:")[1].strip()).is_file()
    runs = count.read_text().count("run")
    assert runs >= 2  # one compile each for the TensorFlow and the core library
    # The recorded failure is reported without compiling again ...
    again = _build(["--backend", "tensorflow"], env)
    assert again.returncode == 1 and "simulated failure" in again.stderr
    assert count.read_text().count("run") == runs
    # ... until --force.
    assert _build(["--backend", "tensorflow", "--force"], env).returncode == 1
    assert count.read_text().count("run") == 2 * runs


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_cuda_required_on_a_cpu_only_torch_fails_with_the_reason(tmp_path):
    import torch

    if torch.version.cuda:
        pytest.skip("this torch has CUDA: the refusal needs a CPU-only build")
    result = _build(["--backend", "torch", "--cuda"], {"KERAS_RESIDUAL_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "torch: FAILED" in result.stderr and "torch is a CPU-only build" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_cuda_required_on_a_jax_without_cuda_devices_fails_with_the_reason(tmp_path):
    result = _build(
        ["--backend", "jax", "--cuda"],
        {"KERAS_RESIDUAL_CACHE_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 1
    assert "jax: FAILED" in result.stderr
    assert "cannot compile the CUDA handlers: jax has no CUDA devices" in result.stderr


def test_bad_arguments_are_refused():
    result = _build(["--backend", "numpy"], timeout=300)
    assert result.returncode == 2 and "invalid choice: 'numpy'" in result.stderr
    result = _build(["--cuda", "--no-cuda"], timeout=300)
    assert result.returncode == 2 and "not allowed with argument" in result.stderr


@pytest.mark.slow
def test_build_compiles_ahead_of_time_then_finds_the_cache():
    # The configured cache (CI fills it with `build` first): compiles only
    # what is missing, then finds everything there.
    first = _build(["--backend", "tensorflow"])
    assert first.returncode == 0, first.stderr
    assert "compiling" not in first.stderr  # no first-use message: build reports itself
    libraries = [
        Path(line.split("library:")[1].strip())
        for line in first.stdout.splitlines()
        if "library:" in line
    ]
    assert len(libraries) == 2 and all(path.is_file() for path in libraries)
    logs = [
        Path(line.split("log:")[1].strip()) for line in first.stdout.splitlines() if "log:" in line
    ]
    assert len(logs) == 2 and all("$ " in log.read_text() for log in logs)
    again = _build(["--backend", "tensorflow"])
    assert again.returncode == 0
    assert again.stdout.count("found in the cache") == 2
