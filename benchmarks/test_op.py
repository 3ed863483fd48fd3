"""The op: ``keras_residual.ops.conv_bn_add_act``, native against composite.

Training is forward plus backward (gradients for the input, the kernel,
gamma, beta and the residual) with the batch statistics; inference is the
forward with the moving statistics. Shapes are units of ResNet50: by default
at batch 2 and half the spatial size (a 112x112 input), with
``KERAS_RESIDUAL_BENCH_FULL=1`` at batch 32 and a 224x224 input.
"""

from __future__ import annotations

import keras
import pytest
from _common import FULL, measure, random, sync

from keras_residual.ops import conv_bn_add_act

BATCH = 32 if FULL else 2
SCALE = 1 if FULL else 2
# name: (spatial size at 224x224, in channels, filters, kernel size, residual)
UNITS = {
    "conv2_block1_3": (56, 64, 256, 1, True),
    "conv3_block2_2": (28, 128, 128, 3, False),
    "conv4_block2_3": (14, 256, 1024, 1, True),
    "conv5_block2_3": (7, 512, 2048, 1, True),
}


def _arguments(unit):
    size, channels, filters, kernel_size, has_residual = UNITS[unit]
    size = max(size // SCALE, 1)
    arrays = {
        "inputs": random((BATCH, size, size, channels), seed=1),
        "kernel": random((kernel_size, kernel_size, channels, filters), seed=2) * 0.05,
        "gamma": random((filters,), seed=3, low=0.5, high=1.5),
        "beta": random((filters,), seed=4) * 0.1,
        "moving_mean": random((filters,), seed=5) * 0.1,
        "moving_variance": random((filters,), seed=6, low=0.5, high=2.0),
        "residual": random((BATCH, size, size, filters), seed=7) if has_residual else None,
    }
    upstream = random((BATCH, size, size, filters), seed=8)
    return arrays, upstream


def _inference_step(arrays, implementation):
    backend = keras.config.backend()
    tensors = {k: None if v is None else keras.ops.convert_to_tensor(v) for k, v in arrays.items()}

    def forward(**kwargs):
        return conv_bn_add_act(**kwargs, training=False, implementation=implementation)

    if backend == "tensorflow":
        import tensorflow as tf

        compiled = tf.function(forward)
        return lambda: sync(compiled(**tensors))
    if backend == "jax":
        import jax

        compiled = jax.jit(forward)
        return lambda: sync(compiled(**tensors))
    if backend == "torch":
        import torch

        def step():
            with torch.no_grad():
                return sync(forward(**tensors))

        return step
    pytest.skip(f"no benchmark step for the {backend} backend")


TRAINABLE = ("inputs", "kernel", "gamma", "beta", "residual")


def _train_step(arrays, upstream, implementation):
    """Forward with batch statistics, then the gradients for `upstream`."""
    backend = keras.config.backend()
    tensors = {k: None if v is None else keras.ops.convert_to_tensor(v) for k, v in arrays.items()}
    dy = keras.ops.convert_to_tensor(upstream)
    names = [name for name in TRAINABLE if tensors[name] is not None]

    def forward(**kwargs):
        outputs, _, _ = conv_bn_add_act(**kwargs, training=True, implementation=implementation)
        return outputs

    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def compiled(dy, **kwargs):
            with tf.GradientTape() as tape:
                tape.watch([kwargs[name] for name in names])
                outputs = forward(**kwargs)
            return tape.gradient(outputs, [kwargs[name] for name in names], output_gradients=dy)

        return lambda: sync(compiled(dy, **tensors))
    if backend == "jax":
        import jax

        fixed = {k: v for k, v in tensors.items() if k not in names}

        @jax.jit
        def compiled(dy, *trainable):
            def f(*values):
                return forward(**fixed, **dict(zip(names, values, strict=True)))

            _, vjp = jax.vjp(f, *trainable)
            return vjp(dy)

        trainable = [tensors[name] for name in names]
        return lambda: sync(compiled(dy, *trainable))
    if backend == "torch":
        import torch

        for name in names:
            tensors[name] = tensors[name].detach().requires_grad_(True)

        def step():
            outputs = forward(**tensors)
            return sync(torch.autograd.grad(outputs, [tensors[name] for name in names], dy))

        return step
    pytest.skip(f"no benchmark step for the {backend} backend")


@pytest.mark.benchmark(group="op")
@pytest.mark.parametrize("mode", ["inference", "train"])
@pytest.mark.parametrize("unit", list(UNITS))
def test_conv_bn_add_act(benchmark, unit, mode, implementation):
    arrays, upstream = _arguments(unit)
    if mode == "inference":
        step = _inference_step(arrays, implementation)
    else:
        step = _train_step(arrays, upstream, implementation)
    benchmark.extra_info.update(
        {"batch": BATCH, "inputs_shape": list(arrays["inputs"].shape), "full": FULL}
    )
    result = measure(benchmark, step)
    # The step computed what it was asked for: the output, or one gradient
    # per trainable argument, each of its argument's shape.
    if mode == "inference":
        filters = arrays["kernel"].shape[-1]
        assert tuple(result.shape) == (*arrays["inputs"].shape[:3], filters)
    else:
        names = [name for name in TRAINABLE if arrays[name] is not None]
        assert [tuple(g.shape) for g in result] == [arrays[name].shape for name in names]
