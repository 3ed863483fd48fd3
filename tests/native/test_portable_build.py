"""The native build works on any x86-64 or aarch64 host.

The CPU kernels are the only translation unit compiled for the host's vector
ISA (``-march=native``, or ``$KERAS_RESIDUAL_CPU_ARCH``); the sources that
include framework headers never get ``-march`` (TensorFlow's Eigen, for one,
fails under ``-march=native`` on AVX-512 FP16 CPUs). These tests compile the
kernels for real CPU targets the installed compilers know, and read the build
log of the loaded adapter to check which flags each source got.
"""

import os
import shlex
import shutil
import subprocess

import keras
import pytest

from keras_residual.native import _build

# (-march target, compiler): the CPUs a cache built on one machine meets.
TARGETS = [
    ("x86-64-v2", "c++"),
    ("haswell", "c++"),
    ("skylake-avx512", "c++"),
    ("sapphirerapids", "c++"),  # AVX-512 FP16, where -march=native broke Eigen
    ("znver3", "c++"),
    ("znver4", "c++"),
    ("armv8.2-a", "aarch64-linux-gnu-g++"),
]


def _knows(cxx: str, arch: str) -> bool:
    result = subprocess.run(
        [cxx, f"-march={arch}", "-x", "c++", "-E", os.devnull, "-o", os.devnull],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


FRAMEWORK_FREE = pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="framework-free: runs once, with the default backend",
)


@FRAMEWORK_FREE
@pytest.mark.parametrize(("arch", "cxx"), TARGETS, ids=[arch for arch, _ in TARGETS])
def test_cpu_kernels_compile_for(arch, cxx, tmp_path, monkeypatch):
    if cxx == "c++" and shutil.which("c++") and not _is_x86(cxx):
        pytest.skip(f"the host compiler does not target x86-64 (-march={arch})")
    if shutil.which(cxx) is None:
        pytest.skip(f"no {cxx} on this machine (CI installs g++-aarch64-linux-gnu)")
    if not _knows(cxx, arch):
        pytest.skip(f"{cxx} does not know -march={arch}")
    monkeypatch.setenv(_build.ARCH_VARIABLE, arch)
    monkeypatch.setenv("CXX", cxx)
    # -O1: what -march decides (the intrinsics, the headers' ISA paths and
    # the instructions the assembler must accept) is checked at a third of
    # -O3's compile time; the host's own -O3 build runs in every other test.
    objects = _build.compile_kernels(tmp_path, extra_flags=["-O1"])
    assert objects and all(obj.stat().st_size > 10_000 for obj in objects)
    log = (tmp_path / _build.LOG_FILE).read_text()
    assert f"-march={arch}" in log


def _is_x86(cxx: str) -> bool:
    result = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, check=False)
    return result.stdout.startswith(("x86_64", "i686", "amd64"))


@FRAMEWORK_FREE
def test_cpu_arch_is_validated(monkeypatch):
    monkeypatch.setenv(_build.ARCH_VARIABLE, "haswell; rm -rf /")
    with pytest.raises(ValueError, match="KERAS_RESIDUAL_CPU_ARCH"):
        _build.cpu_arch()
    monkeypatch.setenv(_build.ARCH_VARIABLE, "x86-64-v3")
    assert _build.cpu_arch() == "x86-64-v3"
    assert "-march=x86-64-v3" in _build.kernel_flags()
    # A named target is not keyed on this CPU: a cache built for it serves
    # every machine of that level.
    assert _build.cpu_signature() not in _build.kernel_key()
    monkeypatch.delenv(_build.ARCH_VARIABLE)
    assert _build.cpu_signature() in _build.kernel_key()


def _compile_commands(library) -> list[list[str]]:
    log = (library.parent / _build.LOG_FILE).read_text()
    return [shlex.split(line[2:]) for line in log.splitlines() if line.startswith("$ ")]


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="needs TensorFlow loaded")
def test_tensorflow_sources_get_framework_flags_and_kernels_the_host_isa():
    from keras_residual.native import _tensorflow

    try:
        _tensorflow.load()
    except _build.NativeUnavailable as error:
        pytest.fail(f"the TensorFlow adapter does not build here: {error}")
    commands = _compile_commands(_tensorflow._loaded.path)
    ops = [c for c in commands if any(arg.endswith("ops.cc") for arg in c)]
    kernels = [c for c in commands if any(arg.endswith("kernels.cpp") for arg in c)]
    assert ops and kernels
    assert not any(arg.startswith("-march") for command in ops for arg in command)
    assert all(f"-march={_build.cpu_arch()}" in command for command in kernels)


@pytest.mark.skipif(keras.config.backend() != "torch", reason="needs torch loaded")
def test_torch_sources_get_framework_flags_and_kernels_the_host_isa():
    from pathlib import Path

    from keras_residual.native import _torch

    try:
        _torch.load()
    except _build.NativeUnavailable as error:
        pytest.fail(f"the torch adapter does not build here: {error}")
    log = (Path(_torch.status()["path"]).parent / _build.LOG_FILE).read_text()
    commands = [line for line in log.splitlines() if "kernels.cpp" in line and "-c" in line]
    assert commands and all(f"-march={_build.cpu_arch()}" in line for line in commands)
    # torch's own build of ops.cpp (ninja's verbose output) never gets -march.
    torch_lines = [line for line in log.splitlines() if "ops.cpp" in line and " -c " in line]
    assert torch_lines and not any("-march" in line for line in torch_lines)
