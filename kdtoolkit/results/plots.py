"""Figures of reports over several runs (:mod:`kdtoolkit.results.runs_report`): training curves, and
metrics against their threshold.

A metric's result is drawn against a threshold when it is a table keyed by the threshold's value
(``"0.1"``, ``"1"``, ``"inf"``) and its metric component declares it in ``threshold_tables`` (e.g.
Proto2Proto's AAP against τ). Every line is the mean over the runs with a shaded band of ± one
sample standard deviation. matplotlib is imported only when a figure is drawn, with the Agg backend
(no display).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kdtoolkit.results.aggregate import Stat, mean_sd
from kdtoolkit.foundation.io import atomic_savefig


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _threshold(key: str) -> float | None:
    try:
        return float(key)
    except ValueError:
        return None


def threshold_series(
    metrics: dict[str, dict[tuple[str, ...], Stat]], metric: str
) -> dict[str, list[tuple[float, Stat]]]:
    """Per stage, ``(t, Stat)`` of the result ``metric`` (a table keyed by a threshold ``t``) at every
    ``t > 0`` it was evaluated at, by ``t`` (``inf`` last); keys that are no number are left out."""
    out = {}
    for stage, stats in metrics.items():
        found = [(_threshold(p[1]), st) for p, st in stats.items() if len(p) == 2 and p[0] == metric]
        points = sorted((t, st) for t, st in found if t is not None and t > 0)
        if points:
            out[stage] = points
    return out


def _band(ax, x: list[float], stats: list[Stat], color, label: str | None = None) -> None:
    mean = [s.mean for s in stats]
    sd = [s.sd or 0.0 for s in stats]
    ax.plot(x, mean, marker="o", markersize=3, color=color, label=label)
    ax.fill_between(
        x, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], color=color, alpha=0.2, linewidth=0
    )


def threshold_figure(
    series: dict[str, list[tuple[float, Stat]]], title: str, path: Path, label: str = "threshold"
) -> Path | None:
    """One line per model against the threshold on a log axis, ∞ at its own tick (``∞``) right of the others.

    :param series: from :func:`threshold_series`.
    :param title: the figure's title.
    :param path: the PNG to write.
    :param label: the x axis's label (``" (log scale)"`` is added), e.g. ``"threshold τ"``.
    :return: ``path``, or ``None`` when there is nothing to draw.
    """
    if not series:
        return None
    finite = sorted({t for pts in series.values() for t, _ in pts if math.isfinite(t)})
    lo, hi = (finite[0], finite[-1]) if finite else (1.0, 1.0)
    x_inf = hi * max(10.0, (hi / lo) ** 0.25)  # a separate position, a bit apart from the last finite threshold
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (stage, points) in enumerate(series.items()):
        color = colors[i % len(colors)]
        fin = [(t, s) for t, s in points if math.isfinite(t)]
        inf = [s for t, s in points if not math.isfinite(t)]
        if fin:
            _band(ax, [t for t, _ in fin], [s for _, s in fin], color, stage)
        if inf:
            s = inf[0]
            ax.errorbar(
                [x_inf],
                [s.mean],
                yerr=[[s.sd or 0.0], [s.sd or 0.0]],
                fmt="s",
                color=color,
                capsize=4,
                label=None if fin else stage,
            )
            if fin:
                ax.plot([fin[-1][0], x_inf], [fin[-1][1].mean, s.mean], linestyle=":", color=color)
    ticks = finite + [x_inf]
    ax.set_xscale("log")
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + ["∞"])
    ax.minorticks_off()
    if finite:
        ax.axvline(math.sqrt(hi * x_inf), color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"{label} (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
    return path


def _deprecated(old: str, new: str) -> None:
    import warnings

    warnings.warn(f"kdtoolkit.results.{old} is deprecated; use {new}", DeprecationWarning, stacklevel=3)


def tau_series(metrics: dict[str, dict[tuple[str, ...], Stat]], metric: str) -> dict[str, list[tuple[float, Stat]]]:
    """Deprecated name of :func:`threshold_series` (kept for one more version)."""
    _deprecated("tau_series", "threshold_series")
    return threshold_series(metrics, metric)


def tau_figure(series: dict[str, list[tuple[float, Stat]]], title: str, path: Path) -> Path | None:
    """Deprecated: :func:`threshold_figure` with the axis label ``"threshold τ"`` (kept for one more version)."""
    _deprecated("tau_figure", "threshold_figure")
    return threshold_figure(series, title, path, "threshold τ")


def _mean_curves(per_run: list[list[dict[str, Any]]], key: str) -> tuple[list[float], list[float]]:
    length = min(len(rows) for rows in per_run)
    means, sds = [], []
    for i in range(length):
        values = [float(rows[i][key]) for rows in per_run if isinstance(rows[i].get(key), (int, float))]
        m, sd = mean_sd(values)
        means.append(m)
        sds.append(sd or 0.0)
    return means, sds


def training_figure(logs: list[dict[str, list[dict[str, Any]]]], path: Path) -> Path | None:
    """Mean training loss (log scale) and training accuracy per epoch of every stage over runs, ± 1 sd.

    :param logs: per run, :func:`kdtoolkit.results.report.epoch_logs` of its stages.
    Epochs are counted over a stage's phases in order; a stage's curve stops at
    the shortest run. Returns ``path``, or ``None`` when no stage logged an epoch.
    """
    stages = list(dict.fromkeys(s for log in logs for s in log))
    if not stages:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, stage in enumerate(stages):
        per_run = [log[stage] for log in logs if stage in log]
        for ax, key in ((ax1, "loss/total"), (ax2, "train_accuracy")):
            mean, sd = _mean_curves(per_run, key)
            x = list(range(1, len(mean) + 1))
            ax.plot(
                x, mean, color=colors[i % len(colors)], label=stage, marker="o" if len(x) < 30 else None, markersize=3
            )
            lower = [max(m - d, m * 1e-3) if key == "loss/total" else m - d for m, d in zip(mean, sd)]
            ax.fill_between(
                x, lower, [m + d for m, d in zip(mean, sd)], color=colors[i % len(colors)], alpha=0.2, linewidth=0
            )
    if all(v > 0 for line in ax1.get_lines() for v in line.get_ydata()):
        ax1.set_yscale("log")
    ax1.set_title(f"total training loss (mean ± sd over {len(logs)} runs)")
    ax2.set_title("training accuracy (augmented batches)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax1, ax2):
        ax.set_xlabel("epoch (all phases of the stage in order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
    return path
