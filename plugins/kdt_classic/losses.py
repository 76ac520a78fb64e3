"""Loss components of the standard knowledge-distillation methods.

Thin components over the pure functions of :mod:`kdt_classic.functional`
(and the :class:`~kdt_classic.crd.CRD` module): each reads what it needs from
the :class:`~kdtoolkit.plugin.contracts.Step` — logits, labels, taps, dataset
indices — and calls one function. The teacher's tensors are always detached
(the teacher is frozen and runs without gradients; the functions detach its
side once more), so gradients reach only the student and the losses' own
connectors.

Feature methods read *taps*: a stage declares ``model.taps = { name =
"module.path" }`` for the student and ``teacher_taps = { ... }`` for the
teacher, and a loss names the taps it reads (``student_tap``,
``teacher_tap``); ``kdt inspect RECIPE --stage NAME`` lists the module paths
and their output shapes. Connectors (the FitNets regressor, the CRD
embeddings and memory) are built from the shapes of a dry forward pass, so a
recipe never states channel counts; their parameters are trained when the
phase's ``groups`` select ``loss.<id>``. See ``docs/methods.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.plugin import NonEmpty, ParamChecks, Range, Step, TapsFrom

from .checks import check_attention_pairs
from .connectors import ConvRegressor
from .crd import CRD
from .functional import at_loss, dist_loss, dkd_loss, fitnet_loss, kd_loss, pkt_loss, rkd_loss, sp_loss

__all__ = [
    "AttentionLoss",
    "CRDLoss",
    "CrossEntropyLoss",
    "DISTLoss",
    "DKDLoss",
    "FitNetLoss",
    "HintonKDLoss",
    "PKTLoss",
    "RKDLoss",
    "SimilarityPreservingLoss",
    "cross_entropy",
]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` ``[B,K]`` against ``targets`` ``[B]``."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def _tap(step: Step, name: str, teacher: bool) -> torch.Tensor:
    feats = step.teacher_features if teacher else step.features
    if name not in feats:
        where = "teacher_taps" if teacher else "model.taps"
        raise KeyError(f"{name} (declared in {where}?)")
    t = feats[name]
    return t.detach() if teacher else t


#: The checks of the tap names of a loss reading one student tap and one teacher tap.
_TAP_NAMES = (
    NonEmpty("student_tap", "must name a tap declared in the stage"),
    NonEmpty("teacher_tap", "must name a tap declared in the stage"),
)


class _PairedTaps:
    """Declarations shared by the losses reading one student tap and one teacher tap."""

    requires_teacher = True
    requires_outputs = ()
    requires_teacher_outputs = ()
    requires_labels = False
    requires_taps = TapsFrom("student_tap")
    requires_teacher_taps = TapsFrom("teacher_tap")

    check_params = ParamChecks(*_TAP_NAMES)


# --------------------------------------------------------------------------
# logit-based losses
# --------------------------------------------------------------------------


class CrossEntropyLoss:
    """Cross-entropy of the student's logits against the labels.

    :param label_smoothing: label smoothing in [0, 1).
    """

    requires_teacher = False
    requires_outputs = ("logits",)

    def __init__(self, *, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    check_params = ParamChecks(Range("label_smoothing", ge=0, lt=1))

    def __call__(self, step: Step) -> torch.Tensor:
        return cross_entropy(step.outputs["logits"], step.targets, self.label_smoothing)


class HintonKDLoss:
    """Soft-target distillation from the teacher's logits (Hinton et al., 2015), optionally on standardised logits.

    ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean (Hinton, Vinyals and
    Dean, "Distilling the Knowledge in a Neural Network", 2015). With
    ``standardize = true`` both networks' logits are first z-scored per
    sample (Sun et al., "Logit Standardization in Knowledge Distillation",
    CVPR 2024): the student need only match the teacher's logit *relations*,
    not their scale. Registered as ``hinton_kd`` (and ``kd``).

    :param temperature: softening temperature T > 0 (the loss is scaled by T²).
    :param standardize: z-score the student's and the teacher's logits per sample before softening (KD+LS).
    """

    requires_teacher = True
    requires_teacher_outputs = ("logits",)
    requires_outputs = ("logits",)
    requires_labels = False

    def __init__(self, *, temperature: float = 4.0, standardize: bool = False):
        self.temperature = temperature
        self.standardize = standardize

    check_params = ParamChecks(Range("temperature", gt=0))

    def __call__(self, step: Step) -> torch.Tensor:
        return kd_loss(
            step.outputs["logits"],
            step.teacher_outputs["logits"].detach(),
            self.temperature,
            standardize=self.standardize,
        )


class DKDLoss:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022): target-class and non-target-class terms
    weighted apart.

    ``ramp · (alpha · TCKD + beta · NCKD)`` where TCKD matches the binary
    (target class, rest) distributions of teacher and student and NCKD their
    distributions over the non-target classes. ``ramp = min(epoch /
    warmup_epochs, 1)`` is the authors' linear warm-up, with ``epoch``
    counted within the phase from 1 (a second phase starts the ramp again).
    Needs labels.

    :param alpha: weight of the target-class term (TCKD), >= 0.
    :param beta: weight of the non-target-class term (NCKD), >= 0 (8 on CIFAR-100 in the paper).
    :param temperature: softening temperature T > 0.
    :param warmup_epochs: epochs of the linear warm-up of the loss's weight (0: none).
    """

    requires_teacher = True
    requires_teacher_outputs = ("logits",)
    requires_outputs = ("logits",)
    requires_labels = True

    def __init__(self, *, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 20):
        self.alpha, self.beta, self.temperature, self.warmup_epochs = alpha, beta, temperature, warmup_epochs

    check_params = ParamChecks(
        Range("alpha", ge=0), Range("beta", ge=0), Range("warmup_epochs", ge=0), Range("temperature", gt=0)
    )

    def ramp(self, epoch: int) -> float:
        """The warm-up factor ``min(epoch / warmup_epochs, 1)`` (1 without warm-up)."""
        return min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs else 1.0

    def __call__(self, step: Step) -> torch.Tensor:
        loss = dkd_loss(
            step.outputs["logits"],
            step.teacher_outputs["logits"].detach(),
            step.targets,
            self.alpha,
            self.beta,
            self.temperature,
        )
        return self.ramp(int(step.epoch)) * loss


