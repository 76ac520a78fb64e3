"""Benchmark: start-up of the ``kdt`` commands against their goals and the import floor.

Times fresh interpreters, as a user's shell starts them (median of
``--repeats`` runs, interleaved):

* ``python -c pass``: the interpreter alone (the floor);
* ``python -c "import torch"``: what a command that imports torch pays at least;
* ``kdt --help`` and ``kdt plugins`` (goal 0.5 s): no torch is imported;
* ``kdt validate recipes/proto2proto.toml`` (goal 2 s): with the caches a
  first, untimed run fills (timm's model names, the components' schemas) it
  imports neither torch nor timm nor scipy, only the modules of the
  parameter checks;
* the same with empty caches, each run with a new cache folder (a user's
  first check on a machine: it imports torch, the components and timm).

Prints each time, its goal and the ratio time/goal (≤ 1 meets the goal).

Usage::

    python benchmarks/bench_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("python -c pass", [sys.executable, "-c", "pass"], None),
    ("python -c 'import torch'", [sys.executable, "-c", "import torch"], None),
    ("kdt --help", [sys.executable, "-m", "kdtoolkit", "--help"], 0.5),
    ("kdt plugins", [sys.executable, "-m", "kdtoolkit", "plugins"], 0.5),
    (
        "kdt validate recipes/proto2proto.toml",
        [sys.executable, "-m", "kdtoolkit", "validate", "recipes/proto2proto.toml"],
        2.0,
    ),
    (
        "  same, caches empty (first check)",
        [sys.executable, "-m", "kdtoolkit", "validate", "recipes/proto2proto.toml"],
        None,
    ),
]
COLD = CASES[-1][0]


def _once(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, KDT_CACHE_DIR=tempfile.mkdtemp(prefix="kdt-bench-cache-"))
    _once(CASES[-1][1], env)  # builds the timm name and schema caches, as a user's first check does
    times: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    for _ in range(args.repeats):
        for name, cmd, _ in CASES:
            cold = dict(env, KDT_CACHE_DIR=tempfile.mkdtemp(prefix="kdt-bench-cold-")) if name == COLD else env
            times[name].append(_once(cmd, cold))
    print(
        f"# start-up, median of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'command':42s} {'median s':>9s} {'min s':>7s} {'goal s':>7s} {'time/goal':>9s}")
    for name, _, goal in CASES:
        med, low = statistics.median(times[name]), min(times[name])
        ratio = f"{med / goal:9.2f}" if goal else f"{'—':>9s}"
        print(f"{name:42s} {med:9.3f} {low:7.3f} {goal if goal else '—':>7} {ratio}")


if __name__ == "__main__":
    main()
