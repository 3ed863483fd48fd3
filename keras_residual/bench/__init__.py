"""``python -m keras_residual bench``: side-by-side speed of the implementations.

One process, the active Keras backend, one network, and up to seven rows:

- ``keras.applications``: the stock Keras graph (the baseline of the ratios).
- ``torchvision``: the plain-PyTorch peer, torchvision's ``resnet50`` /
  ``resnet18`` in eager PyTorch (``channels_last`` memory format, random
  init), on the torch backend only; skipped, with the reason, on the other
  backends, for ``--model block`` and where torchvision is not importable.
- ``composite``: this package with ``implementation="composite"``
  (``keras.ops`` only).
- ``native``: this package with ``implementation="native"`` (the fused
  kernels); skipped, with the reason, where they are unavailable.
- ``auto``: this package with ``implementation="auto"``, the default: what a
  user gets without choosing (native where the backend and device have the
  kernels, composite elsewhere).
- ``folded``: ``keras_residual.fold_batchnorm`` of the model (inference only).
- ``limit``: the same convolutions with every BatchNormalization, bias,
  residual add and activation removed: the bound on what fusing them can
  win, reported for comparison, never as a speed of this package.

``--arch keras`` (the default) builds this package's rows as the
``keras.applications`` network (v1: conv biases, epsilon 1.001e-5, momentum
0.99, stride on the first 1x1); ``--arch v1.5`` builds them as torchvision's
network (stride on the 3x3, no conv biases, epsilon 1e-5, momentum 0.9,
symmetric padding), and the limit with its strides. The
``keras.applications`` row stays the stock Keras network either way.

Inference times ``model.predict_on_batch``, training ``model.train_on_batch``
(forward, loss, backward and an SGD update) for every Keras row alike; the
torchvision row times ``model(x)`` under ``torch.inference_mode()`` and an
SGD step (see ``_peer``). Warm-up steps (tracing and compilation included)
are excluded from the timings and reported; the timed repeats take turns
across the rows.

Every record carries its images/s ratio to the ``keras.applications`` row,
to the limit and, where the torchvision row ran, to torchvision
(``ratio_vs_torchvision``). Writes ``results.json`` (records plus host,
versions and device), ``results.md`` (tables) and ``results.png`` (bar
chart, plus a panel of the ratios to torchvision where it ran) into
``--out``.

This module imports nothing heavy at import time; Keras and the backend are
imported when a run starts.
"""

from __future__ import annotations

import argparse
import sys
import time

LABELS = (
    "keras.applications",
    "torchvision",
    "composite",
    "native",
    "auto",
    "folded",
    "limit",
)
MODELS = ("resnet50", "resnet18", "block")
ARCHS = ("keras", "v1.5")
MODES = ("inference", "train")
DTYPES = ("float32", "mixed_float16", "mixed_bfloat16")
JIT_CHOICES = ("auto", "true", "false")

# --quick: a small ResNet18 that finishes every row and both modes within a
# few minutes on a 2-core CPU, on TensorFlow and on torch.
QUICK = {
    "model": "resnet18",
    "batch_size": 4,
    "image_size": 64,
    "repeats": 5,
    "steps": 2,
    "warmup": 2,
}
DEFAULTS = {
    "model": "resnet50",
    "mode": "both",
    "batch_size": 32,
    "image_size": None,  # 224, or 56 for the block
    "dtype": "float32",
    "repeats": 5,
    "steps": 3,
    "warmup": 2,
    "out": "bench-results",
    "jit_compile": "auto",
    "seed": 0,
    "arch": "keras",
}


