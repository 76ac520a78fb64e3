"""Reports over several runs of one recipe: ``kdt report`` and the end of ``kdt run --seeds``.

The runs' own result tables (the core's table of stages and every plugin's
``kdt_report_tables``: Proto2Proto's Table 1 and Table 2, the ProtoTree
table, ...) are built for each run as ``results.md`` has them, then
aggregated cell by cell: tables are matched by title, rows by their first
cell (and its occurrence), cells by column. A cell that is a number in every
run that has it becomes mean ± standard deviation (the sample standard
deviation, n − 1 in the denominator); other cells must agree (else their
distinct values are listed). Per stage, every numeric metric of
``results.json`` is aggregated the same way, and a distilled stage is
compared with its baseline (:func:`baseline_of`) run by run: mean ± sd of
the paired differences.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kdtoolkit.results.rundir_files as rundir_files
from kdtoolkit.foundation.errors import KdtError
from kdtoolkit.foundation.tables import Number, Table, fmt

#: Keys of a stage's result that are not metrics.
NOT_METRICS = (
    "num_parameters",
    "train_seconds",
    "test_images",
    "losses",
    "loss_names",
    "state",
    "history",
    "stage_hash",
)
_NUMBER_TEXT = re.compile(r"^\s*([+-]?\d+(?:\.(\d+))?)(%?)\s*$")


@dataclass
class Stat:
    """Mean and sample standard deviation (``None`` for fewer than two values) of one number over runs.

    :ivar values: the runs' values, in run order (runs without it left out).
    :ivar total: how many runs were aggregated (``n`` may be less).
    :ivar spec: the :func:`format` specification of the runs' cells (``None``: 4 decimals).
    :ivar signed: shown with its sign (a difference).
    """

    values: list[float]
    total: int
    spec: str | None = None
    signed: bool = False
    mean: float = field(init=False)
    sd: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.mean, self.sd = mean_sd(self.values)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def p_value(self) -> float | None:
        """For a difference (``signed``): the two-sided p-value of a paired t-test that its mean is 0
        (``scipy.stats.ttest_1samp`` of the per-run differences); ``None`` for fewer than two values,
        a constant difference or values that are not finite."""
        if not self.signed or self.n < 2 or not self.sd or not math.isfinite(self.sd):
            return None
        from scipy.stats import ttest_1samp

        return float(ttest_1samp(self.values, 0.0).pvalue)

    def text(self) -> str:
        """``"0.7621 ± 0.0123"`` (``"+0.0510 ± 0.0123 (p=0.004)"`` if signed), with ``" (n=k)"`` when runs
        lack the value."""
        out = _number(self.mean, self.spec, self.signed)
        if self.sd is not None:
            out += f" ± {_number(self.sd, self.spec, False)}"
        p = self.p_value
        if p is not None:
            out += f" (p={p:.2g})"
        return out + (f" (n={self.n})" if self.n < self.total else "")

    def to_json(self) -> dict[str, Any]:
        """``{mean, sd, n, values}``, and ``p`` for a difference (``None`` for what is undefined or not finite)."""
        out = {
            "mean": _finite(self.mean),
            "sd": _finite(self.sd),
            "n": self.n,
            "values": [_finite(v) for v in self.values],
        }
        if self.signed:
            out["p"] = self.p_value
        return out


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """``statistics.mean`` and ``statistics.stdev`` (sample sd, n − 1); sd ``None`` below two values, NaN if
    not finite."""
    if not values:
        return math.nan, None
    if not all(math.isfinite(v) for v in values):
        return sum(values) / len(values), (math.nan if len(values) > 1 else None)
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _number(x: float, spec: str | None, signed: bool) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    spec = spec or (".4f" if abs(x) < 1000 else ".1f")
    return format(x, ("+" if signed else "") + spec)


# ---------------------------------------------------------------------------
# runs


@dataclass
class Run:
    """One finished run directory: its resolved recipe, ``results.json`` and seed."""

    path: Path
    recipe: dict[str, Any]
    results: dict[str, Any]
    seed: int | None


def _seed_folders(path: Path) -> list[Path]:
    found = [(int(p.name[5:]), p) for p in path.glob("seed-*") if p.name[5:].isdigit() and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories named by ``paths``: a folder with ``seed-<n>/`` sub-folders stands for them (in
    the order of n; its own run, if any, is left out); any other folder must be a run directory."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise KdtError("no such run directory" if not p.exists() else "not a directory", source=str(p))
        for run in _seed_folders(p) or [p]:
            if run.resolve() not in [o.resolve() for o in out]:
                out.append(run)
    return out


def load_run(path: Path) -> Run:
    """Read a finished run directory (``recipe.resolved.json`` and ``results.json``, and the seed from
    ``run.json``), through :mod:`kdtoolkit.results.rundir_files`."""
    recipe = rundir_files.resolved_recipe(path)
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), dict):
        raise KdtError("not a run directory (no recipe.resolved.json) and no seed-<n> folders in it", source=str(path))
    if not (path / rundir_files.RESULTS).is_file():
        raise KdtError(
            "no results.json: the run has not finished (run the same kdt run command again)", source=str(path)
        )
    results = rundir_files.run_results(path, "results")
    seed = recipe.get("seed")
    info = rundir_files.run_info(path)
    if isinstance(info, dict):
        seed = info.get("seed", seed)
    return Run(path=path, recipe=recipe, results=results, seed=seed)


def _without_seeds(recipe: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in recipe.items() if k not in ("seed", "seeds")}
    out["stages"] = {n: {k: v for k, v in st.items() if k != "seed"} for n, st in recipe["stages"].items()}
    return out


def _first_difference(a: Any, b: Any, key: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
    return key or "the recipe"


def check_same_recipe(runs: list[Run]) -> None:
    """Refuse runs of different recipes: their resolved recipes may differ in their seeds only.

    :raises KdtError: one line naming the two folders and the first key that differs (exit code 2).
    """
    first = _without_seeds(runs[0].recipe)
    for run in runs[1:]:
        other = _without_seeds(run.recipe)
        if json.dumps(other, sort_keys=True, default=str) != json.dumps(first, sort_keys=True, default=str):
            raise KdtError(
                f"{runs[0].path} and {run.path} are runs of different recipes ({_first_difference(first, other)} "
                "differs; only the seeds may)"
            )


# ---------------------------------------------------------------------------
# tables


def _numeric(cell: Any) -> tuple[float, str | None] | None:
    """A table cell as ``(value, format spec)``, or ``None`` when it is not a number."""
    if isinstance(cell, bool) or cell is None:
        return None
    if isinstance(cell, Number):
        return float(cell), cell.spec
    if isinstance(cell, (int, float)):
        return float(cell), None
    m = _NUMBER_TEXT.match(cell) if isinstance(cell, str) else None
    if m is None:
        return None
    decimals = len(m.group(2) or "")
    if m.group(3):
        return float(m.group(1)) / 100, f".{decimals}%"
    return float(m.group(1)), f".{decimals}f"


def aggregate_cell(cells: list[Any], total: int, label: bool = False) -> Stat | str | None:
    """Numbers → :class:`Stat`; equal text → the text; differing text → its distinct values joined by ``" / "``."""
    present = [c for c in cells if c is not None]
    if not present:
        return None
    nums = [_numeric(c) for c in present]
    if not label and all(x is not None for x in nums):
        found = cast("list[tuple[float, str | None]]", nums)  # none is None (checked just above)
        return Stat([x[0] for x in found], total, found[0][1])
    texts = list(dict.fromkeys(fmt(c) for c in present))
    return " / ".join(texts)


@dataclass
class AggTable:
    """A result table aggregated over runs: cells are :class:`Stat`, text or ``None``."""

    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    key: str = ""

    def table(self) -> Table:
        """As a :class:`~kdtoolkit.foundation.tables.Table` of text (for Markdown or the terminal)."""
        rows = [[c.text() if isinstance(c, Stat) else c for c in row] for row in self.rows]
        return Table(self.title, self.columns, rows, note=self.note, key=self.key)

    def to_json(self) -> dict[str, Any]:
        """``{title, key, columns, rows}``; a numeric cell is ``Stat.to_json()``, others as in the table."""
        rows = [[c.to_json() if isinstance(c, Stat) else c for c in row] for row in self.rows]
        return {"title": self.title, "key": self.key, "columns": self.columns, "rows": rows}


def _aggregate_table(tables: list[Table], total: int) -> AggTable:
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))
    rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for t in tables:
        seen: Counter = Counter()
        for row in t.rows:
            label = fmt(row[0]) if row else ""
            rows.setdefault((label, seen[label]), []).append(dict(zip(t.columns, row)))
            seen[label] += 1
    out = [
        [aggregate_cell([r.get(c) for r in group], total, label=(j == 0)) for j, c in enumerate(columns)]
        for group in rows.values()
    ]
    return AggTable(tables[0].title, columns, out, tables[0].note, tables[0].key)


def aggregate_tables(per_run: list[list[Table]]) -> list[AggTable]:
    """Aggregate the runs' tables: matched by title (and occurrence of the title), rows by first cell."""
    groups: dict[tuple[str, int], list[Table]] = {}
    for tables in per_run:
        seen: Counter = Counter()
        for t in tables:
            groups.setdefault((t.title, seen[t.title]), []).append(t)
            seen[t.title] += 1
    return [_aggregate_table(ts, len(per_run)) for ts in groups.values()]


