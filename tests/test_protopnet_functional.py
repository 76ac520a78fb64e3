"""Tests for plugins/kdt_proto2proto/functional.py (spec §1 and §3).

Small, seeded tensors; values checked against brute-force loops or numbers
worked out by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from types import SimpleNamespace

from kdt_proto2proto import functional as _distillation
from kdt_protopnet import functional as _protopnet
from kdt_prototree.functional import l2_distances

F = SimpleNamespace(**{**vars(_protopnet), **vars(_distillation), "l2_distances": l2_distances})


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------
# distances
# --------------------------------------------------------------------------


def _brute_sq_distances(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    b, _, h, w = z.shape
    out = torch.empty(b, p.shape[0], h, w, dtype=z.dtype)
    for bi in range(b):
        for j in range(p.shape[0]):
            for hi in range(h):
                for wi in range(w):
                    out[bi, j, hi, wi] = ((z[bi, :, hi, wi] - p[j]) ** 2).sum()
    return out


def test_squared_l2_distances_match_brute_force():
    g = _gen(1)
    z = torch.rand(2, 5, 3, 4, generator=g, dtype=torch.float64)
    p = torch.rand(6, 5, generator=g, dtype=torch.float64)
    d = F.squared_l2_distances(z, p)
    assert d.shape == (2, 6, 3, 4)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, _brute_sq_distances(z, p))
    # [P, D, 1, 1] layout gives the same result
    torch.testing.assert_close(F.squared_l2_distances(z, p.view(6, 5, 1, 1)), d)


def test_squared_l2_distances_clamped_at_zero_on_exact_patch():
    g = _gen(2)
    # values chosen so that the expansion ||z||^2 - 2<z,p> + ||p||^2 rounds
    # below zero in float32 for some patches; with the clamp all stay >= 0
    z = torch.rand(3, 16, 4, 4, generator=g) * 100.0 + 1000.0
    p = z[:, :, 1, 2].clone()  # every prototype equals one patch exactly
    d = F.squared_l2_distances(z, p)
    assert (d >= 0).all()
    for j in range(3):
        assert d[j, j, 1, 2].item() == pytest.approx(0.0, abs=1.0)
    # an exact zero patch with an exact zero prototype is exactly zero
    z0 = torch.zeros(1, 3, 2, 2)
    assert F.squared_l2_distances(z0, torch.zeros(1, 3)).eq(0).all()


def test_squared_l2_distances_depth_mismatch():
    with pytest.raises(ValueError):
        F.squared_l2_distances(torch.rand(1, 4, 2, 2), torch.rand(3, 5))


def test_l2_distances_is_sqrt_of_squared():
    g = _gen(3)
    z = torch.rand(2, 4, 3, 3, generator=g, dtype=torch.float64)
    p = torch.rand(5, 4, generator=g, dtype=torch.float64)
    expected = torch.sqrt(_brute_sq_distances(z, p) + 1e-14)
    torch.testing.assert_close(F.l2_distances(z, p), expected)
    # finite gradient when a prototype equals a patch
    p2 = z[0, :, 0, 0].clone().unsqueeze(0).requires_grad_(True)
    F.l2_distances(z, p2).sum().backward()
    assert torch.isfinite(p2.grad).all()


# --------------------------------------------------------------------------
# min-pool and similarity
# --------------------------------------------------------------------------


def test_min_pool_matches_brute_force_with_ties():
    g = _gen(4)
    # small integer values -> many ties
    d = torch.randint(0, 3, (3, 4, 3, 5), generator=g).float()
    values, idx = F.min_pool_distances(d)
    assert values.shape == (3, 4) and idx.shape == (3, 4)
    assert idx.dtype == torch.int64
    ties_seen = 0
    for b in range(3):
        for j in range(4):
            best_v, best_i = math.inf, -1
            count_min = 0
            for h in range(3):
                for w in range(5):
                    v = d[b, j, h, w].item()
                    if v < best_v:
                        best_v, best_i = v, h * 5 + w
            count_min = int((d[b, j] == best_v).sum())
            ties_seen += count_min > 1
            assert values[b, j].item() == best_v
            assert idx[b, j].item() == best_i  # lowest flat index among ties
    assert ties_seen > 0  # the example really exercises ties


def test_min_pool_tie_lowest_index_explicit():
    d = torch.tensor([[[[5.0, 1.0, 3.0], [1.0, 2.0, 1.0]]]])  # [1,1,2,3]
    values, idx = F.min_pool_distances(d)
    assert values.item() == 1.0
    assert idx.item() == 1  # locations 1, 3, 5 tie; 1 = h*W+w with h=0, w=1


def test_min_pool_gradient_to_chosen_location_only():
    d = torch.tensor([[[[2.0, 1.0], [1.0, 3.0]]]], requires_grad=True)
    values, _ = F.min_pool_distances(d)
    values.sum().backward()
    assert d.grad.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


def test_distance_to_similarity():
    d = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    s = F.distance_to_similarity(d, "log")
    # log((0+1)/(0+1e-4)) = log(1e4); log(2/1.0001); log(4/3.0001)
    expected = torch.tensor([math.log(1e4), math.log(2 / 1.0001), math.log(4 / 3.0001)], dtype=torch.float64)
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(
        F.distance_to_similarity(d, "log", eps=0.5),
        torch.tensor([math.log(2.0), math.log(2 / 1.5), math.log(4 / 3.5)], dtype=torch.float64),
    )
    assert F.distance_to_similarity(d, "linear").tolist() == [-0.0, -1.0, -3.0]
    with pytest.raises(ValueError):
        F.distance_to_similarity(d, "cosine")


# --------------------------------------------------------------------------
# class identity, last layer, ProtoPNet losses
# --------------------------------------------------------------------------


def test_prototype_class_identity_and_last_layer_init():
    ident = F.prototype_class_identity(3, 2)
    assert ident.shape == (6, 3)
    assert ident.dtype == torch.get_default_dtype()
    assert ident.argmax(1).tolist() == [0, 0, 1, 1, 2, 2]
    assert ident.sum(1).tolist() == [1.0] * 6
    w = F.last_layer_init(ident)
    assert w.shape == (3, 6)
    assert w.tolist() == [
        [1.0, 1.0, -0.5, -0.5, -0.5, -0.5],
        [-0.5, -0.5, 1.0, 1.0, -0.5, -0.5],
        [-0.5, -0.5, -0.5, -0.5, 1.0, 1.0],
    ]
    assert F.last_layer_init(ident, incorrect_strength=0.0).sum().item() == 6.0
    with pytest.raises(ValueError):
        F.prototype_class_identity(0, 2)


def _tiny_example():
    # K = 2 classes, 2 prototypes each: prototypes 0,1 -> class 0; 2,3 -> class 1
    ident = F.prototype_class_identity(2, 2)
    dmin = torch.tensor(
        [
            [4.0, 2.0, 7.0, 5.0],  # image 0, class 0
            [1.0, 9.0, 6.0, 3.0],  # image 1, class 1
            [8.0, 6.0, 0.5, 9.0],  # image 2, class 0
        ]
    )
    targets = torch.tensor([0, 1, 0])
    return ident, dmin, targets


def test_cluster_loss_by_hand():
    ident, dmin, targets = _tiny_example()
    # own-class minima: image0 min(4,2)=2; image1 min(6,3)=3; image2 min(8,6)=6
    # mean = (2 + 3 + 6) / 3 = 11/3
    assert F.cluster_loss(dmin, targets, ident).item() == pytest.approx(11 / 3)


def test_separation_loss_by_hand():
    ident, dmin, targets = _tiny_example()
    # other-class minima: image0 min(7,5)=5; image1 min(1,9)=1; image2 min(0.5,9)=0.5
    # mean = (5 + 1 + 0.5) / 3 = 6.5/3 (positive; the recipe weight is negative)
    assert F.separation_loss(dmin, targets, ident).item() == pytest.approx(6.5 / 3)


def test_cluster_separation_gradients_hit_the_chosen_prototype():
    ident, dmin, targets = _tiny_example()
    dmin = dmin.clone().requires_grad_(True)
    F.cluster_loss(dmin, targets, ident).backward()
    expected = torch.zeros(3, 4)
    expected[0, 1] = expected[1, 3] = expected[2, 1] = 1 / 3
    torch.testing.assert_close(dmin.grad, expected)


def test_last_layer_l1_by_hand():
    ident = F.prototype_class_identity(2, 2)
    w = torch.tensor([[1.0, 2.0, -3.0, 4.0], [-5.0, 6.0, 7.0, -8.0]])
    # off-class entries: row 0 (class 0) cols 2,3 -> |-3|+|4| = 7
    #                    row 1 (class 1) cols 0,1 -> |-5|+|6| = 11 ; total 18
    assert F.last_layer_l1(w, ident).item() == pytest.approx(18.0)
    assert F.last_layer_l1(F.last_layer_init(ident), ident).item() == pytest.approx(4 * 0.5)
    with pytest.raises(ValueError):
        F.last_layer_l1(w.t(), ident)


# --------------------------------------------------------------------------
# Proto2Proto losses
# --------------------------------------------------------------------------


def test_global_explanation_loss_by_hand():
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    s = torch.tensor([[3.0, 4.0], [4.0, 5.0], [2.0, 2.0]])
    # distances 5 (3-4-5), 5 (3-4-5 shifted), 0 -> mean 10/3
    assert F.global_explanation_loss(s, t).item() == pytest.approx(10 / 3)
    # [P, D, 1, 1] layout, mixed with [P, D]
    assert F.global_explanation_loss(s.view(3, 2, 1, 1), t.view(3, 2, 1, 1)).item() == pytest.approx(10 / 3)
    assert F.global_explanation_loss(s.view(3, 2, 1, 1), t).item() == pytest.approx(10 / 3)
    # 4-D example with D = 3: (2, 3, 6) -> 7 ; (0, 0, 0) -> 0 ; mean 3.5
    t3 = torch.zeros(2, 3, 1, 1)
    s3 = torch.tensor([[2.0, 3.0, 6.0], [0.0, 0.0, 0.0]]).view(2, 3, 1, 1)
    assert F.global_explanation_loss(s3, t3).item() == pytest.approx(3.5)


def test_global_explanation_loss_gradient_finite_and_teacher_frozen():
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    s = torch.tensor([[3.0, 4.0], [1.0, 1.0]], requires_grad=True)  # second pair identical
    F.global_explanation_loss(s, t).backward()
    assert torch.isfinite(s.grad).all()
    # d/ds of ||s - t|| / P = (s - t) / ||s - t|| / 2 for pair 0, 0 for pair 1
    torch.testing.assert_close(s.grad, torch.tensor([[0.3, 0.4], [0.0, 0.0]]))
    assert t.grad is None


def test_global_explanation_loss_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(4, 2\)"):
        F.global_explanation_loss(torch.rand(3, 2), torch.rand(4, 2))
    with pytest.raises(ValueError):
        F.global_explanation_loss(torch.rand(3, 2, 1, 1), torch.rand(3, 5, 1, 1))


def test_active_patch_mask_by_hand():
    # B = 2, P = 3, grid 2 x 3
    dmin = torch.tensor([[1.0, 2.0, 0.5], [3.0, 2.0, 9.0]])
    argm = torch.tensor([[4, 4, 0], [5, 1, 2]])
    m = F.active_patch_mask(dmin, argm, 2, 3, tau=2.0)
    assert m.dtype == torch.bool and m.shape == (2, 2, 3)
    # image 0: proto 0 (1.0<2) at 4 -> (1,1); proto 1 (2.0, not < 2) shares 4;
    #          proto 2 (0.5<2) at 0 -> (0,0).  image 1: nothing < 2.
    assert m.tolist() == [
        [[True, False, False], [False, True, False]],
        [[False, False, False], [False, False, False]],
    ]
    # tau = inf: every prototype active; image 0 -> {4, 0}, image 1 -> {5, 1, 2}
    m_inf = F.active_patch_mask(dmin, argm, 2, 3, tau=math.inf)
    assert m_inf.tolist() == [
        [[True, False, False], [False, True, False]],
        [[False, True, True], [False, False, True]],
    ]
    # strict: tau equal to a distance excludes it; just above includes it
    assert F.active_patch_mask(dmin, argm, 2, 3, tau=3.0)[1].sum().item() == 1  # proto 1 only
    assert F.active_patch_mask(dmin, argm, 2, 3, tau=3.0001)[1].sum().item() == 2
    with pytest.raises(ValueError):
        F.active_patch_mask(dmin, argm, 2, 2, tau=1.0)  # index 5 out of a 2x2 grid


def _original_ppc_mask(distances, tau):
    """The original code's mask: max-pool of -d, equality with -d, threshold, any over prototypes."""
    scores = torch.nn.functional.max_pool2d(-distances, kernel_size=distances.shape[2:])
    return ((scores == -distances) & (distances < tau)).any(dim=1)


