"""Benchmark: Prototype Matching Score (PMS, spec §4) -- toolkit vs the literal definition.

Measures in one run, on seeded random argmin records:

(a) the toolkit's full PMS (``colocation_matrix``: one sparse product, then
    ``pms_from_colocation``: one Hungarian solve per cap plus one for the saved
    matching);
(b) the definition done literally, the way the original evaluation did it:
    a set of "image_location" string ids per prototype, ``len(A & B)`` for
    every (teacher, student) pair and every cap.  It is timed on a random
    subsample of prototype pairs (all caps) and extrapolated linearly to the
    full ``P_t x P_s x caps`` (each intersection costs O(N) hash look-ups, no
    matter which pair it is); set building is timed on the sampled prototypes
    and extrapolated to ``P_t + P_s`` prototypes (built once, which flatters
    the literal version); its Hungarian solves are the toolkit's measured
    per-solve time (same scipy solver);
(c) the ratio (b) / (a).

The literal counts on the subsample are checked against the toolkit's matrix.

Usage (defaults = Stanford Cars scale: N = 8041 test images, P = 1960, 7x7)::

    python benchmarks/bench_pms.py [--n 8041 --p 1960 --grid 7 --subsample 32 --seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "plugins", ROOT):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kdt_proto2proto import metrics  # noqa: E402


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8041, help="number of test images N (default 8041)")
    parser.add_argument("--p", type=int, default=1960, help="teacher prototypes P_t (default 1960)")
    parser.add_argument("--ps", type=int, default=None, help="student prototypes P_s (default: --p)")
    parser.add_argument("--grid", type=int, default=7, help="latent grid side, L = grid^2 (default 7)")
    parser.add_argument(
        "--subsample",
        type=int,
        default=32,
        help="teacher and student prototypes sampled for the literal version: subsample^2 pairs (default 32)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    args.ps = args.p if args.ps is None else args.ps
    for name in ("n", "p", "ps", "grid", "subsample"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    if args.n < 10:
        parser.error("--n must be at least 10 (PMS has no cap below 10 images)")
    return args


def _literal_sets(argmin: np.ndarray, columns: list[int]) -> list[set[str]]:
    n = argmin.shape[0]
    return [{f"{x}_{int(argmin[x, j])}" for x in range(n)} for j in columns]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    n, pt, ps, num_locations = args.n, args.p, args.ps, args.grid * args.grid
    gen = torch.Generator().manual_seed(args.seed)
    teacher = torch.randint(0, num_locations, (n, pt), generator=gen)
    student = torch.randint(0, num_locations, (n, ps), generator=gen)
    caps = metrics.pms_caps(n)

    # (a) toolkit ----------------------------------------------------------
    t0 = time.perf_counter()
    counts = metrics.colocation_matrix(teacher, student, num_locations)
    t1 = time.perf_counter()
    result = metrics.pms_from_colocation(counts, n)
    t2 = time.perf_counter()
    coloc_s, hungarian_s = t1 - t0, t2 - t1
    toolkit_s = coloc_s + hungarian_s
    per_solve_s = hungarian_s / (len(caps) + 1)

    # (b) literal, on a subsample of pairs ---------------------------------
    rng = random.Random(args.seed)
    ti = sorted(rng.sample(range(pt), min(args.subsample, pt)))
    sj = sorted(rng.sample(range(ps), min(args.subsample, ps)))
    a_t, a_s = teacher.numpy(), student.numpy()
    t0 = time.perf_counter()
    t_sets = _literal_sets(a_t, ti)
    s_sets = _literal_sets(a_s, sj)
    build_s = time.perf_counter() - t0
    sampled_pairs = len(ti) * len(sj)
    raw = np.zeros((len(caps), len(ti), len(sj)), dtype=np.int64)
    sims = np.zeros((len(caps), len(ti), len(sj)))
    t0 = time.perf_counter()
    for k, cap in enumerate(caps):
        for a, ts in enumerate(t_sets):
            for b, ss in enumerate(s_sets):
                raw[k, a, b] = shared = len(ts & ss)
                sims[k, a, b] = min(1.0, shared / cap)
    intersect_s = time.perf_counter() - t0
    agree = bool((raw == counts[np.ix_(ti, sj)][None]).all())

    per_pair_cap_s = intersect_s / (sampled_pairs * len(caps))
    per_set_s = build_s / (len(ti) + len(sj))
    lit_build_s = per_set_s * (pt + ps)
    lit_intersect_s = per_pair_cap_s * pt * ps * len(caps)
    lit_hungarian_s = per_solve_s * len(caps)
    literal_s = lit_build_s + lit_intersect_s + lit_hungarian_s
    hash_ops = float(pt) * ps * len(caps) * n

    # report ---------------------------------------------------------------
    command = "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0]] + (sys.argv[1:] if argv is None else argv)))
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, Python {platform.python_version()}"
    )
    rows = [
        ("(a) toolkit: colocation_matrix (sparse product)", f"{coloc_s:.2f} s", "measured"),
        (f"(a) toolkit: {len(caps) + 1} Hungarian solves {pt}x{ps}", f"{hungarian_s:.2f} s", "measured"),
        ("(a) toolkit: full PMS", f"{toolkit_s:.2f} s", "measured"),
        (
            f"(b) literal: build {pt + ps} sets of {n} string ids",
            _fmt(lit_build_s),
            f"from {len(ti) + len(sj)} sets: {per_set_s * 1e3:.2f} ms/set",
        ),
        (
            f"(b) literal: {pt}x{ps} pairs x {len(caps)} caps intersections",
            _fmt(lit_intersect_s),
            f"from {sampled_pairs} pairs x {len(caps)} caps in {intersect_s:.2f} s: "
            f"{per_pair_cap_s * 1e6:.0f} us/pair/cap (~{hash_ops:.1e} hash look-ups)",
        ),
        (f"(b) literal: {len(caps)} Hungarian solves", _fmt(lit_hungarian_s), "toolkit's per-solve time"),
        ("(b) literal: full PMS", _fmt(literal_s), "extrapolated"),
        ("(c) ratio literal / toolkit", f"{literal_s / toolkit_s:,.0f}x", ""),
    ]
    title = (
        f"PMS, N={n}, P_t={pt}, P_s={ps}, grid {args.grid}x{args.grid} (L={num_locations}), "
        f"{len(caps)} caps, seed {args.seed}"
    )
    _print_table(title, rows)
    print(f"PMS (random records) = {result.score:.6f}")
    print(f"literal counts agree with the toolkit on the sampled pairs: {'yes' if agree else 'NO'}")
    print(f"machine: {machine}")
    print(f"command: {command}")
    return 0 if agree else 1


def _fmt(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text fallback
        print(title)
        for what, value, how in rows:
            print(f"  {what:<58} {value:>12}  {how}")
        return
    table = Table(title=title)
    table.add_column("step")
    table.add_column("time", justify="right")
    table.add_column("how")
    for what, value, how in rows:
        table.add_row(what, value, how)
    Console(width=160).print(table)


if __name__ == "__main__":
    sys.exit(main())
