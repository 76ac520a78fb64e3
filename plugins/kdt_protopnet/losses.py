"""Registered losses of the ProtoPNet head (method notes §1).

Each class adapts a pure function of :mod:`kdt_protopnet.functional` to the
trainer's :class:`~kdtoolkit.plugin.contracts.Step`. Recipe weights multiply them;
the paper's ProtoPNet loss is ``cross_entropy + 0.8·cluster − 0.08·separation
+ 1e-4·l1_last_layer`` (Proto2Proto's config uses 1.0 for the cluster term).
They need class-specific prototypes (a head with ``class_identity``).
"""

from __future__ import annotations

import torch

from kdtoolkit.plugin import Step

from . import functional as F


def class_specific_head(model):
    """The model's head, which must have class-specific prototypes (``prototypes`` and ``class_identity``)."""
    head = model.head
    if not hasattr(head, "prototypes") or not hasattr(head, "class_identity"):
        raise TypeError(f"{type(head).__name__} is not a prototype head with class-specific prototypes")
    return head


class ClusterLoss:
    """ProtoPNet's cluster cost: batch mean of the smallest distance between an
    image and the prototypes of its own class (pulls each image close to one
    prototype of its class)."""

    requires_teacher = False
    requires_outputs = ("min_distances",)

    def __call__(self, step: Step) -> torch.Tensor:
        head = class_specific_head(step.model)
        return F.cluster_loss(step.outputs["min_distances"], step.targets, head.class_identity)


class SeparationLoss:
    """ProtoPNet's separation cost: batch mean of the smallest distance to
    prototypes of other classes. Returned positive; give it a NEGATIVE weight
    (paper −0.08) so training pushes those prototypes away."""

    requires_teacher = False
    requires_outputs = ("min_distances",)

    def __call__(self, step: Step) -> torch.Tensor:
        head = class_specific_head(step.model)
        return F.separation_loss(step.outputs["min_distances"], step.targets, head.class_identity)


class LastLayerL1:
    """L1 norm of the last-layer weights connecting each prototype to the
    classes it does not belong to (paper weight 1e-4)."""

    requires_teacher = False
    requires_outputs = ("min_distances",)

    def __call__(self, step: Step) -> torch.Tensor:
        head = class_specific_head(step.model)
        return F.last_layer_l1(head.last_layer.weight, head.class_identity)