# ---------------------------------------------------------------------------
# metrics and differences from the baseline


def _leaves(value: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], float]:
    if isinstance(value, bool) or value is None:
        return {}
    if isinstance(value, (int, float)):
        return {path: float(value)}
    if isinstance(value, dict):
        return {p: v for k, sub in value.items() for p, v in _leaves(sub, path + (str(k),)).items()}
    return {}


def metric_leaves(result: dict[str, Any]) -> dict[tuple[str, ...], float]:
    """Every number of a stage's result that is a metric, by key path (``("aap", "inf")``)."""
    return {p: v for k, sub in result.items() if k not in NOT_METRICS for p, v in _leaves(sub, (k,)).items()}


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """``{("aap", "inf"): x}`` → ``{"aap": {"inf": x}}``."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def stage_metrics(runs: list[Run]) -> dict[str, dict[tuple[str, ...], Stat]]:
    """Per stage, every metric (key path) as a :class:`Stat` over the runs."""
    out: dict[str, dict[tuple[str, ...], list[float]]] = {}
    for run in runs:
        for name, res in run.results["stages"].items():
            for path, v in metric_leaves(res).items():
                out.setdefault(name, {}).setdefault(path, []).append(v)
    return {name: {p: Stat(vs, len(runs)) for p, vs in paths.items()} for name, paths in out.items()}


def _uses_teacher(stage: dict[str, Any], plugins) -> bool:
    for loss in stage.get("losses", []):
        if loss.get("weight", 1) == 0:
            continue
        try:
            if plugins.registry("loss").get(loss["name"]).attr("requires_teacher", False):
                return True
        except Exception:  # a loss no plugin provides now: count it as distillation
            return True
    return False


def baseline_of(name: str, stages: dict[str, Any], plugins=None) -> str | None:
    """The baseline of a distilled stage (one with a ``teacher`` T): the first stage without a teacher whose
    ``compare_to`` is T (the student trained without distillation, as in Table 2); failing that, the first
    other stage with teacher T whose losses read no teacher. ``None`` for a stage without teacher."""
    ref = stages[name].get("teacher")
    if not ref:
        return None
    for other, st in stages.items():
        if other != name and not st.get("teacher") and st.get("compare_to") == ref:
            return other
    if plugins is not None:
        for other, st in stages.items():
            if other != name and st.get("teacher") == ref and not _uses_teacher(st, plugins):
                return other
    return None


def baseline_deltas(runs: list[Run], plugins=None) -> dict[str, tuple[str, dict[tuple[str, ...], Stat]]]:
    """Per distilled stage with a baseline: ``(baseline, {metric path: Stat of the per-run differences})``."""
    stages = runs[0].recipe["stages"]
    out = {}
    for name in stages:
        base = baseline_of(name, stages, plugins)
        if base is None:
            continue
        diffs: dict[tuple[str, ...], list[float]] = {}
        for run in runs:
            got, ref = (run.results["stages"].get(s) for s in (name, base))
            if got is None or ref is None:
                continue
            ref_leaves = metric_leaves(ref)
            for path, v in metric_leaves(got).items():
                if path in ref_leaves:
                    diffs.setdefault(path, []).append(v - ref_leaves[path])
        out[name] = (base, {p: Stat(vs, len(runs), signed=True) for p, vs in diffs.items()})
    return out


def _headline(path: tuple[str, ...], symbols: dict[str, str]) -> str | None:
    """The column of a metric in the differences table: scalars, and results keyed by a threshold at ∞
    (``"<key> (<symbol>=∞)"`` with the symbol its metric declares, e.g. ``τ``; ``"<key> (∞)"`` without)."""
    if len(path) == 1:
        return path[0]
    if len(path) == 2 and path[1] == "inf":
        symbol = symbols.get(path[0])
        return f"{path[0]} ({symbol}=∞)" if symbol else f"{path[0]} (∞)"
    return None


def deltas_table(
    deltas: dict[str, tuple[str, dict[tuple[str, ...], Stat]]], symbols: dict[str, str] | None = None
) -> AggTable | None:
    """The differences from the baseline as a table (scalar metrics, and results keyed by a threshold at ∞).

    :param symbols: result key → the symbol of its threshold (``threshold_tables`` of its metric component).
    """
    columns: dict[str, tuple[str, ...]] = {}
    for _, stats in deltas.values():
        for path in stats:
            label = _headline(path, symbols or {})
            if label is not None:
                columns.setdefault(label, path)
    if not columns:
        return None
    order = sorted(columns, key=lambda c: c != "accuracy")
    rows = []
    for name, (base, stats) in deltas.items():
        cells = [stats.get(columns[c]) for c in order]
        rows.append([name, base, *[None if c is None else Stat(c.values, c.total, signed=True) for c in cells]])
    return AggTable(
        "Differences from the baseline",
        ["stage", "baseline", *order],
        rows,
        note="Per run, the stage's metric minus its baseline's (units of results.json: accuracy as a "
        "fraction); mean ± sample sd of these paired differences over the runs, and the two-sided "
        "p-value of a paired t-test that the mean difference is 0 (scipy.stats.ttest_1samp of the "
        "differences; with few runs read it as a guide, not a verdict).",
        key="baseline_deltas",
    )
