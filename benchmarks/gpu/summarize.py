"""The end of benchmarks/gpu/run.sh: summary.json, summary.md and the exit status.

Usage: ``python benchmarks/gpu/summarize.py RUNS DEST DRY``: RUNS is the
run's scratch folder (steps.tsv and the JSON of each step), DEST the output
folder, DRY 1 for a dry run. Exit status 1 when a required step is not ok
(in a dry run, steps skipped for want of a GPU are fine) or an optional step
failed with an error (not a timeout, not skipped).
"""

from __future__ import annotations

import json
import os
import sys


def _load(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _steps(runs):
    steps = []
    path = os.path.join(runs, "steps.tsv")
    if not os.path.exists(path):
        return steps
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 6:
                continue
            name, verdict, rc, seconds, required, note = parts[:6]
            steps.append(
                {
                    "step": name,
                    "verdict": verdict,
                    "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
                    "seconds": int(seconds) if seconds.isdigit() else seconds,
                    "required": required == "required",
                    "note": note,
                }
            )
    return steps


def _failures(steps, dry):
    bad = []
    for s in steps:
        verdict = s["verdict"]
        if s["required"]:
            if verdict == "ok" or (dry and verdict.startswith("SKIPPED (no GPU)")):
                continue
            bad.append(s["step"])
        elif verdict == "FAILED":
            bad.append(s["step"])
    return bad


def _bandwidth_table(data):
    try:
        from kernel_bandwidth import table
    except ImportError:
        return None
    try:
        return table(data["cases"])
    except (KeyError, TypeError):
        return None


def main(argv) -> int:
    runs, dest, dry = argv[1], argv[2], argv[3] == "1"
    steps = _steps(runs)
    bad = _failures(steps, dry)
    summary = {
        "result": "FAIL" if bad else "PASS",
        "failed_steps": bad,
        "dry_run": dry,
        "environment": _load(os.path.join(runs, "environment.json")),
        "build": _load(os.path.join(runs, "build.json")),
        "steps": steps,
        "smoke": _load(os.path.join(runs, "smoke.json")),
        "sanitizers": {},
        "large_tensor": _load(os.path.join(runs, "large_tensor.json")),
        "kernel_bandwidth": _load(os.path.join(dest, "kernel_bandwidth.json")),
        "bench": {},
    }
    for s in steps:
        if s["step"].startswith("sanitize_"):
            tool = s["step"][len("sanitize_") :]
            summary["sanitizers"][tool] = {
                "verdict": s["verdict"],
                "rc": s["rc"],
                "summary": s["note"],
                "checks": _load(os.path.join(runs, f"sanitize_{tool}.json")),
            }
    for name in sorted(os.listdir(runs)):
        folder = os.path.join(runs, name)
        for file in ("results.json", "torch_peer.json"):
            data = _load(os.path.join(folder, file))
            if data is not None:
                summary["bench"][name] = data

    md = [f"# keras_residual GPU run: {summary['result']}" + (" (dry run)" if dry else ""), ""]
    env = summary["environment"] or {}
    if env:
        md += ["```", *(f"{k}: {v}" for k, v in env.items()), "```", ""]
    tools = os.path.join(runs, "tools.txt")
    if os.path.exists(tools):
        md += ["```", open(tools, encoding="utf-8").read().strip(), "```", ""]
    build = summary["build"] or {}
    if build:
        md += [
            f"Build: cuda_compiled={build.get('cuda_compiled')}, archs={build.get('cuda_archs')}, "
            f"cuda_reason={build.get('cuda_reason')}, {build.get('seconds')}s",
            "",
        ]
    md += [
        "## Steps",
        "",
        "| step | verdict | rc | s | required | note |",
        "|---|---|---:|---:|---|---|",
    ]
    for s in steps:
        note = str(s["note"]).replace("|", "/")
        md.append(
            f"| {s['step']} | {s['verdict']} | {s['rc']} | {s['seconds']} | "
            f"{'yes' if s['required'] else 'no'} | {note} |"
        )
    md.append("")
    large = summary["large_tensor"]
    if large:
        md += ["## Large tensor", ""]
        for case in large.get("cases", []):
            failed = [c["check"] for c in case.get("checks", []) if not c["ok"]]
            md.append(
                f"- {case['case']} {case.get('shape')} ({case.get('elements', 0):,} elements, "
                f"{case.get('path')} path): {'ok' if case['ok'] else 'FAILED'}"
                + (f" ({', '.join(failed) or case.get('error', '')})" if not case["ok"] else "")
                + (f", {case['seconds']}s" if "seconds" in case else "")
            )
        md.append("")
    if summary["kernel_bandwidth"]:
        text = _bandwidth_table(summary["kernel_bandwidth"])
        if text:
            md += [
                "## Kernel bandwidth",
                "",
                summary["kernel_bandwidth"].get("method", ""),
                "",
                "```",
                text,
                "```",
                "",
            ]
    for name in sorted(os.listdir(runs)):
        markdown = os.path.join(runs, name, "results.md")
        if os.path.isfile(markdown):
            text = [
                ("##" + line) if line.startswith("#") else line
                for line in open(markdown, encoding="utf-8").read().splitlines()
            ]
            md += [f"## {name}", "", *text, ""]
    peer = summary["bench"].get("torch_peer")
    if peer:
        md += [
            "## torch_peer",
            "",
            peer.get("peer", ""),
            "",
            "| implementation | mode | images/s | min-max |",
            "|---|---|---:|---:|",
        ]
        for r in peer.get("records", []):
            spread = r["spread"]
            md.append(
                f"| {r['implementation']} | {r['mode']} | {r['images_per_second']:.1f} "
                f"| {spread['min']:.1f}-{spread['max']:.1f} |"
            )
        md.append("")

    with open(os.path.join(dest, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2, default=str)
    with open(os.path.join(dest, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(md) + "\n")
    width = max((len(s["step"]) for s in steps), default=4)
    for s in steps:
        print(
            f"   {s['step']:{width}s}  {s['verdict']}" + (f"  ({s['note']})" if s["note"] else "")
        )
    print(
        f"RESULT: {summary['result']}"
        + (f": {', '.join(bad)}" if bad else "")
        + (" (dry run)" if dry else "")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
