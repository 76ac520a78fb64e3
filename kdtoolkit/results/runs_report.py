"""``report.md`` over several runs of one recipe: what ``kdt report`` and ``kdt run --seeds`` write.

:func:`build_report` reads the runs and aggregates them
(:mod:`kdtoolkit.results.aggregate`); :func:`write_report` draws the figures
(:mod:`kdtoolkit.results.plots`) next to the report and writes the Markdown.

Which results are drawn against a threshold is declared by the metric components of the recipe
(:func:`threshold_tables`), not known here: a metric names, in its class attribute
``threshold_tables``, the result keys that hold a table keyed by a threshold's value
(``"0.1"``, ``"inf"``), with the figure's title, the threshold's symbol and the axis label.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtoolkit.results.aggregate import (
    AggTable,
    Run,
    Stat,
    aggregate_tables,
    baseline_deltas,
    check_same_recipe,
    deltas_table,
    find_runs,
    load_run,
    nest,
    stage_metrics,
)
from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.foundation.paths import name_problem
from kdtoolkit.foundation.tables import Table

SD_NOTE = (
    "Each number is the mean ± the sample standard deviation (n − 1 in the denominator) over the runs; "
    '"(n=k)": only k runs have the value. Differences from the baseline are the mean ± sample standard '
    "deviation of the per-run paired differences (a run's stage minus the same run's baseline)."
)


@dataclass(frozen=True)
class ThresholdTable:
    """A result keyed by a threshold's value, as its metric component declares it for ``kdt report``.

    :ivar key: the result key (``results.json``: ``{key: {"0.1": x, ..., "inf": y}}``); the figure is
        ``<report stem>-<key>.png``.
    :ivar title: the figure's title, before ``" against <symbol>, mean ± sd over n runs"``.
    :ivar symbol: the threshold's symbol (e.g. ``τ``), in headings and the differences table's column.
    :ivar label: the x axis's label (e.g. ``"threshold τ"``).
    """

    key: str
    title: str
    symbol: str
    label: str


def _declared(key: Any, spec: Any) -> ThresholdTable | None:
    """One entry of a metric's ``threshold_tables``; ``None`` for a key that cannot name a figure file."""
    if not isinstance(key, str) or name_problem(key) is not None or key == "training":
        return None
    spec = spec if isinstance(spec, dict) else {}
    symbol = spec.get("symbol") if isinstance(spec.get("symbol"), str) else "t"
    title = spec.get("title") if isinstance(spec.get("title"), str) else key.upper()
    label = spec.get("label") if isinstance(spec.get("label"), str) else f"threshold {symbol}"
    return ThresholdTable(key, title, symbol, label)


def threshold_tables(recipe: dict[str, Any], plugins) -> dict[str, ThresholdTable]:
    """The results keyed by a threshold that the recipe's metrics declare, by result key, in recipe order.

    Each metric component may declare a class attribute ``threshold_tables``:
    ``{result key: {"title": ..., "symbol": ..., "label": ...}}`` (read through the registry, so a
    kept schema serves it without importing the metric's module). A metric no plugin provides now
    declares nothing.
    """
    out: dict[str, ThresholdTable] = {}
    for stage in recipe.get("stages", {}).values():
        for spec in stage.get("metrics", []) if isinstance(stage, dict) else []:
            try:
                declared = plugins.registry("metric").get(spec["name"]).attr("threshold_tables", None)
            except Exception:  # a metric no plugin provides now, or a broken plugin: nothing declared
                continue
            for key, value in (declared if isinstance(declared, dict) else {}).items():
                table = _declared(key, value)
                if table is not None:
                    out.setdefault(key, table)
    return out


@dataclass
class Report:
    """Several runs of one recipe, aggregated.

    :ivar runs: the runs, in order.
    :ivar tables: the runs' result tables, aggregated cell by cell.
    :ivar metrics: per stage, every numeric metric of ``results.json`` (key path → :class:`Stat`).
    :ivar deltas: per distilled stage with a baseline, ``(baseline, {key path: Stat of the differences})``.
    :ivar figures: figure name (a result key drawn against its threshold, or ``training``) → file, once written.
    :ivar thresholds: the results keyed by a threshold, by result key (:func:`threshold_tables`).
    """

    runs: list[Run]
    tables: list[AggTable]
    metrics: dict[str, dict[tuple[str, ...], Stat]]
    deltas: dict[str, tuple[str, dict[tuple[str, ...], Stat]]]
    figures: dict[str, Path] = field(default_factory=dict)
    thresholds: dict[str, ThresholdTable] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.runs[0].recipe.get("name", "")

    def all_tables(self) -> list[Table]:
        """The aggregated tables, then the differences from the baseline, as text tables."""
        out = [t.table() for t in self.tables]
        deltas = deltas_table(self.deltas, {k: t.symbol for k, t in self.thresholds.items()})
        return out + ([deltas.table()] if deltas is not None else [])

    def to_json(self) -> dict[str, Any]:
        """Every aggregated number: ``{name, runs, seeds, n, sd, tables, metrics, deltas, figures}``."""
        return {
            "name": self.name,
            "runs": [str(r.path) for r in self.runs],
            "seeds": [r.seed for r in self.runs],
            "n": len(self.runs),
            "sd": "sample standard deviation (ddof = 1)",
            "tables": [t.to_json() for t in self.tables],
            "metrics": {s: nest({p: st.to_json() for p, st in stats.items()}) for s, stats in self.metrics.items()},
            "deltas": {
                s: {"baseline": b, "metrics": nest({p: st.to_json() for p, st in stats.items()})}
                for s, (b, stats) in self.deltas.items()
            },
            "figures": {k: str(v) for k, v in self.figures.items()},
        }


