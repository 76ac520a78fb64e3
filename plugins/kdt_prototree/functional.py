"""Pure tensor functions for the ProtoTree head (method notes §2).

Tensor in, tensor out: no module state, no device or dtype hard-coding.
Written from the method notes and a reading of the authors' public code
(facts and conventions only, no code of theirs).

Notation: ``B`` batch, ``D`` prototype depth, ``K`` classes, ``H x W`` latent
grid, ``d`` tree depth, ``N = 2**d - 1`` internal (decision) nodes, one
prototype each, ``L = 2**d`` leaves.

Tree layout (complete binary tree, breadth-first "heap" order):

* internal node ``i`` in ``[0, N)``; its children are ``2i + 1`` (left) and
  ``2i + 2`` (right); the root is 0;
* "heap index" ``n`` in ``[0, N + L)`` numbers all nodes, leaves included:
  leaf ``l`` has heap index ``N + l``; the parent of ``n > 0`` is
  ``(n - 1) // 2``;
* leaf ``l``'s path from the root reads the ``d`` bits of ``l`` from the most
  significant one: bit 1 = right.  Leaf 0 is the all-left leaf, leaf
  ``L - 1`` the all-right one.

(The authors number nodes depth-first; the order is only a naming
convention and changes no result.)

Routing: ``s = exp(-d_min)`` in ``(0, 1]`` is the probability of the RIGHT
("prototype present") branch, ``1 - s`` of the left.  Everything is computed
in log space: ``log s = -d``, ``log(1 - s) = log1mexp(d)``.  The authors'
default (probability space) is mathematically the same; their log-space
option adds ``1e-7`` to ``d`` inside log1mexp, which is not done here
(``d = 0`` gives ``log(1 - s) = -inf``, handled without NaN).

Pruning is represented by a per-node ``forced`` direction (``-1`` = a real
decision, ``0`` = all mass goes left, ``1`` = all mass goes right): a node the
authors' pruning removes from the tree (its sibling subtree taking its place)
becomes a node that routes everything to that sibling, which gives the kept
leaves exactly the path probabilities of the rewired tree and the removed
leaves probability 0 (see :func:`prune`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdt_prototypes.functional import (  # the pieces every prototype head shares: one copy
    LN2,
    ProjectionResult,
    PrototypeProjector,
    l2_distances,
    min_pool_distances,
)

__all__ = [
    "LN2",
    "l2_distances",
    "min_pool",
    "num_internal_nodes",
    "num_leaves",
    "depth_from_leaves",
    "leaf_paths",
    "subtree_leaves",
    "log1mexp",
    "routing_log_probabilities",
    "leaf_log_probabilities",
    "soft_output",
    "leaf_path_lengths",
    "sample_max_prediction",
    "greedy_prediction",
    "mean_path_length",
    "leaf_update_terms",
    "apply_leaf_update",
    "derivative_free_leaf_update",
    "TreePruning",
    "no_pruning",
    "prune",
    "projection_allowed_classes",
    "ProjectionResult",
    "ProtoTreeProjector",
]

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _first_argmax(values: Tensor) -> Tensor:
    """Index of the maximum along the last dim; ties -> the lowest index."""
    n = values.shape[-1]
    hit = values == values.amax(dim=-1, keepdim=True)
    positions = torch.arange(n, device=values.device).expand_as(values)
    return torch.where(hit, positions, torch.full_like(positions, n)).amin(dim=-1)


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"tree depth must be a positive integer, got {depth!r}")


def _check_min_distances(min_distances: Tensor, depth: int) -> None:
    _check_depth(depth)
    n = num_internal_nodes(depth)
    if min_distances.dim() != 2 or min_distances.shape[1] != n:
        raise ValueError(
            f"min_distances must have shape [B, {n}] for a tree of depth {depth}, got {tuple(min_distances.shape)}"
        )


# --------------------------------------------------------------------------
# distances (§2)
# --------------------------------------------------------------------------

# ProtoTree's distance, the true (non-squared) L2 of every patch to every prototype, is
# :func:`kdt_prototypes.functional.l2_distances` (imported above, so ``l2_distances`` and
# ``LN2`` are still importable from here).

#: Minimum of each prototype's distances over the latent grid, and where
#: (ties: lowest flat location ``h * W + w``): the one implementation every
#: prototype head shares, :func:`kdt_prototypes.functional.min_pool_distances`.
min_pool = min_pool_distances


# --------------------------------------------------------------------------
# tree layout
# --------------------------------------------------------------------------


def num_internal_nodes(depth: int) -> int:
    """``2**depth - 1`` decision nodes (= prototypes).

    :param depth: tree depth (number of decisions from root to leaf).
    """
    _check_depth(depth)
    return 2**depth - 1


def num_leaves(depth: int) -> int:
    """``2**depth`` leaves.

    :param depth: tree depth.
    """
    _check_depth(depth)
    return 2**depth


def depth_from_leaves(count: int) -> int:
    """The depth of a complete tree with ``count`` leaves (a power of two ≥ 2).

    :param count: number of leaves.
    """
    if count < 2 or count & (count - 1):
        raise ValueError(f"the number of leaves must be a power of two >= 2, got {count}")
    return count.bit_length() - 1


def leaf_paths(depth: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Root-to-leaf paths of the complete tree.

    :param depth: tree depth ``d``.
    :param device: device of the returned tensors.
    :return: ``(nodes [L, d] int64, right [L, d] bool)``: the internal nodes
        visited by each leaf's path, root first, and whether the path goes
        right at each of them.
    """
    _check_depth(depth)
    leaves = torch.arange(2**depth, device=device)
    shifts = torch.arange(depth - 1, -1, -1, device=device)
    right = ((leaves.unsqueeze(1) >> shifts) & 1).bool()  # [L, d], most significant bit first
    nodes = torch.zeros(2**depth, depth, dtype=torch.long, device=device)
    for k in range(1, depth):
        nodes[:, k] = 2 * nodes[:, k - 1] + 1 + right[:, k - 1].long()
    return nodes, right


