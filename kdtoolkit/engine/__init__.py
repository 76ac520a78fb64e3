"""The general KD engine: runs recipes, one job per module.

- :mod:`~kdtoolkit.engine.context` — the frozen run context and a stage's generic state;
- :mod:`~kdtoolkit.engine.data` — datasets and seeded batch plans;
- :mod:`~kdtoolkit.engine.models` — build, load, save, initialise from the teacher, select parameters;
- :mod:`~kdtoolkit.engine.taps` — feature taps by module path;
- :mod:`~kdtoolkit.engine.teacher` — the frozen teacher, live or cached;
- :mod:`~kdtoolkit.engine.losses` — a stage's losses, with parameters and state;
- :mod:`~kdtoolkit.engine.optim` — optimisers and schedules as components;
- :mod:`~kdtoolkit.engine.loop` — a train phase as small steps, with per-step hooks;
- :mod:`~kdtoolkit.engine.phases` — a stage's phases, checkpoints and resume;
- :mod:`~kdtoolkit.engine.evaluation` — records and metrics;
- :mod:`~kdtoolkit.engine.preflight` — the checks before any stage trains;
- :mod:`~kdtoolkit.engine.runner` — a recipe's stages into a run directory;
- :mod:`~kdtoolkit.engine.multiseed` — one recipe over several seeds (``kdt run --seeds``).

Training only: the back-ends of ``kdt predict``, ``evaluate``, ``export``, ``inspect`` and the
run-directory API live in :mod:`kdtoolkit.use`. May import: :mod:`kdtoolkit.results`,
:mod:`kdtoolkit.recipe`, :mod:`kdtoolkit.plugin`, :mod:`kdtoolkit.foundation`.
Names are imported lazily, so ``import kdtoolkit.engine`` costs nothing until one is used.
"""

from __future__ import annotations

from kdtoolkit.foundation.lazy import lazy_exports

_EXPORTS = {
    "RunContext": "context",
    "StageState": "context",
    "StageData": "data",
    "build_data": "data",
    "dataset_split": "data",
    "component_split": "data",
    "dataset_params": "data",
    "batches": "data",
    "batch_plan": "data",
    "derive_seed": "data",
    "build_model": "models",
    "load_model_file": "models",
    "load_state": "models",
    "load_state_strict": "models",
    "Taps": "taps",
    "TrainState": "loop",
    "PhaseContext": "phases",
    "StageTrainer": "phases",
    "evaluate": "evaluation",
    "compute_metrics": "evaluation",
    "Runner": "runner",
    "RunOptions": "runner",
    "run_recipe": "runner",
    "versions": "runner",
}

# Names that moved to another package: importable from here for one more version, with a warning.
_MOVED = {
    "resolve_device": "kdtoolkit.foundation.device",
    "autocast": "kdtoolkit.foundation.device",
    "RunDir": "kdtoolkit.use.rundir",
    "StageDir": "kdtoolkit.use.rundir",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MOVED)
