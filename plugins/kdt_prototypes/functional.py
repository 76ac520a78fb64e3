"""Pure tensor functions every prototype head shares: patch distances, min-pooling, projection.

Tensor in, tensor out: no ``nn.Module`` state, no device or dtype
hard-coding.  Results live on the device and in the dtype of the inputs
(integer outputs are ``torch.int64``, masks are ``torch.bool``).

- the input checks :func:`as_matrix` (prototypes as ``[P, D]``) and
  :func:`check_latent` (a latent map ``[B, D, H, W]``);
- the patch distances: ProtoPNet's squared L2 (:func:`squared_l2_distances`,
  method notes §1) and ProtoTree's true L2 (:func:`l2_distances`, §2), and
  ProtoPNet's similarity of a distance (:func:`distance_to_similarity`);
- :func:`min_pool_distances`: each prototype's smallest patch distance and
  its location (ties: the lowest flat location);
- :class:`PrototypeProjector`: the streaming projection ("push") of every
  prototype onto its nearest allowed training patch, with any patch distance;
- :data:`LN2`, the greedy routing threshold of a tree of prototypes.

Written from the method notes only; no code of ProtoPNet, ProtoTree,
Proto2Proto or CaBRNet is used.

Notation: ``B`` batch, ``D`` prototype depth (latent channels), ``P``
prototypes, ``K`` classes, ``H x W`` latent grid.  A latent location
``(h, w)`` has the flat index ``h * W + w`` (row-major), as in §4.

Distance units: "squared-L2 units" means values of
``||z_{b,:,h,w} - p_j||^2`` where ``z`` is the add-on output (in ``(0, 1)``
after the Sigmoid, so at most ``D``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "LN2",
    "as_matrix",
    "check_latent",
    "squared_l2_distances",
    "l2_distances",
    "min_pool_distances",
    "distance_to_similarity",
    "ProjectionResult",
    "PrototypeProjector",
]

#: ``ln 2``: a tree of prototypes routes right when ``s = exp(-d) > 0.5``, that is when ``d < ln 2``.
LN2 = math.log(2.0)


# --------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------


def as_matrix(prototypes: Tensor, name: str = "prototypes") -> Tensor:
    """Return prototypes as ``[P, D]``; accepts ``[P, D]`` or ``[P, D, 1, 1]``."""
    if prototypes.dim() == 2:
        return prototypes
    if prototypes.dim() == 4 and prototypes.shape[2] == 1 and prototypes.shape[3] == 1:
        return prototypes.flatten(1)
    raise ValueError(f"{name} must have shape [P, D] or [P, D, 1, 1], got {tuple(prototypes.shape)}")


def check_latent(z: Tensor, name: str = "z") -> None:
    """Raise ``ValueError`` unless ``z`` is a latent map ``[B, D, H, W]`` (``name`` names it in the message)."""
    if z.dim() != 4:
        raise ValueError(f"{name} must have shape [B, D, H, W], got {tuple(z.shape)}")


def _first_argmin(values: Tensor) -> Tensor:
    """Index of the minimum along the last dim; ties -> the LOWEST index.

    Implemented explicitly (compare with the minimum, then take the smallest
    matching position) so the tie rule does not depend on a backend's argmin.
    A row containing NaN returns the index of its first NaN (``torch.min``
    propagates NaN as the minimum value).
    """
    n = values.shape[-1]
    vmin = values.amin(dim=-1, keepdim=True)
    hit = values == vmin
    if values.is_floating_point():
        hit = hit | (torch.isnan(values) & torch.isnan(vmin))
    positions = torch.arange(n, device=values.device).expand_as(values)
    sentinel = torch.full_like(positions, n)
    return torch.where(hit, positions, sentinel).amin(dim=-1)


# --------------------------------------------------------------------------
# distances and pooling (method notes §1, §2)
# --------------------------------------------------------------------------


def squared_l2_distances(z: Tensor, prototypes: Tensor) -> Tensor:
    """Squared Euclidean distance of every latent patch to every prototype.

    ProtoPNet's patch distance (spec §1, "Distance"):
    ``d_{b,j,h,w} = max(0, ||z_{b,:,h,w}||^2 - 2 <z_{b,:,h,w}, p_j> + ||p_j||^2)``.

    ``||z||^2`` is computed once per location (shape ``[B, 1, H, W]``), not once
    per prototype as the original did, ``||p||^2`` once per prototype, and the
    cross term with a single ``einsum``.  The expansion can go slightly
    negative through rounding (e.g. when a prototype equals a patch, as right
    after a push), hence the clamp at 0.

    Args:
        z: latent map (add-on output), ``[B, D, H, W]``.
        prototypes: ``[P, D]`` or ``[P, D, 1, 1]`` (1x1 prototypes), same D.

    Returns:
        ``[B, P, H, W]`` squared-L2 distances (>= 0), in ``z``'s dtype/device.

    Raises:
        ValueError: on wrong ranks or a depth mismatch.
    """
    check_latent(z)
    p = as_matrix(prototypes)
    if p.shape[1] != z.shape[1]:
        raise ValueError(
            f"prototype depth {p.shape[1]} (prototypes {tuple(prototypes.shape)}) does not "
            f"match latent depth {z.shape[1]} (z {tuple(z.shape)})"
        )
    z_sq = (z * z).sum(dim=1, keepdim=True)  # [B, 1, H, W]
    p_sq = (p * p).sum(dim=1).view(1, -1, 1, 1)  # [1, P, 1, 1]
    cross = torch.einsum("bdhw,pd->bphw", z, p)  # [B, P, H, W]
    return torch.clamp(z_sq - 2.0 * cross + p_sq, min=0.0)


def min_pool_distances(distances: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum distance of each prototype over the latent grid, and where it is.

    Spec §1 "Min-pool over H x W" (ProtoPNet's negative max-pool); the location
    is needed by the metrics (§4) and explanations.

    Ties: when several locations share the minimum, the LOWEST flat index
    ``h * W + w`` is returned (deterministic, independent of the backend's
    argmin).  The gradient of the returned minimum flows to that single
    location only (like max-pooling).

    Args:
        distances: ``[B, P, H, W]`` (any distance units).

    Returns:
        ``(min_distances [B, P], argmin [B, P] int64)`` with
        ``argmin = h * W + w`` in ``[0, H * W)``.
    """
    if distances.dim() != 4:
        raise ValueError(f"distances must have shape [B, P, H, W], got {tuple(distances.shape)}")
    flat = distances.flatten(2)  # [B, P, H*W]
    idx = _first_argmin(flat)  # [B, P]
    values = flat.gather(2, idx.unsqueeze(-1)).squeeze(-1)
    return values, idx


