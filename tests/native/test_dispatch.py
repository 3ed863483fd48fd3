"""The native path against the composite one, through Keras, on the active backend.

Skipped, with the reason, where the active backend has no native adapter
(NumPy, OpenVINO) or it cannot be built here.
"""

import os
import platform

import keras
import numpy as np
import pytest
from keras import ops

import keras_residual
from keras_residual import BottleneckBlock, ResidualBlock, native
from keras_residual.ops import conv_bn_add_act
from tests.helpers import run_fresh_python

BACKEND = keras.config.backend()


@pytest.fixture(scope="module", autouse=True)
def _native_adapter():
    if BACKEND not in native.ADAPTERS:
        pytest.skip(f"no native adapter on the {BACKEND} backend (composite only)")
    try:
        native.adapter(BACKEND)
    except native.NativeUnavailable as error:
        pytest.skip(f"native adapter unavailable here: {str(error).splitlines()[0]}")


def _np(x):
    return ops.convert_to_numpy(ops.cast(x, "float32"))


def _formats():
    return ["channels_last"] if BACKEND == "tensorflow" else ["channels_last", "channels_first"]


def _case(shape, filters, data_format, dtype, seed=0, kernel_size=3):
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    x = rng.normal(size=shape)
    if data_format == "channels_first":
        x = x.transpose(0, 3, 1, 2)
    args = dict(
        inputs=ops.cast(x.astype("float32"), dtype),
        kernel=ops.cast(
            rng.normal(0, 0.3, size=(kernel_size, kernel_size, c, filters)).astype("float32"), dtype
        ),
        gamma=rng.uniform(0.5, 1.5, filters).astype("float32"),
        beta=rng.normal(0, 0.2, filters).astype("float32"),
        moving_mean=rng.normal(0, 0.2, filters).astype("float32"),
        moving_variance=rng.uniform(0.5, 2.0, filters).astype("float32"),
        bias=rng.normal(0, 0.2, filters).astype("float32"),
        data_format=data_format,
    )
    out_shape = (n, h, w, filters) if data_format == "channels_last" else (n, filters, h, w)
    residual = ops.cast(rng.normal(size=out_shape).astype("float32"), dtype)
    return args, residual


TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


@pytest.mark.parametrize("data_format", _formats())
@pytest.mark.parametrize("activation", ["linear", "relu", "leaky_relu", "relu6", "silu", "gelu"])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("training", [False, True])
def test_native_equals_composite(data_format, activation, with_residual, training):
    args, residual = _case((2, 5, 5, 3), 7, data_format, "float32")
    residual = residual if with_residual else None
    results = [
        conv_bn_add_act(
            residual=residual,
            activation=activation,
            training=training,
            implementation=implementation,
            **args,
        )
        for implementation in ("native", "composite")
    ]
    if not training:
        results = [[result] for result in results]
    for native_value, composite_value in zip(*results, strict=True):
        np.testing.assert_allclose(_np(native_value), _np(composite_value), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("training", [False, True])
def test_native_equals_composite_in_low_precision(dtype, training):
    args, residual = _case((2, 4, 4, 8), 16, "channels_last", dtype, seed=3)
    results = [
        conv_bn_add_act(residual=residual, training=training, implementation=implementation, **args)
        for implementation in ("native", "composite")
    ]
    native_y = results[0][0] if training else results[0]
    composite_y = results[1][0] if training else results[1]
    assert keras.backend.standardize_dtype(native_y.dtype) == dtype
    np.testing.assert_allclose(
        _np(native_y), _np(composite_y), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * 4
    )


@pytest.mark.parametrize(
    "shape, filters, kernel_size",
    [
        ((1, 1, 1, 3), 5, 1),  # 1x1 spatial, batch 1
        ((1, 3, 2, 2), 17, 3),  # channels not a multiple of a vector width
        ((3, 7, 5, 4), 33, 1),
    ],
)
def test_native_equals_composite_on_odd_shapes(shape, filters, kernel_size):
    args, residual = _case(
        shape, filters, "channels_last", "float32", seed=4, kernel_size=kernel_size
    )
    for training in (False, True):
        native_y = conv_bn_add_act(
            residual=residual, training=training, implementation="native", **args
        )
        composite_y = conv_bn_add_act(
            residual=residual, training=training, implementation="composite", **args
        )
        if training:
            native_y, composite_y = native_y[0], composite_y[0]
        np.testing.assert_allclose(_np(native_y), _np(composite_y), rtol=1e-4, atol=1e-4)


def _block_pair(block_cls, filters, input_shape, **kwargs):
    blocks = []
    for implementation in ("native", "composite"):
        block = block_cls(filters, implementation=implementation, **kwargs)
        block.build(input_shape)
        blocks.append(block)
    blocks[1].set_weights(blocks[0].get_weights())
    return blocks


@pytest.mark.parametrize("block_cls, filters", [(ResidualBlock, 8), (BottleneckBlock, 4)])
def test_blocks_update_moving_statistics_the_same(block_cls, filters):
    x = np.random.default_rng(5).normal(1.0, 2.0, size=(4, 8, 8, 8)).astype("float32")
    native_block, composite_block = _block_pair(block_cls, filters, x.shape, strides=2)
    for _ in range(2):
        native_out = native_block(x, training=True)
        composite_out = composite_block(x, training=True)
    np.testing.assert_allclose(_np(native_out), _np(composite_out), rtol=1e-4, atol=1e-4)
    for a, b in zip(
        native_block.non_trainable_weights, composite_block.non_trainable_weights, strict=True
    ):
        assert a.path == b.path.replace(composite_block.name, native_block.name)
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-5, atol=1e-5)


