"""The core's metrics: ``accuracy`` and ``agreement`` (registered by :mod:`kdtoolkit.plugin.builtin`)."""

from __future__ import annotations

from kdtoolkit.results.records import Records


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
            from kdtoolkit.foundation.errors import KdtError

            raise KdtError(f"agreement: reference has {reference.n} images, model has {records.n}")
        a = records["logits"].argmax(dim=1)
        b = reference["logits"].argmax(dim=1)
        return {"agreement": float((a == b).float().mean())}
