"""Saved files load in a fresh process that only imported keras_residual."""

import keras
import numpy as np
import pytest
from helpers import random_input, run_fresh_python, train_a_little

import keras_residual

pytestmark = pytest.mark.slow

LOAD_AND_PREDICT = """
import sys
import numpy as np
import keras
import keras_residual

model = keras.saving.load_model(sys.argv[1])  # safe_mode=True by default
assert type(model).__name__ == sys.argv[4], type(model).__name__
np.save(sys.argv[3], keras.ops.convert_to_numpy(model(np.load(sys.argv[2]))))
"""


def sequential_model():
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, padding="same"),
            keras_residual.ResidualBlock(8, activation="leaky_relu", drop_path_rate=0.1),
            keras_residual.ResidualBlock(16, strides=2, kernel_regularizer="l2"),
            keras_residual.BottleneckBlock(4, strides=2, stride_on="1x1"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize(
    "make_model, input_shape, type_name",
    [
        (sequential_model, (4, 16, 16, 3), "Sequential"),
        (
            lambda: keras_residual.ResNet18(input_shape=(32, 32, 3), classes=5),
            (2, 32, 32, 3),
            "ResNet18",
        ),
        (
            lambda: keras_residual.ResNet(
                block_type="bottleneck",
                stage_depths=(1, 2),
                stage_filters=(4, 8),
                include_top=False,
                data_format="channels_first",
            ),
            (2, 3, 32, 32),
            "ResNet",
        ),
    ],
)
def test_keras_file_loads_in_a_fresh_process(tmp_path, make_model, input_shape, type_name):
    model = make_model()
    x = random_input(input_shape)
    train_a_little(model, x)
    path, x_path, out = tmp_path / "m.keras", tmp_path / "x.npy", tmp_path / "y.npy"
    model.save(path)
    np.save(x_path, x)
    run_fresh_python(LOAD_AND_PREDICT, path, x_path, out, type_name)
    np.testing.assert_allclose(
        np.load(out), keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-6
    )


def test_weights_file_loads_in_a_fresh_process(tmp_path):
    model = sequential_model()
    x = random_input((4, 16, 16, 3))
    train_a_little(model, x)
    model.save_weights(tmp_path / "m.weights.h5")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "m.json").write_text(model.to_json())
    code = """
    import sys
    import numpy as np
    import keras
    import keras_residual

    model = keras.models.model_from_json(open(sys.argv[4]).read())  # a fresh, untrained copy
    model.load_weights(sys.argv[1])
    np.save(sys.argv[3], keras.ops.convert_to_numpy(model(np.load(sys.argv[2]))))
    """
    run_fresh_python(
        code, tmp_path / "m.weights.h5", tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "m.json"
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-6
    )


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="model.export writes a TF SavedModel"
)
def test_export_is_served_without_keras_residual(tmp_path):
    model = keras_residual.ResNet18(input_shape=(32, 32, 3), classes=4)
    x = random_input((2, 32, 32, 3))
    model.export(str(tmp_path / "saved"), verbose=False)
    np.save(tmp_path / "x.npy", x)
    code = """
    import sys
    import numpy as np
    import tensorflow as tf

    served = tf.saved_model.load(sys.argv[1])
    np.save(sys.argv[3], served.serve(tf.constant(np.load(sys.argv[2]))).numpy())
    assert not any(name.startswith("keras_residual") for name in sys.modules)
    print("served without keras_residual")
    """
    out = run_fresh_python(code, tmp_path / "saved", tmp_path / "x.npy", tmp_path / "y.npy")
    assert "served without keras_residual" in out
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-6
    )
