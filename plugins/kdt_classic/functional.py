"""Pure tensor functions of the standard knowledge-distillation methods.

No steps, no engine: each function takes tensors and hyper-parameters and
returns a scalar loss.  The teacher side is always detached, so gradients
reach the student's tensors only.

Inputs in float16/bfloat16 are computed in float32; float32 and float64 keep
their dtype (the tests compare against float64 loops).

The conventions follow the authors' public implementations of each method
(mdistiller for KD, DKD, FitNets, AT, SP, PKT and RKD; the DIST authors' code
for DIST; the logit-standardisation authors' code for ``standardize``);
where this module differs, the function's docstring says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "at_loss",
    "dist_loss",
    "dkd_loss",
    "fitnet_loss",
    "kd_loss",
    "pkt_loss",
    "rkd_loss",
    "sp_loss",
    "standardize_logits",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is half precision, unchanged otherwise."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _student(x: torch.Tensor) -> torch.Tensor:
    return _compute_dtype(x)


def _teacher(x: torch.Tensor) -> torch.Tensor:
    return _compute_dtype(x.detach())


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [B, K], got shape {tuple(student_logits.shape)}")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} differs from "
            f"student_logits shape {tuple(student_logits.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _flatten_pair(student: torch.Tensor, teacher: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if student.dim() < 2 or teacher.dim() < 2:
        raise ValueError(f"{what} must have a batch dimension and at least one feature dimension")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{what}: batch sizes differ ({student.shape[0]} vs {teacher.shape[0]})")
    return student.reshape(student.shape[0], -1), teacher.reshape(teacher.shape[0], -1)


# --------------------------------------------------------------------------
# logit-based methods
# --------------------------------------------------------------------------


def standardize_logits(logits: torch.Tensor) -> torch.Tensor:
    """Z-score each row of ``logits``: ``(x - mean) / (1e-7 + std)``.

    The standard deviation is the unbiased one (divisor K - 1) and the 1e-7
    is added to the standard deviation, not inside the square root, as in
    the authors' code of Sun et al., "Logit Standardization in Knowledge
    Distillation", CVPR 2024.

    :param logits: logits ``[B, K]`` (K >= 2).
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)  # unbiased
    return (logits - mean) / (1e-7 + std)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    standardize: bool = False,
) -> torch.Tensor:
    """Hinton soft-target loss: batch-mean ``KL(softmax(t/T) ‖ softmax(s/T)) · T²``.

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network",
    NIPS 2014 Deep Learning Workshop.  With ``standardize=True`` both the
    student's and the teacher's logits are first z-scored per sample
    (:func:`standardize_logits`; Sun et al., "Logit Standardization in
    Knowledge Distillation", CVPR 2024) and then divided by T; the T² factor
    is kept, as in the authors' code.

    :param student_logits: student logits ``[B, K]``.
    :param teacher_logits: teacher logits ``[B, K]`` (detached).
    :param temperature: softening temperature T > 0.
    :param standardize: z-score the logits of both networks before the softmax.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    s = _student(student_logits)
    t = _teacher(teacher_logits)
    if standardize:
        if s.shape[1] < 2:
            raise ValueError("standardize=True needs at least 2 classes")
        s = standardize_logits(s)
        t = standardize_logits(t)
    # KL with both sides as log-probabilities, summed over the batch and divided by B: the same value as
    # Σ_c p_t·(log p_t − log p_s) averaged over samples, computed as kdtoolkit always has (runs stay bit-identical)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (temperature * temperature)


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Decoupled KD: ``alpha · TCKD + beta · NCKD``.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.  TCKD is the
    KL divergence between the binary distributions (target class, all other
    classes) of teacher and student; NCKD the KL divergence between their
    distributions over the non-target classes, obtained by subtracting 1000
    from the target logit (after dividing by T) before the softmax.  Each
    term is the KL summed over the batch, divided by the batch size and
    multiplied by T².  The warm-up ramp of the method is not applied here.

    :param student_logits: student logits ``[B, K]``.
    :param teacher_logits: teacher logits ``[B, K]`` (detached).
    :param labels: ground-truth class indices ``[B]`` in ``[0, K)``.
    :param alpha: weight of the target-class term (TCKD).
    :param beta: weight of the non-target-class term (NCKD).
    :param temperature: softening temperature T > 0.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    b, k = student_logits.shape
    labels = labels.reshape(-1)
    if labels.shape[0] != b:
        raise ValueError(f"labels must have {b} entries, got {labels.shape[0]}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    # range check without a device sync: only for labels already on the CPU
    if b and labels.device.type == "cpu" and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    s = _student(student_logits) / temperature
    t = _teacher(teacher_logits) / temperature
    gt = F.one_hot(labels.long(), k).to(torch.bool)
    gt_f = gt.to(s.dtype)

    def binary(p: torch.Tensor) -> torch.Tensor:
        p_gt = (p * gt_f).sum(dim=1, keepdim=True)
        p_other = (p * (1 - gt_f)).sum(dim=1, keepdim=True)
        return torch.cat([p_gt, p_other], dim=1)

    b_s = binary(F.softmax(s, dim=1))
    b_t = binary(F.softmax(t, dim=1))
    tckd = F.kl_div(torch.log(b_s), b_t, reduction="sum") * (temperature**2) / b
    log_q_s = F.log_softmax(s - 1000.0 * gt_f, dim=1)
    q_t = F.softmax(t - 1000.0 * gt_f, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * (temperature**2) / b
    return alpha * tckd + beta * nckd


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row pair: cosine of the centred rows, ``eps`` added to the norm product."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    gamma: float,
    temperature: float,
) -> torch.Tensor:
    """DIST: ``beta · T²(1 − inter) + gamma · T²(1 − intra)`` with Pearson correlations.

    Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS
    2022.  With ``P_s = softmax(s/T)`` and ``P_t = softmax(t/T)`` ``[B, K]``,
    the inter-class relation is the mean over samples of the Pearson
    correlation of the rows of P_s and P_t; the intra-class relation is the
    mean over classes of the correlation of their columns.  The correlation is
    the cosine of the mean-centred vectors with 1e-8 added to the product of
    norms, as in the authors' code.

    :param student_logits: student logits ``[B, K]``.
    :param teacher_logits: teacher logits ``[B, K]`` (detached).
    :param beta: weight of the inter-class term.
    :param gamma: weight of the intra-class term.
    :param temperature: softening temperature T > 0.
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    p_s = F.softmax(_student(student_logits) / temperature, dim=1)
    p_t = F.softmax(_teacher(teacher_logits) / temperature, dim=1)
    t2 = temperature**2
    inter = t2 * (1 - _pearson_rows(p_s, p_t).mean())
    intra = t2 * (1 - _pearson_rows(p_s.t(), p_t.t()).mean())
    return beta * inter + gamma * intra