def build_report(paths: list[str | Path], plugins) -> Report:
    """Read and aggregate the runs named by ``paths`` (run directories, or folders of ``seed-<n>/`` runs).

    :raises KdtError: for a folder that is no finished run, or runs of different recipes.
    """
    from kdtoolkit.results.report import collect_tables

    runs = [load_run(p) for p in find_runs(paths)]
    check_same_recipe(runs)
    tables = aggregate_tables([collect_tables(r.results, r.recipe, plugins) for r in runs])
    return Report(
        runs,
        tables,
        stage_metrics(runs),
        baseline_deltas(runs, plugins),
        thresholds=threshold_tables(runs[0].recipe, plugins),
    )


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(start).resolve())).as_posix()


def _figures(report: Report, out: Path) -> None:
    from kdtoolkit.results.report import epoch_logs
    from kdtoolkit.results.plots import threshold_figure, threshold_series, training_figure

    stem, folder = out.stem, out.parent
    for key, t in report.thresholds.items():
        made = threshold_figure(
            threshold_series(report.metrics, key),
            f"{t.title} against {t.symbol}, mean ± sd over {len(report.runs)} runs",
            folder / f"{stem}-{key}.png",
            t.label,
        )
        if made is not None:
            report.figures[key] = made
    logs = [epoch_logs(r.path, list(r.results["stages"])) for r in report.runs]
    made = training_figure(logs, folder / f"{stem}-training.png")
    if made is not None:
        report.figures["training"] = made


def _and(names: list[str]) -> str:
    """``"A"``, ``"A and B"``, ``"A, B and C"``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _threshold_sections(report: Report, folder: Path) -> list[str]:
    """One section per threshold symbol with the figures drawn against it (e.g. "AAP and AJS against τ")."""
    by_symbol: dict[str, list[str]] = {}
    for key, t in report.thresholds.items():
        if key in report.figures:
            by_symbol.setdefault(t.symbol, []).append(key)
    md = []
    for symbol, keys in by_symbol.items():
        md += [
            f"## {_and([k.upper() for k in keys])} against {symbol}",
            "",
            f"One line per model: the mean over the runs, the band ± one sample standard deviation; {symbol} = ∞ "
            "(no threshold) at its own tick on the right.",
            "",
        ]
        md += [f"![{k.upper()} against {symbol}]({_rel(report.figures[k], folder)})" for k in keys]
        md.append("")
    return md


def _markdown(report: Report, out: Path) -> str:
    folder = out.parent
    first = report.runs[0].recipe
    md = [f"# Report: {report.name} ({len(report.runs)} runs)", ""]
    if first.get("description"):
        md += [first["description"], ""]
    runs = ", ".join(
        f"[{_rel(r.path, folder)}]({_rel(r.path / 'results.md', folder)})"
        + (f" (seed {r.seed})" if r.seed is not None else "")
        for r in report.runs
    )
    md += [f"Runs of the same recipe: {runs}.", "", SD_NOTE, ""]
    md += [t.to_markdown() for t in report.all_tables()]
    md += _threshold_sections(report, folder)
    curves = [r.path / "training.png" for r in report.runs if (r.path / "training.png").is_file()]
    if "training" in report.figures or curves:
        md += ["## Training curves", ""]
        if "training" in report.figures:
            md += [f"![training curves, mean ± sd]({_rel(report.figures['training'], folder)})", ""]
        if curves:
            md += [
                "Each run's own curves: " + ", ".join(f"[{_rel(p.parent, folder)}]({_rel(p, folder)})" for p in curves),
                "",
            ]
    return "\n".join(md)


def write_report(report: Report, out: str | Path) -> Path:
    """Draw the figures next to ``out`` (``<stem>-<result key>.png`` for each result drawn against its
    threshold, ``<stem>-training.png``) and write the Markdown report ``out``; returns its path."""
    from kdtoolkit.foundation.io import atomic_write_text

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KdtError(
            f"cannot create the report's folder ({exc.strerror or type(exc).__name__})", source=str(out)
        ) from None
    _figures(report, out)
    atomic_write_text(out, _markdown(report, out))
    return out


def default_output(paths: list[str | Path]) -> Path:
    """``report.md`` in the one folder given, or in the deepest folder holding all of them."""
    if len(paths) == 1:
        return Path(paths[0]) / "report.md"
    return Path(os.path.commonpath([str(Path(p).resolve()) for p in paths])) / "report.md"


def report_command(paths: list[str | Path], out: str | Path | None, as_json: bool, plugins) -> None:
    """``kdt report``: aggregate ``paths``, write the report, print its tables (or its JSON with ``as_json``)."""
    import json

    import click

    from kdtoolkit.foundation.tables import print_tables

    report = build_report(paths, plugins)
    path = write_report(report, out or default_output(paths))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print_tables(report.all_tables())
        click.echo(f"report: {path}")
