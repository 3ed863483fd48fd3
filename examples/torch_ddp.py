"""Data-parallel training with PyTorch DDP on the torch backend.

Run on one host with two processes (CPU: gloo; GPUs: nccl):

    KERAS_BACKEND=torch torchrun --nproc_per_node=2 examples/torch_ddp.py

A keras_residual model on the torch backend is a ``torch.nn.Module``, so DDP
wraps it as it is and all-reduces its gradients. Each process normalizes with
its own batch statistics (Keras has no synchronized BatchNormalization on
torch), and rank 0 saves the model.
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

import keras_residual  # noqa: E402


def main(out_path="resnet18_ddp.keras", epochs=2):
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    model = keras_residual.ResNet18(
        input_shape=(32, 32, 3), classes=10, classifier_activation=None, momentum=0.9
    )
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    # Stand-in data; use your own Dataset here.
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((256, 32, 32, 3), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 10, 256))
    dataset = TensorDataset(images, labels)
    sampler = DistributedSampler(dataset)  # each process gets its own shard
    loader = DataLoader(dataset, batch_size=32, sampler=sampler)

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(ddp(x, training=True), y)
            loss.backward()  # DDP all-reduces the gradients here
            optimizer.step()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)

    if rank == 0:
        model.save(out_path)
        print(f"saved {out_path}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:2])
