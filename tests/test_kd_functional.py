"""Tests for plugins/kdt_classic/functional.py, crd.py and connectors.py.

Every loss is checked against the method's equation written out with Python
loops over samples and classes in float64 (``_ref_*`` below, deliberately not
vectorised), or against small cases worked by hand in the comments.
"""

from __future__ import annotations

import math

import pytest
import torch

from kdt_classic import functional as KF
from kdt_classic.connectors import ConvRegressor
from kdt_classic.crd import CRD, nce_loss


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale


def _close(value: torch.Tensor, expected: float, tol: float = 1e-10) -> None:
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)


# --------------------------------------------------------------------------
# plain-loop references (float64, Python scalars)
# --------------------------------------------------------------------------


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    m = max(v / t for v in row)
    e = [math.exp(v / t - m) for v in row]
    z = sum(e)
    return [v / z for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _zscore(row: list[float]) -> list[float]:
    n = len(row)
    mean = sum(row) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in row) / (n - 1))
    return [(v - mean) / (1e-7 + std) for v in row]


def _ref_kd(s: torch.Tensor, t: torch.Tensor, temp: float, standardize: bool = False) -> float:
    total = 0.0
    for rs, rt in zip(s.tolist(), t.tolist()):
        if standardize:
            rs, rt = _zscore(rs), _zscore(rt)
        total += _kl(_softmax(rt, temp), _softmax(rs, temp))
    return total / s.shape[0] * temp**2


def _ref_dkd(s, t, labels, alpha, beta, temp) -> float:
    tckd = nckd = 0.0
    for rs, rt, g in zip(s.tolist(), t.tolist(), labels.tolist()):
        ps, pt = _softmax(rs, temp), _softmax(rt, temp)
        tckd += _kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
        # non-target distribution: the probabilities of the other classes, renormalised
        ns = [p / (1 - ps[g]) for j, p in enumerate(ps) if j != g]
        nt = [p / (1 - pt[g]) for j, p in enumerate(pt) if j != g]
        nckd += _kl(nt, ns)
    b = s.shape[0]
    return alpha * tckd / b * temp**2 + beta * nckd / b * temp**2


def _pearson(x: list[float], y: list[float], eps: float = 1e-8) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cx, cy = [v - mx for v in x], [v - my for v in y]
    num = sum(a * b for a, b in zip(cx, cy))
    return num / (math.sqrt(sum(a * a for a in cx)) * math.sqrt(sum(b * b for b in cy)) + eps)


def _ref_dist(s, t, beta, gamma, temp) -> float:
    ps = [_softmax(r, temp) for r in s.tolist()]
    pt = [_softmax(r, temp) for r in t.tolist()]
    b, k = len(ps), len(ps[0])
    inter = 1 - sum(_pearson(ps[i], pt[i]) for i in range(b)) / b
    intra = 1 - sum(_pearson([ps[i][j] for i in range(b)], [pt[i][j] for i in range(b)]) for j in range(k)) / k
    return beta * temp**2 * inter + gamma * temp**2 * intra


def _attention(f: torch.Tensor, p: float) -> list[list[float]]:
    b, c, h, w = f.shape
    out = []
    for i in range(b):
        a = [sum(f[i, ch, y, x].item() ** p for ch in range(c)) / c for y in range(h) for x in range(w)]
        n = math.sqrt(sum(v * v for v in a))
        out.append([v / n for v in a])
    return out


