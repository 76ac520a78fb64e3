"""The core's own plugin: components every recipe can use.

Registered through the same plugin manager as every other plugin, under the
name ``kdt.core``. It registers the metrics ``accuracy`` and ``agreement``
(:mod:`kdtoolkit.engine.metrics`), the
optimisers and the learning-rate schedules (:mod:`kdtoolkit.engine.optim`),
all by reference (see :meth:`kdtoolkit.plugin.registry.Registry.add`), so that
loading the plugins imports no torch.
The ``train`` phase kind is implemented by the engine itself
(:mod:`kdtoolkit.engine.loop`) because its keys are part of the recipe
schema.
"""

from __future__ import annotations

from kdtoolkit.plugin.hookspecs import hookimpl


#: Optimiser name → function in :mod:`kdtoolkit.engine.optim`.
OPTIMIZERS = {"adam": "adam", "adamw": "adamw", "sgd": "sgd"}
#: Schedule name → function in :mod:`kdtoolkit.engine.optim`.
SCHEDULERS = {
    "none": "no_schedule",
    "step": "step",
    "multistep": "multistep",
    "cosine": "cosine",
    "exponential": "exponential",
}


@hookimpl
def kdt_register_metrics(registry):
    registry.add("accuracy", "kdtoolkit.engine.metrics:Accuracy")
    registry.add("agreement", "kdtoolkit.engine.metrics:TeacherAgreement")


@hookimpl
def kdt_register_optimizers(registry):
    for name, function in OPTIMIZERS.items():
        registry.add(name, f"kdtoolkit.engine.optim:{function}")


@hookimpl
def kdt_register_schedulers(registry):
    for name, function in SCHEDULERS.items():
        registry.add(name, f"kdtoolkit.engine.optim:{function}")
