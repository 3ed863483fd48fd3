"""The keras_residual:: torch ops against plain torch float64 references.

Covers forward and backward of the training op and of the epilogue for every
activation, with and without residual, in both layouts and all four dtypes;
gradcheck, opcheck and torch.compile; CUDA against the CPU kernels when a GPU
is present.
"""

import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="the torch ops need torch installed")

from keras_residual.native import _build, _torch  # noqa: E402

ACTIVATIONS = {"linear": 0, "relu": 1, "leaky_relu": 2, "relu6": 3, "silu": 4, "gelu": 5}
ALPHA = 0.3
EPSILON = 1e-3
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch")


@pytest.fixture(scope="module")
def ops():
    """The loaded ops (built once per cache; skips with the reason if impossible)."""
    try:
        _torch.load()
    except _build.NativeUnavailable as error:
        pytest.skip(f"the torch ops cannot be built here: {error}")
    return torch.ops.keras_residual


# -- references -------------------------------------------------------------------


def act_ref(z, code, alpha=ALPHA):
    if code == 0:
        return z
    if code == 1:
        return torch.relu(z)
    if code == 2:
        return torch.where(z >= 0, z, alpha * z)
    if code == 3:
        return torch.clamp(z, 0.0, 6.0)
    if code == 4:
        return z * torch.sigmoid(z)
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def per_channel(v, channels_last):
    return v if channels_last else v.reshape(1, -1, 1, 1)


def train_ref(x, gamma, beta, residual, code, channels_last, epsilon=EPSILON):
    axes = (0, 1, 2) if channels_last else (0, 2, 3)
    mean = x.mean(dim=axes)
    var = ((x - per_channel(mean, channels_last)) ** 2).mean(dim=axes)
    invstd = torch.rsqrt(var + epsilon)
    z = (x - per_channel(mean, channels_last)) * per_channel(invstd * gamma, channels_last)
    z = z + per_channel(beta, channels_last)
    if residual is not None:
        z = z + residual
    return act_ref(z, code), mean, var


def epilogue_ref(x, scale, shift, residual, code, channels_last):
    z = x if scale is None else x * per_channel(scale, channels_last)
    z = z + per_channel(shift, channels_last)
    if residual is not None:
        z = z + residual
    return act_ref(z, code)


def ref_grads(fn, inputs, dy):
    """float64 gradients of sum(fn(*inputs) * dy) for the inputs that are tensors."""
    leaves = [None if t is None else t.detach().double().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad((out * dy.double()).sum(), wanted)
    it = iter(grads)
    return out.detach(), [None if t is None else next(it) for t in leaves]


# -- helpers ----------------------------------------------------------------------

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (4e-3, 6e-3),
}


def assert_close(actual, expected, dtype, name):
    """|a - e| <= atol * max|e| + rtol * |e| elementwise (atol scaled by the data)."""
    rtol, atol = TOLERANCES[dtype]
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, name
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual - expected).abs() - rtol * expected.abs()
    worst = error.max().item() if error.numel() else 0.0
    assert worst <= atol * scale, f"{name}: worst excess error {worst:.3g} > {atol * scale:.3g}"


def make_inputs(shape, channels_last, dtype, residual, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    c = shape[3] if channels_last else shape[1]
    param = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.7).to(dtype)
    gamma = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(param)
    beta = (torch.randn(c, generator=gen, dtype=torch.float64) * 0.5).to(param)
    res = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) if residual else None
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    move = (lambda t: None if t is None else t.to(device)) if device != "cpu" else (lambda t: t)
    return move(x), move(gamma), move(beta), move(res), move(dy)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["float32", "float64", "bfloat16", "float16"]


