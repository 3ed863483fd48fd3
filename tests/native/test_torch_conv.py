"""The torch adapter's own convolution (`_torch.conv2d`) against `keras.ops.conv`.

Forward and gradients (input and kernel) in both layouts, float32, bfloat16
and float16, every padding case of Keras' "same"; the native kernel
transpose (`transpose_2d`) bit for bit; that it copies no
activation (forward and backward); and, through Keras, a BottleneckBlock and
a ResNet18 whose native path (which runs this convolution) equals the
composite one (which runs `keras.ops.conv`). Runs with KERAS_BACKEND=torch.
"""

import importlib

import keras
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "torch",
    reason="tests the torch adapter's convolution: runs with KERAS_BACKEND=torch",
)

torch = pytest.importorskip("torch", reason="the torch adapter needs torch installed")

import keras_residual  # noqa: E402
from keras_residual import BottleneckBlock, native  # noqa: E402
from keras_residual.native import _torch  # noqa: E402
from keras_residual.ops import conv_bn_add_act  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}

# (input n, h, w, c), (kh, kw), filters, strides, padding, dilation
CASES = [
    ((2, 7, 9, 3), (3, 3), 5, 1, "same", 1),
    ((2, 8, 8, 4), (3, 3), 6, 2, "same", 1),  # asymmetric: explicit pad
    ((2, 9, 7, 4), (3, 3), 6, 2, "same", 1),  # odd sizes, stride 2
    ((2, 8, 8, 4), (1, 1), 8, 1, "same", 1),
    ((2, 8, 8, 4), (1, 1), 8, 2, "same", 1),  # the projection shortcut
    ((2, 16, 16, 3), (7, 7), 8, 2, "same", 1),  # the stem
    ((2, 15, 15, 3), (7, 7), 8, 2, "same", 1),
    ((2, 9, 9, 4), (3, 3), 4, 1, "same", 2),  # dilation
    ((2, 10, 9, 4), (3, 3), 4, 1, "same", (2, 1)),
    ((2, 8, 8, 4), (2, 2), 4, 1, "same", 1),  # even kernel: asymmetric at stride 1
    ((2, 9, 8, 4), (3, 3), 5, 1, "valid", 1),
    ((2, 9, 8, 4), (3, 3), 5, 2, "valid", 1),
    ((2, 9, 8, 4), (3, 3), 5, (1, 2), "same", 1),
]


def _tensors(shape, kernel_size, filters, channels_last, dtype, seed=0):
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    x = rng.normal(size=shape).astype("float32")
    if not channels_last:
        x = x.transpose(0, 3, 1, 2).copy()
    k = rng.normal(0, 0.3, size=(*kernel_size, c, filters)).astype("float32")
    x = torch.tensor(x, dtype=dtype, requires_grad=True)
    k = torch.tensor(k, dtype=dtype, requires_grad=True)
    return x, k


def _forward_backward(conv, x, k, seed=1):
    x.grad = k.grad = None
    y = conv(x, k)
    weights = torch.tensor(
        np.random.default_rng(seed).normal(size=tuple(y.shape)).astype("float32"), dtype=y.dtype
    )
    (y * weights).sum().backward()
    return y.detach().float(), x.grad.float(), k.grad.float()


def _assert_close(actual, expected, tolerance, what):
    scale = max(float(expected.abs().max()), 1.0)
    error = float((actual - expected).abs().max())
    assert error <= tolerance * scale, f"{what}: max error {error} > {tolerance} * {scale}"