class DISTLoss:
    """DIST (Huang et al., NeurIPS 2022): Pearson correlation of predictions across classes and across the batch.

    ``beta · T²(1 − inter) + gamma · T²(1 − intra)``: inter-class relations
    (each sample's class distribution) and intra-class relations (each
    class's distribution over the batch) matched by correlation rather than
    exactly, which suits a teacher much stronger than the student. Defaults
    are the authors' (beta = gamma = 1, T = 1, their ImageNet setting); their
    CIFAR-100 runs used a higher temperature (T = 4).

    :param beta: weight of the inter-class term, >= 0.
    :param gamma: weight of the intra-class term, >= 0.
    :param temperature: softening temperature T > 0.
    """

    requires_teacher = True
    requires_teacher_outputs = ("logits",)
    requires_outputs = ("logits",)
    requires_labels = False

    def __init__(self, *, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0):
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    check_params = ParamChecks(Range("beta", ge=0), Range("gamma", ge=0), Range("temperature", gt=0))

    def __call__(self, step: Step) -> torch.Tensor:
        return dist_loss(
            step.outputs["logits"], step.teacher_outputs["logits"].detach(), self.beta, self.gamma, self.temperature
        )


# --------------------------------------------------------------------------
# feature-based losses
# --------------------------------------------------------------------------