# -- the training op ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_train_matches_reference(ops, activation, residual, channels_last, dtype):
    code = ACTIVATIONS[activation]
    shape = (3, 5, 7, 13) if channels_last else (3, 13, 5, 7)
    x, gamma, beta, res, dy = make_inputs(shape, channels_last, dtype, residual, seed=code)
    leaves = [t if t is None else t.clone().requires_grad_(True) for t in (x, gamma, beta, res)]
    y, mean, var = _torch.bn_add_act_train(
        *leaves, epsilon=EPSILON, activation=code, alpha=ALPHA, channels_last=channels_last
    )
    assert y.dtype == dtype and y.shape == x.shape
    param = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == param and var.dtype == param and mean.shape == gamma.shape
    assert not mean.requires_grad and not var.requires_grad
    y.backward(dy)

    def fn(x_, g_, b_, r_):
        return train_ref(x_, g_, b_, r_, code, channels_last)

    y_ref, grads = ref_grads(fn, [x, gamma, beta, res], dy)
    _, mean_ref, var_ref = train_ref(
        x.double(), gamma.double(), beta.double(), None, code, channels_last
    )
    assert_close(y, y_ref, dtype, "y")
    stat_dtype = torch.float32 if dtype != torch.float64 else dtype
    assert_close(mean, mean_ref, stat_dtype, "mean")
    assert_close(var, var_ref, stat_dtype, "var")
    for name, leaf, grad in zip(("dx", "dgamma", "dbeta", "dresidual"), leaves, grads, strict=True):
        if leaf is None:
            continue
        assert leaf.grad is not None, name
        assert leaf.grad.dtype == leaf.dtype, name
        # dgamma/dbeta are float32 sums of low-precision g: same loose bound.
        assert_close(leaf.grad, grad, dtype, name)


@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 3), (2, 1, 1, 1), (5, 3, 1, 17), (1, 9, 11, 2), (4, 2, 3, 65)]
)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_train_odd_shapes(ops, shape, channels_last):
    x, gamma, beta, res, dy = make_inputs(shape, channels_last, torch.float64, True, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (x, gamma, beta, res)]
    y, _, _ = _torch.bn_add_act_train(
        *leaves, epsilon=EPSILON, activation="silu", channels_last=channels_last
    )
    y.backward(dy)
    y_ref, grads = ref_grads(lambda *a: train_ref(*a, 4, channels_last), [x, gamma, beta, res], dy)
    assert_close(y, y_ref, torch.float64, "y")
    for name, leaf, grad in zip(("dx", "dgamma", "dbeta", "dresidual"), leaves, grads, strict=True):
        assert_close(leaf.grad, grad, torch.float64, name)


def test_train_only_some_grads(ops):
    """Inputs that do not require grad get none; dresidual is skipped when unwanted."""
    x, gamma, beta, res, dy = make_inputs((2, 4, 4, 6), True, torch.float32, True)
    x.requires_grad_(True)
    y, _, _ = _torch.bn_add_act_train(x, gamma, beta, res, epsilon=EPSILON, activation="relu")
    y.backward(dy)
    _, grads = ref_grads(lambda *a: train_ref(*a, 1, True), [x, gamma, beta, res], dy)
    assert gamma.grad is None and beta.grad is None and res.grad is None
    assert_close(x.grad, grads[0], torch.float32, "dx")


def test_train_non_contiguous_inputs(ops):
    """Strided inputs (a permuted NCHW tensor seen as NHWC) give the same result."""
    x, gamma, beta, res, dy = make_inputs((2, 6, 4, 5), True, torch.float64, True)
    x_strided = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not x_strided.is_contiguous()
    y1, m1, v1 = _torch.bn_add_act_train(x, gamma, beta, res, epsilon=EPSILON, activation=4)
    y2, m2, v2 = _torch.bn_add_act_train(x_strided, gamma, beta, res, epsilon=EPSILON, activation=4)
    torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)