def _record_calls(monkeypatch, name):
    """The positional arguments of every call of `torch.nn.functional.<name>`."""
    calls = []
    function = getattr(torch.nn.functional, name)
    monkeypatch.setattr(
        torch.nn.functional,
        name,
        lambda *args, **kwargs: calls.append(args) or function(*args, **kwargs),
    )
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case[1:])))
def test_equals_keras_conv(case, data_format, dtype):
    shape, kernel_size, filters, strides, padding, dilation = case
    channels_last = data_format == "channels_last"
    x, k = _tensors(shape, kernel_size, filters, channels_last, dtype)
    options = dict(strides=strides, padding=padding, dilation_rate=dilation)
    ours = _forward_backward(
        lambda x, k: _torch.conv2d(x, k, channels_last=channels_last, **options), x, k
    )
    theirs = _forward_backward(
        lambda x, k: keras.ops.conv(x, k, data_format=data_format, **options), x, k
    )
    assert ours[0].shape == theirs[0].shape
    for actual, expected, what in zip(ours, theirs, ("output", "d input", "d kernel"), strict=True):
        _assert_close(actual, expected, TOLERANCE[dtype], what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "strides, padding",
    [(1, "same"), (2, "same"), ((1, 2), "valid"), (2, "symmetric"), (1, "valid")],
)
def test_large_pointwise_is_a_matrix_product_equal_to_keras_conv(
    strides, padding, dtype, monkeypatch
):
    """From `_MATMUL_MIN` kernel elements a 1x1 conv on CPU runs as a matmul
    (where the matmul is fast: `_matmul_beats_conv`, forced here)."""
    monkeypatch.setattr(_torch, "_matmul_beats_conv", lambda: True)
    side = int(_torch._MATMUL_MIN**0.5)
    x, k = _tensors((2, 5, 7, side), (1, 1), side, True, dtype)
    calls = []
    pointwise = _torch._padding.pointwise
    monkeypatch.setattr(
        _torch._padding, "pointwise", lambda *args: calls.append(args) or pointwise(*args)
    )
    ours = _forward_backward(
        lambda x, k: _torch.conv2d(x, k, strides=strides, padding=padding), x, k
    )
    assert len(calls) == 1
    keras_padding = "valid" if padding == "symmetric" else padding  # 1x1: no padding at all
    theirs = _forward_backward(
        lambda x, k: keras.ops.conv(x, k, strides=strides, padding=keras_padding), x, k
    )
    assert ours[0].shape == theirs[0].shape
    assert ours[0].is_contiguous()
    for actual, expected, what in zip(ours, theirs, ("output", "d input", "d kernel"), strict=True):
        _assert_close(actual, expected, TOLERANCE[dtype], what)


