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


def test_a_failed_build_is_recorded_once_with_its_log_and_first_error(tiny):
    calls = []
    broken = tiny["source"].with_name("broken.cpp")
    broken.write_text("int ok() { return 1; }\nthis is not C++\n")

    def compile(out_path, build_dir):
        calls.append(1)
        _build.run_compiler(
            [_build.compiler(), "-shared", "-fPIC", str(broken), "-o", str(out_path)],
            cwd=build_dir,
        )

    with pytest.raises(_build.BuildFailed) as first:
        _build.build_library("tiny", [broken], "test-1.0", compile)
    assert len(calls) == 1
    assert "error:" in first.value.first_error and "broken.cpp:2" in first.value.first_error
    log = first.value.log
    assert log is not None and log.is_file()
    assert "this is not C++" in log.read_text() or "does not name a type" in log.read_text()
    assert str(log) in str(first.value)
    # The record sits under the same key as a success would.
    record = json.loads((log.parent / _build.INFO_FILE).read_text())
    assert record["status"] == "failed" and record["source_hash"] == _build.source_hash([broken])

    # The next attempt, in this or any process, does not compile again.
    with pytest.raises(_build.BuildFailed) as again:
        _build.build_library("tiny", [broken], "test-1.0", compile)
    assert len(calls) == 1
    assert again.value.first_error == first.value.first_error

    # Forcing retries; so does a change of the sources.
    with pytest.raises(_build.BuildFailed):
        _build.build_library("tiny", [broken], "test-1.0", compile, rebuild=True)
    assert len(calls) == 2
    broken.write_text('extern "C" int answer() { return 42; }\n')
    assert _answer(_build.build_library("tiny", [broken], "test-1.0", compile)) == 42
    assert len(calls) == 3


def test_a_changed_flag_or_framework_version_retries_a_failed_build(tiny):
    calls = []

    def failing(out_path, build_dir):
        calls.append(1)
        raise RuntimeError("simulated failure")

    for extra, version in (("-O2", "1.0"), ("-O2", "1.0"), ("-O3", "1.0"), ("-O3", "2.0")):
        with pytest.raises(_build.BuildFailed, match="simulated failure"):
            _build.build_library("tiny", [tiny["source"]], version, failing, extra_key=extra)
    assert len(calls) == 3


FAKE_COMPILER = """#!/bin/sh
# Counts its compile invocations and fails like a compiler with an error.
if [ "$1" = "--version" ]; then echo "fake-c++ 1.0"; exit 0; fi
echo compile >> "{count}"
echo "kernels.cpp:1:1: warning: first a warning" >&2
echo "kernels.cpp:7:3: error: simulated compiler error" >&2
exit 1
"""


def _run_core(env):
    code = (
        "import warnings, time\n"
        "warnings.simplefilter('always')\n"
        "from keras_residual import native\n"
        "from keras_residual.native import core\n"
        "started = time.monotonic()\n"
        "try:\n"
        "    core.load_core()\n"
        "except native.NativeUnavailable as error:\n"
        "    print('REASON', error)\n"
        "print('SECONDS', time.monotonic() - started)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_a_failing_compiler_costs_its_time_once_across_processes(tmp_path):
    count = tmp_path / "compiles.txt"
    fake = tmp_path / "fake-c++"
    fake.write_text(FAKE_COMPILER.format(count=count))
    fake.chmod(0o755)
    env = {
        **os.environ,
        "CXX": str(fake),
        "KERAS_RESIDUAL_CACHE_DIR": str(tmp_path / "cache"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "KERAS_BACKEND": "numpy",  # imports no framework: a faster child
    }
    first = _run_core(env)
    assert "compiling the NumPy module" in first.stderr  # the first-use message
    assert count.read_text().count("compile") == 1
    second = _run_core(env)
    assert count.read_text().count("compile") == 1  # no second compile
    assert "compiling" not in second.stderr
    reason = [line for line in second.stdout.splitlines() if line.startswith("REASON")][0]
    assert "kernels.cpp:7:3: error: simulated compiler error" in reason
    assert "build.log" in reason and "--force" in reason
    log = Path(reason.split("full log: ")[1].split(" ")[0])
    assert "first a warning" in log.read_text()  # the whole log is kept
