"""Results: what a run leaves behind and what is read back from it.

Owns evaluation records (:mod:`.records`), a run's result files and tables (:mod:`.report`:
``results.json``, ``results.md``, ``training.png``), statistics over several runs of one recipe
(:mod:`.aggregate`), the ``report.md`` over several runs (:mod:`.runs_report`) and its figures
(:mod:`.plots`).

May import: :mod:`kdtoolkit.recipe`, :mod:`kdtoolkit.plugin`, :mod:`kdtoolkit.foundation`.

The public API is what this module exports (``__all__``); names are imported lazily, so importing
the package costs nothing until one is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NOT_METRICS": "aggregate",
    "Stat": "aggregate",
    "mean_sd": "aggregate",
    "Run": "aggregate",
    "find_runs": "aggregate",
    "load_run": "aggregate",
    "check_same_recipe": "aggregate",
    "aggregate_cell": "aggregate",
    "AggTable": "aggregate",
    "aggregate_tables": "aggregate",
    "metric_leaves": "aggregate",
    "nest": "aggregate",
    "stage_metrics": "aggregate",
    "baseline_of": "aggregate",
    "baseline_deltas": "aggregate",
    "deltas_table": "aggregate",
    "tau_series": "plots",
    "tau_figure": "plots",
    "training_figure": "plots",
    "RECORDS_FORMAT": "records",
    "Records": "records",
    "stages_table": "report",
    "collect_tables": "report",
    "epoch_logs": "report",
    "CROSS_ENTROPY_LOSSES": "report",
    "PHASE_NOTE": "report",
    "phase_marks": "report",
    "training_curves": "report",
    "write_reports": "report",
    "SD_NOTE": "runs_report",
    "Report": "runs_report",
    "build_report": "runs_report",
    "write_report": "runs_report",
    "default_output": "runs_report",
    "report_command": "runs_report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
