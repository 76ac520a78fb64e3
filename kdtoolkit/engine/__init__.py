"""The general KD engine: runs recipes, one job per module.

- :mod:`~kdtoolkit.engine.context` — the frozen run context and a stage's generic state;
- :mod:`~kdtoolkit.engine.device` — devices and autocast;
- :mod:`~kdtoolkit.engine.data` — datasets and seeded batch plans;
- :mod:`~kdtoolkit.engine.models` — build, load, save, initialise from the teacher, select parameters;
- :mod:`~kdtoolkit.engine.taps` — feature taps by module path;
- :mod:`~kdtoolkit.engine.teacher` — the frozen teacher, live or cached;
- :mod:`~kdtoolkit.engine.losses` — a stage's losses, with parameters and state;
- :mod:`~kdtoolkit.engine.optim` — optimisers and schedules as components;
- :mod:`~kdtoolkit.engine.loop` — a train phase as small steps, with per-step hooks;
- :mod:`~kdtoolkit.engine.phases` — a stage's phases, checkpoints and resume;
- :mod:`~kdtoolkit.engine.evaluation` — records and metrics;
- :mod:`~kdtoolkit.engine.runner` — a recipe's stages into a run directory;
- :mod:`~kdtoolkit.engine.rundir` — run directories as a public API.

Names are imported lazily, so ``import kdtoolkit.engine`` costs nothing until one is used.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "RunContext": "context",
    "StageState": "context",
    "resolve_device": "device",
    "autocast": "device",
    "StageData": "data",
    "build_data": "data",
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
    "RunDir": "rundir",
    "StageDir": "rundir",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
