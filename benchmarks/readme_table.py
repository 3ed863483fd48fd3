"""Prints README.md's table of bench results from the committed result files.

Each row is one mode of one ``python -m keras_residual bench`` run in
``benchmarks/results/``: the ratio of each implementation to
keras.applications and, on torch, in brackets, to plain PyTorch
(torchvision), with the CPU it ran on. Edit `RUNS` when a newer file replaces an older one, then
paste the output into README.md's Performance section:

    python benchmarks/readme_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (backend, model, train folder, inference folder), "cpu-2core-" omitted:
# the newest file of each mode for each row and CPU.
RUNS = [
    ("torch", "ResNet50", "xeon-2026-12-02-torch-resnet50-v1.5-openmp", None),
    ("torch", "ResNet50", "epyc-2026-12-02-torch-resnet50-v1.5-pool", None),
    ("torch", "ResNet18", "xeon-2026-12-02-torch-resnet18-v1.5-openmp", None),
    ("torch", "ResNet18", "epyc-2026-12-02-torch-resnet18-v1.5-pool", None),
    (
        "TensorFlow",
        "ResNet50",
        "xeon-2026-12-02-tensorflow-resnet50",
        "xeon-2026-12-02-tensorflow-resnet50-inference",
    ),
    (
        "TensorFlow",
        "ResNet18",
        "xeon-2026-12-02-tensorflow-resnet18",
        "xeon-2026-12-02-tensorflow-resnet18-inference",
    ),
    (
        "TensorFlow",
        "ResNet50",
        "epyc-2026-12-02-tensorflow-resnet50-floatacc",
        "epyc-2026-12-02-tensorflow-resnet50-fusedbn",
    ),
    (
        "TensorFlow",
        "ResNet18",
        "epyc-2026-12-02-tensorflow-resnet18-floatacc",
        "epyc-2026-12-02-tensorflow-resnet18-fusedbn",
    ),
    (
        "JAX",
        "ResNet50",
        "epyc-2026-12-02-jax-resnet50-floatacc",
        "epyc-2026-12-02-jax-resnet50-pointwise-inference",
    ),
    (
        "JAX",
        "ResNet18",
        "epyc-2026-12-02-jax-resnet18-floatacc",
        "epyc-2026-12-02-jax-resnet18-pointwise",
    ),
]
COLUMNS = ["composite", "native", "auto", "folded", "limit", "torchvision"]


def cell(record: dict | None, column: str) -> str:
    if record is None or record.get("skipped") or record.get("error"):
        return "-"
    text = f"{record['ratio_vs_keras_applications']:.2f}x"
    if record.get("ratio_vs_torchvision") and column != "torchvision":
        text += f" ({record['ratio_vs_torchvision']:.2f}x)"
    return text


def table() -> str:
    lines = [
        "| backend | model | mode | " + " | ".join(COLUMNS) + " | CPU | file |",
        "|---|---|---|" + "---:|" * len(COLUMNS) + "---|---|",
    ]
    for backend, model, train, inference in RUNS:
        # None: the inference rows are in the training file.
        for mode, name in (("train", train), ("inference", inference or train)):
            run = json.loads((RESULTS / f"cpu-2core-{name}" / "results.json").read_text())
            by_row = {r["implementation"]: r for r in run["records"] if r["mode"] == mode}
            cells = " | ".join(cell(by_row.get(column), column) for column in COLUMNS)
            lines.append(
                f"| {backend} | {model} | {mode} | {cells} | {run['host']['cpu']} "
                f"| [{name}](benchmarks/results/cpu-2core-{name}/) |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