# --------------------------------------------------------------------------
# feature-based methods
# --------------------------------------------------------------------------


def fitnet_loss(student_regressed: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: mean squared error between regressed student and teacher features.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.  The
    student's feature must already be mapped to the teacher's shape (see
    :class:`kdt_classic.connectors.ConvRegressor`).

    :param student_regressed: regressed student feature, same shape as the teacher's.
    :param teacher_feature: teacher feature (detached).
    """
    if student_regressed.shape != teacher_feature.shape:
        raise ValueError(
            f"student_regressed shape {tuple(student_regressed.shape)} differs from "
            f"teacher_feature shape {tuple(teacher_feature.shape)}"
        )
    return F.mse_loss(_student(student_regressed), _teacher(teacher_feature))


def _attention_map(f: torch.Tensor, p: float) -> torch.Tensor:
    return F.normalize(f.pow(p).mean(dim=1).reshape(f.shape[0], -1), dim=1)


def at_loss(
    student_features: Sequence[torch.Tensor] | torch.Tensor,
    teacher_features: Sequence[torch.Tensor] | torch.Tensor,
    p: float = 2,
) -> torch.Tensor:
    """Attention transfer: summed over feature pairs, the mean squared difference of attention maps.

    Zagoruyko and Komodakis, "Paying More Attention to Attention", ICLR 2017.
    For a map ``f`` ``[B, C, H, W]`` the attention map is ``mean_c f^p``,
    flattened and L2-normalised per sample; each pair contributes the mean of
    ``(a_s − a_t)²`` over batch and positions.  When the spatial sizes of a
    pair differ, the larger map is adaptive-average-pooled to the smaller
    one's size before the attention maps are taken.  mdistiller decides by
    the height and pools to a square (H, H); here both dimensions are pooled
    to the smaller map's (H, W), which is the same for square maps.

    :param student_features: student maps ``[B, C_s, H, W]``: a sequence, or one tensor.
    :param teacher_features: teacher maps (detached), paired with the student's in order.
    :param p: exponent applied to the activations (2 in the paper).
    """
    if isinstance(student_features, torch.Tensor):
        student_features = [student_features]
    if isinstance(teacher_features, torch.Tensor):
        teacher_features = [teacher_features]
    student_features = list(student_features)
    teacher_features = list(teacher_features)
    if not student_features:
        raise ValueError("at_loss needs at least one pair of feature maps")
    if len(student_features) != len(teacher_features):
        raise ValueError(f"{len(student_features)} student maps but {len(teacher_features)} teacher maps")
    total = None
    for i, (f_s, f_t) in enumerate(zip(student_features, teacher_features)):
        if f_s.dim() != 4 or f_t.dim() != 4:
            raise ValueError(f"pair {i}: feature maps must be [B, C, H, W]")
        if f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"pair {i}: batch sizes differ ({f_s.shape[0]} vs {f_t.shape[0]})")
        f_s = _student(f_s)
        f_t = _teacher(f_t)
        size = (min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3]))
        if tuple(f_s.shape[2:]) != size:
            f_s = F.adaptive_avg_pool2d(f_s, size)
        if tuple(f_t.shape[2:]) != size:
            f_t = F.adaptive_avg_pool2d(f_t, size)
        term = (_attention_map(f_s, p) - _attention_map(f_t, p)).pow(2).mean()
        total = term if total is None else total + term
    assert total is not None  # at least one pair, checked above
    return total


def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD: squared difference of row-normalised batch Gram matrices.

    Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    Features are flattened to ``[B, D]``; ``G = f fᵀ`` ``[B, B]`` is
    L2-normalised row by row; the loss is ``‖G_t − G_s‖²_F / B²``.  Returns a
    0-dim tensor (mdistiller returns shape [1]).

    :param student_feature: student feature ``[B, ...]``.
    :param teacher_feature: teacher feature ``[B, ...]`` (detached); its size per sample may differ.
    """
    f_s, f_t = _flatten_pair(_student(student_feature), _teacher(teacher_feature), "sp_loss")
    b = f_s.shape[0]
    g_s = F.normalize(f_s @ f_s.t(), dim=1)
    g_t = F.normalize(f_t @ f_t.t(), dim=1)
    return (g_t - g_s).pow(2).sum() / (b * b)


def pkt_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer: KL between cosine-similarity distributions.

    Passalis and Tefas, "Learning Deep Representations with Probabilistic
    Knowledge Transfer", ECCV 2018.  Each embedding is divided by
    ``(‖x‖ + eps)`` (NaNs set to 0), cosine similarities are mapped to
    ``(c + 1) / 2`` and each row normalised to sum to 1; the loss is the mean
    over all ``B × B`` entries of ``p_t · log((p_t + eps) / (p_s + eps))``.

    :param student_embedding: student embedding ``[B, D_s]`` (higher ranks are flattened).
    :param teacher_embedding: teacher embedding ``[B, D_t]`` (detached).
    :param eps: stabiliser in the normalisation and the logarithm.
    """
    f_s, f_t = _flatten_pair(_student(student_embedding), _teacher(teacher_embedding), "pkt_loss")

    def probs(f: torch.Tensor) -> torch.Tensor:
        f = f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
        f = torch.where(torch.isnan(f), torch.zeros_like(f), f)
        sim = (f @ f.t() + 1.0) / 2.0
        return sim / sim.sum(dim=1, keepdim=True)

    p_s = probs(f_s)
    p_t = probs(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _pairwise_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def _angles(e: torch.Tensor) -> torch.Tensor:
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # [B, B, D], diff[i, j] = e_j - e_i
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)


def rkd_loss(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    distance_weight: float = 25,
    angle_weight: float = 50,
    squared: bool = False,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Relational KD: ``distance_weight · L_dist + angle_weight · L_angle``.

    Park et al., "Relational Knowledge Distillation", CVPR 2019.  Inputs are
    flattened to ``[B, D]``.  Distance term: pairwise Euclidean distances
    (squared ones if ``squared``; the squared distance is clamped below at
    ``eps`` before the root, the diagonal set to 0), each matrix divided by the
    mean of its positive entries, compared with smooth-L1 (mean).  Angle term:
    for every triple (i, j, k) the cosine between the unit vectors
    ``e_j − e_i`` and ``e_k − e_i``, compared with smooth-L1 (mean over all
    B³ triples).

    :param student_embedding: student embedding ``[B, ...]`` (B >= 2).
    :param teacher_embedding: teacher embedding ``[B, ...]`` (detached).
    :param distance_weight: weight of the distance term.
    :param angle_weight: weight of the angle term.
    :param squared: use squared distances in the distance term.
    :param eps: lower clamp of the squared pairwise distances.
    """
    s, t = _flatten_pair(_student(student_embedding), _teacher(teacher_embedding), "rkd_loss")
    if s.shape[0] < 2:
        raise ValueError("rkd_loss needs a batch of at least 2 samples")
    with torch.no_grad():
        d_t = _pairwise_distances(t, squared, eps)
        d_t = d_t / d_t[d_t > 0].mean()
        a_t = _angles(t)
    d_s = _pairwise_distances(s, squared, eps)
    d_s = d_s / d_s[d_s > 0].mean()
    loss_d = F.smooth_l1_loss(d_s, d_t)
    loss_a = F.smooth_l1_loss(_angles(s), a_t)
    return distance_weight * loss_d + angle_weight * loss_a
