"""Contrastive representation distillation (CRD) as a module with its memory banks.

Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR
2020.  The conventions (embedding heads, memory initialisation and momentum
update, estimate of the NCE normalisation constant on the first batch, NCE
loss) follow the authors' public implementation (RepDistiller).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CRD", "nce_loss"]

#: Stabiliser of the NCE loss.
NCE_EPS = 1e-7


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Divide each row by its L2 norm (no epsilon, as in the reference)."""
    return x / x.pow(2).sum(dim=1, keepdim=True).pow(0.5)


class _Embed(nn.Module):
    """Flatten, linear projection, L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _l2_normalize(self.linear(x.reshape(x.shape[0], -1)))


def nce_loss(scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE loss of CRD for scores ``[B, K+1]`` whose column 0 is the positive.

    With noise probability ``Pn = 1 / n_data`` and ``m = K``, the loss is
    ``−(Σ_b log(P_pos / (P_pos + m·Pn + eps)) + Σ_{b,k} log(m·Pn / (P_neg + m·Pn + eps))) / B``
    with ``eps = 1e-7`` (Tian et al., ICLR 2020, Eq. 18 as implemented by the
    authors).

    :param scores: normalised scores ``exp(<v, m>/T) / Z`` ``[B, K+1]``, column 0 the positive.
    :param n_data: size of the training set (the number of memory rows).
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [B, K+1] with K >= 1, got {tuple(scores.shape)}")
    b = scores.shape[0]
    m = scores.shape[1] - 1
    mpn = m / float(n_data)
    pos = scores[:, 0]
    neg = scores[:, 1:]
    log_d1 = torch.log(pos / (pos + (mpn + NCE_EPS)))
    log_d0 = torch.log(torch.full_like(neg, mpn) / (neg + (mpn + NCE_EPS)))
    return -(log_d1.sum() + log_d0.sum()) / b


class CRD(nn.Module):
    """CRD loss with embedding heads and one memory bank per network.

    Student and teacher features are flattened, projected to ``feat_dim`` by
    a linear layer and L2-normalised.  ``memory_s`` holds the student
    embeddings of the ``n_data`` training samples, ``memory_t`` the
    teacher's; both start uniform in ``[−σ, σ]`` with ``σ = 1/sqrt(feat_dim/3)``
    (drawn from the global torch RNG at construction, like the layers'
    weights).  For each sample the scores are ``exp(<v, m>/nce_t)`` of its
    embedding ``v`` against the other network's memory rows: the positive
    (its own index) and ``nce_k`` negatives.  Each side's scores are divided
    by its normalisation constant Z, estimated once on the first batch as
    ``mean(scores) · n_data`` and then kept; the loss is the sum of the two
    sides' :func:`nce_loss`.  After scoring, the positive rows are updated to
    ``normalize(nce_m · row + (1 − nce_m) · v)``.

    State (saved with ``state_dict``): the heads' parameters and the buffers
    ``memory_s``, ``memory_t`` ``[n_data, feat_dim]`` and ``z`` ``[2]``
    (student side, teacher side); a Z value ``<= 0`` means "not set yet"
    (they start at −1; a set Z is always positive).

    Negatives: when ``contrast_idx`` is not given, ``nce_k`` indices per
    sample are drawn uniformly with replacement from ``[0, n_data)`` with the
    global torch RNG of the memory's device (``torch.randint``); like the
    reference's sampler over uniform weights, a negative may coincide with
    the positive.  The memory update is deterministic: if an index occurs
    several times in a batch, its last occurrence in batch order is written.
    Every forward call updates the memory and (once) Z, so call it on
    training batches only.

    :param student_dim: size of the flattened student feature.
    :param teacher_dim: size of the flattened teacher feature.
    :param n_data: number of training samples (memory rows); indices lie in ``[0, n_data)``.
    :param feat_dim: embedding dimension.
    :param nce_k: number of negatives per sample, ``1 <= nce_k < n_data``.
    :param nce_t: temperature of the scores.
    :param nce_m: momentum of the memory update, in ``[0, 1]``.
    """

    # the buffers registered in __init__ (torch types a module's attributes as Tensor | Module)
    memory_s: torch.Tensor
    memory_t: torch.Tensor
    z: torch.Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ):
        super().__init__()
        for name, v in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("feat_dim", feat_dim)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if int(n_data) < 2:
            raise ValueError(f"n_data must be >= 2, got {n_data}")
        if int(nce_k) < 1:
            raise ValueError(f"nce_k must be >= 1, got {nce_k}")
        if int(nce_k) >= int(n_data):
            raise ValueError(f"nce_k ({nce_k}) must be smaller than n_data ({n_data})")
        if not nce_t > 0:
            raise ValueError(f"nce_t must be > 0, got {nce_t}")
        if not 0 <= nce_m <= 1:
            raise ValueError(f"nce_m must be in [0, 1], got {nce_m}")
        self.n_data = int(n_data)
        self.feat_dim = int(feat_dim)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.nce_m = float(nce_m)
        self.embed_s = _Embed(int(student_dim), self.feat_dim)
        self.embed_t = _Embed(int(teacher_dim), self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(self.n_data, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_t", torch.rand(self.n_data, self.feat_dim).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("z", torch.full((2,), -1.0))
        # host-side note that z is known to be set, so training steps do not
        # read the buffer back from the device; cleared when a state is loaded
        self._z_known = False

    # ------------------------------------------------------------------

    def sample_indices(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, nce_k + 1]``: column 0 ``idx``, then uniform draws from the global RNG."""
        b = idx.shape[0]
        neg = torch.randint(0, self.n_data, (b, self.nce_k), device=self.memory_s.device)
        return torch.cat([idx.reshape(b, 1).to(neg.device), neg], dim=1)

    def _contrast_indices(self, idx: torch.Tensor, contrast_idx: torch.Tensor | None) -> torch.Tensor:
        if contrast_idx is None:
            return self.sample_indices(idx)
        b = idx.shape[0]
        contrast_idx = contrast_idx.to(device=self.memory_s.device, dtype=torch.long)
        if contrast_idx.shape == (b, self.nce_k):
            return torch.cat([idx.reshape(b, 1), contrast_idx], dim=1)
        if contrast_idx.shape == (b, self.nce_k + 1):
            if not torch.equal(contrast_idx[:, 0], idx):
                raise ValueError("contrast_idx[:, 0] must equal idx (the positives)")
            return contrast_idx
        raise ValueError(
            f"contrast_idx must be [B, nce_k] negatives or [B, nce_k + 1] with the positives first; "
            f"got {tuple(contrast_idx.shape)} for B={b}, nce_k={self.nce_k}"
        )

    @torch.no_grad()
    def _update_memory(self, memory: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> None:
        # last occurrence of each index in batch order (stable sort keeps batch order within a group)
        order = torch.sort(idx, stable=True).indices
        sorted_idx = idx[order]
        last = torch.ones_like(sorted_idx, dtype=torch.bool)
        last[:-1] = sorted_idx[1:] != sorted_idx[:-1]
        rows, pos = sorted_idx[last], order[last]
        new = memory.index_select(0, rows) * self.nce_m + v[pos] * (1 - self.nce_m)
        memory.index_copy_(0, rows, _l2_normalize(new))

    def forward(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        idx: torch.Tensor,
        contrast_idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The CRD loss of a batch (0-dim tensor); updates the memory banks.

        :param f_s: student features ``[B, ...]`` (flattened to ``student_dim``).
        :param f_t: teacher features ``[B, ...]`` (detached; flattened to ``teacher_dim``).
        :param idx: dataset indices of the batch's samples ``[B]``, in ``[0, n_data)``.
        :param contrast_idx: optional indices ``[B, nce_k]`` (negatives) or ``[B, nce_k + 1]``
            (positive first, then negatives); sampled uniformly when omitted.
        """
        if f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"batch sizes differ ({f_s.shape[0]} vs {f_t.shape[0]})")
        b = f_s.shape[0]
        idx = idx.reshape(-1)
        if idx.shape[0] != b:
            raise ValueError(f"idx must have {b} entries, got {idx.shape[0]}")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer indices, got {idx.dtype}")
        idx = idx.to(device=self.memory_s.device, dtype=torch.long)
        if idx.device.type == "cpu" and b and (int(idx.min()) < 0 or int(idx.max()) >= self.n_data):
            raise ValueError(f"idx must lie in [0, {self.n_data})")
        all_idx = self._contrast_indices(idx, contrast_idx)
        k1 = all_idx.shape[1]

        dtype = self.memory_s.dtype
        v_s = self.embed_s(f_s).to(dtype)
        v_t = self.embed_t(f_t.detach()).to(dtype)

        # student anchor against teacher memory, teacher anchor against student memory
        w_t = self.memory_t.index_select(0, all_idx.reshape(-1)).view(b, k1, self.feat_dim)
        w_s = self.memory_s.index_select(0, all_idx.reshape(-1)).view(b, k1, self.feat_dim)
        out_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.nce_t)
        out_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.nce_t)

        if not self._z_known:
            if not self.z_is_set:
                with torch.no_grad():
                    self.z[0] = out_s.mean() * self.n_data
                    self.z[1] = out_t.mean() * self.n_data
            self._z_known = True
        loss = nce_loss(out_s / self.z[0].detach(), self.n_data) + nce_loss(out_t / self.z[1].detach(), self.n_data)

        self._update_memory(self.memory_s, idx, v_s.detach())
        self._update_memory(self.memory_t, idx, v_t.detach())
        return loss

    @property
    def z_is_set(self) -> bool:
        """Whether the normalisation constants were estimated (both Z > 0)."""
        return bool((self.z > 0).all())

    def reset_z(self) -> None:
        """Forget the normalisation constants; the next forward call estimates them again."""
        self.z.fill_(-1.0)
        self._z_known = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = False

    def extra_repr(self) -> str:
        return (
            f"n_data={self.n_data}, feat_dim={self.feat_dim}, nce_k={self.nce_k}, "
            f"nce_t={self.nce_t}, nce_m={self.nce_m}"
        )
