"""``python -m keras_residual build``: compile the native libraries ahead of time."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
import time
from pathlib import Path

from keras_residual import native
from keras_residual.native import _build

# What `--backend all` builds, with the module each needs installed.
TARGETS = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}
# The adapters with CUDA kernels, and the module of each that knows their state.
CUDA = {"torch": "_torch", "jax": "_jax"}


def build(backend: str, force: bool = False, cuda: bool | None = None) -> int:
    """Builds `backend` ("tensorflow", "torch", "jax" or "all") and the NumPy core module.

    Prints, per library, what is built, the elapsed time and where its log
    is. Returns the exit status: 0 if every requested library is built (or
    cached), 1 if any failed.
    """
    _build.announce_first_use = False
    if backend == "all":
        wanted = [name for name, module in TARGETS.items() if importlib.util.find_spec(module)]
        skipped = [name for name in TARGETS if name not in wanted]
    else:
        wanted, skipped = [backend], []
    targets = [*wanted, "core"]
    for name in skipped:
        print(f"{name}: skipped ({TARGETS[name]} is not installed)")
    try:
        print(f"cache: {_build.cache_dir()}  (cpu kernels: -march={_build.cpu_arch()})")
    except (native.NativeUnavailable, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    failed = 0
    for index, name in enumerate(targets, 1):
        label = "core (NumPy module)" if name == "core" else name
        print(f"[{index}/{len(targets)}] {label}: building ...", flush=True)
        started, wall_started = time.monotonic(), time.time()
        try:
            with _heartbeat(label, started):
                path = native.build(name, force=force, cuda=cuda if name in CUDA else None)
        except native.BuildFailed as error:
            failed += 1
            print(
                f"[{index}/{len(targets)}] {label}: FAILED after "
                f"{time.monotonic() - started:.1f} s: {error.first_error}\n"
                f"    log: {error.log}",
                file=sys.stderr,
            )
            continue
        except (native.NativeUnavailable, ValueError) as error:
            failed += 1
            print(f"[{index}/{len(targets)}] {label}: FAILED: {error}", file=sys.stderr)
            continue
        record = _build.read_record(path)
        elapsed = time.monotonic() - started
        how = "compiled" if _written_since(path, wall_started) else "found in the cache"
        extra = ""
        if name in CUDA:
            state = importlib.import_module(f"keras_residual.native.{CUDA[name]}").status()
            extra = (
                f", CUDA for {state['cuda_archs']}"
                if state["cuda_compiled"]
                else f", CPU only ({state['cuda_reason']})"
            )
        print(
            f"[{index}/{len(targets)}] {label}: {how} in {elapsed:.1f} s"
            f" (build took {record.get('build_seconds', '?')} s{extra})\n"
            f"    library: {path}\n    log: {path.parent / _build.LOG_FILE}",
            flush=True,
        )
    return 1 if failed else 0


def _written_since(library: Path, wall_started: float) -> bool:
    try:
        return (library.parent / _build.INFO_FILE).stat().st_mtime >= wall_started - 1
    except OSError:
        return False


@contextlib.contextmanager
def _heartbeat(label: str, started: float, every: float = 15.0):
    """Prints the elapsed time every `every` seconds while a build runs."""
    done = threading.Event()

    def beat():
        while not done.wait(every):
            print(f"    {label}: still compiling, {time.monotonic() - started:.0f} s", flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
