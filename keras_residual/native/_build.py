"""Compile-on-first-use with a cache that survives concurrent and failed builds.

The native libraries are compiled on the machine that uses them, against the
framework version actually installed, so their ABI always matches. Each one
is cached under ``cache_dir()`` in a folder named by its target, framework
version and a hash of everything that goes into it (sources, every header
under ``csrc/include``, compiler, flags). A cache entry holds the library, the
whole compiler log (``build.log``) and a ``build_info.json`` record of the
inputs, the outcome and the library's own SHA-256.

Faults it survives:

- Two processes (or threads) building at once: an exclusive file lock per
  entry; the second waits, then finds the first one's library.
- A build killed halfway: the compiler writes into a scratch folder and the
  library is renamed into place only once complete, then its record; an entry
  without a matching record is never loaded.
- A corrupt, truncated or foreign library: its recorded versions, source hash
  and SHA-256 must match, or it is rebuilt.
- A failed build: recorded under the same key as a success, with the first
  ``error:`` line and the log, so later processes fall back at once instead
  of compiling again. It is retried when the sources, flags, compiler or
  framework version change, or with ``python -m keras_residual build --force``.
- A cache another local user could write: a library is loaded only from a
  folder that the current user owns and that group and others cannot write,
  under parents that nobody else can rename it in. A folder that fails is
  never loaded from (`UntrustedCache`).
- A missing or unwritable cache folder: ``<tmp>/keras_residual-cache-<uid>``
  is used instead, after the same ownership check (it is never trusted by
  its name alone).

Portability: sources that include framework headers (TensorFlow, torch,
Python) compile with the framework's own flags and no ``-march``; the CPU
kernels compile in their own translation unit for the host's vector ISA
(``-march=native``, or ``$KERAS_RESIDUAL_CPU_ARCH`` for a given target).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
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
LOG_FILE = "build.log"
FORMAT = 2  # bump when the layout of a cache entry changes
ARCH_VARIABLE = "KERAS_RESIDUAL_CPU_ARCH"


class NativeUnavailable(RuntimeError):
    """The native path cannot be used here; the message says why."""


class BuildFailed(NativeUnavailable):
    """Compiling failed (now or in an earlier process); the log is kept.

    Attributes:
        first_error: the compiler's first ``error:`` line (or the best
            summary of the failure).
        log: path of the whole compiler log, or None.
    """

    def __init__(self, message: str, first_error: str, log: Path | None):
        super().__init__(message)
        self.first_error = first_error
        self.log = log


class UntrustedCache(NativeUnavailable):
    """The cache folder could be written by someone else: nothing is loaded from it."""


# -- the cache folder -------------------------------------------------------------


def cache_dir() -> Path:
    """The folder that holds the compiled libraries, checked to be private.

    ``$KERAS_RESIDUAL_CACHE_DIR``, by default ``$XDG_CACHE_HOME/keras_residual``
    (``~/.cache/keras_residual``). If it cannot be created or written,
    ``<tmp>/keras_residual-cache-<uid>`` is used instead. Whichever is chosen
    must be owned by the current user and not writable by group or others,
    and so must every parent up to the root be (or be owned by root and, if
    writable by others, sticky, as ``/tmp`` is).

    Raises:
        UntrustedCache: the folder fails that check; the message names it.
        NativeUnavailable: no folder can be created or written.
    """
    configured = os.environ.get("KERAS_RESIDUAL_CACHE_DIR")
    preferred = Path(configured).expanduser() if configured else _default_cache_dir()
    for folder in (preferred, _fallback_cache_dir()):
        if _make_private_dir(folder):
            check_private(folder)
            return folder
    raise NativeUnavailable(
        f"no writable cache folder: neither {preferred} nor {_fallback_cache_dir()} "
        "can be created and written"
    )


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "keras_residual"


def _fallback_cache_dir() -> Path:
    user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"keras_residual-cache-{user}"


def _make_private_dir(path: Path) -> bool:
    """Creates `path` and its missing parents; whether it is a writable folder."""
    try:
        # Every folder made here is private (0o700), parents included, so a
        # permissive umask cannot open the cache to the group.
        missing = []
        for folder in (path, *path.parents):
            if folder.exists():
                break
            missing.append(folder)
        for folder in reversed(missing):
            folder.mkdir(mode=0o700, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
        return True
    except OSError:
        return False


def check_private(path: Path) -> None:
    """Raises UntrustedCache unless only the current user can change `path`.

    `path` itself must be owned by the current user and not writable by group
    or others. Each parent must be owned by the current user or root and, if
    writable by group or others, carry the sticky bit (so nobody else can
    rename `path` away and put their own folder there). Symbolic links are
    followed. Without POSIX users (Windows) nothing is checked.
    """
    if not hasattr(os, "getuid"):  # pragma: no cover - not POSIX
        return
    uid = os.getuid()
    path = Path(path)
    try:
        real = path.resolve(strict=True)
        info = os.stat(real)
    except OSError as error:
        raise UntrustedCache(f"cache folder {path} cannot be checked: {error}") from error
    problems = []
    if info.st_uid != uid:
        problems.append(f"it is owned by uid {info.st_uid}, not by this user (uid {uid})")
    if info.st_mode & 0o022:
        problems.append(f"group or others can write it (mode {stat.filemode(info.st_mode)})")
    for parent in real.parents:
        try:
            parent_info = os.stat(parent)
        except OSError:
            continue
        if parent_info.st_uid not in (uid, 0):
            problems.append(f"its parent {parent} is owned by uid {parent_info.st_uid}")
        elif parent_info.st_mode & 0o022 and not parent_info.st_mode & stat.S_ISVTX:
            problems.append(
                f"its parent {parent} is writable by group or others without the sticky bit "
                f"(mode {stat.filemode(parent_info.st_mode)})"
            )
    if problems:
        raise UntrustedCache(
            f"refusing to load native libraries from {path}: {'; '.join(problems)}. "
            "Use a private folder (chmod go-w, or set KERAS_RESIDUAL_CACHE_DIR)"
        )


def _check_private_file(path: Path) -> None:
    if not hasattr(os, "getuid"):  # pragma: no cover - not POSIX
        return
    info = os.stat(path)
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise UntrustedCache(
            f"refusing to load {path}: it is owned by uid {info.st_uid} with mode "
            f"{stat.filemode(info.st_mode)}; only this user may be able to write it"
        )


# -- keys and records -------------------------------------------------------------


def source_hash(sources: list[Path], extra_key: str = "") -> str:
    """SHA-256 of the sources, every header under csrc (.h, .cuh) and extra_key."""
    digest = hashlib.sha256()
    headers = sorted([*CSRC.rglob("*.h"), *CSRC.rglob("*.cuh")]) if CSRC.is_dir() else []
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


@dataclass(frozen=True)
class Plan:
    """Where a library with these inputs lives in the cache, and its expected record."""

    target: str
    entry: Path
    library: Path
    expected: dict

    @property
    def log(self) -> Path:
        return self.entry / LOG_FILE


def plan(
    target: str,
    sources: list[Path],
    framework_version: str,
    extra_key: str = "",
    suffix: str = ".so",
) -> Plan:
    """The cache entry of a library built from exactly these inputs.

    Raises:
        NativeUnavailable: a source is missing, or no cache folder can be used.
    """
    missing = [str(path) for path in sources if not Path(path).is_file()]
    if missing:
        raise NativeUnavailable(f"native sources not found: {', '.join(missing)}")
    key = source_hash(sources, extra_key)
    entry = cache_dir() / _entry_name(target, framework_version, key)
    expected = {
        "format": FORMAT,
        "target": target,
        "framework_version": framework_version,
        "python": sys.version.split()[0],
        "source_hash": key,
    }
    return Plan(target, entry, entry / f"lib{target}{suffix}", expected)


def read_record(library: Path) -> dict:
    """The build record beside a cached library (empty if unreadable)."""
    return _read_json(Path(library).parent / INFO_FILE)


def _read_json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _lookup(build: Plan) -> str | None:
    """ "ok" for a complete matching library, "failed" for a recorded failure, else None."""
    record = _read_json(build.entry / INFO_FILE)
    if not record or any(record.get(k) != v for k, v in build.expected.items()):
        return None
    if record.get("status") == "failed":
        return "failed"
    try:
        if build.library.is_file() and file_hash(build.library) == record.get("library_sha256"):
            return "ok"
    except OSError:
        pass
    return None


def _failure(build: Plan, record: dict) -> BuildFailed:
    first_error = record.get("error") or "unknown error"
    log = build.log if build.log.is_file() else None
    where = f"; full log: {log}" if log else ""
    return BuildFailed(
        f"building the {build.target} library failed: {first_error}{where} "
        f"(not retried until the sources, flags, compiler or framework change, "
        f"or `python -m keras_residual build --force`)",
        first_error,
        log,
    )


def first_error(log_text: str, fallback: str = "") -> str:
    """The first ``error:`` line of a compiler log, else the last line or `fallback`."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    for line in lines:
        if re.search(r"\berror\b\s*:|\bError\b:", line) and not line.startswith("$ "):
            return line[:500]
    tail = [line for line in lines if not line.startswith(("$ ", "# "))]
    if tail:
        return tail[-1][:500]
    fallback = fallback.strip().splitlines()
    return fallback[0][:500] if fallback else "unknown error"


