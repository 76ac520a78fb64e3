"""Registered losses of Proto2Proto (method notes §3).

Each class adapts a pure function of :mod:`kdt_proto2proto.functional` to the
trainer's :class:`~kdtoolkit.plugin.contracts.Step`. Proto2Proto adds
``10·global_explanation + 10·patch_prototype_correspondence`` to the
student's own loss (ProtoPNet's in ``kdt_protopnet``, ProtoTree's NLL in
``kdt_prototree``). They work with any head satisfying the prototype-head
protocol (:mod:`kdt_prototypes.protocol`); ``tree_kd`` also needs both heads
to output ``log_probabilities`` (ProtoTree's leaf mixture).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from kdt_prototypes import prototype_head, prototype_matrix
from kdtoolkit.plugin import Step

from . import functional as F
from .checks import check_correspondence_params, check_tree_kd_params

PAIRINGS = ("index", "matched_per_epoch", "matched_fixed")


class GlobalExplanationLoss(nn.Module):
    """Proto2Proto's global explanation loss: mean Euclidean distance between
    paired student and teacher prototypes (paper weight 10).

    :param pairing: how prototypes are paired. ``index``: prototype j with
        prototype j (the paper; needs the same number and depth of
        prototypes, e.g. ProtoPNets of the same layout or trees of the same
        depth, node by node). ``matched_per_epoch``: a Hungarian matching on
        the prototype distances, recomputed at the start of every epoch.
        ``matched_fixed``: recomputed at every epoch of the first phase in
        which the loss runs (the KD-only stage), then kept for the rest of
        the stage. Matched pairings allow different counts (a deeper teacher
        tree; a ProtoPNet teacher with a ProtoTree student): ``min(Ps, Pt)``
        pairs. The matching is kept in the loss's buffers, so a resumed run
        uses the same pairs.
    """

    requires_teacher = True
    requires_outputs = ("min_distances",)
    requires_teacher_outputs = ()  # the teacher's prototypes only: no teacher forward pass
    # buffers of the matched pairings, registered by setup() (declared here for their type)
    student_index: torch.Tensor
    teacher_index: torch.Tensor

    def __init__(self, *, pairing: Literal["index", "matched_per_epoch", "matched_fixed"] = "index"):
        super().__init__()
        self.pairing = pairing
        self._teacher_prototypes: torch.Tensor | None = None

    def check_models(self, model, teacher) -> None:
        """Before training: both heads are prototype heads whose prototypes can be paired."""
        ps = prototype_matrix(prototype_head(model, "student", "global_explanation"))
        pt = prototype_matrix(prototype_head(teacher, "teacher", "global_explanation"))
        if ps.shape[1] != pt.shape[1]:
            raise ValueError(
                f"global_explanation compares prototypes: student depth {ps.shape[1]}, teacher depth "
                f"{pt.shape[1]}; use the same prototype_depth"
            )
        if self.pairing == "index" and ps.shape != pt.shape:
            raise ValueError(
                f'global_explanation with pairing = "index" pairs prototype j with prototype j, but the student '
                f"has {ps.shape[0]} prototypes and the teacher {pt.shape[0]}; use pairing = "
                f'"matched_per_epoch" or "matched_fixed"'
            )

    # -- matched pairings ---------------------------------------------------
    def setup(self, probe: Step) -> None:
        """Matched pairings: the buffers holding the pairs (sized from both models)."""
        if probe.teacher is None or self.pairing == "index":
            return
        ps = prototype_matrix(prototype_head(probe.model, "student", "global_explanation"))
        pt = prototype_matrix(prototype_head(probe.teacher, "teacher", "global_explanation"))
        m = min(ps.shape[0], pt.shape[0])
        self._teacher_prototypes = pt.detach().clone()
        self.register_buffer("student_index", torch.full((m,), -1, dtype=torch.long))
        self.register_buffer("teacher_index", torch.full((m,), -1, dtype=torch.long))

    def rematch(self, model) -> None:
        """Recompute the matching from the student's current prototypes."""
        assert self._teacher_prototypes is not None  # callers check that setup() ran
        s_idx, t_idx = F.match_prototypes(prototype_matrix(model.head), self._teacher_prototypes)
        self.student_index.copy_(s_idx.to(self.student_index.device))
        self.teacher_index.copy_(t_idx.to(self.teacher_index.device))

    @torch.no_grad()
    def on_epoch_start(self, state) -> None:
        """Matched pairings: recompute the matching when it is due."""
        if self.pairing == "index" or self._teacher_prototypes is None:
            return
        if self.pairing == "matched_fixed":
            key = "global_explanation_matching_phase"
            first = state.stage_state.get(key)
            if first is None:
                state.stage_state.set(key, state.phase)  # stage state: survives a resume
                first = state.phase
            if first != state.phase and int(self.student_index[0]) >= 0:
                return  # fixed after the first phase
        self.rematch(state.model)

    def forward(self, step: Step) -> torch.Tensor:
        student = prototype_head(step.model, "student", "global_explanation")
        teacher = prototype_head(step.teacher, "teacher", "global_explanation")
        if self.pairing == "index":
            return F.global_explanation_loss(student.prototypes, teacher.prototypes)
        if self._teacher_prototypes is None:
            raise ValueError("the matched pairing was not set up (no dry forward pass of both models)")
        if int(self.student_index[0]) < 0:
            self.rematch(step.model)
        return F.paired_global_explanation_loss(
            prototype_matrix(student), prototype_matrix(teacher), self.student_index, self.teacher_index
        )


