"""The JAX adapter: XLA FFI handlers over the CPU kernels.

``csrc/jax/ffi.cc`` defines four typed XLA FFI handlers (training forward and
backward, epilogue forward and backward) for float16, bfloat16, float32 and
float64 buffers on the CPU; ``csrc/jax/ffi_cuda.cc`` defines the same four on
the CUDA kernels, compiled in when JAX sees CUDA devices and nvcc is found.
This module compiles them on first use against the installed jaxlib's FFI
headers, loads the library once per process with ctypes, registers the
handlers as XLA custom-call targets (one name, a handler per platform) and
exposes them as functions differentiable through `jax.custom_vjp`, usable
eagerly, under `jax.jit` and in `model.fit`.

Examples:

>>> from keras_residual.native import _jax
>>> sorted(_jax.TARGETS)[:1]
['KrJaxBnAddActBackward']
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from keras_residual import _padding
from keras_residual.native import _build, _stack

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
# The handler symbols of csrc/jax/ffi.cc and the custom-call targets they
# are registered as.
TARGETS = {
    "KrJaxBnAddActTrain": "keras_residual_bn_add_act_train",
    "KrJaxBnAddActBackward": "keras_residual_bn_add_act_backward",
    "KrJaxScaleShiftAddAct": "keras_residual_scale_shift_add_act",
    "KrJaxScaleShiftAddActBackward": "keras_residual_scale_shift_add_act_backward",
}
# The CUDA handlers of csrc/jax/ffi_cuda.cc are these symbols with "Cuda"
# after "KrJax", registered under the same targets for the CUDA platform.
CUDA_SYMBOLS = {symbol: symbol.replace("KrJax", "KrJaxCuda", 1) for symbol in TARGETS}
_SOURCE = _build.CSRC / "jax" / "ffi.cc"
_CUDA_SOURCE = _build.CSRC / "jax" / "ffi_cuda.cc"
# ffi.cc includes jaxlib's FFI headers only: no -march here either; the
# kernels get the host's ISA in their own translation unit.
_FLAGS = ["-std=c++17", "-O3", "-fPIC", "-pthread"]
# nvcc, for csrc/cuda/*.cu and ffi_cuda.cc: as scripts/check_cuda.sh checks
# them, with no implicit half / bfloat16 operators or conversions.
_CUDA_FLAGS = [
    "-std=c++17",
    "-O3",
    "-DNDEBUG",
    "-Xcompiler",
    "-fPIC",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]

_loaded = _build.LoadOnce("the JAX FFI handlers")
# What the last build() compiled in, for status().
_cuda_state: dict = {"cuda_compiled": False, "cuda_archs": None, "cuda_reason": None}


def sources() -> list[Path]:
    """The C++ files compiled into the CPU-only handler library."""
    return [*_build.kernel_sources(), _SOURCE]


def cuda_sources() -> list[Path]:
    """The extra sources compiled in with the CUDA handlers."""
    return [*sorted((_build.CSRC / "cuda").glob("*.cu")), _CUDA_SOURCE]


def _cuda_plan() -> tuple[list[str] | None, str | None]:
    """(compute capabilities such as ["90"], None) when the CUDA handlers can be
    compiled for JAX's CUDA devices, else (None, why not)."""
    import jax

    try:
        devices = jax.devices("cuda")
    except RuntimeError:
        return None, "jax has no CUDA devices"
    nvcc = _build.nvcc()
    if nvcc is None:
        return None, "no nvcc found (set NVCC or CUDA_HOME)"
    archs = sorted(
        {
            str(device.compute_capability).replace(".", "")
            for device in devices
            if getattr(device, "compute_capability", None)
        }
    )
    if not archs:
        return None, "jax's CUDA devices name no compute capability"
    return archs, None


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc's -gencode flags: machine code for each of `archs` (such as "90"),
    and PTX for the newest, which later GPUs compile when they load it."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return [*flags, "-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def compile_cuda_objects(build_dir: Path, archs: list[str]) -> list[Path]:
    """Compiles the CUDA kernels and ffi_cuda.cc with nvcc into `build_dir`;
    returns the object files.

    Raises:
        NativeUnavailable: nvcc is missing or failed.
    """
    import jax

    nvcc = _build.nvcc()
    if nvcc is None:
        raise _build.NativeUnavailable("no nvcc found (set NVCC or CUDA_HOME)")
    # jaxlib's headers are system headers: their own warnings are not ours.
    includes = [f"-I{_build.CSRC / 'include'}", "-isystem", str(jax.ffi.include_dir())]
    objects = []
    for source in cuda_sources():
        obj = Path(build_dir) / f"cuda_{source.parent.name}_{source.stem}.o"
        flags = gencode_flags(archs) if source.suffix == ".cu" else []
        _build.run_compiler(
            [nvcc, *_CUDA_FLAGS, *flags, *includes, "-c", str(source), "-o", str(obj)],
            cwd=build_dir,
        )
        objects.append(obj)
    return objects