# -- the epilogue op ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_epilogue_matches_reference(ops, activation, residual, channels_last, dtype):
    code = ACTIVATIONS[activation]
    shape = (2, 6, 5, 11) if channels_last else (2, 11, 6, 5)
    x, scale, shift, res, dy = make_inputs(shape, channels_last, dtype, residual, seed=10 + code)
    leaves = [t if t is None else t.clone().requires_grad_(True) for t in (x, scale, shift, res)]
    y = _torch.scale_shift_add_act(
        *leaves, activation=code, alpha=ALPHA, channels_last=channels_last
    )
    assert y.dtype == dtype and y.shape == x.shape
    y.backward(dy)
    y_ref, grads = ref_grads(
        lambda *a: epilogue_ref(*a, code, channels_last), [x, scale, shift, res], dy
    )
    assert_close(y, y_ref, dtype, "y")
    for name, leaf, grad in zip(
        ("dx", "dscale", "dshift", "dresidual"), leaves, grads, strict=True
    ):
        if leaf is None:
            continue
        assert leaf.grad.dtype == leaf.dtype, name
        assert_close(leaf.grad, grad, dtype, name)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_epilogue_without_scale(ops, channels_last):
    """scale=None means 1 (a folded conv bias as the shift)."""
    shape = (3, 4, 5, 7) if channels_last else (3, 7, 4, 5)
    x, _, shift, res, dy = make_inputs(shape, channels_last, torch.float64, True, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (x, shift, res)]
    y = _torch.scale_shift_add_act(
        leaves[0], None, leaves[1], leaves[2], activation="gelu", channels_last=channels_last
    )
    y.backward(dy)
    y_ref, grads = ref_grads(
        lambda x_, s_, r_: epilogue_ref(x_, None, s_, r_, 5, channels_last), [x, shift, res], dy
    )
    assert_close(y, y_ref, torch.float64, "y")
    for name, leaf, grad in zip(("dx", "dshift", "dresidual"), leaves, grads, strict=True):
        assert_close(leaf.grad, grad, torch.float64, name)


def test_epilogue_empty_batch(ops):
    x = torch.zeros((0, 3, 3, 4))
    shift = torch.zeros(4, requires_grad=True)
    y = _torch.scale_shift_add_act(x, None, shift, None, activation="relu")
    assert y.shape == (0, 3, 3, 4)
    y.sum().backward()
    assert torch.equal(shift.grad, torch.zeros(4))


# -- the raw backward ops -------------------------------------------------------------


