"""Registered losses of the Proto2Proto bundle (method notes §1 and §3).

Each class adapts a pure function of :mod:`kdt_proto2proto.functional` to the
trainer's :class:`~kdtoolkit.components.Step`. Recipe weights multiply them;
the paper's ProtoPNet loss is ``cross_entropy + 0.8·cluster − 0.08·separation
+ 1e-4·l1_last_layer`` (Proto2Proto's config uses 1.0 for the cluster term),
and Proto2Proto adds ``10·global_explanation + 10·patch_prototype_correspondence``.
"""

from __future__ import annotations

from typing import Literal

import torch

from kdtoolkit.components import Step

from . import functional as F


def _head(model):
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
        head = _head(step.model)
        return F.cluster_loss(step.outputs["min_distances"], step.targets, head.class_identity)


class SeparationLoss:
    """ProtoPNet's separation cost: batch mean of the smallest distance to
    prototypes of other classes. Returned positive; give it a NEGATIVE weight
    (paper −0.08) so training pushes those prototypes away."""

    requires_teacher = False
    requires_outputs = ("min_distances",)

    def __call__(self, step: Step) -> torch.Tensor:
        head = _head(step.model)
        return F.separation_loss(step.outputs["min_distances"], step.targets, head.class_identity)


class LastLayerL1:
    """L1 norm of the last-layer weights connecting each prototype to the
    classes it does not belong to (paper weight 1e-4)."""

    requires_teacher = False
    requires_outputs = ("min_distances",)

    def __call__(self, step: Step) -> torch.Tensor:
        head = _head(step.model)
        return F.last_layer_l1(head.last_layer.weight, head.class_identity)


class GlobalExplanationLoss:
    """Proto2Proto's global explanation loss: mean Euclidean distance between
    student and teacher prototypes, paired by index (paper weight 10). Teacher
    and student need the same number of prototypes and the same depth D."""

    requires_teacher = True
    requires_outputs = ("min_distances",)
    requires_teacher_outputs = ()  # the teacher's prototypes only: no teacher forward pass

    @staticmethod
    def check_models(model, teacher) -> None:
        """Before training: both models have prototype heads of the same shape."""
        ps, pt = _head(model).prototypes, _head(teacher).prototypes
        if ps.shape != pt.shape:
            raise ValueError(f"global_explanation pairs prototypes by index: student has {tuple(ps.shape)}, "
                             f"teacher {tuple(pt.shape)}; use the same prototypes_per_class and prototype_depth")

    def __call__(self, step: Step) -> torch.Tensor:
        return F.global_explanation_loss(_head(step.model).prototypes, _head(step.teacher).prototypes)


class PatchPrototypeCorrespondenceLoss:
    """Proto2Proto's patch-prototype correspondence loss: squared distance
    between teacher and student add-on features at the active patches,
    ``Σ m·‖z^t − z^s‖² / (2·Σm + 1)`` (paper weight 10).

    :param tau: τ_train, the distance (squared-L2 units) below which a
        prototype's nearest patch is active (paper: 100).
    :param mask_source: whose distances decide the active patches:
        ``student`` (what the original code does, and the default, so that
        results stay comparable with the published numbers), ``teacher`` (what
        the original variable names suggest) or ``either`` (the union).
    """

    requires_teacher = True
    requires_outputs = ("min_distances", "argmin", "features")
    requires_teacher_outputs = ("features", "min_distances", "argmin")

    def __init__(self, *, tau: float = 100.0, mask_source: Literal["student", "teacher", "either"] = "student"):
        self.tau = tau
        self.mask_source = mask_source
        # the teacher's distances are read only when its patches decide the mask
        self.requires_teacher_outputs = ("features",) if mask_source == "student" else ("features", "min_distances", "argmin")

    @staticmethod
    def check_params(params: dict) -> None:
        if not params["tau"] > 0:
            raise ValueError("tau", f"must be > 0, got {params['tau']}")

    @staticmethod
    def check_models(model, teacher) -> None:
        """Before training: teacher and student add-on outputs have the same depth D."""
        ds, dt = _head(model).prototypes.shape[1], _head(teacher).prototypes.shape[1]
        if ds != dt:
            raise ValueError(f"patch_prototype_correspondence compares add-on features: student depth {ds}, "
                             f"teacher depth {dt}; use the same prototype_depth")

    def __call__(self, step: Step) -> torch.Tensor:
        s, t = step.outputs, step.teacher_outputs
        zs, zt = s["features"], t["features"]
        if zs.shape != zt.shape:
            raise ValueError(f"teacher and student add-on features differ in shape: {tuple(zt.shape)} vs {tuple(zs.shape)}; "
                             "use the same prototype_depth and a backbone cut with the same grid")
        h, w = zs.shape[-2:]
        masks = []
        if self.mask_source in ("student", "either"):
            masks.append(F.active_patch_mask(s["min_distances"].detach(), s["argmin"], h, w, self.tau))
        if self.mask_source in ("teacher", "either"):
            masks.append(F.active_patch_mask(t["min_distances"], t["argmin"], h, w, self.tau))
        mask = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return F.patch_prototype_correspondence_loss(zt, zs, mask)
