"""The demo: a ResNet built as a keras.Sequential of residual blocks.

It trains on scikit-learn's bundled handwritten digits (1,797 real 8x8
scans, no download), reports the accuracy on a held-out 25%, saves the model
as a ``.keras`` file, reloads it in a fresh Python process that only imports
``keras_residual``, and checks that the predictions agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

# Run in a fresh process: load the saved model and write its predictions.
_RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import keras
    import keras_residual  # registers the layers; nothing else is needed

    model = keras.saving.load_model(sys.argv[1])  # safe_mode=True
    np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
    """
)


def build_model(num_classes: int = 10):
    """A small ResNet for 8x8 grayscale digits, as a keras.Sequential."""
    import keras

    from keras_residual import ResidualBlock

    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            ResidualBlock(32),
            ResidualBlock(32),
            ResidualBlock(64, strides=2),  # projection shortcut added by itself
            ResidualBlock(64),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="digits_resnet",
    )


def load_digits_split(seed: int = 0):
    """The digits as (N, 8, 8, 1) floats in [0, 1], split 75/25, stratified."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:  # pragma: no cover - depends on the install
        raise SystemExit(
            "The demo needs scikit-learn for its bundled digits data: "
            "pip install 'keras_residual[demo]'"
        ) from error
    digits = load_digits()
    images = (digits.images / 16.0).astype("float32")[..., None]
    return train_test_split(
        images, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )


def run(
    epochs: int = 20,
    batch_size: int = 32,
    seed: int = 0,
    out_dir: str | None = None,
    min_accuracy: float = 0.98,
    verbose: int = 1,
) -> dict:
    """Trains, evaluates, saves and reloads; returns what it measured.

    Returns:
        A dict with `test_accuracy`, `train_seconds`, `model_path`,
        `reload_max_abs_diff` and `reload_agree` (whether the reloaded
        model predicts the same classes and probabilities within 1e-5).
    """
    import keras

    start = time.perf_counter()
    print(f"keras_residual demo: Keras {keras.__version__}, backend {keras.config.backend()}")
    keras.utils.set_random_seed(seed)

    x_train, x_test, y_train, y_test = load_digits_split(seed)
    print(
        f"[1/4] Data: scikit-learn digits, {len(x_train)} training and "
        f"{len(x_test)} held-out test images of 8x8 pixels"
    )

    model = build_model()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    print(f"[2/4] Model: keras.Sequential of ResidualBlocks, {model.count_params():,} parameters")
    if verbose:
        model.summary()

    print(f"[3/4] Training for {epochs} epochs")
    train_start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, verbose=verbose)
    train_seconds = time.perf_counter() - train_start
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(
        f"      test accuracy: {accuracy:.4f} on {len(x_test)} held-out images "
        f"(training took {train_seconds:.1f} s)"
    )

    out_dir = out_dir or tempfile.mkdtemp(prefix="keras_residual_demo_")
    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.join(out_dir, "digits_resnet.keras")
    inputs_path = os.path.join(out_dir, "test_images.npy")
    reloaded_path = os.path.join(out_dir, "reloaded_predictions.npy")
    model.save(model_path)
    np.save(inputs_path, x_test)
    print(f"[4/4] Saved {model_path}; reloading it in a fresh Python process")
    subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, model_path, inputs_path, reloaded_path],
        check=True,
    )
    expected = model.predict(x_test, verbose=0)
    reloaded = np.load(reloaded_path)
    max_diff = float(np.max(np.abs(expected - reloaded)))
    agree = bool(max_diff <= 1e-5 and np.array_equal(expected.argmax(-1), reloaded.argmax(-1)))
    print(
        f"      reloaded predictions {'agree' if agree else 'DISAGREE'} "
        f"(max abs difference {max_diff:.2e})"
    )

    result = {
        "test_accuracy": float(accuracy),
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "model_path": model_path,
        "reload_max_abs_diff": max_diff,
        "reload_agree": agree,
        "passed": agree and accuracy >= min_accuracy,
    }
    with open(os.path.join(out_dir, "demo_result.json"), "w") as file:
        json.dump(result, file, indent=2)
    verdict = "PASSED" if result["passed"] else "FAILED"
    print(
        f"Demo {verdict}: test accuracy {accuracy:.4f} (target {min_accuracy:.2f}), "
        f"reload {'ok' if agree else 'mismatch'}, {result['total_seconds']:.0f} s in all"
    )
    return result
