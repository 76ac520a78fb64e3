"""Result tables: ``results.md``, ``results.json`` and the summary printed at the end.

Plugins add tables through the ``kdt_report_tables`` hook (the Proto2Proto
bundle adds the reproduction's Table 1 and Table 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import atomic_write_json, atomic_write_text
from .tables import Table, fmt, print_tables  # noqa: F401 -- part of this module's interface


def stages_table(results: dict[str, Any]) -> Table:
    """Every stage's scalar test metrics (accuracy first)."""
    stages = results["stages"]
    keys: list[str] = []
    for res in stages.values():
        for k, v in res.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in (
                "num_parameters", "train_seconds", "test_images") and k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (k != "accuracy", k))
    rows = []
    for name, res in stages.items():
        rows.append([name, res.get("description", ""), res.get("teacher") or "—", *[res.get(k) for k in keys],
                     f"{res.get('num_parameters', 0) / 1e6:.2f}M", f"{res.get('train_seconds', 0):.1f}"])
    return Table("Test metrics per stage", ["stage", "description", "teacher", *keys, "parameters", "train s"], rows, key="stages")


def collect_tables(results: dict[str, Any], recipe: dict[str, Any], plugins) -> list[Table]:
    """The core's table of stages followed by every plugin's ``kdt_report_tables``."""
    tables = [stages_table(results)]
    for contributed in plugins.call("kdt_report_tables", results=results, recipe=recipe):
        tables.extend(contributed)
    return tables


def training_curves(out: Path, stages: list[str]) -> Path | None:
    """``training.png``: total loss and training accuracy per epoch of every stage.

    Read from each stage's ``metrics.jsonl``; phases follow each other on one
    epoch axis. Returns the path, or ``None`` when no stage logged an epoch.
    """
    import json

    series = {}
    for name in stages:
        f = out / name / "metrics.jsonl"
        if not f.exists():
            continue
        rows = [json.loads(l) for l in f.read_text(encoding="utf-8").splitlines() if l.strip()]
        rows = [r for r in rows if "epoch" in r and "loss/total" in r]
        if rows:
            series[name] = rows
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in series.items():
        x = list(range(1, len(rows) + 1))
        ax1.plot(x, [r["loss/total"] for r in rows], label=name)
        ax2.plot(x, [r.get("train_accuracy", float("nan")) for r in rows], label=name)
    ax1.set_yscale("log")
    ax1.set_title("total training loss")
    ax2.set_title("training accuracy (augmented batches)")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch (all phases of the stage in order)")
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(out: Path, results: dict[str, Any], recipe: dict[str, Any], plugins) -> list[Table]:
    """Write ``results.json``, ``results.md`` and ``training.png`` into ``out``; return the tables."""
    tables = collect_tables(results, recipe, plugins)
    atomic_write_json(out / "results.json", results)
    md = [f"# Results: {recipe.get('name', '')}", ""]
    if recipe.get("description"):
        md += [recipe["description"], ""]
    md += [t.to_markdown() for t in tables]
    if training_curves(out, list(results["stages"])):
        md += ["![training curves](training.png)", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    return tables