def _labels(text: str) -> tuple:
    labels = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [label for label in labels if label not in LABELS]
    if not labels or unknown:
        raise argparse.ArgumentTypeError(
            f"must be a comma-separated list of {', '.join(LABELS)}. "
            f"Received: --implementations={text!r}"
        )
    return labels


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer. Received: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``python -m keras_residual bench`` to `parser`."""
    parser.description = (
        "Time keras.applications, torchvision (torch backend only), composite, native, "
        "auto, folded and the limit side by side on the active Keras backend "
        "(KERAS_BACKEND). Ratios are against keras.applications, the limit and, where it "
        "ran, torchvision."
    )
    add = parser.add_argument
    add("--model", choices=MODELS, default=None, help="network (default resnet50)")
    add(
        "--mode",
        choices=(*MODES, "both"),
        default=None,
        help="inference (predict_on_batch), train (train_on_batch with SGD) or both (default both)",
    )
    add("--batch-size", type=_positive, default=None, help="batch size (default 32)")
    add(
        "--image-size",
        type=_positive,
        default=None,
        help="input height and width (default 224; 56 for --model block)",
    )
    add("--dtype", choices=DTYPES, default=None, help="Keras dtype policy (default float32)")
    add(
        "--implementations",
        type=_labels,
        default=None,
        help=f"comma-separated rows, from {','.join(LABELS)} (default all; torchvision "
        "runs on the torch backend only and is skipped, with the reason, elsewhere)",
    )
    add(
        "--arch",
        choices=ARCHS,
        default=None,
        help="network of the keras_residual rows (composite, native, auto, folded) and of "
        "the limit's strides: keras, the keras.applications ResNet (v1: conv biases, "
        "epsilon 1.001e-5, stride on the 1x1), or v1.5, torchvision's (stride on the 3x3, "
        "no conv biases, epsilon 1e-5, momentum 0.9, symmetric padding); the "
        "keras.applications row is the stock network either way (default keras)",
    )
    add("--repeats", type=_positive, default=None, help="timed repeats per row (default 5)")
    add("--steps", type=_positive, default=None, help="steps per timed repeat (default 3)")
    add(
        "--warmup",
        type=_positive,
        default=None,
        help="untimed warm-up steps per row, compilation included (default 2)",
    )
    add(
        "--data-format",
        choices=("channels_last", "channels_first"),
        default=None,
        help="image layout (default keras.config.image_data_format())",
    )
    add(
        "--jit-compile",
        choices=JIT_CHOICES,
        default=None,
        help="model.compile(jit_compile=...) for every row (default auto: Keras' choice)",
    )
    add("--seed", type=int, default=None, help="seed of the random inputs (default 0)")
    add(
        "--quick",
        action="store_true",
        help="small defaults that finish in a few minutes on 2 CPU cores: "
        + ", ".join(f"{key}={value}" for key, value in QUICK.items())
        + " (options given explicitly still win)",
    )
    add("--out", default=None, help="output folder (default ./bench-results)")


def run_from_args(args: argparse.Namespace) -> int:
    """Runs the benchmark that `args` describes.

    Returns:
        The exit status: 0 when every row ran or was skipped for a stated
        reason, 1 when a row failed with an error.
    """
    options = {key: getattr(args, key, None) for key in DEFAULTS}
    options["implementations"] = getattr(args, "implementations", None)
    options["data_format"] = getattr(args, "data_format", None)
    if getattr(args, "quick", False):
        for key, value in QUICK.items():
            if options.get(key) is None:
                options[key] = value
    options = {key: value for key, value in options.items() if value is not None}
    results = run(**options)
    return 1 if any(record.get("error") for record in results["records"]) else 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return value


def _check_positive(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def run(
    model: str = "resnet50",
    mode: str = "both",
    batch_size: int = 32,
    image_size: int | None = None,
    dtype: str = "float32",
    implementations=LABELS,
    repeats: int = 5,
    steps: int = 3,
    warmup: int = 2,
    out: str | None = "bench-results",
    jit_compile: str = "auto",
    seed: int = 0,
    data_format: str | None = None,
    arch: str = "keras",
    log=_log,
) -> dict:
    """Runs the benchmark; writes and returns the results.

    Args:
        model: `"resnet50"`, `"resnet18"` or `"block"` (ResNet50's
            `conv2_block2`, a 64-filter bottleneck on a 256-channel map).
            Defaults to `"resnet50"`.
        mode: `"inference"`, `"train"` or `"both"`. Defaults to `"both"`.
        batch_size: int. Defaults to `32`.
        image_size: int, or `None` for 224 (56 for the block).
            Defaults to `None`.
        dtype: `"float32"`, `"mixed_float16"` or `"mixed_bfloat16"`, set as
            the global Keras dtype policy for the run and restored after.
            Defaults to `"float32"`.
        implementations: the row labels to run, from `LABELS`.
            Defaults to all of them.
        repeats: int. Timed repeats per row. Defaults to `5`.
        steps: int. Steps per timed repeat. Defaults to `3`.
        warmup: int. Untimed steps per row before timing. Defaults to `2`.
        out: folder for `results.json`, `results.md` and `results.png`, or
            `None` to write nothing. Defaults to `"bench-results"`.
        jit_compile: `"auto"`, `"true"` or `"false"`: `model.compile`'s
            `jit_compile` for every row. Defaults to `"auto"`.
        seed: int. Seed of the random inputs and labels. Defaults to `0`.
        data_format: `"channels_last"`, `"channels_first"` or `None` for
            `keras.config.image_data_format()`. Defaults to `None`.
        arch: `"keras"` or `"v1.5"`: the network of this package's rows
            (and the limit's strides), the `keras.applications` ResNet or
            torchvision's. Defaults to `"keras"`.
        log: function that receives the progress lines. Defaults to
            printing them on stderr.

    Returns:
        The results: a dict with `host`, `versions`, `backend`, `device`,
        `arch`, `config` and `records` (one per mode and row).

    Raises:
        ValueError: for an argument out of range.
    """
    import keras
    import numpy as np

    from keras_residual.bench import _env, _models, _report

    _check_choice(model, "model", MODELS)
    _check_choice(mode, "mode", (*MODES, "both"))
    _check_choice(dtype, "dtype", DTYPES)
    _check_choice(jit_compile, "jit_compile", JIT_CHOICES)
    _check_choice(arch, "arch", ARCHS)
    implementations = tuple(implementations)
    for label in implementations:
        _check_choice(label, "implementations", LABELS)
    if not implementations:
        raise ValueError("`implementations` must name at least one row. Received: ()")
    for name, value in (
        ("batch_size", batch_size),
        ("repeats", repeats),
        ("steps", steps),
        ("warmup", warmup),
    ):
        _check_positive(value, name)
    image_size = _models.DEFAULT_IMAGE_SIZE[model] if image_size is None else image_size
    _check_positive(image_size, "image_size")
    if model != "block" and image_size < 32:
        raise ValueError(
            f"`image_size` must be at least 32 for {model} (5 stride-2 stages). "
            f"Received: image_size={image_size}"
        )
    data_format = data_format or keras.config.image_data_format()
    _check_choice(data_format, "data_format", ("channels_last", "channels_first"))
    modes = MODES if mode == "both" else (mode,)
    jit = {"auto": "auto", "true": True, "false": False}[jit_compile]

    backend = keras.config.backend()
    device = _env.device(backend)
    log(
        f"keras_residual bench: {model} ({arch}), {'+'.join(modes)}, batch {batch_size}, "
        f"{image_size}px, {dtype}, {backend} on {device}"
    )
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        rows = _build_rows(
            implementations, model, image_size, data_format, jit, log, arch=arch, dtype=dtype
        )
        rng = np.random.default_rng(seed)
        shape = (batch_size, *_models.input_shape(model, image_size, data_format))
        x = rng.uniform(0.0, 1.0, size=shape).astype("float32")
        y = _targets(rows, model, x, rng)
        # On the device once, so that no step pays a host-to-device copy.
        x = keras.ops.convert_to_tensor(x)
        y = None if y is None else keras.ops.convert_to_tensor(y)
        records = []
        for current in modes:
            records += _run_mode(
                current,
                rows,
                implementations,
                x,
                y,
                repeats,
                steps,
                warmup,
                log,
                data_format=data_format,
            )
    finally:
        keras.config.set_dtype_policy(previous_policy)

    base = {
        "model": model,
        "backend": backend,
        "device": device,
        "dtype": dtype,
        "batch_size": batch_size,
        "image_size": image_size,
        "data_format": data_format,
    }
    records = [
        {**base, "arch": _models.row_arch(record["implementation"], arch), **record}
        for record in records
    ]
    _add_ratios(records)
    versions = _env.versions(backend)
    if rows.get("torchvision") is not None and rows["torchvision"].skipped is None:
        versions["torchvision"] = rows["torchvision"].notes.get("torchvision")
    results = {
        "host": _env.host(),
        "versions": versions,
        "backend": backend,
        "device": device,
        "arch": arch,
        "config": {
            **base,
            "modes": list(modes),
            "implementations": list(implementations),
            "repeats": repeats,
            "steps": steps,
            "warmup": warmup,
            "jit_compile": jit_compile,
            "seed": seed,
            "arch": arch,
        },
        "native": _env.native_info() if "native" in implementations else None,
        "records": records,
    }
    if out is not None:
        paths = _report.write(results, out)
        log(f"wrote {', '.join(paths.values())}")
        if "chart" not in paths:
            log("no results.png: matplotlib is not installed (pip install 'keras_residual[bench]')")
        print(_report.markdown(results))
    return results


class _Row:
    def __init__(self, label):
        self.label = label
        self.model = None
        self.peer = None  # the torchvision row: a _peer.Peer instead of a Keras model
        self.notes: dict = {}
        self.skipped = None
        self.error = False
        self.build_seconds = None


def _build_rows(labels, model, image_size, data_format, jit, log, arch="keras", dtype="float32"):
    import traceback

    import keras

    from keras_residual.bench import _models, _peer

    rows = {}
    for label in labels:
        row = _Row(label)
        rows[label] = row
        log(f"building {label}")
        start = time.perf_counter()
        try:
            if label == "torchvision":
                row.peer, row.notes = _peer.build(model, dtype, keras.config.backend())
                row.build_seconds = time.perf_counter() - start
                log(f"  built in {row.build_seconds:.1f} s")
                row.notes["params"] = row.peer.params
                row.notes["jit_compile"] = False
                continue
            row.model, row.notes = _models.build(label, model, image_size, data_format, arch)
        except _models.Unavailable as reason:
            row.skipped = str(reason)
            log(f"  skipped: {row.skipped}")
            continue
        except Exception as error:  # noqa: BLE001 - one failing row must not end the run
            row.skipped = f"error while building: {type(error).__name__}: {error}"
            row.error = True
            log(traceback.format_exc())
            continue
        logits = label == "limit"
        if model == "block":
            loss = "mean_squared_error"
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=logits)
        row.model.compile(
            optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
            loss=loss,
            jit_compile=jit,
        )
        row.build_seconds = time.perf_counter() - start
        log(f"  built in {row.build_seconds:.1f} s")
        row.notes["params"] = int(row.model.count_params())
        row.notes["jit_compile"] = bool(row.model.jit_compile)
    return rows


def _targets(rows, model, x, rng):
    if model != "block":
        return rng.integers(0, 1000, size=(x.shape[0],)).astype("int32")
    built = [row.model for row in rows.values() if row.model is not None]
    if not built:
        return None
    output_shape = built[0].compute_output_shape(x.shape)
    return rng.normal(size=output_shape).astype("float32")


def _run_mode(mode, rows, labels, x, y, repeats, steps, warmup, log, data_format="channels_last"):
    from keras_residual.bench import _measure

    log(f"{mode}:")
    cases = []
    skipped = {}
    for label in labels:
        row = rows[label]
        if row.skipped is not None:
            skipped[label] = row.skipped
        elif row.peer is not None:
            # Layout and device conversions happen here, once, untimed.
            peer_x, peer_y = row.peer.bind(x, y, data_format)
            if mode == "train":
                step = row.peer.train_step(peer_x, peer_y)
            else:
                step = row.peer.inference_step(peer_x)
            cases.append(_measure.Case(label, step))
        elif mode == "train" and label == "folded":
            skipped[label] = (
                "folding BatchNormalization into the convolutions is an inference-only "
                "transform; a folded model does not train"
            )
        elif mode == "train":
            cases.append(_measure.Case(label, lambda m=row.model: m.train_on_batch(x, y)))
        else:
            cases.append(_measure.Case(label, lambda m=row.model: m.predict_on_batch(x)))
    _measure.interleaved(cases, repeats=repeats, steps=steps, warmup=warmup, log=log)
    by_label = {case.label: case for case in cases}
    batch = int(x.shape[0])
    records = []
    for label in labels:
        row = rows[label]
        record = {
            "mode": mode,
            "implementation": label,
            "images_per_second": None,
            "ratio_vs_keras_applications": None,
            "ratio_vs_limit": None,
            "ratio_vs_torchvision": None,
            "spread": None,
            "seconds_per_step": None,
            "repeats": repeats,
            "steps": steps,
            "warmup_steps": warmup,
            "warmup_seconds": None,
            "build_seconds": row.build_seconds,
            "skipped": skipped.get(label),
            "error": row.error,
            "notes": dict(row.notes),
        }
        case = by_label.get(label)
        if case is not None and case.error is not None:
            record["skipped"] = f"error in the first step: {case.error}"
            record["error"] = True
        elif case is not None:
            rates = [batch * steps / seconds for seconds in case.seconds]
            stats = _measure.summary(rates)
            record["images_per_second"] = stats["median"]
            record["spread"] = {**stats, "iqr": stats["q3"] - stats["q1"]}
            record["seconds_per_step"] = _measure.summary([s / steps for s in case.seconds])
            record["warmup_seconds"] = case.warmup_seconds
        records.append(record)
    return records


RATIOS = (
    ("ratio_vs_keras_applications", "keras.applications"),
    ("ratio_vs_limit", "limit"),
    ("ratio_vs_torchvision", "torchvision"),
)


def _add_ratios(records):
    """Each row's median images/s over keras.applications', the limit's and torchvision's.

    A ratio is `None` where its reference row has no timing in the mode
    (not run, skipped or failed).
    """
    for mode in {record["mode"] for record in records}:
        group = [record for record in records if record["mode"] == mode]
        speed = {record["implementation"]: record["images_per_second"] for record in group}
        for record in group:
            for key, _ in RATIOS:
                record.setdefault(key, None)
            for key, label in RATIOS:
                if record["images_per_second"] is not None and speed.get(label):
                    record[key] = record["images_per_second"] / speed[label]
