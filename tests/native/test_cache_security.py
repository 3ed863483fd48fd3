"""Nobody else can plant a library in the cache.

A library is loaded only from a folder that this user owns and that group
and others cannot write (`_build.check_private`). Each test plants a real
library whose load has a visible side effect (its constructor writes a
marker file) together with a record that is valid in every other respect,
and checks that it is not loaded from an untrusted folder, and that it is
loaded from the same folder once that folder is private (so the test can
tell the difference).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from keras_residual.native import _build

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX ownership checks only"),
    pytest.mark.skipif(
        shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler here"
    ),
]

PLANTED = textwrap.dedent(
    """
    #include <stdio.h>
    __attribute__((constructor)) static void planted(void) {
      FILE* f = fopen("%s", "w");
      if (f) { fputs("loaded", f); fclose(f); }
    }
    int answer(void) { return 42; }
    """
)

SOURCE = 'extern "C" int answer() { return 42; }\n'

# In a child process: ask build_library for the "tiny" target, whose entry the
# test has planted, and load what it returns.
CHILD = textwrap.dedent(
    """
    import ctypes, sys
    from pathlib import Path
    from keras_residual.native import _build

    def compile(out_path, build_dir):
        raise SystemExit("COMPILED: the planted entry was not used")

    try:
        path = _build.build_library("tiny", [Path(sys.argv[1])], "test-1.0", compile)
    except _build.NativeUnavailable as error:
        print("REFUSED", error)
    else:
        ctypes.CDLL(str(path))
        print("LOADED", path)
    """
)


def _plant(folder: Path, source: Path, marker: Path, monkeypatch) -> Path:
    """A library with a valid record for `source` in `folder`; returns its path."""
    monkeypatch.setenv("KERAS_RESIDUAL_CACHE_DIR", str(folder))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)

    def compile(out_path, build_dir):
        c_file = build_dir / "planted.c"
        c_file.write_text(PLANTED % marker)
        _build.run_compiler(
            ["cc", "-shared", "-fPIC", str(c_file), "-o", str(out_path)], cwd=build_dir
        )

    return _build.build_library("tiny", [source], "test-1.0", compile)


def _child(tmp_path, source, env_extra):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "KERAS_BACKEND": "numpy",  # imports no framework: a faster child
        **env_extra,
    }
    result = subprocess.run(
        [sys.executable, str(script), str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture()
def planted(tmp_path, monkeypatch):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) to build the planted library")
    source = tmp_path / "tiny.cpp"
    source.write_text(SOURCE)
    marker = tmp_path / "marker.txt"
    folder = tmp_path / "cache"
    library = _plant(folder, source, marker, monkeypatch)
    assert not marker.exists()
    return {"folder": folder, "source": source, "marker": marker, "library": library}


def test_the_planted_library_loads_from_a_private_folder(planted, tmp_path):
    # The control: the same planted entry in a private folder is loaded, so
    # the refusals below are the check at work, not a broken plant.
    out = _child(tmp_path, planted["source"], {"KERAS_RESIDUAL_CACHE_DIR": str(planted["folder"])})
    assert out.startswith("LOADED")
    assert planted["marker"].read_text() == "loaded"


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722])
def test_a_group_or_world_writable_folder_is_never_loaded_from(planted, tmp_path, mode):
    os.chmod(planted["folder"], mode)
    out = _child(tmp_path, planted["source"], {"KERAS_RESIDUAL_CACHE_DIR": str(planted["folder"])})
    assert out.startswith("REFUSED"), out
    assert str(planted["folder"]) in out and "group or others can write it" in out
    assert not planted["marker"].exists()


@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_folder_owned_by_another_user_is_never_loaded_from(planted, tmp_path):
    for path in [planted["folder"], *planted["folder"].rglob("*")]:
        os.chown(path, 54321, 54321)
    out = _child(tmp_path, planted["source"], {"KERAS_RESIDUAL_CACHE_DIR": str(planted["folder"])})
    assert out.startswith("REFUSED"), out
    assert "owned by uid 54321" in out
    assert not planted["marker"].exists()


def test_a_planted_library_file_writable_by_others_is_refused(planted, tmp_path):
    os.chmod(planted["library"], 0o777)
    out = _child(tmp_path, planted["source"], {"KERAS_RESIDUAL_CACHE_DIR": str(planted["folder"])})
    assert out.startswith("REFUSED"), out
    assert not planted["marker"].exists()


def test_a_parent_others_can_write_without_sticky_bit_is_refused(tmp_path, monkeypatch):
    parent = tmp_path / "open"
    parent.mkdir()
    os.chmod(parent, 0o777)  # anyone could rename cache/ away and put theirs there
    folder = parent / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("KERAS_RESIDUAL_CACHE_DIR", str(folder))
    with pytest.raises(_build.UntrustedCache, match="others without the sticky bit"):
        _build.cache_dir()
    os.chmod(parent, 0o1777)  # sticky, as /tmp: others cannot rename our folder
    assert _build.cache_dir() == folder


def test_the_temporary_fallback_is_checked_not_trusted_by_name(planted, tmp_path, monkeypatch):
    # The configured folder cannot be created (it sits under a file), so the
    # per-user fallback in the temporary folder is used: another user got
    # there first and planted the same entry in a world-writable folder.
    fake_tmp = tmp_path / "tmp"
    fake_tmp.mkdir()
    os.chmod(fake_tmp, 0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(fake_tmp))
    fallback = _build._fallback_cache_dir()
    assert fallback.parent == fake_tmp
    planted["folder"].rename(fallback)
    os.chmod(fallback, 0o777)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    env = {"KERAS_RESIDUAL_CACHE_DIR": str(blocker / "cache"), "TMPDIR": str(fake_tmp)}
    out = _child(tmp_path, planted["source"], env)
    assert out.startswith("REFUSED"), out
    assert str(fallback) in out
    assert not planted["marker"].exists()
    # Made private (as this user would have created it), it is used.
    os.chmod(fallback, 0o700)
    assert _child(tmp_path, planted["source"], env).startswith("LOADED")


def test_new_cache_folders_are_private_whatever_the_umask(tmp_path, monkeypatch):
    folder = tmp_path / "made" / "here"
    monkeypatch.setenv("KERAS_RESIDUAL_CACHE_DIR", str(folder))
    old = os.umask(0o002)  # group-writable by default, as on many desktops
    try:
        assert _build.cache_dir() == folder
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o077 == 0


def test_native_falls_back_with_a_warning_naming_an_untrusted_folder(tmp_path):
    folder = tmp_path / "shared-cache"
    folder.mkdir()
    os.chmod(folder, 0o777)
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "import numpy as np\n"
        "from keras_residual.ops import conv_bn_add_act\n"
        "x = np.ones((1, 4, 4, 2), 'float32'); k = np.ones((1, 1, 2, 3), 'float32')\n"
        "o, z = np.ones(3, 'float32'), np.zeros(3, 'float32')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        # Training: at inference "auto" loads no adapter on TensorFlow
        # (native.AUTO_INFERENCE), so nothing would be looked for.
        "    y, _, _ = conv_bn_add_act(x, k, o, z, z, o, training=True, implementation='auto')\n"
        "print('SHAPE', tuple(y.shape))\n"
        "for w in caught: print('WARNING', w.message)\n"
    )
    env = {
        **os.environ,
        "KERAS_RESIDUAL_CACHE_DIR": str(folder),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "SHAPE (1, 4, 4, 3)" in result.stdout
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(folder) in warnings[0], result.stdout
    assert not any(folder.iterdir())  # nothing was built or loaded there
