"""The three outputs of a run: results.json, results.md and results.png."""

from __future__ import annotations

import json
import os


def _number(value, digits=1, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _has_peer_ratios(results: dict) -> bool:
    """Whether any record has a ratio to the torchvision row."""
    return any(record.get("ratio_vs_torchvision") is not None for record in results["records"])


def _arch_line(results: dict) -> str:
    arch = results["config"].get("arch", results.get("arch", "keras"))
    if arch == "v1.5":
        described = (
            "v1.5, torchvision's network (stride on the 3x3, no conv biases, BN epsilon "
            "1e-5 and momentum 0.9, symmetric padding)"
        )
    else:
        described = (
            "keras, the keras.applications network (v1: conv biases, BN epsilon 1.001e-5 "
            "and momentum 0.99, stride on the first 1x1)"
        )
    return (
        f"- arch of the keras_residual rows and the limit: {described}; the "
        "keras.applications row is the stock Keras network"
    )


def markdown(results: dict) -> str:
    """A Markdown report: one table per mode, then the skipped rows.

    The table has a `vs torchvision` column when some record has a ratio to
    the torchvision row (`ratio_vs_torchvision`).
    """
    peer = _has_peer_ratios(results)
    lines = [
        f"# keras_residual bench: {results['config']['model']}",
        "",
        f"- device: {results['device']}",
        f"- backend: {results['backend']}; "
        + ", ".join(f"{name} {version}" for name, version in results["versions"].items()),
        f"- dtype policy: {results['config']['dtype']}; data format: "
        f"{results['config']['data_format']}; batch {results['config']['batch_size']}, "
        f"image {results['config']['image_size']}x{results['config']['image_size']}",
        f"- {results['config']['repeats']} repeats of {results['config']['steps']} steps "
        f"after {results['config']['warmup']} warm-up steps, rows interleaved",
        _arch_line(results),
        "",
        "Images/s is the median over the repeats (IQR: interquartile range). "
        "vs keras.applications and vs limit are ratios of the medians: above 1 "
        "is faster than the keras.applications row; the limit keeps the "
        "convolutions and drops BN, bias, add and activation, so it bounds "
        "what fusing them can win."
        + (
            " vs torchvision is the ratio to the plain-PyTorch torchvision row of the "
            "same mode: above 1 is faster than PyTorch."
            if peer
            else ""
        ),
    ]
    for mode in results["config"]["modes"]:
        records = [r for r in results["records"] if r["mode"] == mode]
        columns = ["implementation", "images/s", "IQR", "min-max", "vs keras.applications"]
        columns += ["vs torchvision"] if peer else []
        columns += ["vs limit", "warm-up s"]
        lines += [
            "",
            f"## {mode}",
            "",
            "| " + " | ".join(columns) + " |",
            "|---|" + "---:|" * (len(columns) - 1),
        ]
        for record in records:
            if record["images_per_second"] is None:
                lines.append(
                    f"| {record['implementation']} | skipped: {record['skipped']} |"
                    + " |" * (len(columns) - 2)
                )
                continue
            spread = record["spread"]
            cells = [
                record["implementation"],
                _number(record["images_per_second"]),
                f"{_number(spread['q1'])}-{_number(spread['q3'])}",
                f"{_number(spread['min'])}-{_number(spread['max'])}",
                _number(record.get("ratio_vs_keras_applications"), 2, "x"),
            ]
            if peer:
                cells.append(_number(record.get("ratio_vs_torchvision"), 2, "x"))
            cells += [
                _number(record.get("ratio_vs_limit"), 2, "x"),
                _number(record["warmup_seconds"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    notes = []
    seen = set()
    for record in results["records"]:
        for key, value in record.get("notes", {}).items():
            if key in ("params", "jit_compile") or (record["implementation"], key) in seen:
                continue
            seen.add((record["implementation"], key))
            notes.append(f"- {record['implementation']}: {key}: {value}")
    built = {}
    for record in results["records"]:
        if "params" in record.get("notes", {}):
            built[record["implementation"]] = (
                record["notes"]["params"],
                record["notes"].get("jit_compile"),
            )
    if built:
        notes.append(
            "- parameters (jit_compile): "
            + ", ".join(f"{label} {count:,} ({jit})" for label, (count, jit) in built.items())
        )
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def chart(results: dict, path: str) -> None:
    """A bar chart of images/s, one group of bars per mode.

    Where some record has a ratio to the torchvision row, a second panel
    shows those ratios (1 is torchvision's speed).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot

    modes = results["config"]["modes"]
    labels = results["config"]["implementations"]
    peer = _has_peer_ratios(results)
    width_inches = min(3 + 0.9 * len(labels) * len(modes), 14)
    if peer:
        figure, (axes, ratio_axes) = pyplot.subplots(
            1,
            2,
            figsize=(min(2 * width_inches, 16), 4.5),
            gridspec_kw={"width_ratios": [3, 2]},
        )
    else:
        figure, axes = pyplot.subplots(figsize=(width_inches, 4.5))
    width = 0.8 / max(len(labels), 1)
    colors = pyplot.get_cmap("tab10")
    for index, label in enumerate(labels):
        heights, lows, highs, positions = [], [], [], []
        for group, mode in enumerate(modes):
            for record in results["records"]:
                if record["mode"] != mode or record["implementation"] != label:
                    continue
                position = group + (index - (len(labels) - 1) / 2) * width
                if record["images_per_second"] is None:
                    axes.text(
                        position,
                        0,
                        " skipped",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="gray",
                    )
                    continue
                positions.append(position)
                heights.append(record["images_per_second"])
                lows.append(max(record["images_per_second"] - record["spread"]["min"], 0.0))
                highs.append(max(record["spread"]["max"] - record["images_per_second"], 0.0))
        if positions:
            axes.bar(
                positions,
                heights,
                width,
                yerr=[lows, highs],
                capsize=3,
                label=label,
                color=colors(index),
            )
    axes.set_xticks(range(len(modes)), modes)
    axes.set_ylabel("images per second (median; bars: min-max)")
    config = results["config"]
    axes.set_title(
        f"{config['model']} ({config.get('arch', 'keras')}), batch {config['batch_size']}, "
        f"{config['image_size']}px, {config['dtype']} on {results['backend']}\n"
        f"{results['device']}",
        fontsize=9,
    )
    if axes.get_legend_handles_labels()[0]:  # not when every row was skipped
        axes.legend(fontsize=8)
    if peer:
        _ratio_panel(ratio_axes, results, modes, labels, width, colors)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def _ratio_panel(axes, results, modes, labels, width, colors):
    """Bars of each row's images/s over torchvision's, one group per mode."""
    for index, label in enumerate(labels):
        positions, heights = [], []
        for group, mode in enumerate(modes):
            for record in results["records"]:
                if record["mode"] != mode or record["implementation"] != label:
                    continue
                ratio = record.get("ratio_vs_torchvision")
                if ratio is None:
                    continue
                positions.append(group + (index - (len(labels) - 1) / 2) * width)
                heights.append(ratio)
        if positions:
            bars = axes.bar(positions, heights, width, label=label, color=colors(index))
            axes.bar_label(bars, fmt="%.2fx", fontsize=7)
    axes.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_xticks(range(len(modes)), modes)
    axes.set_ylabel("images/s relative to torchvision (1 = PyTorch)")
    axes.set_title("vs the plain-PyTorch torchvision row (above 1: faster)", fontsize=9)


def write(results: dict, out_dir: str) -> dict:
    """Writes the three files; returns their paths.

    `results.png` needs matplotlib (the `bench` extra); without it the
    chart is left out of the returned paths and not written.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "markdown": os.path.join(out_dir, "results.md"),
        "chart": os.path.join(out_dir, "results.png"),
    }
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2, default=str)
        handle.write("\n")
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write(markdown(results))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # The chart is the one output that needs an optional dependency.
        del paths["chart"]
    else:
        chart(results, paths["chart"])
    return paths
