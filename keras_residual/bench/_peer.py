"""The ``torchvision`` row: the same network in plain PyTorch, as a peer.

On the torch Keras backend the benchmark also times torchvision's
``resnet50`` / ``resnet18`` (random init, ``channels_last`` memory format)
in the same process, on the same device, input and dtype, through the same
interleaved timing as the Keras rows:

- inference: ``model.eval()`` and ``model(x)`` under
  ``torch.inference_mode()``;
- train: ``model.train()``, cross-entropy of the logits on the integer
  labels, ``zero_grad``, ``backward`` and ``step`` of
  ``torch.optim.SGD(lr=0.01, momentum=0.9)`` (the Keras rows' optimizer).

The Keras dtype policies map onto ``torch.autocast``: ``mixed_float16`` to
float16 (training adds a ``torch.amp.GradScaler``, as Keras wraps its
optimizer in a ``LossScaleOptimizer``) and ``mixed_bfloat16`` to bfloat16.

It is torchvision's v1.5 network (stride on the 3x3, no conv biases, BN
epsilon 1e-5): ``--arch v1.5`` builds this package's rows the same way.

Each step returns only once the device has finished: inference copies the
output to the host, as ``predict_on_batch`` does, and training reads the
loss, as ``train_on_batch`` does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys

from keras_residual.bench._models import Unavailable

# The op schemas whose absence breaks ``import torchvision``; see
# `import_torchvision`.
_TORCHVISION_OP_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
AUTOCAST_DTYPES = {"float32": None, "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def import_torchvision():
    """Imports torchvision, also where its compiled ops cannot load.

    PyPI's torchvision wheel (0.28.0, for one) is a CUDA build. Beside a CPU
    build of torch its compiled ops (``torchvision/_C.so``) do not load, and
    ``import torchvision`` then fails with "operator torchvision::nms does
    not exist": ``torchvision/_meta_registrations.py`` registers fake
    kernels for ``torchvision::nms`` and ``torchvision::qnms`` on import
    whether or not the compiled library declared those ops. The model code
    that the benchmark needs is pure Python, so declaring the two op schemas
    and importing again is enough: the detection ops stay unusable and the
    models work.

    A torchvision that imports is left untouched: the schemas are declared
    only after a first import failed, and only those that
    ``torch.ops.torchvision`` lacks.

    Returns:
        The `torchvision` module.

    Raises:
        ImportError: when torch or torchvision is not installed, or
            torchvision fails to import for another reason.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("torchvision is not installed")
    import torch

    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise ImportError(f"import torchvision failed: {error}") from error
        for name, schema in _TORCHVISION_OP_SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, name):
                torch.library.define(f"torchvision::{name}", schema)
        try:
            import torchvision
        except Exception as retry_error:  # noqa: BLE001 - reported as the reason
            raise ImportError(
                f"import torchvision failed: {type(retry_error).__name__}: {retry_error}"
            ) from retry_error
    return torchvision


def unavailable_reason(model: str, backend: str) -> str | None:
    """Why the torchvision row cannot run, or `None`; imports nothing."""
    if backend != "torch":
        return (
            f"the torchvision peer runs on the torch backend only (KERAS_BACKEND=torch); "
            f"this run is on {backend}"
        )
    if model == "block":
        return "torchvision has no stand-alone block (use --model resnet50 or resnet18)"
    return None


