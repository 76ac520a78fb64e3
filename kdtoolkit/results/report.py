"""Result tables: ``results.md``, ``results.json`` and the summary printed at the end.

Plugins add tables through the ``kdt_report_tables`` hook (the Proto2Proto
bundle adds the reproduction's Table 1 and Table 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.foundation.io import atomic_savefig, atomic_write_json, atomic_write_text
from kdtoolkit.foundation.tables import Number, Table, fmt, print_tables  # noqa: F401 -- part of this module's interface
from kdtoolkit.results.rundir_files import RESULTS, load_json


def stages_table(results: dict[str, Any]) -> Table:
    """Every stage's scalar test metrics (accuracy first)."""
    stages = results["stages"]
    keys: list[str] = []
    for res in stages.values():
        for k, v in res.items():
            if (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and k not in ("num_parameters", "train_seconds", "test_images")
                and k not in keys
            ):
                keys.append(k)
    keys.sort(key=lambda k: (k != "accuracy", k))
    rows = []
    for name, res in stages.items():
        rows.append(
            [
                name,
                res.get("description", ""),
                res.get("teacher") or "—",
                *[res.get(k) for k in keys],
                f"{res.get('num_parameters', 0) / 1e6:.2f}M",
                Number(res.get("train_seconds", 0), ".1f"),
            ]
        )
    return Table(
        "Test metrics per stage",
        ["stage", "description", "teacher", *keys, "parameters", "train s"],
        rows,
        key="stages",
    )


class RunResults(dict):
    """A run's results (a dict: the content of ``results.json``) with the result tables the run built.

    :attr:`tables` are the tables of ``results.md`` (the core's table of stages, then every plugin's
    ``kdt_report_tables``), built once by the run (``None`` where none were built: on a rank other than
    rank 0 of a distributed run). The summary ``kdt run`` prints reuses them, so every plugin's report
    hook runs once per run.
    """

    def __init__(self, results: dict[str, Any], tables: list[Table] | None = None) -> None:
        super().__init__(results)
        self.tables = tables


def collect_tables(results: dict[str, Any], recipe: dict[str, Any], plugins) -> list[Table]:
    """The core's table of stages followed by every plugin's ``kdt_report_tables`` (each hook called once)."""
    tables = [stages_table(results)]
    for contributed in plugins.call("kdt_report_tables", results=results, recipe=recipe):
        tables.extend(contributed)
    return tables