def test_backward_ops_optional_outputs(ops):
    x, gamma, beta, res, dy = make_inputs((2, 3, 3, 4), True, torch.float32, True)
    _, mean, var = ops.bn_add_act_train(x, gamma, beta, res, EPSILON, 1, ALPHA, True)
    with_res = ops.bn_add_act_backward(
        dy, x, res, mean, var, gamma, beta, EPSILON, 1, ALPHA, True, True
    )
    without = ops.bn_add_act_backward(
        dy, x, res, mean, var, gamma, beta, EPSILON, 1, ALPHA, True, False
    )
    assert with_res[1].shape == x.shape and without[1].numel() == 0
    for a, b in zip(with_res[::2], without[::2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(with_res[3:], without[3:], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    dx, dres, dscale, dshift = ops.scale_shift_add_act_backward(
        dy, x, gamma, beta, None, 1, ALPHA, True, True, False
    )
    assert dx.shape == x.shape and dres.numel() == 0 and dscale.numel() == 0
    assert dshift.shape == (4,)


# -- gradcheck, opcheck, compile --------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("activation", ["leaky_relu", "silu", "gelu"])
def test_gradcheck_train(ops, activation, channels_last):
    shape = (2, 3, 2, 4) if channels_last else (2, 4, 3, 2)
    x, gamma, beta, res, _ = make_inputs(shape, channels_last, torch.float64, True, seed=5)
    inputs = tuple(t.requires_grad_(True) for t in (x, gamma, beta, res))

    def fn(x_, g_, b_, r_):
        return _torch.bn_add_act_train(
            x_, g_, b_, r_, epsilon=EPSILON, activation=activation, channels_last=channels_last
        )[0]

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_scale", [True, False], ids=["scale", "no_scale"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu", "gelu"])
def test_gradcheck_epilogue(ops, activation, with_scale):
    x, scale, shift, res, _ = make_inputs((2, 4, 3, 3), False, torch.float64, True, seed=6)
    scale = scale if with_scale else None
    inputs = tuple(t.requires_grad_(True) for t in (x, scale, shift, res) if t is not None)

    def fn(*args):
        args = list(args)
        s = args.pop(1) if with_scale else None
        return _torch.scale_shift_add_act(
            args[0], s, args[1], args[2], activation=activation, channels_last=False
        )

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_opcheck(ops, residual):
    x, gamma, beta, res, dy = make_inputs((2, 3, 4, 5), True, torch.float32, residual)
    req = [t if t is None else t.clone().requires_grad_(True) for t in (x, gamma, beta, res)]
    _, mean, var = ops.bn_add_act_train(x, gamma, beta, res, EPSILON, 1, ALPHA, True)
    cases = [
        (ops.bn_add_act_train.default, (*req, EPSILON, 2, ALPHA, True)),
        (ops.bn_add_act_train.default, (x, gamma, beta, res, EPSILON, 5, ALPHA, True)),
        (
            ops.bn_add_act_backward.default,
            (dy, x, res, mean, var, gamma, beta, EPSILON, 4, ALPHA, True, residual),
        ),
        (ops.scale_shift_add_act.default, (req[0], req[1], req[2], req[3], 3, ALPHA, True)),
        (ops.scale_shift_add_act.default, (req[0], None, req[2], req[3], 4, ALPHA, True)),
        (
            ops.scale_shift_add_act_backward.default,
            (dy, x, gamma, beta, res, 1, ALPHA, True, residual, True),
        ),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        failed = {name: outcome for name, outcome in result.items() if outcome != "SUCCESS"}
        assert not failed, f"{op}: {failed}"


def test_torch_compile(ops):
    """The ops trace into a torch.compile graph (fake kernels) and keep their gradients."""
    x, gamma, beta, res, dy = make_inputs((2, 4, 4, 6), True, torch.float32, True)

    def block(x_, g_, b_, r_):
        y, mean, _ = _torch.bn_add_act_train(
            x_, g_, b_, r_, epsilon=EPSILON, activation="relu", channels_last=True
        )
        y = _torch.scale_shift_add_act(y, None, b_, None, activation="silu", channels_last=True)
        return y, mean

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, gamma, beta, res)]
        y, mean = fn(*leaves)
        y.backward(dy)
        results.append([y, mean, *(t.grad for t in leaves)])
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)


# -- checks, status and the build -------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda o: o.bn_add_act_train(
                torch.zeros(2, 3), torch.ones(3), torch.zeros(3), None, EPSILON, 1, ALPHA, True
            ),
            r"x\.shape=\[2, 3\]",
        ),
        (
            lambda o: o.bn_add_act_train(
                torch.zeros(1, 2, 2, 3),
                torch.ones(4),
                torch.zeros(3),
                None,
                EPSILON,
                1,
                ALPHA,
                True,
            ),
            r"gamma\.shape=\[4\]",
        ),
        (
            lambda o: o.bn_add_act_train(
                torch.zeros(1, 2, 2, 3),
                torch.ones(3, dtype=torch.float64),
                torch.zeros(3),
                None,
                EPSILON,
                1,
                ALPHA,
                True,
            ),
            "gamma.dtype=Double",
        ),
        (
            lambda o: o.bn_add_act_train(
                torch.zeros(1, 2, 2, 3),
                torch.ones(3),
                torch.zeros(3),
                torch.zeros(1, 2, 2, 4),
                EPSILON,
                1,
                ALPHA,
                True,
            ),
            r"residual\.shape=\[1, 2, 2, 4\]",
        ),
        (
            lambda o: o.bn_add_act_train(
                torch.zeros(1, 2, 2, 3),
                torch.ones(3),
                torch.zeros(3),
                None,
                EPSILON,
                9,
                ALPHA,
                True,
            ),
            "activation=9",
        ),
        (
            lambda o: o.bn_add_act_train(
                torch.zeros(1, 2, 2, 3), torch.ones(3), torch.zeros(3), None, -1.0, 1, ALPHA, True
            ),
            "epsilon=-1",
        ),
        (
            lambda o: o.scale_shift_add_act(
                torch.zeros(1, 2, 2, 3, dtype=torch.int32),
                None,
                torch.zeros(3),
                None,
                1,
                ALPHA,
                True,
            ),
            "x.dtype=Int",
        ),
        (
            lambda o: o.scale_shift_add_act(
                torch.zeros(1, 3, 2, 2), None, torch.zeros(2), None, 1, ALPHA, False
            ),
            r"shift\.shape=\[2\]",
        ),
    ],
    ids=[
        "rank",
        "gamma_len",
        "gamma_dtype",
        "residual_shape",
        "activation",
        "epsilon",
        "x_dtype",
        "shift_len",
    ],
)
def test_bad_arguments_raise_value_error(ops, call, match):
    with pytest.raises(ValueError, match=match):
        call(ops)


