"""Benchmark: drawing a prototype figure -- previous implementation vs current.

The previous ``prototype_figure`` (kept below as the reference) drew one
matplotlib axes per image and ran ``tight_layout``; the current one tiles the
images into one picture, draws the boxes into its pixels and draws it on a
single axes. Both save the same-sized PNG. Timed side by side in one process,
interleaved, median of ``--repeats``, for the PMS matching figure of ``kdt
metrics --pms`` (20 pairs: 40 tiles) and a push figure of 100 prototypes, on
56 px images.

Usage::

    python benchmarks/bench_figures.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from kdt_prototypes.figures import _display, prototype_figure  # noqa: E402


def previous_prototype_figure(path, images, boxes, labels, title, cols=10):
    n = len(images)
    cols = min(cols, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (img, box, lab) in enumerate(zip(images, boxes, labels)):
        ax = axes.flat[k]
        ax.imshow(_display(img).numpy(), interpolation="nearest")
        top, left, bottom, right = box
        ax.add_patch(
            Rectangle(
                (left - 0.5, top - 0.5),
                right - left + 1,
                bottom - top + 1,
                fill=False,
                edgecolor="yellow",
                linewidth=1.2,
            )
        )
        ax.set_title(lab, fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="kdt-bench-figures-"))
    g = torch.Generator().manual_seed(0)
    cases = {}
    for name, n in (("PMS matching (20 pairs, 40 tiles)", 40), ("push (100 prototypes)", 100)):
        images = [torch.randn(3, 56, 56, generator=g) for _ in range(n)]
        boxes = [(int(a), int(b), int(a) + 15, int(b) + 20) for a, b in torch.randint(0, 35, (n, 2), generator=g)]
        labels = [f"t p{k} · sim 0.{k % 10}" for k in range(n)]
        cases[name] = (images, boxes, labels)
    previous_prototype_figure(out / "warm.png", *cases[next(iter(cases))], "warm-up")  # fonts, caches
    times = {(name, impl): [] for name in cases for impl in ("previous", "current")}
    for _ in range(args.repeats):
        for name, (images, boxes, labels) in cases.items():
            for impl, fn in (("previous", previous_prototype_figure), ("current", prototype_figure)):
                t0 = time.perf_counter()
                fn(out / f"{impl}.png", images, boxes, labels, name)
                times[(name, impl)].append(time.perf_counter() - t0)
    print(
        f"# prototype figures, 56 px tiles, median of {args.repeats}; {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'figure':36s} {'previous s':>11s} {'current s':>10s} {'speed-up':>9s}")
    for name in cases:
        a, b = statistics.median(times[(name, "previous")]), statistics.median(times[(name, "current")])
        print(f"{name:36s} {a:11.3f} {b:10.3f} {a / b:8.1f}x")


if __name__ == "__main__":
    main()
