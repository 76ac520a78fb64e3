"""The core's own plugin: components every recipe can use.

Registered through the same plugin manager as every other plugin, under the
name ``kdt.core``. It registers the metrics ``accuracy`` and ``agreement``, the
optimisers and the learning-rate schedules (:mod:`kdtoolkit.engine.optim`).
The ``train`` phase kind is implemented by the engine itself
(:mod:`kdtoolkit.engine.loop`) because its keys are part of the recipe
schema.
"""

from __future__ import annotations



from .hookspecs import hookimpl
from .records import Records


class Accuracy:
    """Top-1 accuracy on the test set, as a fraction in [0, 1].

    Result key: ``accuracy``.
    """

    requires_reference = False
    requires_records = ("logits", "labels")

    def __call__(self, records: Records, reference: Records | None = None) -> dict:
        pred = records["logits"].argmax(dim=1)
        return {"accuracy": float((pred == records["labels"]).float().mean())}


class TeacherAgreement:
    """Fraction of test images on which the model's top-1 class equals the
    reference model's (the stage's teacher or ``compare_to`` stage).

    Result key: ``agreement``.
    """

    requires_reference = True
    requires_records = ("logits", "labels")

    def __call__(self, records: Records, reference: Records | None = None) -> dict:
        if reference is None:
            return {}
        if reference.n != records.n:
            from .errors import KdtError

            raise KdtError(f"agreement: reference has {reference.n} images, model has {records.n}")
        a = records["logits"].argmax(dim=1)
        b = reference["logits"].argmax(dim=1)
        return {"agreement": float((a == b).float().mean())}


@hookimpl
def kdt_register_metrics(registry):
    registry.add("accuracy", Accuracy)
    registry.add("agreement", TeacherAgreement)


@hookimpl
def kdt_register_optimizers(registry):
    from .engine import optim

    for name, factory in optim.OPTIMIZERS.items():
        registry.add(name, factory)


@hookimpl
def kdt_register_schedulers(registry):
    from .engine import optim

    for name, factory in optim.SCHEDULERS.items():
        registry.add(name, factory)