class FitNetLoss(_PairedTaps, nn.Module):
    """FitNets hints (Romero et al., ICLR 2015): a trained regressor maps a student feature map onto the teacher's.

    Mean squared error between ``regressor(student_tap)`` and
    ``teacher_tap``. The regressor (convolution, batch norm, ReLU; see
    :class:`~kdt_classic.connectors.ConvRegressor`) is built from the two
    maps' shapes in a dry forward pass; select ``loss.<id>`` in the phase's
    ``groups`` to train it. Its state is saved in ``losses.safetensors`` and
    in checkpoints. Both taps must be ``[B, C, H, W]`` maps, the student's
    twice, half, or at least the teacher's spatial size.

    :param student_tap: the student tap (``model.taps``) whose map is regressed.
    :param teacher_tap: the teacher tap (``teacher_taps``) it is matched to.
    """

    def __init__(self, *, student_tap: str, teacher_tap: str):
        nn.Module.__init__(self)
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.regressor: ConvRegressor | None = None

    def setup(self, probe: Step) -> None:
        """Build the regressor from the taps' shapes in the dry forward pass ``probe``."""
        s = probe.features[self.student_tap]
        t = probe.teacher_features[self.teacher_tap]
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(
                f"FitNets needs [B, C, H, W] maps; tap '{self.student_tap}' has shape {list(s.shape)}, "
                f"teacher tap '{self.teacher_tap}' {list(t.shape)}"
            )
        self.regressor = ConvRegressor(s.shape[1:], t.shape[1:]).to(s.device)

    def forward(self, step: Step) -> torch.Tensor:
        if self.regressor is None:
            raise ValueError("the FitNets regressor is not built (setup was not called)")
        return fitnet_loss(self.regressor(_tap(step, self.student_tap, False)), _tap(step, self.teacher_tap, True))


class AttentionLoss:
    """Attention transfer (Zagoruyko and Komodakis, ICLR 2017): match normalised spatial attention maps.

    For each pair of maps, the attention map is the channel mean of the
    activations to the power ``p``, flattened and L2-normalised; the loss
    sums, over the pairs, the mean squared difference. Maps of different
    spatial sizes are pooled to the smaller one. mdistiller weights the loss
    by 1000 on CIFAR-100.

    :param taps: student taps (``model.taps``), ``[B, C, H, W]`` maps.
    :param teacher_taps: teacher taps (``teacher_taps``), as many as ``taps``, paired in order.
    :param p: exponent applied to the activations (2 in the paper), > 0.
    """

    requires_teacher = True
    requires_outputs = ()
    requires_teacher_outputs = ()
    requires_labels = False
    requires_taps = TapsFrom("taps")
    requires_teacher_taps = TapsFrom("teacher_taps")

    def __init__(self, *, taps: list[str], teacher_taps: list[str], p: float = 2.0):
        self.taps, self.teacher_taps, self.p = list(taps), list(teacher_taps), p

    check_params = ParamChecks(
        NonEmpty("taps", "name at least one student tap"), check_attention_pairs, Range("p", gt=0)
    )

    def __call__(self, step: Step) -> torch.Tensor:
        return at_loss(
            [_tap(step, n, False) for n in self.taps], [_tap(step, n, True) for n in self.teacher_taps], self.p
        )


class SimilarityPreservingLoss(_PairedTaps):
    """Similarity-preserving KD (Tung and Mori, ICCV 2019): match the batch's pairwise-similarity (Gram) matrices.

    Features are flattened; the row-normalised ``B × B`` Gram matrices of
    student and teacher are compared (squared Frobenius norm / B²), so the
    two features may have any sizes. mdistiller weights it by 3000 on
    CIFAR-100.

    :param student_tap: the student tap (``model.taps``).
    :param teacher_tap: the teacher tap (``teacher_taps``).
    """

    def __init__(self, *, student_tap: str, teacher_tap: str):
        self.student_tap, self.teacher_tap = student_tap, teacher_tap

    def __call__(self, step: Step) -> torch.Tensor:
        return sp_loss(_tap(step, self.student_tap, False), _tap(step, self.teacher_tap, True))


class PKTLoss(_PairedTaps):
    """Probabilistic knowledge transfer (Passalis and Tefas, ECCV 2018): match cosine-similarity distributions
    of embeddings.

    Each sample's cosine similarities to the others in the batch, made a
    probability distribution, are matched by KL divergence. Tap the pooled
    embedding (e.g. ``head.dropout`` of the ``linear`` head, ``[B, C]``);
    other taps are flattened. mdistiller weights it by 30000 on CIFAR-100.

    :param student_tap: the student tap (``model.taps``) holding its embedding.
    :param teacher_tap: the teacher tap (``teacher_taps``) holding its embedding.
    """

    def __init__(self, *, student_tap: str, teacher_tap: str):
        self.student_tap, self.teacher_tap = student_tap, teacher_tap

    def __call__(self, step: Step) -> torch.Tensor:
        return pkt_loss(_tap(step, self.student_tap, False), _tap(step, self.teacher_tap, True))


