"""The ProtoTree head (method notes §2) as an ``nn.Module``.

``features → add-on (1×1 conv + Sigmoid) → true-L2 patch distances to one
prototype per decision node → min-pool → soft routing down a complete binary
tree → leaf class distributions mixed by path probability``.
The arithmetic lives in :mod:`kdt_prototree.functional`; this module holds
the parameters, their initialisation, the pruning state and the per-step
hooks of the derivative-free leaf update.
"""

from __future__ import annotations

import math
from typing import Any, Literal
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kdt_prototypes import ProjectionResult, l2_distances, min_pool_distances
from kdtoolkit.foundation import full_precision

from . import functional as F
from .checks import check_head_params


class ProtoTreeHead(nn.Module):
    """ProtoTree head: a soft binary decision tree over prototype similarities.

    Outputs of :meth:`forward`:

    * ``logits`` ``[B,K]``: the soft prediction in log space, ``log ŷ`` — not
      unnormalised logits but log-probabilities.  ``argmax`` gives the
      prediction, and since ``Σ_c ŷ_c = 1`` cross-entropy on these equals the
      NLL of ``log ŷ``, ProtoTree's loss;
    * ``log_probabilities`` ``[B,K]``: the same tensor, under its own name
      (the NLL loss reads this one);
    * ``min_distances`` ``[B,N]`` (true L2, not squared) and ``argmin``
      ``[B,N]`` (flat location ``h·W + w``), one per decision node;
    * ``features``: the add-on output z ``[B,D,H,W]``;
    * ``distances`` ``[B,N,H,W]``: every node's L2 distance to every latent
      patch (the map ``min_distances`` pools; the correspondence loss reads
      it to find tied minima);
    * ``leaf_log_probabilities`` ``[B,L]``: ``log π_l(x)``;
    * ``greedy_prediction``, ``sample_max_prediction`` ``[B]`` int64: the
      class predicted in the two deterministic inference modes (see
      :meth:`predict`), and ``greedy_path_length``,
      ``sample_max_path_length`` ``[B]`` int64: the decisions on the path
      each one followed.  Computed without gradient; they are recorded per
      test image (``record_keys``) for the ``tree_modes`` metric.

    Parameter groups: ``head.add_on``, ``head.prototypes``, ``head.leaves``.
    In ``derivative_free`` mode the leaves have ``requires_grad=False`` and
    must stay so (no phase should unfreeze them); they change only through
    :meth:`on_optimizer_step`.

    Pruning state (buffers, saved with the model): ``forced`` ``[N]``,
    ``node_kept`` ``[N]``, ``leaf_kept`` ``[L]`` (see
    :class:`kdt_prototree.functional.TreePruning`).  ``leaves_epoch_start``
    holds θ at the start of the current epoch (saved too, for resuming).

    :param in_channels: C, the backbone's output channels.
    :param num_classes: K.
    :param depth: tree depth d (paper: 9): ``2**d − 1`` prototypes, ``2**d`` leaves.
    :param prototype_depth: D, channels of the add-on output and of each
        prototype (paper: 256).
    :param leaves: ``derivative_free`` (paper default: θ initialised to zeros,
        updated after each optimiser step) or ``gradient`` (θ trained by the
        optimiser, initialised N(0, 1) as the authors do).
    """

    outputs = (
        "logits",
        "log_probabilities",
        "min_distances",
        "argmin",
        "features",
        "distances",
        "leaf_log_probabilities",
        "greedy_prediction",
        "sample_max_prediction",
        "greedy_path_length",
        "sample_max_path_length",
    )
    param_groups = ("add_on", "prototypes", "leaves")
    record_keys = (
        "min_distances",
        "argmin",
        "greedy_prediction",
        "sample_max_prediction",
        "greedy_path_length",
        "sample_max_path_length",
    )
    # buffers registered in __init__ (declared here for their type)
    leaves_epoch_start: Tensor
    forced: Tensor
    node_kept: Tensor
    leaf_kept: Tensor

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        depth: int = 9,
        prototype_depth: int = 256,
        leaves: Literal["derivative_free", "gradient"] = "derivative_free",
    ):
        super().__init__()
        self.check_params({"depth": depth, "prototype_depth": prototype_depth, "leaves": leaves})
        self.num_classes = num_classes
        self.depth = depth
        self.leaf_mode = leaves
        n, nl = F.num_internal_nodes(depth), F.num_leaves(depth)
        conv = nn.Conv2d(in_channels, prototype_depth, kernel_size=1, bias=False)
        nn.init.xavier_normal_(conv.weight, gain=nn.init.calculate_gain("sigmoid"))
        self.add_on = nn.Sequential(conv, nn.Sigmoid())
        self.prototypes = nn.Parameter(torch.empty(n, prototype_depth).normal_(mean=0.5, std=0.1))
        if leaves == "derivative_free":
            self.leaves = nn.Parameter(torch.zeros(nl, num_classes), requires_grad=False)
        else:
            self.leaves = nn.Parameter(torch.randn(nl, num_classes))
        self.register_buffer("leaves_epoch_start", torch.zeros(nl, num_classes))
        self.register_buffer("forced", torch.full((n,), -1, dtype=torch.long))
        self.register_buffer("node_kept", torch.ones(n, dtype=torch.bool))
        self.register_buffer("leaf_kept", torch.ones(nl, dtype=torch.bool))

    check_params = staticmethod(check_head_params)

    # -- structure ---------------------------------------------------------
    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def num_leaves(self) -> int:
        return int(self.leaves.shape[0])

    def leaf_distributions(self) -> Tensor:
        """``softmax(θ_l)`` for every leaf, ``[L, K]`` (float32)."""
        return torch.softmax(self.leaves.detach().float(), dim=1)

    def path_lengths(self) -> Tensor:
        """Decisions on each leaf's path in the (possibly pruned) tree, ``[L]``."""
        return F.leaf_path_lengths(self.depth, self.forced)

    # -- forward -----------------------------------------------------------
    def latent(self, f: Tensor) -> Tensor:
        """The add-on output z ∈ (0,1)^{B×D×H×W} for backbone features ``f``.

        :param f: backbone features ``[B, C, H, W]``.
        """
        return self.add_on(f)

    def _routing(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        z = self.add_on(f)
        # float32 even under autocast: the distance expansion cancels badly in low precision
        with full_precision(z.device.type):
            distances = l2_distances(z.float(), self.prototypes.float())
            min_d, argmin = min_pool_distances(distances)
            log_pi = F.leaf_log_probabilities(min_d, self.depth, self.forced)
        return z, min_d, argmin, log_pi, distances

    def forward(self, f: Tensor) -> dict[str, Tensor]:
        """Soft prediction and the per-node quantities.

        :param f: backbone features ``[B, C, H, W]``.
        :return: the dict described in the class docstring.
        """
        z, min_d, argmin, log_pi, distances = self._routing(f)
        # derivative-free leaves never receive a gradient, even if a phase selects them
        theta = self.leaves.detach() if self.leaf_mode == "derivative_free" else self.leaves
        with full_precision(z.device.type):
            log_y, _ = F.soft_output(log_pi, theta.float())
            with torch.no_grad():
                lengths = self.path_lengths()
                sm_log, _, sm_len = F.sample_max_prediction(log_pi.detach(), theta.detach().float(), lengths)
                gr_log, _, gr_len = F.greedy_prediction(min_d.detach(), theta.detach().float(), self.depth, self.forced)
        return {
            "logits": log_y,
            "log_probabilities": log_y,
            "min_distances": min_d,
            "argmin": argmin,
            "features": z,
            "distances": distances,
            "leaf_log_probabilities": log_pi,
            "greedy_prediction": gr_log.argmax(1),
            "sample_max_prediction": sm_log.argmax(1),
            "greedy_path_length": gr_len,
            "sample_max_path_length": sm_len,
        }

    @torch.no_grad()
    def predict(self, f: Tensor, mode: Literal["soft", "sample_max", "greedy"] = "soft") -> dict[str, Tensor]:
        """Prediction in one of the three inference modes.

        ``soft`` (the authors' "distributed"): ``log ŷ``; every path is used,
        so ``leaf`` is -1 and ``path_length`` the longest kept path (the
        depth of a complete tree).  ``sample_max``: the distribution of the
        leaf with the highest path probability.  ``greedy``: the leaf reached
        by going right iff ``s > 0.5`` at each node.

        :param f: backbone features ``[B, C, H, W]``.
        :param mode: ``soft``, ``sample_max`` or ``greedy``.
        :return: ``{"log_probabilities": [B,K], "leaf": [B] int64,
            "path_length": [B] int64}``.
        """
        _, min_d, _, log_pi, _ = self._routing(f)
        theta = self.leaves.float()
        lengths = self.path_lengths()
        b = min_d.shape[0]
        if mode == "soft":
            log_y, _ = F.soft_output(log_pi, theta)
            longest = int(lengths[self.leaf_kept].max())
            leaf = torch.full((b,), -1, dtype=torch.long, device=min_d.device)
            return {
                "log_probabilities": log_y,
                "leaf": leaf,
                "path_length": torch.full((b,), longest, dtype=torch.long, device=min_d.device),
            }
        if mode == "sample_max":
            log_d, leaf, length = F.sample_max_prediction(log_pi, theta, lengths)
        elif mode == "greedy":
            log_d, leaf, length = F.greedy_prediction(min_d, theta, self.depth, self.forced)
        else:
            raise ValueError(f"unknown prediction mode {mode!r}; expected 'soft', 'sample_max' or 'greedy'")
        return {"log_probabilities": log_d, "leaf": leaf, "path_length": length}

    def top_prototypes(self, outputs: dict[str, Tensor], k: int) -> dict[str, Tensor]:
        """The ``k`` most activated prototypes (tree nodes) of each image, for ``kdt predict``.

        :param outputs: a :meth:`forward` result for a batch.
        :param k: how many prototypes per image (at most the number of nodes kept by pruning).
        :return: ``[B, k]`` tensors: ``prototype`` (node index, most similar
            first), ``similarity`` (``exp(-d)``, the probability of routing
            right at that node) and ``location`` (flat index ``h·W + w`` of its
            closest latent patch). Tree prototypes have no class and no
            additive contribution to a logit, so neither is returned.
        """
        d = outputs["min_distances"].float()
        kept = self.node_kept.to(d.device)
        d = d.masked_fill(~kept, math.inf)  # a pruned node routes no image: never listed
        k = max(1, min(int(k), int(kept.sum())))
        neg, idx = (-d).topk(k, dim=1)
        return {"prototype": idx, "similarity": neg.exp(), "location": outputs["argmin"].gather(1, idx)}

    def record_meta(self, outputs: dict[str, Tensor]) -> dict[str, int]:
        """The latent grid of the outputs, ``{"H": h, "W": w}``, the tree depth
        and the soft mode's path length (the longest kept path).

        :param outputs: a :meth:`forward` result.
        """
        h, w = outputs["features"].shape[-2:]
        longest = int(self.path_lengths()[self.leaf_kept].max())
        return {"H": int(h), "W": int(w), "tree_depth": self.depth, "soft_path_length": longest}

    # -- derivative-free leaf update (per-step hooks) ----------------------
    @torch.no_grad()
    def on_epoch_start(self, state: Any) -> None:
        """Remember θ at the start of the epoch (the decay term of the update).

        :param state: the engine's epoch state (attributes ``epoch``,
            ``num_batches``; not read here).
        """
        self.leaves_epoch_start.copy_(self.leaves.detach())

    @torch.no_grad()
    def leaf_update_terms(self, steps: Iterable[Any]) -> Tensor:
        """``u`` of one optimiser step, summed over its micro-batches, ``[L, K]`` float64.

        Under DDP each rank sees different micro-batches: the engine must
        all-reduce (sum) this ``u`` across ranks before :meth:`apply_leaf_update`,
        so every rank applies the same update and θ stays identical.

        :param steps: micro-batch step objects with ``.outputs`` (this head's
            outputs; detached here) and ``.targets``.
        """
        u = torch.zeros(self.leaves.shape, dtype=torch.float64, device=self.leaves.device)
        for step in steps:
            out = step.outputs
            u += F.leaf_update_terms(
                self.leaves, out["leaf_log_probabilities"].detach(), out["log_probabilities"].detach(), step.targets
            ).to(u.device)
        return u

    @torch.no_grad()
    def apply_leaf_update(self, update: Tensor, num_batches: int) -> None:
        """``θ ← relu(θ − θ_epoch_start / num_batches) + u`` in place.

        :param update: ``u`` from :meth:`leaf_update_terms` (all-reduced under DDP).
        :param num_batches: optimiser steps per epoch.
        """
        self.leaves.copy_(F.apply_leaf_update(self.leaves, self.leaves_epoch_start, num_batches, update))

    def on_optimizer_step(self, state: Any) -> None:
        """After the gradient step: the derivative-free leaf update.

        Does nothing in ``gradient`` mode or when the head is not training.
        Each call applies the update once, with ``u`` summed over the step's
        micro-batches and, under DDP, over the ranks
        (``state.dist.all_reduce_sum``), so every rank applies the same
        update and θ stays identical.  The decay divides by the optimiser
        steps of the epoch (``state.optimizer_steps``: batches / accumulate).

        :param state: the engine's :class:`~kdtoolkit.engine.loop.TrainState`
            (``steps``, ``optimizer_steps``, ``dist``); ``num_batches`` is
            used when it has no ``optimizer_steps``.
        """
        if self.leaf_mode != "derivative_free" or not self.training:
            return
        u = self.leaf_update_terms(state.steps)
        dist = getattr(state, "dist", None)
        if dist is not None and dist.world > 1:
            dist.all_reduce_sum(u)
        steps = getattr(state, "optimizer_steps", None) or state.num_batches
        self.apply_leaf_update(u, int(steps))

    # -- pruning and projection -------------------------------------------
    @torch.no_grad()
    def prune(self, threshold: float = 0.01) -> F.TreePruning:
        """Prune the tree with the authors' rule (see :func:`kdt_prototree.functional.prune`).

        Starts from the complete tree; sets the ``forced``, ``node_kept`` and
        ``leaf_kept`` buffers.  Predictions through kept leaves follow the
        rewired tree; removed leaves get probability 0.

        :param threshold: maximum class probability at or below which a leaf
            is uninformative (paper: 0.01).
        :return: the pruning.
        """
        pruning = F.prune(self.leaf_distributions(), threshold)
        self.forced.copy_(pruning.forced)
        self.node_kept.copy_(pruning.node_kept)
        self.leaf_kept.copy_(pruning.leaf_kept)
        return pruning

    @property
    def pruning(self) -> F.TreePruning:
        """The current pruning state as a :class:`~kdt_prototree.functional.TreePruning`."""
        forced = self.forced.tolist()
        # a node forced right lost its left child's subtree, and vice versa
        removed = [2 * p + 1 if f == 1 else 2 * p + 2 for p, f in enumerate(forced) if f >= 0]
        return F.TreePruning(
            self.forced.clone(), self.node_kept.clone(), self.leaf_kept.clone(), tuple(sorted(removed))
        )

    def projection_allowed_classes(self) -> Tensor:
        """``[N, K]`` bool: argmax classes of the (kept) leaves below each node."""
        return F.projection_allowed_classes(self.leaf_distributions(), self.node_kept, self.leaf_kept)

    def projector(self) -> F.ProtoTreeProjector:
        """A streaming class-constrained projector for the current prototypes."""
        return F.ProtoTreeProjector(self.prototypes, self.projection_allowed_classes())

    @torch.no_grad()
    def apply_projection(self, result: ProjectionResult) -> None:
        """Copy projected prototypes in (only where a patch was found).

        :param result: :meth:`ProtoTreeProjector.result` of :meth:`projector`.
        """
        found = result.found.to(self.prototypes.device).unsqueeze(1)
        new = result.prototypes.to(device=self.prototypes.device, dtype=self.prototypes.dtype)
        self.prototypes.copy_(torch.where(found, new, self.prototypes))