def _compile(out_path: Path, build_dir: Path, archs: list[str] | None) -> None:
    import jax

    cxx = _build.compiler()
    kernels = _build.compile_kernels(build_dir)
    handlers = build_dir / "jax_ffi.o"
    includes = [f"-I{_build.CSRC / 'include'}", "-isystem", str(jax.ffi.include_dir())]
    _build.run_compiler(
        [cxx, *_FLAGS, *includes, "-c", str(_SOURCE), "-o", str(handlers)], cwd=build_dir
    )
    objects = [handlers, *kernels]
    if archs is None:
        _build.run_compiler(
            [cxx, "-shared", *_FLAGS, *map(str, objects), "-o", str(out_path)], cwd=build_dir
        )
        return
    objects += compile_cuda_objects(build_dir, archs)
    # nvcc links the CUDA runtime in statically: nothing to find at load time.
    _build.run_compiler(
        [_build.nvcc(), "-shared", "-Xcompiler", "-fPIC", *map(str, objects), "-o", str(out_path)],
        cwd=build_dir,
    )


def build(force: bool = False, cuda: bool | None = None) -> Path:
    """Compiles (or finds in the cache) the handler library; returns its path.

    Args:
        force: compile even if the cache holds a valid library or a
            recorded failure.
        cuda: compile the CUDA handlers in. `None` (the default) means
            whenever JAX has CUDA devices and nvcc is found; `True` requires
            it; `False` leaves them out.

    Returns:
        The path of the shared library.

    Raises:
        NativeUnavailable: JAX, the compiler or the sources are missing, or
            compiling failed (`BuildFailed`, now or earlier), or `cuda=True`
            and CUDA cannot be compiled for.
    """
    try:
        import jax
        import jaxlib
    except ImportError as error:
        raise _build.NativeUnavailable(f"jax is not installed ({error})") from error
    archs, cuda_reason = (None, "not requested") if cuda is False else _cuda_plan()
    if cuda and archs is None:
        raise _build.NativeUnavailable(f"cannot compile the CUDA handlers: {cuda_reason}")
    extra = " ".join(
        [
            _build.compiler_version(),
            *_FLAGS,
            f"jaxlib {jaxlib.__version__}",
            str(jax.ffi.include_dir()),
            _build.kernel_key(),
            *(
                [f"cuda {','.join(archs)}", _build.compiler_version(_build.nvcc()), *_CUDA_FLAGS]
                if archs
                else []
            ),
        ]
    )
    path = _build.build_library(
        "jax",
        sources() + (cuda_sources() if archs else []),
        framework_version=jax.__version__,
        compile=functools.partial(_compile, archs=archs),
        extra_key=extra,
        rebuild=force,
        description=f"the JAX {jax.__version__} FFI handlers"
        + (f" with CUDA handlers for sm_{', sm_'.join(archs)}" if archs else ""),
        estimate="1 to 3 minutes" if archs else "30 seconds",
    )
    _cuda_state.update(cuda_compiled=archs is not None, cuda_archs=archs, cuda_reason=cuda_reason)
    return path


def load():
    """The loaded handler library (a `ctypes.CDLL`), compiled on first use.

    The library is loaded and its handlers registered with XLA once per
    process; a failure is remembered and raised again without a second build.
    Where the CUDA handlers fail to compile, the CPU ones still load.

    Raises:
        NativeUnavailable: why the library cannot be built or loaded.
    """
    return _loaded.get(_load)