class Peer:
    """A torchvision model and its inference and training steps."""

    def __init__(self, torch, network, autocast_dtype):
        self.torch = torch
        self.network = network
        self.autocast_dtype = autocast_dtype
        # Counted as Keras counts: the BN running statistics too (buffers in
        # PyTorch, non-trainable weights in Keras); not num_batches_tracked.
        self.params = int(sum(p.numel() for p in network.parameters())) + int(
            sum(b.numel() for b in network.buffers() if b.is_floating_point())
        )
        self._optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
        self._scaler = None
        self._bound = None

    def _autocast(self, device_type):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return self.torch.autocast(device_type, dtype=getattr(self.torch, self.autocast_dtype))

    def bind(self, x, y, data_format):
        """Moves the model to `x`'s device; returns `(x, y)` in torch's layout.

        `x` is the run's input as a torch tensor in `data_format`; it
        becomes NCHW with the `channels_last` memory format, once, outside
        the timing. `y` becomes int64 labels.
        """
        torch = self.torch
        if self._bound is not None and self._bound[0] is x:
            return self._bound[1]
        x_in = torch.as_tensor(x)
        if data_format == "channels_last":
            x_in = x_in.permute(0, 3, 1, 2)
        x_in = x_in.float().contiguous(memory_format=torch.channels_last)
        self.network.to(device=x_in.device, memory_format=torch.channels_last)
        y_in = None if y is None else torch.as_tensor(y).to(x_in.device).long()
        if self.autocast_dtype == "float16" and self._scaler is None:
            self._scaler = torch.amp.GradScaler(x_in.device.type)
        self._bound = (x, (x_in, y_in))
        return x_in, y_in

    def inference_step(self, x):
        """One forward pass in eval mode under `torch.inference_mode()`."""
        network, torch = self.network, self.torch

        def step():
            with torch.inference_mode():
                network.eval()
                with self._autocast(x.device.type):
                    output = network(x)
                return output.cpu()

        return step

    def train_step(self, x, y):
        """One SGD step on the cross-entropy of the logits."""
        network, torch, optimizer = self.network, self.torch, self._optimizer
        functional = torch.nn.functional

        def step():
            network.train()
            optimizer.zero_grad(set_to_none=True)
            with self._autocast(x.device.type):
                loss = functional.cross_entropy(network(x), y)
            if self._scaler is not None:
                self._scaler.scale(loss).backward()
                self._scaler.step(optimizer)
                self._scaler.update()
            else:
                loss.backward()
                optimizer.step()
            return loss.item()

        return step


def build(model: str, dtype: str, backend: str) -> tuple:
    """The torchvision row: `(Peer, notes)`.

    Args:
        model: `"resnet50"` or `"resnet18"` (`"block"` is unavailable).
        dtype: the run's Keras dtype policy name.
        backend: the active Keras backend.

    Raises:
        Unavailable: with the reason, when the row cannot run here.
    """
    reason = unavailable_reason(model, backend)
    if reason is not None:
        raise Unavailable(reason)
    try:
        torchvision = import_torchvision()
    except ImportError as error:
        raise Unavailable(
            f"torchvision is not importable ({error}); pip install torchvision"
        ) from None
    import torch

    autocast_dtype = AUTOCAST_DTYPES[dtype]
    if autocast_dtype is not None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            with torch.autocast(device_type, dtype=getattr(torch, autocast_dtype)):
                pass
        except Exception as error:  # noqa: BLE001 - the row is skipped, never the run
            raise Unavailable(
                f"torch.autocast({device_type!r}, dtype=torch.{autocast_dtype}) is "
                f"unavailable: {error}"
            ) from None
    network = getattr(torchvision.models, model)(weights=None, num_classes=1000)
    network = network.to(memory_format=torch.channels_last)
    notes = {
        "source": f"torchvision.models.{model}(weights=None), channels_last memory format, "
        "eager PyTorch",
        "torchvision": getattr(torchvision, "__version__", None),
        "optimizer": "torch.optim.SGD(lr=0.01, momentum=0.9), cross-entropy on the logits",
        "params_counted": "parameters plus the BN running statistics, as Keras counts them",
    }
    if autocast_dtype is not None:
        notes["autocast"] = f"torch.autocast(dtype=torch.{autocast_dtype})" + (
            " with torch.amp.GradScaler in training" if autocast_dtype == "float16" else ""
        )
    return Peer(torch, network, autocast_dtype), notes