class RKDLoss(_PairedTaps):
    """Relational KD (Park et al., CVPR 2019): match the distances and angles between the batch's embeddings.

    ``distance_weight · L_dist + angle_weight · L_angle``: normalised pairwise
    distances and the angles of all triples, compared with smooth-L1. Tap
    the pooled embedding (e.g. ``head.dropout`` of the ``linear`` head);
    other taps are flattened. Needs batches of at least 2 images.

    :param student_tap: the student tap (``model.taps``) holding its embedding.
    :param teacher_tap: the teacher tap (``teacher_taps``) holding its embedding.
    :param distance_weight: weight of the distance term, >= 0.
    :param angle_weight: weight of the angle term, >= 0.
    """

    def __init__(
        self, *, student_tap: str, teacher_tap: str, distance_weight: float = 25.0, angle_weight: float = 50.0
    ):
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    check_params = ParamChecks(*_TAP_NAMES, Range("distance_weight", ge=0), Range("angle_weight", ge=0))

    def __call__(self, step: Step) -> torch.Tensor:
        return rkd_loss(
            _tap(step, self.student_tap, False),
            _tap(step, self.teacher_tap, True),
            self.distance_weight,
            self.angle_weight,
        )


class CRDLoss(_PairedTaps, nn.Module):
    """Contrastive representation distillation (Tian et al., ICLR 2020): NCE against memory banks of embeddings.

    Student and teacher features (flattened) are projected to ``feat_dim``
    and L2-normalised; each image's student embedding must pick out the
    teacher's embedding of the same image among ``nce_k`` others drawn from
    a memory bank of every training image (and the other way round). The
    embedding layers and the two memory banks ``[number of training images,
    feat_dim]`` are built in the dry forward pass (the engine tells the
    number of training images; a recipe never states it), trained when the
    phase's ``groups`` select ``loss.<id>``, and saved in
    ``losses.safetensors`` and checkpoints. Reads the batch's dataset
    indices. Under DDP see ``docs/methods.md``. mdistiller uses a weight of
    0.8 next to cross-entropy 1.0.

    :param student_tap: the student tap (``model.taps``), e.g. the pooled embedding ``head.dropout``.
    :param teacher_tap: the teacher tap (``teacher_taps``).
    :param feat_dim: dimension of the contrastive embedding, >= 1.
    :param nce_k: negatives per image, >= 1 and fewer than the training images (the paper: 16384 on CIFAR-100).
    :param nce_t: temperature of the scores, > 0.
    :param nce_m: momentum of the memory update, in [0, 1].
    """

    requires_indices = True

    def __init__(
        self,
        *,
        student_tap: str,
        teacher_tap: str,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ):
        nn.Module.__init__(self)
        self.student_tap, self.teacher_tap = student_tap, teacher_tap
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, nce_t, nce_m
        self.crd: CRD | None = None

    check_params = ParamChecks(
        *_TAP_NAMES, Range("feat_dim", ge=1), Range("nce_k", ge=1), Range("nce_t", gt=0), Range("nce_m", ge=0, le=1)
    )

    def setup(self, probe: Step) -> None:
        """Build the embeddings and memory banks from the taps' sizes and the number of training images."""
        n = getattr(probe, "num_train", None)
        if n is None:
            raise ValueError(
                "CRD needs the number of training images, which this engine does not tell "
                "(the dry-forward step has no num_train)"
            )
        if self.nce_k >= n:
            raise ValueError(
                f"nce_k = {self.nce_k} negatives, but there are only {n} training images: set nce_k below {n}"
            )
        s = probe.features[self.student_tap]
        t = probe.teacher_features[self.teacher_tap]
        self.crd = CRD(
            math.prod(s.shape[1:]),
            math.prod(t.shape[1:]),
            int(n),
            feat_dim=self.feat_dim,
            nce_k=self.nce_k,
            nce_t=self.nce_t,
            nce_m=self.nce_m,
        ).to(s.device)

    def forward(self, step: Step) -> torch.Tensor:
        if self.crd is None:
            raise ValueError("the CRD memory is not built (setup was not called)")
        if step.indices is None:
            raise ValueError("CRD needs the batch's dataset indices (step.indices)")
        s = _tap(step, self.student_tap, False)
        return self.crd(s, _tap(step, self.teacher_tap, True), step.indices)