def test_ppc_mask_with_all_ties_equals_the_original_and_differs_from_first_on_flat_regions():
    g = _gen(11)
    d = torch.rand(3, 5, 4, 4, generator=g) * 4
    d[0, 1] = 0.7  # a constant map: every location ties (a prototype on a uniform background)
    d[1, 2, :2, :] = 0.1  # ties on the top half only
    dmin, argm = _protopnet.min_pool_distances(d)
    for tau in (0.5, 1.0, 2.0, math.inf):
        all_ties = F.active_patch_mask_all_ties(d, dmin, tau)
        assert torch.equal(all_ties, _original_ppc_mask(d, tau))
        first = F.active_patch_mask(dmin, argm, 4, 4, tau)
        assert torch.equal(all_ties | first, all_ties)  # the first location is one of the tied ones
    assert F.active_patch_mask_all_ties(d, dmin, 1.0)[0].all()  # the flat map masks every location
    assert int(F.active_patch_mask(dmin, argm, 4, 4, 1.0)[1].sum()) < int(
        F.active_patch_mask_all_ties(d, dmin, 1.0)[1].sum()
    )
    d2 = torch.rand(2, 3, 3, 3, generator=g)  # no ties: both masks agree
    m2, a2 = _protopnet.min_pool_distances(d2)
    assert torch.equal(F.active_patch_mask_all_ties(d2, m2, 0.5), F.active_patch_mask(m2, a2, 3, 3, 0.5))
    with pytest.raises(ValueError):
        F.active_patch_mask_all_ties(d2[0], m2, 0.5)


