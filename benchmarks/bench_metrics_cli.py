"""Benchmark: the whole ``kdt metrics --teacher T --student S --pms --json OUT`` command.

Writes a teacher's and a student's records files at Stanford-Cars scale
(N = 8,041 test images, 196 classes, P = 1,960 prototypes each, 7 × 7 grid,
the "distilled" records of ``bench_metrics.py``), then times the command in
fresh interpreters, as a user runs it: start-up, loading both files, AAP at
8 thresholds for both models, AJS, PMS (with its Hungarian solves), the
tables and the JSON. Prints the median wall time of ``--repeats`` runs, the
goal (4 s) and the ratio, beside ``python -c "import torch"`` as the floor.

Usage::

    python benchmarks/bench_metrics_cli.py [--repeats 3] [--kind distilled|uniform]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "plugins"), str(ROOT)]

GOAL_S = 4.0


def write_records(folder: Path, kind: str) -> tuple[Path, Path]:
    import torch

    from bench_metrics import make_records
    from kdtoolkit.results.records import Records

    td, ta, sd, sa, _ = make_records(kind, 8041, 1960, 1960, 7, seed=0)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 196, (8041,), generator=g)
    paths = []
    for name, d, a in (("teacher", td, ta), ("student", sd, sa)):
        logits = torch.randn(8041, 196, generator=g)
        recs = Records(
            {"logits": logits, "labels": labels, "min_distances": d, "argmin": a},
            {"stage": name, "H": 7, "W": 7, "num_classes": 196, "dataset": "synthetic"},
        )
        path = folder / f"{name}.safetensors"
        recs.save(path)
        paths.append(path)
    return paths[0], paths[1]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-800:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kind", choices=("distilled", "uniform"), default="distilled")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdt-bench-metrics-"))
    teacher, student = write_records(tmp, args.kind)
    cmd = [
        sys.executable,
        "-m",
        "kdtoolkit",
        "metrics",
        "--teacher",
        str(teacher),
        "--student",
        str(student),
        "--pms",
        "--json",
        str(tmp / "out.json"),
    ]
    floor = [sys.executable, "-c", "import torch"]
    times, floors = [], []
    for _ in range(args.repeats):
        times.append(wall(cmd))
        floors.append(wall(floor))
    med = statistics.median(times)
    print(
        f"# kdt metrics --teacher T --student S --pms --json OUT; {args.kind} records, N 8041, P 1960 + 1960, "
        f"7x7; median of {args.repeats}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'command':44s} {'median s':>9s} {'goal s':>7s} {'time/goal':>9s}")
    print(f"{'kdt metrics ... --pms --json OUT':44s} {med:9.3f} {GOAL_S:7.1f} {med / GOAL_S:9.2f}")
    print(f"{'python -c import torch (floor)':44s} {statistics.median(floors):9.3f} {'':>7s} {'':>9s}")


if __name__ == "__main__":
    main()
