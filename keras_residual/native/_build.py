"""Compile-on-first-use with a cache that survives concurrent and failed builds.

The native libraries are compiled on the machine that uses them, against the
framework version actually installed, so their ABI always matches. Each one
is cached under ``cache_dir()`` in a folder named by its target, framework
version and a hash of everything that goes into it (sources, every header
under ``csrc/include``, compiler, flags). A cache entry is a library plus a
``build_info.json`` that records those and the library's own SHA-256.

Faults it survives:

- Two processes building at once: an exclusive file lock per entry; the
  second waits, then finds the first one's library.
- A build killed halfway: the compiler writes into a scratch folder and the
  library is renamed into place only once complete, then its record; an entry
  without a matching record is never loaded.
- A corrupt, truncated or foreign library: its recorded versions, source hash
  and SHA-256 must match, or it is rebuilt.
- A read-only or missing cache folder: a per-user temporary folder is used
  instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def _find_csrc() -> Path:
    # An installed package carries the sources as keras_residual/_csrc; a
    # source checkout has them at the repository root.
    for candidate in (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc"):
        if (candidate / "include" / "keras_residual" / "kernels.h").is_file():
            return candidate
    return _PACKAGE.parent / "csrc"


CSRC = _find_csrc()
INFO_FILE = "build_info.json"
FORMAT = 1  # bump when the layout of a cache entry changes


class NativeUnavailable(RuntimeError):
    """The native path cannot be used here; the message says why."""


def cache_dir() -> Path:
    """The folder that holds the compiled libraries.

    ``$KERAS_RESIDUAL_CACHE_DIR``, by default ``~/.cache/keras_residual``. If
    it cannot be created or written, a per-user folder under the system's
    temporary folder is used instead.
    """
    configured = os.environ.get("KERAS_RESIDUAL_CACHE_DIR")
    preferred = Path(configured).expanduser() if configured else _default_cache_dir()
    if _writable_dir(preferred):
        return preferred
    fallback = Path(tempfile.gettempdir()) / f"keras_residual-cache-{_user_id()}"
    if _writable_dir(fallback):
        return fallback
    raise NativeUnavailable(
        f"no writable cache folder: neither {preferred} nor {fallback} can be written"
    )


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "keras_residual"


def _user_id() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def source_hash(sources: list[Path], extra_key: str = "") -> str:
    """SHA-256 of the sources, every header under csrc/include and extra_key."""
    digest = hashlib.sha256()
    headers = sorted((CSRC / "include").rglob("*.h")) if (CSRC / "include").is_dir() else []
    for path in [*sorted(Path(p) for p in sources), *headers]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(extra_key.encode())
    digest.update(f"format={FORMAT}".encode())
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _entry_name(target: str, framework_version: str, key: str) -> str:
    safe_version = re.sub(r"[^A-Za-z0-9.+_-]", "_", framework_version)
    return f"{target}-{safe_version}-py{sys.version_info[0]}{sys.version_info[1]}-{key[:16]}"


def _read_valid(entry: Path, library: Path, expected: dict) -> bool:
    """Whether entry holds a complete library built from exactly `expected`."""
    try:
        record = json.loads((entry / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict):
        return False
    if any(record.get(name) != value for name, value in expected.items()):
        return False
    try:
        return library.is_file() and file_hash(library) == record.get("library_sha256")
    except OSError:
        return False


@contextlib.contextmanager
def _locked(lock_path: Path, timeout: float = 1800.0):
    """An exclusive lock held across processes (flock; released if we die)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(lock_path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as error:
                if time.monotonic() > deadline:
                    raise NativeUnavailable(
                        f"timed out after {timeout:.0f} s waiting for another build ({lock_path})"
                    ) from error
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_library(
    target: str,
    sources: list[Path],
    framework_version: str,
    compile: Callable[[Path, Path], None],
    extra_key: str = "",
    suffix: str = ".so",
    rebuild: bool = False,
) -> Path:
    """Returns the path of a complete, verified library, compiling it if needed.

    Args:
        target: short name of the library, such as `"core"` or `"torch"`.
        sources: the files compiled into it (hashed into the cache key).
        framework_version: the version of the framework it is compiled
            against (part of the cache key and of the record).
        compile: `compile(out_path, build_dir)` writes the finished library
            to exactly `out_path`, using the empty `build_dir` for anything
            else, and raises on failure.
        extra_key: anything else that changes the binary (flags, CUDA archs).
        suffix: the library's file suffix.
        rebuild: compile even if the cache holds a valid library (used when
            loading a cached library failed).

    Returns:
        The path of the library in the cache.

    Raises:
        NativeUnavailable: the sources are missing, no cache folder can be
            written, or compiling failed (the message carries the reason).
    """
    missing = [str(path) for path in sources if not Path(path).is_file()]
    if missing:
        raise NativeUnavailable(f"native sources not found: {', '.join(missing)}")
    key = source_hash(sources, extra_key)
    root = cache_dir()
    entry = root / _entry_name(target, framework_version, key)
    library = entry / f"lib{target}{suffix}"
    expected = {
        "format": FORMAT,
        "target": target,
        "framework_version": framework_version,
        "python": sys.version.split()[0],
        "source_hash": key,
    }
    if not rebuild and _read_valid(entry, library, expected):
        return library
    with _locked(root / f"{entry.name}.lock"):
        # Another process may have finished the build while we waited.
        if not rebuild and _read_valid(entry, library, expected):
            return library
        entry.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            (entry / INFO_FILE).unlink()
        scratch = Path(tempfile.mkdtemp(prefix=f".build-{target}-", dir=root))
        try:
            out_path = scratch / library.name
            started = time.monotonic()
            try:
                compile(out_path, scratch)
            except NativeUnavailable:
                raise
            except Exception as error:  # noqa: BLE001 - every failure means "no native"
                raise NativeUnavailable(f"building the {target} library failed: {error}") from error
            if not out_path.is_file():
                raise NativeUnavailable(
                    f"building the {target} library produced no {out_path.name}"
                )
            record = {
                **expected,
                "library_sha256": file_hash(out_path),
                "build_seconds": round(time.monotonic() - started, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            # Library first, record last: a record always describes a
            # complete library.
            os.replace(out_path, library)
            record_tmp = scratch / INFO_FILE
            record_tmp.write_text(json.dumps(record, indent=1))
            os.replace(record_tmp, entry / INFO_FILE)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return library


def read_record(library: Path) -> dict:
    """The build record beside a cached library (empty if unreadable)."""
    try:
        return json.loads((Path(library).parent / INFO_FILE).read_text())
    except (OSError, ValueError):
        return {}


# The codes of keras_residual::Activation (csrc/include/keras_residual/kernels.h).
ACTIVATION_CODES = {
    "linear": 0,
    "relu": 1,
    "leaky_relu": 2,
    "relu6": 3,
    "silu": 4,
    "swish": 4,
    "gelu": 5,
}


def cpu_signature() -> str:
    """The CPU model and flags: libraries built with -march=native are keyed on it,
    so a cache shared between machines never mixes CPUs."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def compiler() -> str:
    """The C++ compiler: ``$CXX`` or ``c++``; raises NativeUnavailable if absent."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise NativeUnavailable(f"no C++ compiler found (looked for {name!r}; set CXX)")
    return path


def compiler_version(executable: str | None = None) -> str:
    import subprocess

    try:
        executable = executable or compiler()
        result = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        return result.stdout.splitlines()[0].strip() if result.stdout else "unknown"
    except (NativeUnavailable, OSError, subprocess.SubprocessError):
        return "none"


def run_compiler(command: list[str], cwd: Path | None = None) -> None:
    """Runs a compiler command; raises with the tail of its output on failure."""
    import subprocess

    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False, timeout=1800
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()
        tail = "\n".join(output[-15:])
        raise NativeUnavailable(f"compiler exited with {result.returncode}:\n{tail}")
