"""Package-wide settings.

``implementation`` is how every conv -> BN (-> add) -> activation unit runs
when a block, a model or ``keras_residual.ops.conv_bn_add_act`` is given
``implementation=None``:

- ``"auto"`` (the default): the native kernels where an adapter exists for the
  active backend and device, the composite path elsewhere; at inference, what
  ``keras_residual.native.AUTO_INFERENCE`` says for the backend.
- ``"native"``: the native kernels, or a clear error saying why not.
- ``"composite"``: ``keras.ops`` only; never compiles anything.

The environment variable ``KERAS_RESIDUAL_IMPLEMENTATION`` sets the default
at import; ``set_implementation`` changes it at run time.

Examples:

>>> from keras_residual import config
>>> previous = config.get_implementation()
>>> config.set_implementation("composite")
>>> config.get_implementation()
'composite'
>>> config.set_implementation(previous)
"""

from __future__ import annotations

import contextlib
import os

IMPLEMENTATIONS = ("auto", "native", "composite")
ENV_VAR = "KERAS_RESIDUAL_IMPLEMENTATION"


def _check(implementation, name="implementation"):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"`{name}` must be one of {', '.join(map(repr, IMPLEMENTATIONS))}. "
            f"Received: {name}={implementation!r}"
        )
    return implementation


def _from_environment() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    return _check(value, ENV_VAR)


_implementation = _from_environment()


def get_implementation() -> str:
    """The global default implementation: `"auto"`, `"native"` or `"composite"`."""
    return _implementation


def set_implementation(implementation: str) -> None:
    """Sets the global default implementation.

    Args:
        implementation: `"auto"`, `"native"` or `"composite"`.

    Raises:
        ValueError: for any other value.
    """
    global _implementation
    _implementation = _check(implementation)


@contextlib.contextmanager
def implementation_scope(implementation: str):
    """Sets the global implementation inside a `with` block.

    Args:
        implementation: `"auto"`, `"native"` or `"composite"`.

    Examples:

    >>> from keras_residual import config
    >>> with config.implementation_scope("composite"):
    ...     config.get_implementation()
    'composite'
    """
    previous = get_implementation()
    set_implementation(implementation)
    try:
        yield
    finally:
        set_implementation(previous)