def _build_with_fallback() -> Path:
    """build(), and if that fails with the CUDA handlers in, a CPU-only build."""
    planned = _cuda_plan()[0] is not None
    return _build.build_with_cuda_fallback(build, planned, _cuda_state, "handlers")


def _load():
    path = _build_with_fallback()
    try:
        library = _register(path)
    except (OSError, AttributeError):
        # A library that passed its checks but does not load: compile it
        # afresh once.
        path = build(force=True, cuda=_cuda_state["cuda_compiled"])
        library = _register(path)
    return path, library


def _register(path: Path):
    import ctypes

    import jax

    library = ctypes.cdll.LoadLibrary(str(path))
    handlers = [("cpu", symbol, target) for symbol, target in TARGETS.items()]
    if _cuda_state["cuda_compiled"]:
        handlers += [("CUDA", CUDA_SYMBOLS[symbol], target) for symbol, target in TARGETS.items()]
    # Every symbol first, so that a library missing one registers nothing.
    capsules = [
        (platform, target, jax.ffi.pycapsule(getattr(library, symbol)))
        for platform, symbol, target in handlers
    ]
    for platform, target, capsule in capsules:
        jax.ffi.register_ffi_target(target, capsule, platform=platform)
    return library


def status() -> dict:
    """The state of the JAX adapter, for ``python -m keras_residual info``.

    Does not build or load anything itself.

    Returns:
        A dict with `built` and `loaded` (bools), `jax` (its version, if
        installed), `path` (the library, once loaded), `build_seconds` and
        `reason` (why it is not loaded, if known).
    """
    info: dict = {"built": False, "loaded": False}
    try:
        import jax
    except ImportError as error:
        info["reason"] = f"jax is not installed ({error})"
        return info
    info["jax"] = jax.__version__
    info.update(_cuda_state)
    return _loaded.status(info)


def graph_reason(x) -> str | None:
    """Why the computation being traced cannot hold the handlers, or None.

    An export (`model.export`, `jax.export`, jax2tf) must run where this
    package's library is absent: it holds built-in operations only.
    """
    import jax

    if isinstance(x, jax.core.Tracer) and _stack.called_from(
        "/keras/src/export/", "/jax/_src/export/", "/jax/experimental/jax2tf/"
    ):
        return "an export holds built-in operations only"
    return None


def device_reason(x) -> str | None:
    """Why the handlers cannot run on `x`'s device, or None."""
    platform = _platform(x)
    if platform == "cpu":
        return None
    if platform in ("gpu", "cuda") and _cuda_state["cuda_compiled"]:
        return None
    why = _cuda_state["cuda_reason"] or "CPU handlers only"
    return f"no native kernel for platform {platform!r} on jax ({why})"


def _platform(x) -> str:
    """The platform of `x`'s devices; under tracing, the default backend's."""
    import jax

    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        platforms = {device.platform for device in x.devices()}
        if len(platforms) == 1:
            return platforms.pop()
        return "+".join(sorted(platforms))
    return jax.default_backend()


# -- the convolution ----------------------------------------------------------------


def conv2d(inputs, kernel, *, strides=1, padding="valid", dilation_rate=1, channels_last=True):
    """`keras.ops.conv` of a 4D input, with its 1x1 convolutions as matrix products.

    XLA's CPU convolution of a 1x1 kernel is slow, above all its gradients:
    on the 9 shapes of ResNet50's 1x1 convs (batch 16, 128x128) on a
    2-core AMD EPYC, one matrix product (`_padding.pointwise`) was
    1.2-4.0x faster forward and 1.2-4.6x faster forward and backward
    together (`benchmarks/pointwise.py`). So every 1x1 convolution of
    an NHWC input on the CPU runs as one; the rest
    is `jax.lax.conv_general_dilated` as `keras.ops.conv` calls it. Needs no
    built library. Arguments and result as the `conv2d` of
    `keras_residual.native.Adapter`.
    """
    import jax.numpy as jnp
    from jax import lax

    strides = _padding.pair(strides, "strides")
    dilation = _padding.pair(dilation_rate, "dilation_rate")
    _padding.check(padding)
    kernel = jnp.asarray(kernel)
    inputs = jnp.asarray(inputs, dtype=kernel.dtype)
    if (
        channels_last
        and kernel.shape[:2] == (1, 1)
        and kernel.shape[2] == inputs.shape[-1]
        and _platform(inputs) == "cpu"
    ):
        return _padding.pointwise(inputs, kernel, strides)
    if padding == "symmetric":
        pad = [(p, p) for p in _padding.symmetric(kernel.shape[:2], dilation)]
    else:
        pad = padding.upper()
    layout = "NHWC" if channels_last else "NCHW"
    return lax.conv_general_dilated(
        inputs,
        kernel,
        strides,
        pad,
        rhs_dilation=dilation,
        dimension_numbers=(layout, "HWIO", layout),
        feature_group_count=inputs.shape[-1 if channels_last else 1] // kernel.shape[2],
    )


