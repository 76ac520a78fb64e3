"""Tests for plugins/kdt_prototree (method notes §2).

Expected values come from plain Python loops over patches, nodes and paths
(float64), from the authors' probability-space formulation written out
below, or from numbers worked out by hand in the comments.  Trees are tiny
(depth ≤ 3, depth 9 only for the NaN checks).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdt_prototree import functional as F
from kdt_prototree.head import ProtoTreeHead


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _softmax_row(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def _path_of_leaf(leaf: int, depth: int) -> list[tuple[int, bool]]:
    """(node, goes right) pairs from the root, walking the breadth-first layout by hand."""
    path, node = [], 0
    for k in range(depth):
        right = bool((leaf >> (depth - 1 - k)) & 1)
        path.append((node, right))
        node = 2 * node + 2 if right else 2 * node + 1
    return path


def _brute_pi(d: list[float], depth: int) -> list[float]:
    """π_l = Π over the path of s (right) or 1 − s (left), s = exp(−d)."""
    out = []
    for leaf in range(2**depth):
        p = 1.0
        for node, right in _path_of_leaf(leaf, depth):
            s = math.exp(-d[node])
            p *= s if right else 1.0 - s
        out.append(p)
    return out


# --------------------------------------------------------------------------
# distances and layout
# --------------------------------------------------------------------------


def test_l2_distances_and_min_pool_match_brute_force():
    g = _gen(0)
    z = torch.rand(2, 4, 2, 3, generator=g, dtype=torch.float64)
    p = torch.rand(3, 4, generator=g, dtype=torch.float64)
    p[1] = z[1, :, 1, 2]  # an exact patch: distance sqrt(1e-14) = 1e-7
    d = F.l2_distances(z, p)
    assert d.shape == (2, 3, 2, 3)
    for b in range(2):
        for j in range(3):
            for h in range(2):
                for w in range(3):
                    sq = sum((z[b, c, h, w].item() - p[j, c].item()) ** 2 for c in range(4))
                    assert d[b, j, h, w].item() == pytest.approx(math.sqrt(sq + 1e-14), abs=1e-12)
    assert d[1, 1, 1, 2].item() == pytest.approx(1e-7, rel=1e-3)
    values, where = F.min_pool(d)
    flat = d.flatten(2)
    assert torch.equal(values, flat.min(dim=2).values)
    assert where[1, 1].item() == 1 * 3 + 2
    # ties go to the lowest flat location
    tie = torch.tensor([[[[2.0, 1.0], [1.0, 3.0]]]])
    assert F.min_pool(tie)[1].item() == 1


def test_layout_paths_by_hand():
    nodes, right = F.leaf_paths(2)
    # leaf 0: left, left; leaf 1: left, right; leaf 2: right, left; leaf 3: right, right
    assert nodes.tolist() == [[0, 1], [0, 1], [0, 2], [0, 2]]
    assert right.tolist() == [[False, False], [False, True], [True, False], [True, True]]
    nodes3, right3 = F.leaf_paths(3)
    for leaf in range(8):
        path = _path_of_leaf(leaf, 3)
        assert nodes3[leaf].tolist() == [n for n, _ in path]
        assert right3[leaf].tolist() == [r for _, r in path]
    assert F.num_internal_nodes(9) == 511 and F.num_leaves(9) == 512
    below = F.subtree_leaves(2)
    assert below.tolist() == [[True] * 4, [True, True, False, False], [False, False, True, True]]


# --------------------------------------------------------------------------
# routing and soft output
# --------------------------------------------------------------------------


def test_log1mexp_values_zero_and_gradient():
    x = torch.tensor([0.0, 1e-7, 0.3, math.log(2), 0.7, 5.0, 1e4], dtype=torch.float64, requires_grad=True)
    y = F.log1mexp(x)
    assert y[0].item() == -math.inf
    for xi, yi in zip(x.tolist()[1:], y.tolist()[1:]):
        assert yi == pytest.approx(math.log(-math.expm1(-xi)), rel=1e-12, abs=1e-300)
    y[1:].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].item() == 0.0


def test_routing_probabilities_sum_to_one():
    g = _gen(1)
    d = torch.rand(5, 15, generator=g, dtype=torch.float64) * 3
    d[0, :] = 0.0  # all mass on the all-right leaf
    d[1, 3] = 1e4
    log_pi = F.leaf_log_probabilities(d, 4)
    assert log_pi.shape == (5, 16)
    torch.testing.assert_close(log_pi.exp().sum(dim=1), torch.ones(5, dtype=torch.float64))
    assert log_pi[0, 15].item() == 0.0 and (log_pi[0, :15] == -math.inf).all()


def test_soft_output_equals_brute_force_path_enumeration_depth3():
    g = _gen(2)
    depth, k = 3, 4
    d = torch.rand(3, 7, generator=g, dtype=torch.float64) * 2
    theta = torch.randn(8, k, generator=g, dtype=torch.float64) * 2
    log_pi = F.leaf_log_probabilities(d, depth)
    log_y, y = F.soft_output(log_pi, theta)
    for b in range(3):
        pi = _brute_pi(d[b].tolist(), depth)
        for leaf in range(8):
            assert log_pi[b, leaf].exp().item() == pytest.approx(pi[leaf], rel=1e-12)
        for c in range(k):
            expected = sum(pi[leaf] * _softmax_row(theta[leaf].tolist())[c] for leaf in range(8))
            assert y[b, c].item() == pytest.approx(expected, rel=1e-12)
            assert log_y[b, c].item() == pytest.approx(math.log(expected), rel=1e-12)


def test_no_nan_at_depth_9_with_saturated_similarities():
    depth, k = 9, 3
    n = F.num_internal_nodes(depth)
    theta = torch.randn(F.num_leaves(depth), k, generator=_gen(3), dtype=torch.float64)
    d = torch.stack([torch.zeros(n), torch.full((n,), 1e4), torch.where(torch.arange(n) % 2 == 0, 0.0, 1e4)])
    for dtype in (torch.float32, torch.float64):
        dd = d.to(dtype).clone().requires_grad_(True)
        log_pi = F.leaf_log_probabilities(dd, depth)
        log_y, y = F.soft_output(log_pi, theta.to(dtype))
        assert not torch.isnan(log_pi).any() and not torch.isnan(log_y).any()
        torch.testing.assert_close(y.sum(dim=1), torch.ones(3, dtype=dtype))
        # d = 0 everywhere: everything goes right, to the last leaf; d = 1e4: to leaf 0
        torch.testing.assert_close(log_y[0], torch.log_softmax(theta[-1].to(dtype), 0))
        torch.testing.assert_close(log_y[1], torch.log_softmax(theta[0].to(dtype), 0))
        targets = torch.tensor([0, 1, 2])
        (-log_y.gather(1, targets.unsqueeze(1))).sum().backward()
        assert torch.isfinite(dd.grad).all()
        new = F.derivative_free_leaf_update(
            theta.to(dtype), theta.to(dtype), 5, log_pi.detach(), log_y.detach(), targets
        )
        assert torch.isfinite(new).all()


# --------------------------------------------------------------------------
# derivative-free update
# --------------------------------------------------------------------------


def test_derivative_free_update_by_hand():
    # depth 1: one node, leaves 0 (left) and 1 (right); K = 2.
    # x1: d = ln 2 -> s = 1/2, pi = [1/2, 1/2];   x2: d = ln 4 -> s = 1/4, pi = [3/4, 1/4].
    # theta = [[0, ln 3], [ln 3, 0]] -> softmax: leaf 0 [1/4, 3/4], leaf 1 [3/4, 1/4].
    # y_hat(x1) = 1/2 [1/4, 3/4] + 1/2 [3/4, 1/4] = [1/2, 1/2]
    # y_hat(x2) = 3/4 [1/4, 3/4] + 1/4 [3/4, 1/4] = [3/8, 5/8]
    # labels y1 = 0, y2 = 1:
    # u[0] = [1/2 * 1/4 / (1/2), 3/4 * 3/4 / (5/8)] = [0.25, 0.9]
    # u[1] = [1/2 * 3/4 / (1/2), 1/4 * 1/4 / (5/8)] = [0.75, 0.1]
    # theta_start = [[0, 2], [4, 0]], n_batches = 2:
    # relu(theta - theta_start / 2) = relu([[0, ln 3 - 1], [ln 3 - 2, 0]]) = [[0, ln 3 - 1], [0, 0]]
    # new theta = [[0.25, ln 3 - 1 + 0.9], [0.75, 0.1]]
    ln3 = math.log(3.0)
    d = torch.tensor([[math.log(2.0)], [math.log(4.0)]], dtype=torch.float64)
    theta = torch.tensor([[0.0, ln3], [ln3, 0.0]], dtype=torch.float64)
    start = torch.tensor([[0.0, 2.0], [4.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([0, 1])
    log_pi = F.leaf_log_probabilities(d, 1)
    log_y, y = F.soft_output(log_pi, theta)
    torch.testing.assert_close(y, torch.tensor([[0.5, 0.5], [0.375, 0.625]], dtype=torch.float64))
    u = F.leaf_update_terms(theta, log_pi, log_y, targets)
    torch.testing.assert_close(u, torch.tensor([[0.25, 0.9], [0.75, 0.1]], dtype=torch.float64))
    new = F.derivative_free_leaf_update(theta, start, 2, log_pi, log_y, targets)
    torch.testing.assert_close(new, torch.tensor([[0.25, ln3 - 1 + 0.9], [0.75, 0.1]], dtype=torch.float64))


# --------------------------------------------------------------------------
# deterministic modes
# --------------------------------------------------------------------------


def test_greedy_equals_hand_written_traversal_and_sample_max_equals_best_path():
    g = _gen(4)
    depth, k = 3, 5
    d = torch.rand(40, 7, generator=g, dtype=torch.float64) * 1.5
    d[(d - math.log(2)).abs() < 1e-3] += 0.01  # keep clear of the s = 0.5 boundary
    theta = torch.randn(8, k, generator=g, dtype=torch.float64)
    log_d, leaf, length = F.greedy_prediction(d, theta, depth)
    log_pi = F.leaf_log_probabilities(d, depth)
    sm_d, sm_leaf, sm_len = F.sample_max_prediction(log_pi, theta)
    for b in range(40):
        node = 0
        for _ in range(depth):  # right iff s = exp(-d) > 0.5
            node = 2 * node + 2 if math.exp(-d[b, node].item()) > 0.5 else 2 * node + 1
        assert leaf[b].item() == node - 7
        torch.testing.assert_close(log_d[b], torch.log_softmax(theta[node - 7], 0))
        pi = _brute_pi(d[b].tolist(), depth)
        assert sm_leaf[b].item() == max(range(8), key=lambda i: pi[i])
        torch.testing.assert_close(sm_d[b], torch.log_softmax(theta[sm_leaf[b]], 0))
    assert (length == 3).all() and (sm_len == 3).all()
    assert F.mean_path_length(length) == 3.0
    assert len(set(leaf.tolist())) > 3  # the inputs reach several leaves


# --------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------


class _Node:
    def __init__(self, heap: int, n_internal: int):
        self.heap = heap
        self.is_leaf = heap >= n_internal
        self.l = self.r = None


def _authors_pruned_tree(leaf_max: list[float], depth: int, threshold: float) -> _Node:
    """The authors' pruning procedure, written out on an explicit linked tree.

    Mark every node whose leaves all have max probability <= threshold; drop
    from the list the nodes below a marked non-root node; for each remaining
    node whose parent is not the root, put its sibling in the parent's place.
    """
    n = 2**depth - 1
    nodes = [_Node(h, n) for h in range(2 * n + 1)]
    parent = {0: None}
    for i in range(n):
        nodes[i].l, nodes[i].r = nodes[2 * i + 1], nodes[2 * i + 2]
        parent[2 * i + 1], parent[2 * i + 2] = i, i

    def leaves(h):
        return [h] if h >= n else leaves(2 * h + 1) + leaves(2 * h + 2)

    marked = [h for h in range(2 * n + 1) if all(leaf_max[x - n] <= threshold for x in leaves(h))]
    assert 0 not in marked
    to_prune = list(marked)
    for h in marked:
        if h > 0 and h < n:
            for x in range(2 * n + 1):
                below = x
                while below is not None and below != h:
                    below = parent[below]
                if below == h and x != h and x in to_prune:
                    to_prune.remove(x)
    for h in to_prune:
        p = parent[h]
        if p > 0:
            g = parent[p]
            sibling = nodes[p].r if nodes[p].l is nodes[h] else nodes[p].l
            if nodes[g].l is nodes[p]:
                nodes[g].l = sibling
            else:
                nodes[g].r = sibling
            parent[sibling.heap] = g
    return nodes[0]


def _rewired_pi(root: _Node, d: list[float], n: int) -> dict[int, float]:
    out = {}

    def walk(node, p):
        if node.is_leaf:
            out[node.heap - n] = p
            return
        s = math.exp(-d[node.heap])
        walk(node.l, p * (1 - s))
        walk(node.r, p * s)

    walk(root, 1.0)
    return out


def _rewired_greedy(root: _Node, d: list[float], n: int) -> tuple[int, int]:
    node, steps = root, 0
    while not node.is_leaf:
        node = node.r if math.exp(-d[node.heap]) > 0.5 else node.l
        steps += 1
    return node.heap - n, steps


def _pruning_theta(k: int = 120) -> torch.Tensor:
    # leaves 2, 3 (all of node 4's subtree) and 6 are flat: max 1/120 <= 0.01
    theta = torch.zeros(8, k, dtype=torch.float64)
    for leaf, c in ((0, 3), (1, 5), (4, 7), (5, 3), (7, 9)):
        theta[leaf, c] = 10.0  # max probability ~0.995
    return theta


def test_prune_rule_on_a_depth3_tree():
    theta = _pruning_theta()
    p = F.prune(torch.softmax(theta, 1), 0.01)
    # node 4 (leaves 2, 3) removed -> its parent 1 routes left to node 3;
    # leaf 6 (heap 13) removed -> its parent 6 routes right to leaf 7
    assert p.removed == (4, 13)
    assert p.forced.tolist() == [-1, 0, -1, -1, -1, -1, 1]
    assert p.node_kept.tolist() == [True, False, True, True, False, True, False]
    assert p.leaf_kept.tolist() == [True, True, False, False, True, True, False, True]
    assert F.leaf_path_lengths(3, p.forced).tolist() == [2, 2, -1, -1, 3, 3, -1, 2]
    # a marked child of the root is left alone, and so is everything below it
    theta2 = _pruning_theta()
    theta2[0:4] = 0.0
    p2 = F.prune(torch.softmax(theta2, 1), 0.01)
    assert p2.removed == (6 + 7,) and p2.forced.tolist() == [-1, -1, -1, -1, -1, -1, 1]
    # every leaf flat: nothing pruned
    p3 = F.prune(torch.softmax(torch.zeros(8, 120), 1), 0.01)
    assert p3.removed == () and p3.leaf_kept.all() and (p3.forced == -1).all()


def test_pruning_keeps_predictions_of_kept_paths_and_matches_the_rewired_tree():
    depth, n = 3, 7
    theta = _pruning_theta()
    theta += torch.randn(theta.shape, generator=_gen(5), dtype=torch.float64) * 0.01
    probs = torch.softmax(theta, 1)
    p = F.prune(probs, 0.01)
    root = _authors_pruned_tree(probs.amax(1).tolist(), depth, 0.01)
    d = torch.rand(64, n, generator=_gen(6), dtype=torch.float64) * 1.4
    d[(d - math.log(2)).abs() < 1e-3] += 0.01
    log_pi = F.leaf_log_probabilities(d, depth, p.forced)
    _, y = F.soft_output(log_pi, theta)
    full_d, full_leaf, _ = F.greedy_prediction(d, theta, depth)
    gd, gleaf, glen = F.greedy_prediction(d, theta, depth, p.forced)
    _, sleaf, slen = F.sample_max_prediction(log_pi, theta, F.leaf_path_lengths(depth, p.forced))
    kept_routes = 0
    for b in range(64):
        pi = _rewired_pi(root, d[b].tolist(), n)
        assert sorted(pi) == [i for i in range(8) if p.leaf_kept[i]]
        for leaf in range(8):
            assert log_pi[b, leaf].exp().item() == pytest.approx(pi.get(leaf, 0.0), rel=1e-12, abs=0.0)
        for c in range(theta.shape[1]):
            expected = sum(pi[leaf] * probs[leaf, c].item() for leaf in pi)
            assert y[b, c].item() == pytest.approx(expected, rel=1e-10)
        assert (gleaf[b].item(), glen[b].item()) == _rewired_greedy(root, d[b].tolist(), n)
        best = max(pi, key=lambda i: pi[i])
        assert sleaf[b].item() == best and slen[b].item() == F.leaf_path_lengths(depth, p.forced)[best]
        if p.leaf_kept[full_leaf[b]]:  # the unpruned greedy path ends at a kept leaf: unchanged
            kept_routes += 1
            assert gleaf[b].item() == full_leaf[b].item()
            torch.testing.assert_close(gd[b], full_d[b])
    assert 0 < kept_routes < 64


# --------------------------------------------------------------------------
# projection
# --------------------------------------------------------------------------


def test_projection_equals_brute_force_over_all_patches():
    g = _gen(7)
    k = 4
    # leaf argmax classes 0, 1, 2, 2 -> node 0: {0,1,2}, node 1: {0,1}, node 2: {2}; class 3 nowhere
    theta = torch.zeros(4, k)
    for leaf, c in enumerate((0, 1, 2, 2)):
        theta[leaf, c] = 3.0
    allowed = F.projection_allowed_classes(torch.softmax(theta, 1))
    assert allowed.tolist() == [[True, True, True, False], [True, True, False, False], [False, False, True, False]]
    protos = torch.rand(3, 5, generator=g, dtype=torch.float64)
    batches = []
    for i in range(3):
        z = torch.rand(4, 5, 2, 3, generator=g, dtype=torch.float64)
        labels = torch.randint(0, k, (4,), generator=g)
        batches.append((z, labels, torch.arange(4) + 10 * i))
    batches[0][1][:] = 3  # a batch of a class no node accepts
    batches[1][0][2, :, 1, 0] = protos[2]  # an exact match ...
    batches[1][1][2] = 2  # ... in an image of an allowed class
    proj = F.ProtoTreeProjector(protos, allowed)
    for z, labels, ids in batches:
        proj.update(z, labels, ids)
    res = proj.result()
    for j in range(3):
        best = (math.inf, None)
        for z, labels, ids in batches:
            for b in range(4):
                if not allowed[j, labels[b]]:
                    continue
                for h in range(2):
                    for w in range(3):
                        dist = math.sqrt(sum((z[b, c, h, w].item() - protos[j, c].item()) ** 2 for c in range(5)))
                        if dist < best[0] - 1e-12:
                            best = (dist, (ids[b].item(), h, w, z[b, :, h, w]))
        assert res.found[j]
        assert res.distance[j].item() == pytest.approx(best[0], abs=1e-6)
        assert (res.sample_id[j].item(), res.h[j].item(), res.w[j].item()) == best[1][:3]
        torch.testing.assert_close(res.prototypes[j], best[1][3])
    assert (res.sample_id[2].item(), res.h[2].item(), res.w[2].item()) == (12, 1, 0)
    # no allowed image at all: the prototype is kept and marked not found
    lone = F.ProtoTreeProjector(protos, torch.zeros(3, k, dtype=torch.bool))
    lone.update(*batches[1])
    assert not lone.result().found.any() and torch.equal(lone.result().prototypes, protos)


def test_projection_allowed_classes_follow_the_pruned_tree():
    theta = _pruning_theta()
    probs = torch.softmax(theta, 1)
    p = F.prune(probs, 0.01)
    allowed = F.projection_allowed_classes(probs, p.node_kept, p.leaf_kept)
    # kept leaves: 0 -> 3, 1 -> 5, 4 -> 7, 5 -> 3, 7 -> 9; flat leaves have argmax 0
    expect = {0: {3, 5, 7, 9}, 1: {3, 5, 0}, 2: {7, 3, 9}, 3: {3, 5}, 4: {0}, 5: {7, 3}, 6: {0, 9}}
    # node 1 (bypassed) and 4, 6 (removed / bypassed) keep their original subtrees
    for i, classes in expect.items():
        assert set(torch.nonzero(allowed[i]).flatten().tolist()) == classes, i


# --------------------------------------------------------------------------
# the head
# --------------------------------------------------------------------------


def _head(seed: int = 8, **kw) -> ProtoTreeHead:
    torch.manual_seed(seed)
    return ProtoTreeHead(6, 4, depth=kw.pop("depth", 3), prototype_depth=5, **kw)


def test_head_shapes_init_and_params():
    head = _head()
    f = torch.randn(3, 6, 2, 3)
    out = head(f)
    assert tuple(out) == ProtoTreeHead.outputs
    assert out["logits"].shape == (3, 4) and out["min_distances"].shape == (3, 7)
    assert out["leaf_log_probabilities"].shape == (3, 8) and out["features"].shape == (3, 5, 2, 3)
    assert out["logits"] is out["log_probabilities"]
    torch.testing.assert_close(out["logits"].exp().sum(1), torch.ones(3))
    # cross-entropy on the logits is the NLL of log y_hat
    y = torch.tensor([0, 1, 3])
    torch.testing.assert_close(
        torch.nn.functional.cross_entropy(out["logits"], y), torch.nn.functional.nll_loss(out["log_probabilities"], y)
    )
    assert head.record_meta(out) == {"H": 2, "W": 3, "tree_depth": 3, "soft_path_length": 3}
    conv = head.add_on[0]
    assert conv.bias is None and isinstance(head.add_on[1], torch.nn.Sigmoid)
    assert head.prototypes.shape == (7, 5) and head.leaves.shape == (8, 4)
    assert not head.leaves.requires_grad and torch.equal(head.leaves, torch.zeros(8, 4))
    big = ProtoTreeHead(6, 4, depth=9, prototype_depth=64)
    assert abs(big.prototypes.mean().item() - 0.5) < 0.01 and abs(big.prototypes.std().item() - 0.1) < 0.01
    grad = _head(leaves="gradient")
    assert grad.leaves.requires_grad and grad.leaves.abs().sum() > 0
    for bad in ({"depth": 0}, {"prototype_depth": 0}, {"leaves": "other"}):
        params = {"depth": 3, "prototype_depth": 5, "leaves": "derivative_free", **bad}
        with pytest.raises(ValueError) as err:
            ProtoTreeHead.check_params(params)
        assert err.value.args[0] == next(iter(bad))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(f)
    assert out["min_distances"].dtype == torch.float32 and out["logits"].dtype == torch.float32


def test_head_soft_output_equals_the_authors_formulas():
    """Authors' probability-space forward, written out: d = sqrt(|‖z‖² + ‖p‖² − 2 z·p| + 1e-14),
    min over patches, s = exp(−d), a node's output = (1 − s)·left + s·right, a leaf's
    output = softmax(θ); sample_max = the leaf with the largest path product; greedy =
    right iff s > 0.5."""
    head = _head(9)
    with torch.no_grad():
        head.leaves.copy_(torch.randn(8, 4, generator=_gen(10)) * 3)
    f = torch.randn(3, 6, 2, 3, generator=_gen(11))
    out = head(f)
    z = head.latent(f).detach().double()
    protos = head.prototypes.detach().double()
    theta = head.leaves.detach().double()
    for b in range(3):
        d = []
        for j in range(7):
            patches = []
            for h in range(2):
                for w in range(3):
                    x = z[b, :, h, w]
                    sq = (x * x).sum() + (protos[j] * protos[j]).sum() - 2 * (x * protos[j]).sum()
                    patches.append(math.sqrt(abs(sq.item()) + 1e-14))
            d.append(min(patches))
        assert out["min_distances"][b].tolist() == pytest.approx(d, abs=1e-6)

        def node_out(i, d=d):
            if i >= 7:
                return torch.softmax(theta[i - 7] - theta[i - 7].max(), 0)
            s = math.exp(-d[i])
            return (1 - s) * node_out(2 * i + 1) + s * node_out(2 * i + 2)

        torch.testing.assert_close(out["log_probabilities"][b].exp().double(), node_out(0), atol=1e-6, rtol=0)
        pas = _brute_pi(d, 3)
        sm = head.predict(f, "sample_max")
        assert sm["leaf"][b].item() == max(range(8), key=lambda i: pas[i])
        node = 0
        while node < 7:
            node = 2 * node + 2 if math.exp(-d[node]) > 0.5 else 2 * node + 1
        gr = head.predict(f, "greedy")
        assert gr["leaf"][b].item() == node - 7
        torch.testing.assert_close(gr["log_probabilities"][b].double().exp(), node_out(node), atol=1e-6, rtol=0)
    soft = head.predict(f, "soft")
    torch.testing.assert_close(soft["log_probabilities"], out["logits"].detach())
    assert (soft["path_length"] == 3).all() and (soft["leaf"] == -1).all()


def _expected_update(theta, start, n_batches, micro):
    """relu(θ − θ_start/n) + Σ over micro-batches and samples of π_l·softmax(θ_l)_y / ŷ_y at class y."""
    new = torch.relu(theta.double() - start.double() / n_batches)
    for out, targets in micro:
        pi = out["leaf_log_probabilities"].detach().double().exp()
        y_hat = out["log_probabilities"].detach().double().exp()
        for b, y in enumerate(targets.tolist()):
            for leaf in range(theta.shape[0]):
                sm = _softmax_row(theta[leaf].double().tolist())
                new[leaf, y] += pi[b, leaf].item() * sm[y] / y_hat[b, y].item()
    return new


def test_head_hooks_apply_the_update_once_per_call():
    head = _head(12)
    with torch.no_grad():
        head.leaves.copy_(torch.rand(8, 4, generator=_gen(13)) * 2)
    head.train()
    head.on_epoch_start(SimpleNamespace(epoch=0, num_batches=3))
    theta0 = head.leaves.detach().clone()
    torch.testing.assert_close(head.leaves_epoch_start, theta0)
    g = _gen(14)

    def micro_steps():
        steps = []
        for _ in range(2):
            out = head(torch.randn(3, 6, 2, 3, generator=g))
            assert out["logits"].requires_grad  # still attached to autograd
            steps.append(SimpleNamespace(outputs=out, targets=torch.randint(0, 4, (3,), generator=g)))
        return steps

    steps = micro_steps()
    head.on_optimizer_step(SimpleNamespace(steps=steps, num_batches=3))
    expected1 = _expected_update(theta0, theta0, 3, [(s.outputs, s.targets) for s in steps])
    torch.testing.assert_close(head.leaves.double(), expected1, rtol=1e-5, atol=1e-6)
    theta1 = head.leaves.detach().clone()
    steps = micro_steps()
    head.on_optimizer_step(SimpleNamespace(steps=steps, num_batches=3))
    expected2 = _expected_update(theta1, theta0, 3, [(s.outputs, s.targets) for s in steps])
    torch.testing.assert_close(head.leaves.double(), expected2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.leaves_epoch_start, theta0)
    # not training, or leaves trained by gradient: no update
    theta2 = head.leaves.detach().clone()
    head.eval()
    head.on_optimizer_step(SimpleNamespace(steps=micro_steps(), num_batches=3))
    assert torch.equal(head.leaves, theta2)
    grad_head = _head(15, leaves="gradient").train()
    before = grad_head.leaves.detach().clone()
    out = grad_head(torch.randn(2, 6, 2, 3))
    grad_head.on_optimizer_step(
        SimpleNamespace(steps=[SimpleNamespace(outputs=out, targets=torch.tensor([0, 1]))], num_batches=3)
    )
    assert torch.equal(grad_head.leaves, before)


def test_head_prune_and_projection_helpers():
    torch.manual_seed(16)
    head = ProtoTreeHead(6, 120, depth=3, prototype_depth=5)
    with torch.no_grad():
        head.leaves.copy_(_pruning_theta())
    f = torch.randn(5, 6, 2, 3, generator=_gen(17))
    pruning = head.prune(0.01)
    assert pruning.removed == (4, 13) and head.pruning.removed == (4, 13)
    assert torch.equal(head.forced, pruning.forced) and torch.equal(head.pruning.node_kept, pruning.node_kept)
    out = head(f)
    assert (out["leaf_log_probabilities"][:, ~head.leaf_kept] == -math.inf).all()
    torch.testing.assert_close(out["leaf_log_probabilities"].exp().sum(1), torch.ones(5))
    assert head.path_lengths().tolist() == [2, 2, -1, -1, 3, 3, -1, 2]
    assert (head.predict(f, "soft")["path_length"] == 3).all()
    assert head.state_dict()["forced"].tolist() == [-1, 0, -1, -1, -1, -1, 1]
    proj = head.projector()
    z = head.latent(f).detach()
    labels = torch.tensor([3, 5, 7, 9, 0])
    proj.update(z, labels, torch.arange(5))
    res = proj.result()
    head.apply_projection(res)
    for j in range(7):
        if res.found[j]:
            torch.testing.assert_close(head.prototypes[j].detach(), z[res.sample_id[j], :, res.h[j], res.w[j]])
