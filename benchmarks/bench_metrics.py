"""Benchmark: AAP/AJS at 8 thresholds and PMS -- previous implementation vs current.

Builds seeded random records at Stanford-Cars scale (N = 8041 test images,
P = 1960 prototypes for teacher and student, 7x7 grid) and times, side by
side in one run, the previous implementation (kept below as the reference)
and the toolkit's current one; checks that they give the same numbers.

Records ("distilled" by default, "uniform" with --kind uniform):

* distilled: per image an object centre; every prototype's argmin lies
  around it (Gaussian, sd 1.2 cells, clipped to the grid), and each student
  prototype copies the location of "its" teacher prototype in 60% of the
  images; minimum distances log-normal (float32), so the thresholds
  0.01 ... 5 cut through them;
* uniform: argmins uniform over the grid, independent teacher and student.

Measured: (1) AAP of teacher and student and AJS of the student, at the
8 default thresholds, as ``kdt metrics`` calls them (``aap_by_tau`` twice,
``ajs_by_tau`` once) and with the teacher's minima shared
(``location_minima`` + ``aap_from_minima``/``ajs_from_minima``); (2) PMS:
co-location counts, then the Hungarian solves.  Each timing is the median of
--repeats runs, old and new interleaved.

Usage::

    python benchmarks/bench_metrics.py [--kind distilled|uniform --n 8041 --p 1960 --grid 7 --repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "plugins", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from kdt_proto2proto import metrics as M  # noqa: E402

#: Goals at Stanford-Cars scale (issue "Speed"): both models' AAP and AJS at 8 thresholds, and PMS.
GOAL_AAP_AJS_S = 0.3
GOAL_PMS_S = 2.0

# --------------------------------------------------------------------------
# the previous implementation (reference)
# --------------------------------------------------------------------------


def _prev_checked(d, a):
    """The records as the previous implementation read them: torch tensors, ``argmin`` as int64."""
    d = d if isinstance(d, torch.Tensor) else torch.as_tensor(np.asarray(d))
    a = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return d, a.long()


def _old_active(d, a, num_locations, tau):
    d, a = _prev_checked(d, a)
    if math.isinf(tau):
        index = a
    else:
        index = torch.where(d <= tau, a, torch.full_like(a, num_locations))
    out = torch.zeros(a.shape[0], num_locations + 1, dtype=torch.bool)
    out.scatter_(1, index, True)
    return out[:, :num_locations]


def old_aap_by_tau(d, a, num_locations, taus):
    return {
        M.tau_key(t): float(_old_active(d, a, num_locations, t).sum(dim=1, dtype=torch.float64).mean()) for t in taus
    }


def old_ajs_by_tau(td, ta, sd, sa, num_locations, taus):
    out = {}
    for t in taus:
        st = _old_active(td, ta, num_locations, t)
        ss = _old_active(sd, sa, num_locations, t)
        inter = (st & ss).sum(dim=1, dtype=torch.float64)
        union = (st | ss).sum(dim=1, dtype=torch.float64)
        out[M.tau_key(t)] = float(torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter)).mean())
    return out


def old_colocation(ta, sa, num_locations, block_images=1024):
    ta, sa = ta.numpy(), sa.numpy()
    counts = np.zeros((ta.shape[1], sa.shape[1]), dtype=np.int64)
    for start in range(0, ta.shape[0], block_images):
        a_t = M._onehot_codes(ta[start : start + block_images], num_locations)
        a_s = M._onehot_codes(sa[start : start + block_images], num_locations)
        counts += (a_t @ a_s.T).toarray()
    return counts


def old_pms_from_colocation(colocation, n):
    counts = colocation.astype(np.float64)
    caps = M.pms_caps(n)
    costs, sim_sum = [], np.zeros(counts.shape)
    for cap in caps:
        sim = np.minimum(counts / cap, 1.0)
        sim_sum += sim
        cost = 1.0 - sim
        r, c = linear_sum_assignment(cost)
        costs.append(float(cost[r, c].mean()))
    sim_mean = sim_sum / len(caps)
    r, c = linear_sum_assignment(1.0 - sim_mean)
    return 1.0 - float(np.mean(costs)), costs, [(int(i), int(j), float(sim_mean[i, j])) for i, j in zip(r, c)]


# --------------------------------------------------------------------------
# records and timing
# --------------------------------------------------------------------------


def make_records(kind, n, pt, ps, side, seed):
    rng = np.random.default_rng(seed)
    num_locations = side * side
    if kind == "uniform":
        ta = rng.integers(0, num_locations, (n, pt))
        sa = rng.integers(0, num_locations, (n, ps))
    else:
        centre = rng.uniform(1.5, side - 2.5, (n, 2))

        def draw(p):
            hw = np.clip(np.rint(centre[:, None, :] + rng.normal(0, 1.2, (n, p, 2))), 0, side - 1).astype(np.int64)
            return hw[..., 0] * side + hw[..., 1]

        ta, sa = draw(pt), draw(ps)
        own = rng.permutation(pt)[:ps] if ps <= pt else rng.integers(0, pt, ps)
        sa = np.where(rng.random((n, ps)) < 0.6, ta[:, own], sa)
    td = rng.lognormal(0.3, 0.9, (n, pt)).astype(np.float32)
    sd = rng.lognormal(0.4, 0.9, (n, ps)).astype(np.float32)
    return (torch.from_numpy(td), torch.from_numpy(ta), torch.from_numpy(sd), torch.from_numpy(sa), num_locations)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("distilled", "uniform"), default="distilled")
    parser.add_argument("--n", type=int, default=8041)
    parser.add_argument("--p", type=int, default=1960)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n < 10:
        parser.error("--n must be at least 10 (PMS has no cap below 10 images)")
    td, ta, sd, sa, num_locations = make_records(args.kind, args.n, args.p, args.p, args.grid, args.seed)
    taus = M.DEFAULT_TAUS
    n = args.n

    def old_aap_ajs():
        return (
            old_aap_by_tau(td, ta, num_locations, taus),
            old_aap_by_tau(sd, sa, num_locations, taus),
            old_ajs_by_tau(td, ta, sd, sa, num_locations, taus),
        )

    def new_aap_ajs():
        return (
            M.aap_by_tau(td, ta, num_locations, taus),
            M.aap_by_tau(sd, sa, num_locations, taus),
            M.ajs_by_tau(td, ta, sd, sa, num_locations, taus),
        )

    def new_aap_ajs_shared():
        mt = M.location_minima(td, ta, num_locations)
        ms = M.location_minima(sd, sa, num_locations)
        return M.aap_from_minima(mt, taus), M.aap_from_minima(ms, taus), M.ajs_from_minima(mt, ms, taus)

    rows: dict[str, list[float]] = {}
    same = True
    ajs_diff = 0.0
    counts = None
    for _ in range(args.repeats):
        for name, fn in (
            ("aap_ajs old", old_aap_ajs),
            ("aap_ajs new", new_aap_ajs),
            ("aap_ajs shared", new_aap_ajs_shared),
        ):
            dt, out = timed(fn)
            rows.setdefault(name, []).append(dt)
            if name == "aap_ajs old":
                ref = out
            else:  # AAP exactly (sums of integers); AJS, a correctly rounded sum of ratios now, within 1e-12
                same &= out[:2] == ref[:2] and out[2].keys() == ref[2].keys()
                ajs_diff = max([ajs_diff, *(abs(out[2][k] - ref[2][k]) for k in ref[2])])
                same &= ajs_diff <= 1e-12
        dt_old_c, old_counts = timed(lambda: old_colocation(ta, sa, num_locations))
        dt_new_c, counts = timed(lambda: M.colocation_matrix(ta, sa, num_locations))
        same &= bool((old_counts == counts).all())
        dt_old_h, old_res = timed(lambda counts=counts: old_pms_from_colocation(counts, n))
        dt_new_h, res = timed(lambda counts=counts: M.pms_from_colocation(counts, n))
        same &= res.matching == old_res[2]
        same &= abs(res.score - old_res[0]) <= 1e-9 and all(abs(a - b) <= 1e-9 for a, b in zip(res.costs, old_res[1]))
        for name, dt in (
            ("coloc old", dt_old_c),
            ("coloc new", dt_new_c),
            ("hungarian old", dt_old_h),
            ("hungarian new", dt_new_h),
        ):
            rows.setdefault(name, []).append(dt)
    med = {k: statistics.median(v) for k, v in rows.items()}
    med["pms old"] = med["coloc old"] + med["hungarian old"]
    med["pms new"] = med["coloc new"] + med["hungarian new"]
    largest = int(counts.max())
    caps = M.pms_caps(n)
    print(
        f"{args.kind} records: N={n}, P_t=P_s={args.p}, grid {args.grid}x{args.grid}, seed {args.seed}; "
        f"median of {args.repeats}; max I = {largest}, caps {caps[0]}..{caps[-1]} "
        f"({sum(c < largest for c in caps)} of {len(caps)} below max I)"
    )
    print(f"{'measurement':<58}{'old':>9}{'new':>9}{'ratio':>9}{'goal':>9}{'new/goal':>9}")
    for label, old, new, goal in (
        ("AAP (T, S) + AJS at 8 tau, as kdt metrics calls them", "aap_ajs old", "aap_ajs new", None),
        ("AAP (T, S) + AJS at 8 tau, minima shared", "aap_ajs old", "aap_ajs shared", GOAL_AAP_AJS_S),
        ("PMS: co-location counts", "coloc old", "coloc new", None),
        ("PMS: Hungarian solves (+ saved matching)", "hungarian old", "hungarian new", None),
        ("PMS: total", "pms old", "pms new", GOAL_PMS_S),
    ):
        goal_text = f"{goal:>8.1f}s{med[new] / goal:>9.2f}" if goal else ""
        print(f"{label:<58}{med[old]:>8.3f}s{med[new]:>8.3f}s{med[old] / med[new]:>8.1f}x{goal_text}")
    print(
        f"same numbers as the previous implementation: {'yes' if same else 'NO'} "
        f"(largest AJS difference {ajs_diff:.1e}; AAP and co-location counts equal)"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    args_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"command: python benchmarks/bench_metrics.py {args_text}".rstrip())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
