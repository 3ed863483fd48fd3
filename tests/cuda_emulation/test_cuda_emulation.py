"""The CUDA kernels of csrc/cuda/kernels.cu, run on CPU threads.

The unmodified kernel source is compiled by the host C++ compiler against
the emulation of cuda_emu.h (threads of a block = OS threads, __syncthreads =
std::barrier, warp shuffles through per-warp barriers) and driver.cpp runs
every entry point of kernels_cuda.h against the CPU kernels and a float64
reference (see README.md). Builds: plain -O1; AddressSanitizer +
UndefinedBehaviorSanitizer; ThreadSanitizer (fewer cases). A mutated copy of
the kernels must make the checks fail.

    python -m pytest -m cuda_emulation tests/cuda_emulation
"""

import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("cuda_emulation_harness", HERE / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

CXX = harness.compiler()
pytestmark = pytest.mark.cuda_emulation
needs_cxx = pytest.mark.skipif(
    CXX is None,
    reason="cuda_emulation: no host C++ compiler (c++, g++ or $CXX) to build the emulation",
)

# driver arguments per build: the sanitizer builds run fewer cases.
RUNS = {
    "plain": [],
    "asan": ["--quick", "--sms", "3"],
    "tsan": ["--quick", "--sms", "2"],
}
TIMEOUT = 1200


MUTATION_TARGET, MUTATION = "s1 += d;", "s1 -= d;"  # Element::stats: the sign of the sum


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """builds(key) -> the built executable for "plain", "asan", "tsan" or
    "mutation"; skips where the variant's compiler or sanitizer runtime is
    missing. One compile at a time, in the background: while a test runs one
    build, the next is compiled."""
    root = tmp_path_factory.mktemp("cuda_emulation")

    def variant(name):
        why = harness.sanitizer_available(name, root / f"probe_{name}")
        if why:
            return "skip", why
        try:
            return "ok", harness.build(root / name, name, cpu_obj=cpu_obj)
        except harness.BuildError as e:
            return "error", str(e)

    def mutation():
        kind, value = futures["plain"].result()
        if kind != "ok":
            return kind, value
        text = harness.KERNELS.read_text()
        if MUTATION_TARGET not in text:
            return "error", (
                f"the mutation target {MUTATION_TARGET!r} (Element::stats) is gone from "
                f"{harness.KERNELS}: update test_a_mutated_kernel_fails"
            )
        mutated = root / "mutated" / "kernels.cu"
        mutated.parent.mkdir()
        mutated.write_text(text.replace(MUTATION_TARGET, MUTATION, 1))
        try:
            exe = harness.build(
                root / "mutated" / "build",
                "plain",
                kernels=mutated,
                cpu_obj=cpu_obj,
                driver_obj=root / "plain" / "driver.o",
                flags=["-O0"],
            )
            return "ok", exe
        except harness.BuildError as e:
            return "error", str(e)

    why = harness.sanitizer_available("plain", root / "probe_plain")
    if why:
        pytest.skip(f"cuda_emulation: {why}")
    cpu_obj = harness.cpu_object(root / "cpu")
    pool = ThreadPoolExecutor(max_workers=1)
    futures = {"plain": pool.submit(variant, "plain")}
    futures["mutation"] = pool.submit(mutation)
    futures["asan"] = pool.submit(variant, "asan")
    futures["tsan"] = pool.submit(variant, "tsan")

    def get(key):
        kind, value = futures[key].result()
        if kind == "skip":
            pytest.skip(f"cuda_emulation {key}: {value}")
        if kind == "error":
            pytest.fail(f"the {key} build failed:\n{value}", pytrace=False)
        return value

    yield get
    pool.shutdown(wait=True, cancel_futures=True)


def run_driver(exe, variant, args):
    r = harness.run_exe([str(exe), *args], variant, timeout=TIMEOUT)
    log = (r.stdout + r.stderr)[-20000:]
    return r, harness.parse_summary(r.stdout), log


def assert_passed(r, summary, log):
    assert summary, f"no summary line (exit status {r.returncode}):\n{log}"
    assert r.returncode == 0, log
    assert summary["failures"] == 0, log
    assert summary["checks"] > 0, log
    assert "emulation errors" in log and " 0 emulation errors" in log, log
    for marker in ("ERROR: AddressSanitizer", "runtime error:", "WARNING: ThreadSanitizer"):
        assert marker not in log, log


def test_launch_rewrite_keeps_the_kernels():
    """The build-time copy differs from kernels.cu in its launches only: the
    same lines, every line without a launch unchanged."""
    text = harness.KERNELS.read_text()
    out, launches = harness.rewrite_launches(text)
    assert launches == text.count("<<<") > 0
    assert "<<<" not in out and ">>>" not in out
    before, after = text.splitlines(), out.splitlines()
    assert len(before) == len(after)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert len(changed) == launches
    assert all("<<<" in before[i] and "::emu::launch(" in after[i] for i in changed)


def test_launch_rewrite_forms():
    src = "k<<<g, b>>>();\nns::f<T, U<2>><<<dim3(1, 2), 256, 0, st>>>(a,\n    b);\n"
    out, n = harness.rewrite_launches(src)
    assert n == 2
    assert out == (
        "::emu::launch(k, ::emu::LaunchConfig(g, b));\n"
        "::emu::launch(ns::f<T, U<2>>, ::emu::LaunchConfig(dim3(1, 2), 256, 0, st), a,\n    b);\n"
    )


@needs_cxx
def test_nonfinite_inputs(builds):
    """NaN and +-inf inputs give the NaN / inf pattern of the composite Keras
    path (forward: IEEE propagation, relu(NaN) = NaN; backward: each
    GradRule)."""
    r, summary, log = run_driver(builds("plain"), "plain", ["--nonfinite"])
    assert_passed(r, summary, log)


@needs_cxx
def test_a_mutated_kernel_fails(builds):
    """The harness is not vacuous: flipping the sign of the statistics' sum
    (MUTATION_TARGET -> MUTATION) in a copy of kernels.cu makes the checks
    fail."""
    exe = builds("mutation")
    r, summary, log = run_driver(exe, "plain", ["--quick", "--filter", "batch_stats"])
    assert summary, log
    assert r.returncode == 1, log
    assert summary["checks"] > 0 and summary["failures"] > 0, log
    assert "FAIL batch_stats" in log and "cuda mean" in log, log


@needs_cxx
@pytest.mark.parametrize("variant", list(RUNS))
def test_kernels_match_cpu_and_reference(builds, variant):
    """Every entry point x dtype x layout x activation x residual, finite
    inputs: CUDA == CPU == float64 reference within the dtype's rounding; no
    sanitizer report."""
    r, summary, log = run_driver(builds(variant), variant, RUNS[variant])
    assert_passed(r, summary, log)
    if variant == "plain":
        assert summary["checks"] > 1_000_000, log
