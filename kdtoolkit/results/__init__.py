"""Results: what a run leaves behind and what is read back from it.

Owns evaluation records (:mod:`.records`), a run's result files and tables (:mod:`.report`:
``results.json``, ``results.md``, ``training.png``), the one reader of a run directory's files
(:mod:`.rundir_files`: ``run.json``, ``recipe.resolved.json``, ``results.json``, each stage's
``result.json``; torch-free), statistics over several runs of one recipe
(:mod:`.aggregate`), the ``report.md`` over several runs (:mod:`.runs_report`) and its figures
(:mod:`.plots`).

May import: :mod:`kdtoolkit.recipe`, :mod:`kdtoolkit.plugin`, :mod:`kdtoolkit.foundation`.

The public API is what this module exports (``__all__``); names are imported lazily, so importing
the package costs nothing until one is used.
"""

from __future__ import annotations

from kdtoolkit.foundation.lazy import lazy_exports

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
    "threshold_series": "plots",
    "threshold_figure": "plots",
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
    "RunResults": "report",
    "RESOLVED_RECIPE": "rundir_files",
    "RESOLVED_TOML": "rundir_files",
    "RUN_INFO": "rundir_files",
    "RESULTS": "rundir_files",
    "STAGE_RESULT": "rundir_files",
    "load_json": "rundir_files",
    "read_json": "rundir_files",
    "resolved_recipe": "rundir_files",
    "run_info": "rundir_files",
    "run_results": "rundir_files",
    "stage_path": "rundir_files",
    "stage_result": "rundir_files",
    "trained_spec": "rundir_files",
    "SD_NOTE": "runs_report",
    "Report": "runs_report",
    "ThresholdTable": "runs_report",
    "threshold_tables": "runs_report",
    "build_report": "runs_report",
    "write_report": "runs_report",
    "default_output": "runs_report",
    "report_command": "runs_report",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