def distance_to_similarity(min_distances: Tensor, kind: str = "log", eps: float = 1e-4) -> Tensor:
    """Turn (min-pooled) distances into prototype similarity scores (spec §1).

    * ``"log"`` (ProtoPNet): ``s = log((d + 1) / (d + eps))``, ``eps = 1e-4``;
      equals ``log(1/eps)`` (~9.21) at ``d = 0`` and decreases towards 0.
      Expects ``d >= 0`` (squared-L2 units).
    * ``"linear"``: ``s = -d``.

    Args:
        min_distances: any shape, typically ``[B, P]``.
        kind: ``"log"`` or ``"linear"``.
        eps: the ``"log"`` variant's epsilon.

    Returns:
        Tensor of the same shape.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "log":
        return torch.log((min_distances + 1.0) / (min_distances + eps))
    if kind == "linear":
        return -min_distances
    raise ValueError(f"unknown similarity kind {kind!r}; expected 'log' or 'linear'")


def l2_distances(z: Tensor, prototypes: Tensor, eps: float = 1e-14) -> Tensor:
    """True (non-squared) L2 distance of every latent patch to every prototype.

    As the authors compute it: ``sqrt(|‖z‖² − 2⟨z,p⟩ + ‖p‖²| + eps)`` with
    ``eps = 1e-14`` — the absolute value (not a clamp) of the expansion, so a
    slightly negative rounding error counts as a small positive distance; the
    ``eps`` keeps the square root's gradient finite when a prototype equals a
    patch (distances are at least ``sqrt(eps) = 1e-7``).

    :param z: latent map (add-on output) ``[B, D, H, W]``.
    :param prototypes: ``[P, D]`` or ``[P, D, 1, 1]`` (1×1 prototypes).
    :param eps: added under the square root.
    :return: ``[B, P, H, W]`` distances in ``z``'s dtype and device.
    """
    check_latent(z)
    p = as_matrix(prototypes)
    if p.shape[1] != z.shape[1]:
        raise ValueError(f"prototype depth {p.shape[1]} does not match latent depth {z.shape[1]}")
    z_sq = (z * z).sum(dim=1, keepdim=True)  # [B, 1, H, W]
    p_sq = (p * p).sum(dim=1).view(1, -1, 1, 1)  # [1, P, 1, 1]
    cross = torch.einsum("bdhw,pd->bphw", z, p)
    return torch.sqrt((z_sq - 2.0 * cross + p_sq).abs() + eps)


# --------------------------------------------------------------------------
# push / projection (§1 phase 3; ProtoTree's projection, §2)
# --------------------------------------------------------------------------


@dataclass
class ProjectionResult:
    """Outcome of :class:`PrototypeProjector`.

    Attributes:
        prototypes: ``[P, D]`` new prototype values (the nearest patch; an
            unchanged copy of the old value where nothing was found).
        distance: ``[P]`` distance of the old prototype to the chosen patch,
            in the projector's units (squared L2 for ProtoPNet, L2 for
            ProtoTree; ``inf`` where nothing was found).
        sample_id: ``[P]`` int64 id of the image holding the patch (-1 if none).
        h: ``[P]`` int64 row of the patch in the latent grid (-1 if none).
        w: ``[P]`` int64 column (-1 if none).
        found: ``[P]`` bool, whether an allowed patch was seen.
    """

    prototypes: Tensor
    distance: Tensor
    sample_id: Tensor
    h: Tensor
    w: Tensor
    found: Tensor


class PrototypeProjector:
    """Streaming prototype projection ("push"), spec §1 phase 3 and §2.

    Each prototype is replaced by the nearest latent patch (squared L2 by
    default; ``distance`` chooses another patch distance, e.g. ProtoTree's
    true L2) among the images whose label is allowed for it.  Feed batches of latent maps
    with :meth:`update`, then read :meth:`result`.  Only the running best per
    prototype is kept (distance, id, h, w and its D-vector), so memory is
    ``O(P * D)`` plus one batch's ``[B, P, H, W]`` distances; features are
    never accumulated.

    Ties: a patch replaces the current best only if it is STRICTLY nearer, so
    the first one seen wins: across batches the earlier batch, within a batch
    the lower batch position, then the lower flat location ``h * W + w``.

    Args:
        prototypes: ``[P, D]`` (or ``[P, D, 1, 1]``) current prototypes; a
            detached copy is taken.
        allowed_classes: ``[P, K]`` bool, ``allowed[j, c]`` = images of class c
            may be used for prototype j; ``None`` = any image.  Class-specific
            ProtoPNet: ``class_identity.bool()``; ProtoTree: the argmax classes
            of the leaves below each node.
        distance: ``distance(z [B,D,H,W], prototypes [P,D]) -> [B,P,H,W]``,
            the patch distance (default :func:`squared_l2_distances`).
    """

    def __init__(
        self,
        prototypes: Tensor,
        allowed_classes: Tensor | None,
        distance: Callable[[Tensor, Tensor], Tensor] = squared_l2_distances,
    ) -> None:
        self._distance_fn = distance
        p = as_matrix(prototypes).detach().clone()
        self._old = p
        self._vectors = p.clone()
        n = p.shape[0]
        if allowed_classes is not None:
            if allowed_classes.dim() != 2 or allowed_classes.shape[0] != n:
                raise ValueError(
                    f"allowed_classes must have shape [P, K] with P = {n}, got {tuple(allowed_classes.shape)}"
                )
            allowed_classes = (allowed_classes != 0).to(p.device)
        self._allowed = allowed_classes
        self._distance = torch.full((n,), math.inf, dtype=p.dtype, device=p.device)
        self._sample_id = torch.full((n,), -1, dtype=torch.long, device=p.device)
        self._h = torch.full((n,), -1, dtype=torch.long, device=p.device)
        self._w = torch.full((n,), -1, dtype=torch.long, device=p.device)
        self._found = torch.zeros(n, dtype=torch.bool, device=p.device)

    @torch.no_grad()
    def update(self, z: Tensor, labels: Tensor, sample_ids: Tensor) -> None:
        """Consider every patch of one batch.

        Args:
            z: ``[B, D, H, W]`` latent maps (add-on output) of un-augmented
                images; any device/dtype (prototypes are cast to it).
            labels: ``[B]`` int class labels (only read if ``allowed_classes``
                was given; must then lie in ``[0, K)``).
            sample_ids: ``[B]`` int64 ids reported back in the result.
        """
        check_latent(z)
        bsz, depth, height, width = z.shape
        if depth != self._old.shape[1]:
            raise ValueError(
                f"latent depth {depth} (z {tuple(z.shape)}) does not match prototype depth {self._old.shape[1]}"
            )
        if labels.shape != (bsz,) or sample_ids.shape != (bsz,):
            raise ValueError(
                f"labels and sample_ids must have shape [{bsz}], got {tuple(labels.shape)} "
                f"and {tuple(sample_ids.shape)}"
            )
        if bsz == 0:
            return
        protos = self._old.to(device=z.device, dtype=z.dtype)
        dist = self._distance_fn(z, protos)  # [B, P, H, W]
        if self._allowed is not None:
            lab = labels.to(device=self._allowed.device, dtype=torch.long)
            k = self._allowed.shape[1]
            if int(lab.min()) < 0 or int(lab.max()) >= k:
                raise ValueError(f"labels must lie in [0, {k}) for allowed_classes of {k} classes")
            ok = self._allowed[:, lab].t().to(z.device)  # [B, P]
            dist = torch.where(ok[:, :, None, None], dist, torch.full_like(dist, math.inf))
        cells = height * width
        per_proto = dist.permute(1, 0, 2, 3).reshape(dist.shape[1], bsz * cells)  # [P, B*H*W]
        idx = _first_argmin(per_proto)  # [P], batch-major then location: first wins
        best = per_proto.gather(1, idx.unsqueeze(1)).squeeze(1)
        state = self._distance.device
        best = best.to(device=state, dtype=self._distance.dtype)
        better = best < self._distance  # strict: earlier batches win ties; inf never wins
        if not bool(better.any()):
            return
        idx_s = idx.to(state)
        b_idx = idx_s // cells
        loc = idx_s % cells
        vectors = z.permute(0, 2, 3, 1).reshape(bsz * cells, depth)[idx]  # [P, D]
        vectors = vectors.to(device=state, dtype=self._vectors.dtype)
        ids = sample_ids.to(device=state, dtype=torch.long)[b_idx]
        self._distance = torch.where(better, best, self._distance)
        self._sample_id = torch.where(better, ids, self._sample_id)
        self._h = torch.where(better, loc // width, self._h)
        self._w = torch.where(better, loc % width, self._w)
        self._found = self._found | better
        self._vectors = torch.where(better.unsqueeze(1), vectors, self._vectors)

    def result(self) -> ProjectionResult:
        """The projection so far (copies; the projector can keep streaming)."""
        return ProjectionResult(
            prototypes=self._vectors.clone(),
            distance=self._distance.clone(),
            sample_id=self._sample_id.clone(),
            h=self._h.clone(),
            w=self._w.clone(),
            found=self._found.clone(),
        )
