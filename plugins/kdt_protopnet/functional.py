"""Pure tensor functions for ProtoPNet heads (method notes §1).

Everything here is tensor-in, tensor-out: no ``nn.Module`` state, no device
or dtype hard-coding.  Results live on the device and in the dtype of the
inputs (integer outputs are ``torch.int64``, masks are ``torch.bool``).

Spec: ``docs/method-notes.md`` §1 (ProtoPNet head, losses, push).  The
pieces every prototype head shares (the squared-L2 distance and the
similarity, min-pooling with its argmin location, the streaming projector,
the input checks) live in :mod:`kdt_prototypes.functional`; the names this
module had are still importable from here.  Written from the notes only;
no code of ProtoPNet, ProtoTree, Proto2Proto or CaBRNet is used.

Notation: ``B`` batch, ``D`` prototype depth (latent channels), ``P``
prototypes, ``K`` classes, ``H x W`` latent grid.  A latent location
``(h, w)`` has the flat index ``h * W + w`` (row-major), as in §4.

Distance units: "squared-L2 units" means values of
``||z_{b,:,h,w} - p_j||^2`` where ``z`` is the add-on output (in ``(0, 1)``
after the Sigmoid, so at most ``D``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdt_prototypes.functional import (  # moved to the shared prototype layer; importable from here too
    ProjectionResult,
    PrototypeProjector,
    distance_to_similarity,
    min_pool_distances,
    squared_l2_distances,
)

__all__ = [
    "squared_l2_distances",
    "min_pool_distances",
    "distance_to_similarity",
    "prototype_class_identity",
    "last_layer_init",
    "cluster_loss",
    "separation_loss",
    "last_layer_l1",
    "ProjectionResult",
    "PrototypeProjector",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _own_class_mask(targets: Tensor, class_identity: Tensor, min_distances: Tensor) -> Tensor:
    """``[B, P]`` bool: True where prototype j belongs to the true class of image b."""
    if min_distances.dim() != 2:
        raise ValueError(f"min_distances must have shape [B, P], got {tuple(min_distances.shape)}")
    if class_identity.dim() != 2 or class_identity.shape[0] != min_distances.shape[1]:
        raise ValueError(
            f"class_identity must have shape [P, K] with P = {min_distances.shape[1]}, "
            f"got {tuple(class_identity.shape)}"
        )
    if targets.dim() != 1 or targets.shape[0] != min_distances.shape[0]:
        raise ValueError(f"targets must have shape [B] with B = {min_distances.shape[0]}, got {tuple(targets.shape)}")
    identity = (class_identity != 0).to(min_distances.device)
    return identity[:, targets.to(device=identity.device, dtype=torch.long)].t()


# --------------------------------------------------------------------------
# class structure and last layer (§1)
# --------------------------------------------------------------------------


def prototype_class_identity(num_classes: int, prototypes_per_class: int) -> Tensor:
    """One-hot prototype-to-class map for class-specific prototypes (spec §1).

    Prototype ``j`` belongs to class ``j // prototypes_per_class``; ``P =
    num_classes * prototypes_per_class`` (paper: 10 per class).

    Returns:
        ``[P, K]`` tensor in the default float dtype (CPU), 1 at
        ``(j, j // prototypes_per_class)``, 0 elsewhere.

    Raises:
        ValueError: if either count is not a positive integer.
    """
    for name, value in (("num_classes", num_classes), ("prototypes_per_class", prototypes_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    num_prototypes = num_classes * prototypes_per_class
    identity = torch.zeros(num_prototypes, num_classes)
    owner = torch.arange(num_prototypes) // prototypes_per_class
    identity[torch.arange(num_prototypes), owner] = 1.0
    return identity


def last_layer_init(class_identity: Tensor, incorrect_strength: float = -0.5) -> Tensor:
    """Initial last-layer weights ``W in R^{K x P}`` (spec §1).

    ``W_{c,j} = 1`` if prototype j belongs to class c, ``incorrect_strength``
    (ProtoPNet: -0.5) otherwise.  ``logits = W s`` (no bias).

    Args:
        class_identity: ``[P, K]`` (nonzero = membership).
        incorrect_strength: weight for the other classes.

    Returns:
        ``[K, P]`` tensor, dtype/device of ``class_identity`` (default float
        dtype if it is not floating point).
    """
    if class_identity.dim() != 2:
        raise ValueError(f"class_identity must have shape [P, K], got {tuple(class_identity.shape)}")
    dtype = class_identity.dtype if class_identity.is_floating_point() else torch.get_default_dtype()
    own = (class_identity != 0).t()
    ones = torch.ones(own.shape, dtype=dtype, device=class_identity.device)
    return torch.where(own, ones, ones * incorrect_strength)


def cluster_loss(min_distances: Tensor, targets: Tensor, class_identity: Tensor) -> Tensor:
    """ProtoPNet cluster cost (spec §1, "Cluster").

    For each image, the smallest min-distance among the prototypes of its
    true class; averaged over the batch.  Pulls at least one own-class
    prototype close to some patch.  Recipe weight: +0.8 (paper) / +1.0
    (Proto2Proto config).

    Args:
        min_distances: ``[B, P]`` min-pooled distances (squared-L2 units).
        targets: ``[B]`` int64 class indices in ``[0, K)``.
        class_identity: ``[P, K]`` (nonzero = membership).

    Returns:
        0-dim tensor.  ``inf`` for an image whose class has no prototype.
    """
    own = _own_class_mask(targets, class_identity, min_distances)
    inf = torch.full_like(min_distances, math.inf)
    return torch.where(own, min_distances, inf).min(dim=1).values.mean()


def separation_loss(min_distances: Tensor, targets: Tensor, class_identity: Tensor) -> Tensor:
    """ProtoPNet separation cost (spec §1, "Sep").

    For each image, the smallest min-distance among the prototypes of all
    OTHER classes; averaged over the batch.  Returned as a positive distance:
    the recipe gives it a NEGATIVE weight (paper and Proto2Proto: -0.08), so
    minimising the total loss pushes other-class prototypes away.

    Args:
        min_distances: ``[B, P]`` min-pooled distances (squared-L2 units).
        targets: ``[B]`` int64 class indices.
        class_identity: ``[P, K]`` (nonzero = membership).

    Returns:
        0-dim tensor.  ``inf`` if every prototype belongs to the true class.
    """
    own = _own_class_mask(targets, class_identity, min_distances)
    inf = torch.full_like(min_distances, math.inf)
    return torch.where(own, inf, min_distances).min(dim=1).values.mean()


def last_layer_l1(weight: Tensor, class_identity: Tensor) -> Tensor:
    """L1 penalty on the off-class last-layer weights (spec §1, "L1").

    ``sum |W_{c,j}|`` over ``c != class(j)`` (recipe weight 1e-4).

    Args:
        weight: ``[K, P]`` last-layer weight.
        class_identity: ``[P, K]`` (nonzero = membership).

    Returns:
        0-dim tensor.
    """
    if weight.dim() != 2 or class_identity.dim() != 2 or weight.shape != class_identity.t().shape:
        raise ValueError(
            f"weight must have shape [K, P] matching class_identity [P, K]; got weight "
            f"{tuple(weight.shape)} and class_identity {tuple(class_identity.shape)}"
        )
    off = (class_identity == 0).t().to(weight.device)
    return torch.where(off, weight.abs(), torch.zeros_like(weight)).sum()
