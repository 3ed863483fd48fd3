"""The build cache survives concurrent, killed and corrupt builds.

These use a tiny C library as the target, so they test the cache itself in
seconds; the real libraries go through the same `build_library`.
"""

import ctypes
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keras_residual.native import _build

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler on this machine"
)

SOURCE = 'extern "C" int answer() { return 42; }\n'

# A child process that builds the tiny library through build_library, with a
# compile step that logs each real compile and can sleep or die halfway.
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from keras_residual.native import _build

    source, log, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def compile(out_path, build_dir):
        with open(log, "a") as handle:
            handle.write(f"{os.getpid()}\\n")
        if mode == "die":
            out_path.write_bytes(b"half a library")
            os._exit(9)
        time.sleep(float(mode))
        command = [_build.compiler(), "-shared", "-fPIC", str(source), "-o", str(out_path)]
        _build.run_compiler(command)

    print(_build.build_library("tiny", [source], "test-1.0", compile))
    """
)


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KERAS_RESIDUAL_CACHE_DIR", str(cache))
    source = tmp_path / "tiny.cpp"
    source.write_text(SOURCE)
    log = tmp_path / "compiles.log"
    script = tmp_path / "child.py"
    script.write_text(CHILD)

    def start(mode="0"):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        return subprocess.Popen(
            [sys.executable, str(script), str(source), str(log), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def compiles():
        return log.read_text().split() if log.exists() else []

    return {"cache": cache, "source": source, "start": start, "compiles": compiles}


def _answer(path):
    return ctypes.CDLL(str(path)).answer()


def _compile_fn(source):
    def compile(out_path, build_dir):
        _build.run_compiler(
            [_build.compiler(), "-shared", "-fPIC", str(source), "-o", str(out_path)]
        )

    return compile


def test_two_processes_build_once_and_share_one_library(tiny):
    first, second = tiny["start"]("1.5"), tiny["start"]("1.5")
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    paths = {out.strip() for out, _ in outputs}
    assert len(paths) == 1
    assert len(tiny["compiles"]()) == 1  # the second waited on the lock
    assert _answer(paths.pop()) == 42


def test_a_build_killed_halfway_is_never_loaded(tiny):
    dying = tiny["start"]("die")
    dying.communicate(timeout=120)
    assert dying.returncode == 9
    # The half-written file stayed in its scratch folder: no cache entry
    # holds a library or a record.
    entries = [p for p in tiny["cache"].iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert all(not (entry / "libtiny.so").exists() for entry in entries)
    assert all(not (entry / _build.INFO_FILE).exists() for entry in entries)
    # So the next build compiles afresh and gets a good library.
    path = _build.build_library("tiny", [tiny["source"]], "test-1.0", _compile_fn(tiny["source"]))
    assert _answer(path) == 42
    assert len(tiny["compiles"]()) == 1  # only the killed build used the logging compile


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign_version", "no_record"])
def test_a_damaged_cache_entry_is_rebuilt(tiny, damage):
    calls = []

    def compile(out_path, build_dir):
        calls.append(out_path)
        _compile_fn(tiny["source"])(out_path, build_dir)

    path = _build.build_library("tiny", [tiny["source"]], "test-1.0", compile)
    record_path = path.parent / _build.INFO_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"\x7fELF" + b"\0" * 64)
    elif damage == "foreign_version":
        record = json.loads(record_path.read_text())
        record["framework_version"] = "other-9.9"
        record_path.write_text(json.dumps(record))
    else:
        record_path.unlink()
    again = _build.build_library("tiny", [tiny["source"]], "test-1.0", compile)
    assert again == path
    assert len(calls) == 2
    assert _answer(again) == 42
    assert json.loads(record_path.read_text())["framework_version"] == "test-1.0"


def test_a_valid_entry_is_reused_and_a_source_change_rebuilds(tiny):
    calls = []

    def compile(out_path, build_dir):
        calls.append(1)
        _compile_fn(tiny["source"])(out_path, build_dir)

    first = _build.build_library("tiny", [tiny["source"]], "test-1.0", compile)
    assert _build.build_library("tiny", [tiny["source"]], "test-1.0", compile) == first
    assert len(calls) == 1
    tiny["source"].write_text(SOURCE.replace("42", "43"))
    changed = _build.build_library("tiny", [tiny["source"]], "test-1.0", compile)
    assert changed != first and len(calls) == 2
    record = _build.read_record(changed)
    assert record["source_hash"] == _build.source_hash([tiny["source"]])
    assert record["library_sha256"] == _build.file_hash(changed)


def test_an_unwritable_cache_folder_falls_back_to_a_temp_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    # A folder under a regular file can never be created, even by root.
    monkeypatch.setenv("KERAS_RESIDUAL_CACHE_DIR", str(blocker / "cache"))
    folder = _build.cache_dir()
    assert folder != blocker / "cache"
    assert folder.is_dir() and os.access(folder, os.W_OK)


def test_a_failing_compiler_is_native_unavailable_with_its_output(tiny):
    broken = tiny["source"].with_name("broken.cpp")
    broken.write_text("this is not C++\n")
    with pytest.raises(_build.NativeUnavailable, match="compiler exited with"):
        _build.build_library("tiny", [broken], "test-1.0", _compile_fn(broken))
    # Nothing half-made is left to be loaded.
    assert not list(tiny["cache"].rglob("libtiny.so"))


def test_missing_sources_are_native_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_RESIDUAL_CACHE_DIR", str(tmp_path))
    with pytest.raises(_build.NativeUnavailable, match="sources not found"):
        _build.build_library("tiny", [tmp_path / "nope.cpp"], "1", lambda out, scratch: None)