# -- the differentiable functions -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
    """The static attributes of one call (hashable: a `nondiff_argnums` value)."""

    activation: int
    alpha: float
    channels_last: bool
    has_residual: bool
    epsilon: float | None = None
    has_scale: bool | None = None

    def attributes(self) -> dict:
        import numpy as np

        attributes = {
            "activation": np.int32(self.activation),
            "alpha": np.float64(self.alpha),
            "channels_last": self.channels_last,
            "has_residual": self.has_residual,
        }
        if self.epsilon is not None:
            attributes["epsilon"] = np.float64(self.epsilon)
        if self.has_scale is not None:
            attributes["has_scale"] = self.has_scale
        return attributes


def _param_dtype(x_dtype):
    import jax.numpy as jnp

    return jnp.float64 if x_dtype == jnp.float64 else jnp.float32


def _call(target: str, options: _Options, results, *args):
    import jax

    results = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in results]
    return jax.ffi.ffi_call(f"keras_residual_{target}", results)(*args, **options.attributes())


def _channels(x, options: _Options) -> int:
    return x.shape[-1 if options.channels_last else 1]


def _gradient_shapes(x, options: _Options, has_first_param: bool):
    """(dx, dparam1, dparam2, dresidual) result shapes; absent inputs get shape (0,)."""
    param, c = _param_dtype(x.dtype), _channels(x, options)
    return [
        (x.shape, x.dtype),
        ((c,) if has_first_param else (0,), param),
        ((c,), param),
        (x.shape if options.has_residual else (0,), x.dtype),
    ]


def _train_forward(options: _Options, x, gamma, beta, residual):
    param, c = _param_dtype(x.dtype), _channels(x, options)
    results = [(x.shape, x.dtype), ((c,), param), ((c,), param)]
    return tuple(_call("bn_add_act_train", options, results, x, gamma, beta, residual))


@functools.cache
def _train_function():
    import jax

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def train(options, x, gamma, beta, residual):
        return _train_forward(options, x, gamma, beta, residual)

    def forward(options, x, gamma, beta, residual):
        y, mean, var = _train_forward(options, x, gamma, beta, residual)
        return (y, mean, var), (x, gamma, beta, residual, mean, var)

    def backward(options, saved, cotangents):
        # mean and var are statistics for the moving averages: no gradient
        # flows back through them (as on the other adapters).
        dy = cotangents[0]
        x, gamma, beta, residual, mean, var = saved
        shapes = _gradient_shapes(x, options, has_first_param=True)
        args = (dy, x, residual, mean, var, gamma, beta)
        return tuple(_call("bn_add_act_backward", options, shapes, *args))

    train.defvjp(forward, backward)
    return train


@functools.cache
def _epilogue_function():
    import jax

    def run(options, x, scale, shift, residual):
        results = [(x.shape, x.dtype)]
        return _call("scale_shift_add_act", options, results, x, scale, shift, residual)[0]

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def epilogue(options, x, scale, shift, residual):
        return run(options, x, scale, shift, residual)

    def forward(options, x, scale, shift, residual):
        return run(options, x, scale, shift, residual), (x, scale, shift, residual)

    def backward(options, saved, dy):
        x, scale, shift, residual = saved
        shapes = _gradient_shapes(x, options, has_first_param=options.has_scale)
        args = (dy, x, scale, shift, residual)
        return tuple(_call("scale_shift_add_act_backward", options, shapes, *args))

    epilogue.defvjp(forward, backward)
    return epilogue