def _block_mean(f: torch.Tensor, k: int) -> torch.Tensor:
    """Average k×k blocks by loops (adaptive pooling by an exact divisor)."""
    b, c, h, w = f.shape
    out = torch.empty(b, c, h // k, w // k, dtype=f.dtype)
    for i in range(b):
        for ch in range(c):
            for y in range(h // k):
                for x in range(w // k):
                    out[i, ch, y, x] = sum(
                        f[i, ch, y * k + dy, x * k + dx].item() for dy in range(k) for dx in range(k)
                    ) / (k * k)
    return out


def _ref_at_pair(fs, ft, p) -> float:
    a_s, a_t = _attention(fs, p), _attention(ft, p)
    diffs = [(u - v) ** 2 for rs, rt in zip(a_s, a_t) for u, v in zip(rs, rt)]
    return sum(diffs) / len(diffs)


def _gram_rows(f: torch.Tensor) -> list[list[float]]:
    rows = f.reshape(f.shape[0], -1).tolist()
    g = [[sum(a * b for a, b in zip(ri, rj)) for rj in rows] for ri in rows]
    return [[v / math.sqrt(sum(x * x for x in r)) for v in r] for r in g]


def _ref_sp(fs, ft) -> float:
    gs, gt = _gram_rows(fs), _gram_rows(ft)
    b = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / (b * b)


def _ref_pkt(fs, ft, eps=1e-7) -> float:
    def probs(f):
        rows = f.reshape(f.shape[0], -1).tolist()
        unit = [[v / (math.sqrt(sum(x * x for x in r)) + eps) for v in r] for r in rows]
        sim = [[(sum(a * b for a, b in zip(u, v)) + 1) / 2 for v in unit] for u in unit]
        return [[v / sum(r) for v in r] for r in sim]

    ps, pt = probs(fs), probs(ft)
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / (b * b)


def _smooth_l1(x: float, y: float) -> float:
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def _ref_rkd(fs, ft, dw=25.0, aw=50.0, squared=False) -> float:
    def dists(e):
        b = len(e)
        d = [[0.0 if i == j else sum((a - c) ** 2 for a, c in zip(e[i], e[j])) for j in range(b)] for i in range(b)]
        if not squared:
            d = [[math.sqrt(v) for v in r] for r in d]
        pos = [v for r in d for v in r if v > 0]
        mu = sum(pos) / len(pos)
        return [[v / mu for v in r] for r in d]

    def angles(e):
        b = len(e)
        out = []
        for i in range(b):
            for j in range(b):
                for k in range(b):
                    u = [a - c for a, c in zip(e[j], e[i])]
                    v = [a - c for a, c in zip(e[k], e[i])]
                    nu, nv = math.sqrt(sum(x * x for x in u)), math.sqrt(sum(x * x for x in v))
                    if nu == 0 or nv == 0:
                        out.append(0.0)
                    else:
                        out.append(sum(a * c for a, c in zip(u, v)) / (nu * nv))
        return out

    es = fs.reshape(fs.shape[0], -1).tolist()
    et = ft.reshape(ft.shape[0], -1).tolist()
    ds, dt = dists(es), dists(et)
    b = len(es)
    loss_d = sum(_smooth_l1(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / (b * b)
    a_s, a_t = angles(es), angles(et)
    loss_a = sum(_smooth_l1(x, y) for x, y in zip(a_s, a_t)) / len(a_s)
    return dw * loss_d + aw * loss_a


# --------------------------------------------------------------------------
# KD and logit standardisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_kd_loss_matches_loop(temp):
    s, t = _randn(4, 6, seed=1, scale=3), _randn(4, 6, seed=2, scale=3)
    _close(KF.kd_loss(s, t, temp), _ref_kd(s, t, temp))


def test_kd_loss_two_class_by_hand():
    # p_t = softmax([ln 3, 0]) = [3/4, 1/4], p_s = [1/2, 1/2]:
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    _close(KF.kd_loss(s, t, 1.0), 0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # T = 2: p_t = [√3, 1] / (√3 + 1); the result is scaled by T² = 4
    q = math.sqrt(3) / (math.sqrt(3) + 1)
    _close(KF.kd_loss(s, t, 2.0), 4 * (q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))))


def test_kd_loss_identical_logits_is_zero():
    s = _randn(3, 5, seed=3)
    assert abs(KF.kd_loss(s, s.clone(), 4.0).item()) < 1e-12
    assert abs(KF.kd_loss(s, s.clone(), 4.0, standardize=True).item()) < 1e-12


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_kd_loss_standardized_matches_loop(temp):
    s, t = _randn(3, 7, seed=4, scale=5), _randn(3, 7, seed=5, scale=2)
    _close(KF.kd_loss(s, t, temp, standardize=True), _ref_kd(s, t, temp, standardize=True))


def test_standardization_uses_unbiased_std_and_eps_on_std():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    # mean 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
    std = math.sqrt(14 / 3)
    expected = [(v - 3) / (1e-7 + std) for v in (1.0, 2.0, 3.0, 6.0)]
    torch.testing.assert_close(KF.standardize_logits(x), torch.tensor([expected], dtype=torch.float64))


def test_standardized_kd_ignores_logit_scale_and_shift():
    # z-scoring removes each sample's offset and (up to the 1e-7) its scale
    s, t = _randn(3, 6, seed=6), _randn(3, 6, seed=7)
    base = KF.kd_loss(s, t, 2.0, standardize=True)
    moved = KF.kd_loss(3.0 * s + 5.0, 0.5 * t - 2.0, 2.0, standardize=True)
    assert moved.item() == pytest.approx(base.item(), rel=1e-6)
    assert KF.kd_loss(3.0 * s, t, 2.0).item() != pytest.approx(KF.kd_loss(s, t, 2.0).item(), rel=1e-3)


# --------------------------------------------------------------------------
# DKD
# --------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dkd_loss_matches_loop(temp):
    s, t = _randn(5, 6, seed=8, scale=2), _randn(5, 6, seed=9, scale=2)
    labels = torch.tensor([0, 5, 2, 2, 3])
    _close(KF.dkd_loss(s, t, labels, 1.0, 8.0, temp), _ref_dkd(s, t, labels, 1.0, 8.0, temp), tol=1e-9)


def test_dkd_reformulates_kd_for_one_sample():
    # Zhao et al. Eq. 7: KD = TCKD + (1 − p_t[gt]) · NCKD for a single sample
    s, t = _randn(1, 5, seed=10, scale=2), _randn(1, 5, seed=11, scale=2)
    labels = torch.tensor([3])
    temp = 2.0
    p_gt = _softmax(t[0].tolist(), temp)[3]
    dkd = KF.dkd_loss(s, t, labels, 1.0, 1.0 - p_gt, temp)
    assert dkd.item() == pytest.approx(KF.kd_loss(s, t, temp).item(), rel=1e-9)


def test_dkd_identical_logits_is_zero_and_weights_are_linear():
    s = _randn(4, 5, seed=12)
    labels = torch.tensor([0, 1, 2, 3])
    assert abs(KF.dkd_loss(s, s.clone(), labels, 1.0, 8.0, 4.0).item()) < 1e-10
    t = _randn(4, 5, seed=13)
    tckd = KF.dkd_loss(s, t, labels, 1.0, 0.0, 4.0)
    nckd = KF.dkd_loss(s, t, labels, 0.0, 1.0, 4.0)
    _close(KF.dkd_loss(s, t, labels, 2.0, 3.0, 4.0), 2 * tckd.item() + 3 * nckd.item())


def test_dkd_argument_checks():
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError):
        KF.dkd_loss(s, t, torch.tensor([0, 1]), 1.0, 8.0, 4.0)
    with pytest.raises(ValueError):
        KF.dkd_loss(s, t, torch.tensor([0, 1, 4]), 1.0, 8.0, 4.0)
    with pytest.raises(ValueError):
        KF.dkd_loss(s, t, torch.tensor([0.0, 1.0, 2.0]), 1.0, 8.0, 4.0)
    with pytest.raises(ValueError):
        KF.dkd_loss(s, t, torch.tensor([0, 1, 2]), 1.0, 8.0, 0.0)


# --------------------------------------------------------------------------
# DIST
# --------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dist_loss_matches_loop(temp):
    s, t = _randn(4, 5, seed=14, scale=2), _randn(4, 5, seed=15, scale=2)
    _close(KF.dist_loss(s, t, 1.0, 2.0, temp), _ref_dist(s, t, 1.0, 2.0, temp), tol=1e-9)


def test_dist_loss_identical_and_affinely_related_predictions():
    s = _randn(3, 4, seed=16)
    assert abs(KF.dist_loss(s, s.clone(), 1.0, 1.0, 1.0).item()) < 1e-6
    # two samples, two classes: softmax rows are (p, 1-p); centred rows are ±(p - 1/2),
    # so every row correlation is +1 or -1: here the teacher's preference is
    # reversed in both samples, each row correlates at -1 and inter = 1 - (-1) = 2;
    # the columns are (p1, p2) vs (q1, q2) with the same ordering flipped: -1 too
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    assert KF.dist_loss(s, t, 1.0, 0.0, 1.0).item() == pytest.approx(2.0, abs=1e-6)
    assert KF.dist_loss(s, t, 0.0, 1.0, 1.0).item() == pytest.approx(2.0, abs=1e-6)


# --------------------------------------------------------------------------
# FitNets, AT, SP, PKT, RKD
# --------------------------------------------------------------------------


def test_fitnet_loss_matches_loop_and_checks_shapes():
    s, t = _randn(2, 3, 2, 2, seed=17), _randn(2, 3, 2, 2, seed=18)
    flat = [(a - b) ** 2 for a, b in zip(s.flatten().tolist(), t.flatten().tolist())]
    _close(KF.fitnet_loss(s, t), sum(flat) / len(flat))
    with pytest.raises(ValueError):
        KF.fitnet_loss(s, t[:, :2])


@pytest.mark.parametrize("p", [2, 4])
def test_at_loss_same_size_matches_loop(p):
    fs = [_randn(2, 3, 3, 3, seed=19), _randn(2, 2, 2, 2, seed=20)]
    ft = [_randn(2, 5, 3, 3, seed=21), _randn(2, 4, 2, 2, seed=22)]
    expected = sum(_ref_at_pair(a, b, p) for a, b in zip(fs, ft))
    _close(KF.at_loss(fs, ft, p), expected)
    # a single tensor is one pair
    _close(KF.at_loss(fs[0], ft[0], p), _ref_at_pair(fs[0], ft[0], p))


def test_at_loss_pools_the_larger_map_to_the_smaller():
    fs_big, ft_small = _randn(2, 3, 4, 4, seed=23), _randn(2, 2, 2, 2, seed=24)
    _close(KF.at_loss([fs_big], [ft_small]), _ref_at_pair(_block_mean(fs_big, 2), ft_small, 2))
    fs_small, ft_big = _randn(2, 3, 2, 2, seed=25), _randn(2, 2, 4, 4, seed=26)
    _close(KF.at_loss([fs_small], [ft_big]), _ref_at_pair(fs_small, _block_mean(ft_big, 2), 2))
    assert KF.at_loss([fs_big], [fs_big.clone()]).item() == 0.0


def test_at_loss_argument_checks():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError):
        KF.at_loss([a, a], [a])
    with pytest.raises(ValueError):
        KF.at_loss([], [])
    with pytest.raises(ValueError):
        KF.at_loss([a], [torch.randn(3, 3, 4, 4)])
    with pytest.raises(ValueError):
        KF.at_loss([a.flatten(2)], [a.flatten(2)])


def test_sp_loss_matches_loop():
    fs, ft = _randn(3, 2, 2, 2, seed=27), _randn(3, 5, seed=28)
    _close(KF.sp_loss(fs, ft), _ref_sp(fs, ft))
    assert KF.sp_loss(fs, 2.0 * fs).item() == pytest.approx(0.0, abs=1e-14)  # scale-invariant rows
    with pytest.raises(ValueError):
        KF.sp_loss(fs, ft[:2])


def test_pkt_loss_matches_loop():
    fs, ft = _randn(4, 3, seed=29), _randn(4, 6, seed=30)
    _close(KF.pkt_loss(fs, ft), _ref_pkt(fs, ft))
    assert abs(KF.pkt_loss(fs, fs.clone()).item()) < 1e-12


def test_pkt_loss_zero_embedding_gives_finite_loss():
    fs = _randn(3, 4, seed=31)
    fs[1] = 0.0  # norm 0: the row becomes 0 / eps = 0, similarity 1/2
    ft = _randn(3, 4, seed=32)
    assert torch.isfinite(KF.pkt_loss(fs, ft))
    _close(KF.pkt_loss(fs, ft), _ref_pkt(fs, ft))


@pytest.mark.parametrize("squared", [False, True])
def test_rkd_loss_matches_loop(squared):
    fs, ft = _randn(4, 3, seed=33), _randn(4, 2, 2, seed=34)
    _close(KF.rkd_loss(fs, ft, 25, 50, squared=squared), _ref_rkd(fs, ft, 25.0, 50.0, squared), tol=1e-9)
    _close(KF.rkd_loss(fs, ft, 1.0, 0.0, squared=squared), _ref_rkd(fs, ft, 1.0, 0.0, squared), tol=1e-9)


def test_rkd_loss_is_zero_for_similar_configurations():
    # distances are normalised by their mean and angles are invariant to scale,
    # rotation and translation
    fs = _randn(4, 2, seed=35)
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    ft = 3.0 * fs @ rot + 1.5
    assert abs(KF.rkd_loss(fs, ft).item()) < 1e-12
    with pytest.raises(ValueError):
        KF.rkd_loss(fs[:1], ft[:1])


# --------------------------------------------------------------------------
# gradients, shapes, dtypes
# --------------------------------------------------------------------------

_LABELS = torch.tensor([0, 2, 1, 3])


def _call(name, s, t):
    if name == "kd":
        return KF.kd_loss(s, t, 4.0)
    if name == "kd_std":
        return KF.kd_loss(s, t, 2.0, standardize=True)
    if name == "dkd":
        return KF.dkd_loss(s, t, _LABELS, 1.0, 8.0, 4.0)
    if name == "dist":
        return KF.dist_loss(s, t, 1.0, 1.0, 4.0)
    if name == "fitnet":
        return KF.fitnet_loss(s, t)
    if name == "at":
        return KF.at_loss([s.view(4, 1, 2, 2)], [t.view(4, 1, 2, 2)])
    if name == "sp":
        return KF.sp_loss(s, t)
    if name == "pkt":
        return KF.pkt_loss(s, t)
    if name == "rkd":
        return KF.rkd_loss(s, t)
    raise AssertionError(name)


_ALL = ["kd", "kd_std", "dkd", "dist", "fitnet", "at", "sp", "pkt", "rkd"]


@pytest.mark.parametrize("name", _ALL)
def test_gradient_reaches_student_only(name):
    s = torch.randn(4, 4, generator=_gen(36), requires_grad=True)
    t = torch.randn(4, 4, generator=_gen(37), requires_grad=True)
    loss = _call(name, s, t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize("name", _ALL)
def test_half_precision_inputs_computed_in_float32(name):
    s = torch.randn(4, 4, generator=_gen(38)).to(torch.bfloat16)
    t = torch.randn(4, 4, generator=_gen(39)).to(torch.bfloat16)
    loss = _call(name, s, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = _call(name, s.float(), t.float())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("fn", [KF.kd_loss, KF.dist_loss])
def test_logit_losses_check_shapes_and_temperature(fn):
    extra = () if fn is KF.kd_loss else (1.0, 1.0)

    def call(s, t, temp):
        return fn(s, t, *extra, temp)

    with pytest.raises(ValueError):
        call(torch.randn(3, 4), torch.randn(3, 5), 1.0)
    with pytest.raises(ValueError):
        call(torch.randn(3, 4, 1), torch.randn(3, 4, 1), 1.0)
    with pytest.raises(ValueError):
        call(torch.randn(3, 4), torch.randn(3, 4), 0.0)
    with pytest.raises(ValueError):
        call(torch.randn(3, 4), torch.randn(3, 4), -1.0)


# --------------------------------------------------------------------------
# CRD
# --------------------------------------------------------------------------


def _small_crd(seed=0, **kw) -> CRD:
    torch.manual_seed(seed)
    args = dict(feat_dim=4, nce_k=3)
    args.update(kw)
    return CRD(5, 3, 8, **args).double()


def _embed(lin: torch.nn.Linear, f: torch.Tensor) -> list[list[float]]:
    w, b = lin.weight.tolist(), lin.bias.tolist()
    out = []
    for row in f.reshape(f.shape[0], -1).tolist():
        y = [sum(wi * xi for wi, xi in zip(wr, row)) + bi for wr, bi in zip(w, b)]
        n = math.sqrt(sum(v * v for v in y))
        out.append([v / n for v in y])
    return out


def test_nce_loss_matches_loop():
    x = torch.rand(3, 5, generator=_gen(40), dtype=torch.float64) + 0.1
    n = 100
    mpn = 4 / n
    expected = 0.0
    for row in x.tolist():
        expected += math.log(row[0] / (row[0] + mpn + 1e-7))
        expected += sum(math.log(mpn / (v + mpn + 1e-7)) for v in row[1:])
    _close(nce_loss(x, n), -expected / 3)


def test_crd_loss_z_and_memory_update_match_loop():
    crd = _small_crd(1)
    mem_s0, mem_t0 = crd.memory_s.tolist(), crd.memory_t.tolist()
    fs, ft = _randn(2, 5, seed=41), _randn(2, 3, seed=42)
    idx = torch.tensor([6, 1])
    cidx = torch.tensor([[6, 0, 2, 6], [1, 7, 7, 3]])
    loss = crd(fs, ft, idx, cidx)

    v_s, v_t = _embed(crd.embed_s.linear, fs), _embed(crd.embed_t.linear, ft)
    temp, n, m = 0.07, 8, 0.5

    def scores(v, mem):
        return [[math.exp(sum(a * b for a, b in zip(mem[j], v[i])) / temp) for j in cidx[i].tolist()] for i in range(2)]

    sc_s, sc_t = scores(v_s, mem_t0), scores(v_t, mem_s0)  # student anchor vs teacher memory, and vice versa
    z_s = sum(sum(r) for r in sc_s) / 8 * n
    z_t = sum(sum(r) for r in sc_t) / 8 * n
    assert crd.z.tolist() == pytest.approx([z_s, z_t], rel=1e-12)

    def nce(sc, z):
        mpn = 3 / n
        tot = 0.0
        for r in sc:
            r = [v / z for v in r]
            tot += math.log(r[0] / (r[0] + mpn + 1e-7)) + sum(math.log(mpn / (v + mpn + 1e-7)) for v in r[1:])
        return -tot / len(sc)

    _close(loss, nce(sc_s, z_s) + nce(sc_t, z_t), tol=1e-9)

    # memory: the rows of the batch move to normalize(m·row + (1-m)·v); the others stay
    for mem0, mem, v in ((mem_s0, crd.memory_s, v_s), (mem_t0, crd.memory_t, v_t)):
        expected = [list(r) for r in mem0]
        for i, row in enumerate(idx.tolist()):
            u = [m * a + (1 - m) * b for a, b in zip(mem0[row], v[i])]
            nu = math.sqrt(sum(x * x for x in u))
            expected[row] = [x / nu for x in u]
        torch.testing.assert_close(mem, torch.tensor(expected, dtype=torch.float64))


def test_crd_z_estimated_once_and_reset():
    crd = _small_crd(2)
    assert not crd.z_is_set and crd.z.tolist() == [-1.0, -1.0]
    fs, ft = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    crd(fs, ft, torch.tensor([0, 1, 2]))
    z = crd.z.clone()
    assert crd.z_is_set and (z > 0).all()
    crd(fs * 2, ft * 3, torch.tensor([3, 4, 5]))
    assert torch.equal(crd.z, z)
    crd.reset_z()
    assert not crd.z_is_set
    crd(fs * 2, ft * 3, torch.tensor([3, 4, 5]))
    assert crd.z_is_set and not torch.equal(crd.z, z)


def test_crd_loss_finite_and_gradients():
    torch.manual_seed(3)
    crd = CRD(6, 4, 40, feat_dim=8, nce_k=10)
    fs = torch.randn(5, 6, requires_grad=True)
    ft = torch.randn(5, 2, 2, requires_grad=True)  # flattened to 4
    loss = crd(fs, ft, torch.tensor([0, 9, 17, 33, 39]))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None
    assert crd.embed_s.linear.weight.grad is not None and crd.embed_t.linear.weight.grad is not None
    assert not crd.memory_s.requires_grad and not crd.memory_t.requires_grad
    # a memory row has unit norm after its update
    assert crd.memory_s[9].norm().item() == pytest.approx(1.0, rel=1e-6)


def test_crd_contrast_idx_forms_agree():
    fs, ft = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    idx = torch.tensor([4, 0])
    neg = torch.tensor([[1, 2, 3], [5, 6, 7]])
    a, b = _small_crd(4), _small_crd(4)
    la = a(fs, ft, idx, neg)
    lb = b(fs, ft, idx, torch.cat([idx[:, None], neg], dim=1))
    assert la.item() == lb.item()
    with pytest.raises(ValueError):
        b(fs, ft, idx, torch.tensor([[1, 2, 3, 4], [0, 6, 7, 1]]))  # positive of sample 0 missing
    with pytest.raises(ValueError):
        b(fs, ft, idx, torch.tensor([[1, 2], [5, 6]]))
    with pytest.raises(ValueError):
        b(fs, ft, torch.tensor([4, 8]))
    with pytest.raises(ValueError):
        b(fs, ft, torch.tensor([4, 0, 1]))


def test_crd_sampling_uses_global_rng():
    crd = _small_crd(5, nce_k=6)
    torch.manual_seed(11)
    a = crd.sample_indices(torch.tensor([2, 3]))
    torch.manual_seed(11)
    b = crd.sample_indices(torch.tensor([2, 3]))
    assert torch.equal(a, b) and a.shape == (2, 7)
    assert a[:, 0].tolist() == [2, 3] and 0 <= int(a.min()) and int(a.max()) < 8


def test_crd_duplicate_indices_update_deterministically():
    crd = _small_crd(6)
    mem0 = crd.memory_s.clone()
    fs, ft = _randn(3, 5, seed=43), _randn(3, 3, seed=44)
    crd(fs, ft, torch.tensor([2, 5, 2]), torch.tensor([[1, 3, 4], [0, 1, 2], [6, 7, 0]]))
    v = torch.tensor(_embed(crd.embed_s.linear, fs), dtype=torch.float64)
    u = 0.5 * mem0[2] + 0.5 * v[2]  # the last occurrence of index 2 wins
    torch.testing.assert_close(crd.memory_s[2], u / u.norm())


def test_crd_state_dict_round_trip():
    a = _small_crd(7)
    for step in range(2):
        a(torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64), torch.tensor([step, 3, 7]))
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert {"memory_s", "memory_t", "z"} <= set(state)
    b = _small_crd(99)  # different initialisation, no Z yet
    b.load_state_dict(state)
    assert b.z_is_set
    fs, ft, idx = (
        torch.randn(3, 5, dtype=torch.float64),
        torch.randn(3, 3, dtype=torch.float64),
        torch.tensor([1, 4, 6]),
    )
    torch.manual_seed(21)
    la = a(fs, ft, idx)
    torch.manual_seed(21)
    lb = b(fs, ft, idx)
    assert la.item() == lb.item()
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_crd_argument_checks():
    with pytest.raises(ValueError):
        CRD(4, 4, 10, nce_k=10)
    with pytest.raises(ValueError):
        CRD(4, 4, 10, nce_k=16)
    with pytest.raises(ValueError):
        CRD(4, 4, 10, nce_k=0)
    with pytest.raises(ValueError):
        CRD(4, 4, 10, nce_k=3, nce_t=0.0)
    with pytest.raises(ValueError):
        CRD(4, 4, 10, nce_k=3, nce_m=1.5)
    assert CRD(4, 4, 10, nce_k=9).nce_k == 9


# --------------------------------------------------------------------------
# ConvRegressor
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "s_shape,t_shape,kind,kernel",
    [
        ((3, 8, 8), (5, 4, 4), torch.nn.Conv2d, (3, 3)),  # student twice as large: stride 2
        ((3, 4, 4), (5, 8, 8), torch.nn.ConvTranspose2d, (4, 4)),  # student half as large
        ((3, 4, 4), (5, 4, 4), torch.nn.Conv2d, (1, 1)),  # same size
        ((3, 7, 9), (5, 4, 5), torch.nn.Conv2d, (4, 5)),  # larger: kernel s + 1 - t
        ((3, 2, 2), (5, 1, 1), torch.nn.Conv2d, (3, 3)),
    ],
)
def test_conv_regressor_maps_to_teacher_shape(s_shape, t_shape, kind, kernel):
    torch.manual_seed(0)
    reg = ConvRegressor(s_shape, t_shape)
    assert type(reg.conv) is kind and tuple(reg.conv.kernel_size) == kernel
    out = reg(torch.randn(2, *s_shape))
    assert out.shape == (2, *t_shape)
    assert (out >= 0).all()  # ReLU
    assert (ConvRegressor(s_shape, t_shape, use_relu=False)(torch.randn(2, *s_shape)) < 0).any()


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [((3, 3, 3), (5, 8, 8)), ((3, 4, 4), (5, 4, 6)), ((3, 4, 4), (5, 4)), ((3, 0, 4), (5, 4, 4))],
)
def test_conv_regressor_rejects_unsupported_shapes(s_shape, t_shape):
    with pytest.raises(ValueError):
        ConvRegressor(s_shape, t_shape)
