"""A plain-PyTorch peer for the Keras rows: torchvision's ResNet50.

The same work as ``python -m keras_residual bench --model resnet50``, written
the way a PyTorch user would: ``torchvision.models.resnet50`` (or, where
torchvision is missing, the same network in plain ``torch.nn``) in
``channels_last`` memory format, optionally under ``torch.autocast`` with
bfloat16; training is forward, cross-entropy, backward and an SGD (momentum
0.9) step; inference is the forward under ``torch.inference_mode``. Steps are
synchronized with the device before the clock is read.

Usage: ``python benchmarks/gpu/torch_peer.py --out DIR [--batch-size 128]
[--image-size 224] [--precisions float32,bfloat16] [--repeats 5] [--steps 5]``.
Writes ``DIR/torch_peer.json``: records shaped like the bench's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _summary(values):
    ordered = sorted(values)
    quartiles = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else None
    return {
        "median": statistics.median(ordered),
        "q1": quartiles[0] if quartiles else ordered[0],
        "q3": quartiles[2] if quartiles else ordered[0],
        "min": ordered[0],
        "max": ordered[-1],
    }


def _plain_resnet50(weights=None):
    """torchvision's ResNet50 (v1.5) in plain torch.nn, where torchvision is missing."""
    from torch import nn

    def conv_bn(cin, cout, kernel, stride=1):
        return [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
            nn.BatchNorm2d(cout),
        ]

    class Bottleneck(nn.Module):
        def __init__(self, cin, filters, stride):
            super().__init__()
            self.branch = nn.Sequential(
                *conv_bn(cin, filters, 1),
                nn.ReLU(inplace=True),
                *conv_bn(filters, filters, 3, stride),
                nn.ReLU(inplace=True),
                *conv_bn(filters, 4 * filters, 1),
            )
            project = stride != 1 or cin != 4 * filters
            self.shortcut = (
                nn.Sequential(*conv_bn(cin, 4 * filters, 1, stride)) if project else nn.Identity()
            )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.branch(x) + self.shortcut(x))

    layers = [*conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for stage, (depth, filters) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True)):
        for index in range(depth):
            layers.append(Bottleneck(cin, filters, 2 if stage > 0 and index == 0 else 1))
            cin = 4 * filters
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precisions", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "torch_peer.json")

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    device_name = f"cuda:0 ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    results = {
        "peer": "torchvision.models.resnet50, channels_last",
        "device": device_name,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
        },
        "host": {"platform": platform.platform(), "cores": os.cpu_count()},
        "records": [],
    }
    try:
        import torchvision

        build_model = torchvision.models.resnet50
        source = "torchvision"
        results["versions"]["torchvision"] = torchvision.__version__
    except ImportError as error:
        build_model = _plain_resnet50
        source = "plain nn.Module"
        results["peer"] = f"a plain nn.Module ResNet50 (torchvision: {error}), channels_last"
    torch.backends.cudnn.benchmark = True

    batch, size = args.batch_size, args.image_size
    x = torch.rand(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16}[precision]
        model = build_model(weights=None).to(device)
        model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def autocast(dtype=autocast_dtype):
            return torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None)

        def train_step(model=model, optimizer=optimizer, loss_fn=loss_fn, autocast=autocast):
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()

        def inference_step(model=model, autocast=autocast):
            model.eval()
            with torch.inference_mode(), autocast():
                model(x)

        for mode, step in (("inference", inference_step), ("train", train_step)):
            start = time.perf_counter()
            for _ in range(args.warmup):
                step()
            sync()
            warmup_seconds = time.perf_counter() - start
            rates = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync()
                rates.append(batch * args.steps / (time.perf_counter() - start))
            stats = _summary(rates)
            record = {
                "model": "resnet50",
                "mode": mode,
                "implementation": f"pytorch ({source}, channels_last, {precision})",
                "backend": "pytorch",
                "device": device_name,
                "dtype": precision if autocast_dtype is None else f"autocast {precision}",
                "batch_size": batch,
                "image_size": size,
                "images_per_second": stats["median"],
                "spread": {**stats, "iqr": stats["q3"] - stats["q1"]},
                "warmup_seconds": warmup_seconds,
                "repeats": args.repeats,
                "steps": args.steps,
            }
            results["records"].append(record)
            print(
                f"torch peer {precision} {mode}: {stats['median']:.1f} images/s",
                file=sys.stderr,
                flush=True,
            )
        del model, optimizer
        if cuda:
            torch.cuda.empty_cache()
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