def test_python_wrapper_checks(ops):
    x = torch.zeros(1, 2, 2, 3)
    with pytest.raises(ValueError, match="activation='tanh'"):
        _torch.bn_add_act_train(
            x, torch.ones(3), torch.zeros(3), epsilon=EPSILON, activation="tanh"
        )
    with pytest.raises(ValueError, match="shift=None"):
        _torch.scale_shift_add_act(x, None, None, activation=0)
    # A float64 gamma for float32 x is cast to the parameter type.
    x, gamma, beta, _, _ = make_inputs((2, 3, 3, 4), True, torch.float32, False)
    expected, _, _ = _torch.bn_add_act_train(x, gamma, beta, epsilon=EPSILON, activation=1)
    y, _, _ = _torch.bn_add_act_train(
        x, gamma.double(), beta.double(), epsilon=EPSILON, activation=1
    )
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_cpu_kernels_run_on_torchs_intra_op_pool(ops):
    """at::parallel_for is serial in code built without the pool torch uses.

    torch's OpenMP builds need the library compiled with -fopenmp
    (`_torch._openmp_flags`); without it the CPU kernels ran on one thread.
    """
    if not (
        torch.backends.openmp.is_available()
        or "native thread pool" in torch.__config__.parallel_info()
    ):
        pytest.skip("this torch has no intra-op thread pool")
    assert "cpu threads: torch intra-op pool" in _torch.status()["build_info"]


def test_status_and_supports(ops):
    status = _torch.status()
    assert status["built"] and status["loaded"] and status["reason"] is None
    assert status["build_info"].startswith("keras_residual kernels ")
    assert status["torch"] == torch.__version__
    assert _torch.supports("cpu") and _torch.supports(torch.device("cpu"))
    assert not _torch.supports("meta")
    assert _torch.supports("cuda:0") == status["cuda_compiled"]
    if not torch.version.cuda:
        assert not status["cuda_compiled"] and status["cuda_reason"]


@pytest.mark.skipif(bool(torch.version.cuda), reason="checks the CPU-only torch build")
def test_cuda_build_refused_without_cuda_torch():
    with pytest.raises(_build.NativeUnavailable, match="CPU-only"):
        _torch.build(cuda=True)


def test_cuda_compile_failure_falls_back_to_cpu(monkeypatch):
    """When the build with the CUDA kernels fails, a CPU-only build is used and why is kept."""
    built = []

    def fake_build_library(target, sources, framework_version, compile, extra_key="", **kwargs):
        with_cuda = any(path.name == "ops_cuda.cpp" for path in sources)
        built.append(with_cuda)
        if with_cuda:
            raise _build.NativeUnavailable("nvcc: fatal error: no such architecture")
        return _build.CSRC / "libtorch_ops.so"

    monkeypatch.setattr(_torch, "_cuda_plan", lambda: ("9.0+PTX", None))
    monkeypatch.setattr(_torch._build, "build_library", fake_build_library)
    saved = dict(_torch._state)
    try:
        path = _torch._build_with_fallback()
        assert path == _build.CSRC / "libtorch_ops.so"
        assert built == [True, False]
        assert not _torch._state["cuda_compiled"]
        assert "no such architecture" in _torch._state["cuda_reason"]
    finally:
        _torch._state.update(saved)