def test_ppc_loss_by_hand():
    zt = torch.zeros(1, 2, 2, 2)
    zs = torch.zeros(1, 2, 2, 2)
    zs[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # ||.||^2 = 25
    zs[0, :, 1, 1] = torch.tensor([1.0, 2.0])  # ||.||^2 = 5
    zs[0, :, 0, 1] = torch.tensor([10.0, 0.0])  # 100, but masked out
    mask = torch.tensor([[[True, False], [False, True]]])
    # (25 + 5) / (2 * 2 + 1) = 6
    assert F.patch_prototype_correspondence_loss(zt, zs, mask).item() == pytest.approx(6.0)
    # empty mask -> 0 / 1 = 0
    assert F.patch_prototype_correspondence_loss(zt, zs, torch.zeros(1, 2, 2, dtype=torch.bool)).item() == 0.0
    # float mask accepted
    assert F.patch_prototype_correspondence_loss(zt, zs, mask.float()).item() == pytest.approx(6.0)


def test_ppc_loss_teacher_gets_no_grad_and_shape_checks():
    g = _gen(5)
    zt = torch.rand(2, 3, 2, 2, generator=g, requires_grad=True)
    zs = torch.rand(2, 3, 2, 2, generator=g, requires_grad=True)
    mask = torch.ones(2, 2, 2, dtype=torch.bool)
    F.patch_prototype_correspondence_loss(zt, zs, mask).backward()
    assert zt.grad is None
    # d/dzs of sum ||zt - zs||^2 / (2*8+1) = 2 (zs - zt) / 17
    torch.testing.assert_close(zs.grad, 2 * (zs - zt).detach() / 17)
    with pytest.raises(ValueError):
        F.patch_prototype_correspondence_loss(zt, torch.rand(2, 3, 2, 3), mask)
    with pytest.raises(ValueError):
        F.patch_prototype_correspondence_loss(zt, zs, torch.ones(2, 2, 3, dtype=torch.bool))


# --------------------------------------------------------------------------
# projection (push)
# --------------------------------------------------------------------------


def _brute_projection(z_all, labels, ids, protos, allowed):
    n, d, h, w = z_all.shape
    out = []
    for j in range(protos.shape[0]):
        best = (math.inf, -1, -1, -1, None)
        for b in range(n):
            if allowed is not None and not bool(allowed[j, labels[b]]):
                continue
            for hi in range(h):
                for wi in range(w):
                    v = z_all[b, :, hi, wi]
                    dist = ((v - protos[j]) ** 2).sum().item()
                    if dist < best[0]:  # strict: first seen wins
                        best = (dist, int(ids[b]), hi, wi, v.clone())
        out.append(best)
    return out


def _stream(proj, z_all, labels, ids, sizes):
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        proj.update(z_all[sl], labels[sl], ids[sl])
        start += size


@pytest.mark.parametrize("use_allowed", [True, False])
def test_projector_streamed_equals_brute_force(use_allowed):
    g = _gen(6)
    k, ppc, d, h, w, n = 3, 2, 4, 3, 3, 11
    ident = F.prototype_class_identity(k, ppc)
    protos = torch.rand(k * ppc, d, generator=g, dtype=torch.float64)
    z_all = torch.rand(n, d, h, w, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[:3] = torch.tensor([0, 1, 2])  # every class present
    ids = torch.arange(100, 100 + n)
    allowed = ident.bool() if use_allowed else None

    proj = F.PrototypeProjector(protos, allowed)
    _stream(proj, z_all, labels, ids, [4, 1, 3, 3])
    res = proj.result()
    expected = _brute_projection(z_all, labels, ids, protos, allowed)

    assert res.found.all()
    for j, (dist, sid, hi, wi, vec) in enumerate(expected):
        assert res.distance[j].item() == pytest.approx(dist)
        assert res.sample_id[j].item() == sid
        assert (res.h[j].item(), res.w[j].item()) == (hi, wi)
        torch.testing.assert_close(res.prototypes[j], vec)
        if use_allowed:
            assert labels[ids.tolist().index(sid)].item() == j // ppc
    # streaming in one batch gives the same answer
    one = F.PrototypeProjector(protos, allowed)
    one.update(z_all, labels, ids)
    torch.testing.assert_close(one.result().prototypes, res.prototypes)
    assert torch.equal(one.result().sample_id, res.sample_id)


def test_projector_allowed_none_uses_any_image():
    # prototype 0 is nearest to a patch of a class-1 image; with allowed=None it takes it,
    # with class-specific allowed (prototype 0 -> class 0) it must not.
    protos = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    z = torch.zeros(2, 2, 1, 2)
    z[0, :, 0, 0] = torch.tensor([0.2, 0.2])  # class 0 image
    z[1, :, 0, 1] = torch.tensor([0.9, 0.9])  # class 1 image, nearest to prototype 0
    labels = torch.tensor([0, 1])
    ids = torch.tensor([7, 8])
    free = F.PrototypeProjector(protos, None)
    free.update(z, labels, ids)
    r = free.result()
    assert r.sample_id.tolist()[0] == 8 and (r.h[0].item(), r.w[0].item()) == (0, 1)
    ident = F.prototype_class_identity(2, 1)
    strict = F.PrototypeProjector(protos, ident.bool())
    strict.update(z, labels, ids)
    r2 = strict.result()
    assert r2.sample_id.tolist() == [7, 8]
    torch.testing.assert_close(r2.prototypes[0], torch.tensor([0.2, 0.2]))


def test_projector_class_without_images_keeps_value():
    g = _gen(7)
    ident = F.prototype_class_identity(3, 1)
    protos = torch.rand(3, 4, generator=g)
    z = torch.rand(5, 4, 2, 2, generator=g)
    labels = torch.tensor([0, 1, 0, 1, 1])  # class 2 never appears
    proj = F.PrototypeProjector(protos, ident.bool())
    _stream(proj, z, labels, torch.arange(5), [2, 3])
    res = proj.result()
    assert res.found.tolist() == [True, True, False]
    assert torch.equal(res.prototypes[2], protos[2])
    assert math.isinf(res.distance[2].item())
    assert (res.sample_id[2].item(), res.h[2].item(), res.w[2].item()) == (-1, -1, -1)
    # the found ones were replaced by actual patches
    assert not torch.equal(res.prototypes[0], protos[0])


def test_projector_ties_first_seen_wins_and_state_does_not_grow():
    g = _gen(8)
    protos = torch.rand(2, 3, generator=g)
    img = torch.rand(1, 3, 2, 2, generator=g)
    proj = F.PrototypeProjector(protos, None)
    sizes = []
    for i in range(4):  # the same image four times, different ids
        proj.update(img, torch.tensor([0]), torch.tensor([10 + i]))
        sizes.append(sum(t.numel() for t in vars(proj).values() if isinstance(t, torch.Tensor)))
    assert proj.result().sample_id.tolist() == [10, 10]
    assert len(set(sizes)) == 1  # O(P*D) state, nothing accumulated per batch
    # within one batch, duplicates: the lower batch position wins
    proj2 = F.PrototypeProjector(protos, None)
    proj2.update(torch.cat([img, img]), torch.tensor([0, 0]), torch.tensor([5, 6]))
    assert proj2.result().sample_id.tolist() == [5, 5]


def test_projector_accepts_4d_prototypes_and_does_not_alias_input():
    protos = torch.rand(2, 3, 1, 1, generator=_gen(9))
    before = protos.clone()
    proj = F.PrototypeProjector(protos, None)
    proj.update(torch.rand(2, 3, 2, 2, generator=_gen(10)), torch.tensor([0, 0]), torch.tensor([0, 1]))
    res = proj.result()
    assert res.prototypes.shape == (2, 3)
    assert torch.equal(protos, before)


def test_ppc_loss_mask_ties_option_reads_the_distance_map():
    from kdt_proto2proto.losses import PatchPrototypeCorrespondenceLoss

    g = _gen(3)
    d = torch.rand(2, 4, 3, 3, generator=g) * 3
    d[0, 0] = 0.2  # a flat map: all 9 locations tie
    dmin, argm = _protopnet.min_pool_distances(d)
    zs, zt = torch.rand(2, 5, 3, 3, generator=g), torch.rand(2, 5, 3, 3, generator=g)
    student = {"features": zs, "min_distances": dmin, "argmin": argm, "distances": d}
    step = SimpleNamespace(outputs=student, teacher_outputs={"features": zt})
    first = PatchPrototypeCorrespondenceLoss(tau=1.0, mask_ties="first")
    every = PatchPrototypeCorrespondenceLoss(tau=1.0)
    assert every.mask_ties == "all" and "distances" in every.requires_outputs and "argmin" not in every.requires_outputs
    assert "argmin" in first.requires_outputs and "distances" not in first.requires_outputs
    expect_first = F.patch_prototype_correspondence_loss(zt, zs, F.active_patch_mask(dmin, argm, 3, 3, 1.0))
    expect_all = F.patch_prototype_correspondence_loss(zt, zs, _original_ppc_mask(d, 1.0))
    assert torch.equal(first(step), expect_first) and torch.equal(every(step), expect_all)
    assert not torch.equal(expect_first, expect_all)