@pytest.mark.parametrize(
    "vendor, mkl, expected",
    [("GenuineIntel", True, True), ("AuthenticAMD", True, False), ("GenuineIntel", False, False)],
)
def test_large_pointwise_is_a_matmul_only_on_mkl_on_intel(vendor, mkl, expected, monkeypatch):
    monkeypatch.setattr(_torch._device, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
    assert _torch._matmul_beats_conv.__wrapped__() is expected
    calls = []
    pointwise = _torch._padding.pointwise
    monkeypatch.setattr(
        _torch._padding, "pointwise", lambda *args: calls.append(args) or pointwise(*args)
    )
    monkeypatch.setattr(_torch, "_matmul_beats_conv", _torch._matmul_beats_conv.__wrapped__)
    side = int(_torch._MATMUL_MIN**0.5)
    x, k = _tensors((2, 3, 3, side), (1, 1), side, True, torch.float32)
    _torch.conv2d(x, k)
    assert len(calls) == int(expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("padding", ["same", "valid", "symmetric"])
def test_large_pointwise_in_training_is_a_transposed_conv_equal_to_keras_conv(
    padding, data_format, dtype, monkeypatch
):
    """From `_TRANSPOSED_MIN` kernel elements (lowered here) a stride-1 1x1
    conv whose kernel gradient is recorded runs as `F.conv_transpose2d` on
    the Keras kernel as it is: no copy of it, and its gradient comes back in
    its own layout."""
    monkeypatch.setattr(_torch, "_matmul_beats_conv", lambda: False)
    monkeypatch.setattr(_torch, "_TRANSPOSED_MIN", 8 * 12)
    calls = _record_calls(monkeypatch, "conv_transpose2d")
    channels_last = data_format == "channels_last"
    x, k = _tensors((2, 5, 7, 8), (1, 1), 12, channels_last, dtype)
    conv = _torch.conv2d
    outputs = []
    ours = _forward_backward(
        lambda x, k: (
            outputs.append(conv(x, k, padding=padding, channels_last=channels_last)) or outputs[0]
        ),
        x,
        k,
    )
    assert len(calls) == 1
    assert outputs[0].is_contiguous()  # NHWC or NCHW, as the input
    assert calls[0][1].data_ptr() == k.data_ptr()  # the kernel itself, not a copy
    assert k.grad.is_contiguous()
    keras_padding = "valid" if padding == "symmetric" else padding  # 1x1: no padding at all
    theirs = _forward_backward(
        lambda x, k: keras.ops.conv(x, k, padding=keras_padding, data_format=data_format), x, k
    )
    assert ours[0].shape == theirs[0].shape
    for actual, expected, what in zip(ours, theirs, ("output", "d input", "d kernel"), strict=True):
        _assert_close(actual, expected, TOLERANCE[dtype], what)
    # Not at inference (the kernel copy is cached there), nor below the
    # threshold, nor with a stride or groups.
    with torch.no_grad():
        conv(x, k, channels_last=channels_last)
    small = k.detach()[:, :, :, :11].clone().requires_grad_()
    conv(x, small, channels_last=channels_last)
    conv(x, k, strides=2, channels_last=channels_last)
    grouped = torch.cat([k.detach()[:, :, :4, :]] * 2, dim=-1).requires_grad_()
    conv(x, grouped, channels_last=channels_last)
    assert len(calls) == 1


def test_grouped_like_keras():
    x, k = _tensors((2, 6, 6, 8), (3, 3), 6, True, torch.float32)
    k = k.detach()[:, :, :4, :].clone().requires_grad_()  # 2 groups of 4 channels
    ours = _forward_backward(lambda x, k: _torch.conv2d(x, k, padding="same"), x, k)
    theirs = _forward_backward(lambda x, k: keras.ops.conv(x, k, padding="same"), x, k)
    for actual, expected in zip(ours, theirs, strict=True):
        _assert_close(actual, expected, 1e-5, "grouped")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(
    "shape, kernel_size, strides, dilation",
    [
        ((2, 8, 8, 4), (3, 3), 2, 1),  # even size, stride 2: where "same" differs
        ((2, 9, 7, 4), (3, 3), 1, 1),
        ((2, 16, 16, 3), (7, 7), 2, 1),
        ((2, 9, 9, 4), (3, 3), 1, 2),
        ((2, 8, 8, 4), (1, 1), 2, 1),
    ],
)
def test_symmetric_padding_equals_torch_padding(shape, kernel_size, strides, dilation, data_format):
    """padding="symmetric" is PyTorch's padding=dilation*(k-1)//2, without a pad copy."""
    channels_last = data_format == "channels_last"
    x, k = _tensors(shape, kernel_size, 6, channels_last, torch.float32)
    pad = tuple(dilation * (size - 1) // 2 for size in kernel_size)

    def reference(x, k):
        nchw = x.permute(0, 3, 1, 2) if channels_last else x
        y = torch.nn.functional.conv2d(nchw, k.permute(3, 2, 0, 1), None, strides, pad, dilation)
        return y.permute(0, 2, 3, 1) if channels_last else y

    options = dict(strides=strides, padding="symmetric", dilation_rate=dilation)
    ours = _forward_backward(
        lambda x, k: _torch.conv2d(x, k, channels_last=channels_last, **options), x, k
    )
    theirs = _forward_backward(reference, x, k)
    for actual, expected, what in zip(ours, theirs, ("output", "d input", "d kernel"), strict=True):
        _assert_close(actual, expected, 1e-5, what)
    # The op's composite path pads explicitly and runs a "valid" keras.ops.conv.
    with torch.no_grad():
        composite = conv_bn_add_act(
            x,
            k,
            None,
            None,
            None,
            None,
            activation="linear",
            data_format=data_format,
            implementation="composite",
            **options,
        )
    _assert_close(composite.float(), theirs[0], 1e-5, "composite")


def test_inference_reuses_the_kernel_copy_until_the_variable_changes():
    """The kernel cache: torch's version counter must see Keras' assign."""
    variable = keras.Variable(np.random.default_rng(0).normal(size=(3, 3, 4, 6)), dtype="float32")
    kernel = variable.value
    x = torch.tensor(np.random.default_rng(1).normal(size=(1, 5, 5, 4)), dtype=torch.float32)
    with torch.no_grad():
        first = _torch._conv_weight(kernel, torch.channels_last)
        assert _torch._conv_weight(kernel, torch.channels_last) is first  # cached
        before = _torch.conv2d(x, variable.value, padding="same")
        version = kernel._version
        variable.assign(np.zeros((3, 3, 4, 6), "float32"))
        assert variable.value._version != version  # what the cache relies on
        after = _torch.conv2d(x, variable.value, padding="same")
    assert float(before.abs().max()) > 0 and float(after.abs().max()) == 0.0
    # Training makes a fresh, differentiable copy per call.
    k = kernel.detach().clone().requires_grad_()
    assert _torch._conv_weight(k, torch.channels_last).requires_grad


def test_inference_reuses_scale_and_shift_until_a_bn_variable_changes(monkeypatch):
    """The epilogue's scale and shift (`_torch.memo`): once per change of the
    BN variables in inference; per call, and differentiable, with grad."""
    _native_adapter()
    op_module = importlib.import_module("keras_residual.ops.conv_bn_add_act")
    calls = []
    original = op_module._scale_shift
    monkeypatch.setattr(op_module, "_scale_shift", lambda *args: calls.append(1) or original(*args))
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(2, 5, 5, 3)), dtype=torch.float32)
    k = torch.tensor(rng.normal(0, 0.3, size=(3, 3, 3, 4)), dtype=torch.float32)
    bn = [
        keras.Variable(v, dtype="float32")
        for v in (
            rng.uniform(0.5, 1.5, 4),
            rng.normal(size=4),
            rng.normal(size=4),
            rng.uniform(0.5, 2, 4),
        )
    ]

    def run(implementation="native"):
        return conv_bn_add_act(x, k, *bn, implementation=implementation)

    with torch.no_grad():
        first = run()
        run()
        assert len(calls) == 1
        bn[3].assign(np.full(4, 4.0, "float32"))  # moving_variance
        changed = run()
        assert len(calls) == 2
        np.testing.assert_allclose(changed.numpy(), run("composite").numpy(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, changed)
    # With grad: per call, and the gradient reaches gamma.
    y = run()
    y.sum().backward()
    assert len(calls) == 3 and bn[0].value.grad is not None


@pytest.fixture(scope="module")
def loaded():
    try:
        _torch.load()
    except keras_residual.native._build.NativeUnavailable as error:
        pytest.skip(f"the torch ops library cannot be built here: {error}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 70), (200, 33), (64, 64), (0, 5), (4608, 17)])
def test_transpose_2d_equals_torch_bit_for_bit(loaded, shape, dtype):
    x = torch.randn(shape).to(dtype)
    x.view(-1)[::7] = float("nan")  # copied as bits, NaN included
    ours = torch.ops.keras_residual.transpose_2d(x)
    assert ours.shape == shape[::-1] and ours.is_contiguous()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(ours.view(bits), x.t().contiguous().view(bits))
    # A non-contiguous input is read in its logical order.
    assert torch.equal(torch.ops.keras_residual.transpose_2d(x.t()).view(bits), x.view(bits))


def test_transpose_2d_gradient_and_bad_input(loaded):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.keras_residual.transpose_2d, (x,))
    with pytest.raises(ValueError, match=r"2D tensor. Received: x.shape=\[2, 3, 4\]"):
        torch.ops.keras_residual.transpose_2d(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="x.dtype=Bool"):
        torch.ops.keras_residual.transpose_2d(torch.zeros(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("shape", [(3, 3, 4, 6), (1, 1, 8, 16), (7, 7, 3, 8)])
def test_training_kernel_copy_and_its_gradient_are_exact(loaded, shape, native, monkeypatch):
    """`_conv_weight` in training: the native transpose (all kernels from the
    size threshold up, here every kernel) gives the weight torch's
    permute-and-copy gives, in channels_last memory, and the Keras kernel's
    gradient in its own (contiguous) layout."""
    monkeypatch.setattr(_torch, "_NATIVE_TRANSPOSE_MIN", 0 if native else 1 << 40)
    kernel = torch.randn(shape, requires_grad=True)
    ours = _torch._conv_weight(kernel, torch.channels_last)
    nodes, node = [], ours.grad_fn
    while node is not None:
        nodes.append(node.name())
        node = node.next_functions[0][0] if node.next_functions else None
    assert any("transpose_2d" in name for name in nodes) == native, nodes
    theirs = kernel.detach().permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours.detach(), theirs)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(ours.shape).contiguous(memory_format=torch.channels_last)
    (ours * upstream).sum().backward()
    assert kernel.grad.is_contiguous()
    assert torch.equal(kernel.grad, upstream.permute(2, 3, 1, 0))
    # The transpose's gradient is contiguous itself: autograd's accumulation
    # then copies nothing (its strided copy of a 1x1 kernel's was slow).
    assert _torch._transpose_backward(None, torch.randn(6, 5)).is_contiguous()


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("shape", [(2, 9, 9, 4), (2, 8, 10, 3)])
def test_max_pool_equals_zero_padding_and_keras_pooling(shape, data_format):
    """Zero padding, not PyTorch's -inf: negative inputs show the difference."""
    channels_last = data_format == "channels_last"
    x, _ = _tensors(shape, (1, 1), 1, channels_last, torch.float32)
    x = (x.detach() - 3.0).requires_grad_()  # mostly negative
    ours = _torch.max_pool2d(x, pool_size=3, strides=2, padding=1, channels_last=channels_last)
    spatial = [(1, 1), (1, 1)]
    pad = [(0, 0), *spatial, (0, 0)] if channels_last else [(0, 0), (0, 0), *spatial]
    theirs = keras.ops.max_pool(keras.ops.pad(x, pad), 3, 2, data_format=data_format)
    _assert_close(ours.detach(), theirs.detach(), 0, "max pool")
    # PyTorch's own padding (-inf) would differ here: the test can tell.
    nchw = x.detach().permute(0, 3, 1, 2) if channels_last else x.detach()
    minus_inf = torch.nn.functional.max_pool2d(nchw, 3, 2, padding=1)
    minus_inf = minus_inf.permute(0, 2, 3, 1) if channels_last else minus_inf
    assert bool((minus_inf != ours.detach()).any())
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), x)
    _assert_close(g_ours, g_theirs, 0, "max pool gradient")
    composite = keras_residual.ops.max_pool(
        x, 3, 2, padding=1, data_format=data_format, implementation="composite"
    )
    _assert_close(composite.detach(), theirs.detach(), 0, "composite max pool")


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_max_pool_of_nonnegative_inputs_pads_implicitly(data_format, monkeypatch):
    """After a relu, zero padding changes no maximum: `nonnegative` pools
    with torch's own padding, no padded copy, and gives the same values (and
    the same gradient wherever an input is above 0, the only inputs whose
    gradient a relu before it lets through). A padding wider than half the
    window is still padded with zeros."""
    channels_last = data_format == "channels_last"
    x, _ = _tensors((2, 9, 8, 4), (1, 1), 1, channels_last, torch.float32)
    x = torch.relu(x.detach()).requires_grad_()
    pads = _record_calls(monkeypatch, "pad")

    def pool(nonnegative, padding=1):
        return _torch.max_pool2d(
            x,
            pool_size=3,
            strides=2,
            padding=padding,
            channels_last=channels_last,
            nonnegative=nonnegative,
        )

    ours, zeros = pool(True), pool(False)
    assert len(pads) == 1  # only the zero-padded one
    assert torch.equal(ours, zeros)
    (g_ours,) = torch.autograd.grad(ours.sum(), x)
    (g_zeros,) = torch.autograd.grad(zeros.sum(), x)
    positive = x.detach() > 0
    assert torch.equal(g_ours[positive], g_zeros[positive])
    wide = pool(True, padding=2)  # torch's pooling takes at most half the window
    assert len(pads) == 2 and torch.equal(wide, pool(False, padding=2))
    composite = keras_residual.ops.max_pool(
        x, 3, 2, padding=1, data_format=data_format, implementation="composite", nonnegative=True
    )
    _assert_close(composite.detach(), zeros.detach(), 0, "composite max pool")


@pytest.mark.parametrize(
    "activation, preact, padded",
    [("relu", False, False), ("relu6", False, False), ("silu", False, True), ("relu", True, True)],
)
def test_resnet_pools_without_padding_only_after_a_relu(activation, preact, padded, monkeypatch):
    """The stem's pool skips the zero-padded copy only where its input is a
    relu's (not after silu, nor after a pre-activation model's linear stem),
    and the model equals its composite twin either way."""
    _native_adapter()
    pads = _record_calls(monkeypatch, "pad")

    def build(implementation):
        return keras_residual.models.ResNet(
            block_type="basic",
            stage_depths=(1, 1),
            stage_filters=(8, 16),
            input_shape=(16, 16, 3),
            classes=4,
            activation=activation,
            preact=preact,
            implementation=implementation,
        )

    native_model, composite_model = _twins(build)
    x = torch.tensor(np.random.default_rng(5).normal(size=(2, 16, 16, 3)).astype("float32"))
    native_y = native_model(x, training=False)
    pool_pads = [args for args in pads if tuple(args[1]) == (1, 1, 1, 1)]  # not a conv's
    assert len(pool_pads) == int(padded)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(native_y),
        keras.ops.convert_to_numpy(composite_model(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_rejects_bad_padding():
    x, k = _tensors((1, 4, 4, 2), (3, 3), 2, True, torch.float32)
    with pytest.raises(ValueError, match="padding"):
        _torch.conv2d(x, k, padding="causal")


# -- no layout copies ---------------------------------------------------------------


@pytest.mark.parametrize("strides", [1, 2])
def test_output_is_a_contiguous_view_of_channels_last(strides):
    x, k = _tensors((2, 9, 9, 8), (3, 3), 16, True, torch.float32)
    y = _torch.conv2d(x, k, strides=strides, padding="same" if strides == 1 else "valid")
    nchw = y.permute(0, 3, 1, 2)
    assert y.is_contiguous()  # NHWC, as the native ops take it
    assert nchw.is_contiguous(memory_format=torch.channels_last)
    _, h, w, c = y.shape
    assert y.stride() == (h * w * c, w * c, c, 1)


def _native_adapter():
    try:
        return native.adapter("torch")
    except native.NativeUnavailable as error:
        pytest.skip(f"native adapter unavailable here: {str(error).splitlines()[0]}")


def _activation_copies(implementation, strides, padding):
    """The aten::copy_ of 4D activation-sized tensors in one unit's forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    rng = np.random.default_rng(0)
    n, h, w, c, f = 4, 10, 10, 8, 8
    x = torch.tensor(rng.normal(size=(n, h, w, c)).astype("float32"), requires_grad=True)
    k = torch.tensor(rng.normal(0, 0.2, size=(3, 3, c, f)).astype("float32"), requires_grad=True)
    gamma = torch.ones(f, requires_grad=True)
    beta = torch.zeros(f, requires_grad=True)
    mean, variance = torch.zeros(f), torch.ones(f)
    oh = -(-h // strides) if padding == "same" else (h - 3) // strides + 1
    residual = torch.tensor(rng.normal(size=(n, oh, oh, f)).astype("float32"))
    weights = torch.tensor(rng.normal(size=(n, oh, oh, f)).astype("float32"))

    def step():
        y, _, _ = conv_bn_add_act(
            x,
            k,
            gamma,
            beta,
            mean,
            variance,
            residual,
            strides=strides,
            padding=padding,
            training=True,
            implementation=implementation,
        )
        (y * weights).sum().backward()  # a contiguous incoming gradient

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    sizes = {n * h * w * c, n * oh * oh * f}
    copies = []
    for event in prof.events():
        if event.name != "aten::copy_" or not event.input_shapes:
            continue
        shape = event.input_shapes[0]
        if len(shape) == 4 and int(np.prod(shape)) in sizes:
            copies.append(tuple(shape))
    return copies


@pytest.mark.parametrize("strides, padding", [(1, "same"), (2, "valid")])
def test_native_unit_copies_no_activation(strides, padding):
    _native_adapter()
    assert _activation_copies("native", strides, padding) == []
    # The check itself sees Keras' copies on the composite path (ops.conv).
    assert len(_activation_copies("composite", strides, padding)) >= 2


def test_native_path_uses_the_adapter_conv(monkeypatch):
    adapter = _native_adapter()
    calls = []
    original = adapter.conv2d

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(adapter, "conv2d", spy)
    x = np.random.default_rng(0).normal(size=(1, 5, 5, 3)).astype("float32")
    k = np.random.default_rng(1).normal(size=(3, 3, 3, 4)).astype("float32")
    ones, zeros = np.ones(4, "float32"), np.zeros(4, "float32")
    native_y = conv_bn_add_act(x, k, ones, zeros, zeros, ones, implementation="native")
    assert len(calls) == 1 and calls[0]["channels_last"] is True
    composite_y = conv_bn_add_act(x, k, ones, zeros, zeros, ones, implementation="composite")
    assert len(calls) == 1  # the composite path is pure keras.ops
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(native_y),
        keras.ops.convert_to_numpy(composite_y),
        rtol=1e-5,
        atol=1e-5,
    )


# -- through Keras: blocks and a ResNet, native against composite -----------------


def _twins(build, seed=0):
    """The same model twice (same weights): native and composite."""
    keras.utils.set_random_seed(seed)
    native_model = build("native")
    composite_model = build("composite")
    composite_model.set_weights(native_model.get_weights())
    return native_model, composite_model


def _train_step(model, x, labels):
    """One SGD step by hand: the loss, and the variables after it."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    model.zero_grad()
    loss = loss_fn(labels, model(x, training=True))
    loss.backward()
    with torch.no_grad():
        for variable in model.trainable_variables:
            variable.value.sub_(0.05 * variable.value.grad)
    return float(loss.detach()), [keras.ops.convert_to_numpy(v) for v in model.variables]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_bottleneck_block_native_equals_composite(data_format):
    _native_adapter()
    shape = (8, 8, 16) if data_format == "channels_last" else (16, 8, 8)

    def build(implementation):
        inputs = keras.Input(shape)
        block = BottleneckBlock(
            8, strides=2, implementation=implementation, data_format=data_format
        )
        return keras.Model(inputs, block(inputs))

    native_model, composite_model = _twins(build)
    x = torch.tensor(np.random.default_rng(2).normal(size=(4, *shape)).astype("float32"))
    for training in (False, True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(native_model(x, training=training)),
            keras.ops.convert_to_numpy(composite_model(x, training=training)),
            rtol=1e-4,
            atol=1e-4,
        )
    x = x.requires_grad_()
    grads = []
    for model in (native_model, composite_model):
        x.grad = None
        model.zero_grad()
        model(x, training=True).square().mean().backward()
        grads.append([x.grad.clone()] + [v.value.grad.clone() for v in model.trainable_variables])
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4)


def test_resnet18_native_equals_composite():
    _native_adapter()

    def build(implementation):
        return keras_residual.ResNet18(
            weights=None, input_shape=(32, 32, 3), classes=10, implementation=implementation
        )

    native_model, composite_model = _twins(build)
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.normal(size=(4, 32, 32, 3)).astype("float32"))
    labels = torch.tensor(rng.integers(0, 10, size=(4,)))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(native_model(x, training=False)),
        keras.ops.convert_to_numpy(composite_model(x, training=False)),
        rtol=1e-4,
        atol=1e-5,
    )
    native_loss, native_after = _train_step(native_model, x, labels)
    composite_loss, composite_after = _train_step(composite_model, x, labels)
    assert native_loss == pytest.approx(composite_loss, rel=1e-5)
    for a, b in zip(native_after, composite_after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


# -- kernels laid out as the convolution reads them ---------------------------------


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize(
    "kernel_size, strides", [((3, 3), 1), ((3, 3), 2), ((1, 1), 1), ((1, 1), 2), ((7, 7), 2)]
)
def test_laid_out_kernel_reaches_the_conv_uncopied(kernel_size, strides, data_format, monkeypatch):
    """A kernel stored in the convolution's memory order is passed to
    `F.conv2d` as a view (even where a Keras-ordered 1x1 kernel would run
    transposed), its gradient keeps its strides (no copy on accumulation),
    and the results equal `keras.ops.conv`."""
    monkeypatch.setattr(_torch, "_matmul_beats_conv", lambda: False)
    monkeypatch.setattr(_torch, "_TRANSPOSED_MIN", 1)
    calls = _record_calls(monkeypatch, "conv2d")
    channels_last = data_format == "channels_last"
    x, k = _tensors((2, 9, 8, 6), kernel_size, 10, channels_last, torch.float32)
    values = k.detach().clone()
    assert _torch.lay_out_kernels([k], channels_last=channels_last) == 1
    assert torch.equal(k.detach(), values) and k.shape == values.shape
    assert not k.is_contiguous()
    ours = _forward_backward(
        lambda x, k: _torch.conv2d(
            x, k, strides=strides, padding="same", channels_last=channels_last
        ),
        x,
        k,
    )
    assert len(calls) == 1
    assert calls[0][1].data_ptr() == k.data_ptr()  # the kernel itself
    assert k.grad.stride() == k.stride()
    theirs = _forward_backward(
        lambda x, k: keras.ops.conv(x, k, strides=strides, padding="same", data_format=data_format),
        x,
        k,
    )
    for actual, expected, what in zip(ours, theirs, ("output", "d input", "d kernel"), strict=True):
        _assert_close(actual, expected, TOLERANCE[torch.float32], what)
    # Laid out already: nothing more to do.
    assert _torch.lay_out_kernels([k], channels_last=channels_last) == 0


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_resnet_lays_out_kernels_and_slots_at_its_first_training_step(optimizer, tmp_path):
    """`ResNet.train_step` lays out every conv kernel, and the optimizer's
    4D slots, in the channels_last convolution's order: it trains as the
    same model in Keras' layout does, and saves and loads the same values.
    "composite" keeps Keras' layout. Fails loudly if Keras stops making an
    optimizer's slots from a variable with its shape."""
    _native_adapter()
    make_optimizer = {
        "sgd_momentum": lambda: keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(learning_rate=1e-3),
    }[optimizer]

    def build(implementation, layout):
        keras.utils.set_random_seed(0)
        model = keras_residual.ResNet18(
            weights=None, input_shape=(32, 32, 3), classes=10, implementation=implementation
        )
        model.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy")
        if not layout:
            model._lay_out_kernels = lambda: None  # this twin keeps Keras' layout
        return model

    laid_out, keras_order, composite = (
        build("native", True),
        build("native", False),
        build("composite", True),
    )
    rng = np.random.default_rng(4)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, size=(4,))
    losses = {}
    for name, model in (("laid_out", laid_out), ("keras", keras_order), ("composite", composite)):
        losses[name] = [float(model.train_on_batch(x, labels)) for _ in range(2)]

    def conv_order(variable):
        return variable.value.permute(3, 2, 0, 1).is_contiguous(memory_format=torch.channels_last)

    kernels = [v for v in laid_out.trainable_variables if len(v.shape) == 4]
    assert len(kernels) == 20 and all(
        conv_order(v) and not v.value.is_contiguous() for v in kernels
    )
    slots = [v for v in laid_out.optimizer.variables if len(v.shape) == 4]
    assert len(slots) == {"sgd_momentum": 20, "adam": 40}[optimizer]
    assert all(conv_order(v) for v in slots)
    assert all(v.value.is_contiguous() for v in composite.trainable_variables)
    assert all(v.value.is_contiguous() for v in keras_order.trainable_variables)
    assert losses["laid_out"] == pytest.approx(losses["keras"], rel=1e-5)
    for a, b in zip(laid_out.get_weights(), keras_order.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # A new optimizer gets its slots laid out at its first step.
    laid_out.compile(optimizer=make_optimizer(), loss="sparse_categorical_crossentropy")
    laid_out.train_on_batch(x, labels)
    assert all(conv_order(v) for v in laid_out.optimizer.variables if len(v.shape) == 4)
    path = tmp_path / "laid_out.keras"
    laid_out.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(loaded.get_weights(), laid_out.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
