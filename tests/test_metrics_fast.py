"""The fast AAP/AJS/PMS of kdt_proto2proto.metrics against two oracles.

1. The previous implementation (one scatter per threshold, one sparse product,
   one Hungarian solve per cap), copied below under private names: AAP must be
   exactly equal, AJS within 1e-14 (its per-image ratios are now added with a
   correctly rounded sum), PMS costs and score within 1e-12 and the saved
   matching identical.
2. Slow, obvious references written here with Python sets and loops.

Records are random with ties (distances on a coarse grid, equal to the
thresholds), infinite and NaN distances, tau = 0, images without any active
prototype, and N < 10 for PMS.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from kdt_proto2proto import metrics as M

# --------------------------------------------------------------------------
# the previous implementation (as it was before the per-location minima and
# the packed co-location count), kept as an oracle
# --------------------------------------------------------------------------


def _prev_checked(d, a):
    """The records as the previous implementation read them: torch tensors, ``argmin`` as int64."""
    d = d if isinstance(d, torch.Tensor) else torch.as_tensor(np.asarray(d))
    a = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return d, a.long()


def _prev_active_locations(min_distances, argmin, num_locations, tau):
    num_locations = M._check_num_locations(num_locations)
    tau = M._check_tau(tau)
    d, a = _prev_checked(min_distances, argmin)
    n = a.shape[0]
    if math.isinf(tau):
        index = a
    else:
        active = d <= tau
        index = torch.where(active.to(a.device), a, torch.full_like(a, num_locations))
    out = torch.zeros(n, num_locations + 1, dtype=torch.bool, device=a.device)
    out.scatter_(1, index, True)
    return out[:, :num_locations]


def _prev_aap(min_distances, argmin, num_locations, tau):
    mask = _prev_active_locations(min_distances, argmin, num_locations, tau)
    return float(mask.sum(dim=1, dtype=torch.float64).mean())


def _prev_ajs(td, ta, sd, sa, num_locations, tau):
    st = _prev_active_locations(td, ta, num_locations, tau)
    ss = _prev_active_locations(sd, sa, num_locations, tau).to(st.device)
    inter = (st & ss).sum(dim=1, dtype=torch.float64)
    union = (st | ss).sum(dim=1, dtype=torch.float64)
    jaccard = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return float(jaccard.mean())


def _prev_aap_by_tau(d, a, num_locations, taus):
    return {M.tau_key(t): _prev_aap(d, a, num_locations, t) for t in taus}


def _prev_ajs_by_tau(td, ta, sd, sa, num_locations, taus):
    return {M.tau_key(t): _prev_ajs(td, ta, sd, sa, num_locations, t) for t in taus}


def _prev_colocation_matrix(ta, sa, num_locations, block_images=1024):
    ta = np.asarray(ta)
    sa = np.asarray(sa)
    n = ta.shape[0]
    counts = np.zeros((ta.shape[1], sa.shape[1]), dtype=np.int64)
    for start in range(0, n, block_images):
        stop = min(n, start + block_images)
        a_t = M._onehot_codes(ta[start:stop], num_locations)
        a_s = M._onehot_codes(sa[start:stop], num_locations)
        counts += (a_t @ a_s.T).toarray()
    return counts


def _prev_pms_from_colocation(colocation, num_images):
    counts = np.asarray(colocation).astype(np.float64)
    caps = M.pms_caps(num_images)
    if not caps:
        return None
    pt, ps = counts.shape
    costs = []
    sim_sum = np.zeros((pt, ps), dtype=np.float64)
    for cap in caps:
        sim = np.minimum(counts / cap, 1.0)
        sim_sum += sim
        cost = 1.0 - sim
        rows, cols = linear_sum_assignment(cost)
        costs.append(float(cost[rows, cols].mean()))
    sim_mean = sim_sum / len(caps)
    rows, cols = linear_sum_assignment(1.0 - sim_mean)
    matching = [(int(i), int(j), float(sim_mean[i, j])) for i, j in zip(rows, cols)]
    return 1.0 - float(np.mean(costs)), caps, costs, matching


# --------------------------------------------------------------------------
# slow references
# --------------------------------------------------------------------------


def _sets(d, a, tau):
    """S_tau(x) as a Python set per image, by the definition."""
    return [{int(a[x, j]) for j in range(d.shape[1]) if math.isinf(tau) or d[x, j] <= tau} for x in range(d.shape[0])]


def _slow_aap(d, a, tau):
    return sum(len(s) for s in _sets(d, a, tau)) / d.shape[0]


def _slow_ajs(td, ta, sd, sa, tau):
    total = 0.0
    for st, ss in zip(_sets(td, ta, tau), _sets(sd, sa, tau)):
        union = st | ss
        total += len(st & ss) / len(union) if union else 0.0
    return total / td.shape[0]


def _slow_colocation(ta, sa):
    n, pt = ta.shape
    ps = sa.shape[1]
    out = np.zeros((pt, ps), dtype=np.int64)
    for x in range(n):
        for i in range(pt):
            for j in range(ps):
                out[i, j] += int(ta[x, i] == sa[x, j])
    return out


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------

TAUS = (0.0, 0.01, 0.1, 0.2, 0.25, 0.45, 0.5, 1.0, 3.0, 5.0, math.inf)


def _records(seed, n, p, num_locations, dtype=torch.float32, special=True):
    g = torch.Generator().manual_seed(seed)
    # a coarse grid of distances: many ties among prototypes and with the thresholds
    d = (torch.randint(0, 12, (n, p), generator=g).to(torch.float64) / 4).to(dtype)
    a = torch.randint(0, num_locations, (n, p), generator=g)
    if special and dtype.is_floating_point:
        r = torch.rand(n, p, generator=g)
        d[r < 0.08] = math.inf
        d[(r >= 0.08) & (r < 0.12)] = math.nan
        d[(r >= 0.12) & (r < 0.15)] = 0.0
        d[0] = 2.0  # image 0: no prototype active below tau = 2
        if n > 1:
            d[1] = math.inf  # image 1: active only at tau = inf
        if n > 2:
            d[2] = math.nan  # image 2: NaN distances, also only at tau = inf
    return d, a


RECORD_CASES = [
    # seed, n, p_teacher, p_student, L
    (0, 1, 3, 2, 4),
    (1, 7, 5, 9, 4),
    (2, 23, 11, 6, 9),
    (3, 40, 30, 25, 49),
    (4, 17, 4, 4, 1),
]


@pytest.mark.parametrize("seed, n, pt, ps, num_locations", RECORD_CASES)
def test_location_minima_give_the_previous_active_sets(seed, n, pt, ps, num_locations):
    d, a = _records(seed, n, pt, num_locations)
    minima = M.location_minima(d, a, num_locations)
    assert minima.shape == (n, num_locations) and minima.dtype == d.dtype
    for tau in TAUS:
        prev = _prev_active_locations(d, a, num_locations, tau)
        assert torch.equal(minima <= tau, prev), tau
        assert torch.equal(M.active_locations(d, a, num_locations, tau), prev), tau
        # the definition, image by image
        sets = _sets(d.numpy(), a.numpy(), tau)
        assert [set(np.flatnonzero(row).tolist()) for row in prev.numpy()] == sets


@pytest.mark.parametrize("seed, n, pt, ps, num_locations", RECORD_CASES)
def test_aap_ajs_equal_previous_implementation_and_sets(seed, n, pt, ps, num_locations):
    td, ta = _records(seed, n, pt, num_locations)
    sd, sa = _records(seed + 100, n, ps, num_locations)
    aap_t = M.aap_by_tau(td, ta, num_locations, TAUS)
    aap_s = M.aap_by_tau(sd, sa, num_locations, TAUS)
    ajs = M.ajs_by_tau(td, ta, sd, sa, num_locations, TAUS)
    # the previous numbers, in the same key order: AAP exactly (sums of integers); AJS, a sum of
    # ratios now added with a correctly rounded sum, within rounding of the previous order of sums
    assert aap_t == _prev_aap_by_tau(td, ta, num_locations, TAUS)
    assert aap_s == _prev_aap_by_tau(sd, sa, num_locations, TAUS)
    assert ajs == pytest.approx(_prev_ajs_by_tau(td, ta, sd, sa, num_locations, TAUS), rel=1e-14, abs=1e-15)
    assert list(ajs) == [M.tau_key(t) for t in TAUS]
    # and the definition, with Python sets
    tdn, tan, sdn, san = td.numpy(), ta.numpy(), sd.numpy(), sa.numpy()
    for tau in TAUS:
        k = M.tau_key(tau)
        assert aap_t[k] == pytest.approx(_slow_aap(tdn, tan, tau), abs=1e-12)
        assert aap_s[k] == pytest.approx(_slow_aap(sdn, san, tau), abs=1e-12)
        assert ajs[k] == pytest.approx(_slow_ajs(tdn, tan, sdn, san, tau), abs=1e-12)
        # the single-threshold functions agree too
        assert M.average_active_patches(td, ta, num_locations, tau) == aap_t[k]
        assert M.average_jaccard_similarity(td, ta, sd, sa, num_locations, tau) == ajs[k]
    # minima computed once and shared
    mt = M.location_minima(td, ta, num_locations)
    ms = M.location_minima(sd, sa, num_locations)
    assert M.aap_from_minima(mt, TAUS) == aap_t
    assert M.ajs_from_minima(mt, ms, TAUS) == ajs


def test_images_without_active_prototypes_and_tau_zero():
    td, ta = _records(5, 12, 6, 4)
    sd, sa = _records(6, 12, 6, 4)
    td[:] = 1.0
    # tau = 0: no prototype active anywhere -> AAP 0, AJS 0 (not NaN, not 1)
    assert M.aap_by_tau(td, ta, 4, (0.0,)) == {"0": 0.0}
    assert M.ajs_by_tau(td, ta, sd, sa, 4, (0.0, 0.5))["0.5"] == pytest.approx(
        _prev_ajs(td, ta, sd, sa, 4, 0.5), rel=1e-14
    )
    assert M.ajs_by_tau(td, ta, td, ta, 4, (0.0, 1.0, math.inf)) == {"0": 0.0, "1": 1.0, "inf": 1.0}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_other_distance_dtypes_compare_like_before(dtype):
    # float16 rounds tau = 0.1 differently from float64: the minima keep the
    # record's dtype, so the comparison rounds it the same way as before.
    g = torch.Generator().manual_seed(11)
    d = (
        (torch.rand(30, 8, generator=g) * 0.3).to(dtype)
        if dtype.is_floating_point
        else torch.randint(0, 4, (30, 8), generator=g)
    )
    a = torch.randint(0, 5, (30, 8), generator=g)
    taus = (0.0, 0.1, 0.1 + 1e-9, 0.2, 1.0, 2.5, math.inf)
    assert M.aap_by_tau(d, a, 5, taus) == _prev_aap_by_tau(d, a, 5, taus)
    assert M.ajs_by_tau(d, a, d.flip(0), a.flip(0), 5, taus) == pytest.approx(
        _prev_ajs_by_tau(d, a, d.flip(0), a.flip(0), 5, taus), rel=1e-14, abs=1e-15
    )


def test_numpy_records_and_errors():
    td, ta = _records(7, 9, 4, 4)
    assert M.aap_by_tau(td.numpy(), ta.numpy(), 4, TAUS) == _prev_aap_by_tau(td, ta, 4, TAUS)
    with pytest.raises(ValueError, match="grid"):
        M.location_minima(td, ta, 3)
    with pytest.raises(ValueError, match="images"):
        M.ajs_from_minima(M.location_minima(td, ta, 4), M.location_minima(td[:3], ta[:3], 4))
    with pytest.raises(ValueError, match="grid"):
        M.ajs_from_minima(M.location_minima(td, ta, 4), M.location_minima(td, ta, 5))
    with pytest.raises(ValueError, match="repeat"):
        M.aap_from_minima(M.location_minima(td, ta, 4), (1.0, 1.0))
    with pytest.raises(ValueError, match="NaN"):
        M.aap_by_tau(td, ta, 4, (float("nan"),))


# --------------------------------------------------------------------------
# co-location counts
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, pt, ps, num_locations, seed",
    [(13, 4, 7, 5, 0), (21, 9, 3, 2, 1), (6, 5, 5, 1, 2), (9, 1, 1, 3, 3), (8, 3, 4, 49, 4)],
)
def test_packed_and_sparse_counts_equal_the_loop(n, pt, ps, num_locations, seed):
    g = torch.Generator().manual_seed(seed)
    ta = torch.randint(0, num_locations, (n, pt), generator=g)
    sa = torch.randint(0, num_locations, (n, ps), generator=g)
    expected = _slow_colocation(ta.numpy(), sa.numpy())
    for method in ("auto", "packed", "sparse"):
        for block in (None, 1, 2, n - 1 if n > 1 else 1, n + 5):
            got = M.colocation_matrix(ta, sa, num_locations, method=method, block_images=block)
            assert got.dtype == np.int64 and got.shape == (pt, ps)
            assert (got == expected).all(), (method, block)


@pytest.mark.parametrize("concentrated", [False, True])
def test_packed_counts_past_the_8bit_capacity_equal_previous(concentrated):
    # N > 255 images (counters emptied several times), odd P_s, counts up to N
    g = torch.Generator().manual_seed(12)
    n, pt, ps, num_locations = 700, 23, 17, 49
    if concentrated:
        ta = torch.randint(0, 2, (n, pt), generator=g)
        sa = torch.randint(0, 2, (n, ps), generator=g)
        ta[:, 0] = 1
        sa[:, 0] = 1  # one pair co-located in every image: I = N
    else:
        ta = torch.randint(0, num_locations, (n, pt), generator=g)
        sa = torch.randint(0, num_locations, (n, ps), generator=g)
    expected = _prev_colocation_matrix(ta.numpy(), sa.numpy(), num_locations)
    for block in (None, 1, 15, 16, 100, 255, 256, 5000):
        assert (M.colocation_matrix(ta, sa, num_locations, method="packed", block_images=block) == expected).all()
    assert (M.colocation_matrix(ta, sa, num_locations, method="sparse") == expected).all()
    if concentrated:
        assert expected[0, 0] == n


def test_packed_counts_without_the_in_place_kernel(monkeypatch):
    # the public ``csr_matrix @ ndarray`` path, used when scipy lacks the kernel
    g = torch.Generator().manual_seed(13)
    ta = torch.randint(0, 6, (300, 7), generator=g)
    sa = torch.randint(0, 6, (300, 5), generator=g)
    expected = M.colocation_matrix(ta, sa, 6, method="packed")
    monkeypatch.setattr(M, "_csr_matvecs", None)
    assert (M.colocation_matrix(ta, sa, 6, method="packed") == expected).all()
    assert (expected == _prev_colocation_matrix(ta.numpy(), sa.numpy(), 6)).all()


def test_auto_method_and_errors():
    ta = torch.zeros(5, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="method"):
        M.colocation_matrix(ta, ta, 4, method="dense")
    with pytest.raises(ValueError, match="block_images"):
        M.colocation_matrix(ta, ta, 4, block_images=0)
    # a grid above PACKED_MAX_LOCATIONS takes the sparse product: same counts
    g = torch.Generator().manual_seed(14)
    big = M.PACKED_MAX_LOCATIONS + 1
    ta = torch.randint(0, big, (20, 4), generator=g)
    sa = torch.randint(0, big, (20, 3), generator=g)
    assert (M.colocation_matrix(ta, sa, big) == _slow_colocation(ta.numpy(), sa.numpy())).all()


# --------------------------------------------------------------------------
# PMS
# --------------------------------------------------------------------------

PMS_CASES = [
    # n, pt, ps, L, seed, kind
    (200, 12, 10, 49, 0, "uniform"),  # every cap >= max(I): one shared solve
    (57, 8, 6, 4, 1, "uniform"),  # caps below and above max(I)
    (57, 6, 8, 2, 2, "uniform"),  # two locations: many tied counts
    (20, 7, 7, 2, 3, "uniform"),
    (31, 3, 8, 1, 4, "uniform"),  # one location: every count is N
    (300, 15, 15, 49, 5, "distilled"),  # student copies teacher prototypes
    (120, 9, 9, 9, 6, "distilled"),
    (10, 4, 4, 3, 7, "uniform"),  # smallest N with a cap
]


def _pms_records(n, pt, ps, num_locations, seed, kind):
    g = torch.Generator().manual_seed(seed)
    ta = torch.randint(0, num_locations, (n, pt), generator=g)
    sa = torch.randint(0, num_locations, (n, ps), generator=g)
    if kind == "distilled":
        perm = torch.randperm(pt, generator=g)[:ps]
        copy = torch.rand(n, ps, generator=g) < 0.7
        sa = torch.where(copy, ta[:, perm], sa)
    return ta, sa


@pytest.mark.parametrize("n, pt, ps, num_locations, seed, kind", PMS_CASES)
def test_pms_equals_previous_implementation(n, pt, ps, num_locations, seed, kind):
    ta, sa = _pms_records(n, pt, ps, num_locations, seed, kind)
    counts = M.colocation_matrix(ta, sa, num_locations)
    assert (counts == _prev_colocation_matrix(ta.numpy(), sa.numpy(), num_locations)).all()
    got = M.prototype_matching_score(ta, sa, num_locations)
    score, caps, costs, matching = _prev_pms_from_colocation(counts, n)
    assert got.caps == caps
    assert got.costs == pytest.approx(costs, abs=1e-12, rel=0)
    assert got.score == pytest.approx(score, abs=1e-12, rel=0)
    assert got.matching == matching  # the same pairs and similarities, bit for bit
    # caps that clip something were solved as before: identical cost
    largest = counts.max()
    for cap, new, old in zip(caps, got.costs, costs):
        if cap < largest:
            assert new == old


def test_pms_shared_solve_against_sets_reference():
    # all caps above max(I): one assignment serves every cap; compare with the
    # definition taken literally (sets of (image, location), a solve per cap)
    ta, sa = _pms_records(150, 6, 5, 25, 8, "uniform")
    n = 150
    t_sets = [{(x, int(ta[x, i])) for x in range(n)} for i in range(6)]
    s_sets = [{(x, int(sa[x, j])) for x in range(n)} for j in range(5)]
    inter = np.array([[len(t & s) for s in s_sets] for t in t_sets])
    caps = M.pms_caps(n)
    assert min(caps) >= inter.max()
    costs = []
    for cap in caps:
        cost = 1.0 - np.minimum(inter / cap, 1.0)
        r, c = linear_sum_assignment(cost)
        costs.append(cost[r, c].mean())
    got = M.prototype_matching_score(ta, sa, 25)
    assert got.costs == pytest.approx(costs, abs=1e-12, rel=0)
    assert got.score == pytest.approx(1.0 - float(np.mean(costs)), abs=1e-12, rel=0)


@pytest.mark.parametrize("n", [1, 5, 9])
def test_pms_below_ten_images_is_a_note_not_a_crash(n):
    ta, sa = _pms_records(n, 4, 3, 4, 9, "uniform")
    got = M.prototype_matching_score(ta, sa, 4)
    assert got.score is None and got.caps == [] and got.costs == [] and got.matching == []
    assert f"N = {n}" in got.reason