@pytest.mark.slow
def test_fresh_process_loads_the_cached_library(ops):
    """A second process finds the cached library and reports the same build."""
    code = (
        "import json; from keras_residual.native import _torch; _torch.load(); "
        "print(json.dumps(_torch.status()))"
    )
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    status = json.loads(result.stdout.strip().splitlines()[-1])
    assert status["loaded"] and status["path"] == _torch.status()["path"]


@pytest.mark.slow
def test_compile_failure_carries_compiler_output(tmp_path):
    """A source that does not compile gives NativeUnavailable with the error text."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("int main() { return this_is_not_declared; }\n")
    out = tmp_path / "out.so"
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    with pytest.raises(_build.NativeUnavailable, match="this_is_not_declared"):
        _torch._compile_in_subprocess(out, build_dir, [broken], None)
    assert not out.exists()


# -- CUDA against the CPU kernels -----------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_ops(ops):
    if not _torch.status()["cuda_compiled"]:
        pytest.skip(f"CUDA kernels not compiled in: {_torch.status()['cuda_reason']}")
    return ops


def _cuda_vs_cpu(shape, channels_last, dtype, activation, residual):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu_in = make_inputs(shape, channels_last, dtype, residual, seed=11)
    results = []
    for device in ("cpu", "cuda"):
        x, gamma, beta, res, dy = (None if t is None else t.to(device) for t in cpu_in)
        leaves = [t if t is None else t.clone().requires_grad_(True) for t in (x, gamma, beta, res)]
        y, mean, var = _torch.bn_add_act_train(
            *leaves, epsilon=EPSILON, activation=activation, channels_last=channels_last
        )
        y.backward(dy)
        out = [y, mean, var, *(t.grad for t in leaves if t is not None)]
        leaves = [t if t is None else t.clone().requires_grad_(True) for t in (x, gamma, beta, res)]
        y2 = _torch.scale_shift_add_act(*leaves, activation=activation, channels_last=channels_last)
        y2.backward(dy)
        out += [y2, *(t.grad for t in leaves if t is not None)]
        results.append([t.cpu() for t in out])
    for index, (on_cpu, on_cuda) in enumerate(zip(*results, strict=True)):
        # Per-channel outputs of bfloat16 runs sum bfloat16-rounded terms: the
        # bfloat16 bound applies to every output of those.
        assert on_cuda.dtype == on_cpu.dtype, f"output {index}"
        assert_close(on_cuda, on_cpu, dtype, f"output {index}")


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((16, 28, 28, 256), True),
        ((16, 256, 28, 28), False),
        ((3, 7, 5, 67), True),
        ((3, 67, 7, 5), False),
    ],
    ids=["resnet_nhwc", "resnet_nchw", "odd_nhwc", "odd_nchw"],
)
def test_cuda_matches_cpu(cuda_ops, shape, channels_last, dtype):
    _cuda_vs_cpu(shape, channels_last, dtype, "relu", residual=True)


@CUDA
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_cuda_activations_match_cpu(cuda_ops, activation):
    _cuda_vs_cpu((4, 9, 9, 33), True, torch.float32, activation, residual=False)


@CUDA
def test_cuda_under_compile(cuda_ops):
    x, gamma, beta, res, dy = make_inputs((2, 4, 4, 6), True, torch.float32, True, device="cuda")

    def block(x_, g_, b_, r_):
        return _torch.bn_add_act_train(x_, g_, b_, r_, epsilon=EPSILON, activation="relu")[0]

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, gamma, beta, res), block(x, gamma, beta, res))