def _small_model(implementation, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same"),
            ResidualBlock(8, implementation=implementation, activation="silu"),
            BottleneckBlock(4, strides=2, implementation=implementation),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def test_training_steps_end_with_equal_weights():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    models = []
    for implementation in ("native", "composite"):
        model = _small_model(implementation)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        losses = [float(model.train_on_batch(x, y)) for _ in range(4)]
        models.append((model, losses))
    (native_model, native_losses), (composite_model, composite_losses) = models
    np.testing.assert_allclose(native_losses, composite_losses, rtol=1e-4)
    for a, b in zip(native_model.weights, composite_model.weights, strict=True):
        np.testing.assert_allclose(_np(a), _np(b), rtol=1e-3, atol=1e-4, err_msg=a.path)


def test_a_native_model_file_loads_and_predicts_with_composite(tmp_path):
    model = _small_model("native")
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(7)
    model.fit(rng.normal(size=(8, 8, 8, 3)), rng.normal(size=(8, 3)), epochs=1, verbose=0)
    x = rng.normal(size=(2, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", _np(model.predict(x, verbose=0)))
    model.save(tmp_path / "model.keras")
    code = """
        import sys
        import numpy as np, keras
        import keras_residual
        model = keras.saving.load_model(sys.argv[1] + "/model.keras")
        got = model.predict(np.load(sys.argv[1] + "/x.npy"), verbose=0)
        np.testing.assert_allclose(got, np.load(sys.argv[1] + "/expected.npy"), rtol=1e-4,
                                   atol=1e-5)
        print("implementation", model.layers[1].implementation)
    """
    # No native code at all in the loading process: a global "composite"
    # and no compiler on the PATH.
    out = run_fresh_python(
        code,
        tmp_path,
        env={
            "KERAS_RESIDUAL_IMPLEMENTATION": "composite",
            "CXX": "no-such-compiler",
            "KERAS_RESIDUAL_CACHE_DIR": str(tmp_path / "c"),
        },
    )
    assert "implementation native" in out


def test_fold_batchnorm_runs_the_native_epilogue():
    model = keras_residual.ResNet18(input_shape=(32, 32, 3), classes=5, implementation="native")
    from tests.helpers import randomize_bn_statistics

    randomize_bn_statistics(model, seed=8)
    folded = keras_residual.fold_batchnorm(model)
    assert folded.implementation == "native" and folded.folded
    x = np.random.default_rng(9).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        _np(folded(x, training=False)), _np(model(x, training=False)), rtol=1e-4, atol=1e-5
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="TensorFlow SavedModel export")
def test_exported_graph_holds_only_builtin_ops(tmp_path):
    model = keras_residual.ResNet18(input_shape=(32, 32, 3), classes=5, implementation="native")
    x = np.random.default_rng(10).normal(size=(1, 32, 32, 3)).astype("float32")
    expected = _np(model(x, training=False))
    model.export(str(tmp_path / "exported"), verbose=False)
    graph = (tmp_path / "exported" / "saved_model.pb").read_bytes()
    assert b"KerasResidual" not in graph
    import tensorflow as tf

    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(reloaded.serve(x).numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="XLA choice of the TensorFlow adapter")
def test_auto_uses_composite_under_xla_and_native_outside():
    import tensorflow as tf

    args, residual = _case((2, 4, 4, 3), 4, "channels_last", "float32")
    expected = _np(conv_bn_add_act(residual=residual, implementation="composite", **args))

    @tf.function(jit_compile=True)
    def compiled():
        return conv_bn_add_act(residual=residual, implementation="auto", **args)

    np.testing.assert_allclose(compiled().numpy(), expected, rtol=1e-4, atol=1e-5)
    graph = compiled.get_concrete_function().graph.as_graph_def()
    assert not [node.op for node in graph.node if node.op.startswith("KerasResidual")]

    @tf.function
    def plain(training):
        return conv_bn_add_act(residual=residual, implementation="auto", training=training, **args)

    graph = plain.get_concrete_function(True).graph.as_graph_def()
    assert [node.op for node in graph.node if node.op.startswith("KerasResidual")]
    # Inference follows native.AUTO_INFERENCE: "folded" on TensorFlow.
    graph = plain.get_concrete_function(False).graph.as_graph_def()
    assert not [node.op for node in graph.node if node.op.startswith("KerasResidual")]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="grappler is TensorFlow's")
@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "0",
    reason="the remapper fuses Conv2D + BiasAdd + AddN + Relu with oneDNN, on by default on x86-64",
)
@pytest.mark.parametrize(
    "with_residual, fused_ops",
    [(True, [b"BiasAdd", b"Add", b"Relu"]), (False, [b"FusedBatchNorm", b"Relu"])],
    ids=["residual", "no-residual"],
)
def test_auto_inference_on_tensorflow_becomes_one_fused_conv(with_residual, fused_ops):
    """What `native.AUTO_INFERENCE["tensorflow"] == "folded"` is for.

    At inference "auto" folds the BN into the kernel and bias and adds them
    with BiasAdd and AddN (`_tensorflow.add_bias_residual`) where a residual
    follows; without one it runs `FusedBatchNormV3` after the conv
    (`_tensorflow.batch_norm_inference`), and the kernel is not rewritten.
    Grappler's oneDNN remapper then runs each as one op with the relu. This
    depends on TensorFlow's remapper, not on this package: if an upgrade
    stops the fusion, this fails, and the policy needs measuring again.
    """
    import tensorflow as tf

    args, residual = _case((2, 6, 6, 8), 8, "channels_last", "float32")
    residual = _np(residual) if with_residual else None
    inputs = _np(args.pop("inputs"))
    args["kernel"] = _np(args["kernel"])  # no eager tensors in the graph below
    expected = _np(conv_bn_add_act(inputs, residual=residual, implementation="composite", **args))
    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, inputs.shape)
        feed = {x: inputs}
        r = None
        if with_residual:
            r = tf.compat.v1.placeholder(tf.float32, expected.shape)
            feed[r] = residual
        y = conv_bn_add_act(x, residual=r, implementation="auto", **args)
        with tf.compat.v1.Session(graph=graph) as session:
            metadata = tf.compat.v1.RunMetadata()
            result = session.run(
                y,
                feed,
                options=tf.compat.v1.RunOptions(output_partition_graphs=True),
                run_metadata=metadata,
            )
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-5)
    nodes = [node for graph_def in metadata.partition_graphs for node in graph_def.node]
    fused = [list(node.attr["fused_ops"].list.s) for node in nodes if "FusedConv2D" in node.op]
    assert fused == [fused_ops], sorted({node.op for node in nodes})


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the TensorFlow adapter's inference BN")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "linear", "silu"])
def test_auto_inference_without_residual_equals_composite_on_tensorflow(
    activation, with_bias, dtype, monkeypatch
):
    """The unit without a residual at inference: `batch_norm_inference` after
    the conv (the conv bias joins the mean), in every dtype; float64, which
    `FusedBatchNormV3` does not take, is computed unfused."""
    from keras_residual.native import _tensorflow

    calls = []
    original = _tensorflow.batch_norm_inference
    monkeypatch.setattr(
        _tensorflow,
        "batch_norm_inference",
        lambda *a, **k: calls.append(a) or original(*a, **k),
    )
    args, _ = _case((2, 6, 5, 4), 8, "channels_last", dtype)
    if not with_bias:
        args["bias"] = None
    ours = conv_bn_add_act(activation=activation, implementation="auto", **args)
    theirs = conv_bn_add_act(activation=activation, implementation="composite", **args)
    assert len(calls) == 1
    assert keras.backend.standardize_dtype(ours.dtype) == dtype
    tolerance = {"float64": 1e-10, **TOLERANCE}[dtype]
    np.testing.assert_allclose(
        _np(ours).astype("float64"), _np(theirs).astype("float64"), rtol=tolerance, atol=tolerance
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute.MirroredStrategy")
def test_native_blocks_train_under_mirrored_strategy():
    code = """
        import numpy as np, tensorflow as tf, keras
        tf.config.set_logical_device_configuration(
            tf.config.list_physical_devices("CPU")[0],
            [tf.config.LogicalDeviceConfiguration()] * 2)
        from keras_residual import ResidualBlock
        x = np.random.default_rng(0).normal(size=(8, 6, 6, 4)).astype("float32")
        y = np.random.default_rng(1).normal(size=(8, 6, 6, 4)).astype("float32")
        results = []
        for implementation in ("native", "composite"):
            keras.utils.set_random_seed(0)
            with tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope():
                model = keras.Sequential([keras.Input((6, 6, 4)),
                                          ResidualBlock(4, implementation=implementation)])
                model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            loss = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history["loss"]
            results.append((loss, [w.numpy() for w in model.weights]))
        np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-4)
        for a, b in zip(results[0][1], results[1][1]):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
        print("ok", results[0][0])
    """
    assert "ok" in run_fresh_python(code)


def test_native_blocks_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    x = np.random.default_rng(11).normal(size=(2, 6, 6, 8)).astype("float32")
    native_block, composite_block = _block_pair(ResidualBlock, 8, x.shape)
    for training in (False, True):
        a, b = native_block(x, training=training), composite_block(x, training=training)
        assert keras.backend.standardize_dtype(a.dtype) == "bfloat16"
        np.testing.assert_allclose(_np(a), _np(b), rtol=5e-2, atol=1e-1)
    assert all(w.dtype == "float32" for w in native_block.weights)


def test_environment_composite_turns_the_native_path_off():
    code = """
        import numpy as np
        from keras_residual import native, ops
        x = np.ones((1, 2, 2, 1), "float32")
        k = np.ones((1, 1, 1, 1), "float32")
        o = np.ones(1, "float32")
        # Training: at inference "auto" follows native.AUTO_INFERENCE, which
        # loads no adapter on TensorFlow or JAX anyway.
        ops.conv_bn_add_act(x, k, o, o, o, o, training=True, implementation="auto")
        print("loaded", sorted(native._loaded))
    """
    out = run_fresh_python(code, env={"KERAS_RESIDUAL_IMPLEMENTATION": "composite"})
    assert "loaded []" in out
    if os.environ.get("KERAS_RESIDUAL_IMPLEMENTATION", "auto") == "auto":
        out = run_fresh_python(code)
        assert f"loaded ['{BACKEND}']" in out


def test_own_op_needs_no_library_and_names_a_bad_name():
    """`native.own_op` looks the adapter module up, nothing more."""
    assert native.own_op("numpy", "conv2d") is None  # no adapter at all
    own = {name: native.own_op(keras.config.backend(), name) for name in native.OWN_OPS}
    expected = {
        "tensorflow": {"add_bias_residual", "batch_norm_inference"},
        "torch": {"conv2d", "max_pool2d", "lay_out_kernels"},
        "jax": {"conv2d"},
    }[keras.config.backend()]
    assert {name for name, op in own.items() if op is not None} == expected
    with pytest.raises(ValueError, match="name='conv3d'"):
        native.own_op(keras.config.backend(), "conv3d")


@pytest.mark.parametrize("implementation", ["auto", "native", "composite"])
def test_the_graph_is_asked_once_per_call(implementation, monkeypatch):
    """One `graph_reason` per call decides both the own conv and the kernels
    (none for "composite", which runs `keras.ops` only)."""
    calls = []
    original = native.graph_reason
    monkeypatch.setattr(native, "graph_reason", lambda *a: calls.append(a) or original(*a))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    k = rng.normal(0, 0.3, (3, 3, 3, 4)).astype("float32")
    ones, zeros = np.ones(4, "float32"), np.zeros(4, "float32")
    for training in (False, True):
        calls.clear()
        conv_bn_add_act(
            x, k, ones, zeros, zeros, ones, training=training, implementation=implementation
        )
        assert len(calls) == (0 if implementation == "composite" else 1)
