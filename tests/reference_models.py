"""torchvision and timm reference models for the conversion tests, no downloads.

The tests build randomly initialised torchvision and timm ResNets and check
that ``keras_residual.from_torchvision`` / ``from_timm`` reproduce their
outputs. CI installs the reference packages without their dependencies
(torch, the CPU build, is already there):

    pip install ".[reference,convert]"

PyPI's torchvision wheel is a CUDA build: its compiled ops
(``torchvision/_C.so``) do not load beside the CPU torch, and then
``import torchvision`` fails with "operator torchvision::nms does not exist".
The failure comes from ``torchvision/_meta_registrations.py``, which registers
fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms`` on
import, whether or not the compiled library declared them. The model code
the tests need is pure Python: ``keras_residual.bench._peer.import_torchvision``
(which the benchmark's plain-PyTorch row uses too) declares those two op
schemas after a failed import and imports again; the detection ops stay
unusable, and the models work. A torchvision that imports is left untouched.

``import_reference()`` skips the calling test, saying why, when torch,
torchvision or timm is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from keras_residual.bench._peer import import_torchvision


def import_reference():
    """Returns ``(torch, torchvision, timm)``, or skips the test."""
    torch = pytest.importorskip("torch", reason="the reference models need torch")
    try:
        torchvision = import_torchvision()
    except ImportError as error:
        pytest.skip(f"the reference models need torchvision: {error}")
    timm = pytest.importorskip("timm", reason="the timm reference models need timm")
    return torch, torchvision, timm


def randomize(model, seed=0):
    """Random weights, BN statistics and affine parameters; eval mode.

    Fresh torch BatchNorms are the identity (gamma 1, beta 0, mean 0, var 1)
    and torchvision zero-initialises nothing by default, but timm zeroes the
    last BN of every block: randomising everything makes each weight count.
    The convolutions are rescaled so activations keep a unit scale through
    deep networks, and the comparison stays meaningful.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.25)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=generator) / np.sqrt(fan_in)
                )
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model.eval()


def torch_outputs(model, images_nhwc):
    """The model's outputs for NHWC NumPy images, as NumPy."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return model(x).numpy()
