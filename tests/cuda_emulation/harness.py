"""Builds and runs the CUDA-on-CPU emulation of csrc/cuda/kernels.cu.

The kernel source is copied into the build folder with one textual change,
the launch syntax: ``kernel<<<grid, block, shmem, stream>>>(args)`` becomes
``::emu::launch(kernel, ::emu::LaunchConfig(grid, block, shmem, stream),
args)``. Everything else (the kernel bodies included) is byte for byte the
repository file, compiled by the host C++ compiler with the shims of
``include/`` (cuda_emu.h) in place of the CUDA headers, and linked with the
CPU kernels (csrc/cpu/kernels.cpp) and driver.cpp.

Command line (from the repository root)::

    python tests/cuda_emulation/harness.py [--variant plain|asan|tsan]
        [--kernels PATH] [--build DIR] [-- DRIVER ARGS...]

builds, runs ``driver`` with DRIVER ARGS and exits with its status.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KERNELS = ROOT / "csrc" / "cuda" / "kernels.cu"
CPU_KERNELS = ROOT / "csrc" / "cpu" / "kernels.cpp"
DRIVER = HERE / "driver.cpp"
EMU_HEADERS = [HERE / "cuda_emu.h", *sorted((HERE / "include").glob("*.h"))]

# Build variants: optimisation, sanitizers, debug info (line numbers in
# sanitizer reports).
VARIANTS = {
    "plain": ["-O1"],
    # -O0: half the compile time of -O1, and the runs are bound by thread
    # switches, not by the instrumented code.
    "asan": [
        "-O0",
        "-g1",
        "-fno-omit-frame-pointer",
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
    ],
    "tsan": ["-O1", "-g1", "-fsanitize=thread"],
}
WARNINGS = [
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    # the kernels' per-channel arrays are loaded on a loop's first iteration,
    # which g++ cannot see
    "-Wno-maybe-uninitialized",
]
# The CPU kernels are the comparison, not the code under test: built once,
# without sanitizers, and linked into every variant.
CPU_FLAGS = ["-O0"]


def compiler() -> str | None:
    explicit = os.environ.get("CXX")
    if explicit:
        return shutil.which(explicit)
    return shutil.which("c++") or shutil.which("g++")


def rewrite_launches(text: str) -> tuple[str, int]:
    """Rewrites every ``name<targs><<<cfg>>>(`` into ``::emu::launch(name<targs>,
    ::emu::LaunchConfig(cfg), ``; returns the text and the number of launches.

    Newlines are kept, so line numbers stay those of the original file.
    """
    out = []
    pos = 0
    count = 0
    while True:
        start = text.find("<<<", pos)
        if start < 0:
            break
        # The kernel expression before <<<: an identifier with template arguments.
        k = start
        if text[k - 1] == ">":
            depth = 0
            while True:
                k -= 1
                if text[k] == ">":
                    depth += 1
                elif text[k] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        while k > 0 and (text[k - 1].isalnum() or text[k - 1] in "_:"):
            k -= 1
        kernel = text[k:start]
        if not re.fullmatch(r"[\w:]+(<[^;{}]*>)?", kernel, re.S):
            raise ValueError(f"cannot parse the kernel of a launch: {kernel!r}")
        end = text.find(">>>", start)
        if end < 0:
            raise ValueError("unterminated <<<")
        config = text[start + 3 : end]
        m = re.compile(r"\s*\(").match(text, end + 3)
        if not m:
            raise ValueError(f"no argument list after launch of {kernel}")
        after = m.end()
        empty = re.compile(r"\s*\)").match(text, after) is not None
        out.append(text[pos:k])
        out.append(f"::emu::launch({kernel}, ::emu::LaunchConfig({config})")
        out.append(text[end + 3 : after - 1])  # whitespace before '(' (newlines kept)
        out.append("" if empty else ", ")
        pos = after
        count += 1
    out.append(text[pos:])
    return "".join(out), count


def _run(cmd, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("CPATH", "CPLUS_INCLUDE_PATH")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _include_flags(kernels: Path) -> list[str]:
    return [
        # The shims first: <cuda_runtime.h> etc. are the emulation's.
        f"-I{HERE / 'include'}",
        f"-I{ROOT / 'csrc' / 'include'}",
        # kernels.cu's quoted includes, relative to its own folder.
        f"-iquote{Path(kernels).resolve().parent}",
        f"-iquote{ROOT / 'csrc' / 'cuda'}",
    ]


class BuildError(RuntimeError):
    pass


def compile_object(src: Path, obj: Path, flags: list[str], timeout: float = 900) -> Path:
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no host C++ compiler (c++ / g++ / $CXX)")
    cmd = [cxx, "-std=c++20", "-pthread", *WARNINGS, *flags, "-c", str(src), "-o", str(obj)]
    r = _run(cmd, timeout)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return obj


def cpu_object(out_dir: Path) -> Path:
    """csrc/cpu/kernels.cpp, compiled once for every variant."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return compile_object(
        CPU_KERNELS, out_dir / "cpu_kernels.o", [*CPU_FLAGS, f"-I{ROOT / 'csrc' / 'include'}"]
    )


def build(
    out_dir: Path,
    variant: str = "plain",
    kernels: Path = KERNELS,
    cpu_obj: Path | None = None,
    driver_obj: Path | None = None,
    flags: list[str] | None = None,
    timeout: float = 900,
) -> Path:
    """Compiles the emulation of `kernels` (default csrc/cuda/kernels.cu) as
    `variant` into out_dir; returns the driver executable. cpu_obj and
    driver_obj: objects to reuse (built here when None). flags replace the
    variant's flags for the kernels object only."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("no host C++ compiler (c++ / g++ / $CXX)")
    out_dir.mkdir(parents=True, exist_ok=True)
    vflags = VARIANTS[variant]
    text, launches = rewrite_launches(Path(kernels).read_text())
    if launches == 0:
        raise ValueError(f"no <<<...>>> launch in {kernels}")
    src = out_dir / "kernels_emu.cc"
    # #line: diagnostics and sanitizer reports name the original file and lines.
    src.write_text(f'#line 1 "{Path(kernels).resolve()}"\n' + text)
    inc = _include_flags(kernels)
    kobj = compile_object(src, out_dir / "kernels_emu.o", [*(flags or vflags), *inc], timeout)
    if driver_obj is None:
        driver_obj = compile_object(DRIVER, out_dir / "driver.o", [*vflags, *inc], timeout)
    if cpu_obj is None:
        cpu_obj = cpu_object(out_dir)
    exe = out_dir / "driver"
    cmd = [cxx, "-pthread", *vflags, str(kobj), str(driver_obj), str(cpu_obj), "-o", str(exe)]
    r = _run(cmd, timeout)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return exe


PROBE = """#include <barrier>
#include <thread>
int main() {
  std::barrier<> b(2);
  std::thread t([&] { b.arrive_and_wait(); });
  b.arrive_and_wait();
  t.join();
}
"""

# LeakSanitizer needs ptrace, which some containers forbid; then the ASan
# runs go without leak detection rather than not at all.
_detect_leaks = True


def sanitizer_available(variant: str, out_dir: Path) -> str | None:
    """None when a small C++20 threads program builds and runs as this variant,
    else why not (no compiler, no C++20 <barrier>, no sanitizer runtime)."""
    global _detect_leaks
    cxx = compiler()
    if cxx is None:
        return "no host C++ compiler (c++ / g++ / $CXX)"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / "probe.cc"
    src.write_text(PROBE)
    exe = out_dir / "probe"
    r = _run([cxx, "-std=c++20", "-pthread", *VARIANTS[variant], str(src), "-o", str(exe)], 300)
    if r.returncode != 0:
        return (
            f"{cxx} cannot build the {variant} variant (C++20, sanitizer runtime): "
            + (r.stderr.strip()[-400:])
        )
    run = run_exe([str(exe)], variant, timeout=120)
    if run.returncode != 0 and variant == "asan" and "LeakSanitizer" in run.stderr:
        _detect_leaks = False
        run = run_exe([str(exe)], variant, timeout=120)
    if run.returncode != 0:
        return f"{variant} programs do not run here: {(run.stdout + run.stderr).strip()[-400:]}"
    return None


def sanitizer_env(variant: str) -> dict:
    env = dict(os.environ)
    if variant == "tsan":
        env["TSAN_OPTIONS"] = "halt_on_error=1 second_deadlock_stack=1 " + env.get(
            "TSAN_OPTIONS", ""
        )
    elif variant == "asan":
        leaks = 1 if _detect_leaks else 0
        env["ASAN_OPTIONS"] = f"detect_leaks={leaks} " + env.get("ASAN_OPTIONS", "")
        env["UBSAN_OPTIONS"] = "print_stacktrace=1 " + env.get("UBSAN_OPTIONS", "")
    return env


def run_exe(cmd: list[str], variant: str = "plain", timeout: float = 600):
    """Runs a built program. Under TSan, where the runtime refuses the
    address-space layout ("unexpected memory mapping": vm.mmap_rnd_bits above
    what the runtime supports), runs it again under `setarch -R` (no address
    randomisation)."""
    env = sanitizer_env(variant)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if variant == "tsan" and "unexpected memory mapping" in r.stderr:
        setarch = shutil.which("setarch")
        if setarch:
            arch = os.uname().machine
            r = subprocess.run(
                [setarch, arch, "-R", *cmd],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
    return r


def parse_summary(stdout: str) -> dict:
    """The driver's last line: 'emulation: N checks, F failures, ...'."""
    m = re.search(r"^emulation: (\d+) checks, (\d+) failures", stdout, re.M)
    if not m:
        return {}
    return {"checks": int(m.group(1)), "failures": int(m.group(2))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="plain", choices=sorted(VARIANTS))
    parser.add_argument("--kernels", type=Path, default=KERNELS)
    parser.add_argument(
        "--build", type=Path, default=None, help="build folder (default: temporary)"
    )
    parser.add_argument("driver_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    driver_args = [a for a in args.driver_args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.build or Path(tmp)
        try:
            exe = build(out, args.variant, args.kernels)
        except BuildError as e:
            sys.stderr.write(f"{e}\n")
            return 1
        run = run_exe([str(exe), *driver_args], args.variant, timeout=3600)
        sys.stdout.write(run.stdout)
        sys.stderr.write(run.stderr)
        return run.returncode


if __name__ == "__main__":
    sys.exit(main())