class PatchPrototypeCorrespondenceLoss:
    """Proto2Proto's patch-prototype correspondence loss: squared distance
    between teacher and student add-on features at the active patches,
    ``Σ m·‖z^t − z^s‖² / (2·Σm + 1)`` (paper weight 10).

    :param tau: τ_train, the distance below which a prototype's nearest patch
        is active, in the units of the mask source's head (ProtoPNet: squared
        L2, paper 100; ProtoTree: L2).
    :param mask_source: whose distances decide the active patches:
        ``student`` (what the original code does, and the default, so that
        results stay comparable with the published numbers), ``teacher`` (what
        the original variable names suggest) or ``either`` (the union).
    :param mask_ties: which locations of an active prototype are masked:
        ``all`` locations where its distance equals its minimum (what the
        original code does, and the default) or only the ``first`` (its
        ``argmin``). They differ where features are constant over a region,
        such as a uniform background.
    """

    requires_teacher = True
    requires_outputs: tuple[str, ...] = ("min_distances", "argmin", "features", "distances")
    requires_teacher_outputs: tuple[str, ...] = ("features", "min_distances", "argmin", "distances")

    def __init__(
        self,
        *,
        tau: float = 100.0,
        mask_source: Literal["student", "teacher", "either"] = "student",
        mask_ties: Literal["all", "first"] = "all",
    ):
        self.tau = tau
        self.mask_source = mask_source
        self.mask_ties = mask_ties
        located = ("min_distances", "distances") if mask_ties == "all" else ("min_distances", "argmin")
        self.requires_outputs = ("features", *located)
        # the teacher's distances are read only when its patches decide the mask
        self.requires_teacher_outputs = ("features",) if mask_source == "student" else ("features", *located)

    check_params = staticmethod(check_correspondence_params)

    @staticmethod
    def check_models(model, teacher) -> None:
        """Before training: both are prototype heads whose add-on outputs have the same depth D."""
        ds = prototype_matrix(prototype_head(model, "student", "patch_prototype_correspondence")).shape[1]
        dt = prototype_matrix(prototype_head(teacher, "teacher", "patch_prototype_correspondence")).shape[1]
        if ds != dt:
            raise ValueError(
                f"patch_prototype_correspondence compares add-on features: student depth {ds}, "
                f"teacher depth {dt}; use the same prototype_depth"
            )

    def __call__(self, step: Step) -> torch.Tensor:
        s, t = step.outputs, step.teacher_outputs
        zs, zt = s["features"], t["features"]
        if zs.shape != zt.shape:
            raise ValueError(
                f"teacher and student add-on features differ in shape: {tuple(zt.shape)} vs {tuple(zs.shape)}; "
                "use the same prototype_depth and a backbone cut with the same grid"
            )
        h, w = zs.shape[-2:]
        sources = [
            o
            for o, used in (
                (s, self.mask_source in ("student", "either")),
                (t, self.mask_source in ("teacher", "either")),
            )
            if used
        ]
        if self.mask_ties == "all":
            masks = [F.active_patch_mask_all_ties(o["distances"], o["min_distances"], self.tau) for o in sources]
        else:
            masks = [F.active_patch_mask(o["min_distances"].detach(), o["argmin"], h, w, self.tau) for o in sources]
        mask = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return F.patch_prototype_correspondence_loss(zt, zs, mask)


class TreeKDLoss:
    """KL divergence from the teacher's to the student's output distribution,
    for heads whose outputs are probability distributions (ProtoTree's leaf
    mixture ŷ): ``KL(ŷ^t ‖ ŷ^s)`` averaged over the batch, read from both
    heads' ``log_probabilities``.

    :param temperature: both distributions are tempered as
        ``softmax(log ŷ / T)`` and the KL is multiplied by ``T²`` (1: the
        plain KL between the leaf mixtures).
    """

    requires_teacher = True
    requires_outputs = ("log_probabilities",)
    requires_teacher_outputs = ("log_probabilities",)

    def __init__(self, *, temperature: float = 1.0):
        self.temperature = temperature

    check_params = staticmethod(check_tree_kd_params)

    @staticmethod
    def check_models(model, teacher) -> None:
        """Before training: both heads output ``log_probabilities``."""
        for m, who in ((model, "student"), (teacher, "teacher")):
            if "log_probabilities" not in getattr(m.head, "outputs", ()):
                raise ValueError(
                    f"tree_kd reads output distributions: the {who}'s {type(m.head).__name__} has no "
                    "'log_probabilities' output (use hinton_kd on logits instead)"
                )

    def __call__(self, step: Step) -> torch.Tensor:
        t = self.temperature
        log_s = step.outputs["log_probabilities"].float()
        log_t = step.teacher_outputs["log_probabilities"].float().detach()
        if t != 1.0:
            log_s, log_t = torch.log_softmax(log_s / t, dim=1), torch.log_softmax(log_t / t, dim=1)
        p_t = log_t.exp()
        # 0·log 0 = 0 where the teacher gives a class probability 0
        kl = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(1).mean()
        return kl * (t * t)
