"""Eval reports: per-example rows, aggregates with n and 95% intervals, config, git revision, timings."""

from __future__ import annotations

import math
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragkit import __version__
from ragkit.errors import InputError, Location, ResourceError
from ragkit.io.atomic import write_json
from ragkit.io.jsonl import is_int, is_number, read_text

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (well-behaved at 0, 1 and small n)."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% normal-approximation interval of a mean (for F1, ROUGE, nDCG), clipped to [0, 1] where they live."""
    n = len(values)
    if n < 2:
        m = values[0] if values else 0.0
        return (m, m)
    m = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(n)
    return (max(0.0, m - half), min(1.0, m + half))


def aggregate(rows: Sequence[dict[str, Any]], metrics: Sequence[str], binary: Sequence[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in metrics:
        values = [float(r["metrics"][name]) for r in rows if name in r["metrics"]]
        n = len(values)
        mean = statistics.fmean(values) if values else 0.0
        low, high = wilson_interval(sum(values), n) if name in binary else mean_interval(values)
        out[name] = {"mean": mean, "n": n, "ci95": [low, high]}
    return out


def git_revision() -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_report(task: str, primary: str, aggregates: dict[str, Any], rows: list[dict[str, Any]],
                 config: dict[str, Any], timings: dict[str, float]) -> dict[str, Any]:
    return {
        "ragkit_version": __version__,
        "git_revision": git_revision(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": task,
        "primary_metric": primary,
        "n": len(rows),
        "metrics": aggregates,
        "config": config,
        "timings": timings,
        "rows": rows,
    }


def save_report(path: str | Path, report: dict[str, Any]) -> None:
    write_json(path, report)


def load_report(path: str | Path) -> dict[str, Any]:
    import json

    p = Path(path)
    if not p.exists():
        raise ResourceError(f"{p}: no such report")
    try:
        report = json.loads(read_text(p))
    except json.JSONDecodeError as exc:
        raise InputError(Location(str(p), exc.lineno), f"malformed JSON ({exc.msg})") from None
    if not isinstance(report, dict) or "metrics" not in report or "task" not in report:
        raise InputError(Location(str(p), None, "metrics"), "not a ragkit eval report (no 'task'/'metrics')")
    _check_report(p, report)
    return report


def _check_report(path: Path, report: dict[str, Any]) -> None:
    """The fields `eval compare` reads, each of the type `build_report` writes: a hand-edited or truncated
    report failed as a TypeError (exit 1) somewhere in the table."""
    def bad(field: str, expected: str) -> InputError:
        return InputError(Location(str(path), None, field), f"expected {expected}")

    if not isinstance(report["task"], str):
        raise bad("task", "a task name")
    if not isinstance(report["metrics"], dict) or not report["metrics"]:
        raise bad("metrics", "an object of metric -> {mean, ci95}")
    for name, m in report["metrics"].items():
        if not isinstance(m, dict) or not is_number(m.get("mean")):
            raise bad(f"metrics.{name}.mean", "a number")
        ci = m.get("ci95")
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(is_number(x) for x in ci)):
            raise bad(f"metrics.{name}.ci95", "[low, high]")
    if not is_int(report.get("n")):
        raise bad("n", "a count")
    primary = report.get("primary_metric")
    if not isinstance(primary, str) or primary not in report["metrics"]:
        raise bad("primary_metric", f"one of its metrics ({', '.join(map(str, report['metrics']))})")
    for key in ("config", "timings"):
        if key in report and not isinstance(report[key], dict):
            raise bad(key, "an object")
    rows = report.get("rows")
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise bad("rows", "a list of objects")


def label_of(path: str | Path, report: dict[str, Any]) -> str:
    return report.get("config", {}).get("label") or Path(path).stem


def plot_comparison(reports: Sequence[tuple[str, dict[str, Any]]], output: str | Path, metric: str | None = None) -> None:
    """Bars of one metric per run, with their 95% intervals as error bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ResourceError("--plot needs matplotlib", hint="pip install 'ragkit[plot]'") from None
    names, means, lows, highs = [], [], [], []
    for label, report in reports:
        key = metric or report["primary_metric"]
        if key not in report["metrics"]:
            raise ResourceError(f"{label}: no metric '{key}' in this report")
        m = report["metrics"][key]
        names.append(label)
        means.append(m["mean"])
        lows.append(max(0.0, m["mean"] - m["ci95"][0]))
        highs.append(max(0.0, m["ci95"][1] - m["mean"]))
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(names)), 3.5))
    ax.bar(range(len(names)), means, yerr=[lows, highs], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(metric or reports[0][1]["primary_metric"])
    ax.set_ylim(0, max(1.0, max(m + h for m, h in zip(means, highs))))
    ax.set_title(f"{reports[0][1]['task']}: mean and 95% interval")
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
