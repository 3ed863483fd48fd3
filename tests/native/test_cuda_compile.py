"""The CUDA kernels compile for sm_80 and sm_90 without warnings, and their
host-callable parts (conversions, activations, iterator, launch geometry,
workspace size) pass their CPU checks.

No GPU is needed: `scripts/check_cuda.sh` only compiles, and
`cuda_host_math.cu` runs on the CPU.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_cuda.sh"
HOST_CHECK = Path(__file__).resolve().parent / "cuda_host_math.cu"


def _nvcc():
    explicit = os.environ.get("NVCC")
    if explicit:
        return shutil.which(explicit)
    return shutil.which("nvcc") or shutil.which("/usr/local/cuda/bin/nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here"
)
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="check_cuda.sh needs bash")

# Every CUDA source the check must cover, found independently of the script.
CUDA_SOURCES = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*.cu"))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Runs the check once, keeping the objects; returns (result, object dir)."""
    out = tmp_path_factory.mktemp("cuda_objects")
    result = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result, out


@needs_bash
@needs_nvcc
def test_every_cuda_source_compiles(compiled):
    result, out = compiled
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert CUDA_SOURCES, "no .cu file under csrc/"
    assert "csrc/cuda/kernels.cu" in CUDA_SOURCES
    # The script names every source it checked, and each one compiled.
    checked_line = next(line for line in result.stdout.splitlines() if line.startswith("checked "))
    assert checked_line == f"checked {len(CUDA_SOURCES)} file(s): {' '.join(CUDA_SOURCES)}"
    for source in CUDA_SOURCES:
        assert any(line.startswith(f"ok      {source} ") for line in result.stdout.splitlines()), (
            log
        )
        obj = out / (source.replace("/", "_") + ".o")
        assert obj.is_file() and obj.stat().st_size > 0, f"no object for {source}"
    assert "nvcc not found" not in log


@needs_bash
@needs_nvcc
def test_host_checks_pass(compiled, tmp_path):
    result, out = compiled
    assert result.returncode == 0, result.stdout + result.stderr
    exe = tmp_path / "cuda_host_math"
    build = subprocess.run(
        [
            NVCC,
            "-std=c++17",
            f"-I{ROOT / 'csrc' / 'include'}",
            "-Werror",
            "all-warnings",
            "-Xcompiler",
            "-Wall,-Wextra",
            str(HOST_CHECK),
            *[str(p) for p in sorted(out.glob("*.o"))],
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = run.stdout.strip().splitlines()[-1]
    checks, failures = (int(word) for word in summary.replace(",", "").split()[::2])
    assert failures == 0
    # All 2 * 65536 conversion patterns alone are far more than this.
    assert checks > 100_000, summary


@needs_bash
def test_script_skips_without_nvcc(tmp_path):
    result = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NVCC": str(tmp_path / "no-such-nvcc")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "nvcc not found: skipped"
