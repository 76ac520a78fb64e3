"""Tests for plugins/kdt_proto2proto/metrics.py (spec §4: AAP, AJS, PMS).

Hand-worked examples (numbers written out in the comments) and comparisons
against literal reference implementations written here the slow, obvious way.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from kdt_proto2proto import metrics as M

# --------------------------------------------------------------------------
# A tiny hand example: N = 2 images, grid L = 4 locations.
#
# teacher, P = 3          d                  a
#   image 0          [0.1, 0.5, 0.2]     [1, 1, 3]
#   image 1          [1.0, 0.45, 2.0]    [0, 2, 2]
# student, P = 2
#   image 0          [0.05, 0.3]         [1, 2]
#   image 1          [0.2, 3.0]          [3, 2]
# --------------------------------------------------------------------------

L4 = 4
T_D = torch.tensor([[0.1, 0.5, 0.2], [1.0, 0.45, 2.0]])
T_A = torch.tensor([[1, 1, 3], [0, 2, 2]])
S_D = torch.tensor([[0.05, 0.3], [0.2, 3.0]])
S_A = torch.tensor([[1, 2], [3, 2]])


def test_active_locations_by_hand():
    # tau = 0.45: image 0 -> prototypes 0 (0.1), 1 (0.5 > 0.45: no), 2 (0.2) -> {1, 3};
    #             image 1 -> prototype 1 (0.45 <= 0.45, boundary is active) -> {2}.
    got = M.active_locations(T_D, T_A, L4, 0.45)
    assert got.dtype == torch.bool
    assert got.tolist() == [[False, True, False, True], [False, False, True, False]]
    # tau = 0.5: prototype 1 of image 0 joins, but at location 1 already in the set.
    got = M.active_locations(T_D, T_A, L4, 0.5)
    assert got.tolist() == [[False, True, False, True], [False, False, True, False]]
    # tau = inf: everything, image 1 has two prototypes on location 2 -> {0, 2}.
    got = M.active_locations(T_D, T_A, L4, math.inf)
    assert got.tolist() == [[False, True, False, True], [True, False, True, False]]
    # tau = 0 (nothing <= 0 here).
    assert not M.active_locations(T_D, T_A, L4, 0.0).any()


def test_aap_by_hand():
    # |S(x)| per image, teacher:
    #   tau 0.01: {} {}             -> 0
    #   tau 0.1 : {1} {}            -> (1 + 0) / 2 = 0.5   (0.1 <= 0.1 counts)
    #   tau 0.2 : {1,3} {}          -> 1.0
    #   tau 0.45: {1,3} {2}         -> 1.5  (protos 0 and 1 share location 1: once)
    #   tau 1   : {1,3} {0,2}       -> 2.0  (1.0 <= 1 counts)
    #   tau 3, 5, inf: same         -> 2.0  (protos 1 and 2 of image 1 share location 2)
    expected = {"0.01": 0.0, "0.1": 0.5, "0.2": 1.0, "0.45": 1.5, "1": 2.0, "3": 2.0, "5": 2.0, "inf": 2.0}
    assert M.aap_by_tau(T_D, T_A, L4, M.DEFAULT_TAUS) == pytest.approx(expected)
    assert list(M.aap_by_tau(T_D, T_A, L4, M.DEFAULT_TAUS)) == list(expected)
    assert M.average_active_patches(T_D, T_A, L4, 0.45) == pytest.approx(1.5)
    # Student: tau 0.1 -> {1} {} = 0.5; tau 0.2 -> {1} {3} = 1; tau 3 -> {1,2} {3,2} = 2.
    assert M.average_active_patches(S_D, S_A, L4, 0.1) == pytest.approx(0.5)
    assert M.average_active_patches(S_D, S_A, L4, 0.2) == pytest.approx(1.0)
    assert M.average_active_patches(S_D, S_A, L4, 2.9) == pytest.approx(1.5)
    assert M.average_active_patches(S_D, S_A, L4, 3.0) == pytest.approx(2.0)


def test_aap_infinite_distances_only_active_at_inf():
    d = torch.tensor([[math.inf, 0.3], [math.inf, math.inf]])
    a = torch.tensor([[0, 1], [2, 2]])
    # tau = 5: image 0 -> {1}, image 1 -> {} -> 0.5; tau = inf: {0,1}, {2} -> 1.5.
    assert M.average_active_patches(d, a, 3, 5.0) == pytest.approx(0.5)
    assert M.average_active_patches(d, a, 3, math.inf) == pytest.approx(1.5)


def test_ajs_by_hand():
    # per image |St ∩ Ss| / |St ∪ Ss|:
    #   tau 0.1 : T {1} S {1} -> 1;      T {} S {} -> 0 (both empty, still counted) -> 0.5
    #   tau 0.2 : T {1,3} S {1} -> 1/2;  T {} S {3} -> 0                            -> 0.25
    #   tau 0.45: T {1,3} S {1,2} -> 1/3; T {2} S {3} -> 0                           -> 1/6
    #   tau 1   : T {1,3} S {1,2} -> 1/3; T {0,2} S {3} -> 0                         -> 1/6
    #   tau 3   : T {1,3} S {1,2} -> 1/3; T {0,2} S {2,3} -> 1/3 (3.0 <= 3 counts)   -> 1/3
    #   tau inf : same as tau 3                                                      -> 1/3
    expected = {"0.1": 0.5, "0.2": 0.25, "0.45": 1 / 6, "1": 1 / 6, "3": 1 / 3, "inf": 1 / 3}
    taus = (0.1, 0.2, 0.45, 1.0, 3.0, math.inf)
    got = M.ajs_by_tau(T_D, T_A, S_D, S_A, L4, taus)
    assert got == pytest.approx(expected)
    assert list(got) == list(expected)
    assert M.average_jaccard_similarity(T_D, T_A, S_D, S_A, L4, 0.2) == pytest.approx(0.25)


def test_ajs_with_itself_counts_empty_images_as_zero():
    # tau 0.1: image 0 has {1} on both sides -> 1, image 1 has nothing on either -> 0.
    assert M.average_jaccard_similarity(T_D, T_A, T_D, T_A, L4, 0.1) == pytest.approx(0.5)
    assert M.average_jaccard_similarity(T_D, T_A, T_D, T_A, L4, math.inf) == pytest.approx(1.0)
    # no active prototype anywhere -> 0, not NaN and not 1
    assert M.average_jaccard_similarity(T_D, T_A, S_D, S_A, L4, 0.0) == 0.0


def _loop_active(d, a, num_locations, tau):
    out = np.zeros((d.shape[0], num_locations), dtype=bool)
    for x in range(d.shape[0]):
        for j in range(d.shape[1]):
            if math.isinf(tau) or d[x, j] <= tau:
                out[x, a[x, j]] = True
    return out


def test_active_locations_matches_loop_on_random_records_with_ties():
    g = torch.Generator().manual_seed(3)
    n, p, num_locations = 17, 9, 5
    # distances on a coarse grid so that many equal tau exactly
    d = torch.randint(0, 8, (n, p), generator=g).double() / 4
    a = torch.randint(0, num_locations, (n, p), generator=g)
    for tau in (0.0, 0.25, 0.5, 1.0, 1.75, math.inf):
        got = M.active_locations(d, a, num_locations, tau).numpy()
        assert (got == _loop_active(d.numpy(), a.numpy(), num_locations, tau)).all()


def test_aap_ajs_input_errors():
    with pytest.raises(ValueError, match="images"):
        M.average_jaccard_similarity(T_D, T_A, S_D[:1], S_A[:1], L4, 1.0)
    with pytest.raises(ValueError, match="grid"):
        M.average_active_patches(T_D, T_A, 3, 1.0)  # location 3 on a 3-location grid
    with pytest.raises(ValueError, match="same shape"):
        M.average_active_patches(T_D[:, :2], T_A, L4, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        M.average_active_patches(T_D, T_A, L4, float("nan"))
    with pytest.raises(ValueError, match="no images"):
        M.average_active_patches(T_D[:0], T_A[:0], L4, 1.0)


# --------------------------------------------------------------------------
# thresholds
# --------------------------------------------------------------------------


def test_tau_key_values_and_round_trip():
    keys = [M.tau_key(t) for t in M.DEFAULT_TAUS]
    assert keys == ["0.01", "0.1", "0.2", "0.45", "1", "3", "5", "inf"]
    assert M.parse_taus(",".join(keys)) == M.DEFAULT_TAUS
    for t in (0.0, 1e-7, 2.5, 100.0, 1e20, 0.1 + 0.2):
        assert float(M.tau_key(t)) == t
        assert M.parse_taus(M.tau_key(t)) == (t,)
    assert M.tau_key(-0.0) == "0"


def test_parse_taus_accepts_spacing_and_inf_spellings():
    assert M.parse_taus("0.01,0.1,inf") == (0.01, 0.1, math.inf)
    assert M.parse_taus(" 0.45 , 1 ,INF") == (0.45, 1.0, math.inf)
    assert M.parse_taus("5,∞") == (5.0, math.inf)
    assert M.parse_taus("infinity") == (math.inf,)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "no thresholds"),
        ("  ", "no thresholds"),
        ("0.1,,1", "empty threshold at position 2"),
        ("0.1,abc", "'abc'"),
        ("nan", "NaN"),
        ("1,-0.5", "negative"),
        ("1,1.0", "repeats"),
        ("inf,Infinity", "repeats"),
    ],
)
def test_parse_taus_errors(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        M.parse_taus(text)


def test_tau_key_errors():
    for bad in (float("nan"), -1.0, "x"):
        with pytest.raises(ValueError):
            M.tau_key(bad)


# --------------------------------------------------------------------------
# co-location matrix
# --------------------------------------------------------------------------


def _loop_colocation(ta, sa):
    n, pt = ta.shape
    ps = sa.shape[1]
    out = np.zeros((pt, ps), dtype=np.int64)
    for i in range(pt):
        for j in range(ps):
            for x in range(n):
                out[i, j] += int(ta[x, i] == sa[x, j])
    return out


@pytest.mark.parametrize("n, pt, ps, num_locations, seed", [(13, 4, 7, 5, 0), (21, 9, 3, 2, 1), (6, 5, 5, 1, 2)])
def test_colocation_matrix_equals_triple_loop(n, pt, ps, num_locations, seed):
    g = torch.Generator().manual_seed(seed)
    ta = torch.randint(0, num_locations, (n, pt), generator=g)
    sa = torch.randint(0, num_locations, (n, ps), generator=g)
    got = M.colocation_matrix(ta, sa, num_locations)
    assert isinstance(got, np.ndarray) and got.dtype == np.int64 and got.shape == (pt, ps)
    assert (got == _loop_colocation(ta.numpy(), sa.numpy())).all()
    # blocking over images is only an evaluation order: same counts for any block size
    for block in (1, 4, n - 1, n + 5):
        assert (M.colocation_matrix(ta, sa, num_locations, block_images=block) == got).all()
    # numpy input gives the same
    assert (M.colocation_matrix(ta.numpy(), sa.numpy(), num_locations) == got).all()


def test_colocation_matrix_errors():
    ta = torch.zeros(5, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="images"):
        M.colocation_matrix(ta, torch.zeros(4, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="grid"):
        M.colocation_matrix(ta, torch.full((5, 2), 4), 4)
    with pytest.raises(ValueError, match="integer"):
        M.colocation_matrix(ta.float(), ta, 4)
    with pytest.raises(ValueError, match="block_images"):
        M.colocation_matrix(ta, ta, 4, block_images=0)


# --------------------------------------------------------------------------
# PMS
# --------------------------------------------------------------------------


def _reference_pms(ta, sa):
    """The definition taken literally: sets of (image, location) ids per prototype,
    intersected per pair and per cap, then a Hungarian solve per cap."""
    n, pt = ta.shape
    ps = sa.shape[1]
    t_sets = [{(x, int(ta[x, i])) for x in range(n)} for i in range(pt)]
    s_sets = [{(x, int(sa[x, j])) for x in range(n)} for j in range(ps)]
    c = int(0.1 * n)
    caps = list(range(c, n, c)) if c else []
    costs = []
    sims = []
    for cap in caps:
        sim = np.zeros((pt, ps))
        for i in range(pt):
            for j in range(ps):
                sim[i, j] = min(1.0, len(t_sets[i] & s_sets[j]) / cap)
        cost = 1.0 - sim
        r, k = linear_sum_assignment(cost)
        costs.append(cost[r, k].mean())
        sims.append(sim)
    return 1.0 - float(np.mean(costs)), caps, costs, np.mean(sims, axis=0)


@pytest.mark.parametrize(
    "n, pt, ps, num_locations, seed",
    [
        (23, 5, 5, 3, 0),  # N not a multiple of 10: c = 2, caps 2..22 (11 of them)
        (57, 6, 4, 4, 1),  # P_t > P_s, c = 5, caps 5..55
        (57, 4, 6, 2, 2),  # P_t < P_s, two locations: many tied counts
        (20, 7, 7, 2, 3),  # N a multiple of 10: caps 2..18 (nine)
        (31, 3, 8, 1, 4),  # one location: every count equals N
        (100, 12, 10, 9, 5),
    ],
)
def test_pms_equals_literal_reference(n, pt, ps, num_locations, seed):
    g = torch.Generator().manual_seed(seed)
    ta = torch.randint(0, num_locations, (n, pt), generator=g)
    sa = torch.randint(0, num_locations, (n, ps), generator=g)
    score, caps, costs, sim_mean = _reference_pms(ta.numpy(), sa.numpy())
    got = M.prototype_matching_score(ta, sa, num_locations)
    assert got.reason is None
    assert got.caps == caps
    assert got.costs == pytest.approx(costs, abs=1e-12)
    assert got.score == pytest.approx(score, abs=1e-12)
    # the saved matching: min(P_t, P_s) distinct pairs, similarity = cap-averaged sim,
    # and as good as the best assignment on the cap-averaged similarity (ties may
    # pick different pairs, so compare totals).
    assert len(got.matching) == min(pt, ps)
    assert len({i for i, _, _ in got.matching}) == min(pt, ps)
    assert len({j for _, j, _ in got.matching}) == min(pt, ps)
    for i, j, s in got.matching:
        assert s == pytest.approx(sim_mean[i, j], abs=1e-12)
    r, k = linear_sum_assignment(-sim_mean)
    assert sum(s for _, _, s in got.matching) == pytest.approx(sim_mean[r, k].sum(), abs=1e-9)


def test_pms_caps():
    assert M.pms_caps(8041) == [804, 1608, 2412, 3216, 4020, 4824, 5628, 6432, 7236, 8040]
    assert M.pms_caps(20) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert M.pms_caps(23) == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    assert M.pms_caps(10) == list(range(1, 10))
    assert M.pms_caps(9) == []
    assert M.pms_caps(0) == []


def test_pms_single_pair_by_hand():
    # N = 10 images, one prototype each; caps M = 1..9.  Teacher always at 0,
    # student at 0 in 5 images -> I = 5.  sim(M) = 1 for M <= 5, then 5/6, 5/7, 5/8, 5/9;
    # costs 0,0,0,0,0, 1/6, 2/7, 3/8, 4/9.  PMS = 1 - (1/6 + 2/7 + 3/8 + 4/9) / 9.
    ta = torch.zeros(10, 1, dtype=torch.long)
    sa = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]).unsqueeze(1)
    got = M.prototype_matching_score(ta, sa, 2)
    expected_costs = [0, 0, 0, 0, 0, Fraction(1, 6), Fraction(2, 7), Fraction(3, 8), Fraction(4, 9)]
    assert got.caps == list(range(1, 10))
    assert got.costs == pytest.approx([float(c) for c in expected_costs])
    assert got.score == pytest.approx(float(1 - sum(expected_costs) / 9))  # 0.858686...
    assert got.score == pytest.approx(0.8586860670, abs=1e-9)
    # cap-averaged similarity of the pair = 1 - mean cost
    assert got.matching == [(0, 0, pytest.approx(got.score))]


def test_pms_identical_models_score_one_and_match_themselves():
    g = torch.Generator().manual_seed(7)
    n, p, num_locations = 40, 6, 49
    ta = torch.randint(0, num_locations, (n, p), generator=g)
    # distinct argmin columns (so the identity is the only perfect matching)
    assert len({tuple(col) for col in ta.T.tolist()}) == p
    got = M.prototype_matching_score(ta, ta.clone(), num_locations)
    assert got.score == 1.0
    assert got.costs == [0.0] * len(got.caps)
    assert [(i, j) for i, j, _ in got.matching] == [(i, i) for i in range(p)]
    assert all(s == 1.0 for _, _, s in got.matching)
    # a permuted copy: still 1, and the matching recovers the permutation
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    got = M.prototype_matching_score(ta, ta[:, perm], num_locations)
    assert got.score == 1.0
    assert [(i, j) for i, j, _ in got.matching] == sorted((int(perm[j]), j) for j in range(p))


def test_pms_is_one_exactly_when_every_match_reaches_the_largest_cap():
    # N = 20: caps 2..18.  One teacher/student pair, differing in k images, I = 20 - k.
    ta = torch.zeros(20, 1, dtype=torch.long)
    cases = [(0, 1.0), (1, 1.0), (2, 1.0), (3, 1 - (1 / 18) / 9), (4, 1 - (2 / 18) / 9), (5, 1 - (1 / 16 + 3 / 18) / 9)]
    for k, expected in cases:
        sa = ta.clone()
        sa[:k] = 1
        got = M.prototype_matching_score(ta, sa, 2)
        # k = 1, 2: I = 19, 18 >= max cap 18, so the pair is "identical" for PMS;
        # k = 3: only M = 18 costs 1 - 17/18; k = 5 (I = 15): M = 16 and M = 18 cost.
        assert got.score == pytest.approx(expected), k
    # extra or missing prototypes are not penalised: P_s = 3 copies of the first
    # three teacher prototypes, and the other way round.
    g = torch.Generator().manual_seed(8)
    t5 = torch.randint(0, 49, (30, 5), generator=g)
    assert M.prototype_matching_score(t5, t5[:, :3], 49).score == 1.0
    assert M.prototype_matching_score(t5[:, :3], t5, 49).score == 1.0
    # two different random models do not score 1
    s5 = torch.randint(0, 49, (30, 5), generator=g)
    assert M.prototype_matching_score(t5, s5, 49).score < 0.5


def test_pms_too_few_images_reports_instead_of_crashing():
    ta = torch.zeros(9, 3, dtype=torch.long)
    got = M.prototype_matching_score(ta, ta, 4)
    assert got.score is None
    assert got.caps == [] and got.costs == [] and got.matching == []
    assert "PMS needs at least 10 test images (cap c = int(0.1·N) = 0" in got.reason
    assert json.loads(json.dumps(got.to_json()))["score"] is None


def test_pms_to_json():
    g = torch.Generator().manual_seed(9)
    ta = torch.randint(0, 4, (12, 3), generator=g)
    sa = torch.randint(0, 4, (12, 2), generator=g)
    got = M.prototype_matching_score(ta, sa, 4)
    data = json.loads(json.dumps(got.to_json()))
    assert data["score"] == pytest.approx(got.score)
    assert data["caps"] == got.caps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert data["costs"] == pytest.approx(got.costs)
    assert [tuple(m) for m in data["matching"]] == [tuple(m) for m in got.matching]
    assert len(data["matching"]) == 2
    assert data["reason"] is None
    assert (data["num_images"], data["num_teacher_prototypes"], data["num_student_prototypes"]) == (12, 3, 2)
