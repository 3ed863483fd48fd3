"""Timing: warm-up, then repeats interleaved across the rows."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def summary(values) -> dict:
    """Median, quartiles and extremes of a list of numbers.

    Examples:

    >>> summary([4.0, 1.0, 3.0, 2.0])
    {'median': 2.5, 'q1': 1.75, 'q3': 3.25, 'min': 1.0, 'max': 4.0}
    """
    array = np.asarray(values, dtype="float64")
    return {
        "median": float(np.median(array)),
        "q1": float(np.percentile(array, 25)),
        "q3": float(np.percentile(array, 75)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


class Case:
    """One row being timed: a label and a function that runs one step.

    `step()` must return only once the device has finished the step (the
    Keras `*_on_batch` methods return NumPy values, which waits).
    """

    def __init__(self, label: str, step: Callable[[], object]):
        self.label = label
        self.step = step
        self.warmup_seconds = None
        self.seconds: list[float] = []
        self.error = None


def interleaved(
    cases: list[Case],
    *,
    repeats: int,
    steps: int,
    warmup: int,
    log: Callable[[str], None],
) -> None:
    """Times every case; fills `warmup_seconds` and `seconds`.

    Each case first runs `warmup` steps (tracing and compilation happen
    there; their wall time is `warmup_seconds`). Then, `repeats` times, every
    case runs `steps` steps in a row and the wall time of those is one
    sample. A case whose warm-up raises gets `error` set and is not timed.
    Cases take turns within each repeat, and the order rotates from
    one repeat to the next, so that slow drifts of the machine (heat, other
    load) spread over all rows instead of biasing one.
    """
    for case in cases:
        start = time.perf_counter()
        try:
            for _ in range(warmup):
                case.step()
        except Exception as error:  # noqa: BLE001 - one failing row must not end the run
            case.error = f"{type(error).__name__}: {error}"
            log(f"  warm-up {case.label} FAILED: {case.error}")
            continue
        case.warmup_seconds = time.perf_counter() - start
        log(f"  warm-up {case.label}: {case.warmup_seconds:.1f} s")
    cases = [case for case in cases if case.error is None]
    for repeat in range(repeats):
        shift = repeat % len(cases) if cases else 0
        order = cases[shift:] + cases[:shift]
        for case in order:
            start = time.perf_counter()
            for _ in range(steps):
                case.step()
            case.seconds.append(time.perf_counter() - start)
        line = ", ".join(f"{case.label} {case.seconds[-1] / steps * 1e3:.1f}" for case in cases)
        log(f"  repeat {repeat + 1}/{repeats} (ms/step): {line}")