def _check_x(x, name: str) -> None:
    import jax.numpy as jnp

    dtype = jnp.dtype(x.dtype).name
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"`x` must be float16, bfloat16, float32 or float64 for {name}. "
            f"Received: x.dtype={dtype}"
        )
    if x.ndim != 4:
        raise ValueError(f"`x` must be a 4D tensor for {name}. Received: x.shape={x.shape}")


def _residual(residual, x):
    import jax.numpy as jnp

    if residual is None:
        return jnp.zeros((0,), x.dtype), False
    residual = jnp.asarray(residual).astype(x.dtype)
    if residual.shape != x.shape:
        raise ValueError(
            f"`residual` must have the shape of `x`, {x.shape}. "
            f"Received: residual.shape={residual.shape}"
        )
    return residual, True


def _per_channel(name: str, value, x, channels_last: bool):
    import jax.numpy as jnp

    value = jnp.asarray(value).astype(_param_dtype(x.dtype))
    c = x.shape[-1 if channels_last else 1]
    if value.shape != (c,):
        raise ValueError(
            f"`{name}` must have shape ({c},), one value per channel of `x`. "
            f"Received: {name}.shape={value.shape}"
        )
    return value


def _prepare(x, residual, name: str, *, activation, alpha, channels_last, **extra):
    """x as an array, checked; the residual (or an empty stand-in); the call's `_Options`."""
    import jax.numpy as jnp

    x = jnp.asarray(x)
    _check_x(x, name)
    residual, has_residual = _residual(residual, x)
    options = _Options(
        activation=_build.check_activation_code(activation),
        alpha=float(alpha),
        channels_last=bool(channels_last),
        has_residual=has_residual,
        **extra,
    )
    return x, residual, options


def bn_add_act_train(
    x,
    gamma,
    beta,
    residual,
    *,
    epsilon: float,
    activation: int,
    alpha: float,
    channels_last: bool,
):
    """Training-mode BatchNormalization + residual add + activation, on JAX arrays.

    The contract of `native.Adapter.bn_add_act_train`, as the TensorFlow
    adapter documents it: `(y, mean, var)` with `y = act(gamma * (x - mean) /
    sqrt(var + epsilon) + beta + residual)` and the batch mean and biased
    variance of `x` (float64 for float64 `x`, else float32). Differentiable
    (`jax.custom_vjp`) with respect to `x`, `gamma`, `beta` and `residual`;
    `mean` and `var` carry no gradient. `residual` may be None.

    Raises:
        ValueError: bad dtype, rank, activation, epsilon or shapes.
        NativeUnavailable: the handler library cannot be built or loaded.
    """
    load()
    if not epsilon > 0:
        raise ValueError(f"`epsilon` must be positive. Received: epsilon={epsilon!r}")
    x, residual, options = _prepare(
        x,
        residual,
        "the fused BatchNormalization op",
        activation=activation,
        alpha=alpha,
        channels_last=channels_last,
        epsilon=float(epsilon),
    )
    gamma = _per_channel("gamma", gamma, x, options.channels_last)
    beta = _per_channel("beta", beta, x, options.channels_last)
    return _train_function()(options, x, gamma, beta, residual)


def scale_shift_add_act(
    x,
    scale,
    shift,
    residual,
    *,
    activation: int,
    alpha: float,
    channels_last: bool,
):
    """`act(x * scale + shift + residual)` per channel, on JAX arrays.

    The contract of `native.Adapter.scale_shift_add_act`: `y` of the shape
    and dtype of `x`, differentiable with respect to `x`, `scale`, `shift`
    and `residual` (independent inputs, as at inference or in a folded
    model). `scale` (1) and `residual` (0) may be None.

    Raises:
        ValueError: bad dtype, rank, activation or shapes.
        NativeUnavailable: the handler library cannot be built or loaded.
    """
    load()
    import jax.numpy as jnp

    x, residual, options = _prepare(
        x,
        residual,
        "the fused epilogue op",
        activation=activation,
        alpha=alpha,
        channels_last=channels_last,
        has_scale=scale is not None,
    )
    if options.has_scale:
        scale = _per_channel("scale", scale, x, options.channels_last)
    else:
        scale = jnp.zeros((0,), _param_dtype(x.dtype))
    shift = _per_channel("shift", shift, x, options.channels_last)
    return _epilogue_function()(options, x, scale, shift, residual)