def subtree_leaves(depth: int, device: torch.device | str | None = None) -> Tensor:
    """Which leaves lie below which internal node.

    :param depth: tree depth.
    :param device: device of the result.
    :return: ``[N, L]`` bool, ``True`` where leaf ``l`` is in node ``i``'s subtree.
    """
    nodes, _ = leaf_paths(depth, device)
    n, leaves = num_internal_nodes(depth), num_leaves(depth)
    out = torch.zeros(n, leaves, dtype=torch.bool, device=device)
    out[nodes, torch.arange(leaves, device=device).unsqueeze(1).expand_as(nodes)] = True
    return out


# --------------------------------------------------------------------------
# routing (§2)
# --------------------------------------------------------------------------


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(-x))`` for ``x ≥ 0``, computed stably.

    ``log(-expm1(-x))`` for ``x < ln 2`` and ``log1p(-exp(-x))`` otherwise
    (Mächler's split).  ``x ≤ 0`` gives ``-inf`` (``1 - exp(0) = 0``).  Each
    branch is evaluated only on inputs valid for it (the others see a
    harmless placeholder), so the gradient is finite everywhere, 0 where the
    result is ``-inf``, never NaN.

    :param x: any shape, expected ``≥ 0`` (a distance).
    :return: same shape and dtype.
    """
    positive = x > 0
    one = torch.ones_like(x)
    small = x < LN2
    xs = torch.where(positive & small, x, one * 0.5)  # placeholder inside (0, ln 2)
    xl = torch.where(small, one, x)  # placeholder 1 > ln 2
    value = torch.where(small, torch.log(-torch.expm1(-xs)), torch.log1p(-torch.exp(-xl)))
    return torch.where(positive, value, torch.full_like(x, -math.inf))


def routing_log_probabilities(min_distances: Tensor, forced: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-node log-probabilities of going left and right.

    ``log s = -d`` (right), ``log(1 - s) = log1mexp(d)`` (left).  A forced
    node (``forced[i] = 0`` or ``1``) sends all its mass to that side: log 0
    to that side, ``-inf`` to the other.

    :param min_distances: ``[B, N]`` min-pooled L2 distances.
    :param forced: optional ``[N]`` int (``-1`` free, ``0`` left, ``1`` right).
    :return: ``(log_left [B, N], log_right [B, N])``.
    """
    log_right = -min_distances
    log_left = log1mexp(min_distances)
    if forced is not None:
        f = forced.to(device=min_distances.device).view(1, -1)
        zero = torch.zeros_like(log_right)
        ninf = torch.full_like(log_right, -math.inf)
        log_right = torch.where(f == 1, zero, torch.where(f == 0, ninf, log_right))
        log_left = torch.where(f == 0, zero, torch.where(f == 1, ninf, log_left))
    return log_left, log_right


def leaf_log_probabilities(min_distances: Tensor, depth: int, forced: Tensor | None = None) -> Tensor:
    """Log path probability ``log π_l(x)`` of every leaf.

    ``π_l(x)`` is the product along leaf ``l``'s path of ``s`` (right) or
    ``1 - s`` (left) at each node; computed level by level as sums of logs,
    so it stays finite for deep trees where the product underflows.  For
    every ``x`` the ``π_l(x)`` sum to 1 over the leaves.  Removed leaves of a
    pruned tree get ``-inf``.

    :param min_distances: ``[B, N]`` min-pooled L2 distances, ``N = 2**depth - 1``.
    :param depth: tree depth.
    :param forced: optional ``[N]`` forced directions from :func:`prune`.
    :return: ``[B, L]`` log-probabilities, ``L = 2**depth``.
    """
    _check_min_distances(min_distances, depth)
    log_left, log_right = routing_log_probabilities(min_distances, forced)
    b = min_distances.shape[0]
    log_pi = torch.zeros(b, 1, dtype=min_distances.dtype, device=min_distances.device)
    for k in range(depth):
        start, width = 2**k - 1, 2**k
        left = log_pi + log_left[:, start : start + width]
        right = log_pi + log_right[:, start : start + width]
        log_pi = torch.stack((left, right), dim=-1).reshape(b, 2 * width)
    return log_pi


def soft_output(log_pi: Tensor, leaf_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Soft ("distributed") prediction ``ŷ(x) = Σ_l π_l(x) · softmax(θ_l)``.

    Computed as ``log ŷ = logsumexp_l(log π_l + log_softmax(θ_l))``, exact in
    log space (no class probability underflows to 0 before the sum); the
    intermediate is ``[B, L, K]`` (64 × 512 × 200 floats ≈ 26 MB at the
    paper's sizes).

    :param log_pi: ``[B, L]`` leaf log path probabilities.
    :param leaf_logits: ``[L, K]`` leaf parameters θ (the leaf distribution
        is ``softmax(θ_l)``).
    :return: ``(log ŷ [B, K], ŷ [B, K])``.
    """
    if leaf_logits.dim() != 2 or log_pi.dim() != 2 or leaf_logits.shape[0] != log_pi.shape[1]:
        raise ValueError(
            f"log_pi [B, L] and leaf_logits [L, K] must agree on L, got "
            f"{tuple(log_pi.shape)} and {tuple(leaf_logits.shape)}"
        )
    log_leaf = torch.log_softmax(leaf_logits.to(device=log_pi.device, dtype=log_pi.dtype), dim=1)
    log_y = torch.logsumexp(log_pi.unsqueeze(2) + log_leaf.unsqueeze(0), dim=1)
    return log_y, log_y.exp()


# --------------------------------------------------------------------------
# deterministic predictions (§2)
# --------------------------------------------------------------------------


def leaf_path_lengths(depth: int, forced: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
    """Number of decisions on each leaf's path.

    ``depth`` for every leaf of a complete tree; in a pruned tree the nodes
    with a forced direction are not decisions (they are gone from the
    authors' rewired tree), so a kept leaf's length is its depth there.  A
    removed leaf (its path goes against a forced direction) gets -1.

    :param depth: tree depth.
    :param forced: optional ``[N]`` forced directions.
    :param device: device of the result (default: ``forced``'s).
    :return: ``[L]`` int64.
    """
    if device is None and forced is not None:
        device = forced.device
    nodes, right = leaf_paths(depth, device)
    if forced is None:
        return torch.full((num_leaves(depth),), depth, dtype=torch.long, device=device)
    f = forced.to(device=device, dtype=torch.long)[nodes]  # [L, d]
    removed = ((f >= 0) & (f != right.long())).any(dim=1)
    lengths = (f < 0).sum(dim=1)
    return torch.where(removed, torch.full_like(lengths, -1), lengths)


def sample_max_prediction(
    log_pi: Tensor, leaf_logits: Tensor, path_lengths: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The "sample_max" mode: the distribution of the leaf with the highest path probability.

    Ties go to the lowest leaf index.

    :param log_pi: ``[B, L]`` leaf log path probabilities.
    :param leaf_logits: ``[L, K]`` leaf parameters θ.
    :param path_lengths: optional ``[L]`` from :func:`leaf_path_lengths`
        (default: the complete tree's depth for every leaf).
    :return: ``(log-distribution [B, K], leaf [B] int64, path length [B] int64)``.
    """
    leaf = _first_argmax(log_pi)
    log_leaf = torch.log_softmax(leaf_logits.to(device=log_pi.device, dtype=log_pi.dtype), dim=1)
    if path_lengths is None:
        path_lengths = leaf_path_lengths(depth_from_leaves(log_pi.shape[1]), device=log_pi.device)
    return log_leaf[leaf], leaf, path_lengths.to(log_pi.device)[leaf]


def greedy_prediction(
    min_distances: Tensor, leaf_logits: Tensor, depth: int, forced: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The "greedy" mode: from the root, go right iff ``s > 0.5`` at each node.

    ``s = exp(-d) > 0.5`` is tested as ``d < ln 2`` (the authors' log-space
    form ``-d > log 0.5``); ``d = ln 2`` exactly goes left.  The traversal
    really follows the greedy path node by node (CaBRNet 1.2's greedy mode
    reads the sample_max field instead; not repeated here).  Forced nodes of
    a pruned tree send every input to their forced side and do not count as
    decisions.

    :param min_distances: ``[B, N]`` min-pooled L2 distances.
    :param leaf_logits: ``[L, K]`` leaf parameters θ.
    :param depth: tree depth.
    :param forced: optional ``[N]`` forced directions.
    :return: ``(log-distribution [B, K], leaf [B] int64, path length [B] int64)``.
    """
    _check_min_distances(min_distances, depth)
    b = min_distances.shape[0]
    device = min_distances.device
    node = torch.zeros(b, dtype=torch.long, device=device)
    length = torch.zeros(b, dtype=torch.long, device=device)
    f = None if forced is None else forced.to(device=device, dtype=torch.long)
    for _ in range(depth):
        right = min_distances.gather(1, node.unsqueeze(1)).squeeze(1) < LN2
        if f is None:
            length += 1
        else:
            fn = f[node]
            right = torch.where(fn >= 0, fn == 1, right)
            length += (fn < 0).long()
        node = 2 * node + 1 + right.long()
    leaf = node - num_internal_nodes(depth)
    log_leaf = torch.log_softmax(leaf_logits.to(device=device, dtype=min_distances.dtype), dim=1)
    return log_leaf[leaf], leaf, length


def mean_path_length(path_lengths: Tensor) -> float:
    """Mean number of decisions over the predictions of a deterministic mode.

    (The soft mode uses every path; its path length is the tree depth.)

    :param path_lengths: ``[B]`` path lengths from :func:`sample_max_prediction`
        or :func:`greedy_prediction`.
    """
    return float(path_lengths.double().mean()) if path_lengths.numel() else float("nan")


# --------------------------------------------------------------------------
# derivative-free leaf update (§2)
# --------------------------------------------------------------------------


def leaf_update_terms(leaf_logits: Tensor, log_pi: Tensor, log_y_hat: Tensor, targets: Tensor) -> Tensor:
    """The update ``u_l = Σ_x π_l(x) · softmax(θ_l) ⊙ onehot(y_x) / ŷ(x)_{y_x}``.

    Only the true class of each ``x`` contributes: ``u_{l,c} = Σ_{x: y_x = c}
    π_l(x) · softmax(θ_l)_c / ŷ(x)_c``.  Each term is
    ``exp(log π + log softmax(θ)_y − log ŷ_y)``; since ``ŷ_y ≥ π_l ·
    softmax(θ_l)_y`` every term is in ``[0, 1]``, so nothing overflows, and
    the sum is taken in float64.  The authors compute the same quantity in
    probability space (or, in their log option, with the root's log path
    probability starting at 1 instead of 0, which scales their update by e;
    not repeated here).  ``softmax(θ)`` is that of the CURRENT θ, the one the
    outputs were computed with.

    :param leaf_logits: ``[L, K]`` current leaf parameters θ.
    :param log_pi: ``[B, L]`` leaf log path probabilities (detached).
    :param log_y_hat: ``[B, K]`` soft log-prediction log ŷ (detached).
    :param targets: ``[B]`` int class indices.
    :return: ``[L, K]`` float64 update (summable over micro-batches and ranks).
    """
    num_leaves_, k = leaf_logits.shape
    if log_pi.dim() != 2 or log_pi.shape[1] != num_leaves_:
        raise ValueError(f"log_pi must have shape [B, {num_leaves_}], got {tuple(log_pi.shape)}")
    b = log_pi.shape[0]
    if log_y_hat.shape != (b, k) or targets.shape != (b,):
        raise ValueError(
            f"log_y_hat must be [{b}, {k}] and targets [{b}], got {tuple(log_y_hat.shape)} and {tuple(targets.shape)}"
        )
    device = log_pi.device
    y = targets.to(device=device, dtype=torch.long)
    log_leaf = torch.log_softmax(leaf_logits.detach().to(device=device, dtype=torch.float64), dim=1)  # [L, K]
    log_y = log_y_hat.detach().to(torch.float64).gather(1, y.unsqueeze(1))  # [B, 1]
    terms = log_pi.detach().to(torch.float64) + log_leaf[:, y].t()  # [B, L]
    # a -inf prediction (impossible unless a leaf distribution underflows) gives 0, not NaN
    safe_log_y = torch.where(torch.isfinite(log_y), log_y, torch.zeros_like(log_y))
    weights = torch.where(torch.isfinite(log_y), (terms - safe_log_y).exp(), torch.zeros_like(terms))
    u = torch.zeros(num_leaves_, k, dtype=torch.float64, device=device)
    u.index_add_(1, y, weights.t())
    return u


def apply_leaf_update(leaf_logits: Tensor, leaf_logits_epoch_start: Tensor, n_batches: int, update: Tensor) -> Tensor:
    """``θ ← relu(θ − θ_epoch_start / n_batches) + u`` (one optimiser step).

    Over an epoch of ``n_batches`` steps the old θ decays away and the
    per-step updates accumulate, so θ ends near the epoch's summed
    (probability-weighted) class counts.  The relu only removes floating
    point negatives, as in the authors' code.

    :param leaf_logits: ``[L, K]`` θ now.
    :param leaf_logits_epoch_start: ``[L, K]`` θ at the start of the epoch.
    :param n_batches: optimiser steps per epoch (≥ 1).
    :param update: ``[L, K]`` ``u`` from :func:`leaf_update_terms` (summed
        over micro-batches, and over ranks under DDP).
    :return: the new θ, in ``leaf_logits``'s dtype and device.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    theta = leaf_logits.detach().to(torch.float64)
    start = leaf_logits_epoch_start.detach().to(device=theta.device, dtype=torch.float64)
    new = torch.relu(theta - start / n_batches) + update.to(device=theta.device, dtype=torch.float64)
    return new.to(leaf_logits.dtype)


def derivative_free_leaf_update(
    leaf_logits: Tensor,
    leaf_logits_epoch_start: Tensor,
    n_batches: int,
    log_pi: Tensor,
    log_y_hat: Tensor,
    targets: Tensor,
) -> Tensor:
    """The derivative-free leaf update of one optimiser step (authors' convention).

    θ holds the raw leaf parameters; a leaf's distribution is ``softmax(θ_l)``
    (the authors' default; their Kontschieder normalisation option, θ / Σθ,
    is not supported).  The update adds the expected class counts ``u`` (see
    :func:`leaf_update_terms`) to θ itself — the parameter that goes through
    the softmax, not a probability table — after decaying θ by
    ``θ_epoch_start / n_batches``::

        θ ← relu(θ − θ_epoch_start / n_batches) + u

    This is what the authors' ``train_epoch`` does after every gradient step
    (with ``n_batches`` the number of batches of the epoch and θ_epoch_start
    copied at the epoch's start).

    :param leaf_logits: ``[L, K]`` θ now (the θ the outputs were computed with).
    :param leaf_logits_epoch_start: ``[L, K]`` θ at the start of the epoch.
    :param n_batches: optimiser steps per epoch.
    :param log_pi: ``[B, L]`` leaf log path probabilities.
    :param log_y_hat: ``[B, K]`` soft log-prediction.
    :param targets: ``[B]`` class indices.
    :return: the new θ ``[L, K]``.
    """
    u = leaf_update_terms(leaf_logits, log_pi, log_y_hat, targets)
    return apply_leaf_update(leaf_logits, leaf_logits_epoch_start, n_batches, u)


# --------------------------------------------------------------------------
# pruning (§2)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TreePruning:
    """A pruned tree, expressed on the complete tree's layout.

    :param forced: ``[N]`` int64: ``-1`` a decision node, ``0``/``1`` a node
        removed from the tree whose kept (left/right) child takes its place:
        it routes all mass to that side.
    :param node_kept: ``[N]`` bool: still a decision node (not removed, not
        bypassed); its prototype is in use.
    :param leaf_kept: ``[L]`` bool: leaf still in the tree.
    :param removed: heap indices (internal ``i`` or leaf ``N + l``) of the
        roots of the removed subtrees.
    """

    forced: Tensor
    node_kept: Tensor
    leaf_kept: Tensor
    removed: tuple[int, ...]


def no_pruning(depth: int, device: torch.device | str | None = None) -> TreePruning:
    """The complete tree (nothing pruned).

    :param depth: tree depth.
    :param device: device of the tensors.
    """
    n, leaves = num_internal_nodes(depth), num_leaves(depth)
    return TreePruning(
        forced=torch.full((n,), -1, dtype=torch.long, device=device),
        node_kept=torch.ones(n, dtype=torch.bool, device=device),
        leaf_kept=torch.ones(leaves, dtype=torch.bool, device=device),
        removed=(),
    )


def prune(leaf_distributions: Tensor, threshold: float = 0.01) -> TreePruning:
    """The authors' pruning rule, on the complete tree.

    A node (internal or leaf) is *marked* when every leaf below it has a
    maximum class probability ``≤ threshold`` (paper: 0.01).  Each marked
    node whose parent is not marked — a maximal marked subtree — is removed
    together with its parent: the parent's other child (the sibling) takes
    the parent's place under the grandparent.  As in the authors' code, a
    marked child of the root is left alone (removing it would remove the
    root), and so is everything below it.  When the root itself is marked
    (every leaf is uninformative; the authors' code fails there) nothing is
    pruned.

    On the complete layout the removed parent becomes a *forced* node that
    routes all mass to the sibling, so kept leaves get exactly the path
    probabilities of the rewired tree and their predictions are those of
    the authors' pruned tree.  Pruning starts from the complete tree each
    time.

    :param leaf_distributions: ``[L, K]`` leaf class probabilities (``softmax(θ)``).
    :param threshold: maximum class probability at or below which a leaf is
        uninformative.
    :return: a :class:`TreePruning` (tensors on ``leaf_distributions``' device).
    """
    if leaf_distributions.dim() != 2:
        raise ValueError(f"leaf_distributions must have shape [L, K], got {tuple(leaf_distributions.shape)}")
    device = leaf_distributions.device
    depth = depth_from_leaves(leaf_distributions.shape[0])
    n, leaves = num_internal_nodes(depth), num_leaves(depth)
    low = (leaf_distributions.detach().amax(dim=1) <= threshold).tolist()
    marked = [False] * n + low
    for i in range(n - 1, -1, -1):
        marked[i] = marked[2 * i + 1] and marked[2 * i + 2]
    result = no_pruning(depth, device)
    if marked[0]:
        return result
    forced = [-1] * n
    removed_node = [False] * (n + leaves)
    roots = []
    for h in range(1, n + leaves):
        parent = (h - 1) // 2
        if not marked[h] or marked[parent] or parent == 0:
            continue
        roots.append(h)
        sibling_is_right = h % 2 == 1  # h is a left child (odd) -> sibling 2p+2 is right
        forced[parent] = 1 if sibling_is_right else 0
        stack = [h]
        while stack:
            m = stack.pop()
            removed_node[m] = True
            if m < n:
                stack += [2 * m + 1, 2 * m + 2]
    node_kept = [not removed_node[i] and forced[i] < 0 for i in range(n)]
    return TreePruning(
        forced=torch.tensor(forced, dtype=torch.long, device=device),
        node_kept=torch.tensor(node_kept, dtype=torch.bool, device=device),
        leaf_kept=torch.tensor([not r for r in removed_node[n:]], dtype=torch.bool, device=device),
        removed=tuple(roots),
    )


# --------------------------------------------------------------------------
# projection (§2)
# --------------------------------------------------------------------------


def projection_allowed_classes(
    leaf_distributions: Tensor, node_kept: Tensor | None = None, leaf_kept: Tensor | None = None
) -> Tensor:
    """Classes whose images may be used to project each node's prototype.

    Class ``c`` is allowed for node ``i`` when ``c`` is the argmax class (lowest
    index on ties) of some leaf below ``i``.  In a pruned tree a kept node
    only looks at the kept leaves below it (its subtree in the rewired
    tree); a removed or bypassed node keeps its original subtree, as in the
    authors' code (its prototype is unused anyway).

    :param leaf_distributions: ``[L, K]`` leaf class probabilities.
    :param node_kept: optional ``[N]`` bool from :class:`TreePruning`.
    :param leaf_kept: optional ``[L]`` bool from :class:`TreePruning`.
    :return: ``[N, K]`` bool.
    """
    leaves, k = leaf_distributions.shape
    device = leaf_distributions.device
    depth = depth_from_leaves(leaves)
    below = subtree_leaves(depth, device)  # [N, L]
    if node_kept is not None and leaf_kept is not None:
        restrict = node_kept.to(device).unsqueeze(1) & ~leaf_kept.to(device).unsqueeze(0)
        below = below & ~restrict
    top = _first_argmax(leaf_distributions.detach())  # [L]
    onehot = torch.zeros(leaves, k, dtype=torch.float32, device=device)
    onehot[torch.arange(leaves, device=device), top] = 1.0
    return (below.float() @ onehot) > 0


class ProtoTreeProjector(PrototypeProjector):
    """Streaming class-constrained projection of the node prototypes (§2).

    Each prototype is replaced by the nearest latent patch (L2, as
    :func:`l2_distances`) among the images whose label is allowed for its node
    (:func:`projection_allowed_classes`).  The streaming projector shared with
    ProtoPNet's push (:class:`kdt_prototypes.functional.PrototypeProjector`)
    with ProtoTree's distance: feed batches with :meth:`update`, read
    :meth:`result` (a :class:`ProjectionResult`, distances in L2 units).
    Keeps only the running best per prototype (``O(N·D)``) plus one batch's
    ``[B, N, H, W]`` distances.  Ties: a patch replaces the best only if
    strictly nearer, so the first seen wins (earlier batch, then lower batch
    position, then lower ``h·W + w``), as in the authors' loop.

    :param prototypes: ``[N, D]`` current prototypes (a detached copy is taken).
    :param allowed_classes: ``[N, K]`` bool, or ``None`` for unconstrained projection.
    """

    def __init__(self, prototypes: Tensor, allowed_classes: Tensor | None) -> None:
        super().__init__(prototypes, allowed_classes, distance=l2_distances)