def epoch_logs(out: Path, stages: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The training-epoch lines of each stage's ``metrics.jsonl`` (those with ``epoch`` and ``loss/total``), in order.

    Stages without such a line are left out.
    """
    import json

    series = {}
    for name in stages:
        f = Path(out) / name / "metrics.jsonl"
        if not f.exists():
            continue
        rows = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError):  # e.g. a last line cut short when a run was killed
                continue
        rows = [r for r in rows if isinstance(r, dict) and "epoch" in r and "loss/total" in r]
        if rows:
            series[name] = rows
    return series


#: Loss components whose value is the cross-entropy of the prediction (ProtoTree's NLL of log ŷ is one).
CROSS_ENTROPY_LOSSES = ("cross_entropy", "prototree_nll")


PHASE_NOTE = (
    "Dotted grey lines: a training phase starts. Dashed red lines: a phase without epochs (push, projection, "
    "pruning). At a push the prototypes become training patches,\nso the cross-entropy usually jumps and the "
    "last-layer phase after it re-fits the last layer. The total is the weighted sum of the losses the phase "
    "uses: it also jumps\nwhere that set changes (the last-layer phase has no cluster or separation term)."
)


def phase_marks(history: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[tuple[float, str, bool]]:
    """Where each phase of a stage starts on its epoch axis: ``(x, phase name, trains)``.

    ``history`` is the stage's ``history`` in ``results.json``; ``rows`` its
    epoch lines (:func:`epoch_logs`), epoch ``i`` (from 1) at ``x = i``. A
    training phase starts at ``x = 0.5 +`` the epochs before it; a phase
    without epochs (push, prune, projection) sits between the epochs around it.
    Skipped phases are left out.
    """
    marks: list[tuple[float, str, bool]] = []
    done = 0
    for h in history:
        if h.get("skipped"):
            continue
        if "epochs" in h:
            marks.append((done + 0.5, h["name"], True))
            done += sum(1 for r in rows if r.get("phase") == h["name"]) or int(h.get("epochs") or 0)
        else:
            marks.append((done + 0.5, h["name"], False))
    return marks


def _stage_panel(ax, name: str, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """One stage's total loss and cross-entropy per epoch, with its phases marked."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    x = list(range(1, len(rows) + 1))
    ax.plot(x, [r["loss/total"] for r in rows], marker=".", label="total (the phase's weighted losses)")
    ce = [k for k, comp in (result.get("loss_names") or {}).items() if comp in CROSS_ENTROPY_LOSSES]
    for key in ce:
        ax.plot(x, [r.get(f"loss/{key}", float("nan")) for r in rows], marker=".", linestyle="--", label=key)
    values = [r["loss/total"] for r in rows] + [r[f"loss/{k}"] for k in ce for r in rows if f"loss/{k}" in r]
    if values and min(values) > 0:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    marks: dict[tuple[float, bool], list[str]] = {}
    for pos, phase, trains in phase_marks(result.get("history", []), rows):
        marks.setdefault((pos, trains), []).append(phase)
    for (pos, trains), phases in marks.items():
        ax.axvline(pos, color="0.45" if trains else "tab:red", linestyle=":" if trains else "--", linewidth=1)
        # a phase's name right of its start line; pushes (no epochs) left of their line, which they share
        ax.text(
            pos + (0.03 if trains else -0.03),
            0.98,
            " + ".join(phases),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="left" if trains else "right",
            fontsize=8,
            color="0.25" if trains else "tab:red",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.3, max([len(rows) + 0.5] + [p + 0.4 for p, _ in marks]))
    ax.set_title(f"{name}: loss per epoch", fontsize=10)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def training_curves(out: Path, stages: list[str], results: dict[str, Any] | None = None) -> Path | None:
    """``training.png``: total loss and training accuracy per epoch of every stage, then one panel per
    stage with its total loss, its cross-entropy and its phases marked.

    Read from each stage's ``metrics.jsonl``; phases follow each other on one
    epoch axis. The phases come from the stage history of ``results`` (default:
    ``out/results.json``, when present): dotted grey lines where a training phase starts, dashed red
    lines at a push, prune or projection. Returns the path, or ``None`` when no stage logged an epoch.
    """
    series = epoch_logs(out, stages)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if results is None and (Path(out) / RESULTS).is_file():
        try:
            results = load_json(Path(out) / RESULTS)
        except (KdtError, OSError, ValueError, RecursionError):  # unreadable: the figure without the stage panels
            results = None
    per_stage = (results if isinstance(results, dict) else {}).get("stages", {})
    extra = -(-len(series) // 2) if per_stage else 0
    fig = plt.figure(figsize=(11, 4 + 3.2 * extra))
    grid = fig.add_gridspec(1 + extra, 2, height_ratios=[4] + [3.2] * extra)
    ax1, ax2 = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for name, rows in series.items():
        x = list(range(1, len(rows) + 1))
        ax1.plot(x, [r["loss/total"] for r in rows], label=name)
        ax2.plot(x, [r.get("train_accuracy", float("nan")) for r in rows], label=name)
    ax1.set_yscale("log")
    ax1.set_title("total training loss")
    ax2.set_title("training accuracy (augmented batches)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.set_xlabel("epoch (all phases of the stage in order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    if per_stage:
        for k, (name, rows) in enumerate(series.items()):
            _stage_panel(fig.add_subplot(grid[1 + k // 2, k % 2]), name, rows, per_stage.get(name, {}))
        fig.text(0.01, 0.005, PHASE_NOTE, fontsize=8, va="bottom", ha="left")
    fig.tight_layout(rect=(0, 0.4 / (4 + 3.2 * extra) if per_stage else 0, 1, 1))
    path = out / "training.png"
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
    return path


def write_reports(out: Path, results: dict[str, Any], recipe: dict[str, Any], plugins) -> list[Table]:
    """Write ``results.json``, ``results.md`` and ``training.png`` into ``out``; return the tables."""
    tables = collect_tables(results, recipe, plugins)
    atomic_write_json(out / RESULTS, results)
    md = [f"# Results: {recipe.get('name', '')}", ""]
    if recipe.get("description"):
        md += [recipe["description"], ""]
    md += [t.to_markdown() for t in tables]
    if training_curves(out, list(results["stages"]), results):
        md += ["![training curves](training.png)", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    return tables