# -- building ---------------------------------------------------------------------


@contextlib.contextmanager
def _locked(lock_path: Path, timeout: float = 1800.0):
    """An exclusive lock held across processes and threads (flock; released if we die)."""
    with _thread_lock(lock_path):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: threads only
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
                            f"timed out after {timeout:.0f} s waiting for another build "
                            f"({lock_path})"
                        ) from error
                    time.sleep(0.2)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _thread_lock(path: Path) -> threading.Lock:
    # flock is per open file description: two threads of one process opening
    # the lock file separately would each get it. A process-wide lock per
    # entry serialises them first.
    with _thread_locks_guard:
        return _thread_locks.setdefault(str(path), threading.Lock())


_announced: set = set()
# The first-use message; `python -m keras_residual build` reports for itself.
announce_first_use = True


def _announce(build: Plan, description: str, estimate: str) -> None:
    """Says once per library and process, on stderr, that a compile starts."""
    if build.target in _announced or not announce_first_use:
        return
    _announced.add(build.target)
    sys.stderr.write(
        f"keras_residual: compiling {description} on first use (about {estimate}, once); "
        f"cached in {build.entry}. `python -m keras_residual build` does this ahead of time.\n"
    )
    sys.stderr.flush()


def build_library(
    target: str,
    sources: list[Path],
    framework_version: str,
    compile: Callable[[Path, Path], None],
    extra_key: str = "",
    suffix: str = ".so",
    rebuild: bool = False,
    description: str | None = None,
    estimate: str = "a minute",
) -> Path:
    """Returns the path of a complete, verified library, compiling it if needed.

    Args:
        target: short name of the library, such as `"core"` or `"torch"`.
        sources: the files compiled into it (hashed into the cache key).
        framework_version: the version of the framework it is compiled
            against (part of the cache key and of the record).
        compile: `compile(out_path, build_dir)` writes the finished library
            to exactly `out_path`, using the empty `build_dir` for anything
            else, and raises on failure. `run_compiler(..., cwd=build_dir)`
            appends each command and its output to the log.
        extra_key: anything else that changes the binary (flags, CUDA archs).
        suffix: the library's file suffix.
        rebuild: compile even if the cache holds a valid library or a
            recorded failure (`build --force`, or a library that did not load).
        description: what is compiled, for the first-use message.
        estimate: about how long it takes, for the first-use message.

    Returns:
        The path of the library in the cache.

    Raises:
        BuildFailed: compiling failed, now or in an earlier process with the
            same inputs; the message has the first error and the log's path.
        UntrustedCache: the cache folder could be written by someone else.
        NativeUnavailable: the sources are missing or no cache folder works.
    """
    build = plan(target, sources, framework_version, extra_key, suffix)
    if not rebuild:
        found = _ready(build)
        if found is not None:
            return found
    root = build.entry.parent
    with _locked(root / f"{build.entry.name}.lock"):
        # Another process may have finished (or failed) while we waited.
        if not rebuild:
            found = _ready(build)
            if found is not None:
                return found
        build.entry.mkdir(mode=0o700, exist_ok=True)
        check_private(build.entry)
        with contextlib.suppress(OSError):
            (build.entry / INFO_FILE).unlink()
        _announce(build, description or f"the native {target} library", estimate)
        scratch = Path(tempfile.mkdtemp(prefix=f".build-{target}-", dir=root))
        try:
            return _compile_into(build, compile, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def build_with_cuda_fallback(
    build: Callable[..., Path], cuda_planned: bool, state: dict, part: str
) -> Path:
    """`build()`, and if that fails with the CUDA `part` in, `build(cuda=False)`.

    The CUDA part may be what failed: the CPU library is still worth having.
    `state["cuda_reason"]` then says why CUDA is left out.
    """
    try:
        return build()
    except NativeUnavailable as error:
        if not cuda_planned:
            raise
        path = build(cuda=False)
        state["cuda_reason"] = f"compiling the CUDA {part} failed: {error}"
        return path


def _ready(build: Plan) -> Path | None:
    """The library if the entry holds a good one; raises for a recorded failure."""
    state = _lookup(build)
    if state == "failed":
        raise _failure(build, _read_json(build.entry / INFO_FILE))
    if state == "ok":
        check_private(build.entry)
        _check_private_file(build.library)
        return build.library
    return None


def _compile_into(build: Plan, compile: Callable[[Path, Path], None], scratch: Path) -> Path:
    out_path = scratch / build.library.name
    log = scratch / LOG_FILE
    started = time.monotonic()
    error: Exception | None = None
    try:
        compile(out_path, scratch)
        if not out_path.is_file():
            error = NativeUnavailable(f"the build produced no {out_path.name}")
    except Exception as caught:  # noqa: BLE001 - every failure means "no native"
        error = caught
    record = {
        **build.expected,
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if error is not None and not log.is_file():
        log.write_text(f"{type(error).__name__}: {error}\n")
    if log.is_file():
        shutil.copyfile(log, build.log)
    if error is not None:
        text = log.read_text(errors="replace")
        record.update(status="failed", error=first_error(text, str(error)))
        _write_record(build, record, scratch)
        raise _failure(build, record) from error
    out_path.chmod(0o755)
    record.update(status="ok", library_sha256=file_hash(out_path))
    # Library first, record last: a record always describes a complete library.
    os.replace(out_path, build.library)
    _write_record(build, record, scratch)
    return build.library


def _write_record(build: Plan, record: dict, scratch: Path) -> None:
    record_tmp = scratch / INFO_FILE
    record_tmp.write_text(json.dumps(record, indent=1))
    os.replace(record_tmp, build.entry / INFO_FILE)


def run_compiler(
    command: list[str],
    cwd: Path | None = None,
    env: dict | None = None,
    log: Path | None = None,
) -> None:
    """Runs one build command; its command line and output go to the build log.

    The log is `log`, by default ``build.log`` in `cwd` (the scratch folder
    of `build_library`, whose log is kept in the cache entry).

    Raises:
        NativeUnavailable: the command failed; the message has the first
            error line and the tail of the output.
    """
    log = log or (Path(cwd) / LOG_FILE if cwd is not None else None)
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
            timeout=1800,
        )
        output, returncode = (result.stdout + result.stderr).strip(), result.returncode
    except (OSError, subprocess.SubprocessError) as error:
        output, returncode = f"{type(error).__name__}: {error}", None
    if log is not None:
        with open(log, "a") as handle:
            handle.write(f"$ {' '.join(command)}\n{output}\n")
            if returncode != 0:
                handle.write(f"# exit status {returncode}\n")
    if returncode != 0:
        if not output:
            raise NativeUnavailable(
                f"compiler exited with {returncode} and printed nothing ({command[0]})"
            )
        tail = "\n".join(output.splitlines()[-15:])
        raise NativeUnavailable(f"compiler exited with {returncode}: {first_error(output)}\n{tail}")


# -- loading, once per process ----------------------------------------------------


class LoadOnce:
    """An adapter's library, loaded once per process; a failure is remembered.

    Attributes:
        value: what the loader returned, once loaded (else None).
        path: the library's path, once loaded.
        error: why loading failed, once it has.
    """

    def __init__(self, description: str):
        self.description = description
        self.value = None
        self.path: Path | None = None
        self.error: str | None = None
        self._lock = threading.Lock()

    def get(self, loader: Callable[[], tuple[Path, object]]):
        """`loader()`'s value, calling it the first time only.

        `loader` returns `(path, value)`. A failure of any kind is raised as
        NativeUnavailable, now and on every later call, without a second try.
        """
        if self.value is not None:
            return self.value
        with self._lock:
            if self.value is not None:
                return self.value
            if self.error is not None:
                raise NativeUnavailable(self.error)
            try:
                path, value = loader()
            except NativeUnavailable as error:
                self.error = str(error)
                raise
            except Exception as error:  # noqa: BLE001 - any failure means "no native"
                self.error = f"loading {self.description} failed: {type(error).__name__}: {error}"
                raise NativeUnavailable(self.error) from error
            self.path, self.value = path, value
        return self.value

    def status(self, info: dict) -> dict:
        """`info` with `built`, `loaded`, `path`, `build_seconds` and `reason` as known."""
        if self.value is not None:
            info.update(built=True, loaded=True, path=str(self.path))
            record = read_record(self.path)
            if "build_seconds" in record:
                info["build_seconds"] = record["build_seconds"]
        elif self.error is not None:
            info["reason"] = self.error.strip().splitlines()[0]
        else:
            info["reason"] = "not loaded yet (it is compiled on first use)"
        return info


# -- the compiler and the CPU kernels ---------------------------------------------------


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


def check_activation_code(activation: int) -> int:
    """`activation` as an int, if it is one of `ACTIVATION_CODES`' values; else ValueError."""
    codes = sorted(set(ACTIVATION_CODES.values()))
    if isinstance(activation, bool) or int(activation) not in codes:
        raise ValueError(
            f"`activation` must be one of the codes {codes} "
            f"({', '.join(ACTIVATION_CODES)}). Received: activation={activation!r}"
        )
    return int(activation)


def cpu_signature() -> str:
    """The CPU model and flags: libraries built for the host's ISA are keyed on it,
    so a cache shared between machines never mixes CPUs."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name in ("model name", "flags", "Features", "CPU part") and name not in found:
                found[name] = value.strip()
    except OSError:
        pass
    if found:
        return " | ".join(f"{name}: {value}" for name, value in sorted(found.items()))
    return f"{platform.machine()} {platform.processor()}"


def compiler() -> str:
    """The C++ compiler: ``$CXX`` or ``c++``; raises NativeUnavailable if absent."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise NativeUnavailable(f"no C++ compiler found (looked for {name!r}; set CXX)")
    return path


def nvcc() -> str | None:
    """CUDA's compiler: ``$NVCC``, else ``nvcc`` on the PATH, in ``$CUDA_HOME/bin``
    or in ``/usr/local/cuda/bin``; None if none is found."""
    explicit = os.environ.get("NVCC")
    if explicit:
        return shutil.which(explicit)
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") or shutil.which(str(Path(home) / "bin" / "nvcc"))


def compiler_version(executable: str | None = None) -> str:
    try:
        executable = executable or compiler()
        result = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        return result.stdout.splitlines()[0].strip() if result.stdout else "unknown"
    except (NativeUnavailable, OSError, subprocess.SubprocessError):
        return "none"


def cpu_arch() -> str:
    """The ``-march`` of the CPU kernels: ``$KERAS_RESIDUAL_CPU_ARCH`` or ``native``.

    Set it (for example to ``x86-64-v3``) to build, with ``python -m
    keras_residual build``, libraries that run on every CPU of that level,
    for a Docker image or a cluster of mixed machines.

    Raises:
        ValueError: the variable holds something that is not an arch name.
    """
    arch = os.environ.get(ARCH_VARIABLE, "").strip() or "native"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", arch):
        raise ValueError(f"`{ARCH_VARIABLE}` must be a -march name. Received: {arch!r}")
    return arch


def kernel_flags() -> list[str]:
    """Flags of the framework-free CPU kernels: the host's vector ISA, or cpu_arch()."""
    return ["-std=c++17", "-O3", "-fPIC", "-pthread", f"-march={cpu_arch()}"]


def kernel_key() -> str:
    """What the compiled CPU kernels depend on besides their sources."""
    arch = cpu_arch()
    return " ".join([*kernel_flags(), cpu_signature() if arch == "native" else ""])


def kernel_sources() -> list[Path]:
    """The framework-free CPU kernel sources (compiled in their own translation unit)."""
    return sorted((CSRC / "cpu").glob("*.cpp"))


def compile_kernels(build_dir: Path, extra_flags: list[str] | None = None) -> list[Path]:
    """Compiles the CPU kernels into object files in `build_dir`, for the host ISA.

    They include no framework header, so they can take ``-march`` safely;
    the adapters' own sources never do (TensorFlow's Eigen, for one, does not
    compile under ``-march=native`` on CPUs with AVX-512 FP16).
    """
    objects = []
    for source in kernel_sources():
        obj = Path(build_dir) / f"kernels_{source.stem}.o"
        run_compiler(
            [
                compiler(),
                *kernel_flags(),
                *(extra_flags or []),
                f"-I{CSRC / 'include'}",
                "-c",
                str(source),
                "-o",
                str(obj),
            ],
            cwd=build_dir,
        )
        objects.append(obj)
    return objects
